"""SFT stage: supervised fine-tuning of the base model with TRL's SFTTrainer on Ray Train workers.

Inputs: base_model (causal-lm, tokenizer files included), data (dataset: prompt/completion or messages rows).
Output: sft-model (causal-lm), with eval_loss, format_rate, gold_score, wall_seconds, train_samples_per_second.
"""

from stages.sft.config import Config
from stages.sft.stage import INPUTS, NAME, OUTPUTS, check_data, run

__all__ = ["NAME", "Config", "INPUTS", "OUTPUTS", "check_data", "run"]
