"""The Prefect flow over every stage, with a real Prefect API and a real local Ray on the tiny preset."""

from __future__ import annotations

import pytest

from flows import pipeline
from flows.pipeline import plan_stages, rlhf
from stages.common.config import ConfigError
from stages.common.errors import StageInputError
from stages.common.store import ArtifactError, ArtifactStore

pytestmark = pytest.mark.slow


def _states(summary):
    return {name: info["state"] for name, info in summary["stages"].items()}


def _versions(store_root):
    return sorted((m["name"], m["version"]) for m in ArtifactStore(str(store_root)).list())


def _run(copy, **params):
    overrides = params.pop("overrides", [])
    return rlhf(preset="tiny", store=str(copy["store"]), overrides=[f"run.work_dir={copy['work_dir']}", *overrides],
                **params)


def test_plan_stages():
    assert plan_stages(None, None) == (["pretrain", "sft", "reward", "ppo", "eval"], set())
    assert plan_stages("reward", None) == (["pretrain", "sft", "reward", "ppo", "eval"], {"reward", "ppo", "eval"})
    assert plan_stages(None, "sft") == (["sft"], set())
    with pytest.raises(ConfigError, match="--from 'rlhf': unknown stage"):
        plan_stages("rlhf", None)


def test_full_run_publishes_four_stages_with_lineage(tiny_pipeline):
    summary, store = tiny_pipeline["summary"], ArtifactStore(str(tiny_pipeline["store"]))
    assert _states(summary) == {"pretrain": "Completed", "sft": "Completed", "reward": "Completed", "ppo": "Completed",
                                "eval": "Completed"}
    policy = store.get(summary["stages"]["ppo"]["outputs"]["policy"], kind="causal-lm")
    tree = store.lineage(policy.ref)
    assert set(tree["inputs"]) == {"sft_model", "reward_model", "prompts"}
    sft = tree["inputs"]["sft_model"]
    assert sft["ref"].startswith("sft-model@") and sft["inputs"]["base_model"]["ref"].startswith("base-model@")
    assert sft["inputs"]["base_model"]["inputs"]["corpus"]["kind"] == "dataset"
    reward = tree["inputs"]["reward_model"]
    assert reward["kind"] == "reward-model" and reward["inputs"]["sft_model"]["digest"] == sft["digest"]
    for name in ("tokenizer", "base-model", "sft-model", "reward-model", "policy", "eval-report"):
        store.verify(name)
    report = store.get(summary["stages"]["eval"]["outputs"]["eval-report"], kind="eval-report")
    assert set(store.lineage(report.ref)["inputs"]) >= {"sft_model", "reward_model", "prompts", "policy.ppo"}


def _asset_events(store_root: str, wanted: set[str], patience_s: float = 60.0) -> dict:
    """The Prefect API's asset materialization events of this store, by asset name, once `wanted` have all arrived
    (events reach the server asynchronously after the flow ends)."""
    import asyncio
    import time

    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.assets import asset_key

    prefix = asset_key(store_root, "")

    async def read() -> dict:
        flt = EventFilter(event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                          resource=EventResourceFilter(id_prefix=[prefix]))  # fmt: skip
        async with get_client() as client:
            page = await client.read_events(filter=flt, limit=50)
        return {e.resource.id.removeprefix(prefix): e for e in page.events}

    deadline = time.monotonic() + patience_s
    while True:
        events = asyncio.run(read())
        if wanted <= set(events) or time.monotonic() > deadline:
            return events
        time.sleep(1.0)


def test_run_materializes_prefect_assets_with_upstream_lineage(tiny_pipeline):
    """Each stage run is a Prefect asset materialization of what it published, related to the assets it read."""
    summary, root = tiny_pipeline["summary"], str(tiny_pipeline["store"])
    published = {ref.split("@")[0]: ref for info in summary["stages"].values() for ref in info["outputs"].values()}
    events = _asset_events(root, set(published))
    assert set(events) >= set(published), f"no materialization event for {set(published) - set(events)}"
    from flows.assets import asset_key

    def upstream(name):
        return {r.id for r in events[name].related if r.role == "asset"}

    # the inputs each stage read; Prefect adds what the same upstream task run also produced (the tokenizer)
    assert upstream("sft-model") >= {asset_key(root, "base-model"), asset_key(root, "sft-data")}
    assert upstream("policy") >= {asset_key(root, n) for n in ("sft-model", "reward-model", "prompt-data")}
    assert asset_key(root, "policy") in upstream("eval-report")
    assert not {asset_key(root, n) for n in ("policy", "reward-model", "eval-report")} & upstream("sft-model")
    store = ArtifactStore(root)
    for name, ref in published.items():
        payload = events[name].payload
        assert payload["ref"] == ref and payload["digest"] == store.get(ref).digest, name


def test_second_run_is_fully_cached(tiny_pipeline, pipeline_copy):
    before = _versions(pipeline_copy["store"])
    summary = _run(pipeline_copy)
    assert set(_states(summary).values()) == {"Cached"}
    assert _versions(pipeline_copy["store"]) == before
    first = tiny_pipeline["summary"]["stages"]
    assert {n: i["outputs"] for n, i in summary["stages"].items()} == {n: i["outputs"] for n, i in first.items()}


def test_reward_config_change_reruns_reward_and_ppo_only(pipeline_copy):
    summary = _run(pipeline_copy, overrides=["reward.learning_rate=0.0003"])
    assert _states(summary) == {"pretrain": "Cached", "sft": "Cached", "reward": "Completed", "ppo": "Completed",
                                "eval": "Completed"}
    names = [name for name, _ in _versions(pipeline_copy["store"])]
    assert names.count("reward-model") == 2 and names.count("policy") == 2
    assert names.count("base-model") == 1 and names.count("sft-model") == 1


def test_only_uses_explicit_inputs(pipeline_copy):
    summary = _run(pipeline_copy, only="reward", inputs={"sft_model": "sft-model@v1"})
    assert list(summary["stages"]) == ["reward"]
    assert summary["stages"]["reward"]["inputs"]["sft_model"] == "sft-model@v1"
    assert summary["stages"]["reward"]["state"] == "Cached"  # same inputs and config as the first run


def test_only_rejects_missing_and_wrong_kind_refs(pipeline_copy):
    with pytest.raises(ArtifactError, match="sft-model@v9"):
        _run(pipeline_copy, only="reward", inputs={"sft_model": "sft-model@v9"})
    with pytest.raises(ArtifactError, match="reward-model"):
        _run(pipeline_copy, only="reward", inputs={"sft_model": "reward-model@v1"})


def test_from_ppo_forces_only_ppo_and_a_retryable_failure_succeeds_on_retry(pipeline_copy, monkeypatch):
    """One forced ppo run shows both: `--from ppo` reruns ppo and what is downstream of it, and a lost node is retried.

    (Two tests once, each paying for a ppo run.)"""
    real_run, calls = pipeline.STAGES["rl"].run, []

    def flaky_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("worker died: the node running a ppo actor was lost")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pipeline.STAGES["rl"], "run", flaky_run)
    summary = _run(pipeline_copy, from_stage="ppo")
    assert len(calls) == 2
    assert _states(summary) == {"pretrain": "Cached", "sft": "Cached", "reward": "Cached", "ppo": "Completed",
                                "eval": "Completed"}


def test_user_error_is_not_retried(pipeline_copy, monkeypatch):
    calls = []

    def bad_input_run(*args, **kwargs):
        calls.append(1)
        raise StageInputError("prompts@v1: prompt 3 is longer than the context")

    monkeypatch.setattr(pipeline.STAGES["rl"], "run", bad_input_run)
    with pytest.raises(StageInputError, match="longer than the context"):
        _run(pipeline_copy, from_stage="ppo")
    assert len(calls) == 1


def test_missed_gate_stops_the_flow_before_the_next_stage(pipeline_copy):
    """ppo is forced, but the reward model misses its (raised) gate: the flow stops before ppo publishes anything."""
    from stages.common.gates import GateFailed

    before = _versions(pipeline_copy["store"])
    with pytest.raises(GateFailed, match=r"^reward: quality gate missed: eval_accuracy = [0-9.]+, expected at least "
                                         r"0.99 \(reward.gate.min_eval_accuracy\); reward-model@v\d+ is published"):
        _run(pipeline_copy, from_stage="ppo", overrides=["reward.gate.min_eval_accuracy=0.99"])
    assert _versions(pipeline_copy["store"]) == before  # the gate is not in the key: reward reused, no new policy


def test_user_error_inside_the_flow_is_one_failed_state_not_a_traceback(pipeline_copy, capfd):
    from prefect import get_client

    with pytest.raises(ArtifactError):
        _run(pipeline_copy, only="reward", inputs={"sft_model": "sft-model@v9"})
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err

    async def last_stage_task_state():
        async with get_client() as client:
            runs = await client.read_task_runs(limit=50)
        stage_runs = [r for r in runs if r.name == "reward"]
        return max(stage_runs, key=lambda r: r.created).state

    import asyncio

    state = asyncio.run(last_stage_task_state())
    assert state.type.value == "FAILED" and "sft-model@v9" in state.message
