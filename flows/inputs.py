"""A node's input artifacts, resolved one way for every caller: explicit `--input` artifacts, data sets ingested
from the config's sources, config-named models, reward-function files, or what upstream nodes produced.

Where each kind of input comes from is an `InputSources` method: the plain one calls the stages' functions in this
process (the all-cached answer); the flow's (flows/pipeline.py) runs the data and model ones as Prefect tasks; the
dry run's (flows/cached.py) publishes nothing to the run's store.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flows import dag
from flows.config import STAGES, PipelineConfig
from flows.dag import Node
from flows.nodes import config_model_key, config_model_kind, node_functions
from stages.reward_functions.artifact import ROLE_PREFIX as REWARD_FN_ROLE_PREFIX


class InputSources:
    """Where a node's inputs that are not upstream outputs come from; the plain one works in this process."""

    def __init__(self, cfg: PipelineConfig, store):
        self.cfg, self.store = cfg, store

    def data(self, node: Node, role: str, fmt: str, models: dict[str, Any]):
        """The data set `fmt` as a dataset artifact, checked first by the node's stage against `models`."""
        return ingest_data(self.cfg, self.store, fmt, check=data_check(self.cfg, node, role, models))

    def model(self, node: Node, role: str, value: str):
        """A model the config names (`pretrain.init_from`): an artifact ref, or a local directory imported."""
        return resolve_model(self.store, value, config_model_kind(node, role), config_model_key(node, role))

    def explicit(self, node: Node, role: str, ref: str):
        """An explicit `--input ROLE=REF` not resolved yet."""
        return get_input(self.store, role, ref, input_kind(node, role))

    def reward_fn(self, node: Node, label: str):
        """The `reward-fn` artifact of the node's function `label`."""
        return import_reward_function(self.cfg, self.store, node, label)


def resolve_inputs(cfg: PipelineConfig, store, node: Node, explicit: dict[str, Any], produced: dict[str, Any],
                   sources: InputSources | None = None) -> dict[str, Any]:  # fmt: skip
    """A node's input artifacts, by role: explicit --input artifacts (or refs), then its data sets, config models,
    reward functions and upstream outputs (`produced`: artifact name -> Artifact) from `sources`."""
    sources = sources or InputSources(cfg, store)
    arts: dict[str, Any] = {}
    for role, (source, what) in node.inputs.items():
        if role in explicit:
            ref = explicit[role]
            arts[role] = sources.explicit(node, role, ref) if isinstance(ref, str) else ref
        elif source == "data":
            arts[role] = sources.data(node, role, what, dict(arts))
        elif source == "config":
            arts[role] = sources.model(node, role, what)
        elif source == "reward-fn":
            arts[role] = sources.reward_fn(node, what)
        else:
            arts[role] = produced[what]
    return arts


def import_name(path: str) -> str:
    """An artifact name for a directory imported on the fly: its folder name, reduced to safe characters."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).expanduser().resolve().name).strip("-._")
    return name or "imported-model"


def resolve_model(store, value: str, kind: str, where: str = "config"):
    """A model named in the config (`where`, e.g. sft.base_model): an artifact ref, or a local HF directory imported
    into the store by content.

    A ref's kind is checked by the stage when several are acceptable (a tokenizer may come from a causal-lm)."""
    from stages.common.store import ArtifactError

    if Path(value).expanduser().is_dir():
        from stages.common.artifact_import import import_model

        return import_model(store, str(Path(value).expanduser()), kind=kind, name=import_name(value))
    if "/" in value or value.startswith("~"):  # artifact names never hold a slash: this was meant as a folder
        raise ArtifactError(f"{where} {value!r}: no such directory (expected a HF model folder or an artifact ref)")
    try:
        return store.get(value, kind=kind if kind == "causal-lm" else None)
    except ArtifactError as e:  # the same class (a corrupted artifact stays exit 1), the config key in front
        raise type(e)(f"{where}: {e}") from None


def get_input(store, role: str, ref: str, kind: str | None):
    """The artifact of an explicit `--input ROLE=REF`; its errors name the flag in front."""
    from stages.common.store import ArtifactError

    try:
        return store.get(ref, kind=kind)
    except ArtifactError as e:  # the same class (a corrupted artifact stays exit 1)
        raise type(e)(f"--input {role}={ref}: {e}") from None


def input_kind(node: Node, role: str) -> str | None:
    """The artifact kind a node's input role must have; None where the stage accepts several and checks itself."""
    module = STAGES[node.stage]
    if role.startswith(REWARD_FN_ROLE_PREFIX):
        return "reward-fn"
    if role in module.INPUTS:
        return module.INPUTS[role]
    optional = getattr(module, "OPTIONAL_INPUTS", {}).get(role)
    if optional is not None:
        return optional[0] if len(optional) == 1 else None
    return "causal-lm"  # the eval node's policy_* roles


def ingest_data(cfg: PipelineConfig, store, fmt: str, check=None):
    """One data source as a dataset artifact (identical data gives the existing version); `check` (from
    `data_check`) is the consuming stage's input check, run before anything is published."""
    from stages.data.ingest import ingest

    return ingest(getattr(cfg.data, fmt), fmt, store, demo_cfg=cfg.data.demo, task=cfg.data.task,
                  test_fraction=cfg.data.test_fraction, seed=cfg.run.seed, columns=data_columns(cfg, fmt),
                  check=check)  # fmt: skip


def data_check(cfg: PipelineConfig, node: Node, role: str, models: dict[str, Any]):
    """The node's own input check of its data set `role` against its model inputs (`models`: role -> Artifact), as
    a function of the staged rows; None when its stage has none or a model input is not known yet.

    So data the stage would refuse (rows longer than the model's context, a prompt that leaves no room to reply)
    is refused before it is published as a dataset version, and before Prefect or Ray start."""
    check = getattr(STAGES[node.stage], "check_data", None)
    model_roles = [r for r, (source, _) in node.inputs.items() if source not in ("data", "reward-fn")]
    if check is None or any(models.get(r) is None for r in model_roles):
        return None
    config, scaling = cfg.stage_config(node.name), cfg.run.scaling()
    chosen = {r: models[r] for r in model_roles}
    return lambda staged: check(config, scaling=scaling, **chosen, **{role: staged})


def data_columns(cfg: PipelineConfig, fmt: str) -> dict[str, str] | None:
    """The config's column map for data set `fmt` (canonical column -> the file's), if any."""
    columns = getattr(cfg.data, "columns", None)
    return getattr(columns, fmt, None) if columns is not None else None


def import_reward_function(cfg: PipelineConfig, store, node: Node, label: str):
    """The `reward-fn` artifact of the node's function `label` (its file imported by content)."""
    from stages.reward_functions.artifact import import_function

    specs = node_functions(cfg, node)
    i = next(i for i, s in enumerate(specs) if s.label == label)
    return import_function(store, specs[i], function_key(cfg, node, label))


def function_key(cfg: PipelineConfig, node: Node, label: str) -> str:
    """The config key of a function entry, for messages: `grpo.reward.functions[0]`."""
    for m in [node.name] if node.stage == "rl" else list(cfg.align.methods):
        if m in dag.RL_METHODS:
            for i, spec in enumerate(cfg.stage_config(m).reward.functions):
                if spec.label == label:
                    return f"{m}.reward.functions[{i}]"
    return f"reward function {label}"
