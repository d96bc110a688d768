"""Pretraining: a byte-level BPE tokenizer and a GPT-2 or Llama-style model trained from scratch (or any HF causal LM
trained further) with DeepSpeed on Ray Train workers."""

from stages.pretrain.config import Config
from stages.pretrain.stage import NAME, check_config, run  # check_config: the flow's pre-flight calls it

INPUTS = {"corpus": "dataset"}
# given when the config names them (pretrain.init_from / pretrain.tokenizer): the flow resolves or imports them, so
# they are artifacts with digests in the cache key and the lineage, never bare paths
OPTIONAL_INPUTS = {"init_model": ("causal-lm",), "tokenizer": ("tokenizer", "causal-lm")}
OUTPUTS = ["tokenizer", "base-model"]

__all__ = ["NAME", "Config", "INPUTS", "OPTIONAL_INPUTS", "OUTPUTS", "check_config", "run"]
