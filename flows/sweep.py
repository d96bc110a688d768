"""`rlhf sweep`: many variants of a stage as sibling branches of the DAG, run as Ray Tune trials, ranked by one metric.

  plan_sweep   every check before anything starts: the space (flows/sweep_space.py), every trial's config, which
               nodes the keys touch (the branch each trial runs: the swept stages and their downstream), the
               objective (flows/sweep_objective.py), the number of trials the cluster can run at once.
  run_sweep    one Prefect API for the driver and every trial; the stages upstream of the branch, once; then Tune,
               one trial per point (flows/sweep_trial.py), as many at a time as fit; then the sweep-report artifact
               and an MLflow parent run with a nested run per trial (flows/sweep_report.py); `--promote` last.

A trial is a pipeline run with `--set KEY=VALUE`: its branch has its own cache keys, so a point that ran before is
answered from the store, and adding a value to a grid runs one trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows import dag
from flows.plan import RunPlan, downstream, plan_run, run_params
from flows.sweep_objective import Objective, choose
from flows.sweep_space import KINDS, SweepSection, SweepSpace, build_space, point_overrides
from stages.common.config import ConfigError, format_validation_error


@dataclass(frozen=True)
class SweepPlan:
    params: dict[str, Any]  # the run's parameters, the swept keys not among its overrides
    base: RunPlan  # the run at the first point: its nodes and store
    section: SweepSection
    space: SweepSpace
    branch: tuple[str, ...]  # what each trial runs: the swept nodes and everything downstream of them
    upstream: tuple[str, ...]  # the rest of the run: once, before the trials
    objective: Objective
    sweep_id: str  # digest of the parameters and the space: names the Tune experiment

    @property
    def store(self):
        return self.base.store


def plan_sweep(params: dict[str, Any], flags: dict[str, Any]) -> SweepPlan:
    """Check the sweep (`flags`: the CLI's space and sweep.* values, over the config's `sweep:` section)."""
    from flows.config import load_config
    from flows.sweep_space import from_flags

    params = run_params(params)
    cfg = load_config(params["preset"], params["config_file"], params["overrides"])
    section_data = cfg.sweep.to_dict()
    for kind, given in from_flags(flags).items():
        section_data[kind] = {**section_data[kind], **given}
    section_data.update({k: v for k, v in flags.items() if k in SweepSection.model_fields and v is not None
                         and k not in KINDS})  # fmt: skip
    try:
        section = SweepSection(**section_data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "the sweep", "sweep.")) from None
    space = build_space(section)
    for key in space.keys:
        node = key.split(".", 1)[0]
        if node not in dag.ALL_NODE_NAMES:  # a node's own section
            raise ConfigError(f"sweep key {key}: a sweep varies one stage's section ({', '.join(dag.ALL_NODE_NAMES)}), "
                              f"not {node}.*, which every stage shares")  # fmt: skip
    plans = [plan_run({**params, "overrides": [*params["overrides"], *point_overrides(p)]}) for p in space.check_points()]
    base = plans[0]
    for node in space.nodes:
        if node not in base.stages:
            raise ConfigError(f"sweep key {next(k for k in space.keys if k.startswith(node + '.'))}: {node} is not a "
                              f"node of this run (it runs {', '.join(base.stages)})")  # fmt: skip
    nodes = list(base.nodes.values())
    touched = {name for node in space.nodes for name in downstream(nodes, node)}
    branch = tuple(s for s in base.stages if s in touched)
    upstream = tuple(s for s in base.stages if s not in touched)
    objective = choose(base.cfg, section, list(branch), list(space.nodes), base.store)
    digest = hashlib.sha256(json.dumps([params, space.describe()], sort_keys=True, default=str).encode()).hexdigest()
    return SweepPlan(params, base, section, space, branch, upstream, objective, digest[:12])


def run_sweep(plan: SweepPlan, *, promote: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; its report (flows/sweep_report.py `build`) with the published ref and the aliases set."""
    from flows import sweep_report
    from flows.cached import answer_from_cache
    from flows.pipeline import run_pipeline
    from flows.preflight import check_fits
    from flows.ray_driver import RayDriver

    cfg, store = plan.base.cfg, plan.store
    log(f"sweep {plan.sweep_id}: {plan.space.trials} trials of {', '.join(plan.branch)} over "
        f"{', '.join(plan.space.keys)}; objective {plan.objective.label} ({plan.objective.mode})"
        + (f"; run once first: {', '.join(plan.upstream)}" if plan.upstream else ""))
    driver = RayDriver(cfg.run.ray_address, store.root, cfg.run.work_dir,
                       check=lambda resources: check_fits(cfg, resources, list(plan.base.stages)))  # fmt: skip
    with prefect_api() as api_url:
        try:
            driver.ensure()  # one Ray for the shared stages and the trials (a flow leaves a Ray it did not start)
            upstream: dict[str, dict] = {}
            if plan.upstream:
                shared = replace(plan.base, stages=plan.upstream, nodes={n: plan.base.nodes[n] for n in plan.upstream})
                summary = answer_from_cache(shared) or run_pipeline(shared)
                upstream = {name: info["outputs"] for name, info in summary["stages"].items()}
            concurrency = trial_concurrency(cfg, plan.branch, driver.resources())
            log(f"sweep {plan.sweep_id}: up to {concurrency} trial{'s' * (concurrency > 1)} at a time")
            results = _tune(plan, api_url, concurrency, log)
        finally:
            driver.close()
    rows = sweep_report.trial_rows(results, plan.space.keys)
    report = sweep_report.build(plan.space.describe(), plan.objective, rows, upstream)
    art = sweep_report.publish(store, report, rows, {"sweep": plan.section.to_dict(), "params": plan.params})
    report["ref"] = art.ref
    report["ran"] = {row["trial"]: row["ran"] for row in rows}  # not in the artifact: it differs on a rerun
    log(f"sweep {plan.sweep_id}: published {art.ref}")
    if promote and report["best"]:
        best = next(r for r in rows if r["trial"] == report["best"]["trial"])
        report["promoted"] = sweep_report.promote(store, best, art.ref)
        for line in report["promoted"]:
            log(f"promoted {line}")
    _track(cfg, plan, rows, report)
    return report


def trial_concurrency(cfg, branch: tuple[str, ...], have) -> int:
    """How many trials fit the cluster at once: a trial runs its branch's stages one after another (siblings side
    by side), so it holds at most the largest (CPUs, GPUs) of them."""
    from flows.schedule import branch_demand

    run = cfg.run
    cpus, gpus = 0.0, 0.0
    siblings = [n for n in branch if n in dag.ALIGN_METHODS]
    for name in branch:
        if name in dag.ALIGN_METHODS:
            continue
        if name == "eval":
            need = (cfg.eval.cpus, cfg.eval.gpus if run.use_gpu else 0.0)
        else:
            need = (run.num_workers * run.cpus_per_worker, float(run.num_workers if run.use_gpu else 0))
        cpus, gpus = max(cpus, need[0]), max(gpus, need[1])
    if siblings:  # the align branches of one trial run together when they fit, as in a run
        demand = [branch_demand(cfg, name, have.gpus) for name in siblings]
        cpus = max(cpus, sum(d[0] for d in demand) if cfg.align.concurrent else max(d[0] for d in demand))
        gpus = max(gpus, sum(d[1] for d in demand) if cfg.align.concurrent else max(d[1] for d in demand))
    fits = have.cpus / cpus if cpus else math.inf
    if gpus:
        fits = min(fits, have.gpus / gpus)
    return max(1, min(int(fits + 1e-9), 64))


def _tune(plan: SweepPlan, api_url: str, concurrency: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Tune's trials, one per point: [{"point", "metrics" (the last report), "error"}]."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from flows.sweep_trial import CONTEXT_KEY, run_trial

    section, cfg = plan.section, plan.base.cfg
    context = {
        "cwd": os.getcwd(),
        "params": plan.params,
        "keys": list(plan.space.keys),
        "branch": list(plan.branch),
        "objective": {"node": plan.objective.node, "metric": plan.objective.metric, "mode": plan.objective.mode},
        "asha_metric": section.asha_metric,
        # the trial actors' Prefect API is the sweep's; the rest as the driver has it (verbosity, loopback Ray)
        "env": {"PREFECT_API_URL": api_url, **{k: v for k, v in os.environ.items() if k.startswith("RLHF_")}},
    }
    scheduler = None
    if section.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # a trial answered from the cache reports no iterations: nothing for ASHA to judge, and nothing to save
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

        iterations = max(cfg.stage_config(n).iterations for n in plan.branch if n in dag.RL_METHODS)
        scheduler = ASHAScheduler(metric=section.asha_metric, mode="max", time_attr="training_iteration",
                                  grace_period=section.grace_iterations, max_t=iterations + 1)  # fmt: skip
    storage = _tune_storage(cfg.run.work_dir)
    if os.environ.get("RLHF_VERBOSE") != "1":  # Tune's tables and tracebacks: the callback's lines say it
        import logging

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the reporter that honours verbose=0
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    tuner = tune.Tuner(
        # a trial's actor holds no CPU: its stages' workers and actors hold what they need, as in a run
        tune.with_resources(run_trial, {"cpu": 0, "memory": 2**20}),
        param_space={**plan.space.param_space(), CONTEXT_KEY: json.dumps(context)},
        tune_config=tune.TuneConfig(num_samples=plan.space.samples, max_concurrent_trials=concurrency,
                                    scheduler=scheduler, search_alg=BasicVariantGenerator(random_state=cfg.run.seed)),
        run_config=tune.RunConfig(name=f"sweep-{plan.sweep_id}-{int(time.time())}", storage_path=storage, verbose=0,
                                  callbacks=[_progress(plan, log)], failure_config=tune.FailureConfig(max_failures=0)),
    )  # fmt: skip
    grid = tuner.fit()
    out = []
    for i in range(len(grid)):
        result = grid[i]
        point = {k: result.config[k] for k in plan.space.keys}
        out.append({"point": point, "metrics": result.metrics or {}, "error": _one_line(result.error)})
    return out


def _tune_storage(work_dir: str) -> str:
    """Tune's own bookkeeping (its experiment state; no trial checkpoints): under a local work_dir, else a temp dir."""
    if "://" in work_dir:
        import tempfile

        return tempfile.mkdtemp(prefix="rlhf-tune-")
    path = Path(work_dir).resolve() / "sweeps"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    from stages.common.redact import redact_credentials

    text = str(getattr(error, "cause", None) or error).strip().splitlines()
    return redact_credentials(text[-1] if text else type(error).__name__)[:500]


def _progress(plan: SweepPlan, log: Callable[[str], None]):
    """A Tune callback: one line per finished trial (Tune's own status table is off)."""
    from ray.tune import Callback

    def where(trial) -> str:
        return ", ".join(f"{k}={trial.config[k]}" for k in plan.space.keys)

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            m = trial.last_result or {}
            ran = json.loads(m.get("ran") or "[]")
            if m.get("state") == "done":
                log(f"trial {where(trial)}: {plan.objective.label} = {m.get('objective')} "
                    f"({'ran ' + ', '.join(ran) if ran else 'all cached'})")  # fmt: skip
            elif m.get("state") == "failed":
                log(f"trial {where(trial)}: failed: {m.get('error')}")
            else:
                log(f"trial {where(trial)}: stopped early by ASHA ({plan.section.asha_metric} = "
                    f"{m.get(plan.section.asha_metric)}); its RL stage published nothing")  # fmt: skip

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"trial {where(trial)}: error; its output is in Tune's trial folder {trial.path}")

    return Progress()


@contextmanager
def prefect_api() -> Iterator[str]:
    """One Prefect API for the sweep's driver and every trial actor: PREFECT_API_URL when set, else a temporary
    server (on 127.0.0.1) for the length of the sweep."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _track(cfg, plan: SweepPlan, rows: list[dict], report: dict) -> None:
    """MLflow: the sweep's parent run (the space, the best objective) and one nested run per trial."""
    from flows.tracking import Tracker

    tracker = Tracker(cfg.tracking, warn=lambda line: print(line, file=sys.stderr), store_root=plan.store.root)
    if not tracker.enabled:
        return
    tracker.start_pipeline(f"sweep-{plan.sweep_id}", params={"sweep": plan.space.describe(),
                           "objective": report["objective"]},
                           tags={"sweep_report": report["ref"], "store": plan.store.root}, kind="sweep")  # fmt: skip
    for row in rows:
        refs = {f"output.{name}": ref for outputs in row["outputs"].values() for name, ref in outputs.items()}
        tracker.log_trial(f"trial{row['trial']}", state=row["state"], params=row["point"],
                          metrics={} if row["objective"] is None else {"objective": row["objective"]},
                          tags={**refs, "pipeline_run": row["tracking_run"], "error": row["error"][:200]})  # fmt: skip
    tracker.end("FINISHED")
