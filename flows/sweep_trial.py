"""One sweep trial, as Ray Tune runs it in a trial actor: the pipeline with the trial's `--set KEY=VALUE` items.

Everything upstream of the swept keys was run once by the sweep before its trials (flows/sweep.py), so a trial's
plan finds those stages cached; it runs the swept stage and its downstream (its own cache keys), or nothing when
this point ran before (the cache answer, without Prefect). Each RL iteration is reported to Tune, whose ASHA
scheduler may stop the trial: the stage then never reaches its publish, so a stopped trial publishes nothing. The
last report carries the trial's objective and its outputs.

This module is imported in the trial actor before Prefect is: the sweep's Prefect API address must be in the
environment first (Prefect reads it when it is imported).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

CONTEXT_KEY = "__sweep__"  # the one constant of Tune's param_space: what every trial shares, as JSON


def run_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable."""
    ctx = json.loads(config[CONTEXT_KEY])
    os.chdir(ctx["cwd"])  # Tune starts a trial in its own folder; the run's relative paths are the user's
    os.environ.update(ctx["env"])
    from ray import tune

    point = {key: config[key] for key in ctx["keys"]}
    tune.report(trial_result(ctx, point, tune.report))


def trial_result(ctx: dict[str, Any], point: dict[str, Any], report: Callable[[dict], None]) -> dict[str, Any]:
    """Run (or answer from the cache) the trial at `point`; the result Tune records, JSON in its text fields."""
    from flows import pipeline
    from flows.cached import answer_from_cache
    from flows.plan import plan_run
    from flows.sweep_objective import Objective
    from flows.sweep_space import point_overrides
    from stages.common.redact import redact_credentials

    params = {**ctx["params"], "overrides": [*ctx["params"]["overrides"], *point_overrides(point)]}
    objective = Objective(**ctx["objective"])
    asha_metric = ctx["asha_metric"]
    last: dict[str, float] = {}

    def on_iteration(method: str, metrics: dict) -> None:
        if isinstance(metrics.get(asha_metric), int | float):
            last[asha_metric] = float(metrics[asha_metric])
            report({asha_metric: last[asha_metric], "method": method, "rl_iteration": metrics.get("iteration", 0)})

    try:
        plan = plan_run(params)
        summary = answer_from_cache(plan)
        if summary is None:
            pipeline.set_iteration_hook(on_iteration)
            summary = pipeline.run_pipeline(plan)
    except pipeline.USER_ERRORS as e:  # a missed gate, data a stage refused: this trial failed, the sweep goes on
        return {**last, "state": "failed", "error": redact_credentials(str(e))}
    branch = {name: info for name, info in summary["stages"].items() if name in ctx["branch"]}
    node_outputs = {out: plan.store.get(ref) for out, ref in branch.get(objective.node, {}).get("outputs", {}).items()}
    return {
        **last,
        "state": "done",
        "objective": objective.value(node_outputs),
        "outputs": json.dumps({name: info["outputs"] for name, info in branch.items()}),
        "ran": json.dumps([name for name, info in branch.items() if info["state"] != "Cached"]),
        "tracking_run": (summary.get("tracking") or {}).get("run_id") or "",
    }
