"""What a run will do, decided once and without Prefect: `plan_run` checks everything cheap and returns a `RunPlan`
(the resolved config, the nodes, the stages to run and the forced ones, the opened store, the explicit inputs).

`rlhf run` plans once and hands the plan on: first to `answer_from_cache` (flows/cached.py: when every stage's
verified artifacts already exist for its cache key there is nothing to run, and the command answers from the store
without starting Prefect or Ray; a temporary Prefect server alone costs several seconds), then, if something must
run, to the flow (flows/pipeline.py), which does not check again. `rlhf run --dry-run` prints the plan (cached.py
too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import dag
from flows.config import STAGES, PipelineConfig
from flows.dag import Node
from flows.inputs import data_columns, get_input, import_reward_function, input_kind, resolve_inputs
from flows.keys import NOT_IN_CACHE_KEY, stage_cache_key
from flows.nodes import downstream, node_named, pipeline_nodes, plan_nodes, reward_model_needed, why_no_reward_model
from flows.preflight import Resources, check_fits
from stages.common.config import ConfigError

__all__ = [
    "NOT_IN_CACHE_KEY", "RunPlan", "check_only_inputs", "downstream",
    "import_reward_function", "node_named", "open_store", "pipeline_nodes", "plan_run", "plan_stages", "preflight",
    "resolve_inputs", "stage_cache_key", "store_root",
]  # fmt: skip

# `rlhf run`'s parameters (the flow's too) and their defaults
RUN_PARAMS = {"preset": "demo", "config_file": None, "overrides": [], "store": None, "from_stage": None, "only": None,
              "inputs": {}, "force": False}  # fmt: skip


def run_params(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with every run parameter, None lists and dicts as empty ones (so equal runs compare equal)."""
    unknown = set(params) - set(RUN_PARAMS)
    if unknown:
        raise TypeError(f"unknown run parameters: {', '.join(sorted(unknown))}")
    out = {k: params.get(k, v) for k, v in RUN_PARAMS.items()}
    out["overrides"], out["inputs"], out["force"] = list(out["overrides"] or []), dict(out["inputs"] or {}), bool(out["force"])
    return out


@dataclass(frozen=True)
class RunPlan:
    """One `rlhf run`, planned and checked: built once by `plan_run`, read by the cache answer, the dry run and the
    flow. `ingested` is the one mutable part: data sets the cache answer already ingested, by (node, role), so the
    flow does not read their files again."""

    params: dict[str, Any]  # run_params(...) as given: the flow's parameters
    cfg: PipelineConfig
    nodes: dict[str, Node]  # the nodes of `stages`, by name
    stages: tuple[str, ...]  # in an order where every node comes after what feeds it
    forced: frozenset[str]  # nodes that ignore the cache (--force: all; --from X: X and downstream)
    store_root: str
    store_where: str  # "--store", "RLHF_STORE" or "run.store"
    store: Any  # the opened ArtifactStore
    inputs: dict[str, Any]  # explicit --input artifacts (with --only), by role (refs: see plan_run)
    skipped: dict[str, str]  # nodes left out of the pipeline, and why
    ingested: dict[tuple[str, str], Any] = field(default_factory=dict, compare=False)

    @property
    def only(self) -> str | None:
        return self.params["only"]

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def forced_by(self, name: str) -> str | None:
        """How node `name` is forced, for messages: "--force", "--from sft", or None."""
        if name not in self.forced:
            return None
        return "--force" if self.params["force"] else f"--from {self.params['from_stage']}"


def plan_run(params: dict[str, Any], *, resolve_inputs: bool = True) -> RunPlan:
    """Every cheap check of `rlhf run`'s parameters (config, stage names, inputs, stage configs, store, data files,
    reward functions, Ray address, resources), in that order, then the plan. A user's mistake raises its one line.

    `resolve_inputs=False` keeps the explicit inputs as refs (the flow called directly: a bad ref then fails the
    stage's task, as a task run of its own)."""
    from flows.config import load_config
    from flows.ray_driver import probe_ray_address

    params = run_params(params)
    cfg = load_config(params["preset"], params["config_file"], params["overrides"])
    stages, forced = plan_stages(params["from_stage"], params["only"], cfg)
    nodes = plan_nodes(cfg, stages)
    if params["only"]:
        check_only_inputs(params["only"], params["inputs"], cfg, nodes[params["only"]])
    for name in stages:  # shape mistakes a stage would find only after Ray started and data was published
        check_config = getattr(STAGES[nodes[name].stage], "check_config", None)
        if check_config is not None:
            check_config(cfg.stage_config(name))
    root, where = store_root(params, cfg)
    check_store_uri(root, where)
    check_data_sources(cfg, nodes, params["inputs"])
    check_reward_functions(cfg, stages)
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_ray_address(address)
    preflight(cfg, stages)
    store = open_store(root, where)
    inputs = dict(params["inputs"])
    if resolve_inputs:
        inputs = {role: get_input(store, role, ref, input_kind(nodes[params["only"]], role))
                  for role, ref in inputs.items()}  # fmt: skip
    check_lora(cfg, nodes, stages, inputs if resolve_inputs else {}, store)
    skipped = {}
    if not params["only"]:
        if not reward_model_needed(cfg):
            skipped["reward"] = why_no_reward_model(cfg)
        if cfg.sft.base_model:
            skipped["pretrain"] = f"sft.base_model = {cfg.sft.base_model}"
    return RunPlan(params, cfg, nodes, tuple(stages), frozenset(set(stages) if params["force"] else forced), store.root,
                   where, store, inputs, skipped)  # fmt: skip


def check_lora(cfg: PipelineConfig, nodes: dict, stages: list[str], inputs: dict[str, Any], store) -> None:
    """Wrap a weightless copy of the model each `lora:` section trains (every stage after pretrain trains the same
    architecture: the SFT base's), so targets that match nothing or a model peft cannot wrap fail before anything
    starts. The critic of ppo is a sequence classifier, as the reward model is."""
    from stages.common.lora import check_wraps

    sections = {name: section for name in stages
                if (section := getattr(cfg.stage_config(name), "lora", None)) is not None}  # fmt: skip
    if not sections:
        return
    model_config = _base_model_config(cfg, inputs, store)
    for name, section in sections.items():
        stage = nodes[name].stage
        heads = {"reward": ["reward-model"], "rl": ["causal-lm"] + (["reward-model"] if name == "ppo" else [])}
        for head in heads.get(stage, ["causal-lm"]):
            check_wraps(section, model_config, head=head, where=f"{name}.lora")


def _base_model_config(cfg: PipelineConfig, inputs: dict[str, Any], store) -> dict[str, Any]:
    """The config.json of the model the run's trainable stages start from, read without loading weights: an
    explicit input model, `sft.base_model` (a folder or an artifact), `pretrain.init_from`, or the from-scratch
    architecture pretrain would build."""
    import json

    from stages.pretrain.model import scratch_spec

    given = next((art for role, art in inputs.items() if role in ("sft_model", "base_model", "policy")
                  and getattr(art, "path", None)), None)  # fmt: skip
    source = given.path if given is not None else cfg.sft.base_model or cfg.pretrain.init_from
    if source is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            folder = Path(store.get(source).path)
        return json.loads((folder / "config.json").read_text())
    spec = scratch_spec(cfg.pretrain, _Sized(cfg.pretrain.vocab_size))
    return {"model_type": spec["architecture"], **spec["config"]}


class _Sized:
    """A stand-in tokenizer for `scratch_spec`: only its length and special ids shape the config."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n


def plan_stages(from_stage: str | None, only: str | None, cfg: PipelineConfig | None = None) -> tuple[list[str], set[str]]:
    """Which nodes run, and which of them are forced (ignore the cache).

    With `sft.base_model` set the pipeline starts at SFT from that model: the pretrain node is left out.
    """
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in dag.ALL_NODE_NAMES:
            raise ConfigError(f"{flag} {value!r}: unknown stage; expected one of {', '.join(dag.ALL_NODE_NAMES)}")
    if from_stage and only:
        raise ConfigError("--from and --only cannot be combined")
    if only:
        return [only], set()
    nodes = pipeline_nodes(cfg if cfg is not None else PipelineConfig())
    order = [n.name for n in nodes]
    if from_stage:
        if from_stage not in order:
            why = "sft.base_model is set" if from_stage == "pretrain" else "align does not include it"
            raise ConfigError(f"--from {from_stage}: {why}, so {from_stage} does not run in this pipeline")
        return order, set(downstream(nodes, from_stage))
    return order, set()


def check_only_inputs(only: str, inputs: dict[str, str], cfg: PipelineConfig | None = None,
                      node: Node | None = None) -> None:  # fmt: skip
    """`--only STAGE` needs an explicit artifact for every input that is not a data set."""
    node = node or node_named(cfg if cfg is not None else PipelineConfig(), only)
    roles = node.inputs
    for role in inputs:
        if role not in roles:
            raise ConfigError(f"--input {role}=...: {only} has no input {role!r}; its inputs are {', '.join(roles)}")
    missing = [r for r, (kind, _) in roles.items() if r not in inputs and kind not in ("data", "config", "reward-fn")]
    if missing:
        example = " ".join(f"--input {r}={roles[r][1]}@latest" for r in missing)
        raise ConfigError(f"--only {only} needs an artifact for {', '.join(missing)}, e.g. {example}")


def check_store_uri(root: str, where: str = "--store") -> None:
    """An ArtifactError line naming `root` when fsspec cannot open it (a protocol nobody registered, such as foo://,
    or one whose package is not installed) instead of fsspec's traceback; creates nothing."""
    import fsspec

    from stages.common.store import ArtifactError

    try:
        fsspec.core.url_to_fs(str(root))
    except (ValueError, ImportError) as e:
        raise ArtifactError(
            f"{where} {root!r}: cannot open the artifact store ({e}); expected a folder or an fsspec URI such as "
            "s3://bucket/rlhf or memory://rlhf"
        ) from None


def open_store(root: str, where: str = "--store"):
    """The artifact store at `root`, after `check_store_uri`."""
    from stages.common.store import ArtifactStore

    check_store_uri(root, where)
    return ArtifactStore(root)


def store_root(params: dict[str, Any], cfg: PipelineConfig | None = None, default: str = "./artifacts") -> tuple[str, str]:
    """The store a command uses and where it was named: --store, then $RLHF_STORE, then run.store (`rlhf run`) or
    `default` (the commands without a config)."""
    if params.get("store"):
        return params["store"], "--store"
    if os.environ.get("RLHF_STORE"):
        return os.environ["RLHF_STORE"], "RLHF_STORE"
    return (cfg.run.store, "run.store") if cfg is not None else (default, "default")


def preflight(cfg: PipelineConfig, stages: list[str]) -> None:
    """Fail in seconds when the run cannot fit: on this machine when the flow starts a local Ray itself."""
    if not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        check_fits(cfg, Resources.of_this_machine(), stages)


def check_data_sources(cfg: PipelineConfig, nodes: dict[str, Node], explicit: dict[str, str]) -> None:
    """Read and validate every local data file the run will ingest, publishing nothing: a bad file of a late
    stage fails before the stages ahead of it run (and publish). Roles given as --input artifacts are skipped.
    Each file is read once here, whichever nodes share it."""
    from stages.data.ingest import check_source

    formats = {what for node in nodes.values() for role, (source, what) in node.inputs.items()
               if source == "data" and role not in explicit}  # fmt: skip
    for fmt in sorted(formats):
        check_source(getattr(cfg.data, fmt), fmt, columns=data_columns(cfg, fmt), test_fraction=cfg.data.test_fraction,
                     seed=cfg.run.seed)  # fmt: skip


def check_reward_functions(cfg: PipelineConfig, stages: list[str]) -> None:
    """Every reward function of the stages that run: file, syntax, name and signature, read without running it;
    against the prompt data's columns when they are known here (the built-in tasks, a local file). The prompt file's
    columns are read only when a function is there to check against them."""
    from stages.reward_functions.source_check import check_function

    specs = [(spec, f"{name}.reward.functions[{i}]") for name in stages if name in dag.RL_METHODS
             for i, spec in enumerate(cfg.stage_config(name).reward.functions)]  # fmt: skip
    columns = prompt_columns(cfg) if specs else None
    for spec, key in specs:
        check_function(spec, key, columns)


def prompt_columns(cfg: PipelineConfig) -> list[str] | None:
    """The prompt data's columns, when known without a download: a built-in task's, or a local file's."""
    from stages.data.read import DataError, read_splits

    source = cfg.data.prompts
    if source == "demo":
        return ["prompt", "answer"] if getattr(cfg.data, "task", "demo") == "arithmetic" else ["prompt"]
    if source.startswith("hf:") or not Path(source).expanduser().exists():
        return None
    try:
        found = list(read_splits(source)["train"].column_names)
    except DataError:
        return None  # check_data_sources reports it
    columns = data_columns(cfg, "prompts") or {}
    renamed = {have: want for want, have in columns.items()}
    return [renamed.get(c, c) for c in found]
