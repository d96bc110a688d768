"""PPO stage: RLHF of the SFT policy against the reward model, with Ray actors per role and DeepSpeed engines."""

from stages.ppo.config import Config
from stages.ppo.inputs import check_data
from stages.ppo.stage import NAME, run

INPUTS = {"sft_model": "causal-lm", "reward_model": "reward-model", "prompts": "dataset"}
OUTPUTS = ["policy"]

__all__ = ["NAME", "Config", "INPUTS", "OUTPUTS", "check_data", "run"]
