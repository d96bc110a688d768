"""Files written next to a trained model in its artifact: the Trainer log history as JSON lines and a loss curve."""

from __future__ import annotations

import json
from pathlib import Path


def write_metrics_jsonl(log_history: list[dict], path: str | Path) -> Path:
    """One JSON object per log entry (a Trainer log step, a PPO iteration), in order."""
    p = Path(path)
    p.write_text("".join(json.dumps(entry, sort_keys=True) + "\n" for entry in log_history))
    return p


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str) -> Path | None:
    """Training loss against step (PNG); None when nothing was logged (e.g. fewer steps than logging_steps)."""
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI boxes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
