"""The RL stage's typed config (PPO, GRPO, RLOO). Defaults are the `demo` preset: a few minutes on 2 CPU cores."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import Section
from stages.common.gates import Gate


class PPOGate(Gate):
    """What shows RL stayed sane: the policy's KL to the reference within a bound (a blown-up KL is reward hacking)."""

    max_kl: float | None = Field(10.0, gt=0)  # nats per reply on the held-out prompts


Algorithm = Literal["ppo", "grpo", "rloo"]
KLPenalty = Literal["reward", "loss"]
CRITIC_FREE: tuple[str, ...] = ("grpo", "rloo")  # group baselines instead of a learned value model


class Config(Section):
    """RLHF with PPO (policy, critic, reference and reward model as Ray actors) or a critic-free variant (GRPO, RLOO:
    no critic, `group_size` replies per prompt, a group baseline); the math is in `algorithm.py`."""

    # --- algorithm ---
    algorithm: Algorithm = "ppo"  # ppo: critic + GAE; grpo: group-normalised rewards; rloo: leave-one-out baseline
    group_size: int = Field(4, ge=2)  # grpo/rloo: replies sampled per prompt (the group a baseline is taken over)
    # where the KL to the reference enters: "reward" (a per-token penalty, PPO/RLOO) or "loss" (a k3 term added to
    # the policy loss, as in the GRPO paper); None = the algorithm's default (grpo: loss, ppo and rloo: reward)
    kl_penalty: KLPenalty | None = None
    # weight of the k3 KL loss term (kl_penalty "loss"; GRPO's beta). The GRPO paper's 0.04 let the demo's GRPO
    # over-optimise the reward model (KL 7.5 nats, gold score below SFT's); 0.2 held it near 4 nats, above SFT
    loss_kl_coef: float = Field(0.2, ge=0.0)
    grpo_scale_rewards: bool = True  # grpo: divide by the group's reward std (False = Dr. GRPO, mean-centred only)
    # --- rollout ---
    iterations: int = Field(40, ge=1)  # rollout + update rounds
    # prompts per iteration: one reply each for ppo, group_size replies each for grpo/rloo
    rollout_batch_size: int = Field(32, ge=2)
    max_new_tokens: int = Field(20, ge=1)  # response budget; demo replies are ~12 tokens with eos
    temperature: float = Field(1.0, gt=0.0)  # sampling temperature; log-probs are taken at the same temperature
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling (1.0 = off, keeps PPO's log-probs exact)
    # where PPO's old log-probs (the ratio's denominator) come from: "sampling" reads them from the sampling pass's
    # logits (no extra forward; the first ratio is 1 to ~1e-6 in fp32), "recompute" takes a full-sequence forward
    # (the first ratio is exactly 1). "auto": sampling in fp32, recompute under bf16, whose KV-cache and
    # full-sequence logits can differ by ~1e-2 nats
    old_logprobs: Literal["auto", "sampling", "recompute"] = "auto"
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
    whiten_advantages: bool = True  # ppo: normalise advantages per rollout batch (grpo/rloo use their group baseline)
    reward_clip: float | None = Field(None, gt=0.0)  # clip RM scores to +-this before shaping (None = off)
    # --- KL to the reference (SFT) policy ---
    kl_coef: float = Field(0.05, ge=0.0)  # initial (or fixed) weight of the per-token KL penalty in the reward
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimator used in the reward (the loss term is k3)
    adaptive_kl: bool = False  # Ziegler et al.'s controller steering the sequence KL toward kl_target
    kl_target: float = Field(6.0, gt=0.0)  # target sequence KL (nats) of the adaptive controller
    kl_horizon: int = Field(10000, ge=1)  # adaptive controller horizon, in samples
    # --- models and placement ---
    critic_init: Literal["reward_model", "sft_model"] = "reward_model"  # where the value model starts (ppo only)
    zero_stage: int = Field(0, ge=0, le=3)  # DeepSpeed ZeRO stage of the policy and critic engines
    # bf16 for all four roles (DeepSpeed keeps fp32 master weights): a GPU, or a CPU with native bf16 (2x fp32 there)
    bf16: bool = False
    actors_per_role: int | None = Field(1, ge=1)  # data-parallel actors per role; None = run.num_workers
    cpus_per_actor: float = Field(0.5, gt=0.0)  # Ray CPUs per actor (4 roles x 0.5 = the 2 cores of a laptop box)
    # GPU fraction per actor when the run uses GPUs; None derives it so the four roles share the GPUs there are
    # (1 GPU: 0.25 each). An explicit x < 1 packs 1/x actors on a GPU. See `placement.py`.
    gpus_per_actor: float | None = Field(None, gt=0.0, le=1.0)
    torch_threads: int = Field(1, ge=1)  # intra-op threads per actor (more than the CPUs you reserve oversubscribes)
    # threads the policy samples with on CPU (and trains with under GRPO/RLOO, where no critic trains beside it).
    # The loop is synchronous: while the policy samples, the other roles wait, so their CPUs are free.
    # None = the CPUs of one actor of every role (4 x 0.5 = 2 on the tiny box)
    generation_threads: int | None = Field(None, ge=1)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement group
    # --- evaluation and checkpoints ---
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored before and after training
    samples_shown: int = Field(8, ge=0)  # SFT vs PPO responses saved side by side in samples.json
    checkpoint_every: int = Field(10, ge=1)  # iterations between checkpoints (the last one is always saved)
    log_interval: int | None = Field(None, ge=1)  # iterations between progress lines; None = about ten per run
    gate: PPOGate = Field(default_factory=PPOGate)  # checked by the flow; not part of the cache key

    @property
    def critic_free(self) -> bool:
        """GRPO and RLOO: no critic actor, no GAE, no value loss."""
        return self.algorithm in CRITIC_FREE

    @property
    def logprobs_from_sampling(self) -> bool:
        """`old_logprobs` resolved: True = read from the sampling pass, False = a recomputing forward."""
        if self.old_logprobs == "auto":
            return not self.bf16
        return self.old_logprobs == "sampling"

    @property
    def replies_per_prompt(self) -> int:
        """Replies sampled per training prompt: group_size for grpo/rloo, one for ppo."""
        return self.group_size if self.critic_free else 1

    @property
    def rollout_replies(self) -> int:
        """Replies in one rollout batch: what the minibatches split."""
        return self.rollout_batch_size * self.replies_per_prompt

    @property
    def resolved_kl_penalty(self) -> KLPenalty:
        """Where the KL enters, with None resolved to the algorithm's default (GRPO paper: loss; PPO, RLOO: reward)."""
        if self.kl_penalty is not None:
            return self.kl_penalty
        return "loss" if self.algorithm == "grpo" else "reward"

    @model_validator(mode="after")
    def _batches_divide(self) -> Config:
        """Every actor must run the same number of equally sized minibatches (DeepSpeed all-reduces each step)."""
        n = self.actors_per_role or 1  # None: checked again once the run's worker count is known
        if self.mini_batch_size % n:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of actors_per_role ({n})")
        if self.rollout_replies % self.mini_batch_size:
            what = (f"rollout_batch_size x group_size ({self.rollout_batch_size} x {self.group_size} = "
                    f"{self.rollout_replies})" if self.critic_free else f"rollout_batch_size ({self.rollout_batch_size})")  # fmt: skip
            raise ValueError(f"{what} must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.adaptive_kl and self.resolved_kl_penalty == "loss":
            raise ValueError(
                "adaptive_kl steers the KL penalty in the reward; it needs kl_penalty 'reward', not 'loss'"
            )
        return self

    def resolved(self, num_workers: int) -> Config:
        """This config with `actors_per_role` fixed (None takes the run's worker count), validated again."""
        if self.actors_per_role is not None:
            return self
        return Config(**{**self.model_dump(), "actors_per_role": num_workers})
