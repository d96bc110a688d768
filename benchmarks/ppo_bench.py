"""RL throughput: this project's Ray-actor PPO vs trl 1.12.0's `trl.experimental.ppo.PPOTrainer`, side by side,
and our GRPO (no critic, `--group-size` replies per prompt) at the same number of replies per rollout.

Both sides get the same randomly initialised GPT-2 (policy = reference, reward model = value model init), the same
demo prompts, rollout batch, response length, PPO epochs and one minibatch per epoch, sampling at temperature 1.
The peer runs in its own virtual environment (torch==2.13.0, trl==1.12.0, created on first use), as one process
with torch's default threads; ours runs four Ray actors. Reported: samples/s over the PPO iterations (start-up and
evaluation excluded on both sides) and the generation / scoring / training split, then the ratio ours / peer.
Our GRPO samples `--batch` replies per rollout as `--batch / --group-size` prompts x `--group-size` replies.

    .venv/bin/python benchmarks/ppo_bench.py [--iterations 10 --batch 16 --response-length 16 --epochs 4]
                                             [--group-size 4 --bf16 --repeats 3 --skip-grpo --skip-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEER_VENV = Path(os.environ.get("PPO_BENCH_PEER_VENV", Path.home() / ".cache" / "rlhf-dag" / "trl112-venv"))
PEER_PACKAGES = ["torch==2.13.0", "trl==1.12.0", "requests"]  # GRPOTrainer imports requests

# What both peer scripts share, run inside the trl 1.12 venv: the payload, the clock, `timed` (wraps a trl helper;
# `only_no_grad` counts only its no-grad calls, a forward with grad being training) and `train_and_report`.
PEER_COMMON = textwrap.dedent(
    """
    import json, sys, time, torch, transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    a = json.loads(sys.argv[1])
    clock = {"generation": 0.0, "scoring": 0.0}

    def timed(fn, kind, only_no_grad=False):
        def inner(*args, **kwargs):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[kind] += time.perf_counter() - t
        return inner

    def train_and_report(trainer):
        t = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t
        print("PEER_RESULT " + json.dumps({
            "seconds": total, "samples": a["batch"] * a["iterations"], "threads": torch.get_num_threads(),
            "generation": clock["generation"], "scoring": clock["scoring"],
            "training": total - clock["generation"] - clock["scoring"],
        }))
    """
)

# The PPO peer: generation, no-grad scoring forwards and the rest are timed by wrapping the module-level helpers
# PPOTrainer calls.
PEER_SCRIPT = PEER_COMMON + textwrap.dedent(
    """
    import trl.experimental.ppo.ppo_trainer as T
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    T.batch_generation = timed(T.batch_generation, "generation")
    T.forward = timed(T.forward, "scoring", only_no_grad=True)
    T.get_reward = timed(T.get_reward, "scoring", only_no_grad=True)
    tok = AutoTokenizer.from_pretrained(a["sft"])
    tok.padding_side = "left"
    policy, ref = (AutoModelForCausalLM.from_pretrained(a["sft"]) for _ in range(2))
    rm, vm = (AutoModelForSequenceClassification.from_pretrained(a["rm"], num_labels=1) for _ in range(2))
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in a["prompts"]]})
    args = PPOConfig(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
        num_ppo_epochs=a["epochs"], num_mini_batches=1, total_episodes=a["batch"] * a["iterations"],
        response_length=a["response_length"], temperature=1.0, learning_rate=a["lr"], report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=10**6, missing_eos_penalty=None, stop_token="eos",
        num_sample_generations=0, seed=0, bf16=a["bf16"],
    )
    train_and_report(PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                                value_model=vm, train_dataset=ds, eval_dataset=ds.select(range(a["batch"]))))
    """
)


# The GRPO peer: trl 1.12.0's GRPOTrainer with the reward model as its reward function, the same replies per rollout
# (batch = prompts x num_generations), `epochs` passes over each rollout (num_iterations), one optimizer step per
# pass, beta 0.04 (the KL as a k3 loss term, as ours), token-level loss ("dapo", as ours), group std scaling, and
# gradient checkpointing off (GRPOConfig turns it on by default; ours does not recompute activations).
PEER_GRPO_SCRIPT = PEER_COMMON + textwrap.dedent(
    """
    from trl import GRPOConfig, GRPOTrainer

    transformers.GenerationMixin.generate = timed(transformers.GenerationMixin.generate, "generation")
    GRPOTrainer._calculate_rewards = timed(GRPOTrainer._calculate_rewards, "scoring")
    GRPOTrainer._get_per_token_logps_and_entropies = timed(
        GRPOTrainer._get_per_token_logps_and_entropies, "scoring", only_no_grad=True)
    tok = AutoTokenizer.from_pretrained(a["sft"])
    policy = AutoModelForCausalLM.from_pretrained(a["sft"])
    rm = AutoModelForSequenceClassification.from_pretrained(a["rm"], num_labels=1)
    k = a["group_size"]
    ds = Dataset.from_dict({"prompt": a["prompts"]})
    args = GRPOConfig(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
        num_generations=k, steps_per_generation=1, num_iterations=a["epochs"], max_steps=a["iterations"] * a["epochs"],
        max_completion_length=a["response_length"], temperature=1.0, top_k=0, learning_rate=a["lr"], beta=0.04,
        loss_type="dapo", scale_rewards="group", report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=10**6, seed=0, bf16=a["bf16"], gradient_checkpointing=False,
    )
    train_and_report(GRPOTrainer(model=policy, reward_funcs=rm, args=args, train_dataset=ds, processing_class=tok,
                                 reward_processing_classes=tok))
    """
)


def ensure_peer_venv() -> Path:
    """Create the trl 1.12.0 venv on first use (pip from the package registry); returns its python."""
    python = PEER_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating the peer venv at {PEER_VENV} ({' '.join(PEER_PACKAGES)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def build_models(work: Path, n_layer: int, n_embd: int, n_head: int, vocab: int) -> tuple[Path, Path, list[str]]:
    """A tokenizer trained on the demo corpus, a random GPT-2 (sft dir) and the same weights as a 1-label RM."""
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from stages.common.hf import save_model_dir, train_bpe_tokenizer
    from stages.data import demo

    data = demo.generate(demo.DemoConfig(size="tiny"))
    tok = train_bpe_tokenizer([r["text"] for r in data["corpus"]["train"][:3000]], vocab)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    sft, rm = work / "sft", work / "rm"
    save_model_dir(GPT2LMHeadModel(config), tok, sft)
    save_model_dir(AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1), tok, rm)
    return sft, rm, [r["prompt"] for r in data["prompts"]["train"]]


def run_ours(args, work: Path, sft: Path, rm: Path, prompts: list[str], algorithm: str = "ppo") -> dict:
    """Our stage on the same models (`algorithm` ppo or grpo); the split comes from its per-iteration metrics."""
    import ray

    from stages import rl
    from stages.common.context import StageContext
    from stages.common.store import ArtifactStore

    store = ArtifactStore(work / f"store-{time.time_ns()}")  # its own: an identical policy would dedup to the first run
    sft_a = store.publish(sft, name="sft-model", kind="causal-lm", stage="bench")
    rm_a = store.publish(rm, name="reward-model", kind="reward-model", stage="bench")
    with tempfile.TemporaryDirectory() as d:
        for split in ("train", "test"):
            (Path(d) / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        prompts_a = store.publish(d, name="prompts", kind="dataset", stage="bench", extra={"format": "prompts"})
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    group = args.group_size if algorithm == "grpo" else 1  # replies per prompt; the rollout holds args.batch replies
    if args.batch % group:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --group-size {group}")
    cfg = rl.CONFIGS[algorithm](
        **({"group_size": group} if algorithm == "grpo" else {}), iterations=args.iterations, rollout_batch_size=args.batch // group,
        mini_batch_size=args.batch, ppo_epochs=args.epochs, max_new_tokens=args.response_length, temperature=1.0,
        learning_rate=args.lr, missing_eos_penalty=None, eval_prompts=args.batch, checkpoint_every=10**6,
        torch_threads=args.threads, bf16=args.bf16, generation_threads=args.generation_threads,
        old_logprobs=args.old_logprobs, loss_kl_coef=0.04,  # GRPO: the peer's beta (no effect on the work done)
    )  # fmt: skip
    t = time.perf_counter()
    ctx = StageContext(work_dir=str(work / f"run-{algorithm}-{time.time_ns()}"), log=lambda m: None)  # no resume
    out = rl.run(cfg, store=store, ctx=ctx, sft_model=sft_a, reward_model=rm_a, prompts=prompts_a)["policy"]
    wall = time.perf_counter() - t
    ray.shutdown()  # Ray's own daemons stay off the CPUs while the peer runs
    history = [json.loads(x) for x in (Path(out.reports_path) / "metrics.jsonl").read_text().splitlines()]
    split = {k: sum(m[f"seconds_{k}"] for m in history) for k in ("generation", "scoring", "training")}
    return {"seconds": sum(split.values()), "samples": args.batch * len(history), "stage_wall": wall, **split}


def run_peer(args, work: Path, sft: Path, rm: Path, prompts: list[str], algorithm: str = "ppo") -> dict:
    """trl 1.12.0's PPOTrainer (or GRPOTrainer) in its own venv, same models and sizes."""
    python = ensure_peer_venv()
    script = work / f"peer-{algorithm}.py"
    script.write_text(PEER_GRPO_SCRIPT if algorithm == "grpo" else PEER_SCRIPT)
    payload = {"sft": str(sft), "rm": str(rm), "prompts": prompts, "batch": args.batch, "epochs": args.epochs,
               "iterations": args.iterations, "response_length": args.response_length, "lr": args.lr,
               "group_size": args.group_size, "bf16": args.bf16, "out": str(work / f"peer-out-{algorithm}")}  # fmt: skip
    env = {**os.environ, "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(python), str(script), json.dumps(payload)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT ") :])
    raise RuntimeError(f"peer run failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")


def describe(name: str, r: dict) -> str:
    sps = r["samples"] / r["seconds"]
    parts = " / ".join(
        f"{k} {r[k]:.1f}s ({100 * r[k] / r['seconds']:.0f}%)" for k in ("generation", "scoring", "training")
    )
    return f"{name:<28} {sps:7.2f} samples/s over {r['samples']} samples in {r['seconds']:.1f}s: {parts}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor on our side")
    p.add_argument("--generation-threads", type=int, default=None,
                   help="threads our policy samples with (and trains with under GRPO); default: the pool's CPUs")
    p.add_argument("--group-size", type=int, default=4, help="GRPO replies per prompt")
    p.add_argument("--bf16", action="store_true", help="bf16 on both sides (a CPU with native bf16: avx512_bf16/AMX)")
    p.add_argument("--old-logprobs", choices=["auto", "sampling", "recompute"], default="auto",
                   help="our ppo.old_logprobs: read from the sampling pass or recomputed by a forward")
    p.add_argument("--repeats", type=int, default=1, help="side-by-side pairs per algorithm (order alternates)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-grpo", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as d:
        work = Path(d)
        sft, rm, prompts = build_models(work, args.n_layer, args.n_embd, args.n_head, args.vocab)
        print(f"model: GPT-2 {args.n_layer} layers x {args.n_embd}, batch {args.batch}, response {args.response_length} "
              f"tokens, {args.epochs} PPO epochs, {args.iterations} iterations, {os.cpu_count()} CPUs, "
              f"{'bf16' if args.bf16 else 'fp32'}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
        algorithms = ["ppo"] + ([] if args.skip_grpo else ["grpo"])
        ratios: dict[str, list[float]] = {a: [] for a in algorithms}
        for r in range(args.repeats):
            for algorithm in algorithms:
                # alternate who goes first, so a drift in the machine's speed does not favour one side
                sides = ["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]
                results = {}
                for side in sides:
                    if side == "peer" and args.skip_peer:
                        continue
                    if side == "ours":
                        results[side] = run_ours(args, work, sft, rm, prompts, algorithm)
                        label = f"ours {algorithm.upper()}" + (" (4 actors)" if algorithm == "ppo" else
                                                                f" (k={args.group_size}, 3 actors)")  # fmt: skip
                        print(describe(label, results[side])
                              + f"; stage wall incl. start-up {results[side]['stage_wall']:.1f}s", flush=True)  # fmt: skip
                    else:
                        results[side] = run_peer(args, work, sft, rm, prompts, algorithm)
                        trainer = "PPOTrainer" if algorithm == "ppo" else "GRPOTrainer"
                        print(describe(f"trl 1.12.0 {trainer} ({results[side]['threads']} thr)", results[side]),
                              flush=True)  # fmt: skip
                if "peer" in results:
                    ratio = (results["ours"]["samples"] / results["ours"]["seconds"]) / (
                        results["peer"]["samples"] / results["peer"]["seconds"])
                    ratios[algorithm].append(ratio)
                    print(f"repeat {r + 1}: ratio ours {algorithm.upper()} / trl 1.12.0: {ratio:.2f}x "
                          f"(load average {os.getloadavg()[0]:.2f})", flush=True)  # fmt: skip
        for algorithm, values in ratios.items():
            if values:
                print(f"{algorithm.upper()} ratio ours / trl 1.12.0 over {len(values)} repeat(s): median "
                      f"{statistics.median(values):.2f}x, range {min(values):.2f}-{max(values):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
