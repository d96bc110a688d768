"""An artifact's files on local disk: hashing, listing, checking them against a manifest, and the per-process record
of directories already verified (so a run that reads one artifact four times hashes it once); and `to_json`, the
bytes of a manifest or cache record as the store writes them.

The record is keyed by directory and content digest and holds each file's size, mtime, ctime and inode as seen when
the hash passed. A later check that finds the same signature skips the hashing; any write, replace, chmod or
truncate changes the signature, so an in-place corruption after the first check is still caught. `force=True`
(what `ArtifactStore.verify` uses) always re-hashes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

CHUNK = 8 << 20


class ArtifactError(Exception):
    """A user-facing artifact problem (bad ref, unknown name or version, wrong kind), said in one line."""


class ArtifactCorrupted(ArtifactError):
    """A file of an artifact is missing, extra or fails its sha256 check; the message names the file."""


class StoreFull(ArtifactError):
    """The store's disk (or quota) refused a write: one line, nothing published, and not retried, since another
    try fills the same disk again."""


# no room (a full disk, a spent quota, a file over the size limit): trying again changes nothing
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_no_space(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def raise_if_full(exc: BaseException, root: str, what: str) -> None:
    """Turn a no-space OSError into StoreFull's one line (the caller has removed its partial files already)."""
    if is_no_space(exc):
        raise StoreFull(f"artifact store {root}: no space left while {what} ({exc.strerror or exc}); nothing was "
                        "published and the partial copy was removed; free space (`rlhf artifacts gc` lists orphans) "
                        "and run again") from None


def to_json(manifest: dict, where: str) -> bytes:
    """A manifest (or cache record) as the store writes it: indented, sorted keys, one final newline."""
    try:
        return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: manifest is not JSON-serialisable ({e})") from None


def tree_digest(files: dict[str, str]) -> str:
    """Content digest of a directory: sha256 over the sorted (relative path, file sha256) pairs."""
    h = hashlib.sha256()
    for rel, sha in sorted(files.items()):
        h.update(rel.encode() + b"\0" + sha.encode() + b"\n")
    return h.hexdigest()


def hash_stream(f) -> str:
    """sha256 of everything left in a binary file object, read in CHUNK pieces (works for remote files too)."""
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of one local file; the single place a local verification reads file bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def copy_and_hash(src: Path, dst: Path) -> str:
    """Copy src to dst in one read pass, returning the sha256 of the bytes written."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def local_files(directory: Path) -> dict[str, Path]:
    """Every regular file under directory (following file symlinks), keyed by POSIX relative path."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(directory):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file():
                out[p.relative_to(directory).as_posix()] = p
    return out


def check_listing(found: Iterable[str], expected: dict[str, str], where: str) -> None:
    """Raise ArtifactCorrupted naming the first missing or extra file, if the listing differs from the manifest."""
    found = set(found)
    missing = sorted(set(expected) - found)
    if missing:
        raise ArtifactCorrupted(f"{where}: file {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = sorted(found - set(expected))
    if extra:
        raise ArtifactCorrupted(f"{where}: unexpected extra file {extra[0]!r} ({len(extra)} extra in all)")


# (absolute directory, tree digest of the expected files) -> stat signature of its files when they last hashed clean.
_verified: dict[tuple[str, str], tuple] = {}
_verified_lock = threading.Lock()


def _signature(found: dict[str, Path]) -> tuple:
    rows = []
    for rel, p in sorted(found.items()):
        st = p.stat()
        rows.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
    return tuple(rows)


def _key(directory: Path, expected: dict[str, str]) -> tuple[str, str]:
    return (os.path.abspath(directory), tree_digest(expected))


def forget_verified() -> None:
    """Drop the whole record, as a fresh process would start (for tests and benchmarks)."""
    with _verified_lock:
        _verified.clear()


def mark_verified(directory: Path, expected: dict[str, str]) -> None:
    """Record that directory holds exactly expected, hashed by the caller (a publish that hashed while copying)."""
    signature = _signature(local_files(directory))
    with _verified_lock:
        _verified[_key(directory, expected)] = signature


def check_file_names(files: dict[str, str], where: str) -> None:
    """Every name a manifest lists must be a plain relative POSIX path inside its object folder: no absolute name,
    no `..` or `.` part, no empty part, no backslash. Checked before any I/O, since a manifest read from a shared
    store is not trusted: `../../x` would otherwise be downloaded outside the cache."""
    for rel in files:
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if not isinstance(rel, str) or rel.startswith("/") or "\\" in rel or "\0" in rel or any(
            part in ("", ".", "..") for part in parts
        ):
            raise ArtifactCorrupted(f"{where}: manifest lists a file name that leaves its folder or is not a plain "
                                    f"relative path: {rel!r}")


def verify_dir(directory: Path, expected: dict[str, str], where: str, *, force: bool = False) -> None:
    """Check a local directory holds exactly the expected files with the expected sha256.

    Hashes only if force, or if this process has not yet seen these files (same sizes, times, inodes) hash clean.
    """
    key = _key(directory, expected)
    try:
        if not directory.is_dir():
            raise ArtifactCorrupted(f"{where}: object directory {str(directory)!r} is missing")
        found = local_files(directory)
        check_listing(found, expected, where)
        signature = _signature(found)  # taken before hashing: a write during the hash makes the next check re-hash
        with _verified_lock:
            if not force and _verified.get(key) == signature:
                return
        for rel, sha in sorted(expected.items()):
            if file_sha256(found[rel]) != sha:
                raise ArtifactCorrupted(f"{where}: file {rel!r} fails its sha256 check ({found[rel]})")
    except ArtifactCorrupted:
        with _verified_lock:
            _verified.pop(key, None)
        raise
    with _verified_lock:
        _verified[key] = signature
