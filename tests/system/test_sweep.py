"""`rlhf sweep` as a user runs it (the console script, its own local Ray, Prefect API and Tune), on a copy of the
session's tiny pipeline: the shared stages are cached, each trial is a branch with its own cache key, a rerun runs
nothing, a value added to the grid runs one trial, the report names every trial, MLflow nests the trials under the
sweep, and --promote points NAME@best at the best trial's artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.store import ArtifactStore

RLHF = str(Path(sys.executable).parent / "rlhf")
pytestmark = pytest.mark.timeout(1200)


def sweep(pipeline_copy, cwd: Path, *args: str) -> dict:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)  # the sweep starts its own temporary server, as for a user
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([RLHF, "sweep", "--preset", "tiny", "--store", str(pipeline_copy["store"]),
                           "--set", f"run.work_dir={pipeline_copy['work_dir']}", "--json", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1100)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_a_grid_sweep_caches_its_trials_and_adds_one_value_as_one_trial(pipeline_copy, tmp_path):
    store = ArtifactStore(str(pipeline_copy["store"]))
    before = {m["name"] for m in store.list()}
    policies_before = len(store.list("policy"))
    metric = ("--metric", "eval.ppo.rm_score")  # the tiny policies' gold score is flat; the RM score moves

    first = sweep(pipeline_copy, tmp_path, "--grid", "ppo.kl_coef=[0.05,0.2]", *metric)
    assert [t["point"] for t in first["trials"]] == [{"ppo.kl_coef": 0.05}, {"ppo.kl_coef": 0.2}]
    assert all(t["state"] == "done" and isinstance(t["objective"], float) for t in first["trials"])
    # 0.05 is the tiny preset's own value: the session pipeline's ppo and eval answer it; 0.2 is a new branch
    assert first["ran"] == {"1": [], "2": ["ppo", "eval"]}
    assert set(first["upstream"]) == {"pretrain", "sft", "reward"}  # run once (here: cached) for both trials
    assert len(store.list("policy")) == policies_before + 1
    refs = [t["outputs"]["ppo"]["policy"] for t in first["trials"]]
    assert len(set(refs)) == 2  # two policies, one per trial
    lineage = store.lineage(first["ref"])["inputs"]
    assert {lineage[f"trial{i}_policy"]["ref"] for i in (1, 2)} == set(refs)
    assert {lineage[f"trial{i}_eval-report"]["ref"] for i in (1, 2)} == {t["outputs"]["eval"]["eval-report"]
                                                                         for t in first["trials"]}  # fmt: skip
    # every trial's policy descends from the one shared sft model
    sft = {lineage[f"trial{i}_policy"]["inputs"]["sft_model"]["ref"] for i in (1, 2)}
    assert len(sft) == 1

    again = sweep(pipeline_copy, tmp_path, "--grid", "ppo.kl_coef=[0.05,0.2]", *metric)
    assert again["ran"] == {"1": [], "2": []}  # everything cached
    assert again["ref"] == first["ref"]  # the same report: the same version

    more = sweep(pipeline_copy, tmp_path, "--grid", "ppo.kl_coef=[0.05,0.1,0.2]", *metric, "--promote")
    assert more["ran"] == {"1": [], "2": ["ppo", "eval"], "3": []}  # the new value only
    best = more["best"]
    values = [t["objective"] for t in more["trials"]]
    assert best["objective"] == max(values)
    best_policy = more["trials"][best["trial"] - 1]["outputs"]["ppo"]["policy"]
    assert store.get("policy@best").ref == best_policy
    assert store.get("eval-report@best").ref == more["trials"][best["trial"] - 1]["outputs"]["eval"]["eval-report"]
    assert "policy@best -> " + best_policy in more["promoted"]
    assert {m["name"] for m in store.list()} == before | {"sweep-report"}

    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
         .search_experiments()])  # fmt: skip
    sweeps = [r for r in runs if r.data.tags.get("rlhf.run") == "sweep"]
    assert len(sweeps) == 3
    last = max(sweeps, key=lambda r: r.info.start_time)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == last.info.run_id]
    assert sorted(r.data.params["ppo.kl_coef"] for r in trials) == ["0.05", "0.1", "0.2"]
    assert sorted(r.data.metrics["objective"] for r in trials) == sorted(values)
