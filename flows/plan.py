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

from flows.config import STAGE_ORDER, STAGES, PipelineConfig
from flows.preflight import Resources, check_fits
from stages.common.config import ConfigError
from stages.common.fingerprint import cache_key, code_fingerprint

# Which data set feeds which stage role, and which upstream output feeds which role.
DATA_ROLES = {("pretrain", "corpus"): "corpus", ("sft", "data"): "sft", ("reward", "preferences"): "preferences",
              ("ppo", "prompts"): "prompts"}  # fmt: skip
UPSTREAM_ROLES = {("sft", "base_model"): "base-model", ("reward", "sft_model"): "sft-model",
                  ("ppo", "sft_model"): "sft-model", ("ppo", "reward_model"): "reward-model"}  # fmt: skip
# Config fields that do not change what a stage computes: gate thresholds (checked after the fact, so changing one
# reuses the artifact) and references to inputs (their artifact digests are in the key instead).
NOT_IN_CACHE_KEY = ("gate", "base_model")


def stage_cache_key(name: str, cfg: PipelineConfig, inputs: dict[str, Any]) -> str:
    """The stage's cache key: its code, its own config plus the run-level knobs that change results, its inputs."""
    run = cfg.run
    stage_config = {k: v for k, v in cfg.stage_config(name).to_dict().items() if k not in NOT_IN_CACHE_KEY}
    config = {
        "stage": stage_config,
        "run": {"seed": run.seed, "num_workers": run.num_workers, "use_gpu": run.use_gpu},
    }
    return cache_key(name, code_fingerprint(name), config, {role: a.digest for role, a in inputs.items()})


def plan_stages(from_stage: str | None, only: str | None, cfg: PipelineConfig | None = None) -> tuple[list[str], set[str]]:
    """Which stages run, and which of them are forced (ignore the cache).

    With `sft.base_model` set the pipeline starts at SFT from that model: the pretrain node is left out.
    """
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{flag} {value!r}: unknown stage; expected one of {', '.join(STAGE_ORDER)}")
    if from_stage and only:
        raise ConfigError("--from and --only cannot be combined")
    if only:
        return [only], set()
    order = [s for s in STAGE_ORDER if not (s == "pretrain" and cfg is not None and cfg.sft.base_model)]
    if from_stage:
        if from_stage not in order:
            raise ConfigError(f"--from {from_stage}: sft.base_model is set, so {from_stage} does not run in this pipeline")
        return order, set(order[order.index(from_stage):])
    return order, set()


def check_only_inputs(only: str, inputs: dict[str, str]) -> None:
    """`--only STAGE` needs an explicit artifact for every input that is not a data set."""
    roles = STAGES[only].INPUTS
    for role in inputs:
        if role not in roles:
            raise ConfigError(f"--input {role}=...: {only} has no input {role!r}; its inputs are {', '.join(roles)}")
    missing = [r for r in roles if r not in inputs and (only, r) not in DATA_ROLES]
    if missing:
        example = " ".join(f"--input {r}={UPSTREAM_ROLES[(only, r)]}@latest" for r in missing)
        raise ConfigError(f"--only {only} needs an artifact for {', '.join(missing)}, e.g. {example}")


def preflight(cfg: PipelineConfig, stages: list[str]) -> None:
    """Fail in seconds when the run cannot fit: on this machine when the flow starts a local Ray itself."""
    if not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        check_fits(cfg, Resources.of_this_machine(), stages)


def import_name(path: str) -> str:
    """An artifact name for a directory imported on the fly: its folder name, reduced to safe characters."""
    import re

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).expanduser().resolve().name).strip("-._")
    return name or "imported-model"


def resolve_model(store, value: str, kind: str):
    """A model named in the config: an artifact ref, or a local HF directory imported into the store by content."""
    if Path(value).expanduser().is_dir():
        from stages.common.artifact_import import import_model

        return import_model(store, str(Path(value).expanduser()), kind=kind, name=import_name(value))
    return store.get(value, kind=kind)


def ingest_data(cfg: PipelineConfig, store, fmt: str):
    """One data source as a dataset artifact (identical data gives the existing version)."""
    from stages.common.data import ingest

    return ingest(getattr(cfg.data, fmt), fmt, store, demo_cfg=cfg.data.demo, test_fraction=cfg.data.test_fraction,
                  seed=cfg.run.seed, columns=_columns(cfg, fmt))  # fmt: skip


def _columns(cfg: PipelineConfig, fmt: str) -> dict[str, str] | None:
    columns = getattr(cfg.data, "columns", None)
    return getattr(columns, fmt, None) if columns is not None else None


def all_cached(cfg: PipelineConfig, store, stages: list[str], inputs: dict[str, str]) -> dict[str, Any] | None:
    """The run's summary if every stage would be reused (gates checked), else None: then the flow must run.

    Ingesting the data here publishes nothing new when the data is unchanged; when it changed, the new dataset
    version is exactly what the flow would publish first anyway.
    """
    from stages.common.gates import check_gate

    start = time.perf_counter()
    produced: dict[str, Any] = {}
    summary: dict[str, Any] = {"store": store.root, "stages": {}, "skipped": {}, "prefect": "not started"}
    if cfg.sft.base_model and "pretrain" not in stages:
        summary["skipped"]["pretrain"] = f"sft.base_model = {cfg.sft.base_model}"
        produced["base-model"] = resolve_model(store, cfg.sft.base_model, "causal-lm")
    for name in stages:
        module = STAGES[name]
        arts = {}
        for role, kind in module.INPUTS.items():
            if role in inputs:
                arts[role] = store.get(inputs[role], kind=kind)
            elif (name, role) in DATA_ROLES:
                arts[role] = ingest_data(cfg, store, DATA_ROLES[(name, role)])
            else:
                arts[role] = produced[UPSTREAM_ROLES[(name, role)]]
        hit = store.cached(stage_cache_key(name, cfg, arts))
        if hit is None:
            return None
        check_gate(name, getattr(cfg.stage_config(name), "gate", None), hit)
        produced.update(hit)
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
    from flows.cluster_check import probe_ray_address
    from flows.config import load_config

    cfg = load_config(params.get("preset", "demo"), params.get("config_file"), params.get("overrides") or [])
    stages, _ = plan_stages(params.get("from_stage"), params.get("only"), cfg)
    if params.get("only"):
        check_only_inputs(params["only"], params.get("inputs") or {})
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_ray_address(address)
    preflight(cfg, stages)
    return cfg, stages


def answer_from_cache(params: dict[str, Any]) -> dict[str, Any] | None:
    """Validate `rlhf run`'s parameters; if nothing would run, the summary from the store (no Prefect, no Ray)."""
    from stages.common.store import ArtifactStore

    cfg, stages = validate_run(params)
    if params.get("force") or params.get("from_stage"):
        return None
    store = ArtifactStore(params.get("store") or os.environ.get("RLHF_STORE") or cfg.run.store)
    return all_cached(cfg, store, stages, dict(params.get("inputs") or {}))
