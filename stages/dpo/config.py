"""The DPO stage's typed config. Defaults are the `demo` preset: about 75 s on 2 CPU cores, which took the demo SFT
model's sampled gold score from 0.004 to 0.62 (format rate 0.98 -> 0.91) on 128 held-out prompts; a rate of 5e-4
broke the format (0.60), 2e-4 for 200 steps reached 0.57. Greedy replies collapse to one preferred adjective
repeated ("The cake is cheerful, cheerful and cheerful."), which the gold scorer counts as off format: read the
sampled figures (see stages/trl/demo_eval.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import Section
from stages.common.gates import Gate
from stages.common.lora import LoraSection, refuse_zero3

# TRL's DPO losses that need no extra knob (exo_pair needs label smoothing; "sft" alone learns no preference).
LossType = Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "sigmoid_norm"]


class DPOGate(Gate):
    """What shows DPO worked: on held-out pairs the policy's implicit reward ranks chosen above rejected."""

    # share of held-out pairs with beta * (log-ratio chosen - log-ratio rejected) > 0; a coin flip scores 0.5
    min_eval_reward_accuracy: float | None = Field(0.55, ge=0, le=1)


class Config(Section):
    """Direct preference optimisation of the SFT model on preference pairs, against a frozen copy of itself."""

    max_steps: int = Field(250, ge=1)  # optimizer steps (each sees batch_size pairs; 250 x 16 = one demo epoch)
    batch_size: int = Field(16, ge=1)  # global pairs per optimizer step, split evenly over the Ray workers
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per step on each worker
    learning_rate: float = Field(1e-4, gt=0.0)  # AdamW peak rate; DPO moves a trained model, so 10x below SFT's
    warmup_steps: int = Field(5, ge=0)  # linear warm-up, then linear decay to 0 at max_steps
    weight_decay: float = Field(0.0, ge=0.0)
    beta: float = Field(0.1, gt=0.0)  # strength of the pull towards the reference (SFT) model; higher = closer
    loss_type: LossType = "sigmoid"  # TRL's DPO loss; "sigmoid" is the paper's -log sigmoid(beta * margin)
    max_length: int | None = Field(None, ge=8)  # prompt+reply+eos token limit; None = the model's context
    save_steps: int = Field(50, ge=1)  # checkpoint interval: a rerun after a crash resumes from the latest one
    logging_steps: int = Field(10, ge=1)  # loss is logged (and drawn in loss_curve.png) every this many steps
    eval_prompts: int = Field(128, ge=0)  # held-out demo prompts answered (sampled and greedy) for format/gold metrics
    max_new_tokens: int = Field(32, ge=1)  # generation budget per held-out prompt (demo replies are ~12 tokens)
    generation_batch_size: int = Field(32, ge=1)  # prompts per batched, left-padded generate call
    zero_stage: int | None = Field(None, ge=0, le=3)  # DeepSpeed ZeRO stage; None = plain DDP (the CPU default)
    bf16: bool = False  # bf16 mixed precision (GPU clusters); CPU runs stay in fp32
    # recompute each block's activations in the backward pass instead of keeping them (TRL's own default is on):
    # less memory for about a third more compute, what LoRA on a large model wants (benchmarks/README.md)
    activation_checkpointing: bool = False
    lora: LoraSection | None = None  # train a LoRA adapter (peft) instead of every weight; null = full
    gate: DPOGate = Field(default_factory=DPOGate)  # checked by the flow; not part of the cache key

    @model_validator(mode="after")
    def _lora_without_zero3(self) -> Config:
        refuse_zero3(self.lora, self.zero_stage)
        return self
