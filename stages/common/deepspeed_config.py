"""The one DeepSpeed config builder every stage uses (pretrain's engine, the TRL stages' Trainer, PPO's actors).

Device-correct by construction: the optimizer is always torch's AdamW (`torch_adam: true`), so DeepSpeed never
JIT-compiles FusedAdam or CPU Adam on a node. That build needs nvcc and ninja on every worker and fails outright
on images whose TORCH_CUDA_ARCH_LIST has a suffix such as `9.0a`. On CUDA, torch's own fused AdamW kernel (shipped
in the torch wheel, nothing to compile) does the step.

Values may be the HF Trainer's "auto" placeholders, which transformers fills in from its TrainingArguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]
Auto = Literal["auto"]

# Optimizer types DeepSpeed would build from its own compiled kernels; no config of ours may name one.
COMPILED_OPTIMIZERS = ("Adam", "AdamW", "OneBitAdam", "OneBitLamb", "Lamb", "Lion", "Adagrad", "ZeroOneAdam")


def native_cpu_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (x86 avx512_bf16 or AMX): there bf16 matmuls run about twice
    as fast as fp32 (ENVIRONMENT.md: 405 vs 185 GFLOP/s on 2 cores), where other CPUs emulate them slower than fp32.
    RLHF_CPU_BF16=0 or 1 overrides the detection (a CPU the flags miss, or fp32 forced)."""
    forced = os.environ.get("RLHF_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no detection, fp32 stays the CPU precision
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def forbid_cpu_shm_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory CPU allreduce (`deepspeed_shm_comm`) on this node.

    On CPU, DeepSpeed's comm backend JIT-builds that op with the node's C++ compiler when a process group starts
    (pretrain workers, PPO's trainable roles). A node without a compiler cannot start. A build killed midway also
    leaves a lock in ~/.cache/torch_extensions, and every later process then waits on it forever without a word:
    a killed test run hung the next run's PPO actors in `init_engine` that way. gloo does the same allreduce
    without it. DeepSpeed keeps this table in one dict for edits like this one. Call before DeepSpeed starts its
    process group. Nothing changes on GPU, where the op is not built.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def resolve_precision(precision: str, use_gpu: bool, where: str = "precision") -> Precision:
    """'auto' means bf16 on GPU and fp32 on CPU; half precision without a GPU is refused (ValueError naming `where`)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"{where}: {precision!r} needs a GPU (run.use_gpu=true); use 'fp32' or 'auto' on CPU")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"{where}: expected one of auto, fp32, bf16, fp16, found {precision!r}")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class AdamW:
    """torch.optim.AdamW as DeepSpeed's optimizer (None of these fields needs a compiled op)."""

    lr: float | Auto = "auto"
    betas: tuple[float, float] | Auto = "auto"
    eps: float | Auto = "auto"
    weight_decay: float | Auto = "auto"
    fused: bool = False  # torch's fused CUDA kernel; set from use_gpu by the builder

    def to_json(self) -> dict[str, Any]:
        params: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay, "torch_adam": True}
        if self.betas != "auto":
            params["betas"] = list(self.betas)
        if self.eps != "auto":
            params["eps"] = self.eps
        if self.fused:
            params["fused"] = True
        return {"type": "AdamW", "params": params}


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to the peak rate, then cosine decay to `min_ratio` of it at `total_steps`."""

    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": self.total_steps,
                "warmup_num_steps": self.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": self.min_ratio,
                "warmup_type": "linear",
            },
        }


def build(
    *,
    zero_stage: int,
    precision: Precision,
    use_gpu: bool,
    micro_batch_size: int | Auto,
    grad_accum: int | Auto = 1,
    grad_clip: float | Auto = 1.0,
    optimizer: AdamW | None = None,
    scheduler: WarmupCosine | None = None,
    offload_optimizer: bool = False,
    train_batch_size: int | Auto | None = None,
    check_grad_overflow: bool = False,
) -> dict[str, Any]:
    """A DeepSpeed JSON config. `optimizer=None` means the caller hands DeepSpeed a torch optimizer itself.

    `check_grad_overflow` (bf16 only; fp16 always checks, its loss scale needs it): DeepSpeed's default scans every
    gradient for inf/NaN each step, a host sync per parameter group per step, which bf16 (fp32's exponent range)
    does not need to skip steps. Off by default; the training loops check the loss for NaN at their logging
    interval instead (pretrain: train_loop.flush)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be resolved first (fp32, bf16 or fp16), found {precision!r}")
    if precision != "fp32" and not use_gpu and not (precision == "bf16" and native_cpu_bf16()):
        raise ValueError(f"precision {precision!r} needs a GPU (or, for bf16, a CPU with native bf16)")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        # torch's AdamW steps on the CPU copy; DeepSpeed would otherwise insist on building its CPU Adam
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # a final HF save needs the full weights
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # progress lines are ours, not DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"]["check_grad_overflow"] = check_grad_overflow
    if offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    if train_batch_size is not None:
        config["train_batch_size"] = train_batch_size
    if optimizer is not None:
        if use_gpu and not offload_optimizer:
            optimizer = AdamW(optimizer.lr, optimizer.betas, optimizer.eps, optimizer.weight_decay, fused=True)
        config["optimizer"] = optimizer.to_json()
    if scheduler is not None:
        config["scheduler"] = scheduler.to_json()
    return config


def needs_compiled_op(config: dict[str, Any]) -> bool:
    """True if DeepSpeed would JIT-build a kernel for this config (an optimizer of its own without torch_adam)."""
    opt = config.get("optimizer")
    if not opt:
        return False
    return opt.get("type") in COMPILED_OPTIMIZERS and not opt.get("params", {}).get("torch_adam", False)
