"""Aliases of an artifact store: `NAME@ALIAS` names one version chosen by a person or a tool (`rlhf sweep --promote`
gives the best trial's artifacts `@best`), as `@latest` names the newest that passed its gate.

An alias is `aliases/<name>/<alias>.json` = {name, version, digest, set_at, note}, replaced atomically when moved.
Nothing read from a store is trusted: a record whose version is gone or whose digest differs from that version's
manifest is refused with one line, never followed. `AliasRecords` is a part of `ArtifactStore` (store.py); it uses the
store's `fs`, `_p`, `_backend`, `_versions` and `_read_manifest`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from stages.common.redact import redact_credentials
from stages.common.store_files import ArtifactCorrupted, ArtifactError, to_json

# a lowercase word; not `latest` nor `vN`, which the store resolves itself
ALIAS_RE = re.compile(r"^(?!latest\Z)(?!v[0-9]+\Z)[a-z][a-z0-9_-]{0,63}\Z")


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias or ""):
        raise ArtifactError(f"alias {alias!r}: expected a lowercase word (letters, digits, '-', '_'), not 'latest' or vN")
    return alias


class AliasRecords:
    """`set_alias`, `aliases` and `_resolve_alias` of `ArtifactStore`."""

    def set_alias(self, name: str, version: int, alias: str, *, note: str = "") -> dict:
        """Point NAME@ALIAS at name@v<version> (which must exist); an earlier target of the alias is replaced."""
        check_alias(alias)
        manifest = self._read_manifest(name, version) if version in self._versions(name) else None
        if manifest is None:
            raise ArtifactError(f"{name}@v{version}: no such version to alias as @{alias}")
        record = {"name": name, "version": version, "digest": manifest["digest"],
                  "set_at": datetime.now(UTC).isoformat(timespec="seconds"), "note": note}  # fmt: skip
        self._backend.replace(self._p("aliases", name, f"{alias}.json"), to_json(record, f"alias {name}@{alias}"))
        return record

    def aliases(self, name: str) -> dict[str, dict]:
        """Every alias of `name`: alias -> its record (unchecked; resolving one checks it)."""
        base = self._p("aliases", name)
        self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return {}
        out = {}
        for path in self.fs.ls(base, detail=False):
            alias = path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
            if ALIAS_RE.match(alias):
                out[alias] = self._alias_record(name, alias)
        return out

    def _alias_record(self, name: str, alias: str) -> dict:
        try:
            record = json.loads(self.fs.cat_file(self._p("aliases", name, f"{alias}.json")))
        except FileNotFoundError:
            have = ", ".join(f"@{a}" for a in sorted(self.aliases(name))) or "none"
            raise ArtifactError(f"{name}@{alias}: no such alias in {redact_credentials(self.root)} "
                                f"(aliases of {name}: {have}; versions: NAME@vN, NAME@latest)") from None  # fmt: skip
        except ValueError as e:
            raise ArtifactCorrupted(f"{name}@{alias}: alias record is not valid JSON ({e})") from None
        if not isinstance(record, dict) or record.get("name") != name or not isinstance(record.get("version"), int):
            raise ArtifactCorrupted(f"{name}@{alias}: alias record does not name a version of {name}")
        return record

    def _resolve_alias(self, name: str, alias: str) -> dict:
        """The manifest NAME@ALIAS points at, checked against the digest the alias recorded."""
        record = self._alias_record(name, alias)
        manifest = self._read_manifest(name, record["version"])
        if manifest is None or manifest["digest"] != record.get("digest"):
            raise ArtifactCorrupted(f"{name}@{alias}: points at {name}@v{record['version']}, which is "
                                    + ("missing" if manifest is None else "another content than the alias recorded"))
        return manifest
