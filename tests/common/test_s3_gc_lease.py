"""gc and the work_dir lease on s3:// through s3fs, against moto's server on 127.0.0.1 (see test_s3_store.py)."""

from __future__ import annotations

import uuid

import pytest

from flows.work_lease import WorkDirBusy, WorkDirLease, work_dir_lease
from stages.common.store_gc import find_orphans, remove
from tests.common.test_s3_store import BUCKET, make_dir, s3_endpoint, s3_store  # noqa: F401 - fixtures


def test_s3_gc_removes_an_unreferenced_object_only(s3_store, tmp_path):  # noqa: F811
    kept = s3_store.publish(make_dir(tmp_path / "k", {"w.bin": b"kept"}), name="kept", kind="k", stage="s")
    lost = s3_store.publish(make_dir(tmp_path / "l", {"w.bin": b"lost"}), name="lost", kind="k", stage="s")
    s3_store.fs.rm_file(f"{s3_store._base}/manifests/lost/v1.json")
    old, young = find_orphans(s3_store, 3600)
    assert old == [] and [i.path for i in young] == [f"objects/{lost.digest}"]  # just uploaded: spared
    old, _ = find_orphans(s3_store, 0)
    assert [i.path for i in remove(s3_store, old, 0)] == [f"objects/{lost.digest}"]
    assert s3_store.verify("kept").digest == kept.digest
    assert not s3_store.fs.exists(f"{s3_store._base}/objects/{lost.digest}")


def test_s3_lease_is_a_conditional_create(s3_endpoint):  # noqa: F811
    work_dir = f"s3://{BUCKET}/runs-{uuid.uuid4().hex[:8]}/sft/0123456789abcdef"
    with work_dir_lease(work_dir) as first:
        second = WorkDirLease(work_dir)
        assert second.files.create(second.lease, b"{}") is False  # the server refused: the key exists
        with pytest.raises(WorkDirBusy, match=rf"work_dir {work_dir} is in use by pid \d+ on "):
            second.acquire(0)
        assert first.files.read(first.lease) is not None
    assert WorkDirLease(work_dir).files.read(first.lease) is None  # released
