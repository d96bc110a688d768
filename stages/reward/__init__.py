"""Reward stage: a reward model (SFT model + one-output score head) trained with TRL's RewardTrainer on Ray Train.

Inputs: sft_model (causal-lm, tokenizer files included), preferences (dataset: prompt/chosen/rejected rows).
Output: reward-model (kind reward-model), with eval_accuracy, eval_margin, gold_correlation (demo task), eval_loss.
"""

from stages.reward.config import Config
from stages.reward.stage import INPUTS, NAME, OUTPUTS, check_data, run

__all__ = ["NAME", "Config", "INPUTS", "OUTPUTS", "check_data", "run"]
