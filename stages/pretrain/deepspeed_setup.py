"""The DeepSpeed config generated from the typed stage config, and the optimizer's parameter groups."""

from __future__ import annotations

from typing import Any

from stages.common import deepspeed_config as ds
from stages.common.deepspeed_config import resolve_precision
from stages.pretrain.config import Config

__all__ = ["deepspeed_config", "param_groups", "resolve_precision"]


def deepspeed_config(config: Config, *, use_gpu: bool) -> dict[str, Any]:
    """ZeRO stage, offload, precision, micro-batch, accumulation, clipping, AdamW and warmup+cosine as DeepSpeed JSON."""
    return ds.build(
        zero_stage=config.zero_stage,
        precision=resolve_precision(config.precision, use_gpu, "pretrain.precision"),
        use_gpu=use_gpu,
        micro_batch_size=config.micro_batch_size,
        grad_accum=config.grad_accum,
        grad_clip=config.grad_clip,
        optimizer=ds.AdamW(lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, weight_decay=config.weight_decay),
        scheduler=ds.WarmupCosine(config.max_steps, config.warmup_steps, config.min_lr_ratio),
        offload_optimizer=config.offload_optimizer,
    )


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (embeddings, projections) only: decaying biases and LayerNorm gains just slows training."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
