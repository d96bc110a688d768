"""Versioned, content-addressed, verified artifact store on a local folder or any fsspec URI (DESIGN.md "Artifacts").

Layout under the root:
  objects/<digest>/...          the files, shared by every manifest with identical content
  manifests/<name>/v<N>.json    the commit marker of name@vN, written last and created exclusively
  cache/<cache_key>.json        {output_name: {name, version, digest}} for stage-level caching
  tmp/                          half-written objects of publishers in flight (or killed); readers ignore it
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MANIFEST_RE = re.compile(r"^v([1-9][0-9]*)\.json$")
_HEX_RE = re.compile(r"^[0-9a-f]{6,64}$")
_LIBRARIES = ("torch", "transformers", "trl", "deepspeed", "ray", "datasets")
_CHUNK = 8 << 20


class ArtifactError(Exception):
    """A user-facing artifact problem (bad ref, unknown name or version, wrong kind), said in one line."""


class ArtifactCorrupted(ArtifactError):
    """A file of an artifact is missing, extra or fails its sha256 check; the message names the file."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: its identity, a local directory with its files (read-only) and its manifest."""

    name: str
    version: int
    digest: str
    kind: str
    path: str
    manifest: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def tree_digest(files: dict[str, str]) -> str:
    """Content digest of a directory: sha256 over the sorted (relative path, file sha256) pairs."""
    h = hashlib.sha256()
    for rel, sha in sorted(files.items()):
        h.update(rel.encode() + b"\0" + sha.encode() + b"\n")
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape an artifact, read from package metadata (no heavy imports)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for lib in _LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def _hash_stream(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _local_files(directory: Path) -> dict[str, Path]:
    """Every regular file under directory (following file symlinks), keyed by POSIX relative path."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(directory):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file():
                out[p.relative_to(directory).as_posix()] = p
    return out


def _copy_and_hash(src: Path, dst: Path) -> str:
    """Copy src to dst in one read pass, returning the sha256 of the bytes written."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def _versions_text(versions: list[int]) -> str:
    if not versions:
        return "no versions"
    if versions == list(range(versions[0], versions[-1] + 1)) and len(versions) > 1:
        return f"v{versions[0]}..v{versions[-1]}"
    return ", ".join(f"v{v}" for v in versions)


def _to_json(manifest: dict, where: str) -> bytes:
    try:
        return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: manifest is not JSON-serialisable ({e})") from None


class ArtifactStore:
    """Publish and load immutable artifacts, versioned per name, on a local folder or an fsspec URI."""

    def __init__(self, root: str | os.PathLike = "./artifacts"):
        self.fs, path = fsspec.core.url_to_fs(str(root))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # _base: the path inside fs that every file path is joined to; root: what the user named (URI kept, so
        # callers can tell a shared s3:// or file:// root from a plain local folder).
        self._base = os.path.abspath(os.path.expanduser(path)) if self.is_local else path.rstrip("/")
        self.root = str(root) if "://" in str(root) else self._base
        if self.is_local:
            for sub in ("objects", "manifests", "cache", "tmp"):
                os.makedirs(os.path.join(self._base, sub), exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

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
    ) -> Artifact:
        """Copy src_dir's files in and commit a new version of name; identical content returns the existing version."""
        if not _NAME_RE.match(name or "") or name == "latest":
            raise ArtifactError(
                f"artifact name {name!r}: expected letters, digits, '.', '_' or '-' (not starting with one of '._-')"
            )
        src = Path(src_dir)
        if not src.is_dir():
            raise ArtifactError(f"publish {name}: source directory {str(src)!r} does not exist")
        sources = _local_files(src)
        if not sources:
            raise ArtifactError(f"publish {name}: source directory {str(src)!r} holds no files")
        files, digest = self._put_object(sources)
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
        _to_json(manifest, f"publish {name}")  # fail early, before claiming a version number
        manifest = self._commit(manifest)
        if self.is_local:
            return self._artifact(manifest)
        return self._artifact(manifest, self._materialise(manifest, f"{name}@v{manifest['version']}"))

    def _put_object(self, sources: dict[str, Path]) -> tuple[dict[str, str], str]:
        """Store the files under objects/<digest> (atomically on a local root) and return (files, digest)."""
        if self.is_local:
            tmp = Path(self._p("tmp", f"obj-{uuid.uuid4().hex}"))
            files: dict[str, str] = {}
            for rel, p in sources.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                files[rel] = _copy_and_hash(p, tmp / rel)
                os.chmod(tmp / rel, 0o444)  # artifacts are immutable; guard against in-place edits
            digest = tree_digest(files)
            target = self._p("objects", digest)
            try:
                os.rename(tmp, target)  # atomic: the object directory appears complete or not at all
            except OSError:
                if not os.path.isdir(target):
                    raise
                self._keep_or_repair(Path(target), tmp, files)
            return files, digest
        files = {}
        for rel, p in sources.items():
            with open(p, "rb") as f:
                files[rel] = _hash_stream(f)
        digest = tree_digest(files)
        # Object stores write each file whole, so uploading again is safe for concurrent readers, and it repairs
        # an object damaged since it was first published (else a rerun after corruption could never fix it).
        for rel, p in sources.items():
            self.fs.put_file(str(p), self._p("objects", digest, rel))
        return files, digest

    def _keep_or_repair(self, target: Path, fresh: Path, files: dict[str, str]) -> None:
        """Identical content is already stored: keep it if it verifies, else swap in the fresh copy (a repair)."""
        try:
            _verify_dir(target, files, f"objects/{target.name[:12]}")
        except ArtifactCorrupted:
            trash = self._p("tmp", f"corrupt-{uuid.uuid4().hex}")
            os.rename(target, trash)
            try:
                os.rename(fresh, target)
            except OSError:
                if not target.is_dir():  # another publisher's repair won the race; theirs is as good
                    raise
            shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)

    def _rel(self, base: str, full: str) -> str:
        """full's path relative to base, whatever protocol prefix or leading slash the filesystem returns."""
        base = self.fs._strip_protocol(base).rstrip("/") + "/"
        full = self.fs._strip_protocol(full)
        return full[len(base) :] if full.startswith(base) else full

    def _commit(self, manifest: dict) -> dict:
        """Write manifests/<name>/v<N>.json exclusively; on a lost race re-check for identical content and retry N+1."""
        name, digest = manifest["name"], manifest["digest"]
        while True:
            versions = self._versions(name)
            for v in reversed(versions):
                existing = self._read_manifest(name, v)
                if existing is not None and existing["digest"] == digest:
                    return existing
            manifest["version"] = (versions[-1] if versions else 0) + 1
            if self._create_exclusive(
                self._p("manifests", name, f"v{manifest['version']}.json"), _to_json(manifest, f"publish {name}")
            ):
                return manifest

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create path holding data unless it exists; readers see the whole file or nothing. False if it existed."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = self._p("tmp", f"manifest-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and exclusive, unlike O_EXCL + write
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    # ---------------------------------------------------------------- reading

    def _names(self) -> list[str]:
        base = self._p("manifests")
        if not self.fs.exists(base):
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(base, detail=True) if e["type"] == "directory"
        )

    def _versions(self, name: str) -> list[int]:
        base = self._p("manifests", name)
        if not self.fs.exists(base):
            return []
        found = (_MANIFEST_RE.match(p.rstrip("/").rsplit("/", 1)[-1]) for p in self.fs.ls(base, detail=False))
        return sorted(int(m.group(1)) for m in found if m)

    def _read_manifest(self, name: str, version: int) -> dict | None:
        try:
            with self.fs.open(self._p("manifests", name, f"v{version}.json"), "rb") as f:
                return json.loads(f.read())
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

    def _resolve(self, ref: str, kind: str | None = None) -> dict:
        """Turn a ref (name, name@latest, name@vN, digest prefix) into its manifest, or raise a one-line error."""
        ref = str(ref).strip()
        name, sep, sel = ref.partition("@")
        if not _NAME_RE.match(name) or (sep and not re.match(r"^(latest|v[1-9][0-9]*)$", sel)):
            raise ArtifactError(
                f"bad artifact ref {ref!r}: expected NAME, NAME@latest, NAME@vN or a digest prefix (>= 6 hex chars)"
            )
        versions = self._versions(name)
        if not versions:
            if not sep and _HEX_RE.match(name):
                return self._resolve_digest(name, kind)
            known = self._names()
            have = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "nothing"
            raise ArtifactError(f"{ref}: no such artifact in {self.root}; it has: {have}")
        version = versions[-1] if sel in ("", "latest") else int(sel[1:])
        manifest = self._read_manifest(name, version) if version in versions else None
        if manifest is None:
            raise ArtifactError(f"{ref}: no such version; {name} has {_versions_text(versions)}")
        return manifest

    def _resolve_digest(self, prefix: str, kind: str | None) -> dict:
        matches = [m for m in self.list() if m["digest"].startswith(prefix)]
        if kind is not None and len({m["kind"] for m in matches}) > 1:
            matches = [m for m in matches if m["kind"] == kind]
        if not matches:
            raise ArtifactError(f"{prefix}: no artifact has a digest starting with it in {self.root}")
        if len(matches) > 1:
            cands = ", ".join(f"{m['name']}@v{m['version']} ({m['digest'][:12]})" for m in matches)
            raise ArtifactError(
                f"{prefix}: ambiguous digest prefix, candidates: {cands}; use a longer prefix or NAME@vN"
            )
        return matches[0]

    def _artifact(self, manifest: dict, path: str = "") -> Artifact:
        return Artifact(
            name=manifest["name"],
            version=manifest["version"],
            digest=manifest["digest"],
            kind=manifest["kind"],
            path=path or self._p("objects", manifest["digest"]),
            manifest=manifest,
        )

    def get(self, ref: str, *, kind: str | None = None) -> Artifact:
        """Resolve ref, check its kind, verify every file's sha256 and return it with a local path to its files."""
        manifest = self._resolve(ref, kind)
        where = f"{manifest['name']}@v{manifest['version']}"
        if kind is not None and manifest["kind"] != kind:
            raise ArtifactError(f"{ref} ({where}): kind is {manifest['kind']!r}, expected {kind!r}")
        if tree_digest(manifest["files"]) != manifest["digest"]:
            raise ArtifactCorrupted(f"{where}: manifest file list does not match its digest {manifest['digest'][:12]}")
        if self.is_local:
            path = self._p("objects", manifest["digest"])
            _verify_dir(Path(path), manifest["files"], where)
            return self._artifact(manifest, path)
        return self._artifact(manifest, self._materialise(manifest, where))

    def verify(self, ref: str) -> Artifact:
        """Re-hash every file of ref against its manifest; raises ArtifactCorrupted naming the bad file."""
        if self.is_local:
            return self.get(ref)
        manifest = self._resolve(ref)
        where = f"{manifest['name']}@v{manifest['version']}"
        obj = self._p("objects", manifest["digest"])
        stored = {}
        if self.fs.exists(obj):
            stored = {self._rel(obj, p): p for p in self.fs.find(obj)}
        _check_listing(set(stored), manifest["files"], where)
        for rel, sha in sorted(manifest["files"].items()):
            with self.fs.open(stored[rel], "rb") as f:
                if _hash_stream(f) != sha:
                    raise ArtifactCorrupted(f"{where}: file {rel!r} fails its sha256 check in {self.root}")
        return self.get(ref)

    def _materialise(self, manifest: dict, where: str) -> str:
        """Download a remote object into the local cache (verified, renamed into place) and return its directory."""
        cache_root = Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-dag") / "objects"
        target = cache_root / manifest["digest"]
        if target.is_dir():
            try:
                _verify_dir(target, manifest["files"], where)
                return str(target)
            except ArtifactCorrupted:
                shutil.rmtree(target, ignore_errors=True)  # a damaged cache copy: fetch it again
        tmp = cache_root / f".tmp-{uuid.uuid4().hex}"
        obj = self._p("objects", manifest["digest"])
        try:
            for rel in manifest["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{obj}/{rel}", str(tmp / rel))
                except FileNotFoundError:
                    raise ArtifactCorrupted(f"{where}: file {rel!r} is missing from {self.root}") from None
            _verify_dir(tmp, manifest["files"], where)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove leftovers of killed publishers from tmp/ (local roots), sparing recent ones still being written."""
        if not self.is_local:
            return 0
        removed, now = 0, time.time()
        for entry in os.scandir(self._p("tmp")):
            if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
                removed += 1
        return removed

    # ---------------------------------------------------------------- lineage and cache

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

    def _cache_path(self, cache_key: str) -> str:
        if not re.match(r"^[A-Za-z0-9_-]{1,128}$", cache_key or ""):
            raise ArtifactError(f"cache key {cache_key!r}: expected 1-128 letters, digits, '_' or '-'")
        return self._p("cache", f"{cache_key}.json")

    def record_cache(self, cache_key: str, outputs: dict[str, Artifact]) -> None:
        """Remember that cache_key produced outputs ({output_name: artifact}), so a rerun can be skipped."""
        entry = {out: {"name": a.name, "version": a.version, "digest": a.digest} for out, a in outputs.items()}
        data = _to_json(entry, f"cache {cache_key}")
        path = self._cache_path(cache_key)
        if self.is_local:
            tmp = self._p("tmp", f"cache-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
        else:
            self.fs.pipe_file(path, data)

    def cached(self, cache_key: str) -> dict[str, Artifact] | None:
        """The verified outputs recorded for cache_key, or None if any is missing or corrupt (meaning: rerun)."""
        try:
            with self.fs.open(self._cache_path(cache_key), "rb") as f:
                entry = json.loads(f.read())
            outputs = {}
            for out, rec in entry.items():
                art = self.get(f"{rec['name']}@v{rec['version']}")
                if art.digest != rec["digest"]:
                    return None
                outputs[out] = art
            return outputs
        except (FileNotFoundError, ArtifactError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _check_listing(found: Iterable[str], expected: dict[str, str], where: str) -> None:
    found = set(found)
    missing = sorted(set(expected) - found)
    if missing:
        raise ArtifactCorrupted(f"{where}: file {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = sorted(found - set(expected))
    if extra:
        raise ArtifactCorrupted(f"{where}: unexpected extra file {extra[0]!r} ({len(extra)} extra in all)")


def _verify_dir(directory: Path, expected: dict[str, str], where: str) -> None:
    """Check a local directory holds exactly the expected files with the expected sha256."""
    if not directory.is_dir():
        raise ArtifactCorrupted(f"{where}: object directory {str(directory)!r} is missing")
    found = _local_files(directory)
    _check_listing(found, expected, where)
    for rel, sha in sorted(expected.items()):
        with open(found[rel], "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha:
                raise ArtifactCorrupted(f"{where}: file {rel!r} fails its sha256 check ({found[rel]})")
