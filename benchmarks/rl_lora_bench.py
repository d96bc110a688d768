"""RL stage with and without LoRA (issue 25): the actors' total peak memory and samples/s, side by side in one run.

For each model shape and each method (PPO, GRPO) the real `rl` stage runs twice on the same models, prompts and
settings: full fine-tuning (policy, critic, reference and reward actors) and with `lora:` (the section's defaults:
r 16, alpha 32, every attention and MLP linear; no reference actor, the critic an adapter beside its full value
head). Reported per run, from the stage's own manifest:
- the actors' peak memory: each actor process's peak RSS (`ru_maxrss`, read inside the actor at the end of the
  stage: `timings.peak_rss_mib`), per role and summed over every actor;
- samples/s: the stage's `samples_per_second` (replies over the rollout + update time; start-up, evaluation,
  checkpoints and publishing excluded);
- LoRA's ratios against full fine-tuning of the same method and shape, and the 1-minute load average at the start.

Shapes: the tiny preset's model (GPT-2, 2 layers x 64, 2 heads, BPE vocabulary 512, context 128) and larger ones
(`--large`, default 12 layers x 512, 8 heads; the same tokenizer), all randomly initialised; the reward model is the same weights read
as a 1-label classifier (a random score head). The tokenizer is the project's BPE recipe trained on the tiny demo
corpus. RL settings are the tiny preset's `ppo:` section (rollout 16 replies, minibatch 8, 2 epochs, 16 new tokens,
6 iterations); GRPO samples the same 16 replies per rollout, as 4 prompts x 4. Each run gets its own store and a
fresh local Ray (started before the stage, shut down after it), so no actor process is reused across runs.

    .venv/bin/python benchmarks/rl_lora_bench.py                    # both shapes, PPO and GRPO (~10 min, 2 cores)
    .venv/bin/python benchmarks/rl_lora_bench.py --quick            # smoke run: tiny shape, PPO, 2 iterations
    .venv/bin/python benchmarks/rl_lora_bench.py --json /tmp/rl_lora_bench.json [--skip-grpo] [--skip-large]
    .venv/bin/python benchmarks/rl_lora_bench.py --skip-tiny --large 12x512:8 --large 16x768:12   # two larger shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROLES = ("policy", "critic", "reference", "reward")
TARGET_MEMORY_CUT = 0.40  # the target: LoRA's actor memory at least 40% below full fine-tuning's
TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2}  # flows/presets/tiny.yaml's pretrain model
TINY_VOCAB = 512  # flows/presets/tiny.yaml's pretrain.vocab_size
CONTEXT = 128


def build_models(work: Path, shape: dict, tokenizer) -> tuple[Path, Path, dict]:
    """A random GPT-2 of `shape` (sft dir) and the same weights as a 1-label reward model; parameter counts."""
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from stages.common.hf import save_model_dir
    from stages.common.lora import LoraSection, trainable_parameters, wrap

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=CONTEXT, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **shape,
    )  # fmt: skip
    name = f"{shape['n_layer']}x{shape['n_embd']}"
    sft, rm = work / f"sft-{name}", work / f"rm-{name}"
    model = GPT2LMHeadModel(config)
    total = sum(p.numel() for p in model.parameters())
    save_model_dir(model, tokenizer, sft)
    save_model_dir(AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1), tokenizer, rm)
    adapter, _ = trainable_parameters(wrap(model, LoraSection(), task_type="CAUSAL_LM", where="bench"))
    return sft, rm, {"parameters": total, "lora_trainable": adapter}


def rl_config(method: str, args, lora: bool):
    """The tiny preset's RL settings; GRPO's 16 replies as 4 prompts x 4; `lora` the section's defaults or None."""
    from stages import rl
    from stages.common.lora import LoraSection

    group = 4
    common = dict(
        iterations=args.iterations, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16, eval_prompts=8,
        samples_shown=0, checkpoint_every=10**6, lora=LoraSection(r=args.lora_r) if lora else None,
    )  # fmt: skip
    if method == "grpo":
        return rl.GRPOConfig(**common, rollout_batch_size=args.replies // group, group_size=group)
    return rl.PPOConfig(**common, rollout_batch_size=args.replies)


def run_variant(work: Path, method: str, lora: bool, args, sft: Path, rm: Path, prompts: list[str]) -> dict:
    """One stage run in its own store and its own local Ray; the figures read from the published manifest."""
    import logging

    import ray

    from stages import rl
    from stages.common.context import StageContext
    from stages.common.store import ArtifactStore
    from stages.rl.actor_pool import generation_threads
    from stages.rl.placement import roles_of

    cfg = rl_config(method, args, lora)
    load = os.getloadavg()[0]
    root = work / f"run-{method}-{'lora' if lora else 'full'}-{time.time_ns()}"
    store = ArtifactStore(root / "store")
    sft_a = store.publish(sft, name="sft-model", kind="causal-lm", stage="bench")
    rm_a = store.publish(rm, name="reward-model", kind="reward-model", stage="bench")
    with tempfile.TemporaryDirectory() as d:
        for split in ("train", "test"):
            (Path(d) / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        prompts_a = store.publish(d, name="prompts", kind="dataset", stage="bench", extra={"format": "prompts"})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    log = print if args.verbose else (lambda m: None)
    t = time.perf_counter()
    try:
        ctx = StageContext(work_dir=str(root / "work"), log=log)
        policy = rl.run(cfg, store=store, ctx=ctx, sft_model=sft_a, reward_model=rm_a, prompts=prompts_a)["policy"]
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t
    rss = policy.manifest["timings"]["peak_rss_mib"]
    history = [json.loads(x) for x in (Path(policy.reports_path) / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["seconds_generation"] + m["seconds_scoring"] + m["seconds_training"] for m in history]
    # the same rate without iteration 1 (its first DeepSpeed step and first forwards warm up): a check on the noise
    later = len(seconds[1:]) * cfg.rollout_replies / sum(seconds[1:]) if len(seconds) > 1 else None
    result = {
        "method": method, "variant": "lora" if lora else "full", "roles": list(roles_of(cfg)),
        "generation_threads": generation_threads(cfg, use_gpu=False), "peak_rss_mib": rss,
        "samples_per_second": policy.metrics["samples_per_second"], "samples_per_second_after_iteration_1": later,
        "iteration_seconds": [round(x, 3) for x in seconds], "stage_wall_seconds": round(wall, 1),
        "load_average_start": load, "iterations": policy.metrics["iterations"],
    }  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)  # the copies of the models and the checkpoints (GBs at 12 x 512)
    return result


def print_table(rows: list[dict]) -> None:
    header = ("| shape | method | variant | actors | gen thr | peak RSS sum MiB | policy | critic | reference | reward "
              "| samples/s | RSS vs full | samples/s vs full | samples/s iter 2+ | load avg at start | stage wall s |")  # fmt: skip
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        full = next(x for x in rows if (x["shape"], x["method"], x["variant"]) == (r["shape"], r["method"], "full"))
        rss, sps = r["peak_rss_mib"], r["samples_per_second"]
        per_role = " | ".join(f"{rss[role]:.0f}" if role in rss else "-" for role in ROLES)
        if r["variant"] == "full":
            ratios = "1 | 1"
        else:
            ratios = f"{rss['total'] / full['peak_rss_mib']['total']:.2f} | {sps / full['samples_per_second']:.2f}"
        later = r["samples_per_second_after_iteration_1"]
        print(f"| {r['shape']} | {r['method']} | {r['variant']} | {len(r['roles'])} | {r['generation_threads']} "
              f"| {rss['total']:.0f} | {per_role} | {sps:.2f} | {ratios} | {'-' if later is None else f'{later:.2f}'} "
              f"| {r['load_average_start']:.2f} | {r['stage_wall_seconds']:.0f} |")  # fmt: skip


def verdicts(rows: list[dict]) -> list[str]:
    """Per shape and method: LoRA's memory cut and speed against the issue's targets (as measured, not tuned)."""
    out = []
    for r in rows:
        if r["variant"] != "lora":
            continue
        full = next(x for x in rows if (x["shape"], x["method"], x["variant"]) == (r["shape"], r["method"], "full"))
        cut = 1 - r["peak_rss_mib"]["total"] / full["peak_rss_mib"]["total"]
        speed = r["samples_per_second"] / full["samples_per_second"]
        out.append(
            f"{r['shape']} {r['method']}: LoRA actor memory {100 * cut:.0f}% lower "
            f"({'meets' if cut >= TARGET_MEMORY_CUT else 'misses'} the 40% target), samples/s x{speed:.2f} "
            f"({'not lower' if speed >= 1.0 else 'lower'}: {'meets' if speed >= 1.0 else 'misses'} the target)"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny shape, PPO only, 2 iterations (under 2 minutes)")
    p.add_argument("--iterations", type=int, default=None, help="RL iterations per run (default 6; --quick: 2)")
    p.add_argument("--replies", type=int, default=16, help="replies per rollout (a multiple of 8)")
    p.add_argument("--large", action="append", metavar="LAYERSxWIDTH:HEADS",
                   help="a larger shape, repeatable (default 12x512:8)")
    p.add_argument("--skip-tiny", action="store_true", help="the larger shapes only")
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank (the lora: section's default 16)")
    p.add_argument("--skip-grpo", action="store_true")
    p.add_argument("--skip-large", action="store_true", help="the tiny shape only")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--verbose", action="store_true", help="print the stage's own log lines")
    args = p.parse_args()
    if args.iterations is None:
        args.iterations = 2 if args.quick else 6
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import warnings

    from transformers.utils import logging as hf_logging

    from stages.common.hf import train_bpe_tokenizer
    from stages.data import demo

    hf_logging.set_verbosity_error()  # the driver's own model building: no load reports or progress bars
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft|transformers")

    started = time.perf_counter()
    load_start = os.getloadavg()
    shapes = {} if args.skip_tiny and not args.quick else {"tiny 2x64": TINY_SHAPE}
    if not (args.quick or args.skip_large):
        for text in args.large or ["12x512:8"]:
            size, heads = text.split(":")
            layers, width = (int(x) for x in size.split("x"))
            shapes[size] = {"n_layer": layers, "n_embd": width, "n_head": int(heads)}
    methods = ["ppo"] + ([] if args.skip_grpo or args.quick else ["grpo"])
    print(f"rl_lora_bench: {', '.join(shapes)}; {', '.join(m.upper() for m in methods)}; {args.iterations} "
          f"iterations of {args.replies} replies; LoRA r {args.lora_r}; {os.cpu_count()} CPUs; load average at "
          f"start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} (1 / 5 / 15 min)", flush=True)  # fmt: skip
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rl-lora-bench-") as d:
        work = Path(d)
        data = demo.generate(demo.DemoConfig(size="tiny"))
        tokenizer = train_bpe_tokenizer([r["text"] for r in data["corpus"]["train"][:3000]], TINY_VOCAB)
        prompts = [r["prompt"] for r in data["prompts"]["train"]]
        for s, (shape_name, shape) in enumerate(shapes.items()):
            sft, rm, counts = build_models(work, shape, tokenizer)
            print(f"{shape_name}: GPT-2 {shape['n_layer']} layers x {shape['n_embd']}, {shape['n_head']} heads, vocab "
                  f"{len(tokenizer)}: {counts['parameters'] / 1e6:.2f}M parameters, the policy's adapter "
                  f"{counts['lora_trainable'] / 1e6:.3f}M", flush=True)  # fmt: skip
            for m, method in enumerate(methods):
                # alternate which variant goes first, so a drift in the machine's speed does not favour one side
                order = [False, True] if (s + m) % 2 == 0 else [True, False]
                for lora in order:
                    r = {"shape": shape_name, **run_variant(work, method, lora, args, sft, rm, prompts)}
                    rows.append(r)
                    print(f"  {method} {r['variant']}: peak RSS sum {r['peak_rss_mib']['total']:.0f} MiB "
                          f"{ {k: v for k, v in r['peak_rss_mib'].items() if k != 'total'} }, "
                          f"{r['samples_per_second']:.2f} samples/s (iterations {r['iteration_seconds']} s), "
                          f"stage wall {r['stage_wall_seconds']:.0f} s",
                          flush=True)  # fmt: skip
            shutil.rmtree(sft, ignore_errors=True)
            shutil.rmtree(rm, ignore_errors=True)
    order_key = {(r["shape"], r["method"]): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: (order_key[(r["shape"], r["method"])], r["variant"] != "full"))
    print()
    print_table(rows)
    print()
    for line in verdicts(rows):
        print(line)
    print(f"bench wall {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average_start": load_start, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
