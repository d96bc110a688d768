"""Reward functions without Ray: what the driver checks without running them, the built-ins, the weighted sum and
the checks of what a function returns. Values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest

from stages.common.config import ConfigError
from stages.reward_functions import builtin
from stages.reward_functions.config import FunctionSpec, RewardSources
from stages.reward_functions.runner import FunctionActor, RewardFunctionError, check_scores, pass_rates, weighted_sum
from stages.reward_functions.source_check import check_function

# TRL's documentation example (GRPOTrainer, "custom reward functions"), unchanged
TRL_DOC_FUNCTION = '''def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]
'''


def spec_for(tmp_path, source: str, name: str, **kw) -> FunctionSpec:
    path = tmp_path / "reward.py"
    path.write_text(source)
    return FunctionSpec(name=name, path=str(path), **kw)


# --- what the driver checks by reading the file ------------------------------------------------------------------


def test_a_function_copied_from_trl_passes_the_checks(tmp_path):
    check_function(spec_for(tmp_path, TRL_DOC_FUNCTION, "reward_len"), "grpo.reward.functions[0]", ["prompt"])


@pytest.mark.parametrize(("source", "name", "expected"), [
    ("def f(completions, **kw):\n    return [\n", "f", "line 2: syntax error"),
    ("def g(completions, **kw):\n    return []\n", "f", "defines no top-level 'f' (its functions: g)"),
    ("def f(prompts, /, completions):\n    return []\n", "f", "positional-only"),
    ("def f(prompts, replies):\n    return []\n", "f", "takes no 'completions'"),
    ("def f(completions, solution):\n    return []\n", "f", "requires 'solution'"),
    ("def f(completions, *, pattern):\n    return []\n", "f", "requires 'pattern'"),
])  # fmt: skip
def test_a_file_the_driver_refuses_without_running_it(tmp_path, source, name, expected):
    with pytest.raises(ConfigError, match="grpo.reward.functions.0.") as e:
        check_function(spec_for(tmp_path, source, name), "grpo.reward.functions[0]", ["prompt", "answer"])
    assert expected in str(e.value)


def test_checks_never_execute_the_file(tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('x')\ndef f(completions, **kw):\n    return [0.0] * len(completions)\n"
    check_function(spec_for(tmp_path, source, "f"), "grpo.reward.functions[0]", ["prompt"])
    assert not marker.exists()


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        check_function(FunctionSpec(name="f", path=str(tmp_path / "none.py")), "grpo.reward.functions[0]")
    with pytest.raises(ConfigError, match=r"expected a Python file \(.py\)"):
        check_function(FunctionSpec(name="f", path=str(tmp_path / "f.txt")), "grpo.reward.functions[0]")


def test_a_required_column_is_accepted_when_the_data_has_it(tmp_path):
    spec = spec_for(tmp_path, "def f(completions, answer):\n    return []\n", "f")
    check_function(spec, "grpo.reward.functions[0]", ["prompt", "answer"])
    check_function(spec, "grpo.reward.functions[0]", None)  # columns unknown (a hub data set): the stage checks


def test_builtins_check_their_column_and_pattern():
    with pytest.raises(ConfigError, match="column 'answer', which it does not have"):
        check_function(FunctionSpec(name="exact_match"), "grpo.reward.functions[0]", ["prompt"])
    check_function(FunctionSpec(name="exact_match", args={"column": "gold"}), "x", ["prompt", "gold"])
    with pytest.raises(ConfigError, match="format_regex needs a regular expression"):
        check_function(FunctionSpec(name="format_regex"), "x", ["prompt"])
    with pytest.raises(ConfigError, match="not a regular expression"):
        check_function(FunctionSpec(name="format_regex", args={"pattern": "(["}), "x", ["prompt"])


def test_reward_sources_need_a_source_and_unique_functions():
    with pytest.raises(ValueError, match="a reward source"):
        RewardSources(model=None)
    with pytest.raises(ValueError, match="at most once"):
        RewardSources(functions=[FunctionSpec(name="demo_gold"), FunctionSpec(name="demo_gold")])
    with pytest.raises(ValueError, match="a built-in reward function"):
        FunctionSpec(name="exact_matc")


# --- the built-ins --------------------------------------------------------------------------------------------------


def test_exact_match_normalises_space_period_and_case():
    # " 19." -> "19" == "19"; "The 19" != "19"; [{"content": "ABC"}] (chat) -> "abc" == "abc"
    assert builtin.exact_match([" 19.", "The 19", [{"role": "assistant", "content": "ABC"}]],
                               answer=["19", "19", "abc"]) == [1.0, 0.0, 1.0]  # fmt: skip
    assert builtin.exact_match(["x"], column="gold", gold=["X"]) == [1.0]
    with pytest.raises(KeyError, match="column 'answer'"):
        builtin.exact_match(["x"], prompts=["p"])


def test_format_regex_matches_the_whole_reply():
    assert builtin.format_regex(["<a>1</a>", "<a>1</a> more", "  <a>2</a>\n"], pattern=r"<a>\d</a>") == [1.0, 0.0, 1.0]


def test_math_match_compares_values_and_skips_an_unparseable_gold():
    scores = builtin.math_match(["The answer is $\\frac{1}{2}$", "0.5", "3"], answer=["$0.5$", "$\\frac{1}{2}$", "$4$"])
    assert scores == [1.0, 1.0, 0.0]
    assert builtin.math_match(["1"], answer=["no number here at all"]) == [None]


def test_demo_gold_is_the_demo_scorer():
    from stages.data.demo import gold_score, make_prompt

    prompt = make_prompt("Describe the cat.")
    replies = ["The cat is happy.", "no"]
    assert builtin.demo_gold([prompt] * 2, replies) == [gold_score(prompt, r) for r in replies]


# --- the weighted sum and what a function returns ----------------------------------------------------------------


def test_weighted_sum_leaves_a_none_out():
    specs = [FunctionSpec(name="exact_match", weight=2.0), FunctionSpec(name="demo_gold", weight=0.5)]
    scores = {"exact_match": [1.0, None, 0.0], "demo_gold": [-1.0, 1.0, None]}
    # row 0: 2*1 + 0.5*-1 = 1.5; row 1: 0.5*1 = 0.5; row 2: 2*0 = 0
    assert weighted_sum(scores, specs, 3) == [1.5, 0.5, 0.0]


def test_pass_rates_count_only_scored_replies():
    # exact_match: 1 of the 2 scored replies >= 1.0; demo_gold: 0.5 >= 0.5 and 1.0 >= 0.5 of 2 scored
    assert pass_rates({"exact_match": [1.0, None, 0.0], "demo_gold": [0.5, 1.0, None]},
                      {"exact_match": 1.0, "demo_gold": 0.5}) == {"exact_match": 0.5, "demo_gold": 1.0}  # fmt: skip
    assert pass_rates({"f": [None]}, {"f": 1.0}) == {"f": None}


@pytest.mark.parametrize(("result", "expected"), [
    ((1, 2), None), ([1, 2, 3], "returned 3 scores for 2 replies"), ("ab", "returned a str"),
    ([1.0, "x"], "row 1: returned 'x'"), ([1.0, math.nan], "row 1: returned nan"), ([True, 1.0], "row 0: returned True"),
    ([math.inf, 0], "row 0: returned inf"),
])  # fmt: skip
def test_check_scores_names_the_first_offending_row(result, expected):
    if expected is None:
        assert check_scores(list(result), 2, "f") == [1.0, 2.0]
        return
    with pytest.raises(RewardFunctionError, match="reward function f") as e:
        check_scores(result, 2, "f")
    assert expected in str(e.value)


def test_the_actor_class_calls_plain_async_and_narrow_signatures():
    """FunctionActor outside Ray (the class Ray runs): **kwargs get everything, a narrow signature only its names,
    a coroutine is awaited, and a module that raises at import reports it instead of raising."""
    kwargs = {"prompts": ["p"], "completions": ["c"], "completion_ids": [[1]], "answer": ["c"]}
    wide = FunctionActor("f", "rf_wide", "def f(completions, **kw):\n    return [float(kw['answer'][0] == 'c')]\n", "<t>")
    assert wide.ready() is None and wide.call(kwargs, 0) == ("ok", [1.0])
    narrow = FunctionActor("f", "rf_narrow", "def f(completions, answer):\n    return [len(answer)]\n", "<t>")
    assert narrow.call(kwargs, 0) == ("ok", [1])
    coroutine = FunctionActor("f", "rf_async", "async def f(completions, **kw):\n    return [0.5]\n", "<t>")
    assert coroutine.call(kwargs, 0) == ("ok", [0.5])
    raising = FunctionActor("f", "rf_raise", "def f(completions, **kw):\n    raise ValueError('bad row')\n", "<t>")
    assert raising.call(kwargs, 0) == ("error", "raised ValueError: bad row")
    broken = FunctionActor("f", "rf_broken", "import no_such_module_here\n", "<t>")
    assert "importing its file raised ModuleNotFoundError" in broken.ready()
