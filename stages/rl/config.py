"""The RL stage's typed configs: one section per method (`ppo:`, `grpo:`, `rloo:`), each with that method's defaults
and its own cache key. Defaults are the `demo` preset: a few minutes on 2 CPU cores.

The method is the section's (a class constant), not a field: `grpo:` always runs GRPO.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from stages.common.config import Section
from stages.common.gates import Gate
from stages.common.lora import LoraSection, refuse_zero3
from stages.reward_functions.config import RewardSources


class RLGate(Gate):
    """What shows RL stayed sane: the policy's KL to the reference within a bound (a blown-up KL is reward hacking)."""

    max_kl: float | None = Field(10.0, gt=0)  # nats per reply on the held-out prompts
    # the reward functions' pass rate on the held-out prompts, after minus before (the SFT policy); e.g. 0.0 stops
    # a policy that games the reward model while the answers get worse (list the functions with weight 0 to watch
    # them without training on them). None = off
    min_function_gain: float | None = None


KLPenalty = Literal["reward", "loss"]


class RLConfig(Section):
    """What every RL method shares: rollout, the policy update, the KL to the reference, placement, checkpoints.
    The objective of each method is in `algorithm.py`."""

    algorithm: ClassVar[str]  # the method this section runs; also its config section's name
    critic_free: ClassVar[bool] = True  # GRPO and RLOO: no critic actor, no GAE, no value loss

    # where the KL to the reference enters: "reward" (a per-token penalty) or "loss" (a k3 term added to the policy
    # loss, as in the GRPO paper)
    kl_penalty: KLPenalty = "reward"
    # weight of the k3 KL loss term (kl_penalty "loss"; GRPO's beta)
    loss_kl_coef: float = Field(0.2, ge=0.0)
    # --- rollout ---
    iterations: int = Field(40, ge=1)  # rollout + update rounds
    # prompts per iteration: one reply each for ppo, group_size replies each for grpo/rloo
    rollout_batch_size: int = Field(32, ge=2)
    max_new_tokens: int = Field(20, ge=1)  # response budget; demo replies are ~12 tokens with eos
    temperature: float = Field(1.0, gt=0.0)  # sampling temperature; log-probs are taken at the same temperature
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling (1.0 = off, keeps PPO's log-probs exact)
    # where the old log-probs (the ratio's denominator) come from: "sampling" reads them from the sampling pass's
    # logits (no extra forward; the first ratio is 1 to ~1e-6 in fp32), "recompute" takes a full-sequence forward
    # (the first ratio is exactly 1). "auto": sampling in fp32, recompute under bf16, whose KV-cache and
    # full-sequence logits can differ by ~1e-2 nats
    old_logprobs: Literal["auto", "sampling", "recompute"] = "auto"
    missing_eos_penalty: float | None = Field(1.0, ge=0.0)  # subtracted from the RM score of replies cut before eos
    # DAPO's soft overlong punishment: the score of a reply longer than max_new_tokens - overlong_buffer tokens falls
    # linearly to -overlong_penalty_factor at max_new_tokens (None = off). A reply cut at the budget also pays
    # missing_eos_penalty, if set
    overlong_buffer: int | None = Field(None, ge=1)
    overlong_penalty_factor: float = Field(1.0, ge=0.0)
    # --- policy update ---
    ppo_epochs: int = Field(4, ge=1)  # passes over each rollout batch
    mini_batch_size: int = Field(16, ge=1)  # samples per optimizer step (over all actors of a role)
    learning_rate: float = Field(3e-5, gt=0.0)  # policy AdamW rate
    max_grad_norm: float = Field(1.0, gt=0.0)  # gradient clipping for every trainable model
    clip_ratio: float = Field(0.2, gt=0.0)  # PPO surrogate clip epsilon
    # DAPO's asymmetric clip: the ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high] (None = clip_ratio).
    # DAPO's clip-higher: 0.2 / 0.28, so unlikely tokens can still gain probability
    clip_ratio_low: float | None = Field(None, gt=0.0, lt=1.0)
    clip_ratio_high: float | None = Field(None, gt=0.0)
    # "token": PPO's per-token ratio; "sequence": GSPO's length-normalised sequence ratio on every token of the reply
    # (GSPO clips it far tighter: clip_ratio_low / clip_ratio_high around 3e-4 / 4e-4)
    importance_ratio: Literal["token", "sequence"] = "token"
    entropy_coef: float = Field(0.0, ge=0.0)  # entropy bonus (0: the KL penalty already keeps the policy broad)
    reward_clip: float | None = Field(None, gt=0.0)  # clip RM scores to +-this before shaping (None = off)
    # --- KL to the reference (SFT) policy ---
    kl_coef: float = Field(0.05, ge=0.0)  # initial (or fixed) weight of the per-token KL penalty in the reward
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimator used in the reward (the loss term is k3)
    adaptive_kl: bool = False  # Ziegler et al.'s controller steering the sequence KL toward kl_target
    kl_target: float = Field(6.0, gt=0.0)  # target sequence KL (nats) of the adaptive controller
    kl_horizon: int = Field(10000, ge=1)  # adaptive controller horizon, in samples
    # --- models and placement ---
    zero_stage: int = Field(0, ge=0, le=3)  # DeepSpeed ZeRO stage of the trained engines
    # bf16 for every role (DeepSpeed keeps fp32 master weights): a GPU, or a CPU with native bf16 (2x fp32 there)
    bf16: bool = False
    actors_per_role: int | None = Field(1, ge=1)  # data-parallel actors per role; None = run.num_workers
    cpus_per_actor: float = Field(0.5, gt=0.0)  # Ray CPUs per actor (4 roles x 0.5 = the 2 cores of a laptop box)
    # GPU fraction per actor when the run uses GPUs; None derives it so the roles share the GPUs there are
    # (1 GPU, 4 roles: 0.25 each). An explicit x < 1 packs 1/x actors on a GPU. See `placement.py`.
    gpus_per_actor: float | None = Field(None, gt=0.0, le=1.0)
    torch_threads: int = Field(1, ge=1)  # intra-op threads per actor (more than the CPUs you reserve oversubscribes)
    # threads the policy samples with on CPU (and trains with under GRPO/RLOO, where no critic trains beside it).
    # The loop is synchronous: while the policy samples, the other roles wait, so their CPUs are free.
    # None = the CPUs of one actor of every role (4 x 0.5 = 2 on the tiny box)
    generation_threads: int | None = Field(None, ge=1)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement group
    # --- evaluation and checkpoints ---
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored before and after training
    samples_shown: int = Field(8, ge=0)  # SFT vs trained responses saved side by side in samples.json
    checkpoint_every: int = Field(10, ge=1)  # iterations between checkpoints (the last one is always saved)
    log_interval: int | None = Field(None, ge=1)  # iterations between progress lines; None = about ten per run
    # where the reward comes from: the reward model, Python reward functions, or a weighted sum of both
    reward: RewardSources = Field(default_factory=RewardSources)
    # train a LoRA adapter on the policy (and the critic, its value head in full); the reference is then the policy
    # with its adapter off: no reference actor, one model copy fewer. null = full fine-tuning
    lora: LoraSection | None = None
    gate: RLGate = Field(default_factory=RLGate)  # checked by the flow; not part of the cache key

    @property
    def logprobs_from_sampling(self) -> bool:
        """`old_logprobs` resolved: True = read from the sampling pass, False = a recomputing forward."""
        if self.old_logprobs == "auto":
            return not self.bf16
        return self.old_logprobs == "sampling"

    @property
    def replies_per_prompt(self) -> int:
        """Replies sampled per training prompt: one for ppo (`GroupConfig`: group_size)."""
        return 1

    @property
    def rollout_replies(self) -> int:
        """Replies in one rollout batch: what the minibatches split."""
        return self.rollout_batch_size * self.replies_per_prompt

    @model_validator(mode="after")
    def _batches_divide(self) -> RLConfig:
        """Every actor must run the same number of equally sized minibatches (DeepSpeed all-reduces each step)."""
        n = self.actors_per_role or 1  # None: checked again once the run's worker count is known
        if self.mini_batch_size % n:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of actors_per_role ({n})")
        if self.rollout_replies % self.mini_batch_size:
            what = (f"rollout_batch_size x group_size ({self.rollout_batch_size} x {self.replies_per_prompt} = "
                    f"{self.rollout_replies})" if self.critic_free else f"rollout_batch_size ({self.rollout_batch_size})")  # fmt: skip
            raise ValueError(f"{what} must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.adaptive_kl and self.kl_penalty == "loss":
            raise ValueError("adaptive_kl steers the KL penalty in the reward; it needs kl_penalty 'reward', not 'loss'")
        return self

    @model_validator(mode="after")
    def _lora_without_zero3(self) -> RLConfig:
        refuse_zero3(self.lora, self.zero_stage)
        return self

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> RLConfig:
        """The overlong penalty ramps over the last `overlong_buffer` tokens of the budget: it must leave some room."""
        if self.overlong_buffer is not None and self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer ({self.overlong_buffer}) must be smaller than max_new_tokens ({self.max_new_tokens}): "
                "the penalty ramps over the last overlong_buffer tokens of the reply budget"
            )
        return self

    def resolved(self, num_workers: int) -> RLConfig:
        """This config with `actors_per_role` fixed (None takes the run's worker count), validated again."""
        if self.actors_per_role is not None:
            return self
        return type(self)(**{**self.model_dump(), "actors_per_role": num_workers})


class PPOConfig(RLConfig):
    """PPO: policy, critic, reference and reward model as Ray actors; GAE over the critic's values."""

    algorithm: ClassVar[str] = "ppo"
    critic_free: ClassVar[bool] = False

    critic_learning_rate: float = Field(1e-4, gt=0.0)  # critic AdamW rate (a fresh head needs to move faster)
    value_clip: float = Field(0.2, gt=0.0)  # critic's value clip range
    gamma: float = Field(1.0, ge=0.0, le=1.0)  # discount: 1 for an episode of one reply
    lam: float = Field(0.95, ge=0.0, le=1.0)  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages per rollout batch
    critic_init: Literal["reward_model", "sft_model"] = "reward_model"  # where the value model starts


class GroupConfig(RLConfig):
    """What the critic-free methods share: `group_size` replies per prompt, a baseline taken over the group."""

    group_size: int = Field(4, ge=2)  # replies sampled per prompt (the group a baseline is taken over)
    # DAPO's dynamic sampling (stages/rl/dynamic_sampling.py): train on the groups whose replies' rewards differ
    # (a flat group has no advantage), refilling the batch with further prompts, up to max_sampling_rounds rollouts
    # per iteration
    dynamic_sampling: bool = False
    max_sampling_rounds: int = Field(3, ge=1)

    @property
    def replies_per_prompt(self) -> int:
        return self.group_size


class GRPOConfig(GroupConfig):
    """GRPO: advantages normalised within the group, the KL as a loss term."""

    algorithm: ClassVar[str] = "grpo"

    scale_rewards: bool = True  # divide by the group's reward std (False = Dr. GRPO, mean-centred only)
    # GRPO's beta. The paper's 0.04 let the demo's GRPO over-optimise the reward model (KL 7.5 nats, gold score
    # below SFT's); 0.2 held it near 4 nats, above SFT
    kl_penalty: KLPenalty = "loss"


class RLOOConfig(GroupConfig):
    """RLOO: each reply's baseline is the mean of the other replies' rewards in its group."""

    algorithm: ClassVar[str] = "rloo"


CONFIGS: dict[str, type[RLConfig]] = {c.algorithm: c for c in (PPOConfig, GRPOConfig, RLOOConfig)}
METHODS: tuple[str, ...] = tuple(CONFIGS)  # the RL methods, in the order the DAG lists them
