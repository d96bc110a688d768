"""What the TRL-based stages (SFT, reward) share: input checks, the DeepSpeed config, and the HF-Trainer-on-Ray loop.

Driver side: `check_kind`, `load_rows`, `model_context`, `token_limit`, `per_worker_batch` (one-line
`StageInputError`s), `tokenizer_plan` (pad = eos when there is no pad token), `token_ids_as_trl` (the ids TRL will
train on, for length checks and scoring), `deepspeed_config`, `loop_config` (the fields every loop config holds) and
`train_and_publish` (`ray_train.fit`, then the final checkpoint -> an artifact, with metrics.jsonl and loss_curve.png in its reports).
Worker side: `run_on_worker` wraps a stage's `train(cfg, rank, scratch)`; `load_tokenizer` applies the plan;
`train_and_save` resumes, trains, evaluates and saves the model; `report_result` writes `result.json` and reports the
last checkpoint.

Checkpoints: the HF Trainer saves every `save_steps` into a local scratch dir and `RayTrainReportCallback` uploads
each one into the Ray run storage (ctx.work_dir); a rerun resumes the Trainer (weights, optimizer, scheduler, step)
from the latest. When training is done, rank 0 reports one last checkpoint holding `final/` (the trained model) and
`result.json` (metrics, loss history); a rerun that finds it skips training and hands the same result back (on
local storage without starting workers at all).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import deepspeed_config as ds
from stages.common import ray_train
from stages.common.errors import StageInputError
from stages.common.hf import ROLE_NAMES, check_vocab_matches, use_eos_as_pad

FINAL_DIR = "final"  # inside the last checkpoint: the trained model + tokenizer (a standard HF dir)
RESULT_FILE = "result.json"  # inside the last checkpoint: metrics, log history, samples
HF_CHECKPOINT_DIR = "checkpoint"  # where RayTrainReportCallback puts the HF Trainer checkpoint
HF_CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")

# ----------------------------------------------------------------------------------------------------- driver: inputs


def check_kind(stage: str, role: str, artifact, expected: str) -> None:
    """Reject an input artifact of the wrong kind (one line naming the stage, role, ref and both kinds)."""
    if artifact.kind != expected:
        raise StageInputError(
            f"{stage}: input {role} = {artifact.ref}: expected kind {expected!r}, found {artifact.kind!r}"
        )


def load_rows(artifact, split: str, where: str) -> list[dict[str, Any]]:
    """Rows of one split of a dataset artifact (train.jsonl / test.jsonl) as plain dicts."""
    from stages.data.read import DataError, load_dataset_artifact

    try:
        dataset = load_dataset_artifact(artifact, split)
    except DataError as e:
        raise StageInputError(f"{where}: {e}") from None
    return [dict(row) for row in dataset]


def check_turns(turns: Any, column: str, where: str, *, replies: bool = False) -> None:
    """A conversational cell: a non-empty list of {role: system|user|assistant, content: str} turns; reply columns
    (completion, chosen, rejected) hold assistant turns with some text, a prompt does not end with the assistant."""
    if not isinstance(turns, list) or not turns:
        raise StageInputError(f"{where}: column {column!r}: expected a non-empty list of turns, found {turns!r:.80}")
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLE_NAMES or not isinstance(turn.get("content"), str):
            raise StageInputError(
                f"{where}: column {column!r}: expected turns like {{'role': 'user'|'assistant'|'system', "
                f"'content': str}}, found {turn!r:.80}"
            )
    if replies:
        if any(t["role"] != "assistant" for t in turns):
            raise StageInputError(f"{where}: column {column!r}: expected assistant turns only")
        if not "".join(t["content"] for t in turns).strip():
            raise StageInputError(f"{where}: column {column!r}: empty reply (nothing to learn)")
    elif turns[-1]["role"] == "assistant":
        raise StageInputError(f"{where}: column {column!r}: the prompt ends with an assistant turn (expected the "
                              "user's turn last)")


def model_context(model_dir: str, tokenizer, where: str) -> int:
    """The model's context length, after checking its embedding matches the tokenizer and it has an eos token."""
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    try:
        check_vocab_matches(len(tokenizer), text_config.vocab_size, where)
    except ValueError as e:
        raise StageInputError(str(e)) from None
    if tokenizer.eos_token is None:  # eos ends every reply (and stands in for a missing pad token)
        raise StageInputError(f"{where}: the tokenizer has no eos token (found eos=None, pad={tokenizer.pad_token!r})")
    context = getattr(text_config, "n_positions", None) or getattr(text_config, "max_position_embeddings", None)
    if not context:
        raise StageInputError(f"{where}: config.json names no context length (n_positions / max_position_embeddings)")
    return int(context)


def token_limit(max_length: int | None, context: int, where: str) -> int:
    """The longest sequence allowed: the config's max_length, which may not exceed the model's context."""
    if max_length is None:
        return context
    if max_length > context:
        raise StageInputError(f"{where}: max_length {max_length} exceeds the model's context of {context} tokens")
    return max_length


def tokenizer_plan(tokenizer) -> dict[str, Any]:
    """What the stage does to the tokenizer (applied to `tokenizer` here, and again on each worker by
    `load_tokenizer`), recorded in the published artifact: pad = eos when it has no pad token; chat template or not."""
    note = use_eos_as_pad(tokenizer)
    return {
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_is_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
        "pad_note": note,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def load_tokenizer(model_dir: str):
    """The model's tokenizer as the stages train with it: pad = eos when it has none, padding on the right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    use_eos_as_pad(tokenizer)
    return tokenizer


def token_ids_as_trl(tokenizer, prompt: str | list, reply: str | list) -> list[int]:
    """The ids TRL's SFT and reward trainers build for prompt + reply: a conversational row through the chat
    template (which ends the reply itself), a plain-text row tokenized as TRL does, with eos appended."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token
    return list(tokenizer(prompt + (reply if reply.endswith(eos) else reply + eos))["input_ids"])


def per_worker_batch(batch_size: int, num_workers: int, where: str) -> int:
    """Split the global batch over the workers, so results do not depend on the worker count."""
    if batch_size % num_workers:
        raise StageInputError(f"{where}: batch_size {batch_size} is not divisible by num_workers {num_workers}")
    return batch_size // num_workers


# ------------------------------------------------------------------------------------------------ driver: loop config


def deepspeed_config(zero_stage: int | None, bf16: bool, use_gpu: bool = True) -> dict | None:
    """DeepSpeed settings for the HF Trainer (None = plain DDP); "auto" values come from the training arguments."""
    if zero_stage is None:
        return None
    return ds.build(
        zero_stage=zero_stage,
        precision="bf16" if bf16 else "fp32",
        use_gpu=use_gpu,
        micro_batch_size="auto",
        grad_accum="auto",
        grad_clip="auto",
        train_batch_size="auto",
        optimizer=ds.AdamW(),
    )


def loop_config(config, model, splits: dict[str, list], *, stage: str, limit: int, scaling, seed: int, store,
                tokenizer: dict[str, Any]) -> dict:
    """The loop-config fields both stages send to their workers (model, rows, optimiser, checkpoints, resources)."""
    return {
        "tokenizer": tokenizer,
        "model_dir": model.path,
        "model_digest": model.digest,
        "store_root": store.root if store is not None else None,
        "train_rows": splits["train"],
        "test_rows": splits["test"],
        "max_length": limit,
        "per_worker_batch": per_worker_batch(config.batch_size, scaling.num_workers, f"{stage}: config"),
        "max_steps": config.max_steps,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "save_steps": config.save_steps,
        "logging_steps": config.logging_steps,
        "bf16": config.bf16,
        "deepspeed": deepspeed_config(config.zero_stage, config.bf16, scaling.use_gpu),
        "seed": seed,
        "use_gpu": scaling.use_gpu,
        "cpus_per_worker": scaling.cpus_per_worker,
    }


def checkpoint_complete(path: Path) -> bool:
    """True if a checkpoint dir in the run storage holds a whole final result or a whole HF Trainer checkpoint."""
    try:
        if (path / RESULT_FILE).is_file():
            json.loads((path / RESULT_FILE).read_text())  # the stage writes it last; a torn upload does not parse
            return (path / FINAL_DIR / "config.json").is_file() and _whole_safetensors(path / FINAL_DIR)
        hf = path / HF_CHECKPOINT_DIR
        json.loads((hf / "trainer_state.json").read_text())
        return (
            all((hf / name).is_file() for name in HF_CHECKPOINT_FILES)
            and _whole_safetensors(hf)
            and all(zipfile.is_zipfile(hf / name) for name in ("optimizer.pt", "scheduler.pt"))  # torch.save = zip
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _whole_safetensors(model_dir: Path) -> bool:
    """Every *.safetensors file in model_dir is as long as its header says (a torn copy is shorter)."""
    files = list(model_dir.glob("*.safetensors"))
    for f in files:
        with f.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if f.stat().st_size != 8 + header_len + end:
            return False
    return bool(files)


# ------------------------------------------------------------------------------------------ driver: train, publish


def _finished_checkpoint(work_dir: str, stage: str) -> Path | None:
    """The latest whole checkpoint of the stage's run storage if it holds a finished result (local storage only;
    on remote storage the workers find it themselves, see `train_and_save`)."""
    latest = ray_train.latest_checkpoint_dir(work_dir, stage, checkpoint_complete)
    return Path(latest) if latest and (Path(latest) / RESULT_FILE).is_file() else None


def train_and_publish(train_loop: Callable, loop_config: dict, *, stage: str, output: str, kind: str, title: str,
                      started: float, config, inputs: dict, store, ctx) -> Any:
    """Run `train_loop` on Ray Train, then publish its final checkpoint as `output` (the model; curves in its reports)."""
    from stages.common.fingerprint import code_fingerprint
    from stages.common.plots import plot_loss_curve, write_metrics_jsonl

    ctx.log(
        f"{stage}: {len(loop_config['train_rows'])} train / {len(loop_config['test_rows'])} test rows, "
        f"{config.max_steps} steps on {ctx.scaling.num_workers} workers"
    )
    if loop_config["tokenizer"]["pad_note"]:
        ctx.log(f"{stage}: {loop_config['tokenizer']['pad_note']}")
    if ctx.report_to:  # the HF Trainer's own integrations; their logs live beside the stage's checkpoints
        loop_config = {**loop_config, "report_to": list(ctx.report_to),
                       "logging_dir": f"{ray_train.storage_path(ctx.work_dir).rstrip('/')}/tracking"}  # fmt: skip
    finished = _finished_checkpoint(ctx.work_dir, stage)
    if finished is not None:  # e.g. the publish failed after training: the result is there, no workers needed
        ctx.log(f"{stage}: training already finished in an earlier attempt ({finished.name}); reusing its result")
        checkpoint = contextlib.nullcontext(str(finished))
    else:
        checkpoint = ray_train.fit(train_loop, loop_config, ctx=ctx, run_name=stage,
                                   checkpoint_complete=checkpoint_complete).checkpoint.as_directory()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage}-out-") as tmp, checkpoint as ckpt:
        out, reports = Path(tmp) / "model", Path(tmp) / "reports"  # reports: outside the artifact's digest
        shutil.copytree(Path(ckpt) / FINAL_DIR, out)
        reports.mkdir()
        outcome = json.loads((Path(ckpt) / RESULT_FILE).read_text())
        write_metrics_jsonl(outcome["log_history"], reports / "metrics.jsonl")
        plot_loss_curve(outcome["log_history"], reports / "loss_curve.png", title)
        if outcome["samples"]:
            (reports / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in outcome["samples"]))
        metrics = dict(outcome["metrics"])
        logged = [row["loss"] for row in outcome["log_history"] if isinstance(row.get("loss"), int | float)]
        if logged:  # for the quality gate: did the training loss fall?
            metrics["first_logged_loss"], metrics["last_logged_loss"] = float(logged[0]), float(logged[-1])
        first_step = outcome.get("first_step_at")
        # A reused result's first step is an earlier attempt's: this run had no start-up to speak of.
        timings = {"startup_seconds": round(first_step - started, 2)} if first_step and first_step > started else {}
        metrics["wall_seconds"] = round(time.time() - started, 2)
        timings["wall_seconds"] = metrics["wall_seconds"]
        artifact = store.publish(
            out,
            name=output,
            kind=kind,
            stage=stage,
            config=config.to_dict(),
            inputs=inputs,
            metrics=metrics,
            timings=timings,
            cache_key=ctx.cache_key,
            code_fingerprint=code_fingerprint(stage),
            extra={
                "max_length": loop_config["max_length"],
                "long_rows": "rejected",
                "rows": {"train": len(loop_config["train_rows"]), "test": len(loop_config["test_rows"])},
                "tokenizer": loop_config["tokenizer"],
            },
            reports=reports,
        )
    ctx.log(f"{stage}: published {artifact.ref} " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return artifact


# --------------------------------------------------------------------------------------------------------- worker


def local_model_dir(cfg: dict[str, Any]) -> str:
    """The input model's directory on this node: the driver's path when it is visible here (one node, shared disk),
    else fetched and verified from the artifact store (multi-node clusters with an s3:// or gs:// store)."""
    if Path(cfg["model_dir"]).is_dir() or not cfg.get("store_root"):
        return cfg["model_dir"]
    from stages.common.store import ArtifactStore

    return ArtifactStore(cfg["store_root"]).get(cfg["model_digest"]).path


def training_args(cfg: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Keyword arguments of SFTConfig / RewardConfig that both stages set the same way from the loop config."""
    if cfg.get("logging_dir"):  # transformers 5 reads TensorBoard's folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = cfg["logging_dir"]
    return dict(
        output_dir=output_dir,
        max_steps=cfg["max_steps"],
        per_device_train_batch_size=cfg["per_worker_batch"],
        per_device_eval_batch_size=cfg["per_worker_batch"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=cfg["warmup_steps"],
        weight_decay=cfg["weight_decay"],
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
        report_to=cfg.get("report_to") or "none",  # tracking.report_to, passed through by the flow
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg["seed"],
    )


def trainer_datasets(cfg: dict[str, Any]) -> dict[str, Any]:
    """train_dataset / eval_dataset keyword arguments for a TRL trainer, from the loop config's rows."""
    from datasets import Dataset

    return {"train_dataset": Dataset.from_list(cfg["train_rows"]), "eval_dataset": Dataset.from_list(cfg["test_rows"])}


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
                extra = "".join(f" {k} {logs[k]:.3f}" for k in extra_keys if k in logs)
                ray_train.log(f"{stage}: step {state.global_step}/{max_steps} loss {logs['loss']:.4f}{extra}"
                              f"{eta_text(timing.get('first_step_at'), state.global_step, max_steps)}")  # fmt: skip

    return Progress()


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


def run_on_worker(cfg: dict[str, Any], stage: str, train: Callable[[dict[str, Any], int, Path], None]) -> None:
    """Set torch threads, then run `train(cfg, rank, scratch)` with a scratch dir removed afterwards."""
    ray_train.set_torch_threads(cfg["cpus_per_worker"])
    rank = ray_train.world_rank()
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage}-") as tmp:
        train(cfg, rank, Path(tmp))


@dataclass
class Trained:
    """What `train_and_save` hands back: the trainer, its metrics, and the result dir holding `final/`."""

    trainer: Any
    metrics: dict[str, float]  # eval_loss, train_loss, train_samples_per_second, train_seconds
    out: Path
    timing: dict[str, float]


def train_and_save(cfg: dict[str, Any], rank: int, scratch: Path, *, stage: str, build_trainer: Callable,
                   log_keys: tuple[str, ...] = ()) -> Trained | None:
    """Resume or train, evaluate and save the model into scratch/result/final; None if an earlier attempt finished."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    finished, hf_resume = resume_state(scratch)
    if finished is not None:  # training ended in an earlier attempt: hand its result back
        ray_train.log(f"{stage}: training already finished in an earlier attempt; reusing its result")
        ray_train.report({"resumed_finished": 1}, finished if rank == 0 else None)
        return None
    if hf_resume is not None:
        ray_train.log(f"{stage}: resuming the trainer from {hf_resume}")

    trainer = build_trainer(cfg, str(scratch / "trainer"))
    tokenizer = trainer.processing_class
    timing: dict[str, float] = {}
    trainer.add_callback(RayTrainReportCallback())
    trainer.add_callback(progress_callback(stage, cfg["max_steps"], timing, log_keys))
    trainer = prepare_trainer(trainer)
    train_output = trainer.train(resume_from_checkpoint=str(hf_resume) if hf_resume else None)
    eval_metrics = trainer.evaluate()

    out = scratch / "result"
    trainer.save_model(str(out / FINAL_DIR))  # every rank: ZeRO-3 gathers the shards here
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
