"""flows/tracking_values.py (the pure helpers) with hand-computed values, then flows/tracking.py's Tracker against a
real local MLflow store.

Real artifacts are published into a real ArtifactStore in a temp dir; the MLflow side is a real sqlite store read back
with MlflowClient / mlflow.search_runs. One sqlite database serves the module (creating one runs MLflow's migrations,
seconds on a busy box); each test uses its own experiment.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.tracking import Tracker, TrackingSection
from flows.tracking_values import (
    PARAM_VALUE_MAX,
    by_output,
    clip,
    flatten,
    param_value,
    read_curves,
    safe_key,
    stage_times_ms,
    summary_metrics,
)
from stages.common.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
# MLflow's sqlite store configures its ORM with a loader SQLAlchemy 2.1 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

# ------------------------------------------------------------------------------------------------ pure helpers


def test_flatten_dotted_keys():
    assert flatten({"lr": 0.1, "model": {"n_layer": 2, "act": {"name": "gelu"}}, "empty": {}}) == {
        "lr": 0.1,
        "model.n_layer": 2,
        "model.act.name": "gelu",
        "empty": {},
    }


def test_param_value_and_clip():
    assert param_value(None) == "None"
    assert param_value(3e-4) == "0.0003"
    assert param_value([1, "a"]) == '[1, "a"]'
    assert param_value("x") == "x"
    long = param_value("a" * 7000)
    assert len(long) == PARAM_VALUE_MAX and long.endswith("...[7000 chars]")
    assert clip("abcdefghij", 10) == "abcdefghij"


def test_clip_keeps_a_prefix_and_says_how_long():
    # marker "...[30 chars]" is 13 characters; a limit of 20 leaves 7 of the original
    assert clip("0123456789" * 3, 20) == "0123456...[30 chars]"


def test_safe_key():
    assert safe_key("model.n_layer") == "model.n_layer"
    assert safe_key("rewards/chosen") == "rewards/chosen"
    assert safe_key("loss (mean)") == "loss _mean_"
    assert safe_key("a//b") == "a__b"  # would resolve to another name as a path
    assert safe_key("/abs") == "_abs"
    assert safe_key("k" * 300) == "k" * 250


def test_summary_metrics_keeps_numbers_only():
    metrics = {"kl": 0.25, "iterations": 3, "passed": True, "gold_win_rate": None, "note": "x",
               "eval": {"loss": 1.5, "tags": ["a"]}}  # fmt: skip
    assert summary_metrics(metrics) == {"kl": 0.25, "iterations": 3.0, "passed": 1.0, "eval.loss": 1.5}


def test_read_curves_steps_and_iterations(tmp_path):
    lines = [
        {"step": 1, "loss": 2.0, "lr": 1e-3},
        {"step": 2, "loss": 1.5, "event": "resume"},
        {"iteration": 3, "kl": 0.1},  # PPO's rows count iterations
        {"loss": 9.0},  # no step: skipped
        [1, 2],  # not a row: skipped
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert read_curves(path) == {"loss": [(1, 2.0), (2, 1.5)], "lr": [(1, 1e-3)], "kl": [(3, 0.1)]}


def test_by_output_prefixes_shared_keys_only():
    merged = by_output({"tokenizer": {"vocab_size": 256}, "base-model": {"vocab_size": 256, "val_loss": 2.0}})
    assert merged == {"base-model/vocab_size": 256, "val_loss": 2.0, "tokenizer/vocab_size": 256}


def test_stage_times_from_manifest_when_ran(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    art = _publish(store, tmp_path, "m", {"loss": 1.0}, timings={"wall_seconds": 12.5})
    end = int(datetime_ms(art.manifest["created_at"]))
    assert stage_times_ms({"m": art}, "ran", now_ms=5) == (end - 12500, end)
    assert stage_times_ms({"m": art}, "Cached", now_ms=5) == (5, 5)
    assert stage_times_ms({}, "ran", now_ms=7) == (7, 7)


def test_tracking_section_is_strict():
    assert TrackingSection().model_dump() == {"enabled": True, "uri": None, "experiment": "Default", "report_to": []}
    with pytest.raises(ValidationError):
        TrackingSection(enabled="yes")
    with pytest.raises(ValidationError):
        TrackingSection.model_validate({"experiment": "Default", "server": "x"})
    with pytest.raises(ValidationError):
        TrackingSection(experiment="")


def test_end_rejects_an_unknown_status():
    with pytest.raises(ValueError, match="expected one of FINISHED, FAILED, KILLED"):
        Tracker(TrackingSection(enabled=False)).end("DONE")


# ------------------------------------------------------------------------------------------------ real MLflow


def datetime_ms(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp() * 1000


def _publish(store, tmp_path, name, metrics, *, curves=None, inputs=None, timings=None, kind="causal-lm"):
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / "weights.bin").write_bytes(name.encode() * 8)
    if curves is not None:
        (src / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curves))
    return store.publish(src, name=name, kind=kind, stage="test", metrics=metrics, inputs=inputs, timings=timings)


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory):
    """The module's MLflow home: a folder whose mlflow.db is both the explicit sqlite URI and the default location."""
    return tmp_path_factory.mktemp("mlflow-home")


@pytest.fixture
def in_mlflow_dir(mlflow_dir, monkeypatch):
    """Run in mlflow_dir with no tracking URI set anywhere, so MLflow resolves its default (./mlflow.db)."""
    import mlflow

    monkeypatch.chdir(mlflow_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    return mlflow_dir


@pytest.fixture
def lineage(tmp_path):
    """A data set and a model trained on it (metrics, a curve), and a reward model reused from the cache."""
    store = ArtifactStore(tmp_path / "artifacts")
    data = _publish(store, tmp_path, "sft-data", {"train_rows": 40}, kind="dataset")
    curves = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 2, "eval_loss": 1.7},
        {"step": 3, "loss": 1.2},
    ]
    sft = _publish(store, tmp_path, "sft-model", {"eval_loss": 1.7, "gold": None}, curves=curves,
                   inputs={"data": data}, timings={"wall_seconds": 3.0})  # fmt: skip
    reward = _publish(
        store, tmp_path, "reward-model", {"accuracy": 0.75}, inputs={"sft_model": sft}, timings={"wall_seconds": 5.0}
    )
    return {"data": data, "sft": sft, "reward": reward}


def _by_stage(client, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return {run.data.tags.get("stage", "pipeline"): run for run in runs}


def test_pipeline_and_stage_runs_read_back(mlflow_dir, lineage):
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_dir}/mlflow.db"
    tracker = Tracker(TrackingSection(uri=uri, experiment="t-readback"))
    sft_config = {"learning_rate": 1e-4, "lora": {"r": 8}, "prompt": "p" * 7000, "targets": ["q", "v"]}
    tracker.start_pipeline("run-1", params={"run": {"seed": 0}}, tags={"preset": "tiny"})
    tracker.log_stage("sft", state="ran", config=sft_config, outputs={"sft-model": lineage["sft"]},
                      inputs={"data": lineage["data"]})  # fmt: skip
    tracker.log_stage("reward", state="Cached", config={"learning_rate": 2e-4},
                      outputs={"reward-model": lineage["reward"]}, inputs={"sft_model": lineage["sft"]})  # fmt: skip
    tracker.end("FINISHED")
    assert tracker.enabled and tracker.parent_run_id is None

    client = MlflowClient(tracking_uri=uri)
    runs = _by_stage(client, "t-readback")
    assert set(runs) == {"pipeline", "sft", "reward"}
    parent, sft, reward = runs["pipeline"], runs["sft"], runs["reward"]
    assert parent.info.run_name == "run-1" and parent.info.status == "FINISHED"
    assert parent.data.params == {"run.seed": "0"}
    assert parent.data.tags["preset"] == "tiny" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["stage.reward.state"] == "Cached"
    assert parent.data.tags["output.sft-model.ref"] == "sft-model@v1"

    for run in (sft, reward):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
    assert sft.info.run_name == "sft" and sft.data.tags["state"] == "ran" and reward.data.tags["state"] == "Cached"
    # params: the resolved config, dotted, long values cut to MLflow's limit, lists as JSON
    assert sft.data.params["learning_rate"] == "0.0001" and sft.data.params["lora.r"] == "8"
    assert sft.data.params["targets"] == '["q", "v"]'
    assert len(sft.data.params["prompt"]) == PARAM_VALUE_MAX
    # lineage: each output's and input's ref and digest
    tags = sft.data.tags
    assert tags["output.sft-model.ref"] == "sft-model@v1" and tags["output.sft-model.digest"] == lineage["sft"].digest
    assert tags["input.data.ref"] == "sft-data@v1" and tags["input.data.digest"] == lineage["data"].digest
    assert reward.data.tags["input.sft_model.digest"] == lineage["sft"].digest
    # metrics: the manifest's numbers (None dropped), and the curve with its steps
    assert sft.data.metrics["eval_loss"] == 1.7 and "gold" not in sft.data.metrics
    assert reward.data.metrics == {"accuracy": 0.75}
    history = client.get_metric_history(sft.info.run_id, "curve/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert [(m.step, m.value) for m in client.get_metric_history(sft.info.run_id, "curve/eval_loss")] == [(2, 1.7)]
    # a stage that ran keeps its own duration (from the manifest); a reused one takes no time
    assert sft.info.end_time - sft.info.start_time == 3000
    assert reward.info.end_time == reward.info.start_time


def test_default_location_is_found_by_search_runs(in_mlflow_dir, lineage):
    """Done-when: after a run with the default config, search_runs from the same folder finds parent + 4 stages."""
    import mlflow

    tracker = Tracker(TrackingSection())
    with tracker.pipeline("tiny", params={}, tags={}):
        for stage in ("pretrain", "sft", "reward", "ppo"):
            tracker.log_stage(stage, state="ran", config={"seed": 1}, outputs={"sft-model": lineage["sft"]},
                              inputs={"data": lineage["data"]})  # fmt: skip
    assert tracker.uri == f"sqlite:///{in_mlflow_dir}/mlflow.db"
    runs = mlflow.search_runs()  # the default experiment, at the default location
    assert sorted(runs["tags.mlflow.runName"]) == ["ppo", "pretrain", "reward", "sft", "tiny"]
    parent_id = runs[runs["tags.rlhf.run"] == "pipeline"]["run_id"].item()
    stages = runs[runs["tags.rlhf.run"] == "stage"]
    assert set(stages["tags.mlflow.parentRunId"]) == {parent_id}
    assert list(stages["metrics.eval_loss"]) == [1.7] * 4
    assert set(runs["status"]) == {"FINISHED"}


def test_failed_block_marks_the_pipeline_failed(mlflow_dir):
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_dir}/mlflow.db"
    tracker = Tracker(TrackingSection(uri=uri, experiment="t-failed"))
    with pytest.raises(RuntimeError, match="stage crashed"):
        with tracker.pipeline("run-f", params={}, tags={}):
            raise RuntimeError("stage crashed")
    runs = _by_stage(MlflowClient(tracking_uri=uri), "t-failed")
    assert runs["pipeline"].info.status == "FAILED"


def test_disabled_tracker_imports_nothing_and_writes_nothing(tmp_path):
    code = """
import json, os, sys
from flows.tracking import Tracker, TrackingSection
t = Tracker(TrackingSection(enabled=False))
t.start_pipeline("r", params={"a": 1}, tags={"b": 2})
t.log_stage("sft", state="ran", config={"lr": 1}, outputs={}, inputs={})
t.end("FAILED")
with t.pipeline("r", params={}, tags={}):
    pass
print(json.dumps({"mlflow": "mlflow" in sys.modules, "files": os.listdir("."), "enabled": t.enabled}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"mlflow": False, "files": [], "enabled": False}


def test_unreachable_server_is_one_warning_then_off(lineage, caplog):
    tracker = Tracker(TrackingSection(uri="http://127.0.0.1:9", experiment="t-down"))
    with caplog.at_level(logging.WARNING, logger="flows.tracking"):
        tracker.start_pipeline("r", params={"a": 1}, tags={})
        tracker.log_stage("sft", state="ran", config={}, outputs={"sft-model": lineage["sft"]}, inputs={})
        tracker.end("FINISHED")
    ours = [r for r in caplog.records if r.name == "flows.tracking"]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING
    assert "http://127.0.0.1:9" in ours[0].getMessage() and "tracking is off" in ours[0].getMessage()
    assert "\n" not in ours[0].getMessage()
    assert not tracker.enabled


def test_unusable_database_is_one_warning_then_off(tmp_path, lineage):
    warnings: list[str] = []
    a_folder = tmp_path / "not-a-db"
    a_folder.mkdir()
    tracker = Tracker(TrackingSection(uri=f"sqlite:///{a_folder}"), warn=warnings.append)
    tracker.log_stage("sft", state="ran", config={}, outputs={"sft-model": lineage["sft"]}, inputs={})
    tracker.end("FINISHED")
    assert len(warnings) == 1 and "cannot open the sqlite database" in warnings[0]
    assert not tracker.enabled


def test_report_to_reaches_the_trainers_arguments(tmp_path, monkeypatch):
    """tracking.report_to is passed through to the HF Trainer (TensorBoard's folder beside the checkpoints)."""
    from dataclasses import replace

    from stages.trl.loop_config import TokenizerPlan, TrainLoopConfig
    from stages.trl.worker import training_args

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    plan = TokenizerPlan(pad_token="<eos>", pad_token_id=0, pad_is_eos=True, pad_note=None, chat_template=False)
    cfg = TrainLoopConfig(stage="sft", tokenizer=plan, model_dir=str(tmp_path), model_digest="0" * 64, store_root=None,
                          train_rows=(), test_rows=(), max_length=32, demo_task=False, max_steps=2, per_worker_batch=2,
                          gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0, weight_decay=0.0,
                          bf16=False, use_gpu=False, deepspeed=None, logging_steps=1, save_steps=2, seed=0,
                          cpus_per_worker=1.0)  # fmt: skip
    assert training_args(cfg, str(tmp_path))["report_to"] == "none"
    args = training_args(replace(cfg, report_to=("tensorboard",), logging_dir=str(tmp_path / "tb")), str(tmp_path))
    assert args["report_to"] == ["tensorboard"]
    import os

    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb")


def test_a_read_only_database_fails_the_probe_not_the_first_write(tmp_path):
    """Under `ray job submit` the default ./mlflow.db is the one the checkout's upload carried, in Ray's unpacked
    working directory, read-only: the probe must say so (one warning, tracking off) instead of MLflow's tracebacks
    at every stage. A tmpfs in a private mount namespace, made read-only after the database was written (root
    ignores file modes, so chmod would not show it)."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    ok = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                        capture_output=True, text=True)  # fmt: skip
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {ok.stderr.strip()}")
    make = "import sqlite3, sys; sqlite3.connect(sys.argv[1] + '/mlflow.db').execute('create table t (x)')"
    check = ("import sys\nfrom flows.tracking import TrackingUnavailable, probe\n"
             "try:\n    probe('sqlite:///' + sys.argv[1] + '/mlflow.db')\n"
             "except TrackingUnavailable as e:\n    print('refused:', e)\n")  # fmt: skip
    script = ('mount -t tmpfs -o size=64k tmpfs "$1" && "$2" -c "$3" "$1" && mount -o remount,ro "$1" '
              '&& "$2" -c "$4" "$1"')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(tmp_path), sys.executable, make, check],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: cannot open the sqlite database"), proc.stdout + proc.stderr[-2000:]
    assert "mlflow.db is read-only" in proc.stdout, proc.stdout


def test_under_ray_job_submit_the_default_is_beside_the_store(tmp_path, monkeypatch, lineage):
    """Issue 26 item 4: a job's working directory is Ray's unpacked upload; the default goes beside the store."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    store = tmp_path / "shared" / "artifacts"
    tracker = Tracker(TrackingSection(experiment="t-job"), store_root=f"file://{store}")
    with tracker.pipeline("job", params={}, tags={}):
        tracker.log_stage("sft", state="ran", config={}, outputs={"sft-model": lineage["sft"]}, inputs={})
    assert tracker.uri == f"sqlite:///{store}/tracking/mlflow.db"
    assert not (tmp_path / "mlflow.db").exists()
    runs = MlflowClient(tracking_uri=tracker.uri).search_runs(
        [MlflowClient(tracking_uri=tracker.uri).get_experiment_by_name("t-job").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job", "sft"]


def test_under_ray_job_submit_an_object_store_has_no_default(tmp_path, monkeypatch, lineage):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    warnings = []
    tracker = Tracker(TrackingSection(), warn=warnings.append, store_root="s3://key:secret@bucket/rlhf")
    tracker.start_pipeline("job", params={}, tags={})
    assert not tracker.enabled and len(warnings) == 1
    assert "set tracking.uri" in warnings[0] and "secret" not in warnings[0]
    assert not (tmp_path / "mlflow.db").exists()
