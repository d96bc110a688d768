"""The stage cache of an artifact store: `cache/<cache_key>.json` records which verified outputs a cache key produced.

A record is {outputs: {output_name: {name, version, digest}}, parts, recorded_at}; older records are the outputs
mapping alone, and both shapes are read. `StageCache` is a part of `ArtifactStore` (store.py), kept here so that the
store's module holds the manifests and this one the cache; it uses the store's `fs`, `_p`, `_backend` and `get`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from stages.common.store_files import ArtifactError, to_json

_CACHE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class StageCache:
    """`record_cache`, `cached` and `latest_cache_record` of `ArtifactStore`."""

    def _cache_path(self, cache_key: str) -> str:
        if not _CACHE_KEY_RE.match(cache_key or ""):
            raise ArtifactError(f"cache key {cache_key!r}: expected 1-128 letters, digits, '_' or '-'")
        return self._p("cache", f"{cache_key}.json")

    def record_cache(self, cache_key: str, outputs: dict[str, Any], parts: dict | None = None) -> None:
        """Remember that cache_key produced outputs ({output_name: artifact}), so a rerun can be skipped.

        `parts`: what the key was computed from ({"node", "code", "config", "inputs"}, flows/keys.py), kept beside
        the outputs so that a later plan can say which part changed (`latest_cache_record`). Without it the record
        is the outputs alone, as records were before the parts were kept (both shapes are read)."""
        entry: dict = {out: {"name": a.name, "version": a.version, "digest": a.digest} for out, a in outputs.items()}
        if parts is not None:
            entry = {"outputs": entry, "parts": parts, "recorded_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        data = to_json(entry, f"cache {cache_key}")
        self._backend.replace(self._cache_path(cache_key), data)  # readers see the old entry or the new one

    def cached(self, cache_key: str) -> dict[str, Any] | None:
        """The verified outputs recorded for cache_key, or None if any is missing or corrupt (meaning: rerun)."""
        try:
            entry = _cache_outputs(json.loads(self.fs.cat_file(self._cache_path(cache_key))))
            outputs = {}
            for out, rec in entry.items():
                art = self.get(f"{rec['name']}@v{rec['version']}")
                if art.digest != rec["digest"]:
                    return None
                outputs[out] = art
            return outputs
        except (FileNotFoundError, ArtifactError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def latest_cache_record(self, node: str) -> dict | None:
        """The newest cache record of `node` that kept its key's parts: {"key", "parts", "recorded_at", "outputs"};
        None when it has none (records written before the parts were kept name no node)."""
        base = self._p("cache")
        self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return None
        latest = None
        for path in self.fs.ls(base, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue
            try:
                entry = json.loads(self.fs.cat_file(path))
            except (FileNotFoundError, ValueError):
                continue
            parts = entry.get("parts") if isinstance(entry, dict) else None
            if not isinstance(parts, dict) or parts.get("node") != node:
                continue
            if latest is None or str(entry.get("recorded_at", "")) > latest["recorded_at"]:
                latest = {"key": name[: -len(".json")], "parts": parts, "recorded_at": str(entry.get("recorded_at", "")),
                          "outputs": entry.get("outputs", {})}  # fmt: skip
        return latest


def _cache_outputs(entry: dict) -> dict:
    """A cache record's outputs, in either shape (with its key's parts, or the outputs alone)."""
    if isinstance(entry, dict) and isinstance(entry.get("parts"), dict) and isinstance(entry.get("outputs"), dict):
        return entry["outputs"]
    return entry
