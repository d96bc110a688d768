"""Critic-free RL (GRPO, RLOO) in the RL stage: the math with hand-computed values, the config, the placement of
three roles, and one real tiny run of each through `stages.rl.run` (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stages.rl import algorithm as A
from stages.rl import placement as P
from stages.rl.config import CONFIGS, GRPOConfig, PPOConfig, RLOOConfig


# ------------------------------------------------------------------------------------------------ advantages
def test_rloo_baseline_is_the_mean_of_the_other_replies():
    # one group [1, 2, 3, 6]: baselines (12 - r) / 3 = [11/3, 10/3, 3, 2]
    adv = A.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group_size=4)
    assert adv.tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])


def test_rloo_groups_are_consecutive_rows():
    # two groups of two: [1, 3] -> [1 - 3, 3 - 1]; [10, 4] -> [6, -6]
    adv = A.rloo_advantages(torch.tensor([1.0, 3.0, 10.0, 4.0]), group_size=2)
    assert adv.tolist() == pytest.approx([-2.0, 2.0, 6.0, -6.0])


def test_grpo_divides_by_the_unbiased_group_std():
    # group [1, 2, 3]: mean 2, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1; group [5, 5, 5]: all equal -> 0
    adv = A.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3, eps=1e-4)
    assert adv.tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    # group [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], unbiased var 14 / 3
    adv = A.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group_size=4, eps=0.0)
    std = math.sqrt(14 / 3)
    assert adv.tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])


def test_dr_grpo_only_centres_on_the_group_mean():
    adv = A.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 4.0, 4.0, 4.0]), group_size=4, scale=False)
    assert adv.tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0, -3.0, 1.0, 1.0, 1.0])


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="group_size >= 2 dividing the 5 scores, found group_size 2"):
        A.grpo_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="found group_size 1"):
        A.rloo_advantages(torch.zeros(4), group_size=1)


def test_flat_groups_are_counted():
    # [1, 1] flat, [0, 2] not, [3, 3] flat
    assert float(A.flat_group_fraction(torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0]), 2)) == pytest.approx(2 / 3)


def test_sequence_reward_subtracts_the_kl_summed_over_the_reply():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # 1 - 0.5 * (0.1 + 0.2) = 0.85; 2 - 0.5 * 0.3 = 1.85 (padding ignored)
    assert A.sequence_rewards(scores, kl, mask, kl_coef=0.5).tolist() == pytest.approx([0.85, 1.85])


def test_sequence_advantages_cover_the_response_tokens_only():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = A.broadcast_over_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------------------- KL loss
def test_k3_kl_loss_is_a_masked_mean_with_a_gradient_toward_the_reference():
    # policy p = 0.5, reference 0.25: log ratio = ln 0.25 - ln 0.5 = -ln 2; k3 = 0.5 + ln 2 - 1 = 0.193147
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the padded third token (a huge k3) must not count
    loss = A.kl_loss(logprobs, ref, mask)
    assert loss.item() == pytest.approx((0.5 + math.log(2) - 1) / 2, abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): 1 - 0.5 on token 0, 0 where policy == reference, 0 on padding; / 2 tokens
    assert logprobs.grad[0].tolist() == pytest.approx([0.25, 0.0, 0.0], abs=1e-6)


def test_clipped_surrogate_with_broadcast_group_advantages():
    # one group of two replies, RLOO advantages [-1, 1] on 2 and 1 tokens; ratio 1.5 on every token
    adv = A.broadcast_over_tokens(
        A.rloo_advantages(torch.tensor([0.0, 1.0]), 2), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    )
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.zeros(2, 2)
    new = torch.full((2, 2), math.log(1.5))
    loss, stats = A.policy_loss(new, old, adv, mask, clip=0.2)
    # A = -1: max(1.5, 1.2) = 1.5 (unclipped); A = +1: max(-1.5, -1.2) = -1.2 (clipped) -> (1.5 + 1.5 - 1.2) / 3
    assert float(loss) == pytest.approx((1.5 + 1.5 - 1.2) / 3)
    assert float(stats["clip_frac"]) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------- config
def test_kl_penalty_defaults_follow_the_method():
    assert PPOConfig().kl_penalty == "reward" and not PPOConfig().critic_free
    grpo, rloo = GRPOConfig(), RLOOConfig()
    assert grpo.kl_penalty == "loss" and rloo.kl_penalty == "reward"
    assert GRPOConfig(kl_penalty="reward").kl_penalty == "reward"
    assert PPOConfig(kl_penalty="loss").kl_penalty == "loss"
    assert grpo.critic_free and grpo.rollout_replies == 32 * 4 and PPOConfig().rollout_replies == 32


def test_each_method_section_holds_only_its_own_knobs():
    assert {name: cls.algorithm for name, cls in CONFIGS.items()} == {"ppo": "ppo", "grpo": "grpo", "rloo": "rloo"}
    with pytest.raises(ValueError, match="group_size"):  # ppo samples one reply per prompt
        PPOConfig(group_size=2)
    with pytest.raises(ValueError, match="critic_learning_rate"):  # no critic in a group method
        GRPOConfig(critic_learning_rate=1e-4)
    with pytest.raises(ValueError, match="algorithm"):  # the method is the section's, not a knob
        GRPOConfig(algorithm="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        RLOOConfig(scale_rewards=False)


def test_config_checks_minibatches_against_the_replies_of_a_group_rollout():
    # 6 prompts x 2 replies = 12 replies: minibatches of 4 divide them even though 6 % 4 != 0
    assert RLOOConfig(rollout_batch_size=6, group_size=2, mini_batch_size=4).rollout_replies == 12
    with pytest.raises(ValueError, match=r"rollout_batch_size x group_size \(6 x 3 = 18\) must be a multiple of"):
        GRPOConfig(rollout_batch_size=6, group_size=3, mini_batch_size=4)
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):  # ppo: one reply per prompt, as before
        PPOConfig(rollout_batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="adaptive_kl .* needs kl_penalty 'reward'"):
        GRPOConfig(adaptive_kl=True)


# -------------------------------------------------------------------------------------------------- placement
def test_critic_free_algorithms_place_three_roles():
    assert P.roles_for(PPOConfig.critic_free) == P.ROLES
    assert P.roles_for(GRPOConfig.critic_free) == P.roles_for(RLOOConfig.critic_free) == P.CRITIC_FREE_ROLES
    res = P.ClusterResources(total_gpus=1, total_cpus=8)
    layout = P.plan(actors_per_role=1, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=True, resources=res,
                    roles=P.CRITIC_FREE_ROLES)  # fmt: skip
    assert layout.gpus_per_actor == 0.3333 and len(layout.bundles) == 1 and layout.bundles[0]["CPU"] == 1.5
    assert layout.roles == ("policy", "reference", "reward")
    assert "3 actors (1 per role) on 1 GPU(s)" in layout.describe()
    # 3 GPUs, 2 actors per role: 6 actors, 2 per GPU; the two policy ranks on different GPUs
    layout = P.plan(actors_per_role=2, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=True,
                    resources=P.ClusterResources(total_gpus=3, total_cpus=8), roles=P.CRITIC_FREE_ROLES)  # fmt: skip
    assert layout.gpus_per_actor == 0.5 and len(layout.bundles) == 3
    assert layout.actor_bundle[("policy", 0)] != layout.actor_bundle[("policy", 1)]
    # CPU: 3 actors of 0.5 fit 1.5 CPUs, where PPO's four would not
    cpu = P.ClusterResources(total_gpus=0, total_cpus=1.5)
    P.check_fits(RLOOConfig(), 0, 1.5, False)
    with pytest.raises(Exception, match="4 actors x ppo.cpus_per_actor 0.5 = 2 CPUs"):
        P.plan(actors_per_role=1, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=False, resources=cpu)
    with pytest.raises(Exception, match="4 actors x grpo.cpus_per_actor 0.5 = 2 CPUs"):  # messages name the section
        P.plan(actors_per_role=1, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=False, resources=cpu, section="grpo")


# -------------------------------------------------------------------------------------------------- real runs
TINY_GROUP = dict(
    iterations=2, rollout_batch_size=4, group_size=2, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8,
    eval_prompts=4, samples_shown=2, checkpoint_every=2, learning_rate=1e-3,
)  # fmt: skip


def _run_group(tiny_inputs, work_dir: Path, algorithm: str, logs: list[str]):
    from stages import rl
    from stages.common.context import Scaling, StageContext

    ctx = StageContext(work_dir=str(work_dir), cache_key="test", seed=0, log=logs.append,
                       scaling=Scaling(num_workers=1, cpus_per_worker=0.5))  # fmt: skip
    return rl.run(
        CONFIGS[algorithm](**TINY_GROUP), store=tiny_inputs["store"], ctx=ctx, sft_model=tiny_inputs["sft"],
        reward_model=tiny_inputs["rm"], prompts=tiny_inputs["prompts"],
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_run_publishes_its_own_policy_without_a_critic(tiny_inputs, local_ray, tmp_path, algorithm):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logs: list[str] = []
    out = _run_group(tiny_inputs, tmp_path / "work", algorithm, logs)
    policy = out["policy"]
    assert policy.name == f"policy-{algorithm}" and policy.kind == "causal-lm"
    assert policy.manifest["stage"] == algorithm
    # three actors, no critic: the pool's log line names the roles it started
    assert any(f"{algorithm}: 3 actors (1 per role)" in x and x.endswith("roles policy, reference, reward")
               for x in logs), logs  # fmt: skip
    assert sum(x.startswith(f"{algorithm} iter") for x in logs) == 2
    # checkpoints hold the policy only
    ckpt = tmp_path / "work" / "checkpoints"
    assert (ckpt / "policy" / "iter-000002").is_dir() and not (ckpt / "critic").exists()

    history = [json.loads(x) for x in (Path(policy.reports_path) / "metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [1, 2]
    for h in history:
        assert "value_loss" not in h and 0.0 <= h["flat_group_frac"] <= 1.0 and 0.0 <= h["clip_frac"] <= 1.0
        assert h["seconds_generation"] > 0 and h["seconds_training"] > 0
    assert abs(history[0]["kl"]) < 1e-4  # the first rollout comes before any update
    if algorithm == "grpo":  # the KL is a loss term (k3, >= 0), not a reward penalty
        assert all(h["kl_coef"] == 0.0 and h["kl_loss"] >= 0.0 for h in history)
    else:
        assert all(h["kl_coef"] == 0.05 and "kl_loss" not in h for h in history)
    # RLOO's leave-one-out advantages and GRPO's centred ones both sum to zero over each group
    assert abs(history[0]["advantage_mean"]) < 1e-5

    model = AutoModelForCausalLM.from_pretrained(policy.path)
    tok = AutoTokenizer.from_pretrained(policy.path)
    ids = tok("User: What is the cat like?\nAssistant:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    before = load_file(str(Path(tiny_inputs["sft"].path) / "model.safetensors"))
    after = load_file(str(Path(policy.path) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update changed the weights
