"""Reward functions a user gets wrong, through the command line: exit 2 with one `error:` line, no traceback, and
no policy published. Mistakes in the file (missing, syntax, name, signature, a column the data lacks) are found by
reading it before Prefect or Ray start, so the store is untouched; mistakes that only running it shows (it raises,
hangs, returns the wrong length, a non-number, NaN) fail the RL stage with a line naming the function."""

from __future__ import annotations

import subprocess

import pytest

# the store fixtures and the one-line checks of the bad-input tests (fixtures are found by name: imported, not called)
from tests.flows.test_bad_inputs import (  # noqa: F401
    RLHF,
    _isolated,
    assert_one_line_error,
    base_store,
    cli,
    run_args,
    snapshot,
    store,
)

GRPO_ONLY = ("--only", "grpo", "--input", "sft_model=tiny-lm@v1", "--set", "grpo.reward.model=null")
FAST_GRPO = ("--set", "grpo.iterations=1", "--set", "grpo.eval_prompts=2", "--set", "grpo.rollout_batch_size=4",
             "--set", "grpo.mini_batch_size=8")  # fmt: skip


def with_function(tmp_path, source: str | None, entry: str = "{name: f, path: PATH}") -> tuple[str, ...]:
    path = tmp_path / "my_reward.py"
    if source is not None:
        path.write_text(source)
    return ("--set", f"grpo.reward.functions=[{entry.replace('PATH', str(path))}]")


PREFLIGHT_CASES = [
    ("missing-file", None, "{name: f, path: PATH}", ["grpo.reward.functions[0].path", "my_reward.py", "no such file"]),
    ("syntax-error", "def f(completions, **kw):\n    return [\n", "{name: f, path: PATH}",
     ["grpo.reward.functions[0]", "line 2: syntax error"]),
    ("missing-function", "def g(completions, **kw):\n    return []\n", "{name: f, path: PATH}",
     ["grpo.reward.functions[0]", "defines no top-level 'f' (its functions: g)"]),
    ("no-completions", "def f(prompts, replies):\n    return []\n", "{name: f, path: PATH}",
     ["grpo.reward.functions[0]", "takes no 'completions'"]),
    ("unknown-column", "def f(completions, solution):\n    return []\n", "{name: f, path: PATH}",
     ["grpo.reward.functions[0]", "requires 'solution'", "column of the prompt data (prompt)"]),
    ("builtin-without-its-column", None, "{name: exact_match}",
     ["grpo.reward.functions[0]", "exact_match", "column 'answer'"]),
    ("bad-regex", None, "{name: format_regex, args: {pattern: '(['}}",
     ["grpo.reward.functions[0].args.pattern", "not a regular expression"]),
    ("unknown-builtin", None, "{name: exact_mtch}", ["grpo.reward.functions", "a built-in reward function"]),
]


@pytest.mark.parametrize(("source", "entry", "expected"), [c[1:] for c in PREFLIGHT_CASES],
                         ids=[c[0] for c in PREFLIGHT_CASES])  # fmt: skip
def test_a_bad_function_is_refused_before_anything_starts(source, entry, expected, store, tmp_path, capfd):  # noqa: F811
    before = snapshot(store)
    code, out, err = cli(run_args(store, tmp_path, *GRPO_ONLY, *with_function(tmp_path, source, entry)), capfd)
    assert_one_line_error(code, out, err, *expected)
    assert "Starting temporary server" not in out + err  # Prefect never started
    assert snapshot(store) == before


RUNTIME_CASES = [
    ("raises", "def f(completions, **kw):\n    raise ValueError('cannot parse the reply')\n", (),
     ["reward function f", "raised ValueError: cannot parse the reply"]),
    ("hangs", "import time\ndef f(completions, **kw):\n    time.sleep(600)\n", ("--set", "grpo.reward.timeout_s=3"),
     ["reward function f", "no result within 3s", "reward.timeout_s"]),
    ("wrong-length", "def f(completions, **kw):\n    return [1.0]\n", (), ["reward function f", "returned 1 scores for"]),
    ("not-a-number", "def f(completions, **kw):\n    return ['high'] * len(completions)\n", (),
     ["reward function f", "row 0: returned 'high', expected a number or None"]),
    ("nan", "def f(completions, **kw):\n    return [0.0] + [float('nan')] * (len(completions) - 1)\n", (),
     ["reward function f", "row 1: returned nan, expected a finite number"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "extra", "expected"), [c[1:] for c in RUNTIME_CASES],
                         ids=[c[0] for c in RUNTIME_CASES])  # fmt: skip
def test_a_function_that_fails_when_run_fails_the_stage_and_publishes_no_policy(source, extra, expected, store,  # noqa: F811
                                                                                  tmp_path):  # fmt: skip
    # the real console script, one process per run: Prefect's log handlers outlive a captured in-process run
    argv = run_args(store, tmp_path, *GRPO_ONLY, *FAST_GRPO, *extra, *with_function(tmp_path, source))
    done = subprocess.run([RLHF, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, *expected)
    published = {p.parent.name for p in (store / "manifests").glob("*/v*.json")}
    assert "policy-grpo" not in published
    assert "reward-fn-f" in published  # the code that failed is kept, by content, for inspection
