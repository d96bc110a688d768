"""Writing an artifact store on a local (or shared POSIX) folder: objects appear by atomic rename, version claims by
os.link, which is atomic and exclusive where O_EXCL + write is not (a reader could see a half-written manifest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

from stages.common.store_files import (
    ArtifactCorrupted,
    copy_and_hash,
    mark_verified,
    raise_if_full,
    tree_digest,
    verify_dir,
)

SUBDIRS = ("objects", "manifests", "cache", "tmp")


class LocalBackend:
    """Objects, manifests and cache entries under one local directory; tmp/ holds what is still being written."""

    def __init__(self, base: str):
        self.base = base
        for sub in SUBDIRS:
            os.makedirs(os.path.join(base, sub), exist_ok=True)

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def put_object(self, sources: dict[str, Path]) -> tuple[dict[str, str], str]:
        """Copy the files to objects/<digest>, hashing as they are copied; the directory appears whole or not at all.
        A copy that fails (a full disk, a read error, an interrupt) removes its temp folder before raising."""
        tmp = Path(self._p("tmp", f"obj-{uuid.uuid4().hex}"))
        rel = ""
        try:
            files: dict[str, str] = {}
            for rel, p in sources.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                files[rel] = copy_and_hash(p, tmp / rel)
                os.chmod(tmp / rel, 0o444)  # artifacts are immutable; guard against in-place edits
            digest = tree_digest(files)
            target = Path(self._p("objects", digest))
            # on disk before any manifest names them: else a power cut can leave a manifest over empty files
            sync_tree(tmp)
            try:
                os.rename(tmp, target)  # atomic: the object directory appears complete or not at all
                sync_path(target.parent)  # ... and the rename itself
                mark_verified(target, files)  # hashed while copying: the first get need not read it again
            except OSError:
                if not target.is_dir():
                    raise
                self._keep_or_repair(target, tmp, files)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # else every failed try leaves a partial copy in tmp/
            raise_if_full(e, self.base, f"copying {rel!r} of a new object")
            raise
        return files, digest

    def _keep_or_repair(self, target: Path, fresh: Path, files: dict[str, str]) -> None:
        """Identical content is already stored: keep it if it verifies, else swap in the fresh copy (a repair)."""
        try:
            verify_dir(target, files, f"objects/{target.name[:12]}", force=True)
        except ArtifactCorrupted:
            trash = self._p("tmp", f"corrupt-{uuid.uuid4().hex}")
            os.rename(target, trash)
            try:
                os.rename(fresh, target)
                mark_verified(target, files)
            except OSError:
                if not target.is_dir():  # another publisher's repair won the race; theirs is as good
                    raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.utime(target)  # in use again: `rlhf artifacts gc` spares an object this young until its manifest lands
        shutil.rmtree(fresh, ignore_errors=True)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create path holding data unless it exists; readers see the whole file or nothing. False if it existed."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = self._p("tmp", f"manifest-{uuid.uuid4().hex}")
        try:
            self._write_synced(tmp, data)
            try:
                os.link(tmp, path)  # atomic and exclusive, unlike O_EXCL + write
                sync_path(os.path.dirname(path))  # the new name survives a power cut
                return True
            except FileExistsError:
                return False
        except OSError as e:
            raise_if_full(e, self.base, f"writing {os.path.relpath(path, self.base)!r}")
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):  # a failed write leaves no manifest-* behind either
                os.unlink(tmp)

    def replace(self, path: str, data: bytes) -> None:
        """Write path whole: readers see the old content or the new, never half of either."""
        tmp = self._p("tmp", f"replace-{uuid.uuid4().hex}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)  # aliases/<name>/ on its first alias
            self._write_synced(tmp, data)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise_if_full(e, self.base, f"writing {os.path.relpath(path, self.base)!r}")
            raise

    @staticmethod
    def _write_synced(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def object_dir(self, manifest: dict, where: str, *, force: bool = False) -> str:
        """The verified directory of manifest's files, inside the store (hashed once per process unless force)."""
        path = self._p("objects", manifest["digest"])
        verify_dir(Path(path), manifest["files"], where, force=force)
        return path

    def verify_stored(self, manifest: dict, where: str) -> str:
        """Re-hash every stored file of manifest, whatever this process checked before."""
        return self.object_dir(manifest, where, force=True)

    def clean_tmp(self, older_than_s: float) -> int:
        """Remove leftovers of killed publishers from tmp/, sparing recent ones that may still be in flight."""
        removed, now = 0, time.time()
        for entry in os.scandir(self._p("tmp")):
            if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
                removed += 1
        return removed


def sync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes the names created in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under root, then every folder bottom-up, root last."""
    for dirpath, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            sync_path(os.path.join(dirpath, name))
        sync_path(dirpath)
