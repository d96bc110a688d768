"""What a sweep searches: the `sweep:` config section, the `--grid/--choice/--uniform/--loguniform` flags, and the
search space they make, checked before anything starts and handed to Ray Tune as its `param_space`.

A key is a dotted config key of one stage's section (`reward.learning_rate`, `ppo.kl_coef`); each trial is the run
with `--set KEY=VALUE` for every key. Grid and choice keys take lists; uniform and loguniform keys take [LOW, HIGH].
Tune repeats the grid `samples` times and draws the random keys once per trial (seeded by `run.seed`, so a rerun
draws the same values and finds its trials cached).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from stages.common.config import ConfigError, Section, parse_override

KINDS = ("grid", "choice", "uniform", "loguniform")


class SweepSection(Section):
    """`rlhf sweep`'s search space and objective; read by `rlhf sweep` only (no stage's cache key holds it)."""

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="KEY: [values]: every value, every sample")
    choice: dict[str, list[Any]] = Field(default_factory=dict, description="KEY: [values]: one drawn per trial")
    uniform: dict[str, list[float]] = Field(default_factory=dict, description="KEY: [low, high]")
    loguniform: dict[str, list[float]] = Field(default_factory=dict, description="KEY: [low, high], low > 0")
    samples: int = Field(1, ge=1, description="Tune's num_samples: repeats of the grid, or trials of a random search")
    metric: str | None = Field(None, description="NODE.METRIC to rank trials by (default: eval's gold score, or the "
                                                 "reward functions' pass rate, else the swept stage's gate metric)")
    mode: Literal["max", "min"] | None = Field(None, description="the metric's direction (default: max for a "
                                                                 "score, as its gate says for a gate metric)")
    max_trials: int = Field(16, ge=1, description="refuse a space with more trials than this")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="asha: stop trials early on an RL iteration metric")
    asha_metric: str = Field("reward", description="the RL iteration metric ASHA compares (maximised)")
    grace_iterations: int = Field(2, ge=1, description="RL iterations a trial runs before ASHA may stop it")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, e.g. reward.learning_rate
    kind: str  # one of KINDS
    values: tuple[Any, ...]  # the values (grid, choice) or (low, high)

    @property
    def node(self) -> str:
        return self.key.split(".", 1)[0]

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return (tune.uniform if self.kind == "uniform" else tune.loguniform)(*self.values)


@dataclass(frozen=True)
class SweepSpace:
    dims: tuple[Dimension, ...]
    samples: int

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dims)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes whose sections the keys are in, in the keys' order."""
        return tuple(dict.fromkeys(d.node for d in self.dims))

    @property
    def trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.dims if d.kind == "grid")
        return grid * self.samples

    def param_space(self) -> dict[str, Any]:
        return {d.key: d.tune_domain() for d in self.dims}

    def check_points(self) -> list[dict[str, Any]]:
        """Points whose configs must all validate before anything starts: every combination of the listed values
        (a range's two ends)."""
        return [dict(zip(self.keys, combo, strict=True)) for combo in itertools.product(*(d.values for d in self.dims))]

    def describe(self) -> dict[str, Any]:
        return {"dimensions": [{"key": d.key, "kind": d.kind, "values": list(d.values)} for d in self.dims],
                "samples": self.samples, "trials": self.trials}  # fmt: skip


def point_overrides(point: dict[str, Any]) -> list[str]:
    """The `--set` items of one trial (JSON is YAML, so 0.0003 stays a float and "a" a string)."""
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def from_flags(flags: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """`--grid 'K=[a,b]'` and friends as the `sweep:` section's mappings; `--uniform K=LO,HI` may omit the brackets."""
    out: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for item in flags.get(kind) or []:
            key, sep, raw = item.partition("=")
            if not sep or not key or not raw.strip():
                raise ConfigError(f"--{kind} {item!r}: expected KEY=[VALUE,...], e.g. --{kind} 'ppo.kl_coef=[0.05,0.1]'")
            if not raw.lstrip().startswith("["):
                raw = f"[{raw}]"
            _, value = parse_override(f"{key}={raw}")
            if not isinstance(value, list):
                raise ConfigError(f"--{kind} {item!r}: {raw!r} is not a list; expected KEY=[VALUE,...]")
            out[kind][key] = value
    return out


def build_space(section: SweepSection) -> SweepSpace:
    """The checked space of a `sweep:` section (flags already merged in); one line for each kind of mistake."""
    dims: list[Dimension] = []
    seen: dict[str, str] = {}
    for kind in KINDS:
        for key, values in getattr(section, kind).items():
            where = f"sweep.{kind}.{key}"
            if key in seen:
                raise ConfigError(f"{where}: {key} is also in sweep.{seen[key]}; give each key one search")
            seen[key] = kind
            if "." not in key or any(not part for part in key.split(".")):
                raise ConfigError(f"{where}: expected a dotted config key such as reward.learning_rate")
            if not values:
                raise ConfigError(f"{where}: the list of values is empty")
            if kind in ("uniform", "loguniform"):
                _check_range(where, kind, values)
            elif len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ConfigError(f"{where}: {values} lists a value twice")
            dims.append(Dimension(key, kind, tuple(values)))
    if not dims:
        raise ConfigError("the sweep's search space is empty: give --grid, --choice, --uniform or --loguniform "
                          "(or a sweep: section), e.g. --grid 'reward.learning_rate=[3e-4,1e-3]'")  # fmt: skip
    space = SweepSpace(tuple(dims), section.samples)
    if space.trials > section.max_trials:
        raise ConfigError(f"the sweep has {space.trials} trials ({_count_text(space)}), more than sweep.max_trials = "
                          f"{section.max_trials}; shrink the space or raise --max-trials")  # fmt: skip
    return space


def _check_range(where: str, kind: str, values: list) -> None:
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: expected [LOW, HIGH] as two numbers, found {values}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: LOW {low} must be below HIGH {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: a log-uniform range must be above 0, found LOW {low}")


def _count_text(space: SweepSpace) -> str:
    grid = [f"{len(d.values)} {d.key}" for d in space.dims if d.kind == "grid"]
    return " x ".join(grid + ([f"{space.samples} samples"] if space.samples > 1 or not grid else []))
