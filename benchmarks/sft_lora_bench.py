"""SFT training loop: full fine-tuning vs LoRA, each with and without packing, side by side in one run.

Every variant is TRL's SFTTrainer exactly as the stage builds it (`stages.sft.stage.prepare` ->
`stages.sft.train.build_trainer`, no Ray), on the same random base model and the same demo SFT rows, trained in a
fresh subprocess so that its peak RSS (`ru_maxrss`) is its own. Columns:

- **tokens/s**: real (non-pad) input tokens through the training forward per second, counted by a forward pre-hook
  on the trained model (unpacked: the attention mask's sum; packed: padding-free rows hold no padding), over the
  steps after the warm-up ones, wall clock.
- **peak RSS**: the training process's `ru_maxrss` (Python, torch, TRL, the model, optimizer, activations);
  **over base**: the same minus the RSS right after the imports, before the model is loaded.
- **x full**: the variant's figure over full fine-tuning's (same shape, same packing-free data).

Packed variants get a smaller batch of packed rows so that every variant trains about the same real tokens per step
(tokens/step is printed): `batch_size` counts packed rows of up to `max_length` tokens when packing is on.

    .venv/bin/python benchmarks/sft_lora_bench.py            # demo shape (4x256) and 12x512, GPT-2: ~5-8 min, 2 CPUs
    .venv/bin/python benchmarks/sft_lora_bench.py --quick    # 2x64 only, a few steps: a smoke run (< 2 min)
    .venv/bin/python benchmarks/sft_lora_bench.py --arch llama --json /tmp/sft_lora.json
    .venv/bin/python benchmarks/sft_lora_bench.py --shapes 12x512 16x768 [--activation-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # (layers, width, heads): "demo" is the pretrain stage's default model
    "quick": (2, 64, 2),
    "demo": (4, 256, 4),
    "12x512": (12, 512, 8),
    "16x768": (16, 768, 12),  # where the weights' gradients and AdamW state outweigh the process and activations
}
VARIANTS = {  # name: (lora, packing)
    "full": (False, False),
    "lora": (True, False),
    "full+packing": (False, True),
    "lora+packing": (True, True),
}
VOCAB = 2048
CONTEXT = 128  # the demo model's context; also max_length of every variant (a packed row holds up to this)
BATCH = 16  # the SFT stage's default batch (rows per step, unpacked)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------------------------- the child


def child(spec: dict) -> dict:
    """One variant in this (fresh) process: build the trainer as the stage does, train, measure."""
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import TrainerCallback

    import stages.sft as sft
    from stages.common.context import Scaling
    from stages.common.lora import LoraSection
    from stages.common.store import ArtifactStore
    from stages.sft.train import build_trainer

    base_rss = rss_mb()
    store = ArtifactStore(spec["store"])
    base, data = store.get(spec["base"]), store.get(spec["data"])
    steps = spec["warmup"] + spec["steps"]
    config = sft.Config(
        max_steps=steps, batch_size=spec["batch"], save_steps=steps + 1, logging_steps=steps, warmup_steps=0,
        max_length=CONTEXT, eval_prompts=0, packing=spec["packing"], lora=LoraSection() if spec["lora"] else None,
        activation_checkpointing=spec["activation_checkpointing"],
    )  # fmt: skip
    cfg = sft.stage.prepare(config, base, data, scaling=Scaling(num_workers=1, cpus_per_worker=spec["threads"]))
    with tempfile.TemporaryDirectory(prefix="sft-lora-bench-") as out:
        trainer = build_trainer(cfg, out)
        counts = {"tokens": 0}
        marks: list[tuple[float, int]] = []

        def count(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            counts["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())

        class Marks(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                marks.append((time.perf_counter(), counts["tokens"]))

        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        trainer.add_callback(Marks())
        trainer.train()
    (t0, n0), (t1, n1) = marks[spec["warmup"] - 1], marks[-1]
    model = trainer.model
    return {
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "s_per_step": (t1 - t0) / (len(marks) - spec["warmup"]),
        "tokens_per_step": (n1 - n0) / (len(marks) - spec["warmup"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": base_rss,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }


# ----------------------------------------------------------------------------------------------- the parent


def publish_base(store, arch: str, shape: str, tokenizer):
    """A randomly initialised model of the shape: throughput and memory do not depend on what the weights know."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from stages.common.hf import save_model_dir

    layers, width, heads = SHAPES[shape]
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.eos_token_id}  # fmt: skip
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=width,
                                           n_layer=layers, n_head=heads, **ids))  # fmt: skip
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=-(-8 * width // 3 // 64) * 64,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=CONTEXT, tie_word_embeddings=True, **ids))  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(model, tokenizer, d)
        return store.publish(d, name=f"base-{arch}-{shape}", kind="causal-lm", stage="bench", config={"shape": shape})


def packed_batch(rows: list[dict], tokenizer) -> int:
    """Packed rows per step carrying about the real tokens of BATCH unpacked rows (rows fill to ~CONTEXT)."""
    n = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]
    return max(1, round(BATCH * (sum(n) / len(n)) / CONTEXT))


def run_variant(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"variant {spec['variant']} at {spec['shape']} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| shape | variant | batch | trainable | tokens/step | s/step | tokens/s | x full | peak RSS MB | x full "
            "| over base MB | x full |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    full = {r["shape"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        f = full[r["shape"]]
        over, f_over = r["peak_rss_mb"] - r["base_rss_mb"], f["peak_rss_mb"] - f["base_rss_mb"]
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['batch']} | {r['trainable'] / 1e6:.2f}M / {r['params'] / 1e6:.2f}M "
            f"| {r['tokens_per_step']:.0f} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s'] / f['tokens_per_s']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_mb'] / f['peak_rss_mb']:.2f} | {over:.0f} | {over / f_over:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2x64 shape only, few steps: a smoke run")
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per variant")
    parser.add_argument("--shapes", nargs="+", choices=[s for s in SHAPES if s != "quick"],
                        default=["demo", "12x512"], help="model shapes (default demo 12x512)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="every variant with sft.activation_checkpointing (recomputed activations)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from stages.common.hf import train_bpe_tokenizer
    from stages.common.store import ArtifactStore
    from stages.data.demo import DemoConfig, generate
    from stages.data.ingest import ingest
    from stages.trl.driver import load_rows

    load = os.getloadavg()
    print(f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}, load average at start "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)  # fmt: skip
    shapes = ["quick"] if args.quick else args.shapes
    steps = {"quick": (1, 3), "demo": (2, 20), "12x512": (2, 8), "16x768": (2, 6)}  # (warm-up steps, timed steps)
    started, rows = time.time(), []
    with tempfile.TemporaryDirectory(prefix="sft-lora-bench-") as tmp:
        store = ArtifactStore(Path(tmp) / "store")
        demo = DemoConfig(size="tiny")
        tokenizer = train_bpe_tokenizer([r["text"] for r in generate(demo)["corpus"]["train"][:3000]], VOCAB)
        data = ingest("demo", "sft", store, demo_cfg=demo)
        train_rows = load_rows(data, "train", "bench: data")
        packed = packed_batch(train_rows, tokenizer)
        for shape in shapes:
            base = publish_base(store, args.arch, shape, tokenizer)
            warmup, timed = steps[shape]
            for variant, (lora, packing) in VARIANTS.items():
                spec = {"variant": variant, "shape": shape, "store": str(store.root), "base": base.ref,
                        "data": data.ref, "lora": lora, "packing": packing, "batch": packed if packing else BATCH,
                        "warmup": warmup, "steps": timed, "threads": args.threads,
                        "activation_checkpointing": args.activation_checkpointing}  # fmt: skip
                t = time.time()
                row = {"shape": f"{args.arch} {shape}", "variant": variant, "batch": spec["batch"], **run_variant(spec)}
                rows.append(row)
                print(f"  {row['shape']} {variant}: {row['tokens_per_s']:.0f} tokens/s, peak RSS "
                      f"{row['peak_rss_mb']:.0f} MB ({time.time() - t:.0f} s)", flush=True)  # fmt: skip
    load = os.getloadavg()
    print(f"\nmax_length {CONTEXT}, unpacked batch {BATCH} rows, packed batch {packed} rows; LoRA r=16 alpha=32 "
          f"all-linear; activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
          f"CPU fp32, {args.threads} threads; load average at end {load[0]:.2f}; "
          f"wall {time.time() - started:.0f} s\n")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
