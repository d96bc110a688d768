"""Artifact store on s3:// through s3fs, against moto's S3-compatible HTTP server on 127.0.0.1 (no network).

Covers the round trip (publish, get, verify, list, lineage, cache) and the exclusive version claim under real
concurrent processes, with both the server-side conditional write (If-None-Match) and the claim protocol.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="s3fs is not installed (it comes with the dev extra)")
threaded_moto_server = pytest.importorskip(
    "moto.moto_server.threaded_moto_server", reason="moto[server] is not installed (it comes with the dev extra)"
)

from stages.common.store import ArtifactCorrupted, ArtifactStore  # noqa: E402

BUCKET = "rlhf-artifacts"
FILES = {"model.safetensors": b"\x00\x01weights" * 100, "config.json": b'{"n_layer": 2}', "tok/vocab.json": b"{}"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free local port for this module; s3fs finds it through the AWS_* environment."""
    import s3fs

    server = threaded_moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp_env:
        for k, v in env.items():
            mp_env.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would point elsewhere
        # moto's backend is one per process: a module that imported this fixture may have made the bucket already
        s3fs.S3FileSystem().makedirs(BUCKET, exist_ok=True)
        yield env["AWS_ENDPOINT_URL"]
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint, tmp_path, monkeypatch) -> ArtifactStore:
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    return ArtifactStore(f"s3://{BUCKET}/store-{uuid.uuid4().hex[:12]}")


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def read_dir(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_s3_uses_the_servers_conditional_write(s3_store):
    assert not s3_store.is_local and s3_store._backend.exclusive == "conditional"
    path = f"{s3_store._base}/manifests/m/v1.json"
    assert s3_store._backend.create_exclusive(path, b"first") is True
    assert s3_store._backend.create_exclusive(path, b"second") is False  # 412 from the server, not a local check
    assert s3_store.fs.cat_file(path) == b"first"


def test_s3_round_trip(s3_store, tmp_path, monkeypatch):
    data = make_dir(tmp_path / "data", {"train.jsonl": b'{"text": "a"}\n'})
    corpus = s3_store.publish(data, name="corpus", kind="dataset", stage="data")
    art = s3_store.publish(make_dir(tmp_path / "model", FILES), name="sft-model", kind="causal-lm", stage="sft",
                           inputs={"corpus": corpus}, metrics={"loss": 1.5})
    assert art.ref == "sft-model@v1" and Path(art.path) == tmp_path / "cache" / "objects" / art.digest
    assert s3_store.publish(make_dir(tmp_path / "again", FILES), name="sft-model", kind="causal-lm", stage="sft",
                            inputs={"corpus": corpus}).ref == "sft-model@v1"  # same content and lineage: no new version
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "fresh-cache"))  # another machine: nothing cached
    got = s3_store.get("sft-model@latest", kind="causal-lm")
    assert read_dir(got.path) == FILES and got.metrics == {"loss": 1.5} and got.digest == art.digest
    assert s3_store.manifest(art.digest[:10])["name"] == "sft-model"
    assert s3_store.verify("sft-model").digest == art.digest
    assert [(m["name"], m["version"]) for m in s3_store.list()] == [("corpus", 1), ("sft-model", 1)]
    assert s3_store.lineage("sft-model")["inputs"]["corpus"]["ref"] == "corpus@v1"
    key = "b" * 64
    assert s3_store.cached(key) is None
    s3_store.record_cache(key, {"model": art})
    assert {k: a.ref for k, a in s3_store.cached(key).items()} == {"model": "sft-model@v1"}

    # A flipped byte in the bucket: verify names the file; a machine without a cached copy refuses it too.
    path = f"{s3_store._base}/objects/{art.digest}/config.json"
    stored = bytearray(s3_store.fs.cat_file(path))
    stored[0] ^= 0x01
    s3_store.fs.pipe_file(path, bytes(stored))
    with pytest.raises(ArtifactCorrupted, match=r"sft-model@v1: file 'config.json' fails its sha256 check"):
        s3_store.verify("sft-model@v1")
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "third-cache"))
    assert s3_store.cached(key) is None
    with pytest.raises(ArtifactCorrupted, match=r"sft-model@v1: file 'config.json' fails its sha256 check"):
        s3_store.get("sft-model")


def _publisher(args: tuple[str, str, str, int, int]) -> list[tuple[int, str]]:
    """One process publishing `count` different contents under one name; returns (version, digest) it was given."""
    root, exclusive, work, worker, count = args
    os.environ["RLHF_CACHE_DIR"] = f"{work}/cache-{worker}"
    store = ArtifactStore(root)
    store._backend.exclusive = exclusive
    store._backend.claim_settle_s = 0.1
    out = []
    for i in range(count):
        d = make_dir(Path(work) / f"w{worker}-{i}", {"w.bin": f"worker {worker} item {i}".encode()})
        a = store.publish(d, name="shared", kind="k", stage="s")
        out.append((a.version, a.digest))
    return out


@pytest.mark.parametrize("exclusive", ["conditional", "claim"])
def test_concurrent_s3_publishers_get_distinct_gap_free_versions(s3_store, tmp_path, exclusive):
    workers, count = 3, 3
    # spawn, not fork: s3fs runs an event loop thread that a forked child would inherit half-alive.
    with mp.get_context("spawn").Pool(workers) as pool:
        jobs = [(s3_store.root, exclusive, str(tmp_path), w, count) for w in range(workers)]
        results = [r for rs in pool.map(_publisher, jobs) for r in rs]
    listed = {m["version"]: m["digest"] for m in s3_store.list("shared")}
    assert sorted(listed) == list(range(1, workers * count + 1))  # distinct and gap-free
    assert len(set(listed.values())) == workers * count  # no manifest lost or overwritten
    assert sorted(results) == sorted(listed.items())  # each publisher's version holds its own content
    for version, digest in listed.items():
        assert s3_store.get(f"shared@v{version}").digest == digest
    assert s3_store.fs.find(f"{s3_store._base}/manifests/shared/.claims") == []
