"""What a sweep ranks its trials by: one metric of one node of the trial's branch (`NODE.METRIC`), read from the
node's published manifest metrics, with a direction.

The default: the eval stage's gold score of the branch's first policy on the built-in tasks, its reward functions'
pass rate when the run has functions (a verifier's answer beats a learnt score), else the swept stage's own gate
metric. A metric must be one the node is known to report (before anything starts): the eval's per-model numbers,
the node's gate metrics, or a metric an earlier artifact of the node in the store carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.common.config import ConfigError
from stages.common.gates import metric_value
from stages.eval.report import COLUMNS as EVAL_COLUMNS

# what the eval stage reports per model (stages/eval/report.py: model_summary, function_summary, the win rates)
EVAL_MODEL_METRICS = (*(c[0] for c in EVAL_COLUMNS), "format_rate", "eos_rate", "function_pass_rate")
SMALLER_IS_BETTER = ("loss", "perplexity", "kl")  # the default direction of a metric whose name holds one of these


@dataclass(frozen=True)
class Objective:
    node: str  # a node of the trial's branch
    metric: str  # a key of the node's manifest metrics (eval: `<model>.<metric>`, e.g. ppo.gold_score)
    mode: str  # "max" or "min"

    @property
    def label(self) -> str:
        return f"{self.node}.{self.metric}"

    def value(self, outputs: dict[str, Any]) -> float | None:
        """The metric from the node's output artifacts (name -> Artifact), None when none reports it."""
        for art in outputs.values():
            value = metric_value(art.metrics, self.metric)
            if value is not None:
                return float(value)
        return None

    def best(self, scored: list[tuple[Any, float]]) -> Any | None:
        """The item with the best value of (item, value) pairs, the first on a tie; None for an empty list."""
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda pair: pair[1])[0]


def choose(cfg, sweep, branch: list[str], swept: list[str], store) -> Objective:
    """The sweep's objective: `sweep.metric` checked against what its node reports, or the default."""
    if sweep.metric:
        node, _, metric = sweep.metric.partition(".")
        if not metric:
            raise ConfigError(f"sweep.metric {sweep.metric!r}: expected NODE.METRIC, e.g. eval.ppo.gold_score")
        if node not in branch:
            raise ConfigError(f"sweep.metric {sweep.metric!r}: {node} is not run by each trial (a trial runs "
                              f"{', '.join(branch)}), so it would be the same for every trial")  # fmt: skip
        known = reported_metrics(cfg, node, store)
        if metric not in known:
            raise ConfigError(f"sweep.metric {sweep.metric!r}: {node} reports no {metric!r}; it reports "
                              f"{', '.join(sorted(known)[:24])}")  # fmt: skip
        return Objective(node, metric, sweep.mode or _direction(cfg, node, metric))
    if "eval" in branch:
        model = next((m for m in cfg.align.methods if m in branch), None)
        if model is not None:
            if cfg.eval.reward_functions:
                return Objective("eval", f"{model}.function_pass_rate", sweep.mode or "max")
            if cfg.data.prompts == "demo":  # the built-in tasks know the gold answer
                return Objective("eval", f"{model}.gold_score", sweep.mode or "max")
    node = swept[0]
    checks = getattr(cfg.stage_config(node), "gate", None)
    checks = checks.checks() if checks is not None else []
    if not checks:
        raise ConfigError(f"the sweep has no default objective ({node} has no gate metric and no eval scores a gold "
                          "answer); name one with --metric NODE.METRIC")  # fmt: skip
    metric, bound, _ = checks[0]
    return Objective(node, metric, sweep.mode or ("max" if bound == "min" else "min"))


def reported_metrics(cfg, node: str, store) -> set[str]:
    """The metrics `node` is known to report before it runs."""
    if node == "eval":
        models = ["sft", *cfg.align.methods]
        per_model = list(EVAL_MODEL_METRICS)
        for spec in cfg.eval.reward_functions:
            per_model += [f"fn/{spec.label}", f"fn/{spec.label}/pass"]
        return {f"{model}.{key}" for model in models for key in per_model}
    gate = getattr(cfg.stage_config(node), "gate", None)
    known = {metric for metric, _, _ in gate.checks()} if gate is not None else set()
    if gate is not None:  # the gate's fields whether on or off: min_eval_accuracy -> eval_accuracy
        known |= {field.partition("_")[2] for field in type(gate).model_fields}
    from flows.nodes import node_named

    for name in node_named(cfg, node).outputs:
        for manifest in store.list(name):
            if manifest.get("stage") == node:
                known |= {k for k, v in manifest.get("metrics", {}).items() if isinstance(v, int | float)}
    return known


def _direction(cfg, node: str, metric: str) -> str:
    gate = getattr(cfg.stage_config(node), "gate", None)
    for field in type(gate).model_fields if gate is not None else ():
        bound, _, name = field.partition("_")
        if name == metric:
            return "max" if bound == "min" else "min"
    return "min" if any(word in metric for word in SMALLER_IS_BETTER) else "max"
