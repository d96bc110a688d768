"""The pretraining stage's typed config; the defaults are the `demo` preset (about 5 minutes on 2 CPU cores)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.common.config import Section
from stages.common.gates import Gate


class PretrainGate(Gate):
    """What shows pretraining worked: the model beats the no-context (unigram) baseline on held-out text."""

    max_perplexity_vs_unigram: float | None = Field(1.0, gt=0)  # val perplexity / unigram perplexity


class Config(Section):
    """Tokenizer, model (GPT-2 or Llama-style), DeepSpeed optimisation, evaluation and checkpointing of the stage."""

    # --- tokenizer ---
    vocab_size: int = Field(2048, ge=1)  # BPE vocabulary incl. the 256 byte symbols and the special tokens
    tokenizer: str | None = None  # use this tokenizer instead of training one: an artifact ref or a local HF dir

    # --- model ---
    # continue pretraining this causal LM (artifact ref or local HF dir; any AutoModelForCausalLM family) instead of
    # a random init; the shape fields below and `architecture` are then the model's own
    init_from: str | None = None
    # from scratch: "gpt2" (learned positions, LayerNorm, GELU MLP) or "llama" (RoPE, RMSNorm, SwiGLU MLP of about
    # 8/3 x n_embd rounded up to a multiple of 64, tied embeddings)
    architecture: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(4, ge=1)
    n_embd: int = Field(256, ge=1)  # width; must be a multiple of n_head
    n_head: int = Field(4, ge=1)
    context: int = Field(128, ge=2)  # tokens per training block; at most n_positions
    n_positions: int | None = None  # longest sequence the model supports; None = context (init_from: the model's own)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # tiny models on a small corpus overfit little in a few minutes

    # --- optimisation (becomes the DeepSpeed config) ---
    max_steps: int = Field(250, ge=1)  # optimizer steps (demo: ~1M tokens, about 1.3 epochs of the demo corpus)
    micro_batch_size: int = Field(16, ge=1)  # blocks per worker per forward/backward
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(2e-3, gt=0)  # peak learning rate, after warmup
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = Field(20, ge=1)
    weight_decay: float = Field(0.1, ge=0.0)  # on matrices only (not biases, LayerNorms)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)  # AdamW first-moment decay
    beta2: float = Field(0.95, ge=0.0, lt=1.0)  # AdamW second-moment decay (0.95: steadier on small batches)
    grad_clip: float = Field(1.0, ge=0.0)  # global gradient-norm clip; 0 = off
    zero_stage: int = Field(2, ge=0, le=3)  # DeepSpeed ZeRO stage
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on CPU (builds DeepSpeed's CPU Adam)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch.compile the model inside the DeepSpeed engine; None = on for GPU, off for CPU (where compiling takes
    # longer than a tiny run and needs a C++ toolchain on every worker)
    compile: bool | None = None

    # --- evaluation, logging, checkpoints ---
    eval_interval: int = Field(50, ge=1)  # steps between validation passes (one more at the end)
    eval_blocks: int = Field(64, ge=1)  # at most this many validation blocks per pass (spread over the workers)
    log_interval: int = Field(25, ge=1)  # steps between progress lines
    checkpoint_interval: int = Field(100, ge=1)  # steps between checkpoints (resume points)
    max_failures: int = Field(1, ge=0)  # Ray Train retries of a failed worker group, from the latest checkpoint
    # per-worker peak FLOP/s for MFU; None = the data-sheet peak of the worker's GPU (stages/pretrain/metrics.py),
    # or a measured matmul on a CPU or a GPU the table does not know
    peak_flops: float | None = Field(None, gt=0)
    gate: PretrainGate = Field(default_factory=PretrainGate)  # checked by the flow; not part of the cache key
