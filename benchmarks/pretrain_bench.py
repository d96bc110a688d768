"""Pretraining throughput: the stage (Ray Train + DeepSpeed) against a plain single-process PyTorch loop.

Same GPT-2, same token blocks, same total threads, in one run. For each (Ray workers, ZeRO stage) the plain loop is
measured right after the stage, so drifting load hits both sides alike; the table reports stage / plain tokens/s, MFU
against the matmul peak measured on the workers (the plain loop's against the peak measured in this process),
start-up overhead (stage start -> first training step) and peak RSS per worker. On a shared machine the wall-clock
ratio follows whoever else runs (more processes get more CPU share); the ratio of tokens per CPU-second (all threads
of the trainer processes) does not, so both are reported, with the load average.

    .venv/bin/python benchmarks/pretrain_bench.py                 # 6 layers, width 384, ctx 256 (the reference GPT)
    .venv/bin/python benchmarks/pretrain_bench.py --quick         # 2 layers, width 128: a smoke run in ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import stages.pretrain as pretrain  # noqa: E402
from stages.common.context import Scaling, StageContext  # noqa: E402
from stages.common.store import ArtifactStore  # noqa: E402
from stages.data.demo import DemoConfig, generate  # noqa: E402
from stages.pretrain.metrics import gpt_flops_per_token, matmul_peak_flops, mfu  # noqa: E402

WARMUP_STEPS = 2  # the stage also leaves its first two steps out of tokens/s


def publish_corpus(store: ArtifactStore, size: str):
    sets = generate(DemoConfig(size=size))["corpus"]
    with tempfile.TemporaryDirectory() as d:
        for split in ("train", "test"):
            Path(d, f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sets[split]))
        return store.publish(d, name="corpus", kind="dataset", stage="bench", extra={"format": "corpus", "task": "demo"})


def plain_loop(blocks: np.ndarray, model_kwargs: dict, batch: int, steps: int, threads: int, lr: float) -> dict:
    """The reference: GPT2LMHeadModel + torch AdamW in this process, `threads` torch threads, no Ray, no DeepSpeed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**model_kwargs))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    timed, timed_cpu, tokens = 0.0, 0.0, 0
    for step in range(WARMUP_STEPS + steps):
        x = torch.from_numpy(blocks[rng.choice(len(blocks), batch, replace=False)].astype(np.int64))
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step >= WARMUP_STEPS:
            timed += time.perf_counter() - start
            timed_cpu += time.process_time() - start_cpu
            tokens += x.numel()
    tps = tokens / timed
    flops = gpt_flops_per_token(n_params, model_kwargs["n_layer"], model_kwargs["n_embd"], blocks.shape[1])
    return {"tokens_per_second": tps, "tokens_per_cpu_second": tokens / timed_cpu,
            "mfu": mfu(tps, flops, matmul_peak_flops()), "n_params": n_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer steps (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    total_cpus = os.cpu_count() or 2
    size = dict(n_layer=2, n_embd=128, n_head=2, context=128) if args.quick else dict(
        n_layer=6, n_embd=384, n_head=6, context=256)
    steps = args.steps or (10 if args.quick else 12)
    micro_batch_total = 8  # blocks per optimizer step over all workers (the reference loop's batch)

    import ray

    root = Path(tempfile.mkdtemp(prefix="pretrain-bench-"))
    store = ArtifactStore(root / "artifacts")
    corpus = publish_corpus(store, "tiny")
    bench_start = time.time()
    ray.init(num_cpus=total_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    for workers, zero in [(1, 0), (1, 2), (2, 0), (2, 2)]:
        cfg = pretrain.Config(vocab_size=8192, **size, micro_batch_size=micro_batch_total // workers,
                              max_steps=WARMUP_STEPS + steps, zero_stage=zero, eval_interval=10**6, eval_blocks=8,
                              log_interval=10**6, checkpoint_interval=10**6, warmup_steps=1)
        ctx = StageContext(work_dir=str(root / f"work-{workers}-{zero}"), log=lambda m: None,
                           scaling=Scaling(num_workers=workers, cpus_per_worker=total_cpus / workers))
        outputs = pretrain.run(cfg, store=store, ctx=ctx, corpus=corpus)
        model = outputs["base-model"]
        blocks = np.load(root / f"work-{workers}-{zero}" / "data" / "train_blocks.npy")
        vocab = json.loads((Path(model.path) / "config.json").read_text())["vocab_size"]
        model_kwargs = dict(vocab_size=vocab, n_positions=size["context"], n_embd=size["n_embd"],
                            n_layer=size["n_layer"], n_head=size["n_head"], bos_token_id=0, eos_token_id=0)
        plain = plain_loop(blocks, model_kwargs, micro_batch_total, steps, total_cpus, cfg.lr)
        m = model.metrics
        rows.append({
            "workers": workers, "zero": zero, "threads_per_worker": int(total_cpus / workers),
            "stage_tokens_per_second": m["tokens_per_second"], "plain_tokens_per_second": plain["tokens_per_second"],
            "ratio": m["tokens_per_second"] / plain["tokens_per_second"],
            "cpu_time_ratio": m["tokens_per_cpu_second"] / plain["tokens_per_cpu_second"], "stage_mfu": m["mfu"], "plain_mfu": plain["mfu"],
            "startup_seconds": model.manifest["timings"]["startup_seconds"],
            "peak_rss_mb_per_worker": m["peak_rss_mb_per_worker"], "n_params": m["n_params"], "vocab": vocab,
            "load_avg_1min": os.getloadavg()[0],  # other processes on the machine skew both sides of the ratio
        })
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()

    print(f"\nGPT-2 {size['n_layer']} layers, width {size['n_embd']}, context {size['context']}, vocab {rows[0]['vocab']}, "
          f"{rows[0]['n_params'] / 1e6:.2f}M params; {micro_batch_total} blocks/step in total; {steps} timed steps; "
          f"{total_cpus} CPUs; bench wall {time.time() - bench_start:.0f}s; driver peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB\n")
    print("| Ray workers x threads | ZeRO | stage tok/s | plain loop tok/s | ratio | ratio per CPU-second | stage MFU | plain MFU | "
          "start-up to first step | peak RSS / worker | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} x {r['threads_per_worker']} | {r['zero']} | {r['stage_tokens_per_second']:.0f} | "
              f"{r['plain_tokens_per_second']:.0f} | {r['ratio']:.2f} | {r['cpu_time_ratio']:.2f} | {r['stage_mfu']:.1%} | {r['plain_mfu']:.1%} | "
              f"{r['startup_seconds']:.1f} s | {r['peak_rss_mb_per_worker']:.0f} MB | {r['load_avg_1min']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
