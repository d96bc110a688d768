"""What a run wrote into its checkpoints, so a resume loads only those bytes (issue 27 item 3).

Checkpoints hold torch pickles (DeepSpeed loads them with weights_only=False) and the model a TRL stage publishes.
A work_dir on a shared bucket may be writable by more people than the store, so each writer records, beside the
files, a marker `rlhf-digests-<writer>.json` with the sha256 and size of every file it put in that folder (one per
writer: the ranks of a DeepSpeed run upload into one merged folder). Before a checkpoint is loaded, `check` holds
every file against the markers of the folders above it:
- no marker, or a file missing or shorter than recorded: a torn upload (a run killed mid-copy), not a checkpoint;
- a file whose bytes differ, or one no marker lists (an added pickle): untrusted. Policy "refuse" raises
  `UntrustedCheckpoint` naming the file; "retrain" passes the checkpoint over (train from the last good one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.common.errors import StageInputError
from stages.common.store_files import file_sha256

MARKER_PREFIX = "rlhf-digests-"
POLICIES = ("refuse", "retrain")


class UntrustedCheckpoint(StageInputError):
    """A checkpoint file that no run recorded writing (changed bytes, an added file); the message names it."""


def _is_marker(name: str) -> bool:
    return name.startswith(MARKER_PREFIX) and name.endswith(".json")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not _is_marker(p.name))


def record(folder: str | os.PathLike, writer: str) -> None:
    """Write `folder`'s marker for `writer` (e.g. "rank0"): every file under it but other markers. Call it last."""
    root = Path(folder)
    entries = {p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
               for p in _files(root)}
    tmp = root / f".{MARKER_PREFIX}{writer}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=0, sort_keys=True))
    os.replace(tmp, root / f"{MARKER_PREFIX}{writer}.json")  # ends in .json only when whole


def _markers(root: Path) -> dict[Path, list[dict]]:
    """folder -> the entries of each marker in it; a marker that does not parse counts as absent (torn)."""
    found: dict[Path, list[dict]] = {}
    for m in root.rglob(f"{MARKER_PREFIX}*.json"):
        try:
            entries = json.loads(m.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(entries, dict):
            found.setdefault(m.parent, []).append(entries)
    return found


def verdict(folder: str | os.PathLike) -> tuple[str, str]:
    """("ok" | "torn" | "untrusted", what): torn and untrusted say which file and why."""
    root = Path(folder)
    markers = _markers(root)
    if not markers:
        return "torn", f"{root}: no {MARKER_PREFIX}*.json marker (not written by a run of this product, or torn)"
    for base, lists in markers.items():  # every recorded file present and whole
        for entries in lists:
            for rel, entry in entries.items():
                p = base / rel
                if not p.is_file() or p.stat().st_size < entry["size"]:
                    return "torn", f"{p}: missing or shorter than recorded"
    for p in _files(root):
        claims = [entries[rel] for base, lists in markers.items() if base == p.parent or base in p.parents
                  for entries in lists if (rel := p.relative_to(base).as_posix()) in entries]
        if not claims:
            return "untrusted", f"{p}: no run recorded writing this file"
        size, digest = p.stat().st_size, file_sha256(p)
        if not any(c["size"] == size and c["sha256"] == digest for c in claims):
            return "untrusted", f"{p}: its bytes differ from those the run recorded"
    return "ok", ""


def check(folder: str | os.PathLike, policy: str) -> bool:
    """True if `folder` may be loaded; False if it is torn, or untrusted under "retrain"; raises under "refuse"."""
    state, what = verdict(folder)
    if state == "untrusted" and policy != "retrain":
        raise UntrustedCheckpoint(f"untrusted checkpoint: {what}; refusing to load it (remove the folder, or set "
                                  "run.untrusted_checkpoints=retrain to train without it)")
    return state == "ok"
