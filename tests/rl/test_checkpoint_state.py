"""The RL stage's commit marker (stages/rl/checkpoint_state.py CheckpointState, `state.json`): a save that dies part-way
leaves the previous marker whole on every backend, so the retry resumes from it instead of failing on a truncated file.

Through the real CheckpointState.save and load, on a plain folder, a `file://` work dir (written in place before)
and an fsspec object store (`memory://`); the actors are stand-ins that write nothing, and `ray.get` is the identity
on their empty lists, so no Ray starts.
"""

from __future__ import annotations

import json
import uuid

import pytest

from stages.rl.checkpoint_state import STATE_FILE, CheckpointState


class _Role:
    def broadcast(self, method: str, *args):
        return []


class _Pool:
    trainable_roles = ("policy",)

    def __getitem__(self, role):
        return _Role()


class _KL:
    def state_dict(self) -> dict:
        return {"value": 0.1}


class _Unserialisable:
    """A history entry json cannot write: the save fails after part of state.json would have been written."""


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs: refs)


def _work_dir(kind: str, tmp_path) -> str:
    return {"folder": str(tmp_path / "work"), "file-uri": (tmp_path / "work").as_uri(),
            "memory": f"memory://rl-state-{uuid.uuid4().hex}/work"}[kind]  # fmt: skip


def _save(state: CheckpointState, iteration: int, history: list) -> None:
    state.save(_Pool(), iteration=iteration, kl_controller=_KL(), history=history, eval_before={"gold": 0.5})


@pytest.mark.parametrize("kind", ["folder", "file-uri", "memory"])
def test_a_failed_save_leaves_the_previous_marker_whole(tmp_path, kind):
    work_dir = _work_dir(kind, tmp_path)
    state = CheckpointState(work_dir)
    history = [{"iteration": i, "reward": 0.1 * i, "text": "x" * 2000} for i in range(50)]
    _save(state, 3, history)
    committed = state.load()
    assert committed["iteration"] == 3 and committed["tag"] == "iter-000003"

    with pytest.raises(TypeError):
        _save(state, 4, [*history, {"iteration": 4, "bad": _Unserialisable()}])
    again = CheckpointState(work_dir)  # the retry: a fresh process reads the marker
    assert again.load() == committed
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in again.fs.ls(again._path, detail=False))
    assert names == [STATE_FILE]  # no temp file left next to it

    _save(again, 4, history)
    assert again.load()["iteration"] == 4
    with again.fs.open(f"{again._path}/{STATE_FILE}", "r") as f:
        assert json.load(f)["tag"] == "iter-000004"
