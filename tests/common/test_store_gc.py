"""`rlhf artifacts gc` through the CLI on a store with real orphans: a publish killed mid-copy (SIGXFSZ from a file
size limit, so the kill lands inside the copy with no Python cleanup), and an object whose manifest never landed."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from stages.common.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
HOURS_2 = 2 * 3600


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def age(path: Path, seconds: float) -> None:
    """Set the modification times of path and everything under it back by seconds (as if written then)."""
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def killed_publish(root: Path, src: Path) -> None:
    """Publish src in a child whose file size limit kills it (SIGXFSZ) while it copies the big file."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    # Python ignores SIGXFSZ (a write then fails with EFBIG and the store cleans up); the default action kills
    code = "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); " \
           "from stages.common.store import ArtifactStore; ArtifactStore(sys.argv[1]).publish(sys.argv[2], name='killed', kind='k', stage='s')"
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(src)], cwd=REPO, preexec_fn=limit,
                          capture_output=True)  # fmt: skip
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]


def cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture
def planted(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    keep = [store.publish(make_dir(tmp_path / f"a{i}", {"w.bin": bytes([i]) * 100}), name=f"a{i}", kind="k",
                          stage="s", reports=make_dir(tmp_path / f"r{i}", {"log.txt": f"report {i}".encode()}))  # fmt: skip
            for i in range(2)]
    age(root / "objects", HOURS_2)  # old, but referenced: never collected
    big = make_dir(tmp_path / "big", {"w.bin": b"\x07" * (1 << 20)})
    killed_publish(root, big)
    (old_tmp,) = list((root / "tmp").iterdir())
    age(old_tmp, HOURS_2)
    killed_publish(root, big)  # a second one, fresh: a publish that may still be running
    (young_tmp,) = [p for p in (root / "tmp").iterdir() if p != old_tmp]
    lost = store.publish(make_dir(tmp_path / "lost", {"w.bin": b"lost"}), name="lost", kind="k", stage="s")
    (root / "manifests" / "lost" / "v1.json").unlink()  # killed between the object's rename and the commit
    age(root / "objects" / lost.digest, HOURS_2)
    return {"root": root, "keep": keep, "old_tmp": old_tmp, "young_tmp": young_tmp, "lost": lost}


def test_gc_lists_then_removes_only_the_orphans(planted, capfd):
    root = str(planted["root"])
    before = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))
    code, out, err = cli(["artifacts", "gc", "--store", root], capfd)
    assert code == 0, err
    lines = out.strip().splitlines()
    orphans = {f"tmp/{planted['old_tmp'].name}", f"objects/{planted['lost'].digest}"}
    assert {line.split()[2] for line in lines[:-1]} == orphans and len(lines) == 3
    assert lines[-1].startswith("would remove 2 orphans") and "kept 1 younger than 1h" in lines[-1]
    assert sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")) == before  # dry run: untouched

    code, out, err = cli(["artifacts", "gc", "--store", root, "--yes", "--json"], capfd)
    report = json.loads(out)
    assert code == 0 and not report["dry_run"] and {i["path"] for i in report["items"]} == orphans
    assert [i["path"] for i in report["kept_young"]] == [f"tmp/{planted['young_tmp'].name}"]
    assert not planted["old_tmp"].exists() and not (Path(root) / "objects" / planted["lost"].digest).exists()
    assert planted["young_tmp"].exists()
    for art in planted["keep"]:
        code, out, err = cli(["artifacts", "verify", art.ref, "--store", root], capfd)
        assert code == 0 and out.startswith(f"ok: {art.ref}"), err
    assert len(list((Path(root) / "objects").iterdir())) == 4  # two contents, two reports

    code, out, err = cli(["artifacts", "gc", "--store", root, "--older-than", "0", "--yes"], capfd)
    assert code == 0 and out.strip().splitlines()[-1].startswith("removed 1 orphan,")  # the young one, now asked
    assert list((Path(root) / "tmp").iterdir()) == []


def test_gc_on_a_remote_store_spares_referenced_and_young(tmp_path, monkeypatch):
    from stages.common.store_gc import find_orphans, remove

    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    store = ArtifactStore(f"memory://gc-{os.getpid()}-{time.time_ns()}")
    kept = store.publish(make_dir(tmp_path / "k", {"w.bin": b"kept"}), name="kept", kind="k", stage="s")
    lost = store.publish(make_dir(tmp_path / "l", {"w.bin": b"lost"}), name="lost", kind="k", stage="s")
    store.fs.rm_file(store._p("manifests", "lost", "v1.json"))
    old, young = find_orphans(store, 3600)
    assert old == [] and [i.path for i in young] == [f"objects/{lost.digest}"]  # just written: spared
    old, young = find_orphans(store, 0)
    assert [i.path for i in remove(store, old, 0)] == [f"objects/{lost.digest}"]
    assert store.verify("kept").digest == kept.digest and not store.fs.exists(store._p("objects", lost.digest))


@pytest.mark.parametrize("extra, expected", [
    (["--older-than", "1x"], "--older-than '1x': expected a duration"),
    (["--older-than=-5m"], "--older-than '-5m': expected a duration"),
])
def test_gc_bad_duration(extra, expected, planted, capfd):
    code, out, err = cli(["artifacts", "gc", "--store", str(planted["root"]), *extra], capfd)
    assert code == 2 and out == "" and err.strip().count("\n") == 0 and expected in err and "Traceback" not in err


def test_gc_missing_store_is_one_line(tmp_path, capfd):
    code, out, err = cli(["artifacts", "gc", "--store", str(tmp_path / "nope")], capfd)
    assert code == 2 and err.strip().count("\n") == 0 and "no artifact store there" in err
    assert not (tmp_path / "nope").exists()


def test_gc_refuses_when_a_manifest_is_unreadable(planted, capfd):
    (planted["root"] / "manifests" / "a0" / "v1.json").write_text("{not json")
    code, out, err = cli(["artifacts", "gc", "--store", str(planted["root"]), "--yes"], capfd)
    assert code == 1 and "manifests/a0/v1.json cannot be read" in err and "nothing was removed" in err
    assert planted["old_tmp"].exists() and (planted["root"] / "objects" / planted["lost"].digest).exists()
