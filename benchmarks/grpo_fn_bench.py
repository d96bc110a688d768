"""GRPO with a Python reward function: our `grpo` stage vs trl's `GRPOTrainer` (the installed trl), side by side.

Issue 24 item 9. Both sides get the same randomly initialised GPT-2 (policy = reference), the same demo prompts,
group size, replies per rollout, reply length and epochs, sampling at temperature 1, and the SAME reward function:
a file this script writes (`bench_reward.py`, TRL's signature `fn(prompts, completions, **kwargs)`, cheap and
deterministic: a length score on the reply's words plus a bonus for ending a sentence). No reward model on either
side. Ours gets it by path (`grpo.reward.model=None`, `grpo.reward.functions=[{path, name}]`, imported into the
store as a `reward-fn` artifact, run in a CPU Ray actor of its own); trl gets it as `reward_funcs=[fn]`, imported
from the same file, in a process of its own (trl 1.16 from the project's venv, torch's default threads).

Reported per side: samples/s over the RL iterations (start-up and evaluations excluded), the generation / scoring /
training split, and the function's own time apart: the function times itself (the file appends each call's
seconds to a log, the same code on both sides); on our side also the round trip through its actor (submit to
result, on the driver; it overlaps the reference forward), on trl's the time of its calls through a wrapper.

    .venv/bin/python benchmarks/grpo_fn_bench.py --repeats 3    # both shapes, 3 alternating pairs (~10-12 min quiet)
    .venv/bin/python benchmarks/grpo_fn_bench.py                # both shapes, 1 pair each (~4 min quiet)
    .venv/bin/python benchmarks/grpo_fn_bench.py --quick        # smoke run, tiny model (~1 min; its ratio means nothing)

trl's figure is `trainer.train()` end to end (its first step's warm-up included, as in ppo_bench.py); ours sums the
stage's per-iteration seconds (actor start-up and the two evaluations excluded).
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

FN_NAME = "length_format_reward"
# The reward function both sides run, in TRL's documented signature. `{times}` is filled in with the log file the
# function appends its own per-call seconds to (one line per call); the benchmark reads and empties it per side.
REWARD_FILE = textwrap.dedent(
    '''
    """Benchmark reward (grpo_fn_bench.py): a reply of about TARGET_WORDS words scores 1, an ending . ! or ? adds 0.5."""
    import re
    import time

    TARGET_WORDS = 8
    TIMES = {times!r}
    _END = re.compile(r"[.!?][\\"')\\]]*\\s*$")


    def {name}(prompts, completions, **kwargs):
        t = time.perf_counter()
        scores = []
        for completion in completions:
            text = completion if isinstance(completion, str) else completion[-1]["content"]  # chat: the last message
            words = len(text.split())
            score = 1.0 - min(abs(words - TARGET_WORDS) / TARGET_WORDS, 1.0)
            scores.append(score + (0.5 if _END.search(text) else 0.0))
        with open(TIMES, "a") as f:
            f.write(f"{{time.perf_counter() - t:.9f}}\\n")
        return scores
    '''
)

# The trl side, run by the project's venv in a process of its own. Timed as in ppo_bench.py: generate, the reward
# computation and the no-grad log-prob forwards (old and reference log-probs) are wrapped; the rest is training.
PEER_SCRIPT = textwrap.dedent(
    """
    import functools, importlib.util, json, sys, time, torch, transformers, trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    a = json.loads(sys.argv[1])
    clock = {"generation": 0.0, "scoring": 0.0, "function": 0.0, "function_calls": 0}

    def timed(fn, kind, only_no_grad=False):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[kind] += time.perf_counter() - t
                if kind == "function":
                    clock["function_calls"] += 1
        return inner

    spec = importlib.util.spec_from_file_location("bench_reward", a["fn_path"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reward_fn = timed(getattr(module, a["fn_name"]), "function")  # functools.wraps keeps its name for trl's logs

    transformers.GenerationMixin.generate = timed(transformers.GenerationMixin.generate, "generation")
    GRPOTrainer._calculate_rewards = timed(GRPOTrainer._calculate_rewards, "scoring")
    GRPOTrainer._get_per_token_logps_and_entropies = timed(
        GRPOTrainer._get_per_token_logps_and_entropies, "scoring", only_no_grad=True)
    tok = AutoTokenizer.from_pretrained(a["sft"])
    policy = AutoModelForCausalLM.from_pretrained(a["sft"])
    ds = Dataset.from_dict({"prompt": a["prompts"]})
    args = GRPOConfig(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
        num_generations=a["group_size"], steps_per_generation=1, num_iterations=a["epochs"],
        max_steps=a["iterations"] * a["epochs"], max_completion_length=a["response_length"], temperature=1.0,
        top_k=0, learning_rate=a["lr"], beta=0.04, loss_type="dapo", scale_rewards="group", report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=10**6, seed=0, gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_fn], args=args, train_dataset=ds, processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    print("PEER_RESULT " + json.dumps({
        "seconds": total, "samples": a["batch"] * a["iterations"], "threads": torch.get_num_threads(),
        "generation": clock["generation"], "scoring": clock["scoring"],
        "training": total - clock["generation"] - clock["scoring"],
        "fn_wrapped": clock["function"], "fn_wrapped_calls": clock["function_calls"], "trl": trl.__version__,
    }))
    """
)

SHAPES = {  # name: (n_layer, n_embd, n_head, replies per rollout, reply tokens)
    "default": (4, 256, 4, 16, 16),
    "large": (6, 256, 4, 32, 24),
}


def build_policy(work: Path, n_layer: int, n_embd: int, n_head: int, vocab: int) -> tuple[Path, list[str]]:
    """As ppo_bench.py's `build_models`, without the reward model: a BPE tokenizer trained on the demo corpus, a
    random GPT-2 (the policy and the reference) and the demo's training prompts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from stages.common.hf import save_model_dir, train_bpe_tokenizer
    from stages.data import demo

    data = demo.generate(demo.DemoConfig(size="tiny"))
    tok = train_bpe_tokenizer([r["text"] for r in data["corpus"]["train"][:3000]], vocab)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    save_model_dir(GPT2LMHeadModel(config), tok, work / "sft")
    return work / "sft", [r["prompt"] for r in data["prompts"]["train"]]


def read_times(path: Path) -> list[float]:
    """The seconds of each call the function logged itself, in order; empties the log for the next side."""
    values = [float(x) for x in path.read_text().split()] if path.exists() else []
    path.write_text("")
    return values


class RoundTrips:
    """Times each reward-function batch on our driver from `submit` to `collect`'s return (patched in for the run;
    the driver is this process): the function's own time plus Ray's round trip, overlapping the reference forward."""

    def __init__(self):
        from stages.reward_functions import runner

        self.runner, self.seconds = runner, []
        self.submit, self.collect = runner.RewardFunctions.submit, runner.RewardFunctions.collect

    def __enter__(self):
        rt, submit, collect = self, self.submit, self.collect

        def timed_submit(fns, *args, **kwargs):
            rt.started = time.perf_counter()
            return submit(fns, *args, **kwargs)

        def timed_collect(fns, *args, **kwargs):
            try:
                return collect(fns, *args, **kwargs)
            finally:
                rt.seconds.append(time.perf_counter() - rt.started)

        self.runner.RewardFunctions.submit, self.runner.RewardFunctions.collect = timed_submit, timed_collect
        return self

    def __exit__(self, *exc):
        self.runner.RewardFunctions.submit, self.runner.RewardFunctions.collect = self.submit, self.collect


def run_ours(a, work: Path, sft: Path, prompts: list[str], fn_path: Path, times: Path) -> dict:
    """Our `grpo` stage, no reward model, the function by path; the split comes from its per-iteration metrics."""
    import ray

    from stages import rl
    from stages.common.context import StageContext
    from stages.common.store import ArtifactStore
    from stages.reward_functions.artifact import import_function
    from stages.reward_functions.config import FunctionSpec, RewardSources
    from stages.rl.actor_pool import generation_threads

    store = ArtifactStore(work / f"store-{time.time_ns()}")  # its own: an identical policy would dedup to the first
    sft_a = store.publish(sft, name="sft-model", kind="causal-lm", stage="bench")
    with tempfile.TemporaryDirectory() as d:
        for split in ("train", "test"):
            (Path(d) / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        prompts_a = store.publish(d, name="prompts", kind="dataset", stage="bench", extra={"format": "prompts"})
    spec = FunctionSpec(path=str(fn_path), name=FN_NAME)
    fn_a = import_function(store, spec, "grpo.reward.functions[0]")
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = rl.CONFIGS["grpo"](
        group_size=a.group_size, iterations=a.iterations, rollout_batch_size=a.batch // a.group_size,
        mini_batch_size=a.batch, ppo_epochs=a.epochs, max_new_tokens=a.response_length, temperature=1.0,
        learning_rate=a.lr, missing_eos_penalty=None, eval_prompts=a.batch // a.group_size, checkpoint_every=10**6,
        torch_threads=a.threads, generation_threads=a.generation_threads, loss_kl_coef=0.04,  # the peer's beta
        reward=RewardSources(model=None, functions=[spec]),
    )  # fmt: skip
    t = time.perf_counter()
    ctx = StageContext(work_dir=str(work / f"run-grpo-{time.time_ns()}"), log=lambda m: None)  # no resume
    with RoundTrips() as rt:
        out = rl.run(cfg, store=store, ctx=ctx, sft_model=sft_a, prompts=prompts_a, reward_fns={spec.label: fn_a})
    wall = time.perf_counter() - t
    ray.shutdown()  # Ray's daemons stay off the CPUs while the peer runs
    history = [json.loads(x) for x in (Path(out["policy"].reports_path) / "metrics.jsonl").read_text().splitlines()]
    split = {k: sum(m[f"seconds_{k}"] for m in history) for k in ("generation", "scoring", "training")}
    # one call per batch: the evaluation before (one batch: eval_prompts = the rollout's prompts), the iterations,
    # the evaluation after; only the iterations' calls are counted, as in samples/s
    fn_self, round_trips = read_times(times)[1:-1], rt.seconds[1:-1]
    return {"seconds": sum(split.values()), "samples": a.batch * len(history), "stage_wall": wall,
            "fn_self": sum(fn_self), "fn_self_calls": len(fn_self), "fn_round_trip": sum(round_trips),
            "fn_round_trip_calls": len(round_trips), "threads": generation_threads(cfg, use_gpu=False), **split}  # fmt: skip


def run_peer(a, work: Path, sft: Path, prompts: list[str], fn_path: Path, times: Path) -> dict:
    """trl's GRPOTrainer with the same function, in a process of its own (the project's venv)."""
    script = work / "peer-grpo-fn.py"
    script.write_text(PEER_SCRIPT)
    payload = {"sft": str(sft), "prompts": prompts, "batch": a.batch, "epochs": a.epochs, "iterations": a.iterations,
               "response_length": a.response_length, "lr": a.lr, "group_size": a.group_size,
               "fn_path": str(fn_path), "fn_name": FN_NAME, "out": str(work / "peer-out")}  # fmt: skip
    env = {**os.environ, "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(payload)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            result = json.loads(line[len("PEER_RESULT ") :])
            fn_self = read_times(times)
            result["fn_self"], result["fn_self_calls"] = sum(fn_self), len(fn_self)
            return result
    raise RuntimeError(f"peer run failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")


def describe(name: str, r: dict) -> str:
    sps = r["samples"] / r["seconds"]
    split = " / ".join(
        f"{k} {r[k]:.1f}s ({100 * r[k] / r['seconds']:.0f}%)" for k in ("generation", "scoring", "training")
    )
    return f"{name:<34} {sps:7.2f} samples/s over {r['samples']} samples in {r['seconds']:.1f}s: {split}"


def describe_fn(r: dict) -> str:
    own = f"function's own time {1000 * r['fn_self']:.1f} ms in {r['fn_self_calls']} calls"
    if "fn_round_trip" in r:  # ours
        return (f"{'':<34} {own}; round trip via its Ray actor "
                f"{1000 * r['fn_round_trip']:.1f} ms in {r['fn_round_trip_calls']} batches (overlaps the reference "
                f"forward); stage wall incl. start-up {r['stage_wall']:.1f}s")  # fmt: skip
    return f"{'':<34} {own}; through trl's wrapper {1000 * r['fn_wrapped']:.1f} ms in {r['fn_wrapped_calls']} calls"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape",
        choices=["default", "large", "both"],
        default="both",
        help="default: 4 x 256, 16 replies, 16 tokens; large: 6 x 256, 32 replies, 24 tokens",
    )
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4, help="replies per prompt (trl's num_generations)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor on our side")
    p.add_argument(
        "--generation-threads",
        type=int,
        default=None,
        help="threads our policy samples and trains with; default: the stage's (the roles' CPUs)",
    )
    p.add_argument("--repeats", type=int, default=1, help="side-by-side pairs per shape (order alternates)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers x 64, 8 replies, 8 tokens, 2 iterations")
    a = p.parse_args()
    print(f"load average at start (1/5/15 min): {load()}, {os.cpu_count()} CPUs", flush=True)
    if a.quick:
        shapes = {"quick": (2, 64, 2, 8, 8)}
        a.iterations, a.epochs = 2, 1
    else:
        shapes = {k: v for k, v in SHAPES.items() if a.shape in (k, "both")}
    ratios: dict[str, list[float]] = {s: [] for s in shapes}
    with tempfile.TemporaryDirectory(prefix="grpo-fn-bench-") as d:
        work = Path(d)
        times = work / "fn-times.log"
        fn_path = work / "bench_reward.py"
        fn_path.write_text(REWARD_FILE.format(times=str(times), name=FN_NAME).lstrip())
        for shape, (n_layer, n_embd, n_head, batch, length) in shapes.items():
            a.batch, a.response_length = batch, length
            if a.batch % a.group_size:
                raise SystemExit(f"{batch} replies must be a multiple of --group-size {a.group_size}")
            sft, prompts = build_policy(work / shape, n_layer, n_embd, n_head, a.vocab)
            print(f"shape {shape}: GPT-2 {n_layer} layers x {n_embd}, {batch} replies ({batch // a.group_size} prompts "
                  f"x {a.group_size}), {length} tokens, {a.epochs} epochs, {a.iterations} iterations, fp32, reward "
                  f"{FN_NAME} (no reward model), load average {load()}", flush=True)  # fmt: skip
            for r in range(a.repeats):
                sides = ["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]  # a drift favours neither side
                results = {}
                for side in sides:
                    if side == "peer" and a.skip_peer:
                        continue
                    if side == "ours":
                        res = results[side] = run_ours(a, work, sft, prompts, fn_path, times)
                        label = f"ours GRPO (2 actors, {res['threads']} thr)"
                    else:
                        res = results[side] = run_peer(a, work, sft, prompts, fn_path, times)
                        label = f"trl {res['trl']} GRPOTrainer ({res['threads']} thr)"
                    print(describe(label, res), flush=True)
                    print(describe_fn(res), flush=True)
                if "peer" in results:
                    ours, peer = results["ours"], results["peer"]
                    ratio = (ours["samples"] / ours["seconds"]) / (peer["samples"] / peer["seconds"])
                    ratios[shape].append(ratio)
                    print(f"shape {shape}, repeat {r + 1}: ratio ours GRPO / trl GRPOTrainer {ratio:.2f}x "
                          f"(load average {load()})", flush=True)  # fmt: skip
        for shape, values in ratios.items():
            if values:
                print(f"{shape}: ratio over {len(values)} repeat(s): median {statistics.median(values):.2f}x, "
                      f"range {min(values):.2f}-{max(values):.2f}x")  # fmt: skip
    if a.quick:
        print(
            "quick mode: a smoke test; at 2 iterations trl's first-step warm-up dominates, so the ratio means nothing"
        )
    print(f"load average at end: {load()}")


if __name__ == "__main__":
    main()
