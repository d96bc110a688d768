"""Collectives on plain Python numbers, with the tensor on the device the process group's backend requires.

NCCL only takes CUDA tensors (`dist.all_reduce` on a CPU tensor raises "No backend type associated with device type
cpu"); gloo takes CPU tensors. Every collective of the stages goes through here, so the device is chosen in one place.
Only torch is imported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Backends whose collectives need tensors on the accelerator; everything else (gloo, mpi) works on CPU tensors.
ACCELERATOR_BACKENDS = {"nccl": "cuda", "xccl": "xpu", "hccl": "npu"}


def device_for_backend(backend: str | None, local_device: torch.device | None = None) -> torch.device:
    """The device a collective's tensor must live on for `backend` ('nccl' -> this process's CUDA device)."""
    kind = ACCELERATOR_BACKENDS.get((backend or "").lower())
    if kind is None:
        return torch.device("cpu")
    if local_device is not None and local_device.type == kind:
        return local_device
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def collective_device(local_device: torch.device | None = None) -> torch.device:
    """The device for tensors handed to the current default process group (CPU when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return device_for_backend(dist.get_backend(), local_device)


def all_reduce_floats(values: list[float], op: str = "sum", device: torch.device | None = None) -> list[float]:
    """Sum (or max) each number over every rank; identity without a process group. Returns Python floats."""
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce_floats: op must be 'sum' or 'max', found {op!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()
