"""Bring your own model, tokenizer or data set into the artifact store (`rlhf artifacts import`, `sft.base_model: DIR`).

A local Hugging Face directory becomes a content-addressed artifact like any a stage publishes, after the checks that
would otherwise fail hours later inside a Ray worker: a readable config.json, a head the pipeline can load, safetensors
weights (never pickles), a tokenizer that fits the embedding. Only the files a HF directory needs are copied, so stray
checkpoints, pickles or custom code next to the model never enter the store. Weights are never loaded: the parameter
count comes from the safetensors headers. Every refusal is one `ArtifactImportError` line, and nothing is published.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from stages.common.store import Artifact, ArtifactError, ArtifactStore

MODEL_KINDS = ("causal-lm", "reward-model", "tokenizer")
KINDS = (*MODEL_KINDS, "dataset")

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Everything AutoTokenizer may read, across fast (tokenizer.json), BPE (vocab+merges), WordPiece, sentencepiece and
# tiktoken tokenizers, plus the chat template files transformers 5 writes next to them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_SUFFIXES = (".tiktoken",)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# Weights that unpickle on load: arbitrary code execution, so they never enter the store.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # the rule ArtifactStore.publish applies, checked before hashing
_MAX_HEADER_BYTES = 100 << 20  # safetensors caps its JSON header at 100 MB


class ArtifactImportError(ArtifactError):
    """A local directory or file that cannot become an artifact; one line naming the path, expected and found."""


# ------------------------------------------------------------------------------------------------ public API


def import_model(store: ArtifactStore, path: str | os.PathLike, kind: str, name: str) -> Artifact:
    """Check a local HF directory for `kind` and publish its needed files as `name`; identical content -> same version."""
    if kind not in MODEL_KINDS:
        raise ArtifactImportError(f"import {path}: kind {kind!r} is not a model kind (expected one of "
                                  f"{', '.join(MODEL_KINDS)}; use import_dataset for data)")
    check_name(name)
    src = _existing_dir(path)
    files, record = (_tokenizer_files(src) if kind == "tokenizer" else _model_files(src, kind))
    with tempfile.TemporaryDirectory(prefix="rlhf-import-") as staging:
        _link_files(src, files, Path(staging))
        record.update(_check_tokenizer(src, Path(staging), kind, record.get("config_vocab_size")))
        record["files_left_out"] = _left_out(src, files)
        metrics = {k: record[k] for k in ("n_params", "vocab_size") if record.get(k) is not None}
        same = store.find_identical(name, staging)
        if same is not None:  # hashing is a read; publishing again would copy every weight only to find it stored
            return same
        return store.publish(
            staging,
            name=name,
            kind=kind,
            stage="import",
            config={"source": str(src), "kind": kind},
            metrics=metrics,
            extra=record,
        )


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), read without the weights;
    a file whose header is unreadable or whose size disagrees with it (truncated download) is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise ArtifactImportError(f"{path}: not a safetensors file (no valid header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ArtifactImportError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactImportError(f"{path}: not a safetensors file (its header is not a table of tensors)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        data_bytes = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
        for t in tensors.values():
            [int(d) for d in t["shape"]]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ArtifactImportError(f"{path}: not a safetensors file (a tensor entry lacks shape or offsets)") from None
    if 8 + length + data_bytes != size:  # the format indexes every data byte, so any other size is a broken file
        raise ArtifactImportError(
            f"{path}: truncated or damaged safetensors file (header says {8 + length + data_bytes} bytes, "
            f"found {size})"
        )
    return tensors


# ------------------------------------------------------------------------------------------------ directory checks


def check_name(name: str) -> None:
    if not _NAME_RE.match(name or "") or name == "latest":
        raise ArtifactImportError(
            f"artifact name {name!r}: expected letters, digits, '.', '_' or '-' (not starting with one of '._-')"
        )


def _existing_dir(path: str | os.PathLike) -> Path:
    src = Path(path).expanduser()
    if not src.exists():
        raise ArtifactImportError(f"import {path}: no such directory")
    if not src.is_dir():
        raise ArtifactImportError(f"import {path}: expected a Hugging Face model or tokenizer directory, found a file")
    return src.resolve()


def _read_config(src: Path) -> dict[str, Any]:
    path = src / CONFIG_FILE
    if not path.is_file():
        raise ArtifactImportError(f"import {src}: no config.json (expected a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ArtifactImportError(f"{path}: no model_type (expected a transformers config, found keys "
                                  f"{', '.join(sorted(config)[:8]) if isinstance(config, dict) else type(config)})")
    return config


def _check_head(config: dict[str, Any], kind: str, where: Path) -> None:
    """The model must load with the Auto class the pipeline uses for `kind`, and its weights must hold that head."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = config["model_type"]
    archs = config.get("architectures") or []
    if kind == "causal-lm":
        loads_as = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if loads_as is None:
            raise ArtifactImportError(
                f"{where}: model_type {model_type!r} is not loadable by AutoModelForCausalLM in transformers "
                "(custom code is not run); expected a causal LM such as llama, qwen2, gpt2, gpt_neox"
            )
        # Another head (a classifier, a bare encoder) would load with a random LM head and no error at all.
        if archs and not any(a == loads_as or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise ArtifactImportError(
                f"{where}: architectures {', '.join(archs)} is not a causal LM (AutoModelForCausalLM loads "
                f"{loads_as} for model_type {model_type!r})"
                + ("; import it as --kind reward-model" if any("SequenceClassification" in a for a in archs) else "")
            )
        return
    loads_as = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    if loads_as is None or not any(a == loads_as or a.endswith("ForSequenceClassification") for a in archs):
        raise ArtifactImportError(
            f"{where}: a reward model must be a sequence classifier with num_labels 1, found architectures "
            f"{', '.join(archs) or 'none'} (model_type {model_type!r})"
        )
    num_labels = _num_labels(config)
    if num_labels != 1:
        raise ArtifactImportError(
            f"{where}: a reward model must have num_labels 1 (one scalar score), found num_labels {num_labels}"
        )


def _num_labels(config: dict[str, Any]) -> int:
    """How transformers counts labels: id2label when saved (it always is), else num_labels, else its default 2."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _weight_files(src: Path) -> list[str]:
    """The safetensors files the model loads from: the index and the shards it names, or model.safetensors."""
    index = src / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()), key=str)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactImportError(f"{index}: not a safetensors index (expected a weight_map of shards)") from None
        for shard in shards:
            if not _plain_relative_name(shard):
                raise ArtifactImportError(f"import {src}: {WEIGHTS_INDEX_FILE} names shard {shard!r}, which is not a "
                                          "plain file name inside the folder")
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise ArtifactImportError(
                f"{index}: names shard {missing[0]} which is missing ({len(missing)} of {len(shards)} shards missing)"
            )
        return [WEIGHTS_INDEX_FILE, *shards]
    if (src / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    pickles = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ArtifactImportError(
            f"import {src}: pickled weights ({', '.join(pickles[:3])}) are refused because loading them runs code; "
            "convert to safetensors first: model.save_pretrained(DIR, safe_serialization=True)"
        )
    others = sorted(p.name for p in src.glob("*.safetensors"))
    found = f"found {', '.join(others[:3])}" if others else "found no weights"
    if (src / "adapter_config.json").is_file():
        found += "; this is a PEFT adapter: merge it into its base model first"
    raise ArtifactImportError(f"import {src}: no model weights (expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} "
                              f"with its shards; {found})")


def _model_files(src: Path, kind: str) -> tuple[list[str], dict[str, Any]]:
    """Check a model directory for `kind`; returns the files to copy and what the manifest records about it."""
    config = _read_config(src)
    _check_head(config, kind, src / CONFIG_FILE)
    weights = _weight_files(src)
    for name in weights:  # before reading a header: a link to a device or a FIFO outside would hang here
        _inside(src, name)
    n_params, dtypes = 0, set()
    for name in weights:
        if name.endswith(".safetensors"):
            for tensor in safetensors_header(src / name).values():
                n_params += math.prod(int(d) for d in tensor["shape"])
                dtypes.add(tensor.get("dtype"))
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    context = text_config.get("n_positions") or text_config.get("max_position_embeddings")
    files = [CONFIG_FILE, *weights]
    if (src / GENERATION_CONFIG_FILE).is_file():
        files.append(GENERATION_CONFIG_FILE)
    files += _tokenizer_names(src)
    record = {
        "source": str(src),
        "model_type": config["model_type"],
        "architectures": config.get("architectures") or [],
        "n_params": n_params,
        "weights_dtypes": sorted(str(d) for d in dtypes),
        "config_vocab_size": text_config.get("vocab_size"),
        "context": context,
    }
    return files, record


def _tokenizer_names(src: Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    names += sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix in TOKENIZER_SUFFIXES)
    if (src / CHAT_TEMPLATE_DIR).is_dir():
        names += sorted(f"{CHAT_TEMPLATE_DIR}/{p.name}" for p in (src / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    return names


def _tokenizer_files(src: Path) -> tuple[list[str], dict[str, Any]]:
    names = _tokenizer_names(src)
    if not names:
        raise ArtifactImportError(
            f"import {src}: no tokenizer files (expected tokenizer.json or tokenizer_config.json with its vocabulary)"
        )
    return names, {"source": str(src)}


def _check_tokenizer(src: Path, staging: Path, kind: str, embedding_rows: int | None) -> dict[str, Any]:
    """Load the tokenizer from exactly the files that will be stored, and check it fits the model's embedding."""
    if not _tokenizer_names(staging):
        # The pipeline takes the tokenizer from the model artifact (sft, reward and ppo all load it from there).
        raise ArtifactImportError(
            f"import {src}: no tokenizer next to the model (a {kind} artifact must carry its tokenizer: save it "
            "into the same directory with tokenizer.save_pretrained(DIR))"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(staging)
    except Exception as e:  # noqa: BLE001 - many library errors, one meaning: these files are not a tokenizer
        raise ArtifactImportError(f"import {src}: the tokenizer does not load with AutoTokenizer ({_reason(e)})") from None
    vocab = len(tokenizer)
    if embedding_rows is not None and vocab > int(embedding_rows):
        raise ArtifactImportError(
            f"import {src}: the tokenizer has {vocab} tokens but config.json's vocab_size is {embedding_rows}: "
            "the tokenizer does not fit the model's embedding (they come from different models?)"
        )
    return {
        "vocab_size": vocab,
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------------ staging, hashing


def _plain_relative_name(name: object) -> bool:
    """A POSIX name relative to its folder that stays in it: no absolute name, no `..`, `.` or empty part, no backslash."""
    return (isinstance(name, str) and not name.startswith("/") and "\\" not in name and "\0" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


def _inside(src: Path, name: str) -> Path:
    """Where src/name really is; a link that leaves the folder is refused, so a link to a secret or to another user's
    files never enters the store. The one exception is the Hugging Face hub cache, whose snapshots/REV folders link
    every file to the repo's blobs/ folder (what `huggingface_hub.snapshot_download` returns)."""
    real = (src / name).resolve()
    if real.is_relative_to(src):
        return real
    if src.parent.name == "snapshots" and real.parent == src.parent.parent / "blobs":
        return real
    raise ArtifactImportError(f"import {src}: {name} is a link to {real}, outside the folder (copy the file in "
                              "instead of linking it)")


def _link_files(src: Path, names: list[str], staging: Path) -> None:
    """Stage the chosen files as symlinks: the store copies (and hashes) each once, straight from the source.
    Every file is checked to lie inside src before any link is made."""
    real = {name: _inside(src, name) for name in names}
    for name in names:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(real[name], target)


def _left_out(src: Path, copied: list[str]) -> list[str]:
    """Top-level entries not copied (pickles, custom code, other checkpoints), recorded so a user sees what was dropped."""
    keep = {n.split("/", 1)[0] for n in copied}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in src.iterdir() if p.name not in keep)[:50]
