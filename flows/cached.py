"""What the store already holds for a planned run: the all-cached answer (`rlhf run` when nothing would run) and the
dry run (`rlhf run --dry-run`: per node, reused or run, and why). Neither starts Prefect or Ray."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.dag import Node
from flows.inputs import InputSources, import_name, resolve_inputs, resolve_model
from flows.keys import key_parts, why_run
from flows.nodes import config_model_key, config_model_kind

if TYPE_CHECKING:
    from flows.plan import RunPlan


class _PlanSources(InputSources):
    """Inputs resolved in this process, each ingested data set kept in the plan for the flow to reuse."""

    def __init__(self, plan: RunPlan):
        super().__init__(plan.cfg, plan.store)
        self.plan = plan

    def data(self, node: Node, role: str, fmt: str, models: dict[str, Any]):
        art = super().data(node, role, fmt, models)
        self.plan.ingested[(node.name, role)] = art
        return art


def answer_from_cache(plan: RunPlan) -> dict[str, Any] | None:
    """If nothing would run, the run's summary from the store (no Prefect, no Ray); else None."""
    if plan.params["force"] or plan.params["from_stage"]:
        return None
    return all_cached(plan)


def all_cached(plan: RunPlan) -> dict[str, Any] | None:
    """The run's summary if every stage would be reused (gates checked), else None: then the flow must run.

    Ingesting the data here publishes nothing new when the data is unchanged; when it changed, the new dataset
    version is exactly what the flow would publish first anyway (and the flow takes it from `plan.ingested`).
    """
    from stages.common.gates import check_gate

    start = time.perf_counter()
    cfg, store = plan.cfg, plan.store
    produced: dict[str, Any] = {}
    summary: dict[str, Any] = {"store": store.root, "stages": {}, "skipped": dict(plan.skipped), "prefect": "not started"}
    if "pretrain" in plan.skipped:
        produced["base-model"] = resolve_model(store, cfg.sft.base_model, "causal-lm", "sft.base_model")
    sources = _PlanSources(plan)
    for name in plan.stages:
        node = plan.node(name)
        arts = resolve_inputs(cfg, store, node, plan.inputs, produced, sources)
        hit = store.cached(key_parts(name, cfg, arts, node.stage).key)
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


class _DrySources(InputSources):
    """Inputs as a run would resolve them, publishing nothing to the run's store: data sets and reward functions go
    to a scratch in-memory store (the same content gives the same digest), a config-named local model directory
    counts only if the store already holds its files (else it is unknown: the run would import it)."""

    def __init__(self, plan: RunPlan, scratch):
        super().__init__(plan.cfg, scratch)
        self.real = plan.store

    def data(self, node: Node, role: str, fmt: str, models: dict[str, Any]):
        from flows.inputs import ingest_data

        return ingest_data(self.cfg, self.store, fmt)

    def model(self, node: Node, role: str, value: str):
        return _known_model(self.real, value, config_model_kind(node, role), config_model_key(node, role))


def _known_model(store, value: str, kind: str, where: str):
    """A config-named model as the run would resolve it, or None when it is a local directory not in the store."""
    path = Path(value).expanduser()
    if path.is_dir():
        return store.find_identical(import_name(value), path)
    return resolve_model(store, value, kind, where)


def dry_run(plan: RunPlan) -> dict[str, Any]:
    """Per node of the plan: "reuse" (its key has verified artifacts) or "run", with the reasons (`why_run`: forced,
    an input from a node that runs first, code / config / input changed since its latest cache record, no earlier
    result). Publishes nothing to the run's store."""
    from stages.common.gates import GateFailed, check_gate
    from stages.common.store import ArtifactStore

    cfg, store = plan.cfg, plan.store
    scratch = ArtifactStore(f"memory://rlhf-dry-run-{uuid.uuid4().hex}")
    sources = _DrySources(plan, scratch)
    producer = {out: name for name in plan.stages for out in plan.node(name).outputs}
    produced: dict[str, Any] = {}
    if "pretrain" in plan.skipped:
        produced["base-model"] = _known_model(store, cfg.sft.base_model, "causal-lm", "sft.base_model")
    report: dict[str, Any] = {"dry_run": True, "store": store.root, "skipped": dict(plan.skipped), "nodes": []}
    try:
        for name in plan.stages:
            node = plan.node(name)
            arts = resolve_inputs(cfg, store, node, plan.inputs, produced, sources)
            parts = key_parts(name, cfg, arts, node.stage)
            forced = plan.forced_by(name)
            hit = store.cached(parts.key) if parts.key and not forced else None
            entry = {"name": name, "cache_key": parts.key, "inputs": {r: _ref(store, a) for r, a in arts.items()}}
            if hit is not None:
                entry.update(action="reuse", reasons=["cache key matches"], outputs={o: a.ref for o, a in hit.items()})
                try:
                    check_gate(name, getattr(cfg.stage_config(name), "gate", None), hit)
                except GateFailed as e:  # a run would stop here
                    entry["reasons"].append(f"its quality gate fails, so a run stops here ({e})")
                produced.update({a.name: a for a in hit.values()})
            else:
                pending = {r: producer.get(node.inputs[r][1], "?") for r, a in arts.items() if a is None
                           and node.inputs[r][0] == "output"}  # fmt: skip
                unknown = [r for r, a in arts.items() if a is None and r not in pending]
                previous = store.latest_cache_record(name)
                reasons = why_run(parts, previous["parts"] if previous else None, forced=forced, pending=pending)
                reasons += [f"input {r} is a new import ({config_model_key(node, r)})" for r in unknown]
                entry.update(action="run", reasons=reasons, outputs={})
                produced.update({out: None for out in node.outputs})
            report["nodes"].append(entry)
    finally:
        _remove(scratch)
    return report


def _ref(store, art) -> str | None:
    """An input's ref in the run's store; a data set or function file not published yet is "NAME (new version)"."""
    if art is None:
        return None
    match = [m for m in store.list(art.name) if m["digest"] == art.digest]
    return f"{art.name}@v{match[-1]['version']}" if match else f"{art.name} (new version)"


def _remove(scratch) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(scratch.root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def dry_run_text(report: dict[str, Any]) -> str:
    """`rlhf run --dry-run` on the terminal: one line per node, reuse or run, and why."""
    from stages.common.redact import redact_credentials

    lines = [f"dry run (nothing started, nothing published; store: {redact_credentials(report['store'])})"]
    for name, reason in report["skipped"].items():
        lines.append(f"  {name:<8} {'skip':<6} {reason}")
    for node in report["nodes"]:
        why = "; ".join(node["reasons"])
        if node["action"] == "reuse":
            why = f"{why} ({', '.join(node['outputs'].values())})"
        lines.append(f"  {node['name']:<8} {node['action']:<6} {why}")
    runs = sum(n["action"] == "run" for n in report["nodes"])
    lines.append(f"{runs} to run, {len(report['nodes']) - runs} to reuse")
    return "\n".join(lines)
