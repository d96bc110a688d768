"""The reward-model training loop that runs on every Ray Train worker: TRL's RewardTrainer, then pair scoring.

The model is the SFT model loaded as `AutoModelForSequenceClassification` with one output: the transformer is kept,
the LM head is dropped (tied or not, transformers only reports it as unused) and a fresh `score` head reads the last
non-pad token. Works for every architecture transformers has a sequence-classification class for (GPT-2, GPT-NeoX,
Llama, Qwen2, ...). The loss is Bradley-Terry,
-log sigmoid(r_chosen - r_rejected). Checkpoints, resume and the final `final/` + `result.json` checkpoint follow
`stages.trl.training`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.hf import model_load_kwargs
from stages.reward.evaluate import evaluate_pairs
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

__all__ = ["FINAL_DIR", "RESULT_FILE", "build_trainer", "deepspeed_config", "load_reward_model", "train_loop"]


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


def build_trainer(cfg: dict[str, Any], output_dir: str):
    """TRL's RewardTrainer for the loop config `cfg` (see stage.prepare); TRL appends eos to both replies."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    # The arguments first: with ZeRO-3 they make from_pretrained load the weights already partitioned.
    args = RewardConfig(
        **training_args(cfg, output_dir),
        center_rewards_coefficient=cfg["center_rewards_coefficient"],
        max_length=cfg["max_length"],  # the stage already rejected longer pairs, so TRL's filter drops none
    )
    set_seed(cfg["seed"])  # the new score head starts from the same random weights on every rank and every rerun
    model, tokenizer = load_reward_model(local_model_dir(cfg), bf16=cfg["bf16"])
    return RewardTrainer(model=model, args=args, processing_class=tokenizer, **trainer_datasets(cfg))


def train_loop(cfg: dict[str, Any]) -> None:
    """Train the reward model on cfg["train_rows"] on this worker; rank 0 reports the final model and metrics."""
    run_on_worker(cfg, "reward", _train)


def _train(cfg: dict[str, Any], rank: int, scratch: Path) -> None:
    """Train, evaluate, report; every file it writes lives under `scratch` (removed after the upload)."""
    trained = train_and_save(cfg, rank, scratch, stage="reward", build_trainer=build_trainer, log_keys=("accuracy",))
    if trained is None:
        return
    metrics, samples = dict(trained.metrics), []
    if rank == 0:
        pair_metrics, samples = evaluate_pairs(
            str(trained.out / FINAL_DIR),
            cfg["test_rows"],
            demo_task=cfg["demo_task"],
            batch_size=cfg["score_batch_size"],
            use_gpu=cfg["use_gpu"],
        )
        metrics |= pair_metrics
    report_result(trained, rank, metrics, samples)
