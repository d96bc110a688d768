"""Issue 27 item 11: what a publish makes durable before its manifest, and how a lost S3 conditional write reads.

fsync is observed by wrapping os.fsync (the real call still runs) and reading which file or folder each descriptor
names; os.link is wrapped the same way to see when the manifest lands. The 409 case is a unit test of the mapping:
moto's server answers a conflicting If-None-Match put with 412 only, never with 409 ConditionalRequestConflict, so
the error is built as botocore raises it and translated by s3fs's own translate_boto_error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from stages.common.store import ArtifactStore


def _observe(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (with the path its descriptor names) and every link, in the order they happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst, *args, **kwargs):
        events.append(("link", str(dst)))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    return events


def test_object_files_and_folders_are_synced_before_the_manifest(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"weights" * 100)
    (src / "sub" / "vocab.json").write_bytes(b"{}")
    store = ArtifactStore(tmp_path / "store")
    events = _observe(monkeypatch)
    art = store.publish(src, name="m", kind="causal-lm", stage="sft")

    manifest = str(Path(store.root) / "manifests" / "m" / "v1.json")
    links = [i for i, (what, path) in enumerate(events) if what == "link" and path == manifest]
    assert links, events
    before = {path for what, path in events[: links[0]] if what == "fsync"}
    obj = Path(art.path).resolve()
    # the bytes of every file, then the folders that name them, reach the disk before the commit marker
    for rel in ("model.safetensors", "sub/vocab.json"):
        assert any(p.endswith("/" + rel) for p in before), (rel, before)
    assert any(p.endswith("/sub") for p in before), before  # the folder holding vocab.json
    assert str(obj.parent) in before, before  # objects/: the rename that made the object appear
    after = {path for what, path in events[links[0]:] if what == "fsync"}
    assert str(Path(manifest).parent) in after, after  # manifests/m: the link itself


def _s3_error(code: str, status: int, message: str):
    """The exception s3fs raises for a put that the server answered with (status, code)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError({"Error": {"Code": code, "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    return translate_boto_error(error)


def test_a_409_conditional_conflict_means_try_the_next_version():
    pytest.importorskip("s3fs")
    from stages.common.store_remote import lost_the_claim

    conflict = _s3_error("ConditionalRequestConflict", 409,
                         "A conflicting conditional operation is currently in progress against this resource.")
    assert type(conflict) is OSError and conflict.errno == errno.EIO  # what create_exclusive used to re-raise
    assert lost_the_claim(conflict) is True
    assert lost_the_claim(FileExistsError("exists")) is True  # 412 PreconditionFailed on If-None-Match
    # other errors stay errors: a busy server that is not a conditional conflict, a denied write, a full disk
    assert lost_the_claim(_s3_error("SlowDown", 503, "slow down")) is False
    assert lost_the_claim(_s3_error("OperationAborted", 409, "aborted")) is False
    assert lost_the_claim(PermissionError("denied")) is False
    assert lost_the_claim(OSError(errno.ENOSPC, "full")) is False


class _ConflictingFS:
    """A filesystem whose conditional put answers 409 the first time (as AWS does while another put is in flight),
    wrapping a real memory filesystem for everything else."""

    def __init__(self, fs):
        self._fs, self.conflicts = fs, 1

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def pipe_file(self, path, data, mode="overwrite", **kwargs):
        if mode == "create" and self.conflicts:
            self.conflicts -= 1
            raise _s3_error("ConditionalRequestConflict", 409, "conflict")
        if mode == "create" and self._fs.exists(path):
            raise FileExistsError(path)
        return self._fs.pipe_file(path, data, **kwargs)


def test_create_exclusive_answers_false_on_a_409(tmp_path):
    pytest.importorskip("s3fs")
    import fsspec

    from stages.common.store_remote import RemoteBackend

    fs = _ConflictingFS(fsspec.filesystem("memory"))
    backend = RemoteBackend(fs, f"/durability-{os.getpid()}", "memory://x")
    backend.exclusive = "conditional"
    path = f"{backend.base}/manifests/m/v1.json"
    assert backend.create_exclusive(path, b"one") is False  # lost this round: the store looks again, then v2 or v1
    assert backend.create_exclusive(path, b"one") is True
    assert fs.cat_file(path) == b"one"
