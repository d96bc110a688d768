"""Writing an artifact store on a remote fsspec filesystem (s3://, gs://, memory://): uploads, exclusive version
claims and a verified local cache of downloaded objects.

Exclusive claims. fsspec's `pipe_file(mode="create")` is exists-then-write on most backends, so two publishers can both
"create" vN and one manifest is silently lost. Two strategies, chosen by backend:
- "conditional": the server refuses the write if the key exists (S3's `If-None-Match: *`, which s3fs sends for
  mode="create"; AWS S3 has honoured it since 2024-08). Then the manifest is read back, which also catches an
  S3-compatible server that ignores the header, unless the overwrite lands after that read.
- "claim": for backends without a conditional write. Each publisher writes its own claim object
  manifests/<name>/.claims/v<N>.json/<time_ns>-<uuid> (unique, so no write collides), waits `claim_settle_s` for
  concurrent claims to become visible, and only the earliest live claim may write vN; the others retry. A claim
  older than `claim_ttl_s` belongs to a publisher that died and is ignored. This is safe while each claim becomes
  visible within claim_settle_s of its timestamp and publishers' clocks agree to well within that.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from stages.common.redact import redact_credentials
from stages.common.store_files import (
    ArtifactCorrupted,
    check_file_names,
    check_listing,
    hash_stream,
    mark_verified,
    raise_if_full,
    tree_digest,
    verify_dir,
)

_CONDITIONAL_PROTOCOLS = {"s3", "s3a"}


def cache_root() -> Path:
    """Where downloaded objects live on this machine: $RLHF_CACHE_DIR/objects or ~/.cache/rlhf-dag/objects."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-dag") / "objects"


def lost_the_claim(error: OSError) -> bool:
    """Does this error from a conditional put (`If-None-Match: *`) mean another publisher has or is taking the key?

    412 PreconditionFailed (the key exists) reaches us from s3fs as FileExistsError. 409 ConditionalRequestConflict
    (AWS: a conflicting put of the same key is in flight) reaches us as a plain OSError carrying botocore's error as
    its cause; it too means "look again and try the next free version", not a failed publish.
    """
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "ConditionalRequestConflict"


class RemoteBackend:
    """Objects, manifests and cache entries on an fsspec filesystem, under base (a path inside fs, no protocol)."""

    claim_settle_s = 0.2
    claim_ttl_s = 120.0

    def __init__(self, fs, base: str, root: str):
        self.fs, self.base, self.root = fs, base, root
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.exclusive = "conditional" if protocols & _CONDITIONAL_PROTOCOLS else "claim"

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _rel(self, base: str, full: str) -> str:
        """full's path relative to base, whatever protocol prefix or leading slash the filesystem returns."""
        base = self.fs._strip_protocol(base).rstrip("/") + "/"
        full = self.fs._strip_protocol(full)
        return full[len(base) :] if full.startswith(base) else full

    def put_object(self, sources: dict[str, Path]) -> tuple[dict[str, str], str]:
        """Hash the files, then upload them to objects/<digest>; return (files, digest)."""
        files = {}
        for rel, p in sources.items():
            with open(p, "rb") as f:
                files[rel] = hash_stream(f)
        digest = tree_digest(files)
        # Object stores write each file whole, so uploading again is safe for concurrent readers, and it repairs
        # an object damaged since it was first published (else a rerun after corruption could never fix it).
        obj = self._p("objects", digest)
        self.fs.invalidate_cache(obj)
        new = not self.fs.exists(obj)  # an object that existed may be a manifest's: a failed upload never removes it
        uploaded, rel = [], ""
        try:
            for rel, p in sources.items():
                uploaded.append(f"{obj}/{rel}")  # before the upload: a failed one may have left a partial key
                self.fs.put_file(str(p), uploaded[-1])
        except BaseException as e:
            if new:
                self._remove_quietly(uploaded)
            raise_if_full(e, redact_credentials(self.root), f"uploading {rel!r} of a new object")
            raise
        return files, digest

    def _remove_quietly(self, paths: list[str]) -> None:
        """Best effort: what stays (the store unreachable now) is an unreferenced object `rlhf artifacts gc` finds."""
        for path in paths:
            try:
                self.fs.rm_file(path)
            except (OSError, ValueError):
                pass
        self.fs.invalidate_cache(self.base)

    # ---------------------------------------------------------------- exclusive create

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create path holding data unless it exists (or another publisher claimed it first). False if we lost."""
        if self.exclusive == "conditional":
            try:
                self.fs.pipe_file(path, data, mode="create")
            except OSError as e:
                if not lost_the_claim(e):
                    raise
                time.sleep(self.claim_settle_s)  # a 409: another put of this key is in flight; let it land first
                return False
        elif not self._claim_and_create(path, data):
            return False
        return self._read(path) == data  # read back: someone else's bytes there means we lost after all

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _claim_and_create(self, path: str, data: bytes) -> bool:
        parent, leaf = path.rsplit("/", 1)
        claims = f"{parent}/.claims/{leaf}"
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex}"  # zero-padded: string order is time order
        mine = f"{claims}/{token}"
        self.fs.pipe_file(mine, b"")
        try:
            time.sleep(self.claim_settle_s)  # let every claim made before ours become visible
            self.fs.invalidate_cache(claims)
            oldest_live = f"{time.time_ns() - int(self.claim_ttl_s * 1e9):020d}"
            live = sorted(t for t in (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(claims, detail=False))
                          if t >= oldest_live)
            if self._read(path) is not None:
                return False
            if not live or live[0] != token:
                time.sleep(self.claim_settle_s)  # an earlier claimer is writing vN; give it time before looking again
                return False
            self.fs.pipe_file(path, data)
            return True
        finally:
            # After the winner's manifest exists, a later claimer sees it and loses even without this claim.
            self.fs.rm_file(mine)

    def replace(self, path: str, data: bytes) -> None:
        """Write path whole (object stores replace a key atomically)."""
        self.fs.pipe_file(path, data)

    # ---------------------------------------------------------------- reading

    def object_dir(self, manifest: dict, where: str, *, force: bool = False) -> str:
        """A verified local copy of manifest's files: the cache copy if it checks out, else a fresh download."""
        check_file_names(manifest["files"], where)  # before any I/O: a hostile name must not write outside tmp
        target = cache_root() / manifest["digest"]
        if target.is_dir():
            try:
                verify_dir(target, manifest["files"], where, force=force)
                return str(target)
            except ArtifactCorrupted:
                shutil.rmtree(target, ignore_errors=True)  # a damaged cache copy: fetch it again
        tmp = cache_root() / f".tmp-{uuid.uuid4().hex}"
        obj = self._p("objects", manifest["digest"])
        try:
            for rel in manifest["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{obj}/{rel}", str(tmp / rel))
                except FileNotFoundError:
                    raise ArtifactCorrupted(f"{where}: file {rel!r} is missing from {redact_credentials(self.root)}") from None
            verify_dir(tmp, manifest["files"], where, force=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
                verify_dir(target, manifest["files"], where)  # another process's download won; check theirs
            else:
                mark_verified(target, manifest["files"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)

    def verify_stored(self, manifest: dict, where: str) -> str:
        """Re-hash every file in the remote store against manifest, then return a verified local copy."""
        obj = self._p("objects", manifest["digest"])
        self.fs.invalidate_cache(obj)
        stored = {}
        if self.fs.exists(obj):
            stored = {self._rel(obj, p): p for p in self.fs.find(obj)}
        check_listing(set(stored), manifest["files"], where)
        for rel, sha in sorted(manifest["files"].items()):
            with self.fs.open(stored[rel], "rb") as f:
                if hash_stream(f) != sha:
                    raise ArtifactCorrupted(f"{where}: file {rel!r} fails its sha256 check in {redact_credentials(self.root)}")
        return self.object_dir(manifest, where)
