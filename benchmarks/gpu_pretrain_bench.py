"""GPU pretraining throughput: the stage against plain PyTorch loops on the same model, batch and precision.

Three measurements of GPT-2 small (12 layers, width 768, 12 heads, vocab 50,257, context 1024, micro-batch 16, bf16):
  (a) eager   a plain loop in this process: HF GPT2LMHeadModel with SDPA attention, bf16 autocast, fused AdamW,
              gradient clipping; no Ray, no DeepSpeed
  (b) compile the same loop with the model under torch.compile
  (c) stage   `stages.pretrain.run` on one Ray Train worker with the single-gpu settings (bf16, ZeRO-2, compile on
              for GPU, fused torch AdamW), fed from the demo corpus through a tokenizer padded to the same vocabulary
Each runs `--warmup` untimed steps (allocation, compilation) and then `--steps` timed ones; tokens/s count only those.
MFU divides model FLOPs (6N + 12·L·d·T per token) by the peak of stages/pretrain/metrics.py (the GPU's data-sheet
dense peak, or a measured matmul on CPU / an unknown GPU).

    python benchmarks/gpu_pretrain_bench.py                        # on a CUDA machine, ~3 minutes on an H100
    python benchmarks/gpu_pretrain_bench.py --device cpu --tiny    # smoke run of the mechanics on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, context=1024, micro_batch_size=16, vocab=50257)
TINY = dict(n_layer=2, n_embd=64, n_head=2, context=64, micro_batch_size=4, vocab=512)


def padded_tokenizer(texts: list[str], vocab: int, out: Path):
    """The project's BPE recipe trained on `texts`, with never-produced filler entries up to exactly `vocab` ids, so
    the stage's model has GPT-2's embedding and head sizes even though a small corpus supports fewer merges."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from stages.common.hf import EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

    trained = train_bpe_tokenizer(texts, vocab)
    spec = json.loads(trained.backend_tokenizer.to_str())
    table = spec["model"]["vocab"]
    next_id = max(table.values()) + 1
    while next_id < vocab:
        table[f"<|unused{next_id}|>"] = next_id
        next_id += 1
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token=PAD_TOKEN,
                                        eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    assert len(tokenizer) == vocab, (len(tokenizer), vocab)
    tokenizer.save_pretrained(out)
    return out


def plain_loop(shape: dict, device: torch.device, dtype: torch.dtype, steps: int, warmup: int, compiled: bool) -> dict:
    """(a)/(b): the reference loop on random token ids (the cost of a step does not depend on which ids)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from stages.pretrain.metrics import model_flops_per_token

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["context"], n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    batch = (shape["micro_batch_size"], shape["context"])
    data = torch.randint(0, shape["vocab"], (warmup + steps, *batch), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(x):
        with autocast:
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        step(data[i])
    sync()
    start = time.perf_counter()
    losses = [step(data[warmup + i]) for i in range(steps)]
    sync()
    seconds = time.perf_counter() - start
    assert torch.isfinite(torch.stack(losses)).all()
    tokens = steps * batch[0] * batch[1]
    result = {"tokens_per_second": tokens / seconds, "step_ms": 1e3 * seconds / steps, "n_params": n_params,
              "flops_per_token": model_flops_per_token(config, n_params, shape["context"])}
    return result  # the model, optimizer and data go with this frame: the caller empties the CUDA cache


def stage_run(shape: dict, device: torch.device, steps: int, stage_compile: bool | None, root: Path) -> dict:
    """(c): the real stage, one Ray Train worker, the single-gpu settings; tokens/s as the stage itself reports it."""
    import ray

    import stages.pretrain as pretrain
    from stages.common import ray_train as rt
    from stages.common.context import Scaling, StageContext
    from stages.common.store import ArtifactStore
    from stages.data.demo import DemoConfig, generate
    from stages.pretrain.train_loop import WARMUP_STEPS

    store = ArtifactStore(root / "artifacts")
    sets = generate(DemoConfig(size="demo" if device.type == "cuda" else "tiny"))["corpus"]
    with tempfile.TemporaryDirectory() as d:
        for split in ("train", "test"):
            Path(d, f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sets[split]))
        corpus = store.publish(d, name="corpus", kind="dataset", stage="bench",
                               extra={"format": "corpus", "task": "demo"})
    tokenizer_dir = padded_tokenizer([r["text"] for r in sets["train"]], shape["vocab"], root / "tokenizer")
    use_gpu = device.type == "cuda"
    # the stage leaves its first WARMUP_STEPS (compilation included) out of tokens/s and times the rest
    total = WARMUP_STEPS + steps
    cfg = pretrain.Config(tokenizer=str(tokenizer_dir), n_layer=shape["n_layer"], n_embd=shape["n_embd"],
                          n_head=shape["n_head"], context=shape["context"], micro_batch_size=shape["micro_batch_size"],
                          max_steps=total, warmup_steps=1, lr=6e-4, zero_stage=2, compile=stage_compile,
                          precision="bf16" if use_gpu else "fp32", eval_interval=10**6,
                          eval_blocks=shape["micro_batch_size"], log_interval=10**6, checkpoint_interval=10**6,
                          max_failures=0)
    cpus = float(os.cpu_count() or 2)
    lines: list[str] = []
    ctx = StageContext(work_dir=str(root / "work"), log=lines.append,
                       scaling=Scaling(num_workers=1, cpus_per_worker=cpus, use_gpu=use_gpu))
    started_ray = rt.ensure_ray()
    try:
        model = pretrain.run(cfg, store=store, ctx=ctx, corpus=corpus)["base-model"]
    finally:
        if started_ray:
            ray.shutdown()
    m, timings = model.metrics, model.manifest["timings"]
    return {"tokens_per_second": m["tokens_per_second"], "mfu": m["mfu"], "n_params": m["n_params"],
            "step_ms": 1e3 * shape["micro_batch_size"] * shape["context"] / m["tokens_per_second"],
            "peak_flops": m["peak_flops"], "peak_source": m["peak_source"], "compiled": m["compiled"],
            "startup_seconds": timings["startup_seconds"], "startup_breakdown": timings["startup_breakdown"],
            "log": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model (smoke run of the mechanics)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation, allocation)")
    parser.add_argument("--stage-compile", choices=["auto", "on", "off"], default="auto",
                        help="the stage's pretrain.compile (auto: on for GPU, off for CPU)")
    parser.add_argument("--only", choices=["eager", "compile", "stage"], action="append",
                        help="run only these measurements (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for a smoke run)")
    from stages.pretrain.metrics import mfu, peak_flops

    shape = TINY if args.tiny else GPT2_SMALL
    steps = args.steps or (5 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (3 if args.tiny else 10)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    only = set(args.only or ["eager", "compile", "stage"])
    peak, peak_source = peak_flops(dtype, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: dict[str, dict] = {}
    for name in ("eager", "compile"):
        if name in only:
            rows[name] = plain_loop(shape, device, dtype, steps, warmup, compiled=name == "compile")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the stage's worker shares this GPU
            rows[name]["mfu"] = mfu(rows[name]["tokens_per_second"], rows[name]["flops_per_token"], peak)
            print(json.dumps({name: rows[name]}), flush=True)
    if "stage" in only:
        stage_compile = {"auto": None, "on": True, "off": False}[args.stage_compile]
        with tempfile.TemporaryDirectory(prefix="gpu-pretrain-bench-") as tmp:
            rows["stage"] = stage_run(shape, device, steps, stage_compile, Path(tmp))
        print(json.dumps({"stage": {k: v for k, v in rows["stage"].items() if k != "log"}}), flush=True)

    n_params = next(iter(rows.values()))["n_params"]
    print(f"\nGPT-2 {shape['n_layer']} layers, width {shape['n_embd']}, context {shape['context']}, vocab "
          f"{shape['vocab']}, {n_params / 1e6:.1f}M params, micro-batch {shape['micro_batch_size']}, "
          f"{str(dtype).removeprefix('torch.')}; {warmup} warm-up + {steps} timed steps; {device_name}; "
          f"peak {peak / 1e12:.4g} TFLOP/s ({peak_source})\n")
    print("| run | tok/s | step ms | MFU | stage / this |")
    print("|---|---|---|---|---|")
    stage_tps = rows.get("stage", {}).get("tokens_per_second")
    for name, r in rows.items():
        ratio = f"{stage_tps / r['tokens_per_second']:.2f}" if stage_tps and name != "stage" else ""
        label = name + (" (compiled)" if name == "stage" and r.get("compiled") else "")
        print(f"| {label} | {r['tokens_per_second']:,.0f} | {r['step_ms']:.1f} | {r['mfu']:.1%} | {ratio} |")
    if "stage" in rows:
        from stages.pretrain.stage import STARTUP_PHASES

        phases = rows["stage"]["startup_breakdown"]
        print(f"\nstage start-up to first step: {rows['stage']['startup_seconds']:.1f} s: "
              + ", ".join(f"{k} {phases[k]:.1f}" for k in STARTUP_PHASES if k in phases))
    if args.json:
        ratios = {f"stage/{n}": stage_tps / rows[n]["tokens_per_second"] for n in rows if n != "stage" and stage_tps}
        args.json.write_text(json.dumps({"device": device_name, "peak_flops": peak, "peak_source": peak_source,
                                         "shape": shape, "steps": steps, "warmup": warmup, "rows": rows,
                                         "ratios": ratios}, indent=1, default=str))


if __name__ == "__main__":
    main()
