"""What the flow shows in the Prefect UI and on the terminal: per-stage markdown and tables, the pipeline summary."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stages.common.store import Artifact, ArtifactStore

PLOT_NAMES = ("loss_curve.png", "curves.png")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(art: Artifact) -> list[str]:
    """Curves saved inside an artifact, inlined as data URIs so the UI shows them without a file server."""
    out = []
    for name in PLOT_NAMES:
        path = Path(art.reports_path or art.path) / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f"![{art.name} {name}](data:image/png;base64,{data})")
    return out


def stage_markdown(
    stage: str, action: str, outputs: dict[str, Artifact], inputs: dict[str, Artifact], wall_seconds: float
) -> None:
    """A markdown artifact (what ran or was reused, refs, metrics, curves) and a metrics table, per stage."""
    lines = [f"# {stage}: {action}", ""]
    for role, art in inputs.items():
        lines.append(f"- input `{role}`: `{art.ref}` ({art.digest[:12]})")
    for out, art in outputs.items():
        lines.append(f"- output `{out}`: `{art.ref}` ({art.digest[:12]})")
    lines.append(f"- wall time: {wall_seconds:.1f} s" + (" (reused, nothing ran)" if action == "reused" else ""))
    rows = []
    for art in outputs.values():
        for key, value in sorted(art.metrics.items()):
            rows.append({"artifact": art.ref, "metric": key, "value": _fmt(value)})
        lines += _plots(art)
    if rows:
        lines += ["", "| artifact | metric | value |", "|---|---|---|"]
        lines += [f"| {r['artifact']} | {r['metric']} | {r['value']} |" for r in rows]
        create_table_artifact(table=rows, key=f"{stage}-metrics", description=f"{stage} metrics")
    create_markdown_artifact(markdown="\n".join(lines), key=f"{stage}-stage", description=f"{stage} {action}")


def _lineage_lines(node: dict[str, Any], role: str | None, indent: str) -> list[str]:
    label = f"{role}: " if role else ""
    lines = [f"{indent}- {label}`{node['ref']}` ({node['kind']})"]
    for child_role, child in sorted(node.get("inputs", {}).items()):
        lines += _lineage_lines(child, child_role, indent + "  ")
    return lines


def pipeline_summary(store: ArtifactStore, summary: dict[str, Any]) -> None:
    """The end-of-run page: what ran or was reused, the final policy's lineage, before/after PPO, all curves."""
    lines = ["# RLHF pipeline", "", "| stage | state | outputs |", "|---|---|---|"]
    for name, info in summary["stages"].items():
        lines.append(f"| {name} | {info['state']} | {', '.join(info['outputs'].values())} |")
    lines.append(
        f"\nTotal wall time: {summary['wall_seconds']:.1f} s, of which orchestration (data ingest, cache checks, "
        f"Ray start-up, Prefect bookkeeping): {summary['orchestration_overhead_seconds']:.1f} s"
    )
    final = list(summary["stages"].values())[-1]["outputs"]
    for ref in final.values():
        lines += ["", f"## Lineage of `{ref}`", *_lineage_lines(store.lineage(ref), None, "")]
    policy_ref = summary["stages"].get("ppo", {}).get("outputs", {}).get("policy")
    if policy_ref:
        m = store.get(policy_ref).metrics
        lines += ["", "## PPO: before (SFT policy) and after", "| metric | before | after |", "|---|---|---|"]
        for key in ("rm_score", "gold_score"):
            if f"{key}_before" in m:
                lines.append(f"| {key} | {_fmt(m[f'{key}_before'])} | {_fmt(m[f'{key}_after'])} |")
        for key in ("gold_win_rate", "kl"):
            if key in m:
                lines.append(f"| {key} | | {_fmt(m[key])} |")
    for info in summary["stages"].values():
        for ref in info["outputs"].values():
            lines += _plots(store.get(ref))
    create_markdown_artifact(markdown="\n".join(lines), key="rlhf-summary", description="pipeline summary")


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{name}={info['state']}" for name, info in summary["stages"].items()]
    return (
        f"pipeline done in {summary['wall_seconds']:.1f} s "
        f"(orchestration overhead {summary['orchestration_overhead_seconds']:.1f} s): " + ", ".join(parts)
    )
