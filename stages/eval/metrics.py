"""The eval stage's math as pure functions over tensors and lists: sequence KL, means, pairwise win rates.

Only torch is imported, so these are unit-tested with hand-computed values and no model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sequence_kl(model_logprobs: torch.Tensor, sft_logprobs: torch.Tensor, reply_mask: torch.Tensor) -> torch.Tensor:
    """Per-reply KL estimate to the SFT model: sum over reply tokens of log p_model - log p_sft. [B, T] x3 -> [B].

    On the model's own samples this is an unbiased estimate of KL(model || sft) for each prompt (the k1 estimator
    PPO reports); padding after the reply (mask 0) contributes nothing, whatever values it holds.
    """
    mask = reply_mask.to(model_logprobs.dtype)
    return ((model_logprobs - sft_logprobs) * mask).sum(-1)


def mean_sequence_kl(model_logprobs: torch.Tensor, sft_logprobs: torch.Tensor, reply_mask: torch.Tensor) -> float:
    """`sequence_kl` averaged over replies: the model's KL to the SFT model in nats per reply."""
    return float(sequence_kl(model_logprobs, sft_logprobs, reply_mask).mean())


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean, None for no values (a metric that does not apply reads as missing, not 0)."""
    return sum(values) / len(values) if values else None


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of paired samples (same prompt, same sample index) where a scores above b; a tie counts half."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"win_rate: expected two equally long, non-empty score lists, found {len(scores_a)} and "
                         f"{len(scores_b)}")  # fmt: skip
    points = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b, strict=True)]
    return sum(points) / len(points)


def win_rate_matrix(scores: dict[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """matrix[a][b] = win_rate(a over b) for every ordered pair; the diagonal is 0.5 and matrix[a][b] + matrix[b][a]
    is 1, because ties count half for both sides."""
    return {a: {b: win_rate(scores[a], scores[b]) for b in scores} for a in scores}
