"""DPO stage: direct preference optimisation of the SFT model with TRL's DPOTrainer on Ray Train workers.

Inputs: sft_model (causal-lm, tokenizer files included; also the frozen reference), preferences (dataset:
prompt/chosen/rejected rows). Output: policy-dpo (causal-lm), with eval_loss, eval_reward_accuracy,
eval_reward_margin, first/last logged loss and, on the demo task, format_rate and gold_score of sampled replies.
"""

from stages.dpo.config import Config
from stages.dpo.stage import INPUTS, NAME, OUTPUTS, check_data, run

__all__ = ["NAME", "Config", "INPUTS", "OUTPUTS", "check_data", "run"]
