"""The eval stage's typed config. Defaults: 64 held-out prompts, one sampled reply each (the tiny preset's SFT model
and policy took 3 s together in one CPU task)."""

from __future__ import annotations

from pydantic import Field

from stages.common.config import Section
from stages.reward_functions.config import FunctionSpec


class Config(Section):
    """One final evaluation of the SFT model and every policy of a run on the same held-out prompts."""

    eval_prompts: int = Field(64, ge=1)  # first N prompts of the prompts data set's test split (fewer if it has fewer)
    samples_per_prompt: int = Field(1, ge=1)  # sampled replies per prompt and model
    max_new_tokens: int = Field(24, ge=1)  # reply budget; demo replies are ~12 tokens with eos
    temperature: float = Field(1.0, gt=0.0)  # sampling temperature; log-probs for the KL are taken at it too
    batch_size: int = Field(32, ge=1)  # prompts per batched, left-padded generate / forward call
    samples_shown: int = Field(6, ge=0)  # prompts whose replies are shown side by side in the report
    seed_offset: int = Field(535_353, ge=0)  # run seed + this = the sampling seed, the same for every model
    gpus: float = Field(0.25, gt=0.0, le=1.0)  # GPU share of the evaluation task when the run uses GPUs
    cpus: float = Field(1.0, gt=0.0)  # Ray CPUs of the evaluation task (its torch threads on CPU)
    # reward functions every model is scored with (mean and pass rate); default: every function of the run's RL
    # branches (flows/config.py fills it), so a policy trained on the reward model is checked by them too
    reward_functions: list[FunctionSpec] = Field(default_factory=list)
    reward_timeout_s: float = Field(120.0, gt=0.0)  # per function call on one model's replies
    reward_cpus: float = Field(0.25, gt=0.0)  # Ray CPUs of each reward-function actor
