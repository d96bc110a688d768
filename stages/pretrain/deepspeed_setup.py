"""The DeepSpeed config generated from the typed stage config, and the optimizer's parameter groups."""

from __future__ import annotations

from typing import Any

from stages.pretrain.config import Config


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """'auto' means bf16 on GPU and fp32 on CPU; half precision on CPU is refused (slow and unsupported here)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"precision {precision!r} needs a GPU (run.use_gpu); use 'fp32' or 'auto' on CPU")
    return precision


def deepspeed_config(config: Config, *, use_gpu: bool) -> dict[str, Any]:
    """ZeRO stage, offload, precision, micro-batch, accumulation, clipping, AdamW and warmup+cosine as DeepSpeed JSON."""
    precision = resolve_precision(config.precision, use_gpu)
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if config.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the final HF save needs the full weights
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": [config.beta1, config.beta2],
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                # torch's AdamW needs no compiled op; ZeRO-Offload runs DeepSpeed's CPU Adam instead
                "torch_adam": not config.offload_optimizer,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": config.max_steps,
                "warmup_num_steps": config.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": config.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # progress lines are ours (ctx.log), not DeepSpeed's
        "wall_clock_breakdown": False,
    }


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (embeddings, projections) only: decaying biases and LayerNorm gains just slows training."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
