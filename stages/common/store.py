"""Versioned, content-addressed, verified artifact store on a local folder or any fsspec URI (DESIGN.md "Artifacts").

Layout under the root:
  objects/<digest>/...          the files, shared by every manifest with identical content
  manifests/<name>/v<N>.json    the commit marker of name@vN, written last and created exclusively
  cache/<cache_key>.json        {outputs: {output_name: {name, version, digest}}, parts, recorded_at} for stage-level
                                caching (older records: the outputs mapping alone)
  tmp/                          half-written objects of publishers in flight (or killed); readers ignore it

This module holds the public API and the manifest logic (refs, versions, lineage). The stage cache's records are
store_cache.py's (`StageCache`, a part of `ArtifactStore`). How files are written is the backend's: store_local.py
(atomic rename, os.link) or store_remote.py (upload, exclusive claims). Hashing and the once-per-process
verification record are in store_files.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.common.redact import redact_credentials
from stages.common.store_aliases import ALIAS_RE, AliasRecords
from stages.common.store_cache import StageCache
from stages.common.store_files import (
    ArtifactCorrupted,
    ArtifactError,
    check_file_names,
    file_sha256,
    local_files,
    to_json,
    tree_digest,
)
from stages.common.store_local import LocalBackend
from stages.common.store_remote import RemoteBackend

__all__ = ["Artifact", "ArtifactCorrupted", "ArtifactError", "ArtifactStore", "library_versions", "tree_digest"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # \Z: `$` would let a trailing newline through
_MANIFEST_RE = re.compile(r"^v([1-9][0-9]*)\.json$")
_HEX_RE = re.compile(r"^[0-9a-f]{6,64}$")
_LIBRARIES = ("torch", "transformers", "trl", "deepspeed", "ray", "datasets")


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: its identity, a local directory with its files (read-only) and its manifest."""

    name: str
    version: int
    digest: str
    kind: str
    path: str
    manifest: dict
    reports_path: str = ""  # the verified local folder of its reports (curves, plots, samples), "" if it has none

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape an artifact, read from package metadata (no heavy imports)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for lib in _LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def _versions_text(versions: list[int]) -> str:
    if len(versions) > 1 and versions == list(range(versions[0], versions[-1] + 1)):
        return f"v{versions[0]}..v{versions[-1]}"
    return ", ".join(f"v{v}" for v in versions) or "no versions"


class ArtifactStore(StageCache, AliasRecords):
    """Publish and load immutable artifacts, versioned per name, on a local folder or an fsspec URI (its stage-cache
    records: `StageCache`, store_cache.py; its aliases, NAME@best: `AliasRecords`, store_aliases.py)."""

    def __init__(self, root: str | os.PathLike = "./artifacts"):
        self.fs, path = fsspec.core.url_to_fs(str(root))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # _base: the path inside fs that every file path is joined to; root: what the user named (URI kept, so
        # callers can tell a shared s3:// or file:// root from a plain local folder).
        self._base = os.path.abspath(os.path.expanduser(path)) if self.is_local else path.rstrip("/")
        self.root = str(root) if "://" in str(root) else self._base
        if self.is_local and os.path.exists(self._base) and not os.path.isdir(self._base):
            raise ArtifactError(f"artifact store {self.root!r}: expected a folder, found a file")
        try:
            self._backend = LocalBackend(self._base) if self.is_local else RemoteBackend(self.fs, self._base, self.root)
        except OSError as e:  # a parent that is a file, no permission: one line, not a traceback
            raise ArtifactError(f"artifact store {self.root!r}: cannot create its folders ({e.strerror or e})") from None

    def __repr__(self) -> str:
        return f"ArtifactStore({redact_credentials(self.root)!r})"

    def _p(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    # ---------------------------------------------------------------- publish

    def publish(
        self,
        src_dir: str | os.PathLike,
        *,
        name: str,
        kind: str,
        stage: str,
        config: dict | None = None,
        inputs: dict[str, Artifact] | None = None,
        metrics: dict | None = None,
        timings: dict | None = None,
        code_fingerprint: str = "",
        cache_key: str = "",
        extra: dict | None = None,
        reports: str | os.PathLike | None = None,
        gate: dict | None = None,
    ) -> Artifact:
        """Copy src_dir's files in and commit a new version of name; identical content from the same inputs returns
        the existing version.

        `reports`: a folder of what the run wrote about itself (curves, plots, samples, timings). Its files are
        stored and verified like the content's, but outside the digest: the same weights trained again are the same
        artifact, whatever the wall-clock numbers in their logs say.
        `gate`: the stage's quality-gate verdict (stages.common.gates.verdict); a version that missed it is never
        `NAME@latest`.
        """
        if not _NAME_RE.match(name or "") or name == "latest":
            raise ArtifactError(
                f"artifact name {name!r}: expected letters, digits, '.', '_' or '-' (not starting with one of '._-')"
            )
        src = Path(src_dir)
        if not src.is_dir():
            raise ArtifactError(f"publish {name}: source directory {str(src)!r} does not exist")
        sources = local_files(src)
        if not sources:
            raise ArtifactError(f"publish {name}: source directory {str(src)!r} holds no files")
        files, digest = self._backend.put_object(sources)
        report_entry = None
        if reports is not None and Path(reports).is_dir() and local_files(Path(reports)):
            report_files, report_digest = self._backend.put_object(local_files(Path(reports)))
            report_entry = {"digest": report_digest, "files": report_files}
        manifest = {
            "name": name,
            "version": 0,
            "digest": digest,
            "kind": kind,
            "stage": stage,
            "code_fingerprint": code_fingerprint,
            "cache_key": cache_key,
            "config": config or {},
            "inputs": {
                role: {"name": a.name, "version": a.version, "digest": a.digest, "kind": a.kind}
                for role, a in sorted((inputs or {}).items())
            },
            "metrics": metrics or {},
            "timings": timings or {},
            "extra": extra or {},
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "library_versions": library_versions(),
            "files": files,
        }
        if report_entry is not None:
            manifest["reports"] = report_entry
        if gate is not None:
            manifest["gate"] = gate
        to_json(manifest, f"publish {name}")  # fail early, before claiming a version number
        manifest = self._commit(manifest)
        where = f"{name}@v{manifest['version']}"
        return self._artifact(manifest, self._backend.object_dir(manifest, where), self._reports_dir(manifest, where))

    def _reports_dir(self, manifest: dict, where: str, *, force: bool = False) -> str:
        """The verified local folder of an artifact's reports ("" when it has none)."""
        entry = manifest.get("reports")
        if not entry:
            return ""
        check_file_names(entry["files"], f"{where} reports")
        if tree_digest(entry["files"]) != entry["digest"]:
            raise ArtifactCorrupted(f"{where}: the reports' file list does not match its digest {entry['digest'][:12]}")
        if force:
            return self._backend.verify_stored(entry, f"{where} reports")
        return self._backend.object_dir(entry, f"{where} reports")

    def _commit(self, manifest: dict) -> dict:
        """Write manifests/<name>/v<N>.json exclusively; on a lost race re-check for identical content and retry N+1.

        An earlier version is reused only when it holds the same content made from the same inputs: the same bytes
        from other inputs (a GRPO whose new reward function changed nothing) are a new version pointing at the same
        object, so that its lineage names what made it."""
        name, digest, inputs = manifest["name"], manifest["digest"], manifest["inputs"]
        while True:
            versions = self._versions(name)
            for v in reversed(versions):
                existing = self._read_manifest(name, v)
                if existing is not None and existing["digest"] == digest and existing.get("inputs", {}) == inputs:
                    return existing
            manifest["version"] = (versions[-1] if versions else 0) + 1
            if self._backend.create_exclusive(
                self._p("manifests", name, f"v{manifest['version']}.json"), to_json(manifest, f"publish {name}")
            ):
                return manifest

    # ---------------------------------------------------------------- reading

    def _names(self) -> list[str]:
        base = self._p("manifests")
        self.fs.invalidate_cache(base)  # other publishers add names; a cached listing would hide them
        if not self.fs.exists(base):
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(base, detail=True) if e["type"] == "directory"
        )

    def _versions(self, name: str) -> list[int]:
        base = self._p("manifests", name)
        self.fs.invalidate_cache(base)  # a stale listing would make _commit retry a taken version forever
        if not self.fs.exists(base):
            return []
        found = (_MANIFEST_RE.match(p.rstrip("/").rsplit("/", 1)[-1]) for p in self.fs.ls(base, detail=False))
        return sorted(int(m.group(1)) for m in found if m)

    def _read_manifest(self, name: str, version: int) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._p("manifests", name, f"v{version}.json")))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ArtifactCorrupted(f"{name}@v{version}: manifest is not valid JSON ({e})") from None

    def list(self, name: str | None = None) -> list[dict]:
        """Manifests of every artifact (or of one name), ordered by name then version."""
        names = [name] if name is not None else self._names()
        out = []
        for n in names:
            for v in self._versions(n):
                m = self._read_manifest(n, v)
                if m is not None:
                    out.append(m)
        return out

    def find_identical(self, name: str, directory: str | os.PathLike) -> Artifact | None:
        """The stored version of `name` holding exactly the files of local `directory`, if any.

        Publishing identical content returns that version anyway; asking first lets an import skip a copy of every
        weight, and lets a caller tell new content from old before it publishes."""
        versions = self.list(name)
        if not versions:
            return None
        digest = tree_digest({rel: file_sha256(p) for rel, p in local_files(Path(directory)).items()})
        match = next((m for m in reversed(versions) if m["digest"] == digest), None)
        return self.get(f"{match['name']}@v{match['version']}") if match else None

    def _resolve(self, ref: str, kind: str | None = None) -> dict:
        """Turn a ref (name, name@latest, name@vN, name@alias, digest prefix) into its manifest, or raise a one-line error."""
        ref = str(ref).strip()
        name, sep, sel = ref.partition("@")
        is_version = re.match(r"^(latest|v[1-9][0-9]*)$", sel)
        if not _NAME_RE.match(name) or (sep and not is_version and not ALIAS_RE.match(sel)):
            raise ArtifactError(f"bad artifact ref {ref!r}: expected NAME, NAME@latest, NAME@vN, NAME@ALIAS or a digest "
                                "prefix (>= 6 hex chars)")  # fmt: skip
        if sep and not is_version:
            return self._resolve_alias(name, sel)
        versions = self._versions(name)
        if not versions:
            if not sep and _HEX_RE.match(name):
                return self._resolve_digest(name, kind)
            known = self._names()
            have = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "nothing"
            raise ArtifactError(f"{ref}: no such artifact in {redact_credentials(self.root)}; it has: {have}")
        if sel in ("", "latest"):
            return self._latest_passed(ref, name, versions)
        version = int(sel[1:])
        manifest = self._read_manifest(name, version) if version in versions else None
        if manifest is None:
            raise ArtifactError(f"{ref}: no such version; {name} has {_versions_text(versions)}")
        return manifest

    def _latest_passed(self, ref: str, name: str, versions: list[int]) -> dict:
        """The newest version of name that did not miss its quality gate (one with no record counts as passed)."""
        from stages.common.gates import passed

        missed = []
        for version in reversed(versions):
            manifest = self._read_manifest(name, version)
            if manifest is None:
                continue
            if passed(manifest):
                return manifest
            missed.append(version)
        if not missed:
            raise ArtifactError(f"{ref}: no such version; {name} has {_versions_text(versions)}")
        listed = ", ".join(f"v{v}" for v in sorted(missed))
        raise ArtifactError(f"{ref}: every version missed its quality gate ({listed}); name one to use it anyway, "
                            f"e.g. {name}@v{max(missed)}")

    def _resolve_digest(self, prefix: str, kind: str | None) -> dict:
        matches = [m for m in self.list() if m["digest"].startswith(prefix)]
        if kind is not None and len({m["kind"] for m in matches}) > 1:
            matches = [m for m in matches if m["kind"] == kind]
        if not matches:
            raise ArtifactError(
                f"{prefix}: no artifact has a digest starting with it in {redact_credentials(self.root)}")
        if len({m["digest"] for m in matches}) > 1:  # one content under several names (an import and a
            # config-named copy of it) is not ambiguous: the objects are the same files, so any manifest serves
            cands = ", ".join(f"{m['name']}@v{m['version']} ({m['digest'][:12]})" for m in matches)
            raise ArtifactError(
                f"{prefix}: ambiguous digest prefix, candidates: {cands}; use a longer prefix or NAME@vN"
            )
        return min(matches, key=lambda m: (m["name"], m["version"]))

    def _artifact(self, manifest: dict, path: str = "", reports_path: str = "") -> Artifact:
        return Artifact(
            name=manifest["name"],
            version=manifest["version"],
            digest=manifest["digest"],
            kind=manifest["kind"],
            path=path or self._p("objects", manifest["digest"]),
            manifest=manifest,
            reports_path=reports_path,
        )

    def manifest(self, ref: str, *, kind: str | None = None) -> dict:
        """Resolve ref and check its kind, without reading its files: the cheap path to an artifact's metrics."""
        manifest = self._resolve(ref, kind)
        if kind is not None and manifest["kind"] != kind:
            where = f"{manifest['name']}@v{manifest['version']}"
            raise ArtifactError(f"{ref} ({where}): kind is {manifest['kind']!r}, expected {kind!r}")
        return manifest

    def get(self, ref: str, *, kind: str | None = None) -> Artifact:
        """Resolve ref, check its kind, verify its files and return it with a local path to them.

        Files are hashed once per process: a later get of the same files, unchanged since (same sizes, times and
        inodes), skips the hashing. `verify` always re-hashes.
        """
        manifest = self.manifest(ref, kind=kind)
        where = f"{manifest['name']}@v{manifest['version']}"
        self._check_file_list(manifest, where)
        return self._artifact(manifest, self._backend.object_dir(manifest, where), self._reports_dir(manifest, where))

    def verify(self, ref: str) -> Artifact:
        """Re-hash every stored file of ref (and of its reports) against its manifest; ArtifactCorrupted names the file."""
        manifest = self._resolve(ref)
        where = f"{manifest['name']}@v{manifest['version']}"
        self._check_file_list(manifest, where)
        path = self._backend.verify_stored(manifest, where)
        return self._artifact(manifest, path, self._reports_dir(manifest, where, force=True))

    @staticmethod
    def _check_file_list(manifest: dict, where: str) -> None:
        check_file_names(manifest["files"], where)
        if tree_digest(manifest["files"]) != manifest["digest"]:
            raise ArtifactCorrupted(f"{where}: manifest file list does not match its digest {manifest['digest'][:12]}")

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove leftovers of killed publishers from tmp/ (local roots), sparing recent ones still being written."""
        return self._backend.clean_tmp(older_than_s) if self.is_local else 0

    # ---------------------------------------------------------------- lineage

    def lineage(self, ref: str) -> dict:
        """The input tree of ref: {"ref", "kind", "digest", "inputs": {role: <same shape>}}, recursively."""
        return self._lineage(self._resolve(ref))

    def _lineage(self, manifest: dict) -> dict:
        node = {
            "ref": f"{manifest['name']}@v{manifest['version']}",
            "kind": manifest["kind"],
            "digest": manifest["digest"],
            "inputs": {},
        }
        for role, inp in sorted(manifest.get("inputs", {}).items()):
            parent = self._read_manifest(inp["name"], inp["version"])
            if parent is None or parent["digest"] != inp["digest"]:
                # The input is not (or no longer) in this store: report what the manifest recorded.
                node["inputs"][role] = {
                    "ref": f"{inp['name']}@v{inp['version']}",
                    "kind": inp["kind"],
                    "digest": inp["digest"],
                    "inputs": {},
                    "missing": True,
                }
            else:
                node["inputs"][role] = self._lineage(parent)
        return node
