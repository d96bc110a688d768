"""The reward stage's typed config. Defaults are the `demo` preset (about 2 minutes on 2 CPU cores)."""

from __future__ import annotations

from pydantic import Field, model_validator

from stages.common.config import Section
from stages.common.gates import Gate
from stages.common.lora import LoraSection, refuse_zero3


class RewardGate(Gate):
    """What shows the reward model learnt: held-out pairwise accuracy clearly above chance (0.5)."""

    min_eval_accuracy: float | None = Field(0.6, ge=0, le=1)


class Config(Section):
    """Reward model: the SFT model with a one-output score head, trained on preference pairs (Bradley-Terry loss)."""

    max_steps: int = Field(150, ge=1)  # optimizer steps (each sees batch_size pairs)
    batch_size: int = Field(32, ge=1)  # global pairs per optimizer step, split evenly over the Ray workers
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per step on each worker
    learning_rate: float = Field(1e-3, gt=0.0)  # AdamW peak rate (the new score head starts from random)
    warmup_steps: int = Field(10, ge=0)  # linear warm-up, then linear decay to 0 at max_steps
    weight_decay: float = Field(0.0, ge=0.0)
    center_rewards_coefficient: float | None = Field(None, ge=0.0)  # pulls mean reward to 0 (PPO-friendly scale)
    max_length: int | None = Field(None, ge=8)  # prompt+reply+eos token limit; None = the model's context
    save_steps: int = Field(50, ge=1)  # checkpoint interval: a rerun after a crash resumes from the latest one
    logging_steps: int = Field(10, ge=1)  # loss is logged (and drawn in loss_curve.png) every this many steps
    score_batch_size: int = Field(64, ge=1)  # sequences per forward pass when scoring the held-out pairs
    zero_stage: int | None = Field(None, ge=0, le=3)  # DeepSpeed ZeRO stage; None = plain DDP (the CPU default)
    bf16: bool = False  # bf16 mixed precision (GPU clusters); CPU runs stay in fp32
    # recompute each block's activations in the backward pass instead of keeping them (TRL's own default is on):
    # less memory for about a third more compute, what LoRA on a large model wants (benchmarks/README.md)
    activation_checkpointing: bool = False
    lora: LoraSection | None = None  # train a LoRA adapter (peft) instead of every weight; null = full
    gate: RewardGate = Field(default_factory=RewardGate)  # checked by the flow; not part of the cache key

    @model_validator(mode="after")
    def _lora_without_zero3(self) -> Config:
        refuse_zero3(self.lora, self.zero_stage)
        return self
