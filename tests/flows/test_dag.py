"""The DAG's shape: which nodes a config runs, what --from forces, how sibling branches are grouped into waves."""

from __future__ import annotations

import pytest

from flows import dag, schedule
from flows.config import load_config
from flows.plan import check_only_inputs, downstream, pipeline_nodes, plan_stages
from stages.common.config import ConfigError


def _names(nodes):
    return [n.name for n in nodes]


def test_default_pipeline_is_the_classic_chain():
    cfg = load_config("tiny", overrides=["align.eval=false"])
    assert _names(pipeline_nodes(cfg)) == ["pretrain", "sft", "reward", "ppo"]


def test_branches_and_eval_follow_sft_and_reward():
    cfg = load_config("tiny", overrides=["align.methods=[ppo,grpo,rloo,dpo]", "align.eval=true"])
    nodes = pipeline_nodes(cfg)
    assert _names(nodes) == ["pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo", "eval"]
    by_name = {n.name: n for n in nodes}
    assert by_name["grpo"].stage == "rl" and by_name["grpo"].outputs == ("policy-grpo",)
    assert by_name["dpo"].inputs == {"sft_model": ("output", "sft-model"), "preferences": ("data", "preferences")}
    assert {r: s for r, s in by_name["eval"].inputs.items() if r.startswith("policy_")} == {
        "policy_ppo": ("output", "policy"), "policy_grpo": ("output", "policy-grpo"),
        "policy_rloo": ("output", "policy-rloo"), "policy_dpo": ("output", "policy-dpo"),
    }  # fmt: skip


def test_from_forces_a_branch_and_what_depends_on_it_not_its_siblings():
    cfg = load_config("tiny", overrides=["align.methods=[ppo,grpo,dpo]", "align.eval=true"])
    nodes = pipeline_nodes(cfg)
    assert downstream(nodes, "grpo") == ["grpo", "eval"]
    assert set(downstream(nodes, "reward")) == {"reward", "ppo", "grpo", "eval"}  # dpo needs no reward model
    assert plan_stages("sft", None, cfg)[1] == {"sft", "reward", "ppo", "grpo", "dpo", "eval"}
    with pytest.raises(ConfigError, match="--from rloo: align does not include it"):
        plan_stages("rloo", None, cfg)


def test_only_a_branch_needs_its_model_inputs():
    cfg = load_config("tiny", overrides=["align.methods=[ppo,dpo]"])
    with pytest.raises(ConfigError, match=r"--only dpo needs an artifact for sft_model, e.g. --input sft_model=sft-model@latest"):
        check_only_inputs("dpo", {}, cfg)
    check_only_inputs("dpo", {"sft_model": "sft-model@v1"}, cfg)


def test_methods_are_unique_and_known():
    with pytest.raises(ConfigError, match="each method at most once"):
        load_config("tiny", overrides=["align.methods=[ppo,ppo]"])
    with pytest.raises(ConfigError, match="align.methods.0"):
        load_config("tiny", overrides=["align.methods=[a2c]"])


def test_branch_waves_pack_what_fits_together():
    demand = {"ppo": (2.0, 1.0), "grpo": (1.5, 0.75), "rloo": (1.5, 0.75), "dpo": (1.0, 0.0)}
    # 4 CPUs, 2 GPUs: ppo + grpo fill 3.5 CPUs / 1.75 GPUs; rloo would exceed both; rloo + dpo fit together
    assert schedule.branch_waves(["ppo", "grpo", "rloo", "dpo"], demand, cpus=4, gpus=2) == [["ppo", "grpo"], ["rloo", "dpo"]]
    # 2 CPUs: one at a time, except dpo (1 CPU) cannot join rloo (1.5)
    assert schedule.branch_waves(["ppo", "rloo", "dpo"], demand, cpus=2, gpus=2) == [["ppo"], ["rloo"], ["dpo"]]
    # a branch that does not fit alone still gets its own wave (pre-flight refuses what can never fit)
    assert schedule.branch_waves(["ppo", "dpo"], {"ppo": (9.0, 0.0), "dpo": (1.0, 0.0)}, cpus=8, gpus=0) == [["ppo"], ["dpo"]]


def test_a_branch_demands_the_cpus_its_actors_reserve():
    cfg = load_config("tiny", overrides=["align.methods=[ppo,grpo]", "grpo.reward.model=null",
                                         "grpo.reward.functions=[{name: exact_match}]", "data.task=arithmetic"])  # fmt: skip
    assert schedule.branch_demand(cfg, "ppo", 0) == (2.0, 0.0)  # 4 roles x 0.5
    assert schedule.branch_demand(cfg, "grpo", 0) == (1.25, 0.0)  # policy + reference x 0.5, 1 function x 0.25
    lora = load_config("tiny", overrides=["align.methods=[ppo]", "ppo.lora={r: 4}"])
    assert schedule.branch_demand(lora, "ppo", 0) == (2.0, 0.0)  # no reference: the policy holds its 0.5 as well


def test_cli_knows_every_node():
    from flows.cli import STAGE_NAMES

    assert tuple(STAGE_NAMES) == dag.ALL_NODE_NAMES


def test_init_from_and_tokenizer_become_inputs_not_key_strings(tmp_path):
    """A model named by pretrain.init_from enters as an artifact: its digest is in the key, its path string is not."""
    from flows.plan import resolve_inputs, stage_cache_key
    from stages.common.store import ArtifactStore
    from stages.data.demo import DemoConfig, generate
    from tests.tiny_models import save_tiny_model_dir

    texts = [row["text"] for row in generate(DemoConfig(size="tiny"))["corpus"]["train"][:200]]
    model_dir = save_tiny_model_dir("llama", texts, tmp_path / "start", vocab_size=300)
    cfg = load_config("tiny", overrides=[f"pretrain.init_from={model_dir}", f"pretrain.tokenizer={model_dir}"])
    (pretrain,) = [n for n in pipeline_nodes(cfg) if n.name == "pretrain"]
    assert pretrain.inputs["init_model"] == ("config", str(model_dir))
    store = ArtifactStore(str(tmp_path / "store"))
    arts = resolve_inputs(cfg, store, pretrain, {}, {})
    assert arts["init_model"].kind == "causal-lm" and arts["tokenizer"].kind == "tokenizer"
    key = stage_cache_key("pretrain", cfg, arts)
    moved = tmp_path / "elsewhere"
    model_dir.rename(moved)  # the same files at another path: the same key
    cfg2 = load_config("tiny", overrides=[f"pretrain.init_from={moved}", f"pretrain.tokenizer={moved}"])
    (node2,) = [n for n in pipeline_nodes(cfg2) if n.name == "pretrain"]
    assert stage_cache_key("pretrain", cfg2, resolve_inputs(cfg2, store, node2, {}, {})) == key
    save_tiny_model_dir("llama", texts, moved, vocab_size=300, seed=3)  # new weights at that path: a new key
    assert stage_cache_key("pretrain", cfg2, resolve_inputs(cfg2, store, node2, {}, {})) != key
