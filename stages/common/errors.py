"""Errors shared by the stages."""

from __future__ import annotations


class StageInputError(ValueError):
    """Bad stage input or config found before any compute (corpus too small, sizes that cannot fit, ...).

    The message is one line naming what is wrong, where, what was expected and what was found.
    """


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite (bf16 runs without DeepSpeed's per-step overflow scan see it here)."""


def check_finite_loss(stage: str, step: int, loss: float) -> None:
    """Stop at a logged step whose loss is NaN or infinite, in one line naming the stage and the step."""
    import math

    if not math.isfinite(loss):
        raise TrainingDiverged(f"{stage}: the training loss is {loss} at step {step}: training diverged (lower "
                               f"{stage}.learning_rate or the gradient clip)")
