"""`rlhf run --dry-run`, and the run planned once (issue 23 item 3): per node, reused or run and why, without
Prefect or Ray; the reasons from the key's parts against the node's latest cache record; the plan handed on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.keys import KeyParts, key_parts, stage_cache_key, why_run
from flows.plan import RunPlan, plan_run
from stages.common.fingerprint import cache_key, code_fingerprint
from stages.common.store import ArtifactStore

TINY = ["run", "--preset", "tiny", "--dry-run"]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- the reasons, from hand-made key parts ---------------------------------------------------------------------------

BEFORE = KeyParts("sft", "code-a", {"stage": {"lr": 1e-4}, "run": {"seed": 0}}, {"base_model": "d1", "data": "d2"})


def record(parts: KeyParts) -> dict:
    return parts.to_record()


def test_no_earlier_result():
    assert why_run(BEFORE, None) == ["no earlier result"]


def test_each_part_that_differs_is_named():
    code = KeyParts("sft", "code-b", BEFORE.config, BEFORE.inputs)
    assert why_run(code, record(BEFORE)) == ["code changed"]
    config = KeyParts("sft", "code-a", {**BEFORE.config, "stage": {"lr": 2e-4}}, BEFORE.inputs)
    assert why_run(config, record(BEFORE)) == ["config changed"]
    data = KeyParts("sft", "code-a", BEFORE.config, {"base_model": "d1", "data": "d3"})
    assert why_run(data, record(BEFORE)) == ["input changed: data"]
    everything = KeyParts("sft", "code-b", {}, {"base_model": "d9", "data": "d3", "extra": "d4"})
    assert why_run(everything, record(BEFORE)) == ["code changed", "config changed",
                                                   "input changed: base_model, data, extra"]  # fmt: skip


def test_forced_pending_and_missing_artifacts():
    assert why_run(BEFORE, record(BEFORE), forced="--from sft") == ["forced (--from sft)"]
    waiting = KeyParts("sft", "code-a", BEFORE.config, {"base_model": None, "data": "d2"})
    assert waiting.key is None  # an input not known yet: no key
    assert why_run(waiting, record(BEFORE), pending={"base_model": "pretrain"}) == [
        "new inputs from pretrain, which runs first"]  # the unknown input is not called "changed"
    # the same parts as the record: its key, so its artifacts must be gone
    assert why_run(BEFORE, record(BEFORE)) == ["the earlier result's artifacts are missing or corrupt"]


def test_the_key_is_computed_as_before_from_its_parts():
    """Keeping the parts changes no key: every cache in a store stays valid."""
    from flows.config import load_config

    cfg = load_config("tiny")
    parts = key_parts("grpo", cfg, {})
    assert parts.key == cache_key("grpo", code_fingerprint("rl"), parts.config, {}) == stage_cache_key("grpo", cfg, {})
    assert parts.to_record()["config"] == parts.config_digest and len(parts.config_digest) == 64


def test_cache_records_keep_the_parts_and_old_records_stay_readable(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    art = store.publish(src, name="sft-model", kind="causal-lm", stage="sft")
    store.record_cache("oldkey", {"model": art})  # the shape written before the parts were kept
    assert store.cached("oldkey")["model"].digest == art.digest
    assert store.latest_cache_record("sft") is None  # an old record names no node
    store.record_cache("k1", {"model": art}, parts=record(BEFORE))
    newer = KeyParts("sft", "code-b", BEFORE.config, BEFORE.inputs)
    store.record_cache("k2", {"model": art}, parts=record(newer))
    assert store.cached("k1")["model"].ref == art.ref and store.cached("k2")["model"].ref == art.ref
    latest = store.latest_cache_record("sft")
    assert latest["key"] == "k2" and latest["parts"] == record(newer)
    assert store.latest_cache_record("reward") is None


# --- the command line ------------------------------------------------------------------------------------------------


def test_dry_run_on_a_fresh_store_runs_everything_and_publishes_nothing(tmp_path, capsys):
    store = tmp_path / "store"
    assert main([*TINY, "--store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dry run (nothing started, nothing published")
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out[1:-1]}
    assert list(rows) == ["pretrain", "sft", "reward", "ppo", "eval"]
    assert all(action == "run" and why.startswith("no earlier result") for action, why in rows.values())
    assert rows["sft"][1] == "no earlier result; new inputs from pretrain, which runs first"
    assert out[-1] == "5 to run, 0 to reuse"
    assert files_under(store) == []  # no data set, no function file, no cache record


def test_dry_run_json_shape(tmp_path, capsys):
    assert main([*TINY, "--json", "--store", str(tmp_path / "store")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["skipped"] == {}
    assert [n["name"] for n in report["nodes"]] == ["pretrain", "sft", "reward", "ppo", "eval"]
    first = report["nodes"][0]
    assert set(first) == {"name", "action", "reasons", "cache_key", "inputs", "outputs"}
    assert first["action"] == "run" and first["reasons"] == ["no earlier result"] and len(first["cache_key"]) == 64
    assert first["inputs"] == {"corpus": "corpus (new version)"}  # the data set as the run would publish it
    sft = report["nodes"][1]
    assert sft["cache_key"] is None and sft["inputs"]["base_model"] is None  # produced by pretrain, which runs


def test_dry_run_names_what_is_forced(tmp_path, capsys):
    assert main([*TINY, "--json", "--from", "reward", "--store", str(tmp_path / "store")]) == 0
    nodes = {n["name"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert nodes["pretrain"]["reasons"] == ["no earlier result"]
    assert nodes["reward"]["reasons"][0] == "forced (--from reward)" and nodes["eval"]["reasons"][0] == "forced (--from reward)"
    assert main([*TINY, "--json", "--force", "--store", str(tmp_path / "store")]) == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert all(n["reasons"][0] == "forced (--force)" for n in nodes)


def test_dry_run_refuses_what_a_run_refuses(tmp_path, capsys):
    assert main([*TINY, "--store", str(tmp_path / "store"), "--set", "run.num_workers=-1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_dry_run_starts_neither_prefect_nor_ray(tmp_path):
    code = ("import sys; from flows.cli import main; "
            f"assert main({[*TINY, '--store', str(tmp_path / 'store')]!r}) == 0; "
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'ray')]; "
            "assert not loaded, loaded")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr


# --- planned once ----------------------------------------------------------------------------------------------------


def test_rlhf_run_plans_once_and_hands_the_plan_to_the_flow(tmp_path, monkeypatch, capsys):
    """The config is loaded once; the flow gets that plan (here a stand-in for it, so no Prefect starts)."""
    import flows.config
    import flows.pipeline

    loads, handed = [], []
    real_load = flows.config.load_config
    monkeypatch.setattr(flows.config, "load_config", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    def fake_flow(plan):
        handed.append(plan)
        return {"store": plan.store_root, "stages": {}, "skipped": {}, "wall_seconds": 0.0,
                "orchestration_overhead_seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(flows.pipeline, "run_pipeline", fake_flow)
    assert main(["run", "--preset", "tiny", "--store", str(tmp_path / "store")]) == 0
    assert len(loads) == 1 and len(handed) == 1 and isinstance(handed[0], RunPlan)
    plan = handed[0]
    assert plan.stages == ("pretrain", "sft", "reward", "ppo", "eval") and plan.forced == frozenset()
    assert plan.ingested and all(art.kind == "dataset" for art in plan.ingested.values())  # the flow reuses these


def test_run_pipeline_hands_the_plan_to_the_flow_without_planning_again(tmp_path, monkeypatch):
    import flows.pipeline

    plan = plan_run(dict(preset="tiny", store=str(tmp_path / "store")))
    monkeypatch.setattr(flows.pipeline, "plan_run", lambda params: pytest.fail("planned again"))
    monkeypatch.setattr(flows.pipeline, "rlhf", lambda **params: flows.pipeline._PLANNED.get())
    assert flows.pipeline.run_pipeline(plan) is plan
    assert flows.pipeline._PLANNED.get() is None
