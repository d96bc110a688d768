"""The RL loop on the driver (PPO, GRPO, RLOO): rollout -> scoring -> advantages -> updates, evaluation, checkpoints.

The driver holds only the tokenizer and small tensors (token ids, log-probs, values, scores); every model lives in
its actor (see `actor_pool.py`). Rollout batch layout: `stages/common/sequences.py`; the objective: `algorithm.py`
(the KL coefficient's controllers: `kl_control.py`; dynamic sampling's joins: `dynamic_sampling.py`); checkpoints:
`checkpoint_state.py`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.reward_functions.runner import RewardFunctions, pass_rates, weighted_sum
from stages.rl import algorithm as A
from stages.rl import dynamic_sampling as DS
from stages.rl.actor_pool import ActorPool, gather, pad_to_multiple
from stages.rl.config import RLConfig
from stages.rl.kl_control import AdaptiveKLController, FixedKLController
from stages.rl.masked import masked_sum

GoldFn = Callable[[str, str], float]
Refill = Callable[[int], tuple[list[str], dict[str, list]]]  # round -> (prompts, their columns), dynamic sampling


def make_kl_controller(cfg: RLConfig) -> FixedKLController | AdaptiveKLController:
    """The fixed controller by default; Ziegler et al.'s adaptive one when `adaptive_kl`."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def rows_for_iteration(n: int, iteration: int, batch_size: int, seed: int, round_: int = 0) -> list[int]:
    """The rows of a batch of `n` prompts, drawn without replacement, a pure function of (seed, iteration, round) so
    a resumed run sees the same data; rounds after the first are dynamic sampling's refills."""
    rng = random.Random(f"ppo/{seed}/{iteration}" + (f"/refill-{round_}" if round_ else ""))
    rows = range(n)
    return rng.sample(rows, batch_size) if batch_size <= n else rng.choices(rows, k=batch_size)


def prompts_for_iteration(prompts: list[str], iteration: int, batch_size: int, seed: int) -> list[str]:
    """The prompts of `rows_for_iteration` (the same draws as sampling the prompts themselves)."""
    return [prompts[i] for i in rows_for_iteration(len(prompts), iteration, batch_size, seed)]


def select_columns(columns: dict[str, list], rows: list[int]) -> dict[str, list]:
    """The prompt data's other columns at `rows`, aligned with the batch."""
    return {name: [values[i] for i in rows] for name, values in columns.items()}


def decode_responses(tokenizer, tokens: torch.Tensor, reply_mask: torch.Tensor, prompt_len: int) -> list[str]:
    """Response texts without padding and special tokens (eos)."""
    out = []
    for row, mask in zip(tokens[:, prompt_len:], reply_mask, strict=True):
        out.append(tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True))
    return out


class RLLoop:
    """One RL iteration at a time over the actor pool (the section's method: PPO, GRPO or RLOO); `evaluate` scores held-out prompts
    without training."""

    def __init__(self, cfg: RLConfig, pool: ActorPool, tokenizer, *, gold: GoldFn | None, seed: int,
                 functions: RewardFunctions | None = None):  # fmt: skip
        self.cfg = cfg
        self.pool = pool
        self.tokenizer = tokenizer
        self.gold = gold
        self.seed = seed
        self.functions = functions if functions is not None and len(functions) else None
        self.kl_controller = make_kl_controller(cfg)

    # ------------------------------------------------------------------------------------------------ rollout
    def _encode(self, prompts: list[str]) -> dict:
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        return {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"]}

    def _generate(self, prompts: list[str], seed: int) -> dict:
        """Sample responses on the policy actors; returns the rollout batch (with its log-probs when they are read
        from the sampling pass, else `_score` adds them)."""
        record = self.cfg.logprobs_from_sampling
        out = gather(self.pool["policy"].submit("generate", self._encode(prompts), seed, record), "concat")
        out["prompt_len"] = out["tokens"].shape[1] - self.cfg.max_new_tokens
        return out

    def _score(self, batch: dict, prompts: list[str], columns: dict[str, list], step: int,
               with_values: bool = True) -> Scored:  # fmt: skip
        """Reference log-probs, the reward (reward model and reward functions, weighted) and critic values, computed
        concurrently by their actors; the reward functions run on the decoded replies meanwhile.

        When sampling did not record the policy's own log-probs, they are taken in the same round (into
        batch["logprobs"]): after sampling the policy actor is free, and its forward runs alongside the other roles'.
        """
        sources = self.cfg.reward
        texts = decode_responses(self.tokenizer, batch["tokens"], batch["reply_mask"], batch["prompt_len"])
        pending = None
        if self.functions is not None:
            ids = reply_token_ids(batch["tokens"], batch["reply_mask"], batch["prompt_len"])
            pending = self.functions.submit(prompts, texts, ids, columns, step)
        view = {k: batch[k] for k in ("tokens", "attention_mask", "reply_mask", "prompt_len")}
        policy = None if "logprobs" in batch else self.pool["policy"].submit("logprobs", view)
        ref = (self.pool["reference"].submit("logprobs", view) if "reference" in self.pool.roles
               else self.pool["policy"].submit("reference_logprobs", view))  # LoRA: the policy, adapter off
        rm = self.pool["reward"].submit("scores", view) if sources.uses_model else None
        values = self.pool["critic"].submit("values", view) if with_values else None
        if policy is not None:
            batch["logprobs"] = gather(policy, "concat")
        rm_scores = gather(rm, "concat") if rm else None
        n = len(texts)
        reward = sources.model_weight * rm_scores if rm_scores is not None else torch.zeros(n)
        fn_scores: dict[str, list[float | None]] = {}
        if pending is not None:
            fn_scores = self.functions.collect(pending, n)
            reward = reward + torch.tensor(weighted_sum(fn_scores, sources.functions, n), dtype=reward.dtype)
        gold = [self.gold(p, r) for p, r in zip(prompts, texts, strict=True)] if self.gold else None
        return Scored(gather(ref, "concat"), reward, rm_scores, fn_scores, gather(values, "concat") if values else None,
                      texts, gold)  # fmt: skip

    # ---------------------------------------------------------------------------------------------- iteration
    def _rollout_prompts(self, prompts: list[str]) -> list[str]:
        """Each prompt `replies_per_prompt` times in consecutive rows (a critic-free group); PPO's batch as is.

        The copies of a prompt differ by sampling alone: every row draws its own tokens from the one generator.
        """
        k = self.cfg.replies_per_prompt
        return [p for p in prompts for _ in range(k)]

    def _penalised(self, scores: torch.Tensor, batch: dict) -> torch.Tensor:
        """The replies' scores less the missing-eos and overlong penalties the section sets (`A.penalised_scores`)."""
        cfg = self.cfg
        return A.penalised_scores(
            scores, batch["ended"], batch["reply_mask"].sum(-1), missing_eos_penalty=cfg.missing_eos_penalty,
            overlong_buffer=cfg.overlong_buffer, max_new_tokens=cfg.max_new_tokens,
            overlong_factor=cfg.overlong_penalty_factor,
        )  # fmt: skip

    def _advantages(self, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                    kl_coef: float) -> A.Advantages:  # fmt: skip
        """The section's method's advantages (`A.advantages`: token advantages, reward per reply, returns, metrics).

        `scores` already carry the penalties (`_penalised`); `kl_coef` is the KL weight in the reward (0 when the KL
        is a loss).
        """
        cfg = self.cfg
        if cfg.critic_free:  # GroupConfig's fields (scale_rewards: GRPO's only)
            method = {"group_size": cfg.group_size, "scale_rewards": getattr(cfg, "scale_rewards", True)}
        else:  # PPOConfig's
            method = {"gamma": cfg.gamma, "lam": cfg.lam, "whiten": cfg.whiten_advantages}
        return A.advantages(cfg.algorithm, scores, kl, mask, values, kl_coef, reward_clip=cfg.reward_clip, **method)

    def _rollout(self, index: int, prompts: list[str], columns: dict[str, list] | None, round_: int = 0) -> Rollout:
        """Sample and score one rollout of `prompts` (a refill round's seed differs from the first's)."""
        replies_prompts = self._rollout_prompts(prompts)
        replies_columns = {c: self._rollout_prompts(v) for c, v in (columns or {}).items()}
        t0 = time.perf_counter()
        batch = self._generate(replies_prompts, seed=self.seed * 1_000_003 + index + 100_003 * round_)
        t1 = time.perf_counter()
        scored = self._score(batch, replies_prompts, replies_columns, index, with_values=not self.cfg.critic_free)
        return Rollout(batch, scored, replies_prompts, t1 - t0, time.perf_counter() - t1)

    def _informative(self, first: Rollout, index: int, refill: Refill | None) -> tuple[Rollout, dict[str, float]]:
        """Dynamic sampling (`dynamic_sampling.py`): the informative groups of `first` and of refill rounds, or
        `first` itself when they do not fill a minibatch per actor; and what it found. The refill rounds' seconds
        are added to `first`'s."""
        cfg, k = self.cfg, self.cfg.replies_per_prompt
        kept, found, rounds, part = [], 0, 1, first
        while True:
            rows = A.informative_rows(self._penalised(part.scored.reward, part.batch), k).nonzero().flatten()
            if len(rows):
                kept.append(DS.take_rows(part, rows.tolist()))
                found += len(rows) // k
            if found >= cfg.rollout_batch_size or rounds >= cfg.max_sampling_rounds or refill is None:
                break
            part = self._rollout(index, *refill(rounds), round_=rounds)
            first.seconds_generation += part.seconds_generation
            first.seconds_scoring += part.seconds_scoring
            rounds += 1
        groups = DS.kept_groups(found, cfg.rollout_batch_size, cfg.actors_per_role)
        stats = {"sampling_rounds": rounds, "informative_groups": found, "trained_groups": groups}
        if groups * k < cfg.mini_batch_size:  # less than one minibatch step: train on the first rollout
            return first, {**stats, "trained_groups": cfg.rollout_batch_size}
        joined = Rollout(DS.join_rollouts([p.batch for p in kept], self.tokenizer.pad_token_id),
                         DS.join_rows([p.scored for p in kept]), DS.join_rows([p.prompts for p in kept]), 0.0, 0.0)
        return DS.take_rows(joined, list(range(groups * k))), stats

    def iteration(self, index: int, prompts: list[str], columns: dict[str, list] | None = None,
                  refill: Refill | None = None) -> dict[str, float]:  # fmt: skip
        """Rollout, scoring, advantages and `ppo_epochs` of updates (policy, and the critic for PPO); the metrics.

        PPO: one reply per prompt, GAE over the critic's values. GRPO / RLOO: `group_size` replies per prompt and a
        group baseline, no critic. The KL to the reference enters the reward or the policy loss (`kl_penalty`).
        With dynamic sampling (GRPO / RLOO), `refill(round)` gives the prompts and columns of each refill round.
        The scores reported (reward, functions, gold, length) are the first rollout's: the policy's replies as
        sampled, before any filter; the KL, advantages and losses are the trained batch's.
        """
        cfg = self.cfg
        first = self._rollout(index, prompts, columns)
        trained, sampling_stats = first, {}
        if getattr(cfg, "dynamic_sampling", False):
            trained, sampling_stats = self._informative(first, index, refill)
        batch, scored = trained.batch, trained.scored
        ref_logprobs, values = scored.ref_logprobs, scored.values
        t_train = time.perf_counter()

        mask = batch["reply_mask"]
        kl = A.kl_per_token(batch["logprobs"], ref_logprobs, cfg.kl_estimator) * mask
        penalised = self._penalised(scored.reward, batch)
        kl_in_loss = cfg.kl_penalty == "loss"
        kl_coef = 0.0 if kl_in_loss else self.kl_controller.value
        advantages, rewards, returns, adv_stats = self._advantages(penalised, kl, mask, values, kl_coef)

        common = {k: batch[k] for k in ("tokens", "attention_mask", "reply_mask", "prompt_len")}
        seed = self.seed * 7919 + index
        policy_batch = {**common, "logprobs": batch["logprobs"], "advantages": advantages}
        if kl_in_loss:
            policy_batch["ref_logprobs"] = ref_logprobs
        policy_refs = self.pool["policy"].submit("train", policy_batch, cfg.ppo_epochs, seed)
        critic_refs = None
        if not cfg.critic_free:
            critic_refs = self.pool["critic"].submit(
                "train", {**common, "values": values, "returns": returns}, cfg.ppo_epochs, seed
            )
        policy_stats = gather(policy_refs, "mean")
        critic_stats = gather(critic_refs, "mean") if critic_refs else {}
        seconds_training = time.perf_counter() - t_train

        # the sequence KL (k1, summed over the reply) is what the controller tracks and what we report
        seq_kl = masked_sum(batch["logprobs"] - ref_logprobs, mask, dim=1)
        self.kl_controller.update(float(seq_kl.mean()), len(trained.prompts))
        sampled, sampled_mask = first.scored, first.batch["reply_mask"]
        seconds = first.seconds_generation + first.seconds_scoring + seconds_training
        metrics = {
            "iteration": index + 1,
            "reward_score": float(sampled.reward.mean()),
            "kl": float(seq_kl.mean()),
            "kl_coef": kl_coef,
            "reward": float(rewards.mean()),
            "response_length": float(sampled_mask.sum(-1).mean()),
            "eos_rate": float(first.batch["ended"].float().mean()),
            **adv_stats,
            **policy_stats,
            **critic_stats,
            **sampling_stats,
            "seconds_generation": first.seconds_generation,
            "seconds_scoring": first.seconds_scoring,
            "seconds_training": seconds_training,
            "samples_per_second": len(trained.prompts) / seconds,
        }
        if sampling_stats:  # the share of flat groups the policy sampled, not of the (filtered) trained batch
            metrics["flat_group_frac"] = float(A.flat_group_fraction(self._penalised(sampled.reward, first.batch),
                                                                     cfg.replies_per_prompt))  # fmt: skip
        if kl_in_loss:
            metrics["loss_kl_coef"] = cfg.loss_kl_coef
        if sampled.rm_scores is not None:
            metrics["rm_score"] = float(sampled.rm_scores.mean())
        metrics.update(function_metrics(sampled.functions, self._thresholds()))
        if sampled.gold is not None:
            metrics["gold_score"] = sum(sampled.gold) / len(sampled.gold)
        return metrics

    # --------------------------------------------------------------------------------------------- evaluation
    def _thresholds(self) -> dict[str, float]:
        return {f.label: f.pass_threshold for f in self.cfg.reward.functions}

    def evaluate(self, prompts: list[str], seed: int, columns: dict[str, list] | None = None) -> dict:
        """Sample one reply per held-out prompt (fixed seed) and score it: RM score, reward functions, gold score,
        KL to the reference."""
        rows: list[dict] = []
        bs = self.cfg.rollout_batch_size
        columns = columns or {}
        for start in range(0, len(prompts), bs):
            chunk = prompts[start : start + bs]
            # every actor of a role needs a shard of the same size: pad the last chunk by repeating its prompts
            # (cyclically: a chunk may hold fewer prompts than there are actors)
            padded = pad_to_multiple(chunk, self.cfg.actors_per_role)
            padded_columns = {c: pad_to_multiple(v[start : start + bs], self.cfg.actors_per_role)
                              for c, v in columns.items()}  # fmt: skip
            batch = self._generate(padded, seed=seed + start)
            scored = self._score(batch, padded, padded_columns, -1, with_values=False)
            seq_kl = masked_sum(batch["logprobs"] - scored.ref_logprobs, batch["reply_mask"], dim=1)
            for i, prompt in enumerate(chunk):
                rows.append({
                    "prompt": prompt, "response": scored.texts[i], "reward_score": float(scored.reward[i]),
                    "rm_score": float(scored.rm_scores[i]) if scored.rm_scores is not None else None,
                    "functions": {label: values[i] for label, values in scored.functions.items()},
                    "kl": float(seq_kl[i]), "gold_score": scored.gold[i] if scored.gold else None,
                })  # fmt: skip
        return {"summary": evaluation_summary(rows, self._thresholds(), has_gold=self.gold is not None), "rows": rows}


@dataclass
class Scored:
    """What scoring one rollout batch gives: the reference's log-probs, the reward per reply (the weighted sum of
    the sources), the reward model's and each function's own scores, the critic's values, the texts, gold scores."""

    ref_logprobs: torch.Tensor
    reward: torch.Tensor
    rm_scores: torch.Tensor | None
    functions: dict[str, list[float | None]]
    values: torch.Tensor | None
    texts: list[str]
    gold: list[float] | None


@dataclass
class Rollout:
    """One sampled and scored rollout: the batch (`stages/common/sequences.py`'s layout), its scores, each row's
    prompt, and the seconds its sampling and scoring took."""

    batch: dict
    scored: Scored
    prompts: list[str]
    seconds_generation: float
    seconds_scoring: float


def reply_token_ids(tokens: torch.Tensor, reply_mask: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """Each reply's token ids (TRL's `completion_ids`)."""
    return [row[mask.bool()].tolist() for row, mask in zip(tokens[:, prompt_len:], reply_mask, strict=True)]


def function_metrics(scores: dict[str, list[float | None]], thresholds: dict[str, float]) -> dict[str, float]:
    """Per function, its mean score and pass rate over the replies it scored: `fn/<label>`, `fn/<label>/pass`."""
    out: dict[str, float] = {}
    rates = pass_rates(scores, thresholds)
    for label, values in scores.items():
        scored = [v for v in values if v is not None]
        if scored:
            out[f"fn/{label}"] = sum(scored) / len(scored)
            out[f"fn/{label}/pass"] = rates[label]
    return out


def evaluation_summary(rows: list[dict], thresholds: dict[str, float], *, has_gold: bool) -> dict:
    """Means over the evaluated replies; `functions` holds each function's mean and pass rate, and
    `function_pass_rate` the share of replies that pass every function that scored them."""
    n = len(rows)
    summary = {
        "reward_score": sum(r["reward_score"] for r in rows) / n,
        "rm_score": sum(r["rm_score"] for r in rows) / n if rows[0]["rm_score"] is not None else None,
        "kl": sum(r["kl"] for r in rows) / n,
        "gold_score": sum(r["gold_score"] for r in rows) / n if has_gold else None,
    }
    if thresholds:
        scores = {label: [r["functions"][label] for r in rows] for label in thresholds}
        rates = pass_rates(scores, thresholds)
        summary["functions"] = {
            label: {"mean": (sum(v for v in values if v is not None) / max(1, sum(v is not None for v in values))),
                    "pass_rate": rates[label]}
            for label, values in scores.items()
        }  # fmt: skip
        passed = [_passes_all(r["functions"], thresholds) for r in rows]
        summary["function_pass_rate"] = sum(passed) / n
    return summary


def _passes_all(scores: dict[str, float | None], thresholds: dict[str, float]) -> bool:
    """A reply passes when at least one function scored it and every function that did passes it."""
    scored = {k: v for k, v in scores.items() if v is not None}
    return bool(scored) and all(v >= thresholds[k] for k, v in scored.items())


def gold_win_rate(before: list[dict], after: list[dict]) -> float:
    """Share of prompts where the PPO reply beats the SFT reply under the gold scorer (ties count half)."""
    wins = [1.0 if a["gold_score"] > b["gold_score"] else 0.5 if a["gold_score"] == b["gold_score"] else 0.0
            for b, a in zip(before, after, strict=True)]  # fmt: skip
    return sum(wins) / len(wins)
