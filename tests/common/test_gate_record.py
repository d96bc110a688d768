"""A stage that misses its quality gate is published for inspection, but never becomes `NAME@latest` (issue 27 item 9).

The gate's verdict is recorded in the manifest at publish time (stages/common/gates.py `verdict`, ArtifactStore.publish
`gate=`); `NAME` and `NAME@latest` resolve to the newest version that did not miss its gate, `NAME@vN` and a digest
prefix to exactly that version; manifests written before the record existed (no `gate`) resolve as before. `rlhf
artifacts list/show` show the verdict. Through the real store on disk and the command line in-process.
"""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from stages.common.gates import Gate, verdict
from stages.common.store import ArtifactError, ArtifactStore


class _Gate(Gate):
    min_accuracy: float | None = 0.6
    max_loss: float | None = None


def _publish(store: ArtifactStore, tmp_path, name: str, content: str, metrics: dict, gate: dict | None):
    src = tmp_path / f"src-{name}-{content}"
    src.mkdir()
    (src / "w.bin").write_text(content)
    return store.publish(src, name=name, kind="causal-lm", stage="sft", metrics=metrics, gate=gate)


def test_verdict_records_every_check_and_each_miss():
    assert verdict("sft", _Gate(), {"accuracy": 0.7}) == {"passed": True, "checks": {"min_accuracy": 0.6}, "missed": []}
    missed = verdict("sft", _Gate(max_loss=1.0), {"accuracy": 0.5, "loss": float("nan")})
    assert missed == {
        "passed": False,
        "checks": {"min_accuracy": 0.6, "max_loss": 1.0},
        "missed": ["sft: quality gate missed: accuracy = 0.5, expected at least 0.6 (sft.gate.min_accuracy)",
                   "sft: quality gate missed: loss = nan, expected at most 1 (sft.gate.max_loss)"],
    }  # fmt: skip
    assert verdict("sft", _Gate(min_accuracy=None), {}) == {"passed": True, "checks": {}, "missed": []}
    assert verdict("sft", None, {}) is None


def test_latest_skips_a_version_that_missed_its_gate(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    old = _publish(store, tmp_path, "sft-model", "a", {"accuracy": 0.1}, None)  # before gates were recorded
    good = _publish(store, tmp_path, "sft-model", "b", {"accuracy": 0.8}, verdict("sft", _Gate(), {"accuracy": 0.8}))
    bad = _publish(store, tmp_path, "sft-model", "c", {"accuracy": 0.2}, verdict("sft", _Gate(), {"accuracy": 0.2}))
    assert (old.version, good.version, bad.version) == (1, 2, 3)
    assert bad.manifest["gate"]["passed"] is False and "gate" not in old.manifest
    for ref in ("sft-model", "sft-model@latest", " sft-model@latest "):
        assert store.get(ref).ref == "sft-model@v2"
        assert store.manifest(ref)["version"] == 2
    assert store.get("sft-model@v3").ref == "sft-model@v3"  # named by version: used as asked
    assert store.get(bad.digest[:12]).ref == "sft-model@v3"

    later = _publish(store, tmp_path, "sft-model", "d", {"accuracy": 0.3}, None)  # no record: as before, it counts
    assert store.get("sft-model@latest").ref == later.ref == "sft-model@v4"


def test_latest_with_every_version_failed_is_one_line(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    for content in ("a", "b"):
        _publish(store, tmp_path, "policy", content, {"accuracy": 0.1}, verdict("ppo", _Gate(), {"accuracy": 0.1}))
    with pytest.raises(ArtifactError) as info:
        store.get("policy@latest")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("policy@latest: every version missed its quality gate (v1, v2); name one to use it anyway, "
                       "e.g. policy@v2")  # fmt: skip
    assert store.get("policy@v2").version == 2


def test_cli_list_and_show_give_the_gate(tmp_path, capsys):
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    _publish(store, tmp_path, "sft-model", "a", {"accuracy": 0.1}, None)
    _publish(store, tmp_path, "sft-model", "b", {"accuracy": 0.8}, verdict("sft", _Gate(), {"accuracy": 0.8}))
    _publish(store, tmp_path, "sft-model", "c", {"accuracy": 0.2}, verdict("sft", _Gate(), {"accuracy": 0.2}))
    capsys.readouterr()

    assert main(["artifacts", "list", "--store", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REF", "KIND", "STAGE", "GATE", "DIGEST", "CREATED"]
    assert [line.split()[3] for line in lines[1:]] == ["-", "passed", "missed"]

    assert main(["artifacts", "show", "sft-model@v3", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert ("  gate     missed: sft: quality gate missed: accuracy = 0.2, expected at least 0.6 (sft.gate.min_accuracy); "
            "not sft-model@latest\n") in out  # fmt: skip
    assert main(["artifacts", "show", "sft-model", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sft-model@v2 ") and "  gate     passed (min_accuracy 0.6)\n" in out
    assert main(["artifacts", "show", "sft-model@v1", "--store", str(root)]) == 0
    assert "  gate     not recorded\n" in capsys.readouterr().out

    assert main(["artifacts", "show", "sft-model@v3", "--json", "--store", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["gate"]["passed"] is False
