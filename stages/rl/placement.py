"""Where the PPO actors go: Ray placement-group bundles and per-actor GPU fractions derived from the cluster.

Pure (no Ray, no torch): `plan` takes the cluster's resources and the config and returns the bundles, which bundle
each actor lives in, and the GPU fraction each actor requests; `check_fits` is the same check for the flow's
pre-flight, before anything starts.

On GPUs every bundle is one whole GPU (a "slot") and the actors that share it request fractions of it, so Ray puts
them on that very GPU. Actor (role k, rank r) goes to slot (k * n + r) % S, where n = actors per role and
S = the number of slots: consecutive ranks of one role land on consecutive slots, so as long as n <= S no two ranks
of a trainable role share a GPU (NCCL refuses a communicator with the same GPU twice). The frozen roles
(reference, reward) only run forward passes, so sharing is harmless for them, but the same layout keeps it simple.
    1 GPU,  n=1 -> 1 slot, 4 actors of 0.25;   2 GPUs, n=1 -> 2 slots, 2 actors of 0.5 each;
    4 GPUs, n=1 -> 4 slots of one actor;       8 GPUs, n=2 -> 8 slots of one actor.
The critic-free algorithms (GRPO, RLOO) place three roles, no critic: 1 GPU, n=1 -> 3 actors of 0.3333.
On CPU there is one bundle per actor with its CPUs, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.common.errors import StageInputError

ROLES = ("policy", "critic", "reference", "reward")  # PPO's roles, in the order of actors in the bundle layout
CRITIC_FREE_ROLES = ("policy", "reference", "reward")  # GRPO and RLOO: a group baseline replaces the critic
TRAINABLE_ROLES = ("policy", "critic")  # each forms one torch.distributed group: one GPU per rank

# Ray keeps resource amounts in units of 1/10000; a fraction rounded down to that never oversubscribes a GPU.
RAY_RESOURCE_UNIT = 10_000


def roles_for(critic_free: bool, reward_model: bool = True, reference: bool = True) -> tuple[str, ...]:
    """The actor roles a method runs: all four for ppo, no critic for the critic-free grpo and rloo, no reward
    role when the reward comes from reward functions alone (they run in actors of their own, outside the group),
    and no reference with LoRA (the policy with its adapter off is the reference)."""
    roles = CRITIC_FREE_ROLES if critic_free else ROLES
    dropped = {*(() if reward_model else ("reward",)), *(() if reference else ("reference",))}
    return tuple(r for r in roles if r not in dropped)


def roles_of(config) -> tuple[str, ...]:
    """The roles of an RL method's section (`stages.rl.config.RLConfig`)."""
    return roles_for(config.critic_free, config.reward.uses_model, reference=config.lora is None)


def role_cpus(config) -> dict[str, float]:
    """CPUs each actor of a role reserves: `cpus_per_actor`, except that with LoRA the policy reserves the absent
    reference's share as well, since it runs the reference's forwards itself (its adapter off). A LoRA run then
    holds the CPUs a full run holds, and the policy samples with as many threads."""
    cpus = {role: config.cpus_per_actor for role in roles_of(config)}
    if config.lora is not None:
        cpus["policy"] = 2 * config.cpus_per_actor
    return cpus


def function_cpus(config) -> float:
    """CPUs the reward-function actors hold beside the placement group: one actor per function."""
    return len(config.reward.functions) * config.reward.cpus


def reserved_cpus(config, actors_per_role: int) -> tuple[float, float]:
    """(CPUs of the actors, CPUs of the reward-function actors) a method's stage holds while it runs."""
    return actors_per_role * sum(role_cpus(config).values()), function_cpus(config)


@dataclass(frozen=True)
class ClusterResources:
    """What the Ray cluster offers: totals, and per node when known (empty tuples = unknown)."""

    total_gpus: float
    total_cpus: float
    node_gpus: tuple[float, ...] = ()
    node_cpus: tuple[float, ...] = ()


@dataclass(frozen=True)
class Placement:
    """The placement group and where each actor goes in it.

    bundles: one resource dict per bundle (a whole GPU plus its actors' CPUs on GPU; one actor's CPUs on CPU).
    actor_bundle: {(role, rank): bundle index}. gpus_per_actor: the fraction each actor requests (0 on CPU).
    role_cpus: the CPUs each actor of a role requests (`role_cpus(config)`).
    """

    bundles: tuple[dict[str, float], ...]
    actor_bundle: dict[tuple[str, int], int]
    gpus_per_actor: float
    role_cpus: dict[str, float]  # the CPUs each actor of a role requests
    strategy: str

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles placed, in layout order."""
        return tuple(dict.fromkeys(role for role, _ in self.actor_bundle))

    def describe(self) -> str:
        """One line for the stage log."""
        n = len(self.actor_bundle) // len(self.roles)
        roles = f"roles {', '.join(self.roles)}"
        cpus = set(self.role_cpus.values())
        cpu_text = (f"{cpus.pop():g} CPU each" if len(cpus) == 1 else
                    "CPUs " + ", ".join(f"{r} {c:g}" for r, c in self.role_cpus.items()))  # fmt: skip
        if self.gpus_per_actor:
            return (
                f"{len(self.actor_bundle)} actors ({n} per role) on {len(self.bundles)} GPU(s), "
                f"{self.gpus_per_actor:g} GPU each, {cpu_text}, placement {self.strategy}; {roles}"
            )
        return f"{len(self.actor_bundle)} actors ({n} per role), {cpu_text}, placement {self.strategy}; {roles}"


def _floor_fraction(x: float) -> float:
    return math.floor(x * RAY_RESOURCE_UNIT + 1e-6) / RAY_RESOURCE_UNIT


def plan(
    *,
    actors_per_role: int,
    cpus_per_actor: float,
    gpus_per_actor: float | None,
    use_gpu: bool,
    resources: ClusterResources,
    strategy: str = "PACK",
    roles: tuple[str, ...] = ROLES,
    section: str = "ppo",
    cpus_of_role: dict[str, float] | None = None,
) -> Placement:
    """Bundles and GPU fractions for `roles` (PPO's four by default) on `resources`; a StageInputError line when they
    cannot fit.

    gpus_per_actor None derives the fraction: the GPUs are shared evenly by the actors, at most one GPU each.
    cpus_of_role (`role_cpus(config)`) overrides `cpus_per_actor` for the roles it names.
    """
    n = actors_per_role
    actors = [(role, rank) for role in roles for rank in range(n)]
    cpus = {role: (cpus_of_role or {}).get(role, cpus_per_actor) for role in roles}
    total_cpus_needed = sum(cpus[role] for role, _ in actors)
    if total_cpus_needed > resources.total_cpus + 1e-9:
        each = (f"x {section}.cpus_per_actor {cpus_per_actor:g}" if len(set(cpus.values())) == 1 else
                "(" + ", ".join(f"{r} {c:g}" for r, c in cpus.items()) + " CPUs each)")  # fmt: skip
        raise StageInputError(
            f"{section}: {len(actors)} actors {each} = {total_cpus_needed:g} CPUs, "
            f"the Ray cluster has {resources.total_cpus:g}; lower {section}.cpus_per_actor or {section}.actors_per_role"
        )
    if not use_gpu:
        _check_bundle_fits_a_node(max(cpus.values()), resources.node_cpus, section)
        bundles = tuple({"CPU": cpus[role]} for role, _ in actors)
        return Placement(bundles, {a: i for i, a in enumerate(actors)}, 0.0, cpus, strategy)

    gpus = int(resources.total_gpus + 1e-9)  # a fractional remainder (another job's share) cannot host a rank
    if gpus < 1:
        raise StageInputError(
            f"{section}: run.use_gpu is true but the Ray cluster has {resources.total_gpus:g} GPUs; "
            "set run.use_gpu=false or add GPU nodes"
        )
    if n > gpus:
        raise StageInputError(
            f"{section}.actors_per_role {n}: each rank of the policy and of the critic needs a GPU of its own (NCCL refuses "
            f"two ranks on one GPU), the Ray cluster has {gpus}; expected {section}.actors_per_role <= {gpus}"
        )
    if gpus_per_actor is None:
        slots = min(gpus, len(actors))
        per_slot = math.ceil(len(actors) / slots)
        fraction = _floor_fraction(1.0 / per_slot)
    else:
        if not 0.0 < gpus_per_actor <= 1.0:
            raise StageInputError(f"{section}.gpus_per_actor: expected a fraction in (0, 1] or null, found {gpus_per_actor}")
        fraction = gpus_per_actor
        per_slot = int(1.0 / fraction + 1e-9)  # actors that fit on one GPU at this fraction
        slots = max(n, math.ceil(len(actors) / per_slot))
        if slots > gpus:
            raise StageInputError(
                f"{section}.gpus_per_actor {fraction:g}: {len(actors)} actors ({n} per role) at {per_slot} per GPU need "
                f"{slots} GPUs, the Ray cluster has {gpus}; use a smaller {section}.gpus_per_actor, or null to derive it"
            )
    actor_bundle = {(role, rank): (k * n + rank) % slots for k, role in enumerate(roles) for rank in range(n)}
    bundle_cpus = [sum(cpus[role] for (role, _), b in actor_bundle.items() if b == s) for s in range(slots)]
    bundles = tuple({"GPU": 1.0, "CPU": bundle_cpus[s]} for s in range(slots))
    _check_bundle_fits_a_node(max(b["CPU"] for b in bundles), resources.node_cpus, section)
    if strategy == "STRICT_PACK" and resources.node_gpus and slots > max(resources.node_gpus):
        raise StageInputError(
            f"{section}.placement_strategy STRICT_PACK: {slots} GPUs on one node, the largest node has "
            f"{max(resources.node_gpus):g}; use PACK"
        )
    if strategy == "STRICT_SPREAD" and resources.node_gpus:
        gpu_nodes = sum(1 for g in resources.node_gpus if g >= 1)
        if slots > gpu_nodes:
            raise StageInputError(
                f"{section}.placement_strategy STRICT_SPREAD: {slots} GPU bundles on distinct nodes, the cluster has "
                f"{gpu_nodes} GPU nodes; use SPREAD or PACK"
            )
    return Placement(bundles, actor_bundle, fraction, cpus, strategy)


def _check_bundle_fits_a_node(cpus: float, node_cpus: tuple[float, ...], section: str) -> None:
    """A bundle is placed whole on one node, so its CPUs must fit the largest node."""
    if node_cpus and cpus > max(node_cpus) + 1e-9:
        raise StageInputError(
            f"{section}: a bundle needs {cpus:g} CPUs on one node, the largest Ray node has {max(node_cpus):g}; "
            f"lower {section}.cpus_per_actor"
        )


def check_fits(
    config,
    total_gpus: float,
    total_cpus: float,
    use_gpu: bool,
    *,
    num_workers: int = 1,
    node_gpus: tuple[float, ...] = (),
    node_cpus: tuple[float, ...] = (),
) -> None:
    """Pre-flight for the flow: raise a one-line StageInputError when the PPO actors cannot be placed.

    `config` is the method's section (`stages.rl.PPOConfig`, `GRPOConfig`, `RLOOConfig`); `num_workers` fills `actors_per_role: null` as the stage does;
    its `critic_free` says which roles are placed (grpo and rloo: no critic).
    `node_gpus` / `node_cpus` hold one entry per node of the cluster (all of them), or stay empty when unknown; the
    stage itself passes what `cluster_resources()` reads from Ray.
    """
    from stages.rl.devices import rl_precision

    n = config.actors_per_role or num_workers
    rl_precision(config.bf16, use_gpu, config.algorithm)
    plan(
        actors_per_role=n,
        cpus_per_actor=config.cpus_per_actor,
        gpus_per_actor=config.gpus_per_actor,
        use_gpu=use_gpu,
        resources=ClusterResources(float(total_gpus), float(total_cpus), tuple(node_gpus), tuple(node_cpus)),
        strategy=config.placement_strategy,
        roles=roles_of(config),
        section=config.algorithm,
        cpus_of_role=role_cpus(config),
    )
    n_roles = len(roles_of(config))
    actor_cpus, fn_cpus = reserved_cpus(config, n)
    need = actor_cpus + fn_cpus
    if config.reward.functions and need > total_cpus + 1e-9:
        section = config.algorithm
        raise StageInputError(
            f"{section}: {n_roles * n} actors ({actor_cpus:g} CPUs at {section}.cpus_per_actor {config.cpus_per_actor:g}) + "
            f"{len(config.reward.functions)} reward function(s) x {section}.reward.cpus {config.reward.cpus:g} = "
            f"{need:g} CPUs, the Ray cluster has {total_cpus:g}; lower {section}.cpus_per_actor or {section}.reward.cpus"
        )


def cluster_resources() -> ClusterResources:
    """The connected Ray cluster's resources (totals and per alive node)."""
    import ray

    total = ray.cluster_resources()
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    return ClusterResources(
        total_gpus=float(total.get("GPU", 0.0)),
        total_cpus=float(total.get("CPU", 0.0)),
        node_gpus=tuple(float(r.get("GPU", 0.0)) for r in nodes),
        node_cpus=tuple(float(r.get("CPU", 0.0)) for r in nodes),
    )
