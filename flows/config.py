"""The pipeline config: shared `run` and `data` sections plus each stage's (and each RL method's) own config class.

Resolution order (later wins): preset file (flows/presets/<name>.yaml) -> the user's --config file -> --set overrides.
Validation is strict and happens on the merged whole, before anything runs; an error names the source that set the
offending key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from flows.tracking import TrackingSection
from stages import dpo, eval, pretrain, reward, rl, sft  # noqa: A004 - the eval stage package
from stages.common.config import (
    ConfigError,
    Section,
    apply_overrides,
    deep_merge,
    format_validation_error,
    parse_override,
    read_yaml,
)
from stages.common.context import Scaling
from stages.common.demo import DemoConfig
from stages.dpo import Config as DPOConfig
from stages.eval import Config as EvalConfig
from stages.pretrain import Config as PretrainConfig
from stages.reward import Config as RewardConfig
from stages.rl import GRPOConfig, PPOConfig, RLOOConfig
from stages.sft import Config as SFTConfig

# stage package name -> module; the DAG (flows/dag.py) says which node runs which
STAGES = {m.NAME: m for m in (pretrain, sft, reward, rl, dpo, eval)}
PRESETS = ("tiny", "demo", "single-gpu", "gpu-cluster")


class RunSection(Section):
    """Run-level choices shared by every stage."""

    seed: int = 0
    store: str = Field("./artifacts", min_length=1, description="artifact store root: a folder or an fsspec URI")
    work_dir: str = Field("./runs", min_length=1, description="checkpoints and Ray Train storage, per stage run")
    ray_address: str | None = Field(None, description="join this Ray cluster; None = RAY_ADDRESS or a local Ray")
    num_workers: int = Field(2, ge=1, description="Ray Train workers per training stage, actors per PPO role")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False

    def scaling(self) -> Scaling:
        return Scaling(num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker, use_gpu=self.use_gpu)


class ColumnMaps(Section):
    """Per data set, canonical column -> the column of the user's file, e.g. preferences: {chosen: better}."""

    corpus: dict[str, str] | None = None
    sft: dict[str, str] | None = None
    preferences: dict[str, str] | None = None
    prompts: dict[str, str] | None = None


class DataSection(Section):
    """Where each stage's data comes from: "demo" (the built-in task), a local file or folder, or hf:NAME."""

    corpus: str = Field("demo", min_length=1)
    sft: str = Field("demo", min_length=1)
    preferences: str = Field("demo", min_length=1)
    prompts: str = Field("demo", min_length=1)
    test_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when a source has no test split")
    demo: DemoConfig = Field(default_factory=DemoConfig)
    columns: ColumnMaps = Field(default_factory=ColumnMaps)  # rename a file's columns before validation


class AlignSection(Section):
    """Which alignment branches run after SFT and reward (siblings in the DAG), and the final eval node."""

    methods: list[Literal["ppo", "grpo", "rloo", "dpo"]] = Field(default_factory=lambda: ["ppo"], min_length=1)
    eval: bool = True  # score the SFT model and every policy of the run on the same held-out prompts
    concurrent: bool = True  # run sibling branches at the same time when the cluster has room for them

    @model_validator(mode="after")
    def _unique(self) -> AlignSection:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"each method at most once, found {self.methods}")
        return self


class PipelineConfig(Section):
    """Everything one `rlhf run` needs; each stage section is that stage's own config class."""

    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    rloo: RLOOConfig = Field(default_factory=RLOOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    align: AlignSection = Field(default_factory=AlignSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _workers_fit_on_gpu_flag(self) -> PipelineConfig:
        if self.run.use_gpu and self.run.cpus_per_worker < 1:
            raise ValueError("run.cpus_per_worker must be >= 1 when run.use_gpu is true")
        return self

    @model_validator(mode="after")
    def _eval_scores_with_the_run_functions(self) -> PipelineConfig:
        """eval.reward_functions, unless given: every reward function of the run's RL branches, once each."""
        if "reward_functions" not in self.eval.model_fields_set:
            seen: dict[str, Any] = {}
            for m in self.align.methods:
                if m in rl.METHODS:
                    for spec in getattr(self, m).reward.functions:
                        seen.setdefault(spec.label, spec)
            if seen:
                self.eval.reward_functions = list(seen.values())
        return self

    def stage_config(self, name: str) -> Section:
        """The config a DAG node runs with: the section of the same name (each RL method has its own)."""
        return getattr(self, name)


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"config error: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return Path(str(resources.files("flows") / "presets" / f"{name}.yaml"))


def _has_key(data: dict[str, Any], path: list[str]) -> bool:
    node: Any = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _source_of(loc: list[str], layers: list[tuple[str, dict[str, Any]]], overrides: list[str]) -> str:
    """Which layer set the key that failed: the last --set naming it, else the last file containing it."""
    for item in reversed(overrides):
        path, _ = parse_override(item)
        if loc[: len(path)] == path or path[: len(loc)] == loc:
            return f"--set {item}"
    for source, data in reversed(layers):
        if _has_key(data, loc):
            return source
    return layers[-1][0] if layers else "defaults"


def load_config(preset: str = "demo", config_file: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Resolve preset + file + overrides into a validated PipelineConfig, or raise ConfigError (one line)."""
    overrides = list(overrides or [])
    layers: list[tuple[str, dict[str, Any]]] = [(str(preset_path(preset)), read_yaml(preset_path(preset)))]
    if config_file:
        layers.append((str(config_file), read_yaml(config_file)))
    merged: dict[str, Any] = {}
    for _, data in layers:
        merged = deep_merge(merged, data)
    merged = apply_overrides(merged, overrides)
    _refuse_moved_keys(merged, layers, overrides)
    try:
        cfg = PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        loc = [str(p) for p in exc.errors(include_url=False)[0]["loc"]]
        raise ConfigError(format_validation_error(exc, _source_of(loc, layers, overrides))) from None
    _check_precision_fits_device(cfg, layers, overrides)
    return cfg


# Keys of earlier releases, and what replaced them: refused with one line naming the new key.
MOVED_KEYS = {
    "ppo.algorithm": "align.methods (each RL method has its own section: ppo, grpo, rloo)",
    "ppo.group_size": "grpo.group_size or rloo.group_size",
    "ppo.grpo_scale_rewards": "grpo.scale_rewards",
    "grpo.grpo_scale_rewards": "grpo.scale_rewards",
}


def _refuse_moved_keys(merged: dict[str, Any], layers, overrides: list[str]) -> None:
    for key, new in MOVED_KEYS.items():
        if _has_key(merged, key.split(".")):
            source = _source_of(key.split("."), layers, overrides)
            raise ConfigError(f"config error in {source}: {key} is no longer a key; use {new}")


def _half_precision_keys(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(key path, value) of every stage setting that asks for bf16/fp16 compute."""
    keys = []
    if cfg.pretrain.precision in ("bf16", "fp16"):
        keys.append(("pretrain.precision", repr(cfg.pretrain.precision)))
    for section in ("sft", "reward", *rl.METHODS):
        if getattr(cfg, section).bf16:
            keys.append((f"{section}.bf16", "true"))
    return keys


def _runs_on_this_cpu(key: str) -> bool:
    """The RL stage computes in bf16 on a CPU with native bf16 (the others stay fp32 on any CPU)."""
    from stages.common.deepspeed_config import native_cpu_bf16

    return key.split(".")[0] in rl.METHODS and native_cpu_bf16()


def _check_precision_fits_device(cfg: PipelineConfig, layers, overrides: list[str]) -> None:
    """bf16/fp16 need a GPU: on CPU they are refused here, before anything starts, instead of deep in a worker."""
    if cfg.run.use_gpu:
        return
    for key, value in _half_precision_keys(cfg):
        if _runs_on_this_cpu(key):
            continue
        source = _source_of(key.split("."), layers, overrides)
        raise ConfigError(
            f"config error in {source}: {key}: {value} needs a GPU, but run.use_gpu is false; "
            f"use fp32 on CPU (pretrain.precision=auto or fp32, <stage>.bf16=false) or set run.use_gpu=true"
        )
