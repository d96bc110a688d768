"""What MLflow gets from a run, as pure functions: config flattened to dotted keys, values and keys cut or cleaned to
MLflow's limits with credentials masked, manifest metrics and metrics.jsonl curves as numbers, lineage tags, a
stage's start and end. flows/tracking.py's `Tracker` sends them.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from stages.common.redact import redact_credentials
from stages.common.store import Artifact

# MLflow's limits (mlflow/utils/validation.py in 3.17): values beyond them are rejected, so we cut them first.
PARAM_VALUE_MAX = 6000
TAG_VALUE_MAX = 8000
KEY_MAX = 250
# Keys of a metrics.jsonl row that give its x-axis: "step" (Trainer and pretraining logs), "iteration" (PPO's).
STEP_KEYS = ("step", "iteration")


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}; other values are kept."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def clip(text: str, limit: int) -> str:
    """text cut to at most limit characters, saying how much was cut (MLflow rejects longer values)."""
    if len(text) <= limit:
        return text
    marker = f"...[{len(text)} chars]"
    return text[: limit - len(marker)] + marker


def param_value(value: Any) -> str:
    """A config value as MLflow param text: scalars as str (None -> "None"), lists and mappings as JSON; a URI's
    credentials masked (`s3://key:***@bucket`), since everyone who reads the experiment reads its params."""
    text = value if isinstance(value, str) else (
        json.dumps(value) if isinstance(value, list | tuple | dict) else str(value))  # fmt: skip
    return clip(redact_credentials(text), PARAM_VALUE_MAX)


def tag_value(value: Any) -> str:
    """A tag as MLflow stores it: text, a URI's credentials masked, cut to MLflow's limit."""
    return clip(redact_credentials(str(value)), TAG_VALUE_MAX)


def safe_key(key: str) -> str:
    """A param/metric/tag key MLflow accepts: letters, digits, _ - . space : /, no path tricks, <= 250 chars."""
    key = re.sub(r"[^/\w.\- :]", "_", key)
    if posixpath.normpath(key) != key or key.startswith(("/", "..")) or key in ("", "."):
        key = key.replace("/", "_") or "_"
        key = "_" + key if key.startswith(".") else key
    return key[:KEY_MAX]


def metric_value(value: Any) -> float | None:
    """A number MLflow can store (bools as 0/1), or None for anything else (strings, None, lists)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a manifest's metrics, nested ones flattened to dotted keys."""
    return {k: v for k, v in ((k, metric_value(v)) for k, v in flatten(metrics).items()) if v is not None}


def read_curves(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each numeric key of a metrics.jsonl file as (step, value) points, in file order.

    A row's step is its "step" key, else its "iteration" key; rows with neither (or unreadable lines) are skipped.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        step_key = next((k for k in STEP_KEYS if metric_value(row.get(k)) is not None), None)
        if step_key is None:
            continue
        step = int(row[step_key])
        for key, raw in row.items():
            value = metric_value(raw) if key not in STEP_KEYS else None
            if value is not None:
                curves.setdefault(key, []).append((step, value))
    return curves


def by_output(per_output: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Merge each output's entries into one namespace; a key that two outputs share becomes "<output>/<key>"."""
    seen: dict[str, int] = {}
    for entries in per_output.values():
        for key in entries:
            seen[key] = seen.get(key, 0) + 1
    merged: dict[str, Any] = {}
    for name, entries in sorted(per_output.items()):
        for key, value in entries.items():
            merged[key if seen[key] == 1 else f"{name}/{key}"] = value
    return merged


def lineage_tags(outputs: Mapping[str, Artifact], inputs: Mapping[str, Artifact]) -> dict[str, str]:
    """output.<name>.ref/digest and input.<role>.ref/digest for every artifact a stage made or read."""
    tags: dict[str, str] = {}
    for side, artifacts in (("output", outputs), ("input", inputs)):
        for name, art in sorted(artifacts.items()):
            tags[f"{side}.{name}.ref"] = art.ref
            tags[f"{side}.{name}.digest"] = art.digest
    return tags


def is_reuse(state: str) -> bool:
    return state.lower() in ("cached", "reused")


def is_failure(state: str) -> bool:
    return state.lower() in ("failed", "crashed")


def stage_times_ms(outputs: Mapping[str, Artifact], state: str, now_ms: int) -> tuple[int, int]:
    """(start, end) of a stage run in epoch ms: from the outputs' created_at and wall_seconds when the stage ran here,
    else (a reuse, or no timings) the moment of logging, so MLflow shows the time this pipeline spent on it."""
    if is_reuse(state) or not outputs:
        return now_ms, now_ms
    try:
        end = max(int(datetime.fromisoformat(a.manifest["created_at"]).timestamp() * 1000) for a in outputs.values())
    except (KeyError, TypeError, ValueError):
        return now_ms, now_ms
    wall = max(metric_value(a.manifest.get("timings", {}).get("wall_seconds")) or 0.0 for a in outputs.values())
    return end - int(wall * 1000), end


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return clip(redact_credentials(text), limit)  # masked before the cut, which could split a password from its @
