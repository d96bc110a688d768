"""Reward-model metrics as plain tensor functions (hand-checked in tests/test_reward.py)."""

from __future__ import annotations

import torch


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen reply scores strictly higher. chosen, rejected: (N,)."""
    return (chosen > rejected).float().mean().item()


def mean_margin(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Mean of r_chosen - r_rejected over the pairs. chosen, rejected: (N,)."""
    return (chosen - rejected).float().mean().item()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors; 0.0 when either is constant (no linear relation to measure)."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(), y - y.mean()
    denom = torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    return (xc * yc).sum().div(denom).item() if denom > 0 else 0.0
