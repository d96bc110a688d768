"""The `reward:` section of each RL method: the reward model, reward functions, or both (a weighted sum)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from stages.common.config import Section

BUILTIN_NAMES = ("exact_match", "math_match", "format_regex", "demo_gold")


class FunctionSpec(Section):
    """One reward function: a built-in by `name`, or `name` defined in the Python file at `path`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the function (a Python identifier)
    path: str | None = None  # a .py file; None = a built-in (BUILTIN_NAMES)
    # its share of the reward: the sum of weight x score over the sources; 0 = watched (scored in the evaluations,
    # usable by the gate), not trained on
    weight: float = 1.0
    pass_threshold: float = 1.0  # a reply passes when its score is at least this (the pass rate in evaluations)
    # fixed keyword arguments for every call (e.g. {column: answer} for exact_match, {pattern: ...} for format_regex)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_builtin(self) -> FunctionSpec:
        if self.path is None and self.name not in BUILTIN_NAMES:
            raise ValueError(
                f"a built-in reward function ({', '.join(BUILTIN_NAMES)}), or `path: FILE.py` with your own {self.name}"
            )
        return self

    @property
    def label(self) -> str:
        """How messages and metrics name it: `exact_match`, or `my_reward` for a file's function."""
        return self.name


class RewardSources(Section):
    """Where an RL method's reward comes from. Rewards are the weighted sum of the sources' scores per reply."""

    # the learnt reward model (the reward stage's output); null = no reward model (then the reward stage does not
    # run unless another branch needs it)
    model: Literal["reward-model"] | None = "reward-model"
    model_weight: float = 1.0  # the reward model's share of the sum
    functions: list[FunctionSpec] = Field(default_factory=list)
    timeout_s: float = Field(60.0, gt=0.0)  # per call of one function on one batch; past it the stage fails
    cpus: float = Field(0.25, gt=0.0)  # Ray CPUs of the actor that runs the functions (CPU only, no GPU)

    @model_validator(mode="after")
    def _some_source(self) -> RewardSources:
        if self.model is None and not self.functions:
            raise ValueError("a reward source: reward.model, or reward.functions listing at least one")
        labels = [f.label for f in self.functions]
        if len(set(labels)) != len(labels):
            raise ValueError(f"each reward function at most once, found {labels}")
        return self

    @property
    def uses_model(self) -> bool:
        return self.model is not None
