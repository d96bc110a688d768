"""System tests: the tiny pipeline through a real Prefect server + process worker, and through `ray job submit`.

Everything listens on 127.0.0.1 at free ports, uses its own temp dirs (PREFECT_HOME, Ray temp dir and auth token) and
is torn down in `finally`, process tree by process tree, even when an assertion fails. They run the .venv's own
`prefect`, `ray` and `rlhf` (the folder of this interpreter).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from stages.common.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # .venv/bin when pytest runs from the venv
STAGES = ("pretrain", "sft", "reward", "ppo", "eval")
UPSTREAM_OF_EVAL = ("tokenizer", "base-model", "sft-model", "reward-model", "policy")

needs_cli = pytest.mark.skipif(not (BIN / "prefect").exists() or not (BIN / "rlhf").exists(),
                               reason=f"prefect/rlhf executables not found next to {sys.executable}")


# --- helpers --------------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def base_env(**extra: str) -> dict[str, str]:
    """This environment minus anything that would point the tools at another server or cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_")) and k != "RLHF_STORE"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               # a temporary Prefect API creating a fresh database on a busy 2-core box can need more than 20 s
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    env.update(extra)
    return env


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


class Services:
    """Background processes of one test. stop() ends each one's whole process tree, plus any stray process that
    carries one of the test's unique markers (its temp dirs) in its command line or environment."""

    def __init__(self, log_dir: Path, markers: list[str]):
        self.log_dir, self.markers = log_dir, markers
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def wait_http(self, name: str, url: str, timeout: float, headers: dict[str, str] | None = None) -> float:
        """Poll url until it answers 200; fail early with the log if the service died. Returns seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        pytest.fail(f"{name}: {url} did not answer within {timeout:.0f}s:\n{self.log_tail(name)}")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            try:
                root = psutil.Process(proc.pid)
                tree = [root, *root.children(recursive=True)]  # collected before any signal, while still linked
            except psutil.NoSuchProcess:
                tree = []
            _kill(tree)
            proc.wait(timeout=10)
        _kill([p for p in psutil.process_iter() if self._carries_marker(p)])

    def _carries_marker(self, p: psutil.Process) -> bool:
        if p.pid == os.getpid():
            return False
        try:
            text = " ".join(p.cmdline()) + " " + " ".join(f"{k}={v}" for k, v in p.environ().items())
        except psutil.Error:
            return False
        return any(m in text for m in self.markers)


def run_ok(cmd: list, env: dict[str, str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a command to completion; fail with its output unless it exits 0. Returns stdout + stderr."""
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def api_post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def stage_states(api: str, watch_output: str) -> dict[str, str]:
    """State name of each stage task in the flow run that `prefect deployment run` created (Completed / Cached)."""
    match = re.search(r"UUID: ([0-9a-f-]{36})", watch_output)
    assert match, f"no flow run id in:\n{watch_output[-3000:]}"
    runs = api_post(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [match.group(1)]}}})
    return {r["name"]: r["state"]["name"] for r in runs if r["name"] in STAGES}


def versions(store: ArtifactStore, names: tuple[str, ...]) -> dict[str, list[int]]:
    return {name: sorted(m["version"] for m in store.list(name)) for name in names}


# --- Prefect: server + process worker + deployment -------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(1200)
@needs_cli
def test_prefect_deployment_run_then_stage_rerun(tmp_path, pipeline_copy):
    """A deployment run over the store of the session's tiny pipeline (all cached), then a rerun from eval.

    From eval, the last stage: the rerun only has to show a forced stage running (its Ray task included) through the
    deployment and nothing upstream republished; each earlier stage would add a minute or more (test_flow covers
    reruns from ppo and from a reward change)."""
    home = Path(tempfile.mkdtemp(prefix="rlhf-prefect-home-"))
    (port,) = free_ports(1)
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=api)
    store_root = pipeline_copy["store"]
    # Checkpoints in the test's own folder: the deployment's default run.work_dir (./runs) is the repo's.
    work_dir = json.dumps([f"run.work_dir={pipeline_copy['work_dir']}"])
    params = ["-p", "preset=tiny", "-p", f"store={store_root}", "-p", f"overrides={work_dir}"]
    prefect = BIN / "prefect"
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, home, ignore_errors=True)
        services = Services(tmp_path, markers=[str(home)])
        cleanup.callback(services.stop)

        services.start("server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", port], env)
        print(f"prefect server healthy after {services.wait_http('server', f'{api}/health', 120):.1f}s")
        for pool in ("local", "gpu-cluster"):  # `deploy --all` also registers gpu-cluster, which needs its pool
            run_ok([prefect, "work-pool", "create", pool, "--type", "process"], env)
        run_ok([prefect, "--no-prompt", "deploy", "--all"], env, cwd=REPO)
        with urllib.request.urlopen(f"{api}/deployments/name/rlhf/gpu-cluster", timeout=10) as r:
            gpu = json.loads(r.read())
        assert gpu["parameters"]["preset"] == "gpu-cluster" and gpu["parameters"]["store"].startswith("s3://")
        # The worker starts elsewhere: the deployment's pull step must put the flow run in the repo.
        services.start("worker", [prefect, "worker", "start", "--pool", "local"], env, cwd=tmp_path)

        start = time.perf_counter()
        out = run_ok([prefect, "deployment", "run", "rlhf/local", *params, "--watch"], env, timeout=900)
        print(f"prefect deployment run rlhf/local (tiny, all cached): {time.perf_counter() - start:.1f}s")
        assert "Flow run finished successfully" in out, out[-3000:]
        store = ArtifactStore(str(store_root))
        policy = store.get("policy@latest", kind="causal-lm")  # verifies every file
        assert policy.manifest["stage"] == "ppo"
        assert stage_states(api, out) == {s: "Cached" for s in STAGES}
        upstream = versions(store, UPSTREAM_OF_EVAL)

        start = time.perf_counter()
        out = run_ok([prefect, "deployment", "run", "rlhf/local", *params, "-p", "from_stage=eval", "--watch"],
                     env, timeout=900)
        print(f"prefect deployment run rlhf/local -p from_stage=eval: {time.perf_counter() - start:.1f}s")
        states = stage_states(api, out)
        assert states == {**{s: "Cached" for s in STAGES[:-1]}, "eval": "Completed"}, states
        assert versions(store, UPSTREAM_OF_EVAL) == upstream  # nothing upstream of eval was republished
        rerun = store.get("eval-report@latest", kind="eval-report")  # the same version if reproduced bit for bit
        for role, name in (("sft_model", "sft-model"), ("reward_model", "reward-model"), ("policy.ppo", "policy")):
            assert rerun.manifest["inputs"][role]["digest"] == store.get(f"{name}@latest").digest


# --- Ray: a local head on loopback with token auth, `ray job submit --working-dir .` ----------------------------------


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(1200)
@needs_cli
def test_ray_job_submit_runs_the_pipeline(tmp_path, pipeline_copy):
    """`ray job submit -- rlhf run --from eval` over the session's tiny store: the stage's Ray task runs on the job's
    cluster. Eval, the last stage, is the cheapest forced run; PPO's actors on a cluster are test_ppo_stage's."""
    # Short and unique: Ray's socket paths live under the temp dir and must stay under 108 characters.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = ray_tmp / "auth_token"  # instead of ~/.ray/auth_token, so the test leaves the user's token alone
    token_file.write_text(token)
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = free_ports(7)
    address = f"http://127.0.0.1:{dashboard}"
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PREFECT_HOME=str(ray_tmp / "prefect"))
    store_root = pipeline_copy["store"]
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, ray_tmp, ignore_errors=True)
        services = Services(tmp_path, markers=[str(ray_tmp)])
        cleanup.callback(services.stop)

        # --block keeps `ray start` as the parent of the head's processes, so stopping it stops exactly this
        # cluster (`ray stop` would stop every Ray on the machine).
        services.start("ray-head", [
            BIN / "ray", "start", "--head", "--block", "--port", gcs, "--num-cpus", "2", "--temp-dir", ray_tmp / "t",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard, "--ray-client-server-port", client,
            "--dashboard-agent-listen-port", agent_http, "--dashboard-agent-grpc-port", agent_grpc,
            "--metrics-export-port", metrics, "--runtime-env-agent-port", env_agent, "--disable-usage-stats",
        ], env)
        waited = services.wait_http("ray-head", f"{address}/api/version", 180, {"Authorization": f"Bearer {token}"})
        print(f"ray head answering after {waited:.1f}s")
        refused = subprocess.run([BIN / "ray", "job", "list", "--address", address], env={**env, "RAY_AUTH_TOKEN": "0" * 64},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "Invalid authentication token" in refused.stdout + refused.stderr

        start = time.perf_counter()
        out = run_ok([BIN / "ray", "job", "submit", "--address", address, "--runtime-env", "cluster/runtime_env.yaml",
                      "--working-dir", ".", "--", "rlhf", "run", "--preset", "tiny", "--store", store_root,
                      "--from", "eval", "--set", f"run.work_dir={pipeline_copy['work_dir']}"], env, cwd=REPO, timeout=900)
        print(f"ray job submit -- rlhf run --preset tiny --from eval: {time.perf_counter() - start:.1f}s")
        assert re.search(r"Job '\S+' succeeded", out), out[-3000:]
        assert "pretrain=Cached, sft=Cached, reward=Cached, ppo=Cached, eval=Completed" in out, out[-3000:]
        store = ArtifactStore(str(store_root))
        policy = store.get("policy@latest", kind="causal-lm")
        report = store.get("eval-report@latest", kind="eval-report")  # the same version if reproduced bit for bit
        assert report.manifest["inputs"]["policy.ppo"]["digest"] == policy.digest

        # The submission helper on the same cluster: it finds the token itself, uploads the checkout without the
        # excluded folders, and its exit code follows the job's.
        check = (f"test ! -e .venv && test ! -e runs && test -e flows/cli.py && "
                 f"rlhf artifacts verify policy@latest --store {store_root}")
        out = run_ok([sys.executable, "-m", "cluster.submit", "--address", address, "--", "bash", "-c", check],
                     env, cwd=REPO, timeout=300)
        assert f"ok: {policy.ref}" in out and "SUCCEEDED" in out, out[-3000:]
        failing = subprocess.run([sys.executable, "-m", "cluster.submit", "--address", address, "--", "false"],
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert failing.returncode == 1 and "FAILED" in failing.stderr, failing.stderr[-2000:]


# --- bad input at the flow level: a Ray address that does not answer ---------------------------------------------------


@needs_cli
def test_dead_ray_address_fails_fast_with_one_line(tmp_path):
    env = base_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.run([BIN / "rlhf", "run", "--preset", "tiny", "--store", tmp_path / "store",
                           "--set", "run.ray_address=127.0.0.1:1"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "does not answer" in errors[0] and "127.0.0.1:1" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # the user gets the one line, not a stack
    # Probed before anything slow starts: no Prefect server was started, no store or Prefect home was written.
    assert "Starting temporary server" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "store").exists() and not (tmp_path / "prefect-home").exists()
