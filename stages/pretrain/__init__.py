"""Pretraining: a byte-level BPE tokenizer and a GPT-2 or Llama-style model trained from scratch (or any HF causal LM
trained further) with DeepSpeed on Ray Train workers."""

from stages.pretrain.config import Config
from stages.pretrain.stage import NAME, run

INPUTS = {"corpus": "dataset"}
OUTPUTS = ["tokenizer", "base-model"]

__all__ = ["NAME", "Config", "INPUTS", "OUTPUTS", "run"]
