"""Pure math of the pretraining stage's numbers: unigram baseline, perplexity, FLOPs per token, MFU, and the peak
FLOP/s that MFU divides by (a table of dense peaks per GPU model, or a measured matmul where the table has no row).

Only torch is imported, so these are unit-tested with hand-computed values and no Ray or DeepSpeed.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

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
    """Training FLOPs per token: 6N for the weights (forward + backward) plus 12·L·d·T for attention scores.

    `n_embd` is the attention width (heads x head size), which is the model width for GPT-2 and Llama.
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * context


def transformer_dims(model_config: Any) -> tuple[int, int]:
    """(layers, attention width) of a Hugging Face decoder config, whatever its family calls them.

    GPT-2 says n_layer/n_embd, Llama/Qwen2/GPT-NeoX say num_hidden_layers/hidden_size (GPT2Config maps the latter
    names onto the former); the attention width is heads x head_dim, which differs from hidden_size in some families.
    """
    n_layer = int(model_config.num_hidden_layers)
    hidden = int(model_config.hidden_size)
    n_head = int(model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or hidden // n_head
    return n_layer, n_head * int(head_dim)


def model_flops_per_token(model_config: Any, n_params: int, context: int) -> float:
    """gpt_flops_per_token with the layer count and attention width read from any HF causal-LM config."""
    n_layer, width = transformer_dims(model_config)
    return gpt_flops_per_token(n_params, n_layer, width, context)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak (both for the same set of workers)."""
    return tokens_per_second * flops_per_token / peak_flops if peak_flops > 0 else 0.0


# ------------------------------------------------------------------------------------------------- peak FLOP/s

# Dense (no 2:4 sparsity) tensor-core peaks per GPU from the vendors' data sheets, in FLOP/s. "fp32" is the plain
# FP32 rate: TF32 is not counted, so a run that lets matmuls use TF32 can exceed 100% against it. bf16/fp16 are with
# FP32 accumulation. A precision missing from a row falls back to a measured matmul.
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67.0e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp16": 756.0e12, "fp32": 51.0e12},
    "H100 NVL": {"bf16": 835.0e12, "fp16": 835.0e12, "fp32": 60.0e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 60.0e12},  # the PCIe card: 1671 TFLOP/s sparse
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67.0e12},
    "GH200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 67.0e12},
    "B200": {"bf16": 2.25e15, "fp16": 2.25e15},
    "A100": {"bf16": 312.0e12, "fp16": 312.0e12, "fp32": 19.5e12},
    "A10": {"bf16": 125.0e12, "fp16": 125.0e12, "fp32": 31.2e12},
    # AWS's A10G has no NVIDIA data sheet; 70 TFLOPS tensor / 35 TFLOPS FP32 are the figures AWS-side sources give
    "A10G": {"bf16": 70.0e12, "fp16": 70.0e12, "fp32": 35.0e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "fp32": 91.6e12},
    "L40": {"bf16": 181.05e12, "fp16": 181.05e12, "fp32": 90.5e12},
    "L4": {"bf16": 121.0e12, "fp16": 121.0e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12},
}

# torch.cuda.get_device_name() -> table row; first match wins, so the more specific patterns come first
# (GH200 before H200, the H100 variants before plain H100, which is the SXM part: "NVIDIA H100 80GB HBM3").
_GPU_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bB200\b", "B200"),
    (r"\bA100\b", "A100"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"\bRTX 4090\b(?! D)", "RTX 4090"),  # the 4090 D is a cut-down part
]

PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def gpu_model(device_name: str) -> str | None:
    """The peak table's row for a CUDA device name, or None for a GPU the table does not know."""
    for pattern, model in _GPU_NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return model
    return None


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense data-sheet peak FLOP/s of one GPU for 'bf16' | 'fp16' | 'fp32', or None when the table has no entry."""
    model = gpu_model(device_name)
    return GPU_PEAK_FLOPS.get(model, {}).get(precision) if model else None


def peak_flops(dtype: torch.dtype, device: torch.device | str, configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of this worker, where it came from: 'config' | 'table' | 'measured').

    A configured value wins; on CUDA the data-sheet table by device name; otherwise a measured matmul (CPUs have
    no useful data-sheet number, and an unknown GPU is better measured than guessed).
    """
    if configured:
        return float(configured), "config"
    device = torch.device(device)
    if device.type == "cuda":
        table = table_peak_flops(torch.cuda.get_device_name(device), PRECISIONS[dtype])
        if table is not None:
            return table, "table"
        return cuda_matmul_peak_flops(dtype, device=device), "measured"
    return matmul_peak_flops(dtype, device=str(device)), "measured"


def cuda_matmul_peak_flops(
    dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 10, device: torch.device | str = "cuda"
) -> float:
    """Best-of-`repeats` FLOP/s of an n^3 matmul timed with CUDA events (big enough to reach the tensor-core rate)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best_ms = math.inf
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best_ms = min(best_ms, start.elapsed_time(end))
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n**3 / (best_ms / 1e3)


def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 8, device: str = "cpu"
) -> float:
    """Measured square-matmul FLOP/s with this process's torch threads: the practical CPU peak MFU is measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):  # best of several: the peak, not the mean under other processes' noise
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
