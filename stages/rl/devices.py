"""What an RL actor computes in and talks over: the precision of all four roles and the process-group backend.

All four roles load in the dtype the trained roles compute in, so the frozen reference and reward model take no
more memory than the policy and the KL compares like with like. DeepSpeed casts the trainable modules to bf16 itself
and keeps the fp32 master copy in its optimizer, built from the bf16 weights; loading them in bf16 loses nothing.
"""

from __future__ import annotations

import torch

from stages.common.deepspeed_config import Precision, native_cpu_bf16
from stages.common.errors import StageInputError


def rl_precision(bf16: bool, use_gpu: bool, section: str = "ppo") -> Precision:
    """'bf16' when `<section>.bf16` (ppo, grpo, rloo), else 'fp32'. On CPU bf16 needs native bf16 (`native_cpu_bf16`): elsewhere it is
    emulated, slower than fp32, and refused with one line."""
    if bf16 and not use_gpu and not native_cpu_bf16():
        raise StageInputError(
            f"{section}.bf16: true needs a GPU (run.use_gpu=true) or a CPU with native bf16 (avx512_bf16 or AMX); "
            f"set {section}.bf16=false on this CPU"
        )
    return "bf16" if bf16 else "fp32"


def model_dtype(precision: str) -> torch.dtype:
    """The dtype every role's weights are loaded in for a resolved precision."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in dtypes:
        raise ValueError(f"precision: expected one of {sorted(dtypes)}, found {precision!r}")
    return dtypes[precision]


def dist_backend(device: torch.device) -> str:
    """NCCL for a CUDA actor, gloo for a CPU one (the trainable roles' process groups)."""
    return "nccl" if device.type == "cuda" else "gloo"
