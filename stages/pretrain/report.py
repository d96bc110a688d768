"""The loss curve saved next to the published model (the orchestration shows it)."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(history: list[dict], out: str | Path, unigram_loss: float | None = None) -> Path:
    """Train loss per step, validation loss at each eval, and the unigram baseline as a line; PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers/CI
    import matplotlib.pyplot as plt

    steps = [r for r in history if "loss" in r]
    evals = [r for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val loss")
    if unigram_loss is not None:
        ax.axhline(unigram_loss, color="grey", ls="--", lw=1, label="unigram baseline")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
