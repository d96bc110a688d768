"""The tiny pipeline on one Ray node vs three nodes of the same total CPUs, side by side in one run (issue 26).

Both layouts run on this machine, the way tests/system/test_multinode.py starts them: raylets on 127.0.0.1 with their
own temp dirs and ports, moto's S3 server for the store and work_dir, `ray job submit` of
`rlhf run --preset tiny` with SPREAD placement. One node: a head with 4 CPUs. Three nodes: a head with none (driver,
GCS, job server) and two workers with 2 CPUs each. Each layout gets a fresh cluster and a fresh store prefix (nothing
cached); the ratio is the three-node time over the one-node time: what going multi-node costs on one machine (more
raylets and object transfers between nodes; no network between machines).

    .venv/bin/python benchmarks/multinode_bench.py [--methods ppo]      # ~8 min on a quiet 2-core machine
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.system.test_multinode import BUCKET, Cluster  # noqa: E402 - the same cluster the test starts
from tests.system.test_system import Services, run_ok  # noqa: E402


def one_layout(nodes: int, methods: str, log_dir: Path) -> dict:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlhf-mnb-", dir="/tmp"))
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, ray_tmp, ignore_errors=True)
        services = Services(log_dir, markers=[str(ray_tmp)])
        cleanup.callback(services.stop)
        cluster = Cluster(services, ray_tmp, head_cpus=4 if nodes == 1 else 0)
        for i in range(nodes - 1):
            cluster.start_worker(f"worker-{i}")
        cluster.wait_nodes(nodes)
        os.environ.update(cluster.aws)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().makedirs(BUCKET, exist_ok=True)
        prefix = f"s3://{BUCKET}/bench-{nodes}"
        job = cluster.job(f"{prefix}/store", f"{prefix}/runs", f"align.methods=[{methods}]",
                          *(f"{m}.placement_strategy=SPREAD" for m in methods.split(",") if m != "dpo"))  # fmt: skip
        start = time.perf_counter()
        out = run_ok(job, cluster.env, cwd=REPO, timeout=1800)
        wall = time.perf_counter() - start
        inside = float(re.search(r"pipeline finished in ([\d.]+) s", out).group(1))
        stages = dict(re.findall(r"^\s{2}(\w+)\s+(Cached|Completed|Skipped)\s", out, re.M))
        assert set(stages.values()) == {"Completed"}, stages
        return {"nodes": nodes, "job_seconds": wall, "pipeline_seconds": inside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="ppo", help="align.methods, comma-separated (default: ppo)")
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as logs:
        rows = [one_layout(n, args.methods, Path(logs)) for n in (1, 3)]
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| layout | ray job submit (s) | rlhf run inside the job (s) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} node(s), 4 CPUs in all | {r['job_seconds']:.1f} | {r['pipeline_seconds']:.1f} |")
    one, three = rows
    print(f"\nthree nodes / one node: job {three['job_seconds'] / one['job_seconds']:.2f}x, "
          f"pipeline {three['pipeline_seconds'] / one['pipeline_seconds']:.2f}x")


if __name__ == "__main__":
    main()
