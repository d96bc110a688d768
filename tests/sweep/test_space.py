"""The sweep's search space: flags and the `sweep:` section parsed, every mistake one line, trials counted."""

from __future__ import annotations

import pytest

from flows.sweep_space import SweepSection, build_space, from_flags, point_overrides
from stages.common.config import ConfigError, parse_override


def space(**section):
    return build_space(SweepSection(**section))


def test_flags_parse_lists_and_ranges_as_numbers():
    got = from_flags({"grid": ["reward.learning_rate=[3e-4,1e-3]"], "uniform": ["ppo.kl_coef=0.01,0.2"],
                      "choice": ["dpo.beta=[0.1, 0.5]"]})  # fmt: skip
    assert got["grid"] == {"reward.learning_rate": [3e-4, 1e-3]}
    assert got["uniform"] == {"ppo.kl_coef": [0.01, 0.2]}  # brackets may be left out
    assert got["choice"] == {"dpo.beta": [0.1, 0.5]}
    assert got["loguniform"] == {}


@pytest.mark.parametrize(("item", "expected"), [
    ("reward.learning_rate", "expected KEY=[VALUE,...]"),
    ("=[1,2]", "expected KEY=[VALUE,...]"),
    ("reward.learning_rate=", "expected KEY=[VALUE,...]"),
    ("reward.learning_rate=[1,2", "is not a list"),
])  # fmt: skip
def test_malformed_flags(item, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        from_flags({"grid": [item]})


def test_trials_are_the_grid_times_the_samples():
    s = space(grid={"reward.learning_rate": [1, 2, 3], "reward.max_steps": [10, 20]}, samples=2)
    assert s.trials == 12  # 3 x 2 combinations, each twice
    assert s.keys == ("reward.learning_rate", "reward.max_steps") and s.nodes == ("reward",)
    r = space(uniform={"ppo.kl_coef": [0.01, 0.2]}, samples=5)
    assert r.trials == 5  # a random search: one trial per sample


def test_check_points_cover_every_listed_value_and_both_ends_of_a_range():
    s = space(grid={"ppo.kl_coef": [0.05, 0.1]}, loguniform={"ppo.learning_rate": [1e-6, 1e-4]})
    assert s.check_points() == [
        {"ppo.kl_coef": 0.05, "ppo.learning_rate": 1e-6}, {"ppo.kl_coef": 0.05, "ppo.learning_rate": 1e-4},
        {"ppo.kl_coef": 0.1, "ppo.learning_rate": 1e-6}, {"ppo.kl_coef": 0.1, "ppo.learning_rate": 1e-4},
    ]  # fmt: skip


@pytest.mark.parametrize(("section", "expected"), [
    ({}, "search space is empty"),
    ({"grid": {"reward.learning_rate": []}}, "list of values is empty"),
    ({"grid": {"reward.learning_rate": [1, 1]}}, "lists a value twice"),
    ({"grid": {"learning_rate": [1]}}, "dotted config key"),
    ({"grid": {"ppo.kl_coef": [1]}, "choice": {"ppo.kl_coef": [2]}}, "also in sweep.grid"),
    ({"uniform": {"ppo.kl_coef": [0.2, 0.1]}}, "LOW 0.2 must be below HIGH 0.1"),
    ({"uniform": {"ppo.kl_coef": [0.1]}}, "two numbers"),
    ({"uniform": {"ppo.kl_coef": [0.1, 0.3, 0.5]}}, "two numbers"),
    ({"loguniform": {"ppo.kl_coef": [0.0, 1.0]}}, "above 0"),
    ({"grid": {"reward.learning_rate": [1, 2, 3]}, "max_trials": 2}, "3 trials (3 reward.learning_rate), more than"),
    ({"uniform": {"ppo.kl_coef": [0.1, 0.2]}, "samples": 20}, "20 trials (20 samples)"),
])  # fmt: skip
def test_every_mistake_is_one_line(section, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        space(**section)


def test_a_trial_point_becomes_set_items_that_parse_back_to_the_same_values():
    point = {"reward.learning_rate": 3e-4, "sft.packing": True, "dpo.loss_type": "sigmoid", "ppo.iterations": 4}
    parsed = {".".join(k): v for k, v in (parse_override(item) for item in point_overrides(point))}
    assert parsed == point
    assert type(parsed["reward.learning_rate"]) is float and type(parsed["ppo.iterations"]) is int
