"""PPO math for RLHF as plain functions over tensors (imports only torch).

Conventions: every per-token tensor covers the *response* tokens only, shape [B, T] (B responses, T = response
length padded on the right); `mask` is 1.0 on real response tokens (up to and including eos) and 0.0 on padding.
The references are Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (KL-penalised reward,
adaptive KL controller) and Stiennon et al. 2020 / Ouyang et al. 2022 (the recipe and its defaults); for the
critic-free methods Shao et al. 2024 (GRPO), Liu et al. 2025 (Dr. GRPO) and Ahmadian et al. 2024 (RLOO); for their
variants Yu et al. 2025 (DAPO: asymmetric clip, dynamic sampling, overlong penalty) and Zheng et al. 2025 (GSPO).
Critic-free batches hold `group_size` replies per prompt in consecutive rows: rows [g*k, (g+1)*k) are group g.
The masked statistics these use are masked.py's; the KL coefficient's controllers, kl_control.py's.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from stages.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

KLEstimator = Literal["k1", "k3"]
Method = Literal["ppo", "grpo", "rloo"]
ImportanceRatio = Literal["token", "sequence"]


# --------------------------------------------------------------------------------------------------------- KL
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    With log r = log p_ref - log p_policy: k1 = -log r (unbiased, can be negative per token);
    k3 = (r - 1) - log r (unbiased, always >= 0, lower variance). See J. Schulman, "Approximating KL divergence".
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator: expected 'k1' or 'k3', found {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded mask: [B, T] -> [B] (0 for an empty row)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def clip_scores(scores: torch.Tensor, reward_clip: float | None) -> torch.Tensor:
    """Scores clipped to [-reward_clip, reward_clip]; unchanged when `reward_clip` is None (off)."""
    return scores if reward_clip is None else scores.clamp(-reward_clip, reward_clip)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL at every response token, plus the reply's score at the last one.

    scores: [B] (already clipped, `clip_scores`); kl, mask: [B, T] -> rewards [B, T].
    """
    rewards = -kl_coef * kl * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


# ------------------------------------------------------------------------------------------------ GAE, advantages
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; the episode ends after the last masked token.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the end = 0); A_t = delta_t + gamma * lam * A_{t+1}.
    Returns (advantages, returns = advantages + values), both [B, T] and zero on padding.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# -------------------------------------------------------------------------------------- critic-free advantages
def grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] sequence scores -> [B / k, k], one row per prompt's group (consecutive rows of the rollout batch)."""
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(
            f"grouped: expected group_size >= 2 dividing the {scores.shape[0]} scores, found group_size {group_size}"
        )
    return scores.reshape(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage per reply: (r - mean_group) / (std_group + eps), [B] -> [B].

    std is the unbiased (Bessel-corrected) std of the group, as in the GRPO paper's implementations; `scale=False`
    keeps only the mean-centring (Dr. GRPO: the std division over-weights groups whose replies barely differ).
    """
    g = grouped(scores.float(), group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reply's reward minus the mean of the other k - 1 rewards of its group, [B] -> [B].

    The baseline excludes the reply itself, so it is independent of that sample and the estimate stays unbiased;
    algebraically r_i - (sum - r_i) / (k - 1) = k / (k - 1) * (r_i - mean).
    """
    g = grouped(scores.float(), group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def flat_group_fraction(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Share of groups whose replies all scored the same: they give a zero advantage, hence no learning signal."""
    return (~informative_groups(scores, group_size)).float().mean()


def informative_groups(scores: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: True for each group whose rewards are not all equal, [B] -> [B / k] bool.

    A group whose replies all got the same reward has zero advantage on every reply (under GRPO and RLOO alike), so
    it adds no policy gradient and only dilutes the batch; DAPO drops such groups and samples others in their
    place. `tol` > 0 also counts a group as flat when its rewards spread by at most `tol` (noisy float scores).
    """
    g = grouped(scores, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) > tol


def informative_rows(scores: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """`informative_groups` spread to the rows of each group: [B] -> [B] bool, for indexing the rollout batch."""
    return informative_groups(scores, group_size, tol).repeat_interleave(group_size)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to each reply's score: [B] reply lengths -> [B] penalties <= 0.

    0 up to max_new_tokens - buffer tokens, then falling linearly to -factor at max_new_tokens (and -factor past it),
    so a reply is told it is running long before the hard cut rather than only being truncated.
    """
    if not 0 < buffer < max_new_tokens:
        raise ValueError(f"overlong_penalty: expected 0 < buffer < max_new_tokens ({max_new_tokens}), found {buffer}")
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(0.0, float(buffer))  # tokens into the buffer
    return -factor * over / buffer


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """One reward per reply for the critic-free methods: score - kl_coef * (KL summed over the reply), [B]."""
    return scores.float() - kl_coef * masked_sum(kl, mask, dim=1)


def broadcast_over_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence advantage [B] on every response token: [B] -> [B, T], zero on padding."""
    return advantages.to(mask.dtype).unsqueeze(1) * mask


# ------------------------------------------------------------------------------------------------------- losses
def sequence_importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level ratio s_i = exp(mean over the reply's tokens of (logp - old_logp)), on every token: [B, T].

    Written in GSPO-token's stop-gradient form s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]: the value is s_i on every
    token, and d s_i,t / d logp_t = s_i, so each token's gradient is its own log-prob's scaled by the sequence ratio.
    The length-normalised ratio does not grow with the reply's length the way a product of token ratios would.
    """
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=1).detach().unsqueeze(1)
    # logprobs - logprobs.detach() is 0 in value but passes a gradient of 1 to each token's log-prob
    return torch.exp(seq_log_ratio + logprobs - logprobs.detach())


def importance_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: ImportanceRatio = "token"
) -> torch.Tensor:
    """pi / pi_old per token ("token": PPO's) or per reply broadcast over its tokens ("sequence": GSPO's), [B, T]."""
    if level == "token":
        return torch.exp(logprobs - old_logprobs)
    if level == "sequence":
        return sequence_importance_ratio(logprobs, old_logprobs, mask)
    raise ValueError(f"importance ratio: expected 'token' or 'sequence', found {level!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    clip_low: float | None = None,
    clip_high: float | None = None,
    ratio_level: ImportanceRatio = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: mean over tokens of max(-A * ratio, -A * clamp(ratio, 1 - low, 1 + high)).

    low and high default to `clip` (PPO's symmetric range); DAPO's clip-higher sets high > low, so tokens the policy
    found unlikely can still gain probability while the lower bound stays tight. `ratio_level` "sequence" takes
    GSPO's sequence ratio (`sequence_importance_ratio`) in place of the per-token one.
    Returns (loss, {"clip_frac", "approx_kl"}): the share of tokens where the clipped term was taken, and
    0.5 * mean((log ratio)^2) over the per-token log ratios, the usual cheap estimate of how far this update moved
    the policy.
    """
    low = clip if clip_low is None else clip_low
    high = clip if clip_high is None else clip_high
    log_ratio = logprobs - old_logprobs
    ratio = importance_ratio(logprobs, old_logprobs, mask, ratio_level)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
        }
    return loss, stats


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL loss term: the masked mean of k3 = exp(log ratio) - log ratio - 1, with log ratio = ref - policy.

    k3 is >= 0 and its gradient pulls the policy toward the reference (k1 as a loss has zero expected gradient).
    """
    return masked_mean(kl_per_token(logprobs, ref_logprobs, "k3"), mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (clamp(V, V_old +- clip) - R)^2)); returns (loss, {"clip_frac"})."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


# ------------------------------------------------------------------------------------ the objective, assembled
# What one RL iteration optimises, read top to bottom: the reply's score with its penalties (`penalised_scores`),
# the advantages of the method (`advantages`: PPO's GAE over the critic, GRPO's or RLOO's group baseline), the policy's
# loss on them (`policy_objective`) and, for PPO, the critic's (`value_loss`). The loop (`rl_loop.py`) and the
# actors (`actors.py`) only call these.
def penalised_scores(
    scores: torch.Tensor,
    ended: torch.Tensor,
    lengths: torch.Tensor,
    *,
    missing_eos_penalty: float | None,
    overlong_buffer: int | None,
    max_new_tokens: int,
    overlong_factor: float = 1.0,
) -> torch.Tensor:
    """Each reply's score less its penalties: `missing_eos_penalty` off a reply that never ended (ended [B] False),
    DAPO's `overlong_penalty` over the last `overlong_buffer` tokens of the budget (lengths [B]). [B] -> [B]."""
    penalised = scores.clone()
    if missing_eos_penalty is not None:
        penalised[~ended] -= missing_eos_penalty
    if overlong_buffer is not None:
        penalised += overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_factor)
    return penalised


class Advantages(NamedTuple):
    """What `advantages` gives: token advantages [B, T], the reward per reply [B] (PPO: its shaped per-token reward
    summed), the value targets [B, T] (PPO; None for the critic-free methods) and the metrics to report."""

    advantages: torch.Tensor
    rewards: torch.Tensor
    returns: torch.Tensor | None
    stats: dict[str, float]


def advantages(
    method: Method,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    kl_coef: float,
    *,
    reward_clip: float | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    group_size: int = 1,
    scale_rewards: bool = True,
) -> Advantages:
    """The method's advantages from the replies' (penalised) scores [B], the per-token KL [B, T] and the critic's
    values [B, T] (PPO only); `kl_coef` weights the KL in the reward (0 when the KL is a loss term instead).

    Scores are clipped first (`clip_scores`). PPO: the per-token shaped reward (`shape_rewards`), GAE over the values
    (gamma, lam), whitened over the batch (`whiten`). GRPO / RLOO: one reward per reply (`sequence_rewards`), the
    group baseline of `group_size` consecutive rows (GRPO: / group std when `scale_rewards`), on every reply token.
    """
    scores = clip_scores(scores, reward_clip)
    if method == "ppo":
        rewards = shape_rewards(scores, kl, mask, kl_coef)
        adv, returns = gae(rewards, values, mask, gamma, lam)
        if whiten:
            adv = masked_whiten(adv, mask)
        stats = {"advantage_mean": float(masked_mean(adv, mask)),
                 "advantage_std": float(masked_var(adv, mask).sqrt())}  # fmt: skip
        return Advantages(adv, rewards.sum(-1), returns, stats)
    rewards = sequence_rewards(scores, kl, mask, kl_coef)
    if method == "grpo":
        seq_adv = grpo_advantages(rewards, group_size, scale=scale_rewards)
    elif method == "rloo":
        seq_adv = rloo_advantages(rewards, group_size)
    else:
        raise ValueError(f"advantages: expected method 'ppo', 'grpo' or 'rloo', found {method!r}")
    stats = {"advantage_mean": float(seq_adv.mean()), "advantage_std": float(seq_adv.std()),
             "advantage_abs_max": float(seq_adv.abs().max()),
             "flat_group_frac": float(flat_group_fraction(rewards, group_size))}  # fmt: skip
    return Advantages(broadcast_over_tokens(seq_adv, mask), rewards, None, stats)


def policy_objective(
    logprobs: torch.Tensor,
    entropies: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
    clip_low: float | None = None,
    clip_high: float | None = None,
    ratio_level: ImportanceRatio = "token",
    entropy_coef: float = 0.0,
    loss_kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's loss on one minibatch: the clipped surrogate (`policy_loss`), less entropy_coef * the mean
    entropy (when > 0), plus loss_kl_coef * the k3 KL to the reference (`kl_loss`) when `ref_logprobs` are given
    (kl_penalty "loss", GRPO's default).

    Returns (loss, {"policy_loss": the loss, "entropy", "clip_frac", "approx_kl"[, "kl_loss"]}).
    """
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip, clip_low=clip_low, clip_high=clip_high,
                              ratio_level=ratio_level)  # fmt: skip
    entropy = masked_mean(entropies, mask)
    if entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    if ref_logprobs is not None:
        kl_term = kl_loss(logprobs, ref_logprobs, mask)
        loss = loss + loss_kl_coef * kl_term
        stats = {**stats, "kl_loss": kl_term}
    return loss, {"policy_loss": loss, "entropy": entropy, **stats}
