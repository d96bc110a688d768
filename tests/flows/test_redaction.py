"""Credentials in URIs never leave the process: MLflow params and tags, Prefect asset keys, warnings, error lines and
`--json` output show `user:***@host` (stages/common/redact.py), while the store and tracker still connect with the
real URI. Each sink is checked through its real code path: a real MLflow file store in tmp_path read back whole, the
asset objects a stage task materializes, and the command line in-process.
"""

from __future__ import annotations

import json

from flows import assets
from flows.cli import main
from flows.tracking import Tracker, TrackingSection
from stages.common.store import ArtifactStore

SECRETS = ("hunter2", "wJalrSECRET", "ghp_TOKEN123", "s3cr3t-pw")
STORE_URI = "s3://AKIAEXAMPLE:wJalrSECRET@bucket/prefix"
DB_URI = "postgresql://mlflow:hunter2@db.example:5432/mlflow"


def _no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {text[:2000]}"


def test_tracking_params_tags_and_files_hold_no_credentials(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a plain folder: every byte MLflow stored can be read back

    store = ArtifactStore(tmp_path / "artifacts")
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights")
    art = store.publish(src, name="sft-model", kind="causal-lm", stage="sft", metrics={"eval_loss": 1.0})
    mlruns = tmp_path / "mlruns"
    tracker = Tracker(TrackingSection(uri=mlruns.as_uri(), experiment="t-redact"))
    tracker.start_pipeline(
        "run-1",
        params={"run": {"store": STORE_URI, "work_dir": "gs://ghp_TOKEN123@bucket/work"}, "tracking": {"uri": DB_URI}},
        tags={"store": STORE_URI, "preset": "tiny"},
    )
    tracker.log_stage("sft", state="ran", config={"data": {"path": "https://u:s3cr3t-pw@host/d.jsonl"}, "lr": 0.1},
                      outputs={"sft-model": art}, inputs={})  # fmt: skip
    tracker.end("FINISHED")
    assert tracker.enabled

    client = MlflowClient(tracking_uri=mlruns.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("t-redact").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent, sft = by_name["run-1"], by_name["sft"]
    assert parent.data.params["run.store"] == "s3://AKIAEXAMPLE:***@bucket/prefix"
    assert parent.data.params["run.work_dir"] == "gs://***@bucket/work"
    assert parent.data.params["tracking.uri"] == "postgresql://mlflow:***@db.example:5432/mlflow"
    assert parent.data.tags["store"] == "s3://AKIAEXAMPLE:***@bucket/prefix"
    assert sft.data.params == {"data.path": "https://u:***@host/d.jsonl", "lr": "0.1"}
    for run in runs:
        _no_secret(json.dumps([run.data.params, run.data.tags]))
    _no_secret("".join(p.read_text(errors="replace") for p in mlruns.rglob("*") if p.is_file()))


def test_tracking_warning_names_the_server_without_its_password():
    warnings: list[str] = []
    tracker = Tracker(TrackingSection(uri="http://admin:s3cr3t-pw@127.0.0.1:9", experiment="t-down"),
                      warn=warnings.append)  # fmt: skip
    tracker.start_pipeline("r", params={}, tags={})
    assert len(warnings) == 1 and "http://admin:***@127.0.0.1:9" in warnings[0], warnings
    _no_secret(warnings[0])
    assert tracker.uri == "http://admin:***@127.0.0.1:9"  # what the run summary shows


def test_asset_keys_hold_no_credentials():
    assert assets.asset_key(STORE_URI, "sft-model") == "s3://AKIAEXAMPLE:***@bucket/prefix/sft-model"
    task = assets.materializing(lambda: None, {"name": "sft"}, STORE_URI, ["sft-model"], ["sft-data"])
    keys = [a.key for a in task.assets] + [a.key for a in task.asset_deps]
    assert keys == ["s3://AKIAEXAMPLE:***@bucket/prefix/sft-model", "s3://AKIAEXAMPLE:***@bucket/prefix/sft-data"]


def test_cli_error_line_holds_no_credentials(capsys):
    assert main(["artifacts", "show", "nope@v1", "--store", "memory://user:s3cr3t-pw@redact-test/store"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "memory://user:***@redact-test/store" in err, err
    _no_secret(err)


def test_cli_dry_run_json_holds_no_credentials(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = "memory://user:s3cr3t-pw@redact-test/dry"
    assert main(["run", "--preset", "tiny", "--dry-run", "--json", "--store", store]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["store"] == "memory://user:***@redact-test/dry"
    _no_secret(out + err)


def test_cli_dry_run_text_holds_no_credentials(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--preset", "tiny", "--dry-run", "--store", "memory://user:s3cr3t-pw@redact-test/dry-text"]) == 0
    out, err = capsys.readouterr()
    assert "store: memory://user:***@redact-test/dry-text)" in out, out
    _no_secret(out + err)


def test_flow_run_parameters_hold_no_credentials():
    """Prefect records and shows the flow run's parameters: the store and the --set overrides go there masked, and
    the flow still takes the plan made with the real URI (the masked parameters match it)."""
    from flows.pipeline import flow_params
    from flows.plan import run_params

    params = run_params({"store": STORE_URI, "overrides": [f"tracking.uri={DB_URI}", "sft.max_steps=2"]})
    shown = flow_params(params)
    assert shown["store"] == "s3://AKIAEXAMPLE:***@bucket/prefix"
    assert shown["overrides"] == ["tracking.uri=postgresql://mlflow:***@db.example:5432/mlflow", "sft.max_steps=2"]
    _no_secret(json.dumps(shown))
    assert flow_params(shown) == shown and params["store"] == STORE_URI
    assert flow_params(run_params({}))["store"] is None


def test_probe_reaches_a_server_named_with_credentials():
    """urllib cannot open a URL with a user part (it reads `admin:pw@127.0.0.1` as the host name), so the probe asked
    nobody and turned tracking off for every password-protected server; it now asks the host without them."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from flows.tracking import probe

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe(f"http://admin:s3cr3t-pw@127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
