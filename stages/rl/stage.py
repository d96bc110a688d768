"""The RL stage (PPO, GRPO, RLOO): check inputs, start the actors, evaluate, train with checkpoints, evaluate again,
publish the policy (`policy`, `policy-grpo`, `policy-rloo`: the method's own name, POLICY_NAMES)."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from stages.common.context import StageContext
from stages.common.errors import StageInputError
from stages.common.fingerprint import code_fingerprint
from stages.common.plots import write_metrics_jsonl
from stages.reward_functions.artifact import ROLE_PREFIX as REWARD_FN_ROLE_PREFIX
from stages.reward_functions.runner import RewardFunctions
from stages.rl import report
from stages.rl.actor_pool import ActorPool, ModelSource
from stages.rl.checkpoint_state import CheckpointState
from stages.rl.config import RLConfig
from stages.rl.devices import rl_precision
from stages.rl.inputs import check_inputs
from stages.rl.rl_loop import RLLoop, gold_win_rate, rows_for_iteration, select_columns

NAME = "rl"
POLICY_NAMES = {"ppo": "policy", "grpo": "policy-grpo", "rloo": "policy-rloo"}  # what each method publishes
EVAL_SEED_OFFSET = 424_242  # evaluation samples use their own seed, identical before and after training


def run(
    config: RLConfig, *, store, ctx: StageContext, sft_model, prompts, reward_model=None, reward_fns=None
) -> dict:
    """RLHF with the section's method (`config.algorithm`) on `prompts`, from the SFT policy, rewarded by the reward
    model and/or the reward functions (`reward_fns`: {label: reward-fn artifact}) as `config.reward` says.

    Publishes the policy under the method's name (POLICY_NAMES); returns {"policy": Artifact} whatever the name.
    """
    import ray

    from stages.common.ray_train import console_log_dir, ensure_ray

    started = time.perf_counter()
    try:
        config = config.resolved(ctx.scaling.num_workers)
    except ValidationError as e:
        raise StageInputError(
            f"{config.algorithm}: actors_per_role = run.num_workers ({ctx.scaling.num_workers}): {e.errors()[0]['msg']}"
        ) from None
    rl_precision(config.bf16, ctx.scaling.use_gpu, config.algorithm)  # bf16 on CPU is refused before Ray starts
    reward_fns = dict(reward_fns or {})
    prepared = check_inputs(config, sft_model=sft_model, reward_model=reward_model, prompts=prompts,
                            reward_fns=reward_fns)  # fmt: skip
    gold = prepared.gold  # the built-in task's scorer (demo, arithmetic), None for a user's prompts
    eval_prompts = prepared.test_prompts[: config.eval_prompts]
    eval_columns = {c: v[: config.eval_prompts] for c, v in prepared.test_columns.items()}
    eval_seed = ctx.seed + EVAL_SEED_OFFSET
    checkpoints = CheckpointState(ctx.work_dir)
    state = checkpoints.load()

    ensure_ray()
    sft_src = ModelSource(sft_model.path, store.root, sft_model.ref)
    sources = {"policy": sft_src, "reference": sft_src, "critic": sft_src}
    if reward_model is not None:
        sources["reward"] = ModelSource(reward_model.path, store.root, reward_model.ref)
        if getattr(config, "critic_init", None) == "reward_model":
            sources["critic"] = sources["reward"]
    algo = config.algorithm  # the log prefix
    log_dir = console_log_dir(ctx.work_dir)
    if log_dir and not ctx.logs_announced:
        ctx.log(f"{algo}: actor output (DeepSpeed, HF) goes to {log_dir}/<role>-rank*.log")
    functions = RewardFunctions(prepared.functions, timeout_s=config.reward.timeout_s, cpus=config.reward.cpus,
                                log=ctx.log)  # fmt: skip
    try:
        pool = ActorPool(config, sources, seed=ctx.seed, use_gpu=ctx.scaling.use_gpu,
                         special_tokens=prepared.special_tokens, log=ctx.log, log_dir=log_dir)  # fmt: skip
    except BaseException:
        functions.shutdown()
        raise
    try:
        placements = pool.placements()
        ctx.log(f"{algo}: {report.placement_line(placements)}")
        loop = RLLoop(config, pool, prepared.tokenizer, gold=gold, seed=ctx.seed, functions=functions)
        if state is not None:
            checkpoints.restore(pool, state)
            loop.kl_controller.load_state_dict(state["kl_controller"])
            history, eval_before, start = state["history"], state["eval_before"], state["iteration"]
            ctx.log(f"{algo}: resuming from the checkpoint after iteration {start} ({checkpoints.root})")
        else:
            history, start = [], 0
            eval_before = loop.evaluate(eval_prompts, eval_seed, eval_columns)
        every = config.log_interval or max(1, config.iterations // 10)
        loop_start = time.perf_counter()

        def draw(i: int, round_: int = 0) -> tuple[list[str], dict[str, list]]:
            """Iteration i's prompts and their columns; rounds > 0 are dynamic sampling's refills."""
            rows = rows_for_iteration(len(prepared.train_prompts), i, config.rollout_batch_size, ctx.seed, round_)
            return [prepared.train_prompts[j] for j in rows], select_columns(prepared.train_columns, rows)

        for i in range(start, config.iterations):
            metrics = loop.iteration(i, *draw(i), refill=functools.partial(draw, i))
            history.append(metrics)
            if ctx.on_iteration is not None:
                ctx.on_iteration(algo, metrics)
            if (i + 1) % every == 0 or i + 1 == config.iterations:
                eta = (time.perf_counter() - loop_start) / (i + 1 - start) * (config.iterations - i - 1)
                ctx.log(report.log_line(metrics, config.iterations, algo) + f" | eta {eta:.0f}s")
            if (i + 1) % config.checkpoint_every == 0 or i + 1 == config.iterations:
                checkpoints.save(pool, iteration=i + 1, kl_controller=loop.kl_controller, history=history,
                                 eval_before=eval_before)  # fmt: skip
        eval_after = loop.evaluate(eval_prompts, eval_seed, eval_columns)  # before/after: on the "published" line
        staging = _fresh_staging(ctx.work_dir)
        ray.get(pool["policy"].broadcast("export_to", staging))
        peak_rss = pool.peak_rss()  # the actors' host memory at its peak, read before they are killed
    finally:
        pool.shutdown()
        functions.shutdown()

    metrics = _final_metrics(config, history, eval_before, eval_after, gold is not None)
    from stages.common.gates import verdict
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{algo}-") as tmp:
        out = _local_copy(staging, Path(tmp) / "policy")
        _save_tokenizer(sft_model.path, out)
        reports = Path(tmp) / "reports"  # curves, samples and evaluation: beside the policy, outside its digest
        reports.mkdir()
        report.write_samples(eval_before["rows"], eval_after["rows"], config.samples_shown, reports / "samples.json")
        write_metrics_jsonl(history, reports / "metrics.jsonl")
        report.write_curves(history, reports / "curves.png")
        (reports / "eval.json").write_text(json.dumps({"before": eval_before, "after": eval_after}, indent=1) + "\n")
        artifact = store.publish(
            out,
            reports=reports,
            name=POLICY_NAMES[algo],
            kind="causal-lm",
            stage=algo,
            config=config.to_dict(),
            inputs={"sft_model": sft_model, "prompts": prompts,
                    **({"reward_model": reward_model} if reward_model is not None else {}),
                    **{f"{REWARD_FN_ROLE_PREFIX}{label}": art for label, art in reward_fns.items()}},  # fmt: skip
            metrics=metrics,
            timings={
                "wall_seconds": time.perf_counter() - started,
                "generation_seconds": sum(m["seconds_generation"] for m in history),
                "scoring_seconds": sum(m["seconds_scoring"] for m in history),
                "training_seconds": sum(m["seconds_training"] for m in history),
                # each role's peak RSS (the sum over its actors) and their total, MiB: host memory, not GPU memory
                "peak_rss_mib": _mib({**peak_rss, "total": sum(peak_rss.values())}),
                "placements": placements,  # each role's actors: node id and address, process id
                "resumed_from_iteration": start,  # 0: a fresh start
            },
            cache_key=ctx.cache_key,
            code_fingerprint=code_fingerprint(NAME),
            extra=_lora_record(config, out),
            gate=verdict(algo, config.gate, metrics),  # recorded, so a version that missed its gate is never @latest
        )
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in metrics.items())
    ctx.log(f"{algo}: published {artifact.ref} {shown}")
    return {"policy": artifact}


def _mib(sizes: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 2**20, 1) for k, v in sizes.items()}


def _fresh_staging(work_dir: str) -> str:
    """Where the policy actor writes the final weights: inside this run's work_dir (a shared URI on a cluster)."""
    staging = f"{work_dir.rstrip('/')}/export/policy"
    if "://" in staging:
        import fsspec

        fs, path = fsspec.core.url_to_fs(staging)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed run's leftovers must not mix with these weights
    return staging


def _lora_record(config: RLConfig, out: Path) -> dict:
    """The manifest's record of a LoRA policy (the section, where its adapter is); {} for full fine-tuning."""
    from stages.common.lora import ADAPTER_CONFIG, ADAPTER_DIR

    if config.lora is None:
        return {}
    if not (out / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        raise RuntimeError(f"{out}: the policy trained with LoRA but its {ADAPTER_DIR}/ was not exported")
    return {"lora": config.lora.to_dict(), "adapter": ADAPTER_DIR}


def _local_copy(staging: str, target: Path) -> Path:
    """The staged policy as a local folder to publish from: the folder itself on one node, a download from a URI."""
    if "://" not in staging:
        shutil.copytree(staging, target)
        return target
    import fsspec

    fs, path = fsspec.core.url_to_fs(staging)
    fs.get(f"{path.rstrip('/')}/", f"{target}/", recursive=True)
    return target


def _final_metrics(config: RLConfig, history: list[dict], before: dict, after: dict, has_gold: bool) -> dict:
    """The manifest metrics; gold metrics are None when the prompts are not the demo task's."""
    rollout_seconds = sum(m["seconds_generation"] + m["seconds_scoring"] + m["seconds_training"] for m in history)
    out = {
        "reward_before": before["summary"]["reward_score"],
        "reward_after": after["summary"]["reward_score"],
        "rm_score_before": before["summary"]["rm_score"],
        "rm_score_after": after["summary"]["rm_score"],
        "gold_score_before": before["summary"]["gold_score"],
        "gold_score_after": after["summary"]["gold_score"],
        "gold_win_rate": gold_win_rate(before["rows"], after["rows"]) if has_gold else None,
        "kl": after["summary"]["kl"],
        "iterations": len(history),
        # replies per second of rollout + update (PPO: one per prompt; GRPO/RLOO: group_size per prompt)
        "samples_per_second": len(history) * config.rollout_replies / rollout_seconds if rollout_seconds else 0.0,
    }
    out.update(function_summary_metrics(before["summary"], after["summary"]))
    return out


def function_summary_metrics(before: dict, after: dict) -> dict:
    """The reward functions' held-out results before and after training: each one's pass rate, the share passing
    them all (`function_pass_rate_*`) and its change (`function_gain`, what `gate.min_function_gain` checks)."""
    if "functions" not in after:
        return {}
    out = {}
    for label, stats in after["functions"].items():
        out[f"fn/{label}/pass_before"] = before["functions"][label]["pass_rate"]
        out[f"fn/{label}/pass_after"] = stats["pass_rate"]
        out[f"fn/{label}/mean_after"] = stats["mean"]
    out["function_pass_rate_before"] = before["function_pass_rate"]
    out["function_pass_rate_after"] = after["function_pass_rate"]
    out["function_gain"] = after["function_pass_rate"] - before["function_pass_rate"]
    return out


def _save_tokenizer(model_dir: str, out: Path) -> None:
    """The SFT model's tokenizer, unchanged (right padding, as the other stages expect), beside the policy weights."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
