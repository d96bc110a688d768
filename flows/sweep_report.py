"""What a sweep publishes: the `sweep-report` artifact (report.json and report.md; objective.png beside them in its
reports) whose lineage names every trial's artifacts, and, with `--promote`, the `@best` alias of the best trial's.

The report holds no times or Tune ids, so a rerun whose trials were all cached publishes the same version again.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

REPORT_NAME = "sweep-report"
BEST_ALIAS = "best"


def trial_rows(results: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per trial from Tune's results ({"point", "metrics", "error"}), ordered by the swept values."""
    rows = []
    for res in results:
        metrics = res.get("metrics") or {}
        state = metrics.get("state") or ("error" if res.get("error") else "stopped")
        value = metrics.get("objective") if state == "done" else None
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        rows.append({
            "point": {k: res["point"][k] for k in keys},
            "state": state,  # done, failed (a user error: a missed gate), stopped (by ASHA), error
            "objective": value,
            "outputs": json.loads(metrics.get("outputs") or "{}"),
            "ran": json.loads(metrics.get("ran") or "[]"),
            "error": metrics.get("error") or res.get("error") or "",
            "tracking_run": metrics.get("tracking_run") or "",
        })
    rows.sort(key=lambda r: [_order(r["point"][k]) for k in keys])
    for i, row in enumerate(rows, 1):
        row["trial"] = i
    return rows


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, int | float) and not isinstance(value, bool) else (1, 0, json.dumps(value))


def build(space: dict, objective, rows: list[dict], upstream: dict[str, dict]) -> dict[str, Any]:
    best = objective.best([(r, r["objective"]) for r in rows if r["objective"] is not None])
    return {
        "space": space,
        "objective": {"metric": objective.label, "mode": objective.mode},
        "upstream": upstream,  # the shared stages' outputs, run once for every trial
        "trials": [{k: v for k, v in r.items() if k not in ("ran", "tracking_run")} for r in rows],
        "best": None if best is None else {"trial": best["trial"], "point": best["point"], "objective": best["objective"]},
    }


def markdown(report: dict) -> str:
    keys = [d["key"] for d in report["space"]["dimensions"]]
    label = report["objective"]["metric"]
    out = [f"# Sweep: {label} ({report['objective']['mode']})", "",
           "| trial | " + " | ".join(keys) + f" | {label} | state | outputs |",
           "|---" * (len(keys) + 4) + "|"]  # fmt: skip
    for t in report["trials"]:
        value = "n/a" if t["objective"] is None else f"{t['objective']:.4g}"
        refs = ", ".join(ref for outputs in t["outputs"].values() for _, ref in sorted(outputs.items()))
        mark = " **best**" if report["best"] and report["best"]["trial"] == t["trial"] else ""
        out.append(f"| {t['trial']}{mark} | " + " | ".join(json.dumps(t["point"][k]) for k in keys)
                   + f" | {value} | {t['state']} | {refs} |")  # fmt: skip
    failed = [t for t in report["trials"] if t["error"]]
    if failed:
        out += ["", "## Trials that did not finish", ""] + [f"- trial {t['trial']}: {t['error']}" for t in failed]
    if report["upstream"]:
        # sorted: a flow's summary and the cache answer list a node's outputs in different orders
        shared = ", ".join(sorted(ref for outputs in report["upstream"].values() for ref in outputs.values()))
        out += ["", f"Shared by every trial (run once): {shared}"]
    return "\n".join(out) + "\n"


def write_plot(report: dict, path: Path) -> None:
    """objective.png: the objective against each swept value (one panel per key; a log axis for a log range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = report["space"]["dimensions"]
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        done = [t for t in report["trials"] if t["objective"] is not None]
        xs = [t["point"][dim["key"]] for t in done]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
        positions = xs if numeric else [json.dumps(x) for x in xs]
        ax.plot(positions, [t["objective"] for t in done], "o", markersize=7)
        if numeric and dim["kind"] in ("grid", "choice", "loguniform") and xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(dim["key"])
        ax.set_ylabel(report["objective"]["metric"])
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep: {report['objective']['metric']} ({report['objective']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def publish(store, report: dict, rows: list[dict], config: dict):
    """The sweep-report artifact; its inputs: every output of every trial's branch (`trial<N>_<output>`)."""
    inputs = {f"trial{r['trial']}_{out}": store.get(ref)
              for r in rows for outputs in r["outputs"].values() for out, ref in outputs.items()}  # fmt: skip
    metrics = {f"trial{t['trial']}.objective": t["objective"] for t in report["trials"] if t["objective"] is not None}
    if report["best"]:
        metrics["best.objective"] = report["best"]["objective"]
        metrics["best.trial"] = report["best"]["trial"]
    with tempfile.TemporaryDirectory(prefix="rlhf-sweep-") as tmp:
        content, reports = Path(tmp) / "report", Path(tmp) / "reports"
        content.mkdir()
        reports.mkdir()
        (content / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        (content / "report.md").write_text(markdown(report))
        write_plot(report, reports / "objective.png")  # outside the digest: a plot library's bytes may vary
        return store.publish(content, reports=reports, name=REPORT_NAME, kind="sweep-report", stage="sweep",
                             config=config, inputs=inputs, metrics=metrics)  # fmt: skip


def promote(store, best: dict, report_ref: str) -> list[str]:
    """Point NAME@best at each artifact the best trial's branch published; the refs it set."""
    done = []
    for outputs in best["outputs"].values():
        for ref in outputs.values():
            art = store.get(ref)
            store.set_alias(art.name, art.version, BEST_ALIAS, note=f"best trial {best['trial']} of {report_ref}")
            done.append(f"{art.name}@{BEST_ALIAS} -> {art.ref}")
    return done
