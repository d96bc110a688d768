"""Reward functions in the DAG: which nodes take them, when the reward node is left out, and what their code does
to the cache keys (a real store; the upstream artifacts are small real artifacts, only their digests matter)."""

from __future__ import annotations

import pytest

from flows.config import load_config
from flows.plan import import_reward_function, node_named, pipeline_nodes, stage_cache_key
from stages.common.store import ArtifactStore

SOURCE = "def reward_len(completions, **kwargs):\n    return [-abs(20 - len(c)) for c in completions]\n"


def config(*overrides: str):
    return load_config("tiny", overrides=list(overrides))


def test_the_reward_node_is_left_out_when_no_branch_trains_on_the_reward_model():
    functions = "grpo.reward.functions=[{name: demo_gold}]"
    cfg = config("align.methods=[grpo]", "grpo.reward.model=null", functions)
    nodes = {n.name: n for n in pipeline_nodes(cfg)}
    assert list(nodes) == ["pretrain", "sft", "grpo", "eval"]
    assert nodes["grpo"].inputs == {"sft_model": ("output", "sft-model"), "prompts": ("data", "prompts"),
                                    "reward_fn_demo_gold": ("reward-fn", "demo_gold")}  # fmt: skip
    assert "reward_model" not in nodes["eval"].inputs and nodes["eval"].inputs["reward_fn_demo_gold"][0] == "reward-fn"
    # a sibling that trains on the reward model brings the reward node back, and eval scores with its model
    cfg = config("align.methods=[ppo,grpo]", "grpo.reward.model=null", functions)
    nodes = {n.name: n for n in pipeline_nodes(cfg)}
    assert "reward" in nodes and "reward_model" in nodes["ppo"].inputs and "reward_model" not in nodes["grpo"].inputs
    assert "reward_model" in nodes["eval"].inputs and "reward_fn_demo_gold" in nodes["eval"].inputs
    # a run without reward functions keeps the reward model for eval (a DPO-only run, as before)
    assert "reward" in [n.name for n in pipeline_nodes(config("align.methods=[dpo]"))]


def test_eval_scores_with_every_function_of_the_run_once():
    cfg = config("align.methods=[ppo,grpo]", "ppo.reward.functions=[{name: demo_gold, weight: 0}]",
                 "grpo.reward.functions=[{name: demo_gold}, {name: format_regex, args: {pattern: '.+'}}]")
    assert [f.name for f in cfg.eval.reward_functions] == ["demo_gold", "format_regex"]
    assert cfg.eval.reward_functions[0].weight == 0  # the first branch's entry, as listed


@pytest.fixture
def keys(tmp_path):
    """cache keys of grpo, eval and sft for a function file's current content, in one real store."""
    store = ArtifactStore(str(tmp_path / "artifacts"))
    upstream = {}
    for name in ("sft-model", "prompt-data", "base-model", "sft-data"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "content.txt").write_text(name)
        upstream[name] = store.publish(folder, name=name, kind="dataset", stage="tests")

    def compute(path, weight: float = 1.0) -> dict:
        entry = f"grpo.reward.functions=[{{name: reward_len, path: {path}, weight: {weight}}}]"
        cfg = config("align.methods=[grpo]", "grpo.reward.model=null", entry)
        out = {}
        for name in ("grpo", "eval"):
            node = node_named(cfg, name)
            fn = import_reward_function(cfg, store, node, "reward_len")
            arts = {"sft_model": upstream["sft-model"], "prompts": upstream["prompt-data"], "reward_fn_reward_len": fn}
            if name == "eval":
                arts["policy_grpo"] = upstream["base-model"]
            out[name] = stage_cache_key(name, cfg, arts)
            out["artifact"] = fn
        out["sft"] = stage_cache_key("sft", cfg, {"base_model": upstream["base-model"], "data": upstream["sft-data"]})
        return out

    return compute


def test_editing_the_file_changes_the_keys_of_its_branch_and_eval_only(keys, tmp_path):
    path = tmp_path / "mine" / "rewards.py"
    path.parent.mkdir()
    path.write_text(SOURCE)
    first = keys(path)
    assert first["artifact"].kind == "reward-fn" and first["artifact"].name == "reward-fn-reward_len"
    path.write_text(SOURCE.replace("20", "12"))
    edited = keys(path)
    assert edited["artifact"].version == 2 and edited["artifact"].digest != first["artifact"].digest
    assert edited["grpo"] != first["grpo"] and edited["eval"] != first["eval"]
    assert edited["sft"] == first["sft"]


def test_the_same_bytes_elsewhere_are_the_same_artifact_and_key(keys, tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "copy" / "b.py"
    b.parent.mkdir()
    a.write_text(SOURCE)
    b.write_text(SOURCE)
    here, there = keys(a), keys(b)
    assert there["artifact"].ref == here["artifact"].ref
    assert (there["grpo"], there["eval"]) == (here["grpo"], here["eval"])
    assert keys(a, weight=0.5)["grpo"] != here["grpo"]  # the weight is the branch's config: in its key
