"""The reward stage on the driver: check inputs, launch the Ray Train workers, publish the `reward-model` artifact.

`prepare` builds the workers' typed loop config (`RewardLoopConfig`); `run` hands it with `train.train_loop` to
`stages.trl.driver.train_and_publish`. On the workers, `train.build_trainer` constructs TRL's `RewardTrainer(...)`.
"""

from __future__ import annotations

import time

from stages.common.context import Scaling, StageContext
from stages.reward.config import Config
from stages.reward.inputs import check_lengths, check_pairs
from stages.reward.train import RewardLoopConfig, train_loop
from stages.trl.driver import build_loop_config, check_kind, load_rows, model_context, token_limit, train_and_publish
from stages.trl.tokens import tokenizer_plan

NAME = "reward"
INPUTS = {"sft_model": "causal-lm", "preferences": "dataset"}
OUTPUTS = ["reward-model"]


def prepare(config: Config, sft_model, preferences, *, scaling: Scaling, seed: int = 0,
            store=None) -> RewardLoopConfig:
    """Every check that can fail on user input, before Ray starts; returns the workers' loop config."""
    from transformers import AutoTokenizer

    check_kind(NAME, "sft_model", sft_model, INPUTS["sft_model"])
    check_kind(NAME, "preferences", preferences, INPUTS["preferences"])
    tokenizer = AutoTokenizer.from_pretrained(sft_model.path)
    context = model_context(sft_model.path, tokenizer, f"{NAME}: sft_model {sft_model.ref}")
    plan = tokenizer_plan(tokenizer)  # pad = eos when there is none: the score is read at the last non-pad token
    splits = {}
    for split in ("train", "test"):
        where = f"{NAME}: preferences {preferences.ref} {split}.jsonl"
        rows = load_rows(preferences, split, f"{NAME}: preferences")
        splits[split] = check_pairs(rows, where, chat_template=plan.chat_template)
    limit = token_limit(config.max_length, context, f"{NAME}: config vs sft_model {sft_model.ref}")
    for split, rows in splits.items():
        check_lengths(rows, tokenizer, limit, f"{NAME}: preferences {preferences.ref} {split}.jsonl")
    return build_loop_config(
        RewardLoopConfig, config, sft_model, splits, stage=NAME, limit=limit, scaling=scaling, seed=seed,
        store=store, tokenizer=plan, demo_task=(preferences.manifest.get("extra") or {}).get("task") == "demo",
        center_rewards_coefficient=config.center_rewards_coefficient, score_batch_size=config.score_batch_size,
    )


def check_data(config: Config, *, scaling: Scaling, sft_model, preferences) -> None:
    """`prepare`'s checks of `preferences` against `sft_model` (rows longer than its context, ...) on data not yet
    published: the flow runs them before the data becomes a dataset version (`stages.data.ingest.ingest`)."""
    prepare(config, sft_model, preferences, scaling=scaling)


def run(config: Config, *, sft_model, preferences, store, ctx: StageContext) -> dict:
    """Train a reward model from `sft_model` on `preferences` pairs on Ray Train workers; publish `reward-model`."""
    started = time.time()
    loop = prepare(config, sft_model, preferences, scaling=ctx.scaling, seed=ctx.seed, store=store)
    artifact = train_and_publish(
        train_loop,
        loop,
        output=OUTPUTS[0],
        kind="reward-model",
        title=f"reward model from {sft_model.ref}",
        started=started,
        config=config,
        inputs={"sft_model": sft_model, "preferences": preferences},
        store=store,
        ctx=ctx,
    )
    return {OUTPUTS[0]: artifact}
