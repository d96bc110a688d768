"""The reward-model training loop that runs on every Ray Train worker: TRL's RewardTrainer, then pair scoring.

The model is the SFT model loaded as `AutoModelForSequenceClassification` with one output: the transformer is kept,
the LM head is dropped (tied or not, transformers only reports it as unused) and a fresh `score` head reads the last
non-pad token. Works for every architecture transformers has a sequence-classification class for (GPT-2, GPT-NeoX,
Llama, Qwen2, ...). The loss is Bradley-Terry,
-log sigmoid(r_chosen - r_rejected).

`stage.py` (the driver) builds a `RewardLoopConfig` and hands `train_loop` to Ray Train; `build_trainer` below is
the one place the RewardTrainer is constructed, and `load_reward_model` the one place the model is loaded.
Checkpoints, resume and the final `final/` + `result.json` checkpoint follow `stages.trl.worker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.hf import model_load_kwargs
from stages.reward.evaluate import evaluate_pairs
from stages.trl.loop_config import FINAL_DIR, TrainLoopConfig
from stages.trl.tokens import load_tokenizer
from stages.trl.worker import (
    local_model_dir,
    peft_config,
    report_result,
    run_on_worker,
    train_and_save,
    trainer_datasets,
    training_args,
)

__all__ = ["RewardLoopConfig", "build_trainer", "load_reward_model", "train_loop"]


@dataclass(frozen=True, kw_only=True)
class RewardLoopConfig(TrainLoopConfig):
    """What the reward workers get beyond the shared fields."""

    center_rewards_coefficient: float | None  # RewardConfig's pull of the mean reward towards 0; None = off
    score_batch_size: int  # sequences per forward pass when scoring the held-out pairs


def load_reward_model(model_dir: str, bf16: bool = False):
    """The causal LM in `model_dir` as a sequence classifier with one output; pad id set for the last-token read
    (pad = eos when the tokenizer has none), so the published config carries it."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    tokenizer = load_tokenizer(model_dir)
    with suppress_seqcls_warning():  # the new `score` head and the unused LM head are expected, not news
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **model_load_kwargs(bf16))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_trainer(cfg: RewardLoopConfig, output_dir: str):
    """TRL's RewardTrainer for the loop config `cfg` (see stage.prepare); TRL appends eos to both replies."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    # The arguments first: with ZeRO-3 they make from_pretrained load the weights already partitioned.
    args = RewardConfig(
        **training_args(cfg, output_dir),
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        max_length=cfg.max_length,  # the stage already rejected longer pairs, so TRL's filter drops none
    )
    set_seed(cfg.seed)  # the new score head starts from the same random weights on every rank and every rerun
    model, tokenizer = load_reward_model(local_model_dir(cfg), bf16=cfg.bf16_weights)
    return RewardTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        peft_config=peft_config(cfg, "SEQ_CLS"),
        **trainer_datasets(cfg),
    )


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry: train the reward model on the loop config's train rows on this worker; rank 0 reports the
    final model and metrics."""
    run_on_worker(config, _train)


def _train(cfg: RewardLoopConfig, rank: int, scratch: Path) -> None:
    """Train, evaluate, report; every file it writes lives under `scratch` (removed after the upload)."""
    trained = train_and_save(cfg, rank, scratch, build_trainer=build_trainer, log_keys=("accuracy",))
    if trained is None:
        return
    metrics, samples = dict(trained.metrics), []
    if rank == 0:
        pair_metrics, samples = evaluate_pairs(
            str(trained.out / FINAL_DIR),
            list(cfg.test_rows),
            demo_task=cfg.demo_task,
            batch_size=cfg.score_batch_size,
            use_gpu=cfg.use_gpu,
        )
        metrics |= pair_metrics
    report_result(trained, rank, metrics, samples)
