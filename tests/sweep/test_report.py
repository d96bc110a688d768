"""The sweep report: rows from Tune's results, the best trial, the markdown, the artifact's lineage, the promotion,
and how many trials fit the cluster at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows import sweep_report
from flows.config import load_config
from flows.preflight import Resources
from flows.sweep import trial_concurrency
from flows.sweep_objective import Objective
from stages.common.store import ArtifactStore

KEYS = ("reward.learning_rate",)
SPACE = {"dimensions": [{"key": "reward.learning_rate", "kind": "grid", "values": [0.003, 0.001, 0.01]}],
         "samples": 1, "trials": 3}  # fmt: skip


def tune_result(lr, **metrics):
    return {"point": {"reward.learning_rate": lr, "__sweep__": "{}"}, "metrics": metrics, "error": ""}


@pytest.fixture
def store(tmp_path):
    s = ArtifactStore(str(tmp_path / "artifacts"))
    for i, name in enumerate(["reward-model", "reward-model", "policy", "policy"]):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "w.txt").write_text(str(i))
        s.publish(src, name=name, kind="causal-lm", stage="test")
    return s


def rows():
    return sweep_report.trial_rows([
        tune_result(0.01, state="failed", error="reward: quality gate missed"),
        tune_result(0.003, state="done", objective=0.25,
                    outputs=json.dumps({"reward": {"reward-model": "reward-model@v2"}, "ppo": {"policy": "policy@v2"}}),
                    ran='["reward", "ppo"]'),
        tune_result(0.001, state="done", objective=0.5,
                    outputs=json.dumps({"reward": {"reward-model": "reward-model@v1"}, "ppo": {"policy": "policy@v1"}}),
                    ran="[]"),
        {"point": {"reward.learning_rate": 0.03}, "metrics": {"reward": -0.7}, "error": ""},  # stopped by ASHA
    ], KEYS)  # fmt: skip


def test_rows_are_ordered_by_value_with_their_states():
    got = rows()
    assert [r["point"]["reward.learning_rate"] for r in got] == [0.001, 0.003, 0.01, 0.03]
    assert [r["trial"] for r in got] == [1, 2, 3, 4]
    assert [r["state"] for r in got] == ["done", "done", "failed", "stopped"]
    assert [r["objective"] for r in got] == [0.5, 0.25, None, None]
    assert got[2]["error"] == "reward: quality gate missed"


def test_best_and_markdown():
    report = sweep_report.build(SPACE, Objective("eval", "ppo.gold_score", "max"), rows(), {"sft": {"sft-model": "sft-model@v1"}})
    assert report["best"] == {"trial": 1, "point": {"reward.learning_rate": 0.001}, "objective": 0.5}
    low = sweep_report.build(SPACE, Objective("eval", "ppo.kl", "min"), rows(), {})
    assert low["best"]["trial"] == 2
    text = sweep_report.markdown(report)
    assert "| 1 **best** | 0.001 | 0.5 | done | reward-model@v1, policy@v1 |" in text
    assert "- trial 3: reward: quality gate missed" in text
    assert "Shared by every trial (run once): sft-model@v1" in text


def test_the_report_artifact_names_every_trial_and_a_rerun_is_the_same_version(store):
    report = sweep_report.build(SPACE, Objective("eval", "ppo.gold_score", "max"), rows(), {})
    art = sweep_report.publish(store, report, rows(), {"sweep": {}})
    lineage = store.lineage(art.ref)["inputs"]
    assert {role: node["ref"] for role, node in lineage.items()} == {
        "trial1_reward-model": "reward-model@v1", "trial1_policy": "policy@v1",
        "trial2_reward-model": "reward-model@v2", "trial2_policy": "policy@v2"}  # fmt: skip
    assert json.loads((Path(art.path) / "report.json").read_text())["best"]["trial"] == 1
    assert (Path(art.reports_path) / "objective.png").stat().st_size > 1000
    assert art.metrics["best.objective"] == 0.5 and art.metrics["trial2.objective"] == 0.25
    again = sweep_report.publish(store, report, rows(), {"sweep": {}})
    assert again.ref == art.ref


def test_promote_aliases_every_output_of_the_best_trial(store):
    best = rows()[0]
    assert sweep_report.promote(store, best, "sweep-report@v1") == [
        "reward-model@best -> reward-model@v1", "policy@best -> policy@v1"]  # fmt: skip
    assert store.get("policy@best").ref == "policy@v1"


def test_trials_at_once_follow_the_largest_stage_of_the_branch():
    cfg = load_config("tiny", None, [])  # 2 workers x 1 CPU per training stage
    assert trial_concurrency(cfg, ("reward", "ppo", "eval"), Resources(2, 0, 0, "here")) == 1
    assert trial_concurrency(cfg, ("reward", "ppo", "eval"), Resources(8, 0, 0, "here")) >= 2
    assert trial_concurrency(cfg, ("eval",), Resources(4, 0, 0, "here")) == 4  # eval: 1 CPU
    assert trial_concurrency(cfg, ("reward",), Resources(1, 0, 0, "here")) == 1  # never 0


def test_the_markdown_does_not_depend_on_the_order_outputs_were_listed_in():
    """A flow's summary and the cache answer list pretrain's two outputs in different orders (seen: a rerun with
    every trial cached published a second version of the same report)."""
    a = sweep_report.build(SPACE, Objective("eval", "ppo.gold_score", "max"), rows(),
                           {"pretrain": {"tokenizer": "tokenizer@v1", "base-model": "base-model@v1"}})
    b = sweep_report.build(SPACE, Objective("eval", "ppo.gold_score", "max"), rows(),
                           {"pretrain": {"base-model": "base-model@v1", "tokenizer": "tokenizer@v1"}})
    assert sweep_report.markdown(a) == sweep_report.markdown(b)
