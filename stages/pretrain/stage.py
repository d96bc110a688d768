"""The pretraining stage on the driver: check inputs, tokenizer, token blocks, Ray Train + DeepSpeed, publish.

run(config, store=, ctx=, corpus=) -> {"tokenizer": Artifact, "base-model": Artifact}
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import ray_train as rt
from stages.common.context import StageContext
from stages.common.errors import StageInputError
from stages.common.fingerprint import code_fingerprint
from stages.common.hf import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS, check_vocab_matches, train_bpe_tokenizer
from stages.data.read import load_dataset_artifact
from stages.pretrain.blocks import pack_blocks, write_blocks
from stages.pretrain.config import Config
from stages.pretrain.deepspeed_setup import deepspeed_config, resolve_precision
from stages.pretrain.metrics import perplexity, unigram_perplexity
from stages.pretrain.model import is_causal_lm, max_positions, scratch_spec
from stages.pretrain.report import plot_loss_curve
from stages.pretrain.train_loop import train_loop

NAME = "pretrain"
RUN_NAME = "pretrain"
# start-up phases in the order they happen (timings.startup_breakdown; JSON manifests sort their keys)
STARTUP_PHASES = ("prepare", "write_blocks", "worker_start", "imports", "build_model", "deepspeed_init", "peak_flops",
                  "data_and_resume", "first_step")


def check_config(config: Config) -> None:
    """Model-shape mistakes that would only surface deep inside training, caught first (StageInputError)."""
    min_vocab = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if config.tokenizer is None and config.vocab_size < min_vocab:
        raise StageInputError(
            f"pretrain.vocab_size: expected at least {min_vocab} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens), found {config.vocab_size}"
        )
    if config.init_from is None:
        if config.n_embd % config.n_head:
            raise StageInputError(
                f"pretrain.n_head: expected a divisor of n_embd={config.n_embd}, found {config.n_head}"
            )
        if config.architecture == "llama" and (config.n_embd // config.n_head) % 2:
            raise StageInputError(
                f"pretrain.n_head: RoPE needs an even head size, found n_embd/n_head = "
                f"{config.n_embd}/{config.n_head} = {config.n_embd // config.n_head}"
            )
        n_positions = config.n_positions or config.context
        if config.context > n_positions:
            raise StageInputError(
                f"pretrain.context: expected at most n_positions={n_positions}, found {config.context}"
            )


def _resolve_dir(ref: str, store, kinds: tuple[str, ...], key: str) -> Path:
    """A local HF directory as is, otherwise an artifact ref in the store of one of `kinds`."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    artifact = store.get(ref)
    if artifact.kind not in kinds:
        raise StageInputError(
            f"pretrain.{key}: {artifact.ref} is a {artifact.kind!r} artifact, expected one of {kinds}"
        )
    return Path(artifact.path)


def _model_spec(config: Config, store, tokenizer) -> dict:
    """What the workers build (model.py): a from-scratch config, or an init_from directory checked against the
    context (its max_position_embeddings / n_positions) and the tokenizer (its vocab_size)."""
    if not config.init_from:
        return scratch_spec(config, tokenizer)
    from transformers import AutoConfig

    path = _init_from_dir(config, store)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageInputError(f"pretrain.init_from: {path} has no readable model config: {first}") from err
    if not is_causal_lm(hf_config):
        raise StageInputError(
            f"pretrain.init_from: {path} is a {hf_config.model_type!r} model, expected a causal LM "
            "(one AutoModelForCausalLM can load: gpt2, llama, qwen2, gpt_neox, ...)"
        )
    limit = max_positions(hf_config)
    if limit is not None and config.context > limit:
        raise StageInputError(
            f"pretrain.context: expected at most the model's max_position_embeddings={limit} ({path}), "
            f"found {config.context}"
        )
    try:
        check_vocab_matches(len(tokenizer), hf_config.vocab_size, f"pretrain.init_from {path}")
    except ValueError as err:
        raise StageInputError(str(err)) from err
    return {"architecture": hf_config.model_type, "config": None, "init_from": str(path)}


def _init_from_dir(config: Config, store) -> Path:
    return _resolve_dir(config.init_from, store, ("causal-lm",), "init_from")


def _tokenizer(config: Config, store, texts: list[str], work: Path):
    """The configured tokenizer; with init_from, the model's own (continued pretraining keeps its vocabulary);
    otherwise a BPE trained on the corpus (kept in work_dir so a resumed run reuses it)."""
    from transformers import AutoTokenizer

    if config.tokenizer:
        return _with_pad(AutoTokenizer.from_pretrained(
            _resolve_dir(config.tokenizer, store, ("tokenizer", "causal-lm"), "tokenizer")
        ))
    if config.init_from:
        model_dir = _init_from_dir(config, store)
        if any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return _with_pad(AutoTokenizer.from_pretrained(model_dir))
    saved = work / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = train_bpe_tokenizer(texts, config.vocab_size)
    tokenizer.save_pretrained(saved)
    return tokenizer


def _with_pad(tokenizer):
    """Blocks are separated by eos; a tokenizer without one cannot be packed. A missing pad becomes eos."""
    if tokenizer.eos_token_id is None:
        raise StageInputError(f"pretrain.tokenizer: {tokenizer.name_or_path} has no eos token, expected one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_texts(corpus) -> tuple[list[str], list[str]]:
    """The corpus artifact's train and test texts (validated as the `corpus` format by the data plumbing)."""
    return [r["text"] for r in load_dataset_artifact(corpus, "train")], [
        r["text"] for r in load_dataset_artifact(corpus, "test")
    ]


def prepare_blocks(
    config: Config, tokenizer, train_texts: list[str], test_texts: list[str], num_workers: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize and pack both splits; too little text for one batch per worker is a StageInputError."""
    eos = tokenizer.eos_token_id
    need = config.micro_batch_size * num_workers
    train = pack_blocks(tokenizer(train_texts)["input_ids"], eos, config.context)
    if len(train) < need:
        raise StageInputError(
            f"{where} [train]: corpus too small: {len(train)} blocks of {config.context} tokens, "
            f"expected at least {need} (micro_batch_size x num_workers)"
        )
    val = pack_blocks(tokenizer(test_texts)["input_ids"], eos, config.context)
    # every worker evaluates the same number of blocks (ZeRO-3 needs lockstep forwards), so cut to a multiple
    n_val = min(len(val), config.eval_blocks) // num_workers * num_workers
    if n_val < 1:
        raise StageInputError(
            f"{where} [test]: too small for validation: {len(val)} blocks of {config.context} "
            f"tokens, expected at least {num_workers} (one per worker)"
        )
    return train, val[:n_val]


def run(config: Config, *, store, ctx: StageContext, corpus, init_model=None, tokenizer=None,
        crash_after_step: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Train tokenizer + causal LM on `corpus` with DeepSpeed on Ray Train; publish `tokenizer` and `base-model`.

    `init_model` / `tokenizer`: the artifacts `pretrain.init_from` / `pretrain.tokenizer` name, resolved by the caller
    (they enter the cache key and the lineage); without them the config's strings are resolved here.
    `crash_after_step` is a test hook: the first attempt raises right after the checkpoint at that step.
    """
    t0 = time.time()
    published_config = config
    extra_inputs = {}
    if init_model is not None:
        _check_input_kind(init_model, ("causal-lm",), "init_from")
        config = config.model_copy(update={"init_from": init_model.path})
        extra_inputs["init_model"] = init_model
    if tokenizer is not None:
        _check_input_kind(tokenizer, ("tokenizer", "causal-lm"), "tokenizer")
        config = config.model_copy(update={"tokenizer": tokenizer.path})
        extra_inputs["tokenizer"] = tokenizer
    check_config(config)
    resolve_precision(config.precision, ctx.scaling.use_gpu)
    work = Path(ctx.work_dir) if "://" not in ctx.work_dir else Path(tempfile.mkdtemp(prefix="pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    train_texts, test_texts = _load_texts(corpus)
    n_bytes = sum(len(t.encode()) + 1 for t in train_texts)  # a byte-level token covers at least one byte
    if n_bytes < config.context:
        raise StageInputError(
            f"{corpus.ref} [train]: corpus too small: {n_bytes} bytes, expected at least "
            f"context={config.context} tokens' worth"
        )
    tokenizer = _tokenizer(config, store, train_texts, work)
    model_spec = _model_spec(config, store, tokenizer)
    train, val = prepare_blocks(config, tokenizer, train_texts, test_texts, ctx.scaling.num_workers, corpus.ref)
    baseline = unigram_perplexity(_tensor(train), _tensor(val[:, 1:]), len(tokenizer))
    data_dir = f"{rt.storage_path(ctx.work_dir).rstrip('/')}/data"  # absolute: workers run in other directories
    t_prep = time.time() - t0
    ctx.log(
        f"pretrain: {len(train)} train / {len(val)} val blocks of {config.context} tokens, vocab "
        f"{len(tokenizer)}, unigram perplexity {baseline:.1f} (prepared in {t_prep:.1f}s)"
    )

    loop_config = {
        "deepspeed": deepspeed_config(config, use_gpu=ctx.scaling.use_gpu),
        "model": model_spec,
        "compile": use_compile(config, ctx.scaling.use_gpu),
        "train_path": write_blocks(train, f"{data_dir}/train_blocks.npy"),
        "val_path": write_blocks(val, f"{data_dir}/val_blocks.npy"),
        "max_steps": config.max_steps,
        "weight_decay": config.weight_decay,
        "eval_interval": config.eval_interval,
        "log_interval": config.log_interval,
        "checkpoint_interval": config.checkpoint_interval,
        "peak_flops": config.peak_flops,
        "seed": ctx.seed,
        "cpus_per_worker": ctx.scaling.cpus_per_worker,
        "use_gpu": ctx.scaling.use_gpu,
        "crash_after_step": crash_after_step,
    }
    t_fit = time.time()
    result = rt.fit(train_loop, loop_config, ctx=ctx, run_name=RUN_NAME, max_failures=config.max_failures)
    summary = result.return_value
    wall = time.time() - t0
    metrics = {
        "val_loss": summary["val_loss"],
        "val_perplexity": perplexity(summary["val_loss"]),
        "unigram_perplexity": baseline,
        "tokens_per_second": summary["tokens_per_second"],
        "mfu": summary["mfu"],
        "tokens_per_cpu_second": summary["tokens_per_cpu_second"],
        "train_steps": summary["train_steps"],
        "wall_seconds": wall,
        "resumed_from_step": summary["resumed_from_step"],
        "peak_rss_mb_per_worker": summary["peak_rss_mb_per_worker"],
        "peak_flops": summary["peak_flops"],
        "peak_source": summary["peak_source"],
        "device_name": summary["device_name"],
        "compiled": summary["compiled"],
        "n_params": summary["n_params"],
        "architecture": summary["architecture"],
    }
    startup = (summary["first_step_unix"] - t0) if summary["first_step_unix"] else None
    timings = {
        "wall_seconds": wall,
        "prepare_seconds": t_prep,
        "startup_seconds": startup,
        "startup_breakdown": startup_breakdown(t0, t_prep, t_fit, summary["startup_marks"]),
    }
    if ctx.placements:  # the nodes and processes the workers ran on (multi-node runs: more than one node)
        timings["placements"] = list(ctx.placements)
    ctx.log(
        f"pretrain: val perplexity {metrics['val_perplexity']:.2f} vs unigram {baseline:.2f}, "
        f"{metrics['tokens_per_second']:.0f} tok/s, MFU {metrics['mfu']:.1%}, {wall:.0f}s"
    )
    return _publish(published_config, store, ctx, {"corpus": corpus, **extra_inputs}, tokenizer, result, metrics,
                    timings)  # fmt: skip


def _check_input_kind(artifact, kinds: tuple[str, ...], key: str) -> None:
    if artifact.kind not in kinds:
        raise StageInputError(
            f"pretrain.{key}: {artifact.ref} is a {artifact.kind!r} artifact, expected one of {', '.join(kinds)}"
        )


def use_compile(config: Config, use_gpu: bool) -> bool:
    """pretrain.compile, with None meaning on for GPU workers and off for CPU ones."""
    return use_gpu if config.compile is None else config.compile


def startup_breakdown(t0: float, prepare: float, fit_call: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds spent in each phase from run() to the end of the first optimizer step (marks: unix times on rank 0
    of the last attempt, in phase order; a phase is the time since the previous mark)."""
    phases = {"prepare": prepare, "write_blocks": fit_call - t0 - prepare}
    previous = fit_call
    for name, at in marks.items():
        phases[name] = at - previous
        previous = at
    return {name: round(seconds, 3) for name, seconds in phases.items()}


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(array, dtype=np.int64))


def _publish(
    config: Config, store, ctx: StageContext, inputs: dict, tokenizer, result, metrics: dict, timings: dict
) -> dict[str, Any]:
    common = {
        "stage": NAME,
        "config": config.to_dict(),
        "inputs": inputs,
        "cache_key": ctx.cache_key,
        "code_fingerprint": code_fingerprint(NAME),
        "timings": timings,
    }
    with tempfile.TemporaryDirectory() as tmp, result.checkpoint.as_directory() as ckpt:
        tok_dir, model_dir = Path(tmp) / "tokenizer", Path(tmp) / "base-model"
        tokenizer.save_pretrained(tok_dir)
        shutil.copytree(Path(ckpt) / "hf_model", model_dir)
        tokenizer.save_pretrained(model_dir)
        reports = Path(tmp) / "reports"  # curves and timings: outside the model's digest
        reports.mkdir()
        shutil.copy(Path(ckpt) / "metrics.jsonl", reports / "metrics.jsonl")
        history = [json.loads(line) for line in (reports / "metrics.jsonl").read_text().splitlines() if line]
        plot_loss_curve(
            history, reports / "loss_curve.png", unigram_loss=float(np.log(metrics["unigram_perplexity"]))
        )
        tok_metrics = {"vocab_size": len(tokenizer)}
        from stages.common.gates import verdict  # the flow checks the gate on both outputs' metrics together

        gate = verdict(NAME, config.gate, {**tok_metrics, **metrics})
        tokenizer_artifact = store.publish(tok_dir, name="tokenizer", kind="tokenizer", metrics=tok_metrics,
                                           gate=gate, **common)  # fmt: skip
        model_artifact = store.publish(model_dir, name="base-model", kind="causal-lm", metrics=metrics,
                                       reports=reports, gate=gate, **common)  # fmt: skip
    ctx.log(f"pretrain: published {tokenizer_artifact.ref} and {model_artifact.ref}")
    return {"tokenizer": tokenizer_artifact, "base-model": model_artifact}
