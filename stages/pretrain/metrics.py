"""Pure math of the pretraining stage's numbers: unigram baseline, perplexity, FLOPs per token, MFU, matmul peak.

Only torch is imported, so these are unit-tested with hand-computed values and no Ray or DeepSpeed.
"""

from __future__ import annotations

import math
import time

import torch


def unigram_log_probs(train_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities from training token ids: log((count + 1) / (N + V)), shape (V,)."""
    counts = torch.bincount(train_tokens.reshape(-1).long(), minlength=vocab_size).double()
    return torch.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_perplexity(train_tokens: torch.Tensor, eval_targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of `eval_targets` under the add-one unigram model of `train_tokens`: the no-context baseline."""
    log_probs = unigram_log_probs(train_tokens, vocab_size)
    return math.exp(-log_probs[eval_targets.reshape(-1).long()].mean().item())


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per token), capped so a diverged run reports inf instead of overflowing."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def gpt_flops_per_token(n_params: int, n_layer: int, n_embd: int, context: int) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus 12·L·d·T for attention scores."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * context


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak (both for the same set of workers)."""
    return tokens_per_second * flops_per_token / peak_flops if peak_flops > 0 else 0.0


def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 8, device: str = "cpu"
) -> float:
    """Measured square-matmul FLOP/s with this process's torch threads: the practical peak MFU is measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    for _ in range(repeats):  # best of several: the peak, not the mean under other processes' noise
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
