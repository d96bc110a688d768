"""Where a training stage's start-up goes on a warm local Ray: Ray Train's worker-group start, the framework imports
in the workers, and the wait after the workers finish; with Ray Train's default health-check interval (2 s) and
with the one `init_ray` sets for a local Ray (stages/common/ray_train.py), side by side in one run.

    .venv/bin/python benchmarks/startup_bench.py [--workers 2] [--repeats 3]

Each setting gets a fresh local Ray (the controller reads the interval from its environment when it starts), then
one warm-up fit and `--repeats` timed fits of two train functions: `empty` (returns at once) and `imports` (imports
torch, transformers, trl and deepspeed, as every TRL or DeepSpeed worker does first). Reported per setting, medians:
  enter     fit() called -> the train function starts on the last worker (controller, placement group, workers)
  imports   the imports in the train function (0 for `empty`)
  teardown  the train function returned on the last worker -> fit() returns
Run it on a quiet machine; it prints the load average first.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time

DEFAULT_INTERVAL = "2.0"  # Ray Train 2.60's DEFAULT_HEALTH_CHECK_INTERVAL_S


def _stamp(out_dir: str, **times: float) -> None:
    with open(os.path.join(out_dir, f"t-{os.getpid()}.json"), "w") as f:
        json.dump(times, f)


def empty(config):
    _stamp(config["out"], enter=time.time(), imported=time.time(), leave=time.time())


def imports(config):
    enter = time.time()
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    _stamp(config["out"], enter=enter, imported=time.time(), leave=time.time())


def one_fit(fn, workers: int, out: str, storage: str) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for f in glob.glob(os.path.join(out, "t-*.json")):
        os.remove(f)
    start = time.time()
    TorchTrainer(fn, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(storage_path=storage, name=f"fit-{start}")).fit()  # fmt: skip
    end = time.time()
    stamps = [json.load(open(f)) for f in glob.glob(os.path.join(out, "t-*.json"))]
    enter = max(s["enter"] for s in stamps)
    return {"enter": enter - start, "imports": max(s["imported"] for s in stamps) - enter,
            "teardown": end - max(s["leave"] for s in stamps)}  # fmt: skip


def measure(interval: str | None, workers: int, repeats: int) -> dict[str, dict[str, float]]:
    import ray

    from stages.common.ray_train import init_ray

    if interval is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval  # init_ray keeps a value already set
    init_ray(None)
    out, storage = tempfile.mkdtemp(prefix="startup-"), tempfile.mkdtemp(prefix="startup-rt-")
    try:
        one_fit(empty, workers, out, storage)  # warm-up: the dashboard and the first worker processes
        result = {}
        for name, fn in (("empty", empty), ("imports", imports)):
            runs = [one_fit(fn, workers, out, storage) for _ in range(repeats)]
            result[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        return result
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs, {args.workers} Ray Train workers, median of {args.repeats}")  # fmt: skip
    from stages.common.ray_train import LOCAL_HEALTH_CHECK_INTERVAL_S

    settings = {f"Ray Train default ({DEFAULT_INTERVAL} s)": DEFAULT_INTERVAL,
                f"init_ray's ({LOCAL_HEALTH_CHECK_INTERVAL_S} s)": None}  # fmt: skip
    results = {label: measure(value, args.workers, args.repeats) for label, value in settings.items()}
    print(f"{'health-check interval':<28} {'fn':<8} {'enter s':>8} {'imports s':>10} {'teardown s':>11} {'total s':>8}")
    for label, result in results.items():
        for fn, r in result.items():
            print(f"{label:<28} {fn:<8} {r['enter']:8.2f} {r['imports']:10.2f} {r['teardown']:11.2f} "
                  f"{sum(r.values()):8.2f}")  # fmt: skip
    before, after = results.values()
    for fn in ("empty", "imports"):
        b, a = sum(before[fn].values()), sum(after[fn].values())
        print(f"{fn}: fit() {b:.2f} s -> {a:.2f} s ({b / a:.2f}x), teardown {before[fn]['teardown']:.2f} -> "
              f"{after[fn]['teardown']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
