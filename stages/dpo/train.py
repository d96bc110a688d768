"""The DPO training loop that runs on every Ray Train worker: TRL's DPOTrainer, then held-out generation metrics.

The policy starts as the SFT model; the reference is a frozen copy of it that TRL loads from the same directory when
`ref_model=None` (under DeepSpeed TRL wraps it in an inference engine, sharded like the policy under ZeRO-3 and
whole on each rank otherwise). The loss is TRL's, `-log sigmoid(beta * margin)` for the default "sigmoid" type, on
the summed log-probabilities of the reply tokens.

`stage.py` (the driver) builds a `DPOLoopConfig` and hands `train_loop` to Ray Train; `build_trainer` below is the
one place the DPOTrainer is constructed, and `load_causal_lm` (stages/trl/worker.py) the one place the policy is
loaded. Checkpoints, resume and the final `final/` + `result.json` checkpoint follow `stages.trl.worker`; a resumed
run reloads the reference from the SFT model again, so it stays the model DPO started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.dpo.metrics import implicit_reward_metrics
from stages.trl.demo_eval import DemoEval, demo_metrics
from stages.trl.loop_config import FINAL_DIR, TrainLoopConfig
from stages.trl.worker import (
    load_causal_lm,
    peft_config,
    report_result,
    run_on_worker,
    train_and_save,
    trainer_datasets,
    training_args,
)

__all__ = ["DPOLoopConfig", "build_trainer", "train_loop"]


@dataclass(frozen=True, kw_only=True)
class DPOLoopConfig(TrainLoopConfig):
    """What the DPO workers get beyond the shared fields: the loss and the held-out demo evaluation."""

    beta: float  # strength of the pull towards the reference (SFT) model
    loss_type: str  # TRL's DPO loss (stages.dpo.config.LossType)
    demo_eval: DemoEval


def build_trainer(cfg: DPOLoopConfig, output_dir: str):
    """TRL's DPOTrainer for the loop config `cfg` (see stage.prepare); TRL appends eos to plain-text replies."""
    from trl import DPOConfig, DPOTrainer

    if cfg.deepspeed is not None:
        _join_deepspeed_comm()
    model, tokenizer = load_causal_lm(cfg)
    args = DPOConfig(
        **training_args(cfg, output_dir),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=cfg.max_length,  # the stage already rejected longer pairs, so TRL truncates and drops none
        precompute_ref_log_probs=False,  # the frozen reference runs beside the policy (tiny here; sharded by ZeRO-3)
    )
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        processing_class=tokenizer,
        peft_config=peft_config(cfg, "CAUSAL_LM"),
        **trainer_datasets(cfg),
    )


def _join_deepspeed_comm() -> None:
    """Under ZeRO-3 TRL loads the reference model inside `deepspeed.zero.Init`, whose config counts the ranks through
    deepspeed.comm; before the Trainer starts DeepSpeed that is uninitialised, so it counts one rank and rejects the
    batch sizes. Ray Train has already set up torch.distributed: wrap that group (same backend, nothing new)."""
    import deepspeed
    import torch.distributed as dist

    from stages.common.deepspeed_config import forbid_cpu_shm_build

    forbid_cpu_shm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry: train the policy on the loop config's train rows on this worker; rank 0 reports the final
    model and metrics."""
    run_on_worker(config, _train)


def _train(cfg: DPOLoopConfig, rank: int, scratch: Path) -> None:
    """Train, evaluate, report; every file it writes lives under `scratch` (removed after the upload)."""
    trained = train_and_save(
        cfg, rank, scratch, build_trainer=build_trainer, log_keys=("rewards/accuracies", "rewards/margins")
    )
    if trained is None:
        return
    metrics, samples = dict(trained.metrics), []
    metrics |= implicit_reward_metrics(trained.trainer.state.log_history)  # from trainer.evaluate() in train_and_save
    if rank == 0 and cfg.demo_task and cfg.demo_eval.prompts:
        gen_metrics, samples = demo_metrics(
            str(trained.out / FINAL_DIR),
            list(cfg.demo_eval.prompts),
            max_new_tokens=cfg.demo_eval.max_new_tokens,
            batch_size=cfg.demo_eval.batch_size,
            seed=cfg.seed,
            use_gpu=cfg.use_gpu,
        )
        metrics |= gen_metrics
    report_result(trained, rank, metrics, samples)
