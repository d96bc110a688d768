"""The DPO stage on the driver: check inputs, launch the Ray Train workers, publish the `policy-dpo` artifact.

`prepare` builds the workers' typed loop config (`DPOLoopConfig`); `run` hands it with `train.train_loop` to
`stages.trl.driver.train_and_publish`. On the workers, `train.build_trainer` constructs TRL's `DPOTrainer(...)`.
"""

from __future__ import annotations

import time

from stages.common.context import Scaling, StageContext
from stages.dpo.config import Config
from stages.dpo.metrics import demo_eval_prompts
from stages.dpo.train import DPOLoopConfig, train_loop
from stages.trl.demo_eval import DemoEval
from stages.trl.driver import build_loop_config, check_kind, load_rows, model_context, token_limit, train_and_publish
from stages.trl.preference_pairs import check_lengths, check_pairs
from stages.trl.tokens import tokenizer_plan

NAME = "dpo"
INPUTS = {"sft_model": "causal-lm", "preferences": "dataset"}
OUTPUTS = ["policy-dpo"]


def prepare(config: Config, sft_model, preferences, *, scaling: Scaling, seed: int = 0, store=None) -> DPOLoopConfig:
    """Every check that can fail on user input, before Ray starts; returns the workers' loop config."""
    from transformers import AutoTokenizer

    check_kind(NAME, "sft_model", sft_model, INPUTS["sft_model"])
    check_kind(NAME, "preferences", preferences, INPUTS["preferences"])
    tokenizer = AutoTokenizer.from_pretrained(sft_model.path)
    context = model_context(sft_model.path, tokenizer, f"{NAME}: sft_model {sft_model.ref}")
    plan = tokenizer_plan(tokenizer)  # pad = eos when there is none: TRL pads the pairs with it
    splits = {}
    for split in ("train", "test"):
        rows = load_rows(preferences, split, f"{NAME}: preferences")
        where = f"{NAME}: preferences {preferences.ref} {split}.jsonl"
        splits[split] = check_pairs(rows, where, chat_template=plan.chat_template)
    limit = token_limit(config.max_length, context, f"{NAME}: config vs sft_model {sft_model.ref}")
    for split, rows in splits.items():
        check_lengths(rows, tokenizer, limit, f"{NAME}: preferences {preferences.ref} {split}.jsonl")
    demo_task = (preferences.manifest.get("extra") or {}).get("task") == "demo"
    demo_eval = DemoEval(
        prompts=tuple(demo_eval_prompts(splits["test"], config.eval_prompts)) if demo_task else (),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
    )
    return build_loop_config(
        DPOLoopConfig, config, sft_model, splits, stage=NAME, limit=limit, scaling=scaling, seed=seed, store=store,
        tokenizer=plan, demo_task=demo_task, beta=config.beta, loss_type=config.loss_type, demo_eval=demo_eval,
    )


def check_data(config: Config, *, scaling: Scaling, sft_model, preferences) -> None:
    """`prepare`'s checks of `preferences` against `sft_model` (rows longer than its context, ...) on data not yet
    published: the flow runs them before the data becomes a dataset version (`stages.data.ingest.ingest`)."""
    prepare(config, sft_model, preferences, scaling=scaling)


def run(config: Config, *, sft_model, preferences, store, ctx: StageContext) -> dict:
    """Align `sft_model` to `preferences` pairs with DPO (reference = frozen `sft_model`) on Ray Train workers;
    publish `policy-dpo`."""
    started = time.time()
    loop = prepare(config, sft_model, preferences, scaling=ctx.scaling, seed=ctx.seed, store=store)
    artifact = train_and_publish(
        train_loop,
        loop,
        output=OUTPUTS[0],
        kind="causal-lm",
        title=f"DPO of {sft_model.ref}",
        started=started,
        config=config,
        inputs={"sft_model": sft_model, "preferences": preferences},
        store=store,
        ctx=ctx,
    )
    return {OUTPUTS[0]: artifact}
