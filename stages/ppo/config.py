"""The PPO stage's typed config. Defaults are the `demo` preset: a few minutes on 2 CPU cores, gold score rising."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import Section
from stages.common.gates import Gate


class PPOGate(Gate):
    """What shows RL stayed sane: the policy's KL to the reference within a bound (a blown-up KL is reward hacking)."""

    max_kl: float | None = Field(10.0, gt=0)  # nats per reply on the held-out prompts


class Config(Section):
    """RLHF with PPO: policy, critic, reference and reward model as Ray actors; the math in `algorithm.py`."""

    # --- rollout ---
    iterations: int = Field(40, ge=1)  # rollout + update rounds
    rollout_batch_size: int = Field(32, ge=2)  # prompts per iteration (one sampled response each)
    max_new_tokens: int = Field(20, ge=1)  # response budget; demo replies are ~12 tokens with eos
    temperature: float = Field(1.0, gt=0.0)  # sampling temperature; log-probs are taken at the same temperature
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling (1.0 = off, keeps PPO's log-probs exact)
    missing_eos_penalty: float | None = Field(1.0, ge=0.0)  # subtracted from the RM score of replies cut before eos
    # --- PPO update ---
    ppo_epochs: int = Field(4, ge=1)  # passes over each rollout batch
    mini_batch_size: int = Field(16, ge=1)  # samples per optimizer step (over all actors of a role)
    learning_rate: float = Field(3e-5, gt=0.0)  # policy AdamW rate
    critic_learning_rate: float = Field(1e-4, gt=0.0)  # critic AdamW rate (a fresh head needs to move faster)
    max_grad_norm: float = Field(1.0, gt=0.0)  # gradient clipping for both trainable models
    clip_ratio: float = Field(0.2, gt=0.0)  # PPO surrogate clip epsilon
    value_clip: float = Field(0.2, gt=0.0)  # critic's value clip range
    entropy_coef: float = Field(0.0, ge=0.0)  # entropy bonus (0: the KL penalty already keeps the policy broad)
    gamma: float = Field(1.0, ge=0.0, le=1.0)  # discount: 1 for an episode of one reply
    lam: float = Field(0.95, ge=0.0, le=1.0)  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages per rollout batch
    reward_clip: float | None = Field(None, gt=0.0)  # clip RM scores to +-this before shaping (None = off)
    # --- KL to the reference (SFT) policy ---
    kl_coef: float = Field(0.05, ge=0.0)  # initial (or fixed) weight of the per-token KL penalty
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimator used in the reward
    adaptive_kl: bool = False  # Ziegler et al.'s controller steering the sequence KL toward kl_target
    kl_target: float = Field(6.0, gt=0.0)  # target sequence KL (nats) of the adaptive controller
    kl_horizon: int = Field(10000, ge=1)  # adaptive controller horizon, in samples
    # --- models and placement ---
    critic_init: Literal["reward_model", "sft_model"] = "reward_model"  # where the value model starts
    zero_stage: int = Field(0, ge=0, le=3)  # DeepSpeed ZeRO stage of the policy and critic engines
    bf16: bool = False  # bf16 for all four roles (GPU only; DeepSpeed keeps fp32 master weights); CPU runs stay fp32
    actors_per_role: int | None = Field(1, ge=1)  # data-parallel actors per role; None = run.num_workers
    cpus_per_actor: float = Field(0.5, gt=0.0)  # Ray CPUs per actor (4 roles x 0.5 = the 2 cores of a laptop box)
    # GPU fraction per actor when the run uses GPUs; None derives it so the four roles share the GPUs there are
    # (1 GPU: 0.25 each). An explicit x < 1 packs 1/x actors on a GPU. See `placement.py`.
    gpus_per_actor: float | None = Field(None, gt=0.0, le=1.0)
    torch_threads: int = Field(1, ge=1)  # intra-op threads per actor (more than the CPUs you reserve oversubscribes)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement group
    # --- evaluation and checkpoints ---
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored before and after training
    samples_shown: int = Field(8, ge=0)  # SFT vs PPO responses saved side by side in samples.json
    checkpoint_every: int = Field(10, ge=1)  # iterations between checkpoints (the last one is always saved)
    gate: PPOGate = Field(default_factory=PPOGate)  # checked by the flow; not part of the cache key

    @model_validator(mode="after")
    def _batches_divide(self) -> Config:
        """Every actor must run the same number of equally sized minibatches (DeepSpeed all-reduces each step)."""
        n = self.actors_per_role or 1  # None: checked again once the run's worker count is known
        if self.mini_batch_size % n:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of actors_per_role ({n})")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"mini_batch_size ({self.mini_batch_size})"
            )
        return self

    def resolved(self, num_workers: int) -> Config:
        """This config with `actors_per_role` fixed (None takes the run's worker count), validated again."""
        if self.actors_per_role is not None:
            return self
        return Config(**{**self.model_dump(), "actors_per_role": num_workers})
