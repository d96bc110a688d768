"""The RL objective as `algorithm.py` assembles it (penalties, advantages per method, policy loss), by hand, and the
loop's choice of it from the config section (`RLLoop._penalised`, `RLLoop._advantages`; no Ray, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.rl import algorithm as A
from stages.rl.config import GRPOConfig, PPOConfig, RLOOConfig
from stages.rl.masked import masked_whiten
from stages.rl.rl_loop import RLLoop


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def loop(cfg) -> RLLoop:
    return RLLoop(cfg, None, None, gold=None, seed=0)  # the advantage and penalty steps touch no actor


# ----------------------------------------------------------------------------------------------- penalties
def test_penalised_scores_by_hand():
    scores = torch.tensor([1.0, 1.0, 1.0])
    ended, lengths = torch.tensor([True, False, False]), torch.tensor([2, 8, 7])
    # missing eos: -0.5 off rows 1 and 2; overlong over the last 4 of 8 tokens: 8 -> -1, 7 -> -0.75, 2 -> 0
    out = A.penalised_scores(scores, ended, lengths, missing_eos_penalty=0.5, overlong_buffer=4, max_new_tokens=8)
    assert close(out, [1.0, -0.5, -0.25])
    assert close(scores, [1.0, 1.0, 1.0])  # the input is not changed in place
    off = A.penalised_scores(scores, ended, lengths, missing_eos_penalty=None, overlong_buffer=None, max_new_tokens=8)
    assert close(off, scores)
    half = A.penalised_scores(scores, ended, lengths, missing_eos_penalty=None, overlong_buffer=4, max_new_tokens=8,
                              overlong_factor=0.5)  # fmt: skip
    assert close(half, [1.0, 0.5, 0.625])


def test_the_loop_takes_the_eos_and_overlong_penalties_from_its_section():
    batch = {"ended": torch.tensor([True, False, False]),
             "reply_mask": torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [1.0] * 8, [1.0] * 7 + [0.0]])}  # fmt: skip
    scores = torch.tensor([1.0, 1.0, 1.0])
    # the default: 1.0 off a reply cut before its eos, no overlong penalty
    assert close(loop(PPOConfig(max_new_tokens=8))._penalised(scores, batch), [1.0, 0.0, 0.0])
    cfg = GRPOConfig(max_new_tokens=8, missing_eos_penalty=0.5, overlong_buffer=4)
    assert close(loop(cfg)._penalised(scores, batch), [1.0, -0.5, -0.25])
    assert close(loop(PPOConfig(max_new_tokens=8, missing_eos_penalty=None))._penalised(scores, batch), scores)


# ---------------------------------------------------------------------------------------------- advantages
PPO_CASE = {"scores": torch.tensor([1.0]), "kl": torch.tensor([[0.2, 0.4]]), "mask": torch.ones(1, 2),
            "values": torch.tensor([[0.5, 0.25]])}  # fmt: skip


def test_ppo_advantages_clip_shape_and_gae_by_hand():
    c = PPO_CASE
    out = A.advantages("ppo", c["scores"], c["kl"], c["mask"], c["values"], 0.5, reward_clip=0.5, gamma=1.0, lam=1.0,
                       whiten=False)  # fmt: skip
    # score clipped to 0.5; rewards -0.5 * KL = [-0.1, -0.2] plus the score at the last token: [-0.1, 0.3]
    # t=1: delta = 0.3 - 0.25 = 0.05; t=0: delta = -0.1 + 0.25 - 0.5 = -0.35, A = -0.35 + 0.05 = -0.3
    assert close(out.advantages, [[-0.3, 0.05]])
    assert close(out.returns, [[0.2, 0.3]])  # advantages + values
    assert close(out.rewards, [0.2])  # the shaped reward summed over the reply
    # mean -0.125; unbiased variance 2 * 0.175^2 / 1
    assert out.stats == pytest.approx({"advantage_mean": -0.125, "advantage_std": math.sqrt(2 * 0.175**2)})
    whitened = A.advantages("ppo", c["scores"], c["kl"], c["mask"], c["values"], 0.5, reward_clip=0.5, lam=1.0)
    assert close(whitened.advantages, masked_whiten(out.advantages, c["mask"]))


GROUP_CASE = {"scores": torch.tensor([1.0, 2.0, 3.0, 6.0]), "mask": torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]),
              # KL summed per reply: 0, 0, 0, 2 -> with kl_coef 0.5 the rewards are 1, 2, 3, 5
              "kl": torch.tensor([[0.0, 0.0], [0.0, 9.0], [0.0, 0.0], [1.5, 0.5]])}  # fmt: skip


def test_grpo_and_rloo_advantages_by_hand():
    c = GROUP_CASE
    grpo = A.advantages("grpo", c["scores"], c["kl"], c["mask"], None, 0.5, group_size=4, scale_rewards=False)
    assert close(grpo.rewards, [1.0, 2.0, 3.0, 5.0]) and grpo.returns is None  # the masked KL (9.0) does not count
    # mean 2.75, on every reply token, zero on padding
    assert close(grpo.advantages, [[-1.75, -1.75], [-0.75, 0.0], [0.25, 0.25], [2.25, 2.25]])  # row 1: padding
    assert grpo.stats == pytest.approx({"advantage_mean": 0.0, "advantage_std": math.sqrt((1.75**2 + 0.75**2 + 0.25**2
                                        + 2.25**2) / 3), "advantage_abs_max": 2.25, "flat_group_frac": 0.0})  # fmt: skip
    scaled = A.advantages("grpo", c["scores"], c["kl"], c["mask"], None, 0.5, group_size=4)
    assert close(scaled.advantages[:, 0], A.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0]), 4))
    rloo = A.advantages("rloo", c["scores"], c["kl"], c["mask"], None, 0.5, group_size=4)
    # baseline: the mean of the other three, (11 - r) / 3 = 10/3, 3, 8/3, 2
    assert close(rloo.advantages[:, 0], [1 - 10 / 3, -1.0, 1 / 3, 3.0])
    # the clip comes first: scores 1, 2, 2.5, 2.5 (no KL): baselines 7/3, 2, 11/6, 11/6
    clipped = A.advantages("rloo", c["scores"], torch.zeros(4, 2), c["mask"], None, 0.5, reward_clip=2.5, group_size=4)
    assert close(clipped.rewards, [1.0, 2.0, 2.5, 2.5])
    assert close(clipped.advantages[:, 0], [-4 / 3, 0.0, 2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="expected method 'ppo', 'grpo' or 'rloo', found 'dpo'"):
        A.advantages("dpo", c["scores"], c["kl"], c["mask"], None, 0.5, group_size=4)


def test_the_loop_chooses_each_sections_advantages():
    c = PPO_CASE
    ppo = loop(PPOConfig(reward_clip=0.5, lam=1.0, whiten_advantages=False))
    adv, rewards, returns, stats = ppo._advantages(c["scores"], c["kl"], c["mask"], c["values"], 0.5)
    assert close(adv, [[-0.3, 0.05]]) and close(returns, [[0.2, 0.3]]) and close(rewards, [0.2])
    whitened, *_ = loop(PPOConfig(reward_clip=0.5, lam=1.0))._advantages(c["scores"], c["kl"], c["mask"],
                                                                         c["values"], 0.5)  # fmt: skip
    assert close(whitened, masked_whiten(adv, c["mask"]))  # whiten_advantages defaults to on
    g = GROUP_CASE
    # GRPO: scale_rewards on by default, off for Dr. GRPO; RLOO: the leave-one-out baseline; no returns either way
    expected = [
        (GRPOConfig(group_size=4), A.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0]), 4)),
        (GRPOConfig(group_size=4, scale_rewards=False), torch.tensor([-1.75, -0.75, 0.25, 2.25])),
        (RLOOConfig(group_size=4), torch.tensor([1 - 10 / 3, -1.0, 1 / 3, 3.0])),
        (RLOOConfig(group_size=4, reward_clip=2.0), torch.tensor([-1.0, 1 / 3, 1 / 3, 1 / 3])),  # scores 1, 2, 2, 2
    ]
    for cfg, seq_adv in expected:
        kl = g["kl"] if cfg.reward_clip is None else torch.zeros(4, 2)
        adv, rewards, returns, stats = loop(cfg)._advantages(g["scores"], kl, g["mask"], None, 0.5)
        assert returns is None and "flat_group_frac" in stats, cfg
        assert close(adv, seq_adv.unsqueeze(1) * g["mask"]), cfg


# --------------------------------------------------------------------------------------------- policy loss
def test_policy_objective_adds_the_entropy_bonus_and_the_kl_loss_by_hand():
    zeros, mask = torch.zeros(1, 2), torch.ones(1, 2)
    adv, entropies = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, 1.5]])
    ref = torch.tensor([[math.log(2.0), 0.0]])
    # ratio 1: surrogate -mean(A) = -2; entropy mean 1.0 at coefficient 0.1; k3 with log r = ln 2: 1 - ln 2, and 0
    loss, stats = A.policy_objective(zeros, entropies, zeros, adv, mask, ref, entropy_coef=0.1, loss_kl_coef=0.2)
    kl = (1 - math.log(2.0)) / 2
    assert float(loss) == pytest.approx(-2.0 - 0.1 + 0.2 * kl)
    assert {k: float(v) for k, v in stats.items()} == pytest.approx(
        {"policy_loss": -2.1 + 0.2 * kl, "entropy": 1.0, "clip_frac": 0.0, "approx_kl": 0.0, "kl_loss": kl})
    # no reference (kl_penalty "reward") and no entropy bonus: the clipped surrogate alone, still reporting entropy
    plain, plain_stats = A.policy_objective(zeros, entropies, zeros, adv, mask)
    surrogate, _ = A.policy_loss(zeros, zeros, adv, mask)
    assert float(plain) == float(surrogate) == -2.0
    assert set(plain_stats) == {"policy_loss", "entropy", "clip_frac", "approx_kl"}
    # the clip settings reach the surrogate: ratio e^0.5 clipped at 1.2 with a positive advantage
    up = torch.tensor([[0.5, 0.5]])
    clipped, clip_stats = A.policy_objective(up, entropies, zeros, adv, mask, clip=0.9, clip_high=0.2)
    assert float(clipped) == pytest.approx(-2.0 * 1.2) and float(clip_stats["clip_frac"]) == 1.0


def test_policy_objective_gradient_flows_through_the_kl_and_entropy_terms():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    entropies = torch.tensor([[0.5, 1.5]], requires_grad=True)
    loss, _ = A.policy_objective(logprobs, entropies, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                 torch.zeros(1, 2), entropy_coef=0.1, loss_kl_coef=0.2)  # fmt: skip
    loss.backward()
    assert close(entropies.grad, [[-0.05, -0.05]])  # -0.1 * d mean / d entropy
    assert close(logprobs.grad, [[0.0, 0.0]])  # zero advantage, and k3's gradient is 0 where policy == reference
