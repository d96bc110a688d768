"""What a run will do, decided without Prefect: which stages, their inputs, their cache keys, and the pre-flight check.

The flow (flows/pipeline.py) uses these to run the DAG. `rlhf run` also uses `all_cached` first: when every stage's
verified artifacts already exist for its cache key, there is nothing to run, and the command answers from the store
without starting Prefect or Ray (a temporary Prefect server alone costs several seconds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flows import dag
from flows.config import STAGES, PipelineConfig
from flows.dag import Node
from flows.preflight import Resources, check_fits
from stages.common.config import ConfigError
from stages.common.fingerprint import cache_key, code_fingerprint
from stages.reward_functions.artifact import ROLE_PREFIX as REWARD_FN_ROLE_PREFIX

# Config fields that do not change what a stage computes: gate thresholds (checked after the fact, so changing one
# reuses the artifact) and references to inputs (their artifact digests are in the key instead).
NOT_IN_CACHE_KEY = ("gate", "base_model", "init_from", "tokenizer")


def pipeline_nodes(cfg: PipelineConfig) -> list[Node]:
    """This config's DAG: pretrain unless sft.base_model is set, sft, reward unless no node needs it, the align
    branches with their reward functions, eval."""
    nodes = dag.build(list(cfg.align.methods), pretrain=not cfg.sft.base_model, evaluate=cfg.align.eval)
    nodes = [_with_config_models(cfg, n) if n.name == "pretrain" else n for n in nodes]
    nodes = [_with_reward_sources(cfg, n) for n in nodes]
    return [n for n in nodes if n.name != "reward" or reward_model_needed(cfg)]


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


# Models a config names by ref or local directory, and the stage input role each becomes.
CONFIG_MODELS = {("pretrain", "init_from"): ("init_model", "causal-lm"), ("pretrain", "tokenizer"): ("tokenizer", "tokenizer")}


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


def node_named(cfg: PipelineConfig, name: str) -> Node:
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


def stage_cache_key(name: str, cfg: PipelineConfig, inputs: dict[str, Any]) -> str:
    """A node's cache key: its stage's code, its own config plus the run-level knobs that change results, its inputs."""
    run = cfg.run
    stage = node_named(cfg, name).stage if name in dag.ALL_NODE_NAMES else name
    stage_config = {k: v for k, v in cfg.stage_config(name).to_dict().items() if k not in NOT_IN_CACHE_KEY}
    # a reward function's file is in the key by its artifact's digest (an input), not by where it lies
    if isinstance(stage_config.get("reward"), dict):  # an RL section's reward sources
        stage_config["reward"] = {**stage_config["reward"], "functions": _without_paths(stage_config["reward"]["functions"])}
    if "reward_functions" in stage_config:  # the eval's
        stage_config["reward_functions"] = _without_paths(stage_config["reward_functions"])
    config = {
        "stage": stage_config,
        "run": {"seed": run.seed, "num_workers": run.num_workers, "use_gpu": run.use_gpu},
    }
    return cache_key(name, code_fingerprint(stage), config, {role: a.digest for role, a in inputs.items()})


def _without_paths(functions: list[dict]) -> list[dict]:
    return [{k: v for k, v in f.items() if k != "path"} for f in functions]


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
    if cfg is None:
        from flows.config import PipelineConfig as _Config

        cfg = _Config()
    nodes = pipeline_nodes(cfg)
    order = [n.name for n in nodes]
    if from_stage:
        if from_stage not in order:
            why = "sft.base_model is set" if from_stage == "pretrain" else "align does not include it"
            raise ConfigError(f"--from {from_stage}: {why}, so {from_stage} does not run in this pipeline")
        return order, set(downstream(nodes, from_stage))
    return order, set()


def check_only_inputs(only: str, inputs: dict[str, str], cfg: PipelineConfig | None = None) -> None:
    """`--only STAGE` needs an explicit artifact for every input that is not a data set."""
    if cfg is None:
        from flows.config import PipelineConfig as _Config

        cfg = _Config()
    node = node_named(cfg, only)
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


def store_root(params: dict[str, Any], cfg: PipelineConfig) -> tuple[str, str]:
    """The store `rlhf run` uses and where it was named: --store, then $RLHF_STORE, then run.store."""
    if params.get("store"):
        return params["store"], "--store"
    if os.environ.get("RLHF_STORE"):
        return os.environ["RLHF_STORE"], "RLHF_STORE"
    return cfg.run.store, "run.store"


def preflight(cfg: PipelineConfig, stages: list[str]) -> None:
    """Fail in seconds when the run cannot fit: on this machine when the flow starts a local Ray itself."""
    if not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        check_fits(cfg, Resources.of_this_machine(), stages)


def import_name(path: str) -> str:
    """An artifact name for a directory imported on the fly: its folder name, reduced to safe characters."""
    import re

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
                  test_fraction=cfg.data.test_fraction, seed=cfg.run.seed, columns=_columns(cfg, fmt),
                  check=check)  # fmt: skip


def check_data_sources(cfg: PipelineConfig, stages: list[str], explicit: dict[str, str]) -> None:
    """Read and validate every local data file the run will ingest, publishing nothing: a bad file of a late
    stage fails before the stages ahead of it run (and publish). Roles given as --input artifacts are skipped."""
    from stages.data.ingest import check_source

    formats = {what for name in stages for role, (source, what) in node_named(cfg, name).inputs.items()
               if source == "data" and role not in explicit}  # fmt: skip
    for fmt in sorted(formats):
        check_source(getattr(cfg.data, fmt), fmt, columns=_columns(cfg, fmt), test_fraction=cfg.data.test_fraction,
                     seed=cfg.run.seed)  # fmt: skip


def data_check(cfg: PipelineConfig, node: Node, role: str, models: dict[str, Any]):
    """The node's own input check of its data set `role` against its model inputs (`models`: role -> Artifact), as
    a function of the staged rows; None when its stage has none or a model input is not known yet.

    So data the stage would refuse (rows longer than the model's context, a prompt that leaves no room to reply)
    is refused before it is published as a dataset version, and before Prefect or Ray start."""
    check = getattr(STAGES[node.stage], "check_data", None)
    model_roles = [r for r, (source, _) in node.inputs.items() if source not in ("data", "reward-fn")]
    if check is None or any(r not in models for r in model_roles):
        return None
    config, scaling = cfg.stage_config(node.name), cfg.run.scaling()
    chosen = {r: models[r] for r in model_roles}
    return lambda staged: check(config, scaling=scaling, **chosen, **{role: staged})


def _columns(cfg: PipelineConfig, fmt: str) -> dict[str, str] | None:
    columns = getattr(cfg.data, "columns", None)
    return getattr(columns, fmt, None) if columns is not None else None


def resolve_inputs(cfg: PipelineConfig, store, node: Node, explicit: dict[str, str], produced: dict[str, Any]) -> dict:
    """A node's input artifacts: explicit --input refs, ingested data sets, or what upstream nodes produced."""
    arts = {}
    for role, (source, what) in node.inputs.items():
        kind = input_kind(node, role)
        if role in explicit:
            arts[role] = get_input(store, role, explicit[role], kind)
        elif source == "data":
            arts[role] = ingest_data(cfg, store, what, check=data_check(cfg, node, role, arts))
        elif source == "config":
            key = next(k for (section, k), (r, _) in CONFIG_MODELS.items() if section == node.name and r == role)
            arts[role] = resolve_model(store, what, config_model_kind(node, role), f"{node.name}.{key}")
        elif source == "reward-fn":
            arts[role] = import_reward_function(cfg, store, node, what)
        else:
            arts[role] = produced[what]
    return arts


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


def check_reward_functions(cfg: PipelineConfig, stages: list[str]) -> None:
    """Every reward function of the stages that run: file, syntax, name and signature, read without running it;
    against the prompt data's columns when they are known here (the built-in tasks, a local file)."""
    from stages.reward_functions.source_check import check_function

    columns = prompt_columns(cfg)
    for name in stages:
        if name in dag.RL_METHODS:
            for i, spec in enumerate(cfg.stage_config(name).reward.functions):
                check_function(spec, f"{name}.reward.functions[{i}]", columns)


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
    columns = (getattr(cfg.data.columns, "prompts", None) or {})
    renamed = {have: want for want, have in columns.items()}
    return [renamed.get(c, c) for c in found]


def all_cached(cfg: PipelineConfig, store, stages: list[str], inputs: dict[str, str]) -> dict[str, Any] | None:
    """The run's summary if every stage would be reused (gates checked), else None: then the flow must run.

    Ingesting the data here publishes nothing new when the data is unchanged; when it changed, the new dataset
    version is exactly what the flow would publish first anyway.
    """
    from stages.common.gates import check_gate

    start = time.perf_counter()
    produced: dict[str, Any] = {}
    summary: dict[str, Any] = {"store": store.root, "stages": {}, "skipped": {}, "prefect": "not started"}
    if not reward_model_needed(cfg):
        summary["skipped"]["reward"] = why_no_reward_model(cfg)
    if cfg.sft.base_model and "pretrain" not in stages:
        summary["skipped"]["pretrain"] = f"sft.base_model = {cfg.sft.base_model}"
        produced["base-model"] = resolve_model(store, cfg.sft.base_model, "causal-lm", "sft.base_model")
    produced = {**produced}
    for name in stages:
        node = node_named(cfg, name)
        arts = resolve_inputs(cfg, store, node, inputs, produced)
        hit = store.cached(stage_cache_key(name, cfg, arts))
        if hit is None:
            return None
        check_gate(name, getattr(cfg.stage_config(name), "gate", None), hit)
        produced.update({art.name: art for art in hit.values()})
        summary["stages"][name] = {
            "state": "Cached",
            "outputs": {out: art.ref for out, art in hit.items()},
            "inputs": {role: art.ref for role, art in arts.items()},
            "task_seconds": 0.0,
            "stage_seconds": 0.0,
        }
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    summary["orchestration_overhead_seconds"] = summary["wall_seconds"]
    return summary


def validate_run(params: dict[str, Any]) -> tuple[PipelineConfig, list[str]]:
    """Every cheap check of `rlhf run`'s parameters (config, stage names, inputs, Ray address, resources)."""
    from flows.config import load_config
    from flows.ray_driver import probe_ray_address

    cfg = load_config(params.get("preset", "demo"), params.get("config_file"), params.get("overrides") or [])
    stages, _ = plan_stages(params.get("from_stage"), params.get("only"), cfg)
    if params.get("only"):
        check_only_inputs(params["only"], params.get("inputs") or {}, cfg)
    for name in stages:  # shape mistakes a stage would find only after Ray started and data was published
        check_config = getattr(STAGES[node_named(cfg, name).stage], "check_config", None)
        if check_config is not None:
            check_config(cfg.stage_config(name))
    check_store_uri(*store_root(params, cfg))
    check_data_sources(cfg, stages, params.get("inputs") or {})
    check_reward_functions(cfg, stages)
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_ray_address(address)
    preflight(cfg, stages)
    return cfg, stages


def answer_from_cache(params: dict[str, Any]) -> dict[str, Any] | None:
    """Validate `rlhf run`'s parameters; if nothing would run, the summary from the store (no Prefect, no Ray)."""
    cfg, stages = validate_run(params)
    if params.get("force") or params.get("from_stage"):
        return None
    store = open_store(*store_root(params, cfg))
    return all_cached(cfg, store, stages, dict(params.get("inputs") or {}))
