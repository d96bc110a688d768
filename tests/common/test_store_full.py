"""A publish that fails mid-copy leaves nothing behind, and a full disk is one clear failure the flow does not retry.

The local case fills a real tmpfs (mounted in a private mount namespace with `unshare`, so no root is needed where
user namespaces are allowed): the ENOSPC comes from the kernel, through the store's own copy. The remote case
(fsspec) runs on an in-memory filesystem with a byte quota: its files raise OSError(ENOSPC) from `write` once the
quota is spent. That is the one injected error here, at the filesystem boundary, as a full bucket or disk would.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from stages.common.store import ArtifactStore
from stages.common.store_files import StoreFull

REPO = Path(__file__).resolve().parents[2]


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


# Runs inside the mount namespace: the tmpfs is gone when it exits, so it reports what the store held.
_ON_TMPFS = r"""
import json, sys
from pathlib import Path
from flows.pipeline import _worth_retrying
from prefect.states import Failed
from stages.common.store import ArtifactStore
root, small, big = sys.argv[1:4]
store = ArtifactStore(root)
store.publish(small, name="small", kind="dataset", stage="test")
try:
    store.publish(big, name="big", kind="dataset", stage="test")
    outcome, retried = "published", None
except Exception as e:
    outcome, retried = f"{type(e).__name__}: {e}", _worth_retrying(None, None, Failed(data=e))
tree = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))
print(json.dumps({"outcome": outcome, "retried": retried, "tree": tree, "small": store.verify("small").ref}))
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs here (no user namespaces)")
def test_a_full_tmpfs_leaves_no_partial_copy_and_is_not_retried(tmp_path):
    small = make_dir(tmp_path / "small", {"a.txt": b"small"})
    # two files: the first fits, the second fills the 256 KiB disk mid-way
    big = make_dir(tmp_path / "big", {"part-1.bin": b"\x01" * (128 << 10), "part-2.bin": b"\x02" * (1 << 20)})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$1" -c "$2" "$0" "$3" "$4"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mnt), sys.executable, _ON_TMPFS,
                           str(small), str(big)], capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("StoreFull: ") and "\n" not in report["outcome"]
    assert "no space left while copying 'part-2.bin'" in report["outcome"]
    assert report["retried"] is False  # the flow's retry rule: a full disk is not tried twice more
    tree = report["tree"]
    assert [p for p in tree if p.startswith("tmp/")] == []  # no half-written obj-* left
    assert not any(p.startswith("manifests/big") for p in tree)  # nothing published
    assert len([p for p in tree if p.count("/") == 1 and p.startswith("objects/")]) == 1  # small's object only
    assert report["small"] == "small@v1"


class _QuotaFile(MemoryFile):
    """A memory file whose writes fail with ENOSPC once its filesystem's quota is spent."""

    def write(self, data) -> int:
        fs = self.fs
        if fs.used() + len(data) > fs.quota:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return super().write(data)


class QuotaMemoryFS(MemoryFileSystem):
    """memory:// with its own store and a byte quota over every file held."""

    protocol = "quotamem"
    store: dict = {}
    pseudo_dirs = [""]
    quota = 1 << 40

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol("memory://" + path.removeprefix("quotamem://"))  # memory's own rules

    def used(self) -> int:
        return sum(f.getbuffer().nbytes for f in self.store.values())

    def _open(self, path, mode="rb", **kwargs):
        if mode not in {"wb", "xb", "w+b", "x+b"}:
            return super()._open(path, mode, **kwargs)
        data = kwargs.get("data")  # pipe_file hands the bytes over whole
        if data and self.used() + len(data) > self.quota:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        plain = super()._open(path, mode, **kwargs)  # its checks (exists for "x", parents), then our file instead
        quota_file = _QuotaFile(self, plain.path, data)
        if not self._intrans:
            quota_file.commit()  # visible while written, as the plain memory file is
        return quota_file


@pytest.fixture
def quota_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    fsspec.register_implementation("quotamem", QuotaMemoryFS, clobber=True)
    QuotaMemoryFS.store.clear()
    QuotaMemoryFS.pseudo_dirs[:] = [""]
    QuotaMemoryFS.quota = 1 << 40
    yield ArtifactStore("quotamem://store")
    QuotaMemoryFS.store.clear()


def test_quota_file_is_a_real_file_that_fills_up(quota_store):
    fs = QuotaMemoryFS()
    fs.store.clear()
    QuotaMemoryFS.quota = 10
    with fs.open("/x", "wb") as f:
        f.write(b"12345")
        with pytest.raises(OSError) as e:
            f.write(b"678901")
    assert e.value.errno == errno.ENOSPC and fs.cat_file("/x") == b"12345"
    with pytest.raises(OSError, match="No space"):
        fs.pipe_file("/y", b"123456")


def test_a_full_remote_store_keeps_no_partial_object_and_publishes_nothing(quota_store, tmp_path):
    store = quota_store
    small = store.publish(make_dir(tmp_path / "small", {"a.txt": b"small"}), name="small", kind="k", stage="s")
    QuotaMemoryFS.quota = QuotaMemoryFS().used() + (200 << 10)  # room for the first file, not the second
    big = make_dir(tmp_path / "big", {"part-1.bin": b"\x01" * (128 << 10), "part-2.bin": b"\x02" * (256 << 10)})
    with pytest.raises(StoreFull, match=r"no space left while uploading 'part-2.bin'") as e:
        store.publish(big, name="big", kind="k", stage="s")
    assert "\n" not in str(e.value)
    fs = QuotaMemoryFS()
    objects = {p.split("/objects/", 1)[1].split("/", 1)[0] for p in fs.find("/store/objects")}
    assert objects == {small.digest}  # the half-uploaded object is gone
    assert store.list() == [small.manifest]
    assert store.verify("small").digest == small.digest
    QuotaMemoryFS.quota = 1 << 40  # space again: the same publish now succeeds
    assert store.publish(big, name="big", kind="k", stage="s").ref == "big@v1"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_raw_no_space_error_is_not_retried_by_the_flow():
    """A checkpoint write into run.work_dir that hits a full disk raises a plain OSError: no retry either."""
    from prefect.states import Failed

    from flows.pipeline import _worth_retrying

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:  # the kernel's always-full device: a real ENOSPC
            f.write(b"checkpoint")
    assert full.value.errno == errno.ENOSPC
    assert _worth_retrying(None, None, Failed(data=full.value)) is False
    assert _worth_retrying(None, None, Failed(data=ConnectionResetError(errno.ECONNRESET, "reset"))) is True
