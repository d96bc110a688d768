"""Stage code fingerprints and cache keys: the basis of staleness detection (DESIGN.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_STAGES_ROOT = Path(__file__).resolve().parent.parent


def code_fingerprint(stage: str) -> str:
    """sha256 over the stage package's .py sources plus the shared plumbing they run on (first 16 hex chars).

    Editing a stage's code (or the shared code under it) changes the fingerprint, so the stage reruns.
    """
    h = hashlib.sha256()
    for pkg in (stage, "common"):
        root = _STAGES_ROOT / pkg
        for f in sorted(root.rglob("*.py")):
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
