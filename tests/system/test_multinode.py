"""The tiny pipeline on a three-node Ray cluster with the store and work_dir on S3, all on this machine (issue 26).

A head and two worker raylets, each started with `ray start` on 127.0.0.1 with its own temp dir and ports, and moto's
S3-compatible server on 127.0.0.1 for the store. The head has no CPUs (as on a real cluster: the job's driver, GCS and
job server only), so every training worker and RL actor runs on a worker node; SPREAD placement puts a training
stage's two workers, and an RL method's actors, on both. Nothing in the job may rely on a node-local path: the store
and work_dir are s3:// URIs (the flow refuses a local one on a multi-node cluster).

The second test kills a worker node's raylet (kill -9) while SFT trains and again while PPO runs, and starts a node
again later: each stage resumes from its latest checkpoint on S3.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from stages.common.store import ArtifactStore
from tests.system.test_system import BIN, REPO, Services, base_env, free_ports, needs_cli, run_ok

pytestmark = [pytest.mark.system, pytest.mark.slow, needs_cli]

BUCKET = "rlhf-multinode"
WORKER_CPUS = 2  # per worker node: two of them hold a training stage's 2 workers or an RL method's actors
# every Ray process keeps 127.0.0.1 as its node's address (Ray swaps it for the machine's interface address)
LOOPBACK = Path(__file__).with_name("loopback")


class Cluster:
    """moto's S3 server and a Ray head on 127.0.0.1; worker nodes are started (and killed) by the tests."""

    def __init__(self, services: Services, ray_tmp: Path, head_cpus: int = 0):
        self.services, self.tmp = services, ray_tmp
        s3_port, self.gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = free_ports(8)
        self.address = f"http://127.0.0.1:{dashboard}"
        self.aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        token_file = ray_tmp / "auth_token"  # Ray 2.60 starts clusters with token auth: the test's own token
        token_file.write_text(secrets.token_hex(32))
        self.auth = {"Authorization": f"Bearer {token_file.read_text()}"}
        self.env = base_env(**self.aws, PREFECT_HOME=str(ray_tmp / "prefect"), RAY_AUTH_MODE="token",
                            RAY_AUTH_TOKEN_PATH=str(token_file), RLHF_RAY_LOOPBACK="1", PYTHONPATH=str(LOOPBACK))
        services.start("s3", [BIN / "moto_server", "-H", "127.0.0.1", "-p", s3_port], self.env)
        services.wait_http("s3", f"{self.aws['AWS_ENDPOINT_URL']}/moto-api/", 60)
        services.start("ray-head", [
            BIN / "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", self.gcs,
            "--num-cpus", head_cpus, "--temp-dir", ray_tmp / "head", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", dashboard, "--ray-client-server-port", client,
            "--dashboard-agent-listen-port", agent_http, "--dashboard-agent-grpc-port", agent_grpc,
            "--metrics-export-port", metrics, "--runtime-env-agent-port", env_agent, "--disable-usage-stats",
        ], self.env)  # fmt: skip
        services.wait_http("ray-head", f"{self.address}/api/version", 180, self.auth)

    def start_worker(self, name: str) -> None:
        """A worker raylet with its own temp dir and ports (raylets on one machine must not share them). --block
        keeps `ray start` the parent of the node's processes, so stopping it stops exactly this node."""
        node_manager, object_manager, metrics, agent_http, agent_grpc, env_agent = free_ports(6)
        self.services.start(name, [
            BIN / "ray", "start", "--block", "--address", f"127.0.0.1:{self.gcs}", "--node-ip-address", "127.0.0.1",
            "--num-cpus", WORKER_CPUS, "--temp-dir", self.tmp / name, "--node-manager-port", node_manager,
            "--object-manager-port", object_manager, "--metrics-export-port", metrics,
            "--dashboard-agent-listen-port", agent_http, "--dashboard-agent-grpc-port", agent_grpc,
            "--runtime-env-agent-port", env_agent, "--disable-usage-stats",
        ], self.env)  # fmt: skip

    def kill_raylet(self, name: str) -> str:
        """kill -9 the node's raylet (as a machine that vanishes); returns the node id it had."""
        root = psutil.Process(self.services.procs[name].pid)
        raylet = next(p for p in root.children(recursive=True) if p.name() == "raylet")
        node_id = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))
        raylet.kill()
        return node_id

    def alive_nodes(self) -> int:
        req = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=20", headers=self.auth)
        with urllib.request.urlopen(req, timeout=10) as r:
            return sum(1 for n in json.loads(r.read())["data"]["result"]["result"] if n["state"] == "ALIVE")

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if self.alive_nodes() >= n:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(2)
        pytest.fail(f"the cluster did not reach {n} alive nodes within {timeout:.0f}s")

    def job(self, store: str, work_dir: str, *sets: str, no_wait: bool = False) -> list:
        return [BIN / "ray", "job", "submit", "--address", self.address, *(["--no-wait"] if no_wait else []),
                "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--", "rlhf", "run",
                "--preset", "tiny", "--store", store, "--set", f"run.work_dir={work_dir}",
                "--set", "run.placement_strategy=SPREAD", *(a for s in sets for a in ("--set", s))]  # fmt: skip

    def driver_log(self, submission_id: str) -> str:
        """The job driver's output so far (the head's own log file: no CLI call per poll)."""
        path = self.tmp / "head" / "session_latest" / "logs" / f"job-driver-{submission_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlhf-mn-", dir="/tmp"))  # short: Ray's socket paths must fit 108 chars
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, ray_tmp, ignore_errors=True)
        services = Services(tmp_path_factory.mktemp("multinode"), markers=[str(ray_tmp)])
        cleanup.callback(services.stop)
        cl = Cluster(services, ray_tmp)
        for name in ("worker-a", "worker-b"):
            cl.start_worker(name)
        cl.wait_nodes(3)
        import s3fs

        with pytest.MonkeyPatch.context() as mp:  # this process reads the store too
            for k, v in cl.aws.items():
                mp.setenv(k, v)
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().makedirs(BUCKET, exist_ok=True)
            yield cl
            s3fs.S3FileSystem.clear_instance_cache()


def _nodes_of(placements) -> set[str]:
    """The node ids in a stage's timings.placements: a list (Ray Train ranks) or {role: [actors]} (RL)."""
    return {p["node_id"] for p in _records(placements)}


def _records(placements) -> list[dict]:
    return placements if isinstance(placements, list) else [p for ps in placements.values() for p in ps]


def _missing(tree: dict) -> list[str]:
    return ([tree["ref"]] if tree.get("missing") else []) + [m for t in tree["inputs"].values() for m in _missing(t)]


def _states(out: str) -> dict[str, str]:
    """Each stage's state from `rlhf run`'s closing table ('  sft      Cached    sft-model@v1 ...')."""
    return dict(re.findall(r"^\s{2}(\w+)\s+(Cached|Completed|Skipped)\s", out, re.M))


@pytest.mark.timeout(1200)
def test_three_nodes_and_an_s3_store(cluster):
    store_uri, work_dir = f"s3://{BUCKET}/spread/store", f"s3://{BUCKET}/spread/runs"
    job = cluster.job(store_uri, work_dir, "align.methods=[ppo,grpo,dpo]", "ppo.placement_strategy=SPREAD",
                      "grpo.placement_strategy=SPREAD")  # fmt: skip
    start = time.perf_counter()
    out = run_ok(job, cluster.env, cwd=REPO, timeout=1000)
    print(f"3 nodes, S3 store: ray job submit -- rlhf run --preset tiny (ppo, grpo, dpo): "
          f"{time.perf_counter() - start:.1f}s")  # fmt: skip
    assert re.search(r"Job '\S+' succeeded", out), out[-4000:]
    assert _states(out) == {s: "Completed" for s in ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "eval")}

    store = ArtifactStore(store_uri)
    for name in ("tokenizer", "base-model", "sft-model", "reward-model", "policy", "policy-grpo", "policy-dpo",
                 "eval-report"):  # fmt: skip
        store.verify(f"{name}@latest")  # every file against its digest, downloaded from S3
    lineage = store.lineage("eval-report@latest")
    assert _missing(lineage) == [], lineage
    evaluated = {t["ref"].split("@")[0] for t in lineage["inputs"].values()}
    assert {"sft-model", "reward-model", "policy", "policy-grpo", "policy-dpo"} <= evaluated, evaluated

    # where the workers ran: each report names the nodes (the head has no CPUs: both worker nodes, SPREAD)
    for name in ("base-model", "sft-model", "reward-model", "policy-dpo", "policy", "policy-grpo"):
        placements = store.get(f"{name}@latest").manifest["timings"]["placements"]
        assert len(_nodes_of(placements)) == 2, (name, placements)
        assert {p["node_ip"] for p in _records(placements)} == {"127.0.0.1"}
    assert re.search(r"sft: 2 workers ran on 2 node\(s\)", out) and re.search(r"ppo: actors on 2 node\(s\)", out)
    # the workers' own output, on whichever node they ran, is reachable from the head through Ray's log API
    # (issue 26 item 5): with the work_dir on S3 it stays in Ray's logs; the report gives each worker's node and pid
    for rec in _records(store.get("sft-model@latest").manifest["timings"]["placements"]):
        text = ""
        for stream in ([], ["--err"]):
            logs = subprocess.run([BIN / "ray", "logs", "worker", "--pid", str(rec["pid"]), "--node-id",
                                   rec["node_id"], "--address", f"127.0.0.1:{cluster.gcs}", "--tail", "-1", *stream],
                                  env=cluster.env, capture_output=True, text=True, timeout=120)  # fmt: skip
            assert logs.returncode == 0, logs.stderr[-2000:]
            text += logs.stdout
        assert text.strip(), rec

    from transformers import AutoModelForCausalLM

    for name in ("policy", "policy-grpo", "policy-dpo"):
        assert AutoModelForCausalLM.from_pretrained(store.get(f"{name}@latest").path).num_parameters() > 0

    # the same job again: answered from the S3 store without Prefect, Ray Train or any stage
    start = time.perf_counter()
    again = run_ok(job, cluster.env, cwd=REPO, timeout=600)
    took = re.search(r"pipeline finished in ([\d.]+) s", again)
    assert took and "nothing to run: every stage's artifacts" in again, again[-3000:]
    print(f"rerun: ray job submit {time.perf_counter() - start:.1f}s, rlhf run inside the job {took.group(1)}s")
    assert set(_states(again).values()) == {"Cached"} and len(_states(again)) == 7, again[-3000:]


def _wait_for(cluster: Cluster, submission: str, pattern: str, timeout: float) -> re.Match:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        found = re.search(pattern, cluster.driver_log(submission))
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} in the job's log within {timeout:.0f}s:\n{cluster.driver_log(submission)[-4000:]}")


@pytest.mark.timeout(1200)
def test_a_lost_node_is_survived(cluster):
    """kill -9 a worker's raylet while SFT trains, and again while PPO runs; a node rejoins 20 s later each time.
    SFT is lengthened (300 steps, a checkpoint every 50) and PPO too (30 iterations, every 5), so that each kill
    lands after a checkpoint and before the end."""
    store_uri, work_dir = f"s3://{BUCKET}/lost/store", f"s3://{BUCKET}/lost/runs"
    job = cluster.job(store_uri, work_dir, "align.methods=[ppo]", "ppo.placement_strategy=SPREAD",
                      "sft.max_steps=300", "sft.save_steps=50", "sft.logging_steps=25",
                      "ppo.iterations=30", "ppo.checkpoint_every=5", "ppo.log_interval=5", no_wait=True)  # fmt: skip
    out = run_ok(job, cluster.env, cwd=REPO, timeout=300)
    submission = re.search(r"Job '(\S+)' submitted successfully", out).group(1)

    _wait_for(cluster, submission, r"sft: step (1[0-9]{2})/300", 600)  # past the checkpoints at 50 and 100
    lost_in_sft = cluster.kill_raylet("worker-b")
    time.sleep(20)
    cluster.start_worker("worker-b2")
    _wait_for(cluster, submission, r"ppo iter (1[0-9]|2[0-4])/30", 600)  # past the checkpoint after 10
    lost_in_ppo = cluster.kill_raylet("worker-a")
    time.sleep(20)
    cluster.start_worker("worker-a2")
    _wait_for(cluster, submission, r"pipeline done in|Finished in state Failed", 900)
    status = ""
    for _ in range(60):  # the driver prints its summary, then exits: the job ends a moment later
        status = run_ok([BIN / "ray", "job", "status", "--address", cluster.address, submission], cluster.env)
        if not re.search(r": (RUNNING|PENDING)\b", status):
            break
        time.sleep(2)
    log = cluster.driver_log(submission)
    assert re.search(r"succeeded", status, re.I), status + log[-6000:]
    print("\n".join(ln for ln in log.splitlines() if re.search(r"resum|ran on|actors on|Retry", ln)))

    # SFT resumed from a checkpoint it had written, not from step 0; its log and its report say so
    sft_resume = re.findall(r"sft: resuming the trainer from step (\d+)", log)
    assert sft_resume and int(sft_resume[-1]) >= 50, log[-6000:]
    store = ArtifactStore(store_uri)
    sft = store.verify("sft-model@latest")
    assert sft.metrics["resumed_from_step"] == int(sft_resume[-1])
    assert lost_in_sft in _nodes_of(sft.manifest["timings"]["placements"])  # a rank had run on the lost node
    # PPO was retried (its actors on the lost node died) and resumed after its last checkpoint
    ppo_resume = re.findall(r"ppo: resuming from the checkpoint after iteration (\d+)", log)
    assert ppo_resume and int(ppo_resume[-1]) >= 5, log[-6000:]
    policy = store.verify("policy@latest")
    assert policy.manifest["timings"]["resumed_from_iteration"] == int(ppo_resume[-1])
    assert lost_in_ppo not in _nodes_of(policy.manifest["timings"]["placements"])  # the retry's actors: elsewhere
    assert [m["version"] for m in store.list("sft-model")] == [1] and [m["version"] for m in store.list("policy")] == [1]

    from stages.common.store_gc import find_orphans

    old, young = find_orphans(store, 0)
    assert old == [] and young == [], (old, young)  # nothing half-uploaded: no object that no manifest names
