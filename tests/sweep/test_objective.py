"""What a sweep ranks by: the default objective per run, a named metric checked before anything starts, the best."""

from __future__ import annotations

import pytest

from flows.config import load_config
from flows.sweep_objective import Objective, choose, reported_metrics
from flows.sweep_space import SweepSection
from stages.common.config import ConfigError
from stages.common.store import ArtifactStore


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "artifacts"))


def test_default_on_the_demo_task_is_the_first_policy_gold_score(store):
    cfg = load_config("tiny", None, ["align.methods=[grpo,ppo]"])
    got = choose(cfg, SweepSection(), ["reward", "grpo", "ppo", "eval"], ["reward"], store)
    assert got == Objective("eval", "grpo.gold_score", "max")


def test_default_with_reward_functions_is_their_pass_rate(store):
    cfg = load_config("tiny", None, ["align.methods=[grpo]", "data.task=arithmetic", "grpo.reward.model=null",
                                     "grpo.reward.functions=[{name: exact_match}]"])  # fmt: skip
    got = choose(cfg, SweepSection(), ["grpo", "eval"], ["grpo"], store)
    assert got == Objective("eval", "grpo.function_pass_rate", "max")


def test_default_without_eval_is_the_swept_stage_gate_metric(store):
    cfg = load_config("tiny", None, ["align.eval=false"])
    assert choose(cfg, SweepSection(), ["reward", "ppo"], ["reward"], store) == Objective("reward", "eval_accuracy", "max")
    # a max_ gate bound: smaller is better
    assert choose(cfg, SweepSection(), ["ppo"], ["ppo"], store) == Objective("ppo", "kl", "min")


def test_a_named_metric_takes_its_direction_from_the_gate_or_its_name(store):
    cfg = load_config("tiny", None, [])
    branch = ["reward", "ppo", "eval"]
    assert choose(cfg, SweepSection(metric="ppo.kl"), branch, ["reward"], store).mode == "min"
    assert choose(cfg, SweepSection(metric="reward.eval_accuracy"), branch, ["reward"], store).mode == "max"
    assert choose(cfg, SweepSection(metric="eval.ppo.rm_score"), branch, ["reward"], store).mode == "max"
    assert choose(cfg, SweepSection(metric="eval.ppo.kl", mode="max"), branch, ["reward"], store).mode == "max"


@pytest.mark.parametrize(("metric", "expected"), [
    ("eval", "expected NODE.METRIC"),
    ("sft.eval_loss", "sft is not run by each trial"),
    ("eval.ppo.nonsense", "eval reports no 'ppo.nonsense'"),
    ("eval.grpo.gold_score", "eval reports no 'grpo.gold_score'"),  # grpo is not in the run
    ("reward.made_up", "reward reports no 'made_up'"),
])  # fmt: skip
def test_a_metric_no_stage_reports_is_refused(metric, expected, store):
    cfg = load_config("tiny", None, [])
    with pytest.raises(ConfigError, match=expected):
        choose(cfg, SweepSection(metric=metric), ["reward", "ppo", "eval"], ["reward"], store)


def test_metrics_an_earlier_artifact_of_the_node_reported_are_known(store, tmp_path):
    cfg = load_config("tiny", None, [])
    assert "eval_margin" not in reported_metrics(cfg, "reward", store)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "w.bin").write_bytes(b"1")
    store.publish(tmp_path / "rm", name="reward-model", kind="reward-model", stage="reward",
                  metrics={"eval_margin": 0.3, "note": "text"})  # fmt: skip
    known = reported_metrics(cfg, "reward", store)
    assert "eval_margin" in known and "note" not in known  # numbers only


def test_best_by_mode_first_on_a_tie():
    scored = [("a", 0.5), ("b", 0.9), ("c", 0.9), ("d", -1.0)]
    assert Objective("eval", "ppo.gold_score", "max").best(scored) == "b"
    assert Objective("ppo", "kl", "min").best(scored) == "d"
    assert Objective("ppo", "kl", "min").best([]) is None
