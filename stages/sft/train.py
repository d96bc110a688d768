"""The SFT training loop that runs on every Ray Train worker: TRL's SFTTrainer, then held-out generation metrics.

`stage.py` (the driver) builds an `SFTLoopConfig` and hands `train_loop` to Ray Train; `build_trainer` below is the
one place the SFTTrainer is constructed, and `load_causal_lm` (stages/trl/worker.py) the one place the model is
loaded. Checkpoints, resume and the final `final/` + `result.json` checkpoint follow `stages.trl.worker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.sft.packing import check_packed_attention
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

__all__ = ["SFTLoopConfig", "build_trainer", "train_loop"]


@dataclass(frozen=True, kw_only=True)
class SFTLoopConfig(TrainLoopConfig):
    """What the SFT workers get beyond the shared fields: the held-out demo evaluation."""

    demo_eval: DemoEval
    packing: bool = False  # sft.packing: TRL's "bfd" packing, padding-free (see stages/sft/packing.py)


def build_trainer(cfg: SFTLoopConfig, output_dir: str):
    """TRL's SFTTrainer for the loop config `cfg` (see stage.prepare): completion-only loss; eos appended by TRL to
    plain-text completions, rendered by the chat template for conversational rows."""
    from trl import SFTConfig, SFTTrainer

    # The arguments first: with ZeRO-3 they make from_pretrained load the weights already partitioned.
    args = SFTConfig(
        **training_args(cfg, output_dir),
        max_length=cfg.max_length,
        completion_only_loss=True,  # labels of prompt tokens are -100 (tested in tests/trl/test_sft.py)
        packing=cfg.packing,  # strategy "bfd" (TRL's default) turns padding_free on (tests/trl/test_sft_packing.py)
    )
    model, tokenizer = load_causal_lm(cfg)
    if cfg.packing and not _zero3(cfg):  # the model as loaded keeps packed sequences apart, or this is refused
        check_packed_attention(model, f"{cfg.stage}: model {cfg.model_dir}")
    return SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        peft_config=peft_config(cfg, "CAUSAL_LM"),
        **trainer_datasets(cfg),
    )


def _zero3(cfg: SFTLoopConfig) -> bool:
    return bool(cfg.deepspeed) and (cfg.deepspeed.get("zero_optimization") or {}).get("stage") == 3


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry: fine-tune the input model on the loop config's train rows on this worker; rank 0 reports
    the final model."""
    run_on_worker(config, _train)


def _train(cfg: SFTLoopConfig, rank: int, scratch: Path) -> None:
    """Train, evaluate, report; every file it writes lives under `scratch` (removed after the upload)."""
    trained = train_and_save(cfg, rank, scratch, build_trainer=build_trainer)
    if trained is None:
        return
    metrics, samples = dict(trained.metrics), []
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
