"""PPO placement (stages/rl/placement.py, pure): bundles and GPU fractions for 0 to 8 GPUs, and what is refused."""

from __future__ import annotations

import pytest

from stages import rl
from stages.common.errors import StageInputError
from stages.rl import placement as P


def plan(gpus: float, n: int, *, use_gpu: bool = True, cpus: float = 64, gpus_per_actor=None, cpus_per_actor=0.5,
         node_gpus=(), node_cpus=(), strategy="PACK") -> P.Placement:  # fmt: skip
    return P.plan(
        actors_per_role=n, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, use_gpu=use_gpu,
        resources=P.ClusterResources(gpus, cpus, tuple(node_gpus), tuple(node_cpus)), strategy=strategy,
    )  # fmt: skip


def assert_valid(layout: P.Placement, gpus: int, n: int) -> None:
    """Every actor placed once; no GPU oversubscribed; no two ranks of a trainable role on one GPU."""
    assert set(layout.actor_bundle) == {(role, rank) for role in P.ROLES for rank in range(n)}
    assert len(layout.bundles) <= gpus
    for index, bundle in enumerate(layout.bundles):
        here = [a for a, b in layout.actor_bundle.items() if b == index]
        assert bundle["GPU"] == 1.0  # a whole GPU per bundle: the actors in it share that very GPU
        assert len(here) * layout.gpus_per_actor <= 1.0
        assert bundle["CPU"] == pytest.approx(sum(layout.role_cpus[role] for role, _ in here))
    assert len(layout.actor_bundle) * layout.gpus_per_actor <= gpus
    for role in P.TRAINABLE_ROLES:
        slots = [layout.actor_bundle[(role, rank)] for rank in range(n)]
        assert len(set(slots)) == n, (role, slots)


# (1 GPU, 2 per role) is refused: see test_more_trainable_ranks_than_gpus_is_refused
@pytest.mark.parametrize(("gpus", "n"), [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2), (8, 1), (8, 2)])
def test_valid_gpu_layouts(gpus, n):
    assert_valid(plan(gpus, n), gpus, n)


def test_one_gpu_hosts_all_four_roles_at_a_quarter_each():
    layout = plan(1, 1)
    assert layout.bundles == ({"GPU": 1.0, "CPU": 2.0},)
    assert layout.gpus_per_actor == 0.25
    assert set(layout.actor_bundle.values()) == {0}


def test_two_gpus_put_policy_and_critic_apart():
    layout = plan(2, 1)
    assert layout.gpus_per_actor == 0.5
    assert layout.actor_bundle == {("policy", 0): 0, ("critic", 0): 1, ("reference", 0): 0, ("reward", 0): 1}


def test_two_gpus_two_ranks_per_role():
    # 8 actors on 2 GPUs: 4 per GPU at 0.25; rank r of every role on GPU r
    layout = plan(2, 2)
    assert layout.gpus_per_actor == 0.25
    assert all(layout.actor_bundle[(role, r)] == r for role in P.ROLES for r in range(2))


@pytest.mark.parametrize(("gpus", "n", "bundles"), [(4, 1, 4), (8, 1, 4), (8, 2, 8)])
def test_enough_gpus_give_every_actor_a_whole_one(gpus, n, bundles):
    layout = plan(gpus, n)
    assert layout.gpus_per_actor == 1.0 and len(layout.bundles) == bundles


def test_a_third_is_rounded_down_to_ray_units():
    # 8 actors on 3 GPUs: 3 on the busiest GPU, 1/3 rounded down to 0.3333 so 3 x 0.3333 <= 1
    layout = plan(3, 2)
    assert layout.gpus_per_actor == 0.3333
    assert_valid(layout, 3, 2)


def test_explicit_fraction_packs_that_many_per_gpu():
    layout = plan(8, 1, gpus_per_actor=0.5)
    assert layout.gpus_per_actor == 0.5 and len(layout.bundles) == 2
    assert_valid(layout, 8, 1)


@pytest.mark.parametrize("n", [1, 2])
def test_cpu_layout_has_one_cpu_bundle_per_actor(n):
    for gpus in (0, 2):  # GPUs in the cluster are not used when the run does not ask for them
        layout = plan(gpus, n, use_gpu=False, cpus=2 * n)
        assert layout.bundles == tuple({"CPU": 0.5} for _ in range(4 * n))
        assert layout.gpus_per_actor == 0.0
        assert sorted(layout.actor_bundle.values()) == list(range(4 * n))


# ------------------------------------------------------------------------------------------------- refusals
def refused(match: str, **kwargs) -> str:
    gpus, n = kwargs.pop("gpus"), kwargs.pop("n")
    with pytest.raises(StageInputError, match=match) as info:
        plan(gpus, n, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_gpu_run_without_gpus_is_refused():
    refused(r"run.use_gpu is true but the Ray cluster has 0 GPUs", gpus=0, n=1)
    refused(r"has 0.5 GPUs", gpus=0.5, n=1)  # a fraction left by another job cannot host a rank


@pytest.mark.parametrize(("gpus", "n"), [(1, 2), (2, 3), (4, 8)])
def test_more_trainable_ranks_than_gpus_is_refused(gpus, n):
    refused(rf"ppo.actors_per_role {n}: .*NCCL.* has {gpus}; expected ppo.actors_per_role <= {gpus}", gpus=gpus, n=n)


def test_explicit_whole_gpus_that_do_not_exist_are_refused():
    # the old default (1 GPU per actor) on a one-GPU box: 4 actors need 4 GPUs
    refused(r"ppo.gpus_per_actor 1: 4 actors \(1 per role\) at 1 per GPU need 4 GPUs, the Ray cluster has 1",
            gpus=1, n=1, gpus_per_actor=1.0)  # fmt: skip


def test_too_few_cpus_are_refused():
    refused(r"8 actors x ppo.cpus_per_actor 0.5 = 4 CPUs, the Ray cluster has 2", gpus=0, n=2, use_gpu=False, cpus=2)
    refused(r"8 actors x ppo.cpus_per_actor 4 = 32 CPUs, the Ray cluster has 16", gpus=8, n=2, cpus=16,
            cpus_per_actor=4)  # fmt: skip


def test_a_bundle_larger_than_any_node_is_refused():
    # one GPU slot hosts 4 actors of 4 CPUs = 16 CPUs, but each node has 8
    refused(r"a bundle needs 16 CPUs on one node, the largest Ray node has 8", gpus=1, n=1, cpus=16,
            cpus_per_actor=4, node_gpus=(1, 0), node_cpus=(8, 8))  # fmt: skip


def test_strict_strategies_are_checked_against_the_nodes():
    refused(r"STRICT_PACK: 4 GPUs on one node, the largest node has 2", gpus=4, n=1, node_gpus=(2, 2),
            strategy="STRICT_PACK")  # fmt: skip
    refused(r"STRICT_SPREAD: 4 GPU bundles on distinct nodes, the cluster has 2 GPU nodes", gpus=4, n=1,
            node_gpus=(2, 2), strategy="STRICT_SPREAD")  # fmt: skip


def test_with_lora_the_policy_reserves_the_reference_cpus_it_takes_over():
    from stages.common.lora import LoraSection

    full, lora = rl.GRPOConfig(), rl.GRPOConfig(lora=LoraSection())
    assert P.role_cpus(full) == {"policy": 0.5, "reference": 0.5, "reward": 0.5}
    assert P.role_cpus(lora) == {"policy": 1.0, "reward": 0.5}  # no reference actor: its forwards run on the policy
    assert P.role_cpus(rl.PPOConfig(lora=LoraSection())) == {"policy": 1.0, "critic": 0.5, "reward": 0.5}
    on_cpu = P.plan(actors_per_role=2, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=False, roles=P.roles_of(lora),
                    resources=P.ClusterResources(0, 3), cpus_of_role=P.role_cpus(lora))  # fmt: skip
    assert [b["CPU"] for b in on_cpu.bundles] == [1.0, 1.0, 0.5, 0.5]  # policy ranks 0, 1, then the reward's
    assert "CPUs policy 1, reward 0.5" in on_cpu.describe()
    on_gpu = P.plan(actors_per_role=1, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=True, roles=P.roles_of(lora),
                    resources=P.ClusterResources(1, 8), cpus_of_role=P.role_cpus(lora))  # fmt: skip
    assert on_gpu.bundles == ({"GPU": 1.0, "CPU": 1.5},) and on_gpu.gpus_per_actor == 0.5
    with pytest.raises(StageInputError, match=r"^grpo: 4 actors \(policy 1, reward 0.5 CPUs each\) = 3 CPUs, the Ray "
                                              r"cluster has 2"):  # fmt: skip
        P.plan(actors_per_role=2, cpus_per_actor=0.5, gpus_per_actor=None, use_gpu=False, roles=P.roles_of(lora),
               resources=P.ClusterResources(0, 2), cpus_of_role=P.role_cpus(lora), section="grpo")  # fmt: skip


# ---------------------------------------------------------------------------------------- the flow's pre-flight
def test_check_fits_takes_the_stage_config(monkeypatch):
    P.check_fits(rl.PPOConfig(), total_gpus=1, total_cpus=2, use_gpu=True)  # the default derives 0.25 per actor
    P.check_fits(rl.PPOConfig(), total_gpus=0, total_cpus=2, use_gpu=False)
    P.check_fits(rl.PPOConfig(actors_per_role=None), 2, 4, True, num_workers=2)
    with pytest.raises(StageInputError, match=r"ppo.actors_per_role 2: .* has 1"):
        P.check_fits(rl.PPOConfig(actors_per_role=None), 1, 4, True, num_workers=2)
    with pytest.raises(StageInputError, match=r"need 8 GPUs, the Ray cluster has 4"):
        P.check_fits(rl.PPOConfig(actors_per_role=2, gpus_per_actor=1.0, cpus_per_actor=1.0), 4, 16, True)
    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # a CPU without native bf16
    with pytest.raises(StageInputError, match=r"ppo.bf16: true needs a GPU"):
        P.check_fits(rl.PPOConfig(bf16=True), 0, 2, False)


def test_config_gpus_per_actor_is_a_fraction_or_null():
    assert rl.PPOConfig().gpus_per_actor is None
    assert rl.PPOConfig(gpus_per_actor=1).gpus_per_actor == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="gpus_per_actor"):
            rl.PPOConfig(gpus_per_actor=bad)
