"""The reward stage on the driver: check inputs, launch the Ray Train workers, publish the `reward-model` artifact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from stages.common import ray_train
from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.fingerprint import code_fingerprint
from stages.reward.config import Config
from stages.reward.inputs import check_lengths, check_pairs, load_rows, model_context, per_worker_batch, token_limit
from stages.reward.report import plot_loss_curve, write_metrics_jsonl
from stages.reward.train import FINAL_DIR, RESULT_FILE, deepspeed_config, train_loop

NAME = "reward"
INPUTS = {"sft_model": "causal-lm", "preferences": "dataset"}
OUTPUTS = ["reward-model"]


def _check_kind(role: str, artifact, expected: str) -> None:
    if artifact.kind != expected:
        raise StageInputError(
            f"{NAME}: input {role} = {artifact.ref}: expected kind {expected!r}, found {artifact.kind!r}"
        )


def prepare(config: Config, sft_model, preferences, *, scaling: Scaling, seed: int = 0, store=None) -> dict:
    """Every check that can fail on user input, before Ray starts; returns the workers' loop config."""
    from transformers import AutoTokenizer

    _check_kind("sft_model", sft_model, INPUTS["sft_model"])
    _check_kind("preferences", preferences, INPUTS["preferences"])
    splits = {}
    for split in ("train", "test"):
        where = f"{NAME}: preferences {preferences.ref} {split}.jsonl"
        splits[split] = check_pairs(load_rows(preferences, split, f"{NAME}: preferences"), where)
    tokenizer = AutoTokenizer.from_pretrained(sft_model.path)
    context = model_context(sft_model.path, tokenizer, f"{NAME}: sft_model {sft_model.ref}")
    limit = token_limit(config.max_length, context, f"{NAME}: config vs sft_model {sft_model.ref}")
    for split, rows in splits.items():
        check_lengths(rows, tokenizer, limit, f"{NAME}: preferences {preferences.ref} {split}.jsonl")
    return {
        "model_dir": sft_model.path,
        "model_digest": sft_model.digest,
        "store_root": store.root if store is not None else None,
        "train_rows": splits["train"],
        "test_rows": splits["test"],
        "demo_task": (preferences.manifest.get("extra") or {}).get("task") == "demo",
        "max_length": limit,
        "per_worker_batch": per_worker_batch(config.batch_size, scaling.num_workers, f"{NAME}: config"),
        "max_steps": config.max_steps,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "center_rewards_coefficient": config.center_rewards_coefficient,
        "save_steps": config.save_steps,
        "logging_steps": config.logging_steps,
        "score_batch_size": config.score_batch_size,
        "bf16": config.bf16,
        "deepspeed": deepspeed_config(config.zero_stage, config.bf16),
        "seed": seed,
        "use_gpu": scaling.use_gpu,
        "cpus_per_worker": scaling.cpus_per_worker,
    }


def run(config: Config, *, sft_model, preferences, store, ctx: StageContext) -> dict:
    """Train a reward model from `sft_model` on `preferences` pairs on Ray Train workers; publish `reward-model`."""
    started = time.time()
    loop_config = prepare(config, sft_model, preferences, scaling=ctx.scaling, seed=ctx.seed, store=store)
    ctx.log(
        f"{NAME}: {len(loop_config['train_rows'])} train / {len(loop_config['test_rows'])} test rows, "
        f"{config.max_steps} steps on {ctx.scaling.num_workers} workers"
    )
    # Ray Train's print patch breaks `datasets` inside workers (dill captures stdout to hash map functions, and the
    # patched print sends that capture to the logs as pages of bytecode). The env var reaches the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    result = ray_train.fit(train_loop, loop_config, ctx=ctx, run_name=NAME)
    with tempfile.TemporaryDirectory(prefix="rlhf-reward-out-") as out, result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / FINAL_DIR, out, dirs_exist_ok=True)
        outcome = json.loads((Path(ckpt) / RESULT_FILE).read_text())
        write_metrics_jsonl(outcome["log_history"], Path(out) / "metrics.jsonl")
        plot_loss_curve(outcome["log_history"], Path(out) / "loss_curve.png", f"reward model from {sft_model.ref}")
        if outcome["samples"]:
            (Path(out) / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in outcome["samples"]))
        metrics = dict(outcome["metrics"])
        first_step = outcome.get("first_step_at")
        timings = {"startup_seconds": round(first_step - started, 2)} if first_step else {}
        metrics["wall_seconds"] = round(time.time() - started, 2)
        timings["wall_seconds"] = metrics["wall_seconds"]
        artifact = store.publish(
            out,
            name=OUTPUTS[0],
            kind="reward-model",
            stage=NAME,
            config=config.to_dict(),
            inputs={"sft_model": sft_model, "preferences": preferences},
            metrics=metrics,
            timings=timings,
            cache_key=ctx.cache_key,
            code_fingerprint=code_fingerprint(NAME),
            extra={
                "max_length": loop_config["max_length"],
                "long_rows": "rejected",
                "rows": {"train": len(loop_config["train_rows"]), "test": len(loop_config["test_rows"])},
            },
        )
    ctx.log(f"{NAME}: published {artifact.ref} " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return {OUTPUTS[0]: artifact}
