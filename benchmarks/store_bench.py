"""Artifact store throughput: publish and verified load of a model-like directory (random safetensors-sized shards).

Usage: .venv/bin/python benchmarks/store_bench.py [--mb 50] [--shards 4] [--repeats 3] [--gets 4] [--root URI]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.common.store import ArtifactStore  # noqa: E402
from stages.common.store_files import forget_verified  # noqa: E402


def make_model_dir(path: Path, total_mb: int, shards: int) -> int:
    """Write random weight shards plus small config/tokenizer files; returns the total bytes written."""
    path.mkdir(parents=True)
    shard_bytes = total_mb * (1 << 20) // shards
    for i in range(shards):
        (path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").write_bytes(os.urandom(shard_bytes))
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (path / "tokenizer.json").write_text(json.dumps({"vocab": {str(i): i for i in range(2000)}}))
    return sum(p.stat().st_size for p in path.iterdir())


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50, help="total size of the weight shards in MiB")
    ap.add_argument("--shards", type=int, default=4, help="number of weight shard files")
    ap.add_argument("--repeats", type=int, default=3, help="fresh stores to time (best and median are printed)")
    ap.add_argument("--gets", type=int, default=4, help="repeated gets of the same artifact (timed together)")
    ap.add_argument("--root", default="", help="store root URI (default: a fresh local temp dir per repeat)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("RLHF_CACHE_DIR", str(tmp / "cache"))
        nbytes = make_model_dir(tmp / "model", args.mb, args.shards)
        mb = nbytes / (1 << 20)
        rows: dict[str, list[float]] = {"publish (new)": [], "publish (identical)": [], "get (first)": [],
                                        "get (new process)": [],
                                        f"get x{args.gets} (again)": [], "verify (re-hash)": []}
        for r in range(args.repeats):
            store = ArtifactStore(args.root + f"/run{r}" if args.root else tmp / f"store{r}")
            t, art = timed(lambda s=store: s.publish(tmp / "model", name="bench-model", kind="causal-lm", stage="bench"))
            rows["publish (new)"].append(t)
            t, again = timed(lambda s=store: s.publish(tmp / "model", name="bench-model", kind="causal-lm", stage="bench"))
            assert again.ref == art.ref
            rows["publish (identical)"].append(t)
            t, got = timed(lambda s=store: s.get("bench-model@latest", kind="causal-lm"))
            assert got.digest == art.digest
            rows["get (first)"].append(t)
            forget_verified()  # what a process that has checked nothing yet (a Ray worker, the CLI) pays
            t, _ = timed(lambda s=store: s.get("bench-model@latest"))
            rows["get (new process)"].append(t)
            # The flow and CLI read an artifact's metrics a few times per run; each of those is a get().
            t, _ = timed(lambda s=store: [s.get("bench-model@latest") for _ in range(args.gets)])
            rows[f"get x{args.gets} (again)"].append(t)
            t, _ = timed(lambda s=store: s.verify("bench-model@latest"))
            rows["verify (re-hash)"].append(t)
        print(f"store: {args.root or 'local temp dir'}; {mb:.1f} MiB in {args.shards} shards + 2 small files; "
              f"{args.repeats} repeats")
        for op, ts in rows.items():
            ts.sort()
            best, median = ts[0], ts[len(ts) // 2]
            print(f"{op:22s} best {best:8.4f} s ({mb / best:9.1f} MiB/s)   median {median:8.4f} s ({mb / median:9.1f} MiB/s)")


if __name__ == "__main__":
    main()
