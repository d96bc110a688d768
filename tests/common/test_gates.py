"""Quality gates: pure checks with hand-picked values, and the per-stage defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from flows.config import load_config
from stages.common.gates import GateFailed, GateMiss, check, check_gate, metric_value
from stages.pretrain.config import PretrainGate
from stages.reward.config import RewardGate
from stages.sft.config import SFTGate


def test_min_and_max_bounds():
    gate = RewardGate(min_eval_accuracy=0.6)
    assert check("reward", gate, {"eval_accuracy": 0.61}) == []
    assert check("reward", gate, {"eval_accuracy": 0.6}) == []  # the threshold itself passes
    assert check("reward", gate, {"eval_accuracy": 0.49}) == [GateMiss("reward", "eval_accuracy", "min", 0.6, 0.49)]


def test_derived_ratio_metrics():
    # val 30 / unigram 120 = 0.25 <= 1.0 passes; 150 / 120 = 1.25 fails
    assert metric_value({"val_perplexity": 30.0, "unigram_perplexity": 120.0}, "perplexity_vs_unigram") == 0.25
    gate = PretrainGate()
    assert check("pretrain", gate, {"val_perplexity": 30.0, "unigram_perplexity": 120.0}) == []
    (miss,) = check("pretrain", gate, {"val_perplexity": 150.0, "unigram_perplexity": 120.0})
    assert miss.value == 1.25
    # SFT: 0.8 / 3.2 = 0.25 passes; a loss that rose (3.5 / 3.2) fails
    assert check("sft", SFTGate(), {"first_logged_loss": 3.2, "last_logged_loss": 0.8}) == []
    assert len(check("sft", SFTGate(), {"first_logged_loss": 3.2, "last_logged_loss": 3.5})) == 1


def test_missing_or_non_finite_values_fail():
    gate = RewardGate()
    assert check("reward", gate, {})[0].value is None
    assert len(check("reward", gate, {"eval_accuracy": math.nan})) == 1
    assert len(check("sft", SFTGate(), {"first_logged_loss": 3.2, "last_logged_loss": math.inf})) == 1
    assert metric_value({"eval_accuracy": True}, "eval_accuracy") is None  # a bool is not a metric value


def test_none_turns_a_check_off():
    assert RewardGate(min_eval_accuracy=None).checks() == []
    assert check("reward", RewardGate(min_eval_accuracy=None), {"eval_accuracy": 0.1}) == []


def test_message_names_metric_value_threshold_and_key():
    text = str(GateMiss("reward", "eval_accuracy", "min", 0.6, 0.4912))
    assert text == "reward: quality gate missed: eval_accuracy = 0.4912, expected at least 0.6 (reward.gate.min_eval_accuracy)"


@dataclass
class _Art:
    ref: str
    metrics: dict


def test_check_gate_raises_naming_the_published_artifact():
    with pytest.raises(GateFailed, match=r"eval_accuracy = 0.5, .* reward-model@v3 is published for inspection"):
        check_gate("reward", RewardGate(), {"reward-model": _Art("reward-model@v3", {"eval_accuracy": 0.5})})
    check_gate("reward", RewardGate(), {"reward-model": _Art("reward-model@v3", {"eval_accuracy": 0.8})})


def test_gates_are_settable_and_switchable_from_the_command_line():
    cfg = load_config("tiny", overrides=["reward.gate.min_eval_accuracy=0.7", "ppo.gate.max_kl=null"])
    assert cfg.reward.gate.checks() == [("eval_accuracy", "min", 0.7)]
    assert cfg.ppo.gate.checks() == []
    defaults = load_config("demo")
    assert defaults.reward.gate.checks() == [("eval_accuracy", "min", 0.6)]
    assert defaults.pretrain.gate.checks() == [("perplexity_vs_unigram", "max", 1.0)]
