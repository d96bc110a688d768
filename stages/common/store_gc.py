"""Orphans of a store and their removal (`rlhf artifacts gc`): temp entries of killed publishes (tmp/*), object
folders no manifest references, and claim files of killed remote publishers (manifests/<name>/.claims/...).

What is never removed: an object any readable manifest references (its content or its reports), and anything
younger than the grace period, which a publish in progress may still be writing (its object has no manifest until
the commit) or reusing (a publish of identical content touches the object it reuses). An unreadable manifest stops
the collection of objects altogether: what it references cannot be known.
Residual race, said plainly: a publish that reuses an old orphan object between gc's last check of it and its
removal (a few milliseconds) commits a manifest whose object is gone; `verify` names it and a rerun republishes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime

from stages.common.store_files import ArtifactCorrupted


@dataclass(frozen=True)
class Orphan:
    kind: str  # "tmp", "object" or "claim"
    path: str  # relative to the store root
    bytes: int
    age_s: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _stamp(value) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value or 0.0)


def _tree(store, rel: str) -> tuple[int, float]:
    """(total bytes, newest modification time) of the file or folder rel under the store root."""
    path = store._p(rel)
    if store.is_local:
        if not os.path.isdir(path):
            st = os.lstat(path)
            return st.st_size, st.st_mtime
        size, newest = 0, os.lstat(path).st_mtime
        for dirpath, dirs, names in os.walk(path):
            for n in dirs + names:
                st = os.lstat(os.path.join(dirpath, n))
                newest = max(newest, st.st_mtime)
                size += st.st_size if n in names else 0
        return size, newest
    fs = store.fs
    infos = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    size, newest = 0, 0.0
    for p, info in infos.items():
        size += int(info.get("size") or 0)
        when = info.get("LastModified") or info.get("mtime") or info.get("updated")
        newest = max(newest, _stamp(when) if when is not None else _stamp(fs.modified(p)))
    return size, newest


def _children(store, rel: str) -> list[str]:
    base = store._p(rel)
    store.fs.invalidate_cache(base)
    if not store.fs.exists(base):
        return []
    return sorted(f"{rel}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in store.fs.ls(base, detail=False))


def referenced(store) -> set[str]:
    """Every object digest a manifest names (content and reports); ArtifactCorrupted if one cannot be read."""
    digests = set()
    for name in store._names():
        for version in store._versions(name):
            rel = f"manifests/{name}/v{version}.json"
            try:
                manifest = json.loads(store.fs.cat_file(store._p(rel)))
                digests.add(manifest["digest"])
                if isinstance(manifest.get("reports"), dict):
                    digests.add(manifest["reports"]["digest"])
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as e:
                raise ArtifactCorrupted(f"gc: {rel} cannot be read ({type(e).__name__}: {e}); what it references "
                                        "is unknown, so nothing was removed; fix or remove it first") from None
    return digests


def find_orphans(store, older_than_s: float) -> tuple[list[Orphan], list[Orphan]]:
    """(orphans older than the grace period, younger ones that a publish in progress may still need)."""
    now = time.time()
    found: list[Orphan] = []
    for rel in _children(store, "tmp"):
        found.append(("tmp", rel, "a killed or failed publish's temp entry"))
    keep = referenced(store)
    for rel in _children(store, "objects"):
        if rel.rsplit("/", 1)[-1] not in keep:
            found.append(("object", rel, "no manifest references it"))
    if not store.is_local:
        for name in store._names():
            claims = f"manifests/{name}/.claims"
            for version_dir in _children(store, claims):
                for rel in _children(store, version_dir):
                    found.append(("claim", rel, "a killed publisher's version claim"))
    old, young = [], []
    for kind, rel, reason in found:
        try:
            size, newest = _tree(store, rel)
        except FileNotFoundError:  # gone meanwhile (its publish finished)
            continue
        item = Orphan(kind, rel, size, round(max(0.0, now - newest), 1), reason)
        (old if item.age_s >= older_than_s else young).append(item)
    return old, young


def remove(store, items: list[Orphan], older_than_s: float) -> list[Orphan]:
    """Remove the orphans that are still orphans: objects are checked against the manifests and their age once more
    just before they go (a publish may have committed since they were listed). Returns what was removed."""
    keep = referenced(store) if any(i.kind == "object" for i in items) else set()
    removed = []
    for item in items:
        if item.kind == "object" and item.path.rsplit("/", 1)[-1] in keep:
            continue
        try:
            if time.time() - _tree(store, item.path)[1] < older_than_s:
                continue  # touched since it was listed: in use again
            _remove_one(store, item)
        except FileNotFoundError:
            continue
        removed.append(item)
    return removed


def _remove_one(store, item: Orphan) -> None:
    path = store._p(item.path)
    if not store.is_local:
        store.fs.rm(path, recursive=True)
        return
    if item.kind == "object":  # out of objects/ in one rename, so a reader sees it whole or not at all
        grave = store._p("tmp", f"gc-{uuid.uuid4().hex}")
        os.rename(path, grave)
        path = grave
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
