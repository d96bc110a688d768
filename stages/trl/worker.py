"""The worker half of a TRL stage (sft, reward, dpo): what runs inside each Ray Train worker.

A stage's `train.py` holds its `train_loop` (the Ray Train entry, `run_on_worker(config, _train)`), its
`build_trainer(cfg, output_dir)` (the one place its TRL trainer is constructed) and its `_train`, which calls
`train_and_save` (resume, train, evaluate, save `final/`) and then `report_result` (rank 0 writes `result.json` and
reports the last checkpoint). Here: `load_causal_lm` (the input model as SFT and DPO train it), `training_args` (the
TrainingArguments every stage sets the same way), `trainer_datasets`, the progress callback and the resume logic.
`cfg` is always the stage's frozen `TrainLoopConfig` (see `stages.trl.loop_config`), read by attribute.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import ray_train
from stages.common.errors import check_finite_loss
from stages.common.hf import model_load_kwargs
from stages.trl.loop_config import FINAL_DIR, HF_CHECKPOINT_DIR, RESULT_FILE, TrainLoopConfig, from_ray
from stages.trl.tokens import load_tokenizer


def local_model_dir(cfg: TrainLoopConfig) -> str:
    """The input model's directory on this node: the driver's path when it is visible here (one node, shared disk),
    else fetched and verified from the artifact store (multi-node clusters with an s3:// or gs:// store)."""
    if Path(cfg.model_dir).is_dir() or not cfg.store_root:
        return cfg.model_dir
    from stages.common.store import ArtifactStore

    return ArtifactStore(cfg.store_root).get(cfg.model_digest).path


def load_causal_lm(cfg: TrainLoopConfig):
    """(model, tokenizer): the input causal LM on this worker as SFT and DPO train it. The published config and
    generation config carry the pad id (pad may be eos: see hf.use_eos_as_pad)."""
    from transformers import AutoModelForCausalLM

    model_dir = local_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_load_kwargs(cfg.bf16_weights))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def peft_config(cfg: TrainLoopConfig, task_type: str):
    """The trainer's `peft_config` (None = full fine-tuning). For a reward model (SEQ_CLS) peft trains the fresh
    score head in full beside the adapters (its modules_to_save), as a random head must be learnt whole."""
    if cfg.lora is None:
        return None
    from stages.common.lora import peft_config as lora_peft_config

    return lora_peft_config(cfg.lora, task_type=task_type)


def training_args(cfg: TrainLoopConfig, output_dir: str) -> dict[str, Any]:
    """Keyword arguments of SFTConfig / RewardConfig / DPOConfig that every stage sets the same way."""
    if cfg.logging_dir:  # transformers 5 reads TensorBoard's folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = cfg.logging_dir
    return dict(
        output_dir=output_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_worker_batch,
        per_device_eval_batch_size=cfg.per_worker_batch,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        activation_checkpointing=cfg.activation_checkpointing,  # off unless asked: TRL's default is on
        bf16=cfg.bf16,
        use_cpu=not cfg.use_gpu,
        deepspeed=cfg.deepspeed,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; the check costs a graph traversal
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,  # older checkpoints are already in the Ray run storage
        eval_strategy="no",
        report_to=list(cfg.report_to) or "none",  # tracking.report_to, passed through by the flow
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg.seed,
    )


def trainer_datasets(cfg: TrainLoopConfig) -> dict[str, Any]:
    """train_dataset / eval_dataset keyword arguments for a TRL trainer, from the loop config's rows."""
    from datasets import Dataset

    return {"train_dataset": Dataset.from_list(list(cfg.train_rows)),
            "eval_dataset": Dataset.from_list(list(cfg.test_rows))}


def eta_text(first_step_at: float | None, step: int, max_steps: int) -> str:
    """' eta 12s' from the mean time of the steps after the first (the first carries the start-up), else ''."""
    if first_step_at is None or step <= 1:
        return ""
    per_step = (time.time() - first_step_at) / (step - 1)
    return f" eta {per_step * (max_steps - step):.0f}s"


def progress_callback(stage: str, max_steps: int, timing: dict[str, float], extra_keys: tuple[str, ...] = ()):
    """A TrainerCallback that sends loss lines (with an ETA from the steps since the first) to the driver and
    records when the first step finished."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step_at", time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                check_finite_loss(stage, state.global_step, float(logs["loss"]))  # bf16: no per-step overflow scan
                extra = "".join(f" {k} {logs[k]:.3f}" for k in extra_keys if k in logs)
                ray_train.log(f"{stage}: step {state.global_step}/{max_steps} loss {logs['loss']:.4f}{extra}"
                              f"{eta_text(timing.get('first_step_at'), state.global_step, max_steps)}")  # fmt: skip

    return Progress()


def digests_callback(rank: int):
    """A TrainerCallback that records the digests of each HF checkpoint this rank saved, so a resume can tell
    its files from ones someone else put in the work_dir (stages/common/checkpoint_digests.py)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    from stages.common.checkpoint_digests import record

    class RecordDigests(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved = get_last_checkpoint(args.output_dir)
            if saved is not None:
                record(saved, f"rank{rank}")

    return RecordDigests()


def resume_state(scratch: Path) -> tuple[Path | None, Path | None]:
    """(local copy of a finished run's last checkpoint, local HF Trainer checkpoint to resume from); None if absent."""
    with ray_train.resume_dir() as resume:
        if resume is None:
            return None, None
        local = scratch / "resume"
        shutil.copytree(resume, local)
    if (local / FINAL_DIR).is_dir() and (local / RESULT_FILE).is_file():
        return local, None
    hf = local / HF_CHECKPOINT_DIR
    return None, (hf if hf.is_dir() else None)


def run_on_worker(config: dict[str, Any], train: Callable[[Any, int, Path], None]) -> None:
    """Take the stage's TrainLoopConfig `cfg` out of Ray Train's `config`, set torch threads, then run
    `train(cfg, rank, scratch)` with a scratch dir removed afterwards."""
    cfg = from_ray(config)
    ray_train.set_torch_threads(cfg.cpus_per_worker)
    rank = ray_train.world_rank()
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{cfg.stage}-") as tmp:
        train(cfg, rank, Path(tmp))


@dataclass
class Trained:
    """What `train_and_save` hands back: the trainer, its metrics, and the result dir holding `final/`."""

    trainer: Any
    metrics: dict[str, float]  # eval_loss, train_loss, train_samples_per_second, train_seconds
    out: Path
    timing: dict[str, float]


def train_and_save(cfg: TrainLoopConfig, rank: int, scratch: Path, *, build_trainer: Callable,
                   log_keys: tuple[str, ...] = ()) -> Trained | None:
    """Resume or train (the trainer from `build_trainer(cfg, output_dir)`), evaluate and save the model into
    scratch/result/final; None if an earlier attempt finished. `log_keys`: logged values shown beside the loss."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    stage = cfg.stage

    finished, hf_resume = resume_state(scratch)
    if finished is not None:  # training ended in an earlier attempt: hand its result back
        ray_train.log(f"{stage}: training already finished in an earlier attempt; reusing its result")
        ray_train.report({"resumed_finished": 1}, finished if rank == 0 else None)
        return None
    resumed_from = 0  # the step this attempt resumes from (0: a fresh start), from the HF checkpoint's own state
    if hf_resume is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            resumed_from = int(json.loads((hf_resume / "trainer_state.json").read_text())["global_step"])
        ray_train.log(f"{stage}: resuming the trainer from step {resumed_from}")

    trainer = build_trainer(cfg, str(scratch / "trainer"))
    tokenizer = trainer.processing_class
    timing: dict[str, float] = {}
    trainer.add_callback(digests_callback(rank))  # before Ray's callback, which uploads the folder on save
    trainer.add_callback(RayTrainReportCallback())
    trainer.add_callback(progress_callback(stage, cfg.max_steps, timing, log_keys))
    trainer = prepare_trainer(trainer)
    train_output = trainer.train(resume_from_checkpoint=str(hf_resume) if hf_resume else None)
    eval_metrics = trainer.evaluate()

    out = scratch / "result"
    if cfg.lora is None:
        trainer.save_model(str(out / FINAL_DIR))  # every rank: ZeRO-3 gathers the shards here
    elif rank == 0:  # LoRA (refused with ZeRO-3 in pre-flight): the merged model, and the adapter under adapter/
        from stages.common.lora import merged, save_adapter

        merged(trainer.model).save_pretrained(str(out / FINAL_DIR), safe_serialization=True)
        save_adapter(trainer.model, out / FINAL_DIR, base_path=cfg.model_dir)
    # ZeRO-3 leaves a process-wide flag that makes from_pretrained partition weights with collectives; rank 0 alone
    # reloads the saved model for evaluation (the others wait in report), so switch it off: training is over.
    unset_hf_deepspeed_config()
    if rank == 0:
        tokenizer.save_pretrained(out / FINAL_DIR)
        (out / FINAL_DIR / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in the manifest
    metrics = {
        "eval_loss": float(eval_metrics["eval_loss"]),
        "train_loss": float(train_output.training_loss),
        "train_samples_per_second": float(train_output.metrics.get("train_samples_per_second", 0.0)),
        "train_seconds": float(train_output.metrics.get("train_runtime", 0.0)),
        "resumed_from_step": resumed_from,
    }
    return Trained(trainer=trainer, metrics=metrics, out=out, timing=timing)


def report_result(trained: Trained, rank: int, metrics: dict[str, float], samples: list[dict]) -> None:
    """Rank 0 writes result.json next to final/; every rank reports (a barrier), rank 0 with the result dir."""
    if rank == 0:
        result = {
            "metrics": metrics,
            "log_history": trained.trainer.state.log_history,
            "first_step_at": trained.timing.get("first_step_at"),
            "samples": samples,
        }
        (trained.out / RESULT_FILE).write_text(json.dumps(result, indent=1))
    ray_train.report({"finished": 1}, trained.out if rank == 0 else None)
