"""`rlhf sweep` mistakes are one line and exit 2 before anything starts: no Prefect, Ray or Tune, nothing published,
no Tune experiment folder (issue 28 item 6)."""

from __future__ import annotations

import pytest

from tests.flows.test_bad_inputs import _isolated, assert_one_line_error, cli, snapshot  # noqa: F401 - autouse fixture

CASES = [
    ("unknown-key", ["--grid", "reward.learnign_rate=[1e-3]"], ["reward.learnign_rate", "unknown key"]),
    ("empty-space", [], ["search space is empty"]),
    ("empty-list", ["--grid", "reward.learning_rate=[]"], ["sweep.grid.reward.learning_rate", "empty"]),
    ("not-a-list", ["--grid", "reward.learning_rate=[1e-3"], ["--grid", "is not a list"]),
    ("no-key", ["--grid", "[1,2]"], ["--grid", "expected KEY=[VALUE,...]"]),
    ("bad-value", ["--grid", "reward.learning_rate=[abc]"], ["reward.learning_rate", "expected a valid number"]),
    ("out-of-range", ["--grid", "reward.learning_rate=[-1]"], ["reward.learning_rate", "> 0"]),
    ("shared-section", ["--grid", "run.seed=[1,2]"], ["sweep key run.seed", "one stage's section"]),
    ("node-not-in-run", ["--grid", "grpo.kl_coef=[0.1]"], ["grpo is not a node of this run"]),
    ("bad-range", ["--uniform", "ppo.kl_coef=[0.2,0.1]"], ["LOW 0.2 must be below HIGH 0.1"]),
    ("log-range-at-zero", ["--loguniform", "ppo.kl_coef=[0,1]"], ["above 0"]),
    ("too-many-trials", ["--grid", "reward.learning_rate=[1e-4,1e-3,1e-2]", "--max-trials", "2"],
     ["3 trials", "sweep.max_trials = 2"]),
    ("too-many-samples", ["--uniform", "ppo.kl_coef=[0.01,0.2]", "--samples", "40"], ["40 trials", "max_trials = 16"]),
    ("metric-nobody-reports", ["--grid", "reward.learning_rate=[1e-3,3e-3]", "--metric", "eval.ppo.nonsense"],
     ["sweep.metric", "eval reports no 'ppo.nonsense'"]),
    ("metric-upstream", ["--grid", "reward.learning_rate=[1e-3,3e-3]", "--metric", "sft.eval_loss"],
     ["sft is not run by each trial"]),
    ("metric-without-node", ["--grid", "reward.learning_rate=[1e-3]", "--metric", "gold_score"],
     ["expected NODE.METRIC"]),
    ("bad-samples", ["--grid", "reward.learning_rate=[1e-3]", "--samples", "0"], ["sweep.samples"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_sweep_is_one_line_before_anything_starts(args, expected, tmp_path, capfd):
    store, work = tmp_path / "artifacts", tmp_path / "runs"
    before = snapshot(store)
    code, out, err = cli(["sweep", "--preset", "tiny", "--store", str(store), "--set", f"run.work_dir={work}", *args],
                         capfd)  # fmt: skip
    assert_one_line_error(code, out, err, *expected)
    assert snapshot(store) == before
    assert not (work / "sweeps").exists()  # Tune never started
    assert "Starting temporary server" not in out + err  # nor Prefect


def test_a_sweep_section_in_the_config_file_is_checked_too(tmp_path, capfd):
    config = tmp_path / "sweep.yaml"
    config.write_text("sweep:\n  grid:\n    reward.learning_rate: [0.001, 0.001]\n")
    code, out, err = cli(["sweep", "--preset", "tiny", "--config", str(config), "--store", str(tmp_path / "a")], capfd)
    assert_one_line_error(code, out, err, "sweep.grid.reward.learning_rate", "lists a value twice")
