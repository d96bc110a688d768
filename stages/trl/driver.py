"""The driver half of a TRL stage (sft, reward, dpo): input checks, the loop config, Ray Train, publishing.

A stage's `stage.py` calls these on the Ray driver: `check_kind`, `load_rows`, `check_turns`, `model_context`,
`token_limit`, `per_worker_batch` (one-line `StageInputError`s), `deepspeed_config`, `build_loop_config` (the typed,
frozen `TrainLoopConfig` or the stage's subclass of it), then `train_and_publish` (`ray_train.fit` of the stage's
`train_loop`, then the final checkpoint -> an artifact, with metrics.jsonl and loss_curve.png in its reports). What
runs inside the Ray Train workers is in `stages.trl.worker`; the tokenizer helpers both use are in `stages.trl.tokens`.

Checkpoints: the HF Trainer saves every `save_steps` into a local scratch dir and `RayTrainReportCallback` uploads
each one into the Ray run storage (ctx.work_dir); a rerun resumes the Trainer (weights, optimizer, scheduler, step)
from the latest. When training is done, rank 0 reports one last checkpoint holding `final/` (the trained model) and
`result.json` (metrics, loss history); a rerun that finds it skips training and hands the same result back (on
local storage without starting workers at all; on remote storage the workers find it, see
`stages.trl.worker.train_and_save`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stages.common import checkpoint_digests, ray_train
from stages.common import deepspeed_config as ds
from stages.common.errors import StageInputError
from stages.common.hf import ROLE_NAMES, check_vocab_matches
from stages.trl.loop_config import (
    FINAL_DIR,
    HF_CHECKPOINT_DIR,
    HF_CHECKPOINT_FILES,
    HF_CHECKPOINT_WEIGHTS,
    RESULT_FILE,
    TokenizerPlan,
    TrainLoopConfig,
    to_ray,
)

L = TypeVar("L", bound=TrainLoopConfig)

# ------------------------------------------------------------------------------------------------------------ inputs


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


def per_worker_batch(batch_size: int, num_workers: int, where: str) -> int:
    """Split the global batch over the workers, so results do not depend on the worker count."""
    if batch_size % num_workers:
        raise StageInputError(f"{where}: batch_size {batch_size} is not divisible by num_workers {num_workers}")
    return batch_size // num_workers


# ------------------------------------------------------------------------------------------------------- loop config


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


def build_loop_config(cls: type[L], config, model, splits: dict[str, list], *, stage: str, limit: int, scaling,
                      seed: int, store, tokenizer: TokenizerPlan, demo_task: bool, **stage_fields: Any) -> L:
    """The workers' loop config: the fields every TRL stage sends (model, rows, optimiser, checkpoints, resources)
    from the stage's typed `config`, plus `stage_fields`, the fields of the stage's own subclass `cls`."""
    return cls(
        stage=stage,
        tokenizer=tokenizer,
        model_dir=model.path,
        model_digest=model.digest,
        store_root=str(store.root) if store is not None else None,
        train_rows=tuple(splits["train"]),
        test_rows=tuple(splits["test"]),
        max_length=limit,
        per_worker_batch=per_worker_batch(config.batch_size, scaling.num_workers, f"{stage}: config"),
        max_steps=config.max_steps,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        save_steps=config.save_steps,
        logging_steps=config.logging_steps,
        bf16=config.bf16,
        deepspeed=deepspeed_config(config.zero_stage, config.bf16, scaling.use_gpu),
        seed=seed,
        use_gpu=scaling.use_gpu,
        cpus_per_worker=scaling.cpus_per_worker,
        demo_task=demo_task,
        lora=config.lora,
        activation_checkpointing=config.activation_checkpointing,
        **stage_fields,
    )


def checkpoint_complete(path: Path) -> bool:
    """True if a checkpoint dir in the run storage holds a whole final result or a whole HF Trainer checkpoint."""
    try:
        if (path / RESULT_FILE).is_file():
            json.loads((path / RESULT_FILE).read_text())  # the stage writes it last; a torn upload does not parse
            return (path / FINAL_DIR / "config.json").is_file() and _whole_safetensors(path / FINAL_DIR)
        hf = path / HF_CHECKPOINT_DIR
        json.loads((hf / "trainer_state.json").read_text())
        # Under DeepSpeed the Trainer writes no optimizer.pt: the engine's state is a global_step* folder that
        # `latest` names, and `latest` is written after that folder.
        optimizer = [hf / "optimizer.pt"] if (hf / "optimizer.pt").is_file() else _deepspeed_state(hf)
        needed = [name for name in HF_CHECKPOINT_FILES if name != "optimizer.pt"]
        return (
            bool(optimizer)
            and all((hf / name).is_file() for name in needed)
            and any((hf / name).is_file() for name in HF_CHECKPOINT_WEIGHTS)
            and _whole_safetensors(hf)
            and all(zipfile.is_zipfile(f) for f in [*optimizer, hf / "scheduler.pt"])  # torch.save = zip
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _deepspeed_state(hf: Path) -> list[Path]:
    """The `*.pt` files of the DeepSpeed step folder that hf/latest names ([] if there is none, or it is empty)."""
    if not (hf / "latest").is_file():
        return []
    tag = (hf / "latest").read_text().strip()
    step = hf / tag
    if not tag.startswith("global_step") or "/" in tag or "\\" in tag or not step.is_dir():
        return []
    return sorted(step.glob("*.pt"))


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


# -------------------------------------------------------------------------------------------------- train, publish


def _finished_checkpoint(work_dir: str, stage: str, policy: str) -> Path | None:
    """The latest whole, trusted checkpoint of the stage's run storage if it holds a finished result (local
    storage only; on remote storage the workers find it themselves, see `train_and_save`)."""
    latest = ray_train.latest_checkpoint_dir(work_dir, stage, checkpoint_complete, policy)
    return Path(latest) if latest and (Path(latest) / RESULT_FILE).is_file() else None


def lora_record(model_dir: Path, section) -> dict:
    """The manifest's record of a LoRA-trained model: the section and where its adapter is; {} without LoRA."""
    from stages.common.lora import ADAPTER_DIR

    if section is None:
        return {}
    if not (model_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise RuntimeError(f"{model_dir}: trained with LoRA but no {ADAPTER_DIR}/ was saved")
    return {"lora": section.to_dict(), "adapter": ADAPTER_DIR}


def train_and_publish(train_loop: Callable[[dict], None], loop: TrainLoopConfig, *, output: str, kind: str, title: str,
                      started: float, config, inputs: dict, store, ctx) -> Any:
    """Run `train_loop` (the stage's worker entry) on Ray Train with `loop`, then publish its final checkpoint as
    `output` (the model; curves in its reports)."""
    from stages.common.fingerprint import code_fingerprint
    from stages.common.plots import plot_loss_curve, write_metrics_jsonl

    stage = loop.stage
    ctx.log(
        f"{stage}: {len(loop.train_rows)} train / {len(loop.test_rows)} test rows, "
        f"{config.max_steps} steps on {ctx.scaling.num_workers} workers"
    )
    if loop.tokenizer.pad_note:
        ctx.log(f"{stage}: {loop.tokenizer.pad_note}")
    if ctx.report_to:  # the HF Trainer's own integrations; their logs live beside the stage's checkpoints
        loop = dataclasses.replace(loop, report_to=tuple(ctx.report_to),
                                   logging_dir=f"{ray_train.storage_path(ctx.work_dir).rstrip('/')}/tracking")  # fmt: skip
    finished = _finished_checkpoint(ctx.work_dir, stage, ctx.untrusted_checkpoints)
    if finished is not None:  # e.g. the publish failed after training: the result is there, no workers needed
        ctx.log(f"{stage}: training already finished in an earlier attempt ({finished.name}); reusing its result")
        checkpoint = contextlib.nullcontext(str(finished))
    else:
        checkpoint = ray_train.fit(train_loop, to_ray(loop), ctx=ctx, run_name=stage,
                                   checkpoint_complete=checkpoint_complete).checkpoint.as_directory()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage}-out-") as tmp, checkpoint as ckpt:
        state, what = checkpoint_digests.verdict(ckpt)  # final/ is published only as the run that wrote it left it
        if state != "ok":
            raise checkpoint_digests.UntrustedCheckpoint(f"{stage}: not publishing the final checkpoint: {what}")
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
        if ctx.placements:  # the nodes and processes the workers ran on (multi-node runs: more than one node)
            timings["placements"] = list(ctx.placements)
        from stages.common.gates import verdict  # recorded, so a version that missed its gate is never @latest

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
                "max_length": loop.max_length,
                "long_rows": "rejected",
                "rows": {"train": len(loop.train_rows), "test": len(loop.test_rows)},
                "tokenizer": loop.tokenizer.to_dict(),
                **lora_record(out, loop.lora),
            },
            reports=reports,
            gate=verdict(stage, getattr(config, "gate", None), metrics),
        )
    ctx.log(f"{stage}: published {artifact.ref} " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return artifact
