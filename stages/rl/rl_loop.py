"""The RL loop on the driver (PPO, GRPO, RLOO): rollout -> scoring -> advantages -> updates, evaluation, checkpoints.

The driver holds only the tokenizer and small tensors (token ids, log-probs, values, scores); every model lives in
its actor (see `actor_pool.py`). Rollout batch layout: `stages/common/sequences.py`; the objective: `algorithm.py`
(the KL coefficient's controllers: `kl_control.py`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.reward_functions.runner import RewardFunctions, pass_rates, weighted_sum
from stages.rl import algorithm as A
from stages.rl.actor_pool import ActorPool, gather, pad_to_multiple
from stages.rl.config import RLConfig
from stages.rl.kl_control import AdaptiveKLController, FixedKLController
from stages.rl.masked import masked_sum

GoldFn = Callable[[str, str], float]
STATE_FILE = "state.json"


def make_kl_controller(cfg: RLConfig) -> FixedKLController | AdaptiveKLController:
    """The fixed controller by default; Ziegler et al.'s adaptive one when `adaptive_kl`."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def rows_for_iteration(n: int, iteration: int, batch_size: int, seed: int) -> list[int]:
    """The rows of a batch of `n` prompts, drawn without replacement, a pure function of (seed, iteration) so a
    resumed run sees the same data."""
    rng = random.Random(f"ppo/{seed}/{iteration}")
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

    def iteration(self, index: int, prompts: list[str], columns: dict[str, list] | None = None) -> dict[str, float]:
        """Rollout, scoring, advantages and `ppo_epochs` of updates (policy, and the critic for PPO); the metrics.

        PPO: one reply per prompt, GAE over the critic's values. GRPO / RLOO: `group_size` replies per prompt and a
        group baseline, no critic. The KL to the reference enters the reward or the policy loss (`kl_penalty`).
        """
        cfg = self.cfg
        replies_prompts = self._rollout_prompts(prompts)
        replies_columns = {c: self._rollout_prompts(v) for c, v in (columns or {}).items()}
        t0 = time.perf_counter()
        batch = self._generate(replies_prompts, seed=self.seed * 1_000_003 + index)
        t1 = time.perf_counter()
        scored = self._score(batch, replies_prompts, replies_columns, index, with_values=not cfg.critic_free)
        ref_logprobs, scores, values = scored.ref_logprobs, scored.reward, scored.values
        t2 = time.perf_counter()

        mask = batch["reply_mask"]
        kl = A.kl_per_token(batch["logprobs"], ref_logprobs, cfg.kl_estimator) * mask
        penalised = self._penalised(scores, batch)
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
        t3 = time.perf_counter()

        # the sequence KL (k1, summed over the reply) is what the controller tracks and what we report
        seq_kl = masked_sum(batch["logprobs"] - ref_logprobs, mask, dim=1)
        self.kl_controller.update(float(seq_kl.mean()), len(replies_prompts))
        gold = scored.gold
        metrics = {
            "iteration": index + 1,
            "reward_score": float(scores.mean()),
            "kl": float(seq_kl.mean()),
            "kl_coef": kl_coef,
            "reward": float(rewards.mean()),
            "response_length": float(mask.sum(-1).mean()),
            "eos_rate": float(batch["ended"].float().mean()),
            **adv_stats,
            **policy_stats,
            **critic_stats,
            "seconds_generation": t1 - t0,
            "seconds_scoring": t2 - t1,
            "seconds_training": t3 - t2,
            "samples_per_second": len(replies_prompts) / (t3 - t0),
        }
        if kl_in_loss:
            metrics["loss_kl_coef"] = cfg.loss_kl_coef
        if scored.rm_scores is not None:
            metrics["rm_score"] = float(scored.rm_scores.mean())
        metrics.update(function_metrics(scored.functions, self._thresholds()))
        if gold is not None:
            metrics["gold_score"] = sum(gold) / len(gold)
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


# --------------------------------------------------------------------------------------------------- checkpoints
class CheckpointState:
    """Checkpoints under work_dir/checkpoints: DeepSpeed dirs per trainable role (policy, and critic for PPO) plus
    `state.json` (the commit marker).

    state.json holds the iteration, the KL controller, the metric history and the pre-training evaluation, so a
    restarted stage continues the same curves. It is written last and whole on every backend (a local disk: a temp
    file synced and renamed over the old one; an object store: one put of the full bytes), so a crash mid-save leaves
    the previous checkpoint in force. work_dir may be an fsspec URI shared by the nodes of a cluster.
    """

    def __init__(self, work_dir: str):
        import fsspec

        self.is_uri = "://" in work_dir
        self.root = (
            f"{work_dir.rstrip('/')}/checkpoints" if self.is_uri else str(Path(work_dir).resolve() / "checkpoints")
        )
        self.fs, self._path = fsspec.core.url_to_fs(self.root)

    def load(self) -> dict | None:
        path = f"{self._path}/{STATE_FILE}"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def save(self, pool: ActorPool, *, iteration: int, kl_controller, history: list[dict], eval_before: dict) -> None:
        """Every actor of the trainable roles writes its shard, then the driver commits state.json."""
        import uuid

        import fsspec.implementations.local
        import ray

        tag = f"iter-{iteration:06d}"
        self.fs.makedirs(self._path, exist_ok=True)
        ray.get([ref for role in pool.trainable_roles
                 for ref in pool[role].broadcast("save_checkpoint", f"{self.root}/{role}", tag)])  # fmt: skip
        state = {"iteration": iteration, "tag": tag, "kl_controller": kl_controller.state_dict(),
                 "history": history, "eval_before": eval_before}  # fmt: skip
        # The marker is committed whole or not at all, on every backend: serialised before any I/O; on a local disk
        # (a folder or a file:// URI) written to a temp file, synced and renamed over the old one; on an object
        # store one put of the full bytes (an object appears whole). An in-place write cut short by a kill left a
        # truncated state.json that failed every retry.
        data = json.dumps(state).encode()
        target = f"{self._path}/{STATE_FILE}"
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            tmp = Path(self._path) / f".{STATE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            dir_fd = os.open(self._path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        else:
            self.fs.pipe_file(target, data)
        for role in pool.trainable_roles:  # keep only the committed tag
            for old in self.fs.glob(f"{self._path}/{role}/iter-*"):
                if old.rstrip("/").rsplit("/", 1)[-1] != tag:
                    self.fs.rm(old, recursive=True)

    def restore(self, pool: ActorPool, state: dict) -> None:
        """Load the committed tag into every actor of the trainable roles."""
        import ray

        ray.get([ref for role in pool.trainable_roles
                 for ref in pool[role].broadcast("load_checkpoint", f"{self.root}/{role}", state["tag"])])  # fmt: skip
