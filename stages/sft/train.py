"""The SFT training loop that runs on every Ray Train worker: TRL's SFTTrainer, then held-out generation metrics.

Checkpoints, resume and the final `final/` + `result.json` checkpoint follow `stages.trl.training`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.hf import model_load_kwargs
from stages.sft.evaluate import demo_metrics
from stages.trl.training import (
    FINAL_DIR,
    RESULT_FILE,
    deepspeed_config,
    load_tokenizer,
    local_model_dir,
    report_result,
    run_on_worker,
    train_and_save,
    trainer_datasets,
    training_args,
)

__all__ = ["FINAL_DIR", "RESULT_FILE", "build_trainer", "deepspeed_config", "train_loop"]


def build_trainer(cfg: dict[str, Any], output_dir: str):
    """TRL's SFTTrainer for the loop config `cfg` (see stage.prepare): completion-only loss; eos appended by TRL to
    plain-text completions, rendered by the chat template for conversational rows."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    # The arguments first: with ZeRO-3 they make from_pretrained load the weights already partitioned.
    args = SFTConfig(
        **training_args(cfg, output_dir),
        max_length=cfg["max_length"],
        completion_only_loss=True,  # labels of prompt tokens are -100 (tested in tests/test_sft.py)
    )
    model_dir = local_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_load_kwargs(cfg["bf16"]))
    # The published config and generation config carry the pad id (pad may be eos: see hf.use_eos_as_pad).
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return SFTTrainer(model=model, args=args, processing_class=tokenizer, **trainer_datasets(cfg))


def train_loop(cfg: dict[str, Any]) -> None:
    """Fine-tune cfg["model_dir"] on cfg["train_rows"] on this worker; rank 0 reports the final model."""
    run_on_worker(cfg, "sft", _train)


def _train(cfg: dict[str, Any], rank: int, scratch: Path) -> None:
    """Train, evaluate, report; every file it writes lives under `scratch` (removed after the upload)."""
    trained = train_and_save(cfg, rank, scratch, stage="sft", build_trainer=build_trainer)
    if trained is None:
        return
    metrics, samples = dict(trained.metrics), []
    if rank == 0 and cfg["demo_task"] and cfg["eval_prompts"]:
        gen_metrics, samples = demo_metrics(
            str(trained.out / FINAL_DIR),
            cfg["eval_prompts"],
            max_new_tokens=cfg["max_new_tokens"],
            batch_size=cfg["generation_batch_size"],
            seed=cfg["seed"],
            use_gpu=cfg["use_gpu"],
        )
        metrics |= gen_metrics
    report_result(trained, rank, metrics, samples)
