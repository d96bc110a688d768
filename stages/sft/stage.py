"""The SFT stage on the driver: check inputs, launch the Ray Train workers, publish the `sft-model` artifact."""

from __future__ import annotations

import time

from stages.common.context import Scaling, StageContext
from stages.sft.config import Config
from stages.sft.inputs import check_lengths, to_prompt_completion
from stages.sft.train import train_loop
from stages.trl import training as trl_training
from stages.trl.training import check_kind, load_rows, model_context, token_limit, tokenizer_plan

NAME = "sft"
INPUTS = {"base_model": "causal-lm", "data": "dataset"}
OUTPUTS = ["sft-model"]


def prepare(config: Config, base_model, data, *, scaling: Scaling, seed: int = 0, store=None) -> dict:
    """Every check that can fail on user input, before Ray starts; returns the workers' loop config."""
    from transformers import AutoTokenizer

    check_kind(NAME, "base_model", base_model, INPUTS["base_model"])
    check_kind(NAME, "data", data, INPUTS["data"])
    tokenizer = AutoTokenizer.from_pretrained(base_model.path)
    context = model_context(base_model.path, tokenizer, f"{NAME}: base_model {base_model.ref}")
    plan = tokenizer_plan(tokenizer)
    splits = {
        split: to_prompt_completion(
            load_rows(data, split, f"{NAME}: data"),
            f"{NAME}: data {data.ref} {split}.jsonl",
            chat_template=plan["chat_template"],
        )
        for split in ("train", "test")
    }
    limit = token_limit(config.max_length, context, f"{NAME}: config vs base_model {base_model.ref}")
    for split, rows in splits.items():
        check_lengths(rows, tokenizer, limit, f"{NAME}: data {data.ref} {split}.jsonl")
    demo_task = (data.manifest.get("extra") or {}).get("task") == "demo"
    return {
        **trl_training.loop_config(
            config, base_model, splits, stage=NAME, limit=limit, scaling=scaling, seed=seed, store=store,
            tokenizer=plan,
        ),
        "eval_prompts": [r["prompt"] for r in splits["test"]][: config.eval_prompts] if demo_task else [],
        "demo_task": demo_task,
        "max_new_tokens": config.max_new_tokens,
        "generation_batch_size": config.generation_batch_size,
    }



def check_data(config: Config, *, scaling: Scaling, base_model, data) -> None:
    """`prepare`'s checks of `data` against `base_model` (rows longer than its context, ...) on data not yet
    published: the flow runs them before the data becomes a dataset version (`stages.data.ingest.ingest`)."""
    prepare(config, base_model, data, scaling=scaling)

def run(config: Config, *, base_model, data, store, ctx: StageContext) -> dict:
    """Fine-tune `base_model` on `data` (loss on completions only) on Ray Train workers; publish `sft-model`."""
    started = time.time()
    loop_config = prepare(config, base_model, data, scaling=ctx.scaling, seed=ctx.seed, store=store)
    artifact = trl_training.train_and_publish(
        train_loop,
        loop_config,
        stage=NAME,
        output=OUTPUTS[0],
        kind="causal-lm",
        title=f"SFT of {base_model.ref}",
        started=started,
        config=config,
        inputs={"base_model": base_model, "data": data},
        store=store,
        ctx=ctx,
    )
    return {OUTPUTS[0]: artifact}
