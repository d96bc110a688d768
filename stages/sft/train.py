"""The SFT training loop that runs on every Ray Train worker: TRL's SFTTrainer, checkpoints, held-out evaluation.

Checkpoints: the HF Trainer saves every `save_steps` into a local scratch dir and `RayTrainReportCallback` uploads
each one into the Ray run storage (ctx.work_dir); a rerun resumes the Trainer (weights, optimizer, scheduler, step)
from the latest. When training is done, rank 0 reports one last checkpoint holding `final/` (the trained model) and
`result.json` (metrics, loss history); a rerun that finds it skips training and hands the same result back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from stages.common import ray_train
from stages.sft.evaluate import demo_metrics

FINAL_DIR = "final"  # inside the last checkpoint: the trained model + tokenizer (a standard HF dir)
RESULT_FILE = "result.json"  # inside the last checkpoint: metrics, log history, sample generations
HF_CHECKPOINT_DIR = "checkpoint"  # where RayTrainReportCallback puts the HF Trainer checkpoint


def deepspeed_config(zero_stage: int | None, bf16: bool) -> dict | None:
    """DeepSpeed settings for the HF Trainer; "auto" values are filled in from the training arguments."""
    if zero_stage is None:
        return None
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_model writes full weights, not shards
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "bf16": {"enabled": bf16},
    }


def _progress_callback(stage: str, max_steps: int, timing: dict[str, float]):
    """A TrainerCallback that sends loss lines to the driver and records when the first step finished."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step_at", time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                ray_train.log(f"{stage}: step {state.global_step}/{max_steps} loss {logs['loss']:.4f}")

    return Progress()


def _resume_state(scratch: Path) -> tuple[Path | None, Path | None]:
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


def local_model_dir(cfg: dict[str, Any]) -> str:
    """The input model's directory on this node: the driver's path when it is visible here (one node, shared disk),
    else fetched and verified from the artifact store (multi-node clusters with an s3:// or gs:// store)."""
    if Path(cfg["model_dir"]).is_dir() or not cfg.get("store_root"):
        return cfg["model_dir"]
    from stages.common.store import ArtifactStore

    return ArtifactStore(cfg["store_root"]).get(cfg["model_digest"]).path


def build_trainer(cfg: dict[str, Any], output_dir: str):
    """TRL's SFTTrainer for the loop config `cfg` (see stage.prepare): completion-only loss, eos appended by TRL."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir = local_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=cfg["max_steps"],
        per_device_train_batch_size=cfg["per_worker_batch"],
        per_device_eval_batch_size=cfg["per_worker_batch"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=cfg["warmup_steps"],
        weight_decay=cfg["weight_decay"],
        max_length=cfg["max_length"],
        completion_only_loss=True,  # labels of prompt tokens are -100 (tested in tests/test_sft.py)
        activation_checkpointing=False,  # TRL turns it on by default; tiny models do not need the memory
        bf16=cfg["bf16"],
        use_cpu=not cfg["use_gpu"],
        deepspeed=cfg["deepspeed"],
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; the check costs a graph traversal
        logging_steps=cfg["logging_steps"],
        save_strategy="steps",
        save_steps=cfg["save_steps"],
        save_total_limit=1,  # older checkpoints are already in the Ray run storage
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg["seed"],
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(cfg["train_rows"]),
        eval_dataset=Dataset.from_list(cfg["test_rows"]),
        processing_class=tokenizer,
    )


def train_loop(cfg: dict[str, Any]) -> None:
    """Fine-tune cfg["model_dir"] on cfg["train_rows"] on this worker; rank 0 reports the final model."""
    ray_train.set_torch_threads(cfg["cpus_per_worker"])
    rank = ray_train.world_rank()
    with tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp:
        _train(cfg, rank, Path(tmp))


def _train(cfg: dict[str, Any], rank: int, scratch: Path) -> None:
    """Train, evaluate, report; every file it writes lives under `scratch` (removed after the upload)."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    finished, hf_resume = _resume_state(scratch)
    if finished is not None:  # training ended in an earlier attempt: hand its result back
        ray_train.log("sft: training already finished in an earlier attempt; reusing its result")
        ray_train.report({"resumed_finished": 1}, finished if rank == 0 else None)
        return
    if hf_resume is not None:
        ray_train.log(f"sft: resuming the trainer from {hf_resume}")

    trainer = build_trainer(cfg, str(scratch / "trainer"))
    tokenizer = trainer.processing_class
    timing: dict[str, float] = {}
    trainer.add_callback(RayTrainReportCallback())
    trainer.add_callback(_progress_callback("sft", cfg["max_steps"], timing))
    trainer = prepare_trainer(trainer)
    train_output = trainer.train(resume_from_checkpoint=str(hf_resume) if hf_resume else None)
    eval_metrics = trainer.evaluate()

    out = scratch / "result"
    trainer.save_model(str(out / FINAL_DIR))  # every rank: ZeRO-3 gathers the shards here
    # ZeRO-3 leaves a process-wide flag that makes from_pretrained partition weights with collectives; rank 0 alone
    # reloads the saved model for evaluation below (the others wait in report), so switch it off: training is over.
    unset_hf_deepspeed_config()
    if rank == 0:
        tokenizer.save_pretrained(out / FINAL_DIR)
        (out / FINAL_DIR / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in the manifest
        metrics = {
            "eval_loss": float(eval_metrics["eval_loss"]),
            "train_loss": float(train_output.training_loss),
            "train_samples_per_second": float(train_output.metrics.get("train_samples_per_second", 0.0)),
            "train_seconds": float(train_output.metrics.get("train_runtime", 0.0)),
        }
        samples: list[dict] = []
        if cfg["demo_task"] and cfg["eval_prompts"]:
            ray_train.log(f"sft: answering {len(cfg['eval_prompts'])} held-out prompts (sampled and greedy)")
            gen_metrics, samples = demo_metrics(
                str(out / FINAL_DIR),
                cfg["eval_prompts"],
                max_new_tokens=cfg["max_new_tokens"],
                batch_size=cfg["generation_batch_size"],
                seed=cfg["seed"],
                use_gpu=cfg["use_gpu"],
            )
            metrics |= gen_metrics
        result = {
            "metrics": metrics,
            "log_history": trainer.state.log_history,
            "first_step_at": timing.get("first_step_at"),
            "samples": samples,
        }
        (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
    ray_train.report({"finished": 1}, out if rank == 0 else None)
