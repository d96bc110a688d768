"""The RL stage: PPO, GRPO and RLOO of the SFT policy against the reward model, with Ray actors per role and
DeepSpeed engines. Each method is its own DAG node with its own config section (`config.py`); the objective of each
is in `algorithm.py`, the loop in `rl_loop.py`."""

from stages.rl.config import CONFIGS, METHODS, GRPOConfig, PPOConfig, RLConfig, RLOOConfig
from stages.rl.inputs import check_data
from stages.rl.stage import NAME, POLICY_NAMES, run

INPUTS = {"sft_model": "causal-lm", "reward_model": "reward-model", "prompts": "dataset"}
OUTPUTS = ["policy"]

__all__ = ["CONFIGS", "INPUTS", "METHODS", "NAME", "OUTPUTS", "POLICY_NAMES", "GRPOConfig", "PPOConfig", "RLConfig",
           "RLOOConfig", "check_data", "run"]  # fmt: skip
