"""The eval stage on the driver: check inputs, run the evaluation as one Ray task, score, publish `eval-report`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from stages.common.context import StageContext
from stages.common.fingerprint import code_fingerprint
from stages.common.ray_train import console_log_dir
from stages.common.store import Artifact
from stages.eval import report
from stages.eval.config import Config
from stages.eval.inputs import PreparedInputs, prepare
from stages.eval.worker import SFT, evaluate_models
from stages.reward_functions.artifact import ROLE_PREFIX
from stages.reward_functions.runner import RewardFunctions, weighted_sum

NAME = "eval"
INPUTS = {"sft_model": "causal-lm", "reward_model": "reward-model", "prompts": "dataset"}  # plus `policies`
OUTPUTS = ["eval-report"]


def _source(artifact: Artifact, store) -> dict:
    return {"path": artifact.path, "store_uri": store.root, "ref": artifact.ref}


def _plan(config: Config, prepared: PreparedInputs, *, store, ctx: StageContext, sft_model, reward_model,
          policies: dict[str, Artifact]) -> dict:  # fmt: skip
    """What the evaluation task needs: model sources (never weights), token ids, sampling settings."""
    k = config.samples_per_prompt
    log_dir = console_log_dir(ctx.work_dir)
    return {
        "sft_model": _source(sft_model, store),
        "reward_model": _source(reward_model, store) if reward_model is not None else None,
        "policies": {name: _source(a, store) for name, a in policies.items()},
        "prompt_ids": [ids for ids in prepared.prompt_ids for _ in range(k)],  # sample j of prompt p at p * k + j
        "pad_id": prepared.pad_id,
        "eos_ids": prepared.eos_ids,
        "rm_pad_id": prepared.rm_pad_id,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "batch_size": config.batch_size,
        "seed": ctx.seed + config.seed_offset,
        "use_gpu": ctx.scaling.use_gpu,
        "cpus": config.cpus,
        "log_file": f"{log_dir}/eval.log" if log_dir else None,  # the task's own output (HF), unless --verbose
    }


def _function_scores(config: Config, prepared: PreparedInputs, prompts: list, replies: dict[str, list[str]], k: int,
                     ctx: StageContext) -> dict[str, dict[str, list]]:  # fmt: skip
    """{model: {label: scores}} from the run's reward functions, each in its own CPU actor (never on the driver)."""
    if not prepared.functions:
        return {}
    columns = {c: [v for v in values for _ in range(k)] for c, values in prepared.columns.items()}
    functions = RewardFunctions(prepared.functions, timeout_s=config.reward_timeout_s, cpus=config.reward_cpus,
                                log=ctx.log)  # fmt: skip
    try:
        pending = {m: functions.submit(prompts, texts, [[] for _ in texts], columns, -1) for m, texts in replies.items()}
        return {m: functions.collect(p, len(replies[m])) for m, p in pending.items()}
    finally:
        functions.shutdown()


def run(config: Config, *, store, ctx: StageContext, sft_model: Artifact, prompts: Artifact,
        policies: dict[str, Artifact], reward_model: Artifact | None = None, reward_fns=None) -> dict:  # fmt: skip
    """Score the SFT model and every policy on the same held-out prompts; returns {"eval-report": Artifact}.

    `policies` maps a row name (ppo, grpo, dpo, or an artifact name) to a causal-lm artifact; the SFT model is
    always the first row and the baseline of the win rates and the KL. `reward_fns` ({label: reward-fn artifact},
    the run's functions as `config.reward_functions` lists them) score every model's replies too; the win rates are
    then judged by their weighted sum.
    """
    import ray
    from transformers import AutoTokenizer

    from stages.common.ray_train import ensure_ray

    started = time.perf_counter()
    reward_fns = dict(reward_fns or {})
    prepared = prepare(config, sft_model=sft_model, reward_model=reward_model, prompts=prompts, policies=policies,
                       reward_fns=reward_fns)  # fmt: skip
    plan = _plan(config, prepared, store=store, ctx=ctx, sft_model=sft_model, reward_model=reward_model,
                 policies=policies)  # fmt: skip
    ctx.log(f"eval: {1 + len(policies)} models ({SFT}, {', '.join(policies) or 'no policies'}) on "
            f"{len(prepared.prompt_ids)} held-out prompts x {config.samples_per_prompt} samples")  # fmt: skip

    ensure_ray()
    gpus = config.gpus if ctx.scaling.use_gpu else 0
    # DEFAULT: never inside the caller's placement group (a sweep trial's Tune actor would capture the task in its own)
    task = ray.remote(num_cpus=config.cpus, num_gpus=gpus, max_retries=0, scheduling_strategy="DEFAULT")(evaluate_models)
    t0 = time.perf_counter()
    results = ray.get(task.remote(plan))
    evaluation_seconds = time.perf_counter() - t0

    tokenizer = AutoTokenizer.from_pretrained(sft_model.path)
    k = config.samples_per_prompt
    reply_prompts = [p for p in prepared.prompt_texts for _ in range(k)]
    replies = {
        m: [tokenizer.decode(ids, skip_special_tokens=True) for ids in r["reply_ids"]] for m, r in results.items()
    }
    gold = formats = None
    if prepared.task is not None:  # a built-in task (demo, arithmetic): its gold scorer and format check
        gold_score, follows_format = prepared.task.gold_score, prepared.task.follows_format
        gold = {
            m: [gold_score(p, t) for p, t in zip(reply_prompts, texts, strict=True)] for m, texts in replies.items()
        }
        formats = {m: [follows_format(p, t) for p, t in zip(reply_prompts, texts, strict=True)]
                   for m, texts in replies.items()}  # fmt: skip
    scored = _function_scores(config, prepared, reply_prompts, replies, k, ctx)
    if scored:  # the run's own verifiers rank the models when it has them
        n = len(reply_prompts)
        judged, judged_by = {m: weighted_sum(s, config.reward_functions, n) for m, s in scored.items()}, "functions"
    elif gold is not None:
        judged, judged_by = gold, "gold"
    elif reward_model is not None:
        judged, judged_by = {m: r["rm_score"] for m, r in results.items()}, "reward_model"
    else:
        judged, judged_by = {m: [0.0] * len(replies[m]) for m in results}, "nothing"
    matrix, vs_sft = report.win_rates(judged, SFT)
    thresholds = {f.label: f.pass_threshold for f in config.reward_functions}
    summaries = {
        m: {**report.model_summary(r, gold[m] if gold else None, formats[m] if formats else None),
            **(report.function_summary(scored[m], thresholds) if scored else {}),
            "win_rate_vs_sft": vs_sft[m]}
        for m, r in results.items()
    }  # fmt: skip
    document = {
        "models": {SFT: sft_model.ref, **{m: a.ref for m, a in policies.items()}},
        "reward_model": reward_model.ref if reward_model is not None else None,
        "reward_functions": {f.spec.label: f.ref for f in prepared.functions},
        "prompts": len(prepared.prompt_texts),
        "prompts_ref": prompts.ref,
        "settings": {**config.to_dict(), "seed": plan["seed"], "use_gpu": ctx.scaling.use_gpu},
        "summaries": summaries,
        "win_rates": {"by": judged_by, "matrix": matrix},
        "samples": report.side_by_side(prepared.prompt_texts, replies, judged, config.samples_shown, k),
        "replies": {
            m: report.reply_rows(reply_prompts, replies[m], r, gold[m] if gold else None) for m, r in results.items()
        },
    }  # fmt: skip
    inputs = {"sft_model": sft_model, "prompts": prompts, **{ROLE_PREFIX + k: a for k, a in reward_fns.items()}}
    if reward_model is not None:
        inputs["reward_model"] = reward_model
    inputs.update({f"policy.{m}": a for m, a in policies.items()})
    with tempfile.TemporaryDirectory(prefix="rlhf-eval-") as tmp:
        report.write_files(document, Path(tmp))
        artifact = store.publish(
            tmp,
            name=OUTPUTS[0],
            kind="eval-report",
            stage=NAME,
            config=config.to_dict(),
            inputs=inputs,
            metrics=report.flat_metrics(summaries),
            timings={"wall_seconds": time.perf_counter() - started, "evaluation_seconds": evaluation_seconds},
            cache_key=ctx.cache_key,
            code_fingerprint=code_fingerprint(NAME),
        )
    ctx.log(f"eval: published {artifact.ref}: {report.headline(summaries)}")
    return {OUTPUTS[0]: artifact}
