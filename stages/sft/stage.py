"""The SFT stage on the driver: check inputs, launch the Ray Train workers, publish the `sft-model` artifact.

`prepare` builds the workers' typed loop config (`SFTLoopConfig`); `run` hands it with `train.train_loop` to
`stages.trl.driver.train_and_publish`. On the workers, `train.build_trainer` constructs TRL's `SFTTrainer(...)`.
"""

from __future__ import annotations

import time

from stages.common.context import Scaling, StageContext
from stages.common.hf import model_load_kwargs
from stages.sft.config import Config
from stages.sft.inputs import check_lengths, to_prompt_completion
from stages.sft.packing import preflight as packing_preflight
from stages.sft.train import SFTLoopConfig, train_loop
from stages.trl.demo_eval import DemoEval
from stages.trl.driver import build_loop_config, check_kind, load_rows, model_context, token_limit, train_and_publish
from stages.trl.tokens import tokenizer_plan

NAME = "sft"
INPUTS = {"base_model": "causal-lm", "data": "dataset"}
OUTPUTS = ["sft-model"]


def prepare(config: Config, base_model, data, *, scaling: Scaling, seed: int = 0, store=None) -> SFTLoopConfig:
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
            chat_template=plan.chat_template,
        )
        for split in ("train", "test")
    }
    limit = token_limit(config.max_length, context, f"{NAME}: config vs base_model {base_model.ref}")
    if config.packing:
        packing_preflight(base_model.path, model_load_kwargs(config.bf16)["attn_implementation"],
                          f"{NAME}: base_model {base_model.ref}")  # fmt: skip
    for split, rows in splits.items():
        check_lengths(rows, tokenizer, limit, f"{NAME}: data {data.ref} {split}.jsonl")
    demo_task = (data.manifest.get("extra") or {}).get("task") == "demo"
    demo_eval = DemoEval(
        prompts=tuple(r["prompt"] for r in splits["test"][: config.eval_prompts]) if demo_task else (),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
    )
    return build_loop_config(
        SFTLoopConfig, config, base_model, splits, stage=NAME, limit=limit, scaling=scaling, seed=seed, store=store,
        tokenizer=plan, demo_task=demo_task, demo_eval=demo_eval, packing=config.packing,
    )


def check_data(config: Config, *, scaling: Scaling, base_model, data) -> None:
    """`prepare`'s checks of `data` against `base_model` (rows longer than its context, ...) on data not yet
    published: the flow runs them before the data becomes a dataset version (`stages.data.ingest.ingest`)."""
    prepare(config, base_model, data, scaling=scaling)


def run(config: Config, *, base_model, data, store, ctx: StageContext) -> dict:
    """Fine-tune `base_model` on `data` (loss on completions only) on Ray Train workers; publish `sft-model`."""
    started = time.time()
    loop = prepare(config, base_model, data, scaling=ctx.scaling, seed=ctx.seed, store=store)
    artifact = train_and_publish(
        train_loop,
        loop,
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
