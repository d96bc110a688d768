"""Stage code fingerprints and cache keys: the basis of staleness detection (DESIGN.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_STAGES_ROOT = Path(__file__).resolve().parent.parent

# The shared modules whose code shapes what a stage computes or measures. The rest of stages/common (the artifact
# store and import, gates, plots, config parsing, errors, this file) can change without changing any result, so
# editing them must not rerun every training stage. A new shared module is left out until it is listed here.
RESULT_SHAPING_COMMON = (
    "collectives.py", "data.py", "deepspeed_config.py", "demo.py", "demo_eval.py", "hf.py", "preference_pairs.py",
    "ray_train.py", "sequences.py", "trl_training.py",
)  # fmt: skip


def fingerprint_files(stage: str) -> list[Path]:
    """The source files a stage's fingerprint covers: its own package and the result-shaping shared modules."""
    own = sorted((_STAGES_ROOT / stage).rglob("*.py"))
    common = [_STAGES_ROOT / "common" / name for name in RESULT_SHAPING_COMMON]
    return own + [f for f in common if f.is_file()]


def code_fingerprint(stage: str) -> str:
    """sha256 over the stage package's .py sources plus the shared code that shapes its results (16 hex chars).

    Editing a stage's code (or the shared code it computes with) changes the fingerprint, so the stage reruns.
    """
    h = hashlib.sha256()
    for f in fingerprint_files(stage):
        h.update(str(f.relative_to(_STAGES_ROOT)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(stage: str, fingerprint: str, config: dict[str, Any], input_digests: dict[str, str]) -> str:
    """hash(stage name, code fingerprint, canonical resolved config, sorted input digests)."""
    payload = {"stage": stage, "code": fingerprint, "config": config, "inputs": dict(sorted(input_digests.items()))}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
