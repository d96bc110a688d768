"""SFT and reward-model stage throughput at 1 and 2 Ray Train workers, and each stage's start-up overhead.

Same model, data and global batch for every run; the machine's CPUs are split evenly over the workers (1 worker x 2
threads, 2 workers x 1 thread on a 2-core box), so the rows compare data parallelism against threads, not against
more hardware. samples/s is the HF Trainer's own figure (training samples / train runtime, over all workers; a
reward sample is one chosen/rejected pair = two sequences); start-up is stage start -> first optimizer step done
(argument checks, worker group start, imports, model load, TRL's tokenization); held-out generation is switched off.

    .venv/bin/python benchmarks/sft_reward_bench.py              # demo-size GPT-2 (4 layers, width 256, vocab 2048)
    .venv/bin/python benchmarks/sft_reward_bench.py --quick      # 2 layers, width 64: a smoke run
    .venv/bin/python benchmarks/sft_reward_bench.py --append     # also append the rows to benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stages.reward as reward  # noqa: E402
import stages.sft as sft  # noqa: E402
from stages.common.context import Scaling, StageContext  # noqa: E402
from stages.common.hf import save_model_dir, train_bpe_tokenizer  # noqa: E402
from stages.common.store import ArtifactStore  # noqa: E402
from stages.data.demo import DemoConfig, generate  # noqa: E402
from stages.data.ingest import ingest  # noqa: E402

SIZES = {  # (n_layer, n_embd, n_head, vocab): "demo" is the pretrain stage's demo model shape
    "demo": (4, 256, 4, 2048),
    "quick": (2, 64, 2, 512),
}


def publish_random_base(store: ArtifactStore, size: str):
    """A randomly initialised GPT-2 of the given shape: throughput does not depend on what the weights know."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head, vocab = SIZES[size]
    texts = [r["text"] for r in generate(DemoConfig(size="tiny"))["corpus"]["train"][:3000]]
    tokenizer = train_bpe_tokenizer(texts, vocab)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(model, tokenizer, d)
        return store.publish(d, name="base-model", kind="causal-lm", stage="bench", config={"size": size})


def run_stage(stage: str, workers: int, steps: int, store, base, data, work_root: Path) -> dict:
    """One stage run; returns its samples/s, start-up and wall seconds."""
    cpus = max(1, (os.cpu_count() or 2) // workers)
    ctx = StageContext(
        work_dir=str(work_root / f"{stage}-{workers}"),
        cache_key=f"bench-{stage}-{workers}",
        scaling=Scaling(num_workers=workers, cpus_per_worker=float(cpus)),
        log=lambda _: None,
    )
    common = {"max_steps": steps, "save_steps": steps, "logging_steps": max(1, steps // 4)}
    if stage == "sft":
        art = sft.run(sft.Config(eval_prompts=0, **common), base_model=base, data=data, store=store, ctx=ctx)[
            "sft-model"
        ]
    else:
        art = reward.run(reward.Config(**common), sft_model=base, preferences=data, store=store, ctx=ctx)[
            "reward-model"
        ]
    m, t = art.metrics, art.manifest["timings"]
    return {
        "stage": stage,
        "workers": workers,
        "threads_per_worker": cpus,
        "steps": steps,
        "samples_per_second": round(m["train_samples_per_second"], 1),
        "startup_seconds": t.get("startup_seconds"),
        "wall_seconds": t["wall_seconds"],
    }


def markdown(rows: list[dict], size: str, ray_start: float, command: str) -> str:
    n_layer, n_embd, _, vocab = SIZES[size]
    lines = [
        "",
        f"### SFT and reward stages: samples/s at 1 and 2 Ray workers ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs, {platform.machine()})",
        "",
        f"GPT-2 {n_layer} layers x width {n_embd}, vocab {vocab}, demo SFT / preference data, each stage's default "
        f"global batch (SFT {sft.Config().batch_size} sequences, reward {reward.Config().batch_size} pairs), "
        f"CPU fp32, no DeepSpeed. Local Ray start (once, not in the rows): {ray_start:.1f} s. Load average at the "
        f"end: {os.getloadavg()[0]:.1f} (a shared machine slows every row alike). "
        "samples/s: HF Trainer's figure over all workers (reward: pairs/s). Start-up: stage start -> first step.",
        "",
        "| stage | workers x threads | steps | samples/s | start-up s | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['workers']} x {r['threads_per_worker']} | {r['steps']} | "
            f"{r['samples_per_second']} | {r['startup_seconds']} | {r['wall_seconds']} |"
        )
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60, quick 30)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/README.md")
    args = parser.parse_args()
    size = "quick" if args.quick else "demo"
    steps = args.steps or (30 if args.quick else 60)

    import ray

    started = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.time() - started
    rows = []
    with tempfile.TemporaryDirectory(prefix="sft-reward-bench-") as tmp:
        store = ArtifactStore(Path(tmp) / "store")
        base = publish_random_base(store, size)
        demo = DemoConfig(size="demo")
        data = {
            "sft": ingest("demo", "sft", store, demo_cfg=demo),
            "reward": ingest("demo", "preferences", store, demo_cfg=demo),
        }
        for stage in ("sft", "reward"):
            for workers in (1, 2):
                row = run_stage(stage, workers, steps, store, base, data[stage], Path(tmp) / "work")
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = (
        "python benchmarks/sft_reward_bench.py"
        + (" --quick" if args.quick else "")
        + (f" --steps {args.steps}" if args.steps else "")
    )
    table = markdown(rows, size, ray_start, command)
    print(table)
    if args.append:
        with open(ROOT / "benchmarks" / "README.md", "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
