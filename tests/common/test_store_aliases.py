"""NAME@ALIAS: set, moved, resolved, and refused when the record is missing, malformed or does not match its target."""

from __future__ import annotations

import json

import pytest

from stages.common.store import ArtifactCorrupted, ArtifactError, ArtifactStore


@pytest.fixture
def store(tmp_path):
    s = ArtifactStore(str(tmp_path / "artifacts"))
    for text in ("one", "two"):
        src = tmp_path / text
        src.mkdir()
        (src / "w.txt").write_text(text)
        s.publish(src, name="reward-model", kind="reward-model", stage="reward")
    return s


def test_an_alias_names_one_version_and_moves(store):
    store.set_alias("reward-model", 1, "best", note="sweep")
    assert store.get("reward-model@best").ref == "reward-model@v1"
    assert store.get("reward-model@latest").ref == "reward-model@v2"
    store.set_alias("reward-model", 2, "best")
    assert store.get("reward-model@best").ref == "reward-model@v2"
    assert set(store.aliases("reward-model")) == {"best"}


def test_an_unknown_alias_is_one_line_naming_the_known_ones(store):
    store.set_alias("reward-model", 1, "best")
    with pytest.raises(ArtifactError, match=r"reward-model@chosen: no such alias .*aliases of reward-model: @best"):
        store.get("reward-model@chosen")


@pytest.mark.parametrize("alias", ["latest", "v3", "Best", "a/b", "", "x" * 65])
def test_bad_alias_names_are_refused(store, alias):
    with pytest.raises(ArtifactError, match="alias"):
        store.set_alias("reward-model", 1, alias)


def test_an_alias_to_a_missing_version_is_refused(store):
    with pytest.raises(ArtifactError, match="reward-model@v9: no such version"):
        store.set_alias("reward-model", 9, "best")


def test_a_tampered_alias_record_is_never_followed(store, tmp_path):
    store.set_alias("reward-model", 1, "best")
    path = tmp_path / "artifacts" / "aliases" / "reward-model" / "best.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "version": 2}))  # v2 exists, but holds another content than recorded
    with pytest.raises(ArtifactCorrupted, match="another content than the alias recorded"):
        store.get("reward-model@best")
    path.write_text(json.dumps({**record, "name": "other"}))
    with pytest.raises(ArtifactCorrupted, match="does not name a version of reward-model"):
        store.get("reward-model@best")
    path.write_text("{not json")
    with pytest.raises(ArtifactCorrupted, match="not valid JSON"):
        store.get("reward-model@best")
