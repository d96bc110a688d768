"""This config's nodes: the DAG of flows/dag.py shaped by the config (pretrain or an imported base model, the reward
node only when something needs it, config-named models and reward functions as inputs)."""

from __future__ import annotations

from flows import dag
from flows.config import PipelineConfig
from flows.dag import Node
from stages.common.config import ConfigError
from stages.reward_functions.artifact import ROLE_PREFIX as REWARD_FN_ROLE_PREFIX

# Models a config names by ref or local directory, and the stage input role each becomes.
CONFIG_MODELS = {("pretrain", "init_from"): ("init_model", "causal-lm"), ("pretrain", "tokenizer"): ("tokenizer", "tokenizer")}


def pipeline_nodes(cfg: PipelineConfig) -> list[Node]:
    """This config's DAG: pretrain unless sft.base_model is set, sft, reward unless no node needs it, the align
    branches with their reward functions, eval."""
    nodes = dag.build(list(cfg.align.methods), pretrain=not cfg.sft.base_model, evaluate=cfg.align.eval)
    nodes = [_with_config_models(cfg, n) if n.name == "pretrain" else n for n in nodes]
    nodes = [_with_reward_sources(cfg, n) for n in nodes]
    return [n for n in nodes if n.name != "reward" or reward_model_needed(cfg)]


def plan_nodes(cfg: PipelineConfig, stages: list[str]) -> dict[str, Node]:
    """The nodes of the stages that run, by name, built once (an `--only` node outside the pipeline included)."""
    built = {n.name: n for n in pipeline_nodes(cfg)}
    return {name: built[name] if name in built else node_named(cfg, name) for name in stages}


def node_named(cfg: PipelineConfig, name: str) -> Node:
    """One node of this config, also one the pipeline leaves out (`--only grpo` while align.methods lacks it)."""
    for node in pipeline_nodes(cfg):
        if node.name == name:
            return node
    if name == "eval":
        return _with_reward_sources(cfg, dag.eval_node(list(cfg.align.methods)))
    if name in dag.ALIGN_METHODS:  # --only grpo while align.methods does not list it: still a valid node
        return _with_reward_sources(cfg, dag.build([name], pretrain=False, evaluate=False)[-1])
    if name == "reward":
        return dag.REWARD
    if name == "pretrain":
        return dag.PRETRAIN
    raise ConfigError(f"unknown stage {name!r}; expected one of {', '.join(dag.ALL_NODE_NAMES)}")


def reward_model_needed(cfg: PipelineConfig) -> bool:
    """The reward stage runs when an RL branch trains on the reward model, or when nothing else could score the
    eval (no RL branch has reward functions: a DPO-only run keeps its reward-model scores)."""
    rl = [cfg.stage_config(m) for m in cfg.align.methods if m in dag.RL_METHODS]
    if any(c.reward.uses_model for c in rl):
        return True
    return not any(c.reward.functions for c in rl)


def why_no_reward_model(cfg: PipelineConfig) -> str:
    """The summary's line for a skipped reward stage."""
    off = [f"{m}.reward.model = null" for m in cfg.align.methods if m in dag.RL_METHODS]
    return "no branch uses the reward model (" + ", ".join(off) + ")"


def node_functions(cfg: PipelineConfig, node: Node) -> list:
    """The reward functions a node takes as `reward-fn` inputs (an RL branch's own, the run's for eval)."""
    if node.stage == "rl":
        return list(cfg.stage_config(node.name).reward.functions)
    if node.stage == "eval":
        return list(cfg.eval.reward_functions)  # the run's RL functions unless set (flows/config.py)
    return []


def _with_reward_sources(cfg: PipelineConfig, node: Node) -> Node:
    """An RL node without its reward_model input when its section turns the model off; RL and eval nodes with one
    `reward-fn` input per reward function (`reward_fn_<label>`); eval without a reward model when none is trained."""
    if node.stage not in ("rl", "eval"):
        return node
    inputs = dict(node.inputs)
    uses_model = cfg.stage_config(node.name).reward.uses_model if node.stage == "rl" else reward_model_needed(cfg)
    if not uses_model:
        inputs.pop("reward_model", None)
    for spec in node_functions(cfg, node):
        inputs[REWARD_FN_ROLE_PREFIX + spec.label] = ("reward-fn", spec.label)
    return Node(node.name, node.stage, inputs, node.outputs)


def _with_config_models(cfg: PipelineConfig, node: Node) -> Node:
    """The pretrain node with `init_from` / `tokenizer` as inputs when the config names them."""
    inputs = dict(node.inputs)
    for (section, key), (role, _) in CONFIG_MODELS.items():
        value = getattr(cfg.stage_config(section), key)
        if section == node.name and value:
            inputs[role] = ("config", value)
    return Node(node.name, node.stage, inputs, node.outputs)


def config_model_kind(node: Node, role: str) -> str:
    """The kind a config-named model is imported as (a ref may be of any kind the stage accepts)."""
    return next(kind for (section, _), (r, kind) in CONFIG_MODELS.items() if section == node.name and r == role)


def config_model_key(node: Node, role: str) -> str:
    """The config key that names a config model input, for messages: `pretrain.init_from`."""
    key = next(k for (section, k), (r, _) in CONFIG_MODELS.items() if section == node.name and r == role)
    return f"{node.name}.{key}"


def downstream(nodes: list[Node], start: str) -> list[str]:
    """`start` and every node that depends on it, directly or through others (what `--from start` forces)."""
    forced, produced = [start], set(next(n for n in nodes if n.name == start).outputs)
    for node in nodes:
        if node.name in forced:
            continue
        if any(kind == "output" and name in produced for kind, name in node.inputs.values()):
            forced.append(node.name)
            produced |= set(node.outputs)
    return forced
