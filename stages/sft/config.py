"""The SFT stage's typed config. Defaults are the `demo` preset (about 2 minutes on 2 CPU cores)."""

from __future__ import annotations

from pydantic import Field, model_validator

from stages.common.config import Section
from stages.common.gates import Gate
from stages.common.lora import LoraSection, refuse_zero3


class SFTGate(Gate):
    """What shows SFT worked: the training loss fell (last logged loss below the first) and stayed finite."""

    max_loss_vs_first: float | None = Field(1.0, gt=0)  # last logged train loss / first logged train loss
    max_eval_loss: float | None = Field(None, gt=0)  # held-out loss ceiling (off by default: data-dependent)


class Config(Section):
    """Supervised fine-tuning of the base model on prompt/completion pairs (loss on the completion only)."""

    # start from this causal LM (an artifact ref such as my-llama@latest, or a local HF directory, which is imported
    # into the store by content) instead of the pretrain stage's base-model; the pretrain node then does not run
    base_model: str | None = Field(None, min_length=1)

    max_steps: int = Field(150, ge=1)  # optimizer steps; the demo format is learnt in well under one epoch
    batch_size: int = Field(16, ge=1)  # global batch per optimizer step, split evenly over the Ray workers
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per step on each worker
    learning_rate: float = Field(1e-3, gt=0.0)  # AdamW peak rate; tiny models fine-tune fast at this rate
    warmup_steps: int = Field(10, ge=0)  # linear warm-up, then linear decay to 0 at max_steps
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int | None = Field(None, ge=8)  # prompt+completion+eos token limit; None = the model's context
    save_steps: int = Field(50, ge=1)  # checkpoint interval: a rerun after a crash resumes from the latest one
    logging_steps: int = Field(10, ge=1)  # loss is logged (and drawn in loss_curve.png) every this many steps
    eval_prompts: int = Field(128, ge=0)  # held-out demo prompts answered (sampled and greedy) for format/gold metrics
    max_new_tokens: int = Field(32, ge=1)  # generation budget per held-out prompt (demo replies are ~12 tokens)
    generation_batch_size: int = Field(32, ge=1)  # prompts per batched, left-padded generate call
    zero_stage: int | None = Field(None, ge=0, le=3)  # DeepSpeed ZeRO stage; None = plain DDP (the CPU default)
    bf16: bool = False  # bf16 mixed precision (GPU clusters); CPU runs stay in fp32
    # TRL's packing (best-fit decreasing into rows of max_length tokens, padding-free: one flattened row per
    # micro-batch, position ids restarting per sequence); batch_size then counts packed rows. Refused before the run
    # for a model whose attention would see across packed sequences (stages/sft/packing.py)
    packing: bool = False
    # recompute each block's activations in the backward pass instead of keeping them (TRL's own default is on):
    # less memory for about a third more compute, what LoRA on a large model wants (benchmarks/README.md)
    activation_checkpointing: bool = False
    lora: LoraSection | None = None  # train a LoRA adapter (peft) instead of every weight; null = full
    gate: SFTGate = Field(default_factory=SFTGate)  # checked by the flow; not part of the cache key

    @model_validator(mode="after")
    def _lora_without_zero3(self) -> Config:
        refuse_zero3(self.lora, self.zero_stage)
        return self
