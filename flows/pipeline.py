"""The Prefect flow `rlhf`: data -> pretrain -> sft -> reward -> ppo / grpo / rloo / dpo -> eval, with staleness
detection.

The flow holds no ML logic. It resolves the config, turns data sources into dataset artifacts, decides per stage whether
a verified artifact for the stage's cache key already exists (then the task ends `Cached`), and otherwise calls the
stage's `run`. It is the Ray driver: it joins `run.ray_address` / `RAY_ADDRESS` when given, or starts a local Ray, and
shuts down only a Ray it started.
"""

from __future__ import annotations

import logging
import os
import time
from contextvars import ContextVar
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows import assets, report, schedule
from flows.config import STAGES, PipelineConfig
from flows.dag import POLICY_ROLE_PREFIX, Node
from flows.inputs import InputSources, data_check, ingest_data, input_kind, resolve_inputs, resolve_model
from flows.keys import key_parts
from flows.plan import RunPlan, plan_run, plan_stages, preflight, run_params, stage_cache_key
from flows.preflight import check_fits
from flows.ray_driver import RayDriver
from flows.tracking import Tracker
from flows.work_lease import work_dir_lease
from stages.common.config import ConfigError
from stages.common.context import StageContext
from stages.common.errors import StageInputError
from stages.common.gates import GateFailed, check_gate
from stages.common.ray_train import console_log_dir, verbose
from stages.common.redact import redact_credentials
from stages.common.store import ArtifactError, ArtifactStore
from stages.common.store_files import is_no_space
from stages.data.read import DataError
from stages.reward_functions.artifact import ROLE_PREFIX as REWARD_FN_ROLE_PREFIX


class _QuietPrefect(logging.Filter):
    """Prefect's lines the run's own lines make redundant, dropped without `rlhf run --verbose`: the "Finished in
    state Completed()" of every task and of the flow (the stage lines and the summary say it), the temporary
    server's "how to run a dedicated server" hint and its "Stopping" line. Warnings and failures all stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        message = record.getMessage()
        if message.startswith("Finished in state Completed(") or message.startswith("Stopping temporary server"):
            return False
        if message.startswith("Starting temporary server") and "\n" in message:
            record.msg, record.args = message.split("\n", 1)[0], ()
        return True


for _name in ("prefect", "prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_QuietPrefect())

USER_ERRORS = (ConfigError, DataError, StageInputError, ArtifactError, GateFailed)

# Called with (method, metrics) after each RL iteration of this process's runs: a sweep trial's report to Ray Tune.
_iteration_hook = None


def set_iteration_hook(hook) -> None:
    global _iteration_hook
    _iteration_hook = hook


def _user_failure(exc: BaseException):
    """A user's mistake as a Failed state: Prefect shows the one-line message, logs no traceback, never retries."""
    return Failed(message=str(exc), data=exc)


def _worth_retrying(task_obj, task_run, state) -> bool:
    """Retry infrastructure failures (a lost Ray worker, a flaky node); never a user's bad config or data."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - reading the state is best effort
            exc = e
    # a full disk or spent quota (a checkpoint write, say) fails the same way on every try
    return not isinstance(exc, USER_ERRORS) and not is_no_space(exc)


@task(name="data", cache_policy=NO_CACHE, persist_result=False)
def data_task(cfg: PipelineConfig, store: ArtifactStore, fmt: str, node: Node | None = None, role: str | None = None,
              models: dict[str, Any] | None = None, known: str | None = None) -> str:  # fmt: skip
    """Materialise one data source as a dataset artifact (identical data -> the same version), checked first by the
    stage of `node` against its model inputs (`models`) so that data it would refuse is never published. `known`:
    the ref the cache answer already ingested in this process (checked the same way): the file is not read again."""
    source = getattr(cfg.data, fmt)
    if known is not None:
        get_run_logger().info(f"data {fmt}: {source} -> {known} (ingested while planning)")
        return known
    try:
        check = data_check(cfg, node, role, models or {}) if node else None
        art = ingest_data(cfg, store, fmt, check=check)
    except USER_ERRORS as e:
        return _user_failure(e)
    get_run_logger().info(f"data {fmt}: {source} -> {art.ref} ({art.metrics})")
    return art.ref


@task(name="model", task_run_name="{key}", cache_policy=NO_CACHE, persist_result=False)
def model_task(key: str, value: str, kind: str, store: ArtifactStore) -> str:
    """A model named in the config (`sft.base_model`): an artifact ref, or a local HF directory imported by content."""
    try:
        art = resolve_model(store, value, kind, key)
    except USER_ERRORS as e:
        return _user_failure(e)
    get_run_logger().info(f"{key}: {value} -> {art.ref} (digest {art.digest[:12]})")
    return art.ref


# a stage is a Prefect task materializing its outputs as assets (flows/assets.py); see `_stage_task_for`
STAGE_TASK_OPTIONS = dict(
    name="stage",
    task_run_name="{name}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=_worth_retrying,
)


def stage_task(name: str, node: Node, cfg: PipelineConfig, store: ArtifactStore, ray_driver: RayDriver,
               input_refs: dict[str, str], force: bool):  # fmt: skip
    """Reuse the stage's artifacts when its cache key matches; otherwise run it, publish, and record the key."""
    try:
        return _run_or_reuse(name, node, cfg, store, ray_driver, input_refs, force)
    except USER_ERRORS as e:
        return _user_failure(e)


def _run_or_reuse(name: str, node: Node, cfg: PipelineConfig, store: ArtifactStore, ray_driver: RayDriver,
                  input_refs: dict[str, str], force: bool):  # fmt: skip
    logger = get_run_logger()
    inputs = {role: store.get(ref, kind=input_kind(node, role)) for role, ref in input_refs.items()}
    parts = key_parts(name, cfg, inputs, node.stage)
    key = parts.key
    gate = getattr(cfg.stage_config(name), "gate", None)
    if not force and (reused := _reuse(name, key, gate, store, inputs)) is not None:
        return reused
    ctx = StageContext(
        work_dir=os.path.join(cfg.run.work_dir, name, key[:16]),
        cache_key=key,
        seed=cfg.run.seed,
        scaling=cfg.run.scaling(),
        log=logger.info,
        report_to=tuple(cfg.tracking.report_to),
        untrusted_checkpoints=cfg.run.untrusted_checkpoints,
        on_iteration=_iteration_hook,
    )
    # another run of this stage and key shares the work_dir: one at a time (flows/work_lease.py)
    with work_dir_lease(ctx.work_dir, wait_s=cfg.run.work_dir_lease_wait_s, ttl_s=cfg.run.work_dir_lease_ttl_s,
                        log=logger.warning):  # fmt: skip
        if not force and (reused := _reuse(name, key, gate, store, inputs)) is not None:
            return reused  # the run we waited for published it
        ray_driver.ensure()
        log_dir = console_log_dir(ctx.work_dir)
        ctx.logs_announced = log_dir is not None  # said once here instead of by the stage
        logger.info(f"{name}: running (cache key {key[:12]}, inputs "
                    f"{', '.join(a.ref for a in inputs.values()) or 'none'})"
                    + (f"; worker output (Ray, DeepSpeed, HF) in {log_dir}/" if log_dir else ""))
        start = time.perf_counter()
        outputs = call_stage(node, cfg.stage_config(name), store=store, ctx=ctx, inputs=inputs)
        wall = time.perf_counter() - start
        store.record_cache(key, outputs, parts=parts.to_record())  # the parts: a later dry run says what changed
    assets.record(store.root, outputs.values())
    report.stage_markdown(name, "ran", outputs, inputs, wall_seconds=wall)
    check_gate(name, gate, outputs)
    return {out: art.ref for out, art in outputs.items()}


def _reuse(name: str, key: str, gate, store: ArtifactStore, inputs: dict[str, Any]):
    """The Cached state reusing the outputs recorded for key, or None when there are none."""
    hit = store.cached(key)
    if hit is None:
        return None
    refs = {out: art.ref for out, art in hit.items()}
    get_run_logger().info(f"{name}: cache key {key[:12]} matches; reusing {', '.join(refs.values())}")
    report.stage_markdown(name, "reused", hit, inputs, wall_seconds=0.0)
    check_gate(name, gate, hit)
    return Completed(name="Cached", message=f"reused {', '.join(refs.values())}", data=refs)


def call_stage(node: Node, config, *, store: ArtifactStore, ctx: StageContext, inputs: dict[str, Any]) -> dict:
    """Call the node's stage: the eval stage takes its policies as one dict."""
    module = STAGES[node.stage]
    kwargs = dict(inputs)
    if node.stage in ("rl", "eval"):  # their reward functions as one dict, by label
        kwargs["reward_fns"] = {role.removeprefix(REWARD_FN_ROLE_PREFIX): kwargs.pop(role)
                                for role in list(kwargs) if role.startswith(REWARD_FN_ROLE_PREFIX)}  # fmt: skip
    if node.stage == "eval":
        kwargs["policies"] = {role.removeprefix(POLICY_ROLE_PREFIX): kwargs.pop(role)
                              for role in list(kwargs) if role.startswith(POLICY_ROLE_PREFIX)}  # fmt: skip
    return module.run(config, store=store, ctx=ctx, **kwargs)


# log_prints stays off: libraries print to stdout internally (dill disassembles functions while hashing them).
@flow(name="rlhf", persist_result=False, log_prints=False)
def rlhf(
    preset: str = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    store: str | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    inputs: dict[str, str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The whole RLHF pipeline as a DAG; see `rlhf run --help` for the meaning of each parameter.

    A user's mistake found anywhere in the run (config, data, inputs, resources, a missed quality gate) ends the
    flow Failed with that one-line message and re-raises it to the caller; no traceback is logged, nothing retried.
    """
    try:
        return _pipeline(dict(preset=preset, config_file=config_file, overrides=overrides, store=store,
                              from_stage=from_stage, only=only, inputs=inputs, force=force))  # fmt: skip
    except USER_ERRORS as e:
        return _user_failure(e)


# The plan `run_pipeline` made, for the flow it calls: the flow then plans nothing again.
_PLANNED: ContextVar[RunPlan | None] = ContextVar("rlhf_planned_run", default=None)


def flow_params(params: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters as the flow run records them (Prefect stores and shows them): the store URI and the
    --set overrides with their credentials masked. The flow connects with the planned store's real URI."""
    return {**params, "store": None if params["store"] is None else redact_credentials(params["store"]),
            "overrides": [redact_credentials(o) for o in params["overrides"]]}  # fmt: skip


def _pipeline(params: dict[str, Any]) -> dict[str, Any]:
    logger = get_run_logger()
    flow_start = time.perf_counter()
    plan = _PLANNED.get()
    if plan is None or flow_params(plan.params) != flow_params(run_params(params)):  # called directly (a deployment)
        plan = plan_run(params, resolve_inputs=False)
    cfg, art_store, stages = plan.cfg, plan.store, list(plan.stages)
    ray_driver = RayDriver(cfg.run.ray_address, art_store.root, cfg.run.work_dir,
                           check=lambda resources: check_fits(cfg, resources, stages))  # fmt: skip
    tracker = Tracker(cfg.tracking, warn=logger.warning, store_root=art_store.root)
    tracker.start_pipeline(_run_name(), params=cfg.to_dict(),
                           tags={"preset": plan.params["preset"], "store": art_store.root, "stages": ",".join(stages)})  # fmt: skip
    status = "FAILED"
    try:
        produced: dict[str, Any] = {}  # output name -> Artifact, as the DAG proceeds
        summary: dict[str, Any] = {"store": art_store.root, "stages": {}, "skipped": dict(plan.skipped)}
        if "reward" in plan.skipped:
            logger.info(f"reward: not run; {plan.skipped['reward']}")
        if "pretrain" in plan.skipped:
            ref = _raise_failed(model_task("sft.base_model", cfg.sft.base_model, "causal-lm", art_store))
            produced["base-model"] = art_store.get(ref)
            logger.info(f"pretrain: not run; sft starts from {cfg.sft.base_model} ({ref})")
        sources = _FlowSources(plan)
        for group in schedule.groups(plan.nodes, stages, plan.only):
            for wave in schedule.waves(cfg, group, ray_driver.resources):
                runs = {}
                for name in wave:
                    node = plan.node(name)
                    arts = resolve_inputs(cfg, art_store, node, plan.inputs, produced, sources)
                    refs = {role: _ref(art) for role, art in arts.items()}
                    task_obj = _stage_task_for(node, art_store, refs)
                    future = task_obj.submit(name, node, cfg, art_store, ray_driver, refs, name in plan.forced)
                    runs[name] = (future, refs, time.perf_counter())
                for future, _, _ in runs.values():
                    future.wait()
                for name, (future, refs, task_start) in runs.items():
                    state = future.state
                    outputs = state.result()  # re-raises the stage's error after retries (a user error: at once)
                    made = {o: art_store.get(r) for o, r in outputs.items()}
                    produced.update({art.name: art for art in made.values()})
                    tracker.log_stage(name, state=state.name, config=cfg.stage_config(name).to_dict(), outputs=made,
                                      inputs={role: art_store.get(r) for role, r in refs.items()})  # fmt: skip
                    summary["stages"][name] = {
                        "state": state.name,
                        "outputs": outputs,
                        "inputs": refs,
                        "task_seconds": round(time.perf_counter() - task_start, 2),
                        "stage_seconds": 0.0 if state.name == "Cached" else _stage_seconds(made),
                    }
        summary["wall_seconds"] = round(time.perf_counter() - flow_start, 2)
        stage_total = sum(info["stage_seconds"] for info in summary["stages"].values())
        summary["orchestration_overhead_seconds"] = round(summary["wall_seconds"] - stage_total, 2)
        report.pipeline_summary(art_store, summary)
        logger.info(report.summary_line(summary))
        status = "FINISHED"
        if tracker.enabled:
            summary["tracking"] = {"uri": tracker.uri, "run_id": tracker.parent_run_id}
        return summary
    finally:
        tracker.end(status)
        ray_driver.close()


class _FlowSources(InputSources):
    """A node's data sets and config models as Prefect tasks (each a task run in the UI); a data set the cache
    answer ingested in this process is taken from the plan."""

    def __init__(self, plan: RunPlan):
        super().__init__(plan.cfg, plan.store)
        self.plan = plan

    def data(self, node: Node, role: str, fmt: str, models: dict[str, Any]):
        known = self.plan.ingested.get((node.name, role))
        models = {r: a for r, a in models.items() if not isinstance(a, str)}  # an unresolved ref: no check here
        ref = _raise_failed(data_task(self.cfg, self.store, fmt, node, role, models, known.ref if known else None))
        return self.store.get(ref)

    def explicit(self, node: Node, role: str, ref: str):
        """A ref as given when it does not resolve: the stage's task reports it (a Failed task run of its own)."""
        try:
            return super().explicit(node, role, ref)
        except ArtifactError:
            return ref

    def model(self, node: Node, role: str, value: str):
        from flows.nodes import config_model_key, config_model_kind

        ref = _raise_failed(model_task(config_model_key(node, role), value, config_model_kind(node, role), self.store))
        return self.store.get(ref)


def _stage_task_for(node: Node, store: ArtifactStore, input_refs: dict[str, str]):
    """`stage_task` as the Prefect task that materializes the node's outputs from its inputs (Prefect assets)."""
    return assets.materializing(stage_task, STAGE_TASK_OPTIONS, store.root, node.outputs,
                                [assets.ref_name(r) for r in input_refs.values()])  # fmt: skip


def _ref(art) -> str:
    return art if isinstance(art, str) else art.ref


def _raise_failed(value):
    """A task called directly hands back the Failed state a user error became: raise that error here, so the flow
    ends Failed with its one line instead of passing the failed state on as the next task's input (which leaves
    that task Pending and the flow with Prefect's UnfinishedRun)."""
    from prefect.states import State

    return value.result() if isinstance(value, State) else value


def _run_name() -> str:
    """The Prefect flow run's name (e.g. 'sophisticated-kakapo'), so MLflow and Prefect name a run the same way."""
    from prefect.runtime import flow_run

    return flow_run.name or "rlhf"


def _stage_seconds(outputs: dict[str, Any]) -> float:
    """The stage's own wall time, as it recorded in its artifacts' timings (the longest of its outputs)."""
    return round(max(art.manifest.get("timings", {}).get("wall_seconds", 0.0) for art in outputs.values()), 2)


def run_pipeline(plan: RunPlan | None = None, **params: Any) -> dict[str, Any]:
    """The flow for a plan made by `plan_run` (which checked everything cheap, so a user mistake cost no Prefect
    start-up); the flow takes the plan as it is. Given parameters instead, plans them first."""
    plan = plan if plan is not None else plan_run(params)
    token = _PLANNED.set(plan)
    try:
        return rlhf(**flow_params(plan.params))
    finally:
        _PLANNED.reset(token)


__all__ = ["rlhf", "run_pipeline", "plan_stages", "preflight", "stage_cache_key"]
