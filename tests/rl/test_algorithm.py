"""PPO math against values computed by hand (stages/rl/algorithm.py, masked.py, kl_control.py: torch or nothing)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.common.forwards import entropy_from_logits, logprobs_from_logits
from stages.rl import algorithm as A
from stages.rl import masked as M
from stages.rl.kl_control import AdaptiveKLController, FixedKLController


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# ------------------------------------------------------------------------------------------------ masked stats
def test_masked_mean_ignores_padding_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 50.0, 60.0, 70.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert close(M.masked_mean(x, m), (1 + 2 + 3 + 4) / 4)
    assert close(M.masked_mean(x, m, dim=1), [2.0, 4.0])
    assert close(M.masked_mean(x, torch.zeros_like(m)), 0.0)


def test_masked_var_and_whiten_by_hand():
    # unmasked values 1, 2, 3: mean 2, unbiased variance ((1)^2 + 0 + (1)^2) / 2 = 1 -> whitened -1, 0, 1.
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert close(M.masked_var(x, m), 1.0)
    assert close(M.masked_var(x, m, unbiased=False), 2.0 / 3.0)
    assert close(M.masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)
    # without shifting the mean, the mean (2) is added back: 1, 2, 3 stay centred on 2 with unit variance.
    assert close(M.masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        M.masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]))


# -------------------------------------------------------------------------------------------------- KL, entropy
P = torch.tensor([0.5, 0.5])  # policy
Q = torch.tensor([0.9, 0.1])  # reference
KL_PQ = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108...


def test_k1_and_k3_per_token_by_hand():
    logp, logq = P.log(), Q.log()
    # k1 = log p - log q: token 0 -> log(0.5/0.9) = -0.5878 (k1 can be negative), token 1 -> log 5 = 1.6094.
    assert close(A.kl_per_token(logp, logq, "k1"), [math.log(0.5 / 0.9), math.log(5.0)])
    # k3 = (r - 1) - log r with r = q / p: r = 1.8 -> 0.8 - log 1.8 = 0.2122; r = 0.2 -> -0.8 - log 0.2 = 0.8094.
    assert close(A.kl_per_token(logp, logq, "k3"), [0.8 - math.log(1.8), -0.8 - math.log(0.2)])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased_on_a_known_pair(estimator):
    # the expectation under the policy (tokens weighted by p) equals the true KL(p || q) for both estimators
    per_token = A.kl_per_token(P.log(), Q.log(), estimator)
    assert close((P * per_token).sum(), KL_PQ)
    assert not close((Q * per_token).sum(), KL_PQ)  # weighting by the wrong distribution does not


def test_kl_of_identical_policies_is_zero_and_bad_estimator_is_rejected():
    logp = torch.log(torch.tensor([0.2, 0.3, 0.5]))
    assert close(A.kl_per_token(logp, logp, "k1"), [0, 0, 0])
    assert close(A.kl_per_token(logp, logp, "k3"), [0, 0, 0])
    with pytest.raises(ValueError, match="k2"):
        A.kl_per_token(logp, logp, "k2")


def test_entropy_and_logprobs_from_logits():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))  # [B=1, T=2, V=3]
    assert close(entropy_from_logits(logits), [[0.5 * math.log(2) + 0.5 * math.log(4), math.log(3)]])
    tokens = torch.tensor([[1, 2]])
    assert close(logprobs_from_logits(logits, tokens), [[math.log(0.25), math.log(1 / 3)]])


# -------------------------------------------------------------------------------------------- rewards and GAE
def test_shape_rewards_puts_score_on_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = A.shape_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert close(rewards, [[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.05, -0.05, -0.05, -0.05 - 1.0]])
    clipped = A.shape_rewards(A.clip_scores(torch.tensor([2.0, -1.0]), 0.5), kl, mask, kl_coef=0.5)
    assert close(clipped[:, 2:], [[-0.15 + 0.5, 0.0], [-0.05, -0.05 - 0.5]])


def test_gae_on_a_short_sequence_by_hand():
    # gamma 1, lambda 0.5; rewards 0, 0, 1; values 0.5, 0.6, 0.7; value after the end = 0.
    # t=2: delta = 1 + 0 - 0.7 = 0.3,      A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1,    A1 = 0.1 + 0.5 * 0.3 = 0.25
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1,    A0 = 0.1 + 0.5 * 0.25 = 0.225
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = A.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert close(adv, [[0.225, 0.25, 0.3]])
    assert close(ret, [[0.725, 0.85, 1.0]])


def test_gae_stops_at_the_mask_and_discounts():
    # second token is the last: the padded third position (garbage 99s) must not leak in.
    # t=1: delta = 1 - 0.4 = 0.6, A1 = 0.6; t=0: delta = 0 + 0.4 - 0.2 = 0.2, A0 = 0.2 + 0.5 * 0.6 = 0.5
    adv, ret = A.gae(
        torch.tensor([[0.0, 1.0, 99.0]]),
        torch.tensor([[0.2, 0.4, 99.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        gamma=1.0,
        lam=0.5,
    )
    assert close(adv, [[0.5, 0.6, 0.0]])
    assert close(ret, [[0.7, 1.0, 0.0]])
    # gamma 0.5, lambda 1, zero values: advantages are discounted returns: A1 = 2, A0 = 1 + 0.5 * 2 = 2
    adv, _ = A.gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert close(adv, [[2.0, 2.0]])


# ------------------------------------------------------------------------------------------------------ losses
def _policy_loss_at(ratio: float, advantage: float):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = A.policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), clip=0.2)
    loss.backward()
    return loss.item(), logprobs.grad.item(), stats["clip_frac"].item()


def test_policy_loss_clips_above_with_positive_advantage():
    loss, grad, clip_frac = _policy_loss_at(1.5, +1.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and clip_frac == 1.0  # no incentive past 1 + eps
    loss, grad, clip_frac = _policy_loss_at(1.5, -1.0)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and clip_frac == 0.0  # undoing stays allowed


def test_policy_loss_clips_below_with_negative_advantage():
    loss, grad, clip_frac = _policy_loss_at(0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0 and clip_frac == 1.0  # no incentive below 1 - eps
    loss, grad, clip_frac = _policy_loss_at(0.5, +1.0)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5) and clip_frac == 0.0


def test_policy_loss_approx_kl_and_mask():
    logprobs = torch.tensor([[math.log(2.0), 5.0]])
    _, stats = A.policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    assert stats["approx_kl"].item() == pytest.approx(0.5 * math.log(2.0) ** 2)  # padding (log ratio 5) ignored


def test_value_loss_clipping():
    # old 0, new 1, return 1, clip 0.2: clipped value 0.2 -> error 0.64 beats 0 -> loss 0.5 * 0.64
    loss, stats = A.value_loss(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.32) and stats["clip_frac"].item() == 1.0
    # inside the clip range both terms agree: 0.5 * (1 - 0.1)^2
    loss, stats = A.value_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.405) and stats["clip_frac"].item() == 0.0


# -------------------------------------------------------------------------------------------------- controllers
def test_adaptive_kl_controller_update_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=6.6, n_steps=1000)  # error 0.1 -> x (1 + 0.1 * 0.1)
    assert c.value == pytest.approx(0.101)
    c.update(current_kl=60.0, n_steps=1000)  # error 9 clipped to 0.2 -> x 1.02
    assert c.value == pytest.approx(0.101 * 1.02)
    c.update(current_kl=0.0, n_steps=1000)  # error -1 clipped to -0.2 -> x 0.98
    assert c.value == pytest.approx(0.101 * 1.02 * 0.98)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(c.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (c.value, 6.0, 10000)


def test_fixed_kl_controller_does_not_move():
    c = FixedKLController()
    assert c.value == 0.05
    c.update(100.0, 1000)
    assert c.value == 0.05
    c2 = FixedKLController(0.3)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


# ------------------------------------------------------------------------------------------- one PPO update
def test_one_ppo_update_moves_policy_toward_higher_advantage_tokens():
    torch.manual_seed(0)
    V, B, T = 5, 8, 6
    policy = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))  # next token from the previous one
    prev = torch.randint(0, V, (B, T))
    tokens = torch.randint(0, V, (B, T))
    tokens[:, ::2] = 3  # a good token
    tokens[:, 1::2] = 1  # a bad token
    advantages = torch.where(tokens == 3, 1.0, -1.0)
    mask = torch.ones(B, T)

    def probs_of(token: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(policy(prev), -1)[..., token].mean()

    with torch.no_grad():
        old_logprobs = logprobs_from_logits(policy(prev), tokens)
    good_before, bad_before = probs_of(3), probs_of(1)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(4):  # one PPO update = a few epochs on the same batch
        loss, stats = A.policy_loss(logprobs_from_logits(policy(prev), tokens), old_logprobs, advantages, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probs_of(3) > good_before + 0.01
    assert probs_of(1) < bad_before - 0.01
    assert 0.0 < stats["approx_kl"].item() < 0.5


# ------------------------------------------------------------------------- DAPO: asymmetric clip (clip-higher)
def _asym_loss_at(ratio: float, advantage: float, low: float | None, high: float | None, clip: float = 0.2):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = A.policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1),
                                clip=clip, clip_low=low, clip_high=high)  # fmt: skip
    loss.backward()
    return loss.item(), logprobs.grad.item(), stats["clip_frac"].item()


def test_asymmetric_clip_upper_bound_by_hand():
    # ratio 1.5, A = +1, low 0.2 / high 0.28: clamp -> 1.28, max(-1.5, -1.28) = -1.28, no gradient past the bound
    loss, grad, clip_frac = _asym_loss_at(1.5, +1.0, low=0.2, high=0.28)
    assert loss == pytest.approx(-1.28) and grad == 0.0 and clip_frac == 1.0
    # ratio 1.25 sits inside [0.8, 1.28]: loss -1.25, d(-ratio)/d logp = -ratio = -1.25 (the symmetric 0.2 would clip)
    loss, grad, clip_frac = _asym_loss_at(1.25, +1.0, low=0.2, high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and clip_frac == 0.0
    loss, grad, clip_frac = _asym_loss_at(1.25, +1.0, low=None, high=None)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and clip_frac == 1.0


def test_asymmetric_clip_lower_bound_by_hand():
    # ratio 0.7, A = -1, low 0.2: clamp -> 0.8, max(0.7, 0.8) = 0.8, no gradient below 1 - low
    loss, grad, clip_frac = _asym_loss_at(0.7, -1.0, low=0.2, high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0 and clip_frac == 1.0
    # low 0.35 lets 0.7 through: loss 0.7, gradient d(ratio)/d logp = 0.7; high alone leaves the lower side at clip
    loss, grad, clip_frac = _asym_loss_at(0.7, -1.0, low=0.35, high=None)
    assert loss == pytest.approx(0.7) and grad == pytest.approx(0.7) and clip_frac == 0.0
    loss, _, clip_frac = _asym_loss_at(0.7, -1.0, low=None, high=0.28)
    assert loss == pytest.approx(0.8) and clip_frac == 1.0


def test_asymmetric_clip_with_equal_bounds_is_the_symmetric_clip():
    torch.manual_seed(0)
    old = torch.randn(3, 5)
    new = (old + 0.5 * torch.randn(3, 5)).requires_grad_(True)
    adv, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.3).float()
    sym, sym_stats = A.policy_loss(new, old, adv, mask, clip=0.2)
    (sym_grad,) = torch.autograd.grad(sym, new)
    asym, asym_stats = A.policy_loss(new, old, adv, mask, clip=0.9, clip_low=0.2, clip_high=0.2)
    (asym_grad,) = torch.autograd.grad(asym, new)
    assert torch.equal(sym, asym) and torch.equal(sym_grad, asym_grad)
    assert sym_stats["clip_frac"] == asym_stats["clip_frac"] and sym_stats["clip_frac"] > 0  # some tokens clipped


# ----------------------------------------------------------------------------------- DAPO: dynamic sampling
def test_informative_groups_drop_the_flat_group():
    # k = 4: group 0 (1, 1, 0, 1) varies, group 1 (0.5 x 4) is flat, group 2 (0, 0, 0, 1) varies
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])
    assert A.informative_groups(scores, 4).tolist() == [True, False, True]
    assert A.informative_rows(scores, 4).tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert A.flat_group_fraction(scores, 4).item() == pytest.approx(1 / 3)
    # the flat group is exactly the one whose GRPO advantages are all zero
    adv = A.grpo_advantages(scores, 4)
    assert torch.equal(adv[4:8], torch.zeros(4)) and (adv[A.informative_rows(scores, 4)] != 0).any()


def test_informative_groups_tolerance_and_bad_group_size():
    scores = torch.tensor([1.0, 1.0005, 0.0, 1.0])  # spreads 0.0005 and 1
    assert A.informative_groups(scores, 2).tolist() == [True, True]
    assert A.informative_groups(scores, 2, tol=1e-3).tolist() == [False, True]
    with pytest.raises(ValueError, match="group_size"):
        A.informative_groups(scores, 3)


# ------------------------------------------------------------------------------------ DAPO: overlong penalty
def test_overlong_penalty_below_inside_and_at_the_end_of_the_buffer():
    # max 20, buffer 5, factor 0.5: free up to 15 tokens; 16 -> -0.5 * 1/5 = -0.1; 17 -> -0.2; 20 -> -0.5
    lengths = torch.tensor([3, 15, 16, 17, 20])
    assert close(A.overlong_penalty(lengths, max_new_tokens=20, buffer=5, factor=0.5), [0.0, 0.0, -0.1, -0.2, -0.5])
    # factor 1 (the default): the end of the buffer costs the whole factor, and nothing goes below it
    assert close(A.overlong_penalty(torch.tensor([18, 20, 25]), 20, 5), [-0.6, -1.0, -1.0])


def test_overlong_penalty_rejects_a_buffer_that_does_not_fit():
    for buffer in (0, 20, 21):
        with pytest.raises(ValueError, match="buffer < max_new_tokens"):
            A.overlong_penalty(torch.tensor([10]), max_new_tokens=20, buffer=buffer)


# ---------------------------------------------------------------------------------- GSPO: sequence-level ratio
def test_sequence_ratio_is_exp_of_the_mean_log_ratio_on_every_token():
    # row 0: log ratios 0.2, -0.1 and padding (5.0, ignored): mean 0.05 -> e^0.05 = 1.05127 on every token
    # row 1: log ratios 0.3, 0.3, 0.3 -> e^0.3 = 1.34986
    logprobs = torch.tensor([[0.2, -0.1, 5.0], [0.3, 0.3, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ratio = A.sequence_importance_ratio(logprobs, torch.zeros(2, 3), mask)
    assert close(ratio, [[math.exp(0.05)] * 3, [math.exp(0.3)] * 3])
    assert close(A.importance_ratio(logprobs, torch.zeros(2, 3), mask, "token"), logprobs.exp())
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        A.importance_ratio(logprobs, torch.zeros(2, 3), mask, "tokens")


def test_sequence_ratio_gradient_is_per_token_by_hand():
    # one reply, log ratios ln 2 and 0: s = exp((ln 2 + 0) / 2) = sqrt 2.
    # stop-gradient form s_t = sg[s] * pi(y_t) / sg[pi(y_t)]: d s_0 / d logp = (sqrt 2, 0), only token 0's own
    # log-prob (differentiating exp(mean) directly would give (sqrt 2 / 2, sqrt 2 / 2)).
    logprobs = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    ratio = A.sequence_importance_ratio(logprobs, torch.zeros(1, 2), torch.ones(1, 2))
    (grad,) = torch.autograd.grad(ratio[0, 0], logprobs, retain_graph=True)
    assert close(grad, [[math.sqrt(2.0), 0.0]])
    # summed over the reply's tokens both forms agree: d (s_0 + s_1) / d logp = (sqrt 2, sqrt 2) = d (2 s) / d logp
    (grad,) = torch.autograd.grad(ratio.sum(), logprobs)
    assert close(grad, [[math.sqrt(2.0), math.sqrt(2.0)]])


def test_policy_loss_with_the_sequence_ratio_by_hand():
    # log ratios 0.2, 0; A = +1; clip 0.2. Sequence: s = e^0.1 = 1.10517 inside [0.8, 1.2] -> loss -(s + s) / 2 = -s,
    # gradient per token -s / 2 = -0.55259. Token (today's): token 0's e^0.2 = 1.22140 clips to 1.2, token 1's ratio
    # is 1 -> loss -(1.2 + 1) / 2 = -1.1, grads (0, -0.5), half the tokens clipped
    def at(log_ratios, level):
        logprobs = torch.tensor([log_ratios], requires_grad=True)
        loss, stats = A.policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip=0.2,
                                    ratio_level=level)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, logprobs)
        return loss.item(), grad, stats["clip_frac"].item()

    s = math.exp(0.1)
    loss, grad, clip_frac = at([0.2, 0.0], "sequence")
    assert loss == pytest.approx(-s) and close(grad, [[-s / 2, -s / 2]]) and clip_frac == 0.0
    loss, grad, clip_frac = at([0.2, 0.0], "token")
    assert loss == pytest.approx(-1.1) and close(grad, [[0.0, -0.5]]) and clip_frac == 0.5
    # log ratios 0.6, 0: s = e^0.3 = 1.34986 > 1.2 clips the whole reply (loss -1.2, no gradient); per token only
    # token 0 (e^0.6 = 1.822) clips, so half the tokens
    loss, grad, clip_frac = at([0.6, 0.0], "sequence")
    assert loss == pytest.approx(-1.2) and close(grad, [[0.0, 0.0]]) and clip_frac == 1.0
    assert at([0.6, 0.0], "token")[2] == 0.5


def test_token_ratio_is_the_default_policy_loss():
    torch.manual_seed(1)
    old = torch.randn(2, 4)
    new, adv, mask = old + 0.3 * torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    default, _ = A.policy_loss(new, old, adv, mask)
    token, _ = A.policy_loss(new, old, adv, mask, ratio_level="token")
    assert torch.equal(default, token)


# --------------------------------------------------------------------------------------------- config fields
def test_variant_config_defaults_leave_today_behaviour():
    from stages.rl.config import GRPOConfig, PPOConfig

    cfg = GRPOConfig()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.importance_ratio) == (None, None, "token")
    assert (cfg.overlong_buffer, cfg.overlong_penalty_factor) == (None, 1.0)
    assert PPOConfig().importance_ratio == "token"
    dapo = GRPOConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, overlong_buffer=4, importance_ratio="sequence")
    assert dapo.overlong_buffer == 4 and dapo.clip_ratio_high == 0.28


@pytest.mark.parametrize("buffer", [20, 25])
def test_overlong_buffer_must_be_smaller_than_max_new_tokens(buffer):
    from pydantic import ValidationError

    from stages.rl.config import GRPOConfig

    message = rf"overlong_buffer \({buffer}\) must be smaller than max_new_tokens \(20\)"
    with pytest.raises(ValidationError, match=message):
        GRPOConfig(max_new_tokens=20, overlong_buffer=buffer)
    assert GRPOConfig(max_new_tokens=20, overlong_buffer=19).overlong_buffer == 19


@pytest.mark.parametrize("field", [{"overlong_buffer": 0}, {"overlong_penalty_factor": -1.0}, {"clip_ratio_low": 1.0},
                                   {"clip_ratio_high": 0.0}, {"importance_ratio": "seq"}])  # fmt: skip
def test_variant_config_ranges(field):
    from pydantic import ValidationError

    from stages.rl.config import GRPOConfig

    with pytest.raises(ValidationError):
        GRPOConfig(**field)
