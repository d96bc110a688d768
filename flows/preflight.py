"""Before anything starts: does what the config asks for fit the hardware it will run on?

A run that cannot fit must fail in seconds with one line, not hang while Ray waits for resources that never come.
`Resources` is what the cluster has: read from this machine when the flow will start a local Ray (no Ray needed),
or from the cluster the driver joined. `check_fits` is pure and compares it with the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from stages.common.config import ConfigError
from stages.rl.config import METHODS as RL_METHODS

TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo")


@dataclass(frozen=True)
class NodeResources:
    """One node's CPUs and GPUs; `name` says which node in a message (address and short node id)."""

    name: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Resources:
    """CPUs and GPUs of the cluster (all nodes together), the most GPUs any one node has, and each node's (empty when
    not known: then only the totals are checked)."""

    cpus: float
    gpus: float
    gpus_per_node: float
    where: str  # "this machine" or "the Ray cluster at ADDRESS", for the message
    nodes: tuple[NodeResources, ...] = ()

    @classmethod
    def of_this_machine(cls) -> Resources:
        """What a local Ray started by the flow will see: every core, every visible CUDA device."""
        gpus = _local_gpu_count()
        cpus = float(os.cpu_count() or 1)
        return cls(cpus=cpus, gpus=float(gpus), gpus_per_node=float(gpus), where="this machine",
                   nodes=(NodeResources("this machine", cpus, float(gpus)),))  # fmt: skip

    @classmethod
    def of_ray_cluster(cls, address: str) -> Resources:
        """Totals of the cluster this process is connected to as a Ray driver."""
        import ray

        total = ray.cluster_resources()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        nodes = tuple(NodeResources(f"{n.get('NodeManagerAddress', '?')}/{n.get('NodeID', '')[:8]}",
                                    float(n.get("Resources", {}).get("CPU", 0.0)),
                                    float(n.get("Resources", {}).get("GPU", 0.0))) for n in alive)  # fmt: skip
        return cls(
            cpus=float(total.get("CPU", 0.0)),
            gpus=float(total.get("GPU", 0.0)),
            gpus_per_node=float(max((n.gpus for n in nodes), default=0.0)),
            where=f"the Ray cluster at {address}",
            nodes=nodes,
        )


def _local_gpu_count() -> int:
    """CUDA devices torch can use here (0 on a CPU build or with no driver); never initialises a context."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver means: no usable GPU
        return 0


def check_fits(cfg, resources: Resources, stages: list[str]) -> None:
    """Raise ConfigError (one line) if the stages that may run ask for more than `resources` has."""
    run = cfg.run
    if run.use_gpu and resources.gpus < 1:
        raise ConfigError(
            f"run.use_gpu is true but {resources.where} has no GPU (CUDA devices: 0); "
            "set run.use_gpu=false or run on a GPU machine"
        )
    training = [s for s in stages if s in TRAINING_STAGES]
    if training:
        need_cpus = run.num_workers * run.cpus_per_worker
        if need_cpus > resources.cpus:
            raise ConfigError(
                f"run.num_workers x run.cpus_per_worker = {run.num_workers} x {run.cpus_per_worker:g} = "
                f"{need_cpus:g} CPUs, but {resources.where} has {resources.cpus:g}; lower run.num_workers "
                "or run.cpus_per_worker"
            )
        if run.use_gpu and run.num_workers > resources.gpus:
            raise ConfigError(
                f"run.num_workers = {run.num_workers} training workers need one GPU each, but {resources.where} "
                f"has {resources.gpus:g}; set run.num_workers to at most {int(resources.gpus)}"
            )
        _check_placeable(resources, [{"CPU": run.cpus_per_worker, "GPU": 1.0 if run.use_gpu else 0.0}] * run.num_workers,
                         run.placement_strategy, f"run.num_workers = {run.num_workers} training workers x "
                         f"run.cpus_per_worker {run.cpus_per_worker:g}", "worker")  # fmt: skip
    for name in (s for s in stages if s in RL_METHODS):
        _check_rl_fits(cfg, name, resources)


def _check_placeable(resources: Resources, bundles: list[dict], strategy: str, what: str, unit: str) -> None:
    """Refuse, in one line naming the nodes and what each has left, bundles Ray could not place on the nodes."""
    if not resources.nodes:
        return
    why = unplaceable(bundles, resources.nodes, strategy)
    if why is not None:
        raise ConfigError(f"{what} ({strategy}): {why.format(unit=unit)} on {resources.where}")


def unplaceable(bundles: list[dict], nodes: tuple[NodeResources, ...], strategy: str) -> str | None:
    """Why Ray could not place `bundles` ({"CPU", "GPU"} each) on `nodes` under a placement-group `strategy`, or None.

    Each bundle goes whole on one node. STRICT_PACK: all on one node. STRICT_SPREAD: each on a node of its own.
    PACK and SPREAD are soft (Ray spreads or packs where it can), so they fail only when the bundles fit no way: the
    largest first, each on the node with the most room left (a first-fit-decreasing check)."""
    eps = 1e-9
    if not bundles:
        return None
    need = lambda b: (b.get("CPU", 0.0), b.get("GPU", 0.0))  # noqa: E731
    if strategy == "STRICT_PACK":
        cpus, gpus = sum(need(b)[0] for b in bundles), sum(need(b)[1] for b in bundles)
        if not any(n.cpus + eps >= cpus and n.gpus + eps >= gpus for n in nodes):
            return (f"all {len(bundles)} {{unit}}s together need {_amount(cpus, gpus)} on one node; the nodes have "
                    + _nodes_text({n.name: (n.cpus, n.gpus) for n in nodes}))  # fmt: skip
        return None
    free = {n.name: [n.cpus, n.gpus] for n in nodes}
    used: set[str] = set()
    for i, bundle in sorted(enumerate(bundles), key=lambda ib: (-need(ib[1])[1], -need(ib[1])[0])):
        cpus, gpus = need(bundle)
        fits = [name for name, (c, g) in free.items() if c + eps >= cpus and g + eps >= gpus]
        if strategy == "STRICT_SPREAD":
            fits = [name for name in fits if name not in used]
        if not fits:
            spread = " on a node of its own" if strategy == "STRICT_SPREAD" else ""
            return (f"{{unit}} {i + 1} of {len(bundles)} needs {_amount(cpus, gpus)}{spread}; left per node after the "
                    f"others: {_nodes_text({k: tuple(v) for k, v in free.items()})}")  # fmt: skip
        best = max(fits, key=lambda name: (free[name][1], free[name][0]))
        free[best][0] -= cpus
        free[best][1] -= gpus
        used.add(best)
    return None


def _amount(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")


def _nodes_text(free: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{name} {_amount(max(c, 0.0), max(g, 0.0))}" for name, (c, g) in free.items())


def _check_rl_fits(cfg, name: str, resources: Resources) -> None:
    """The RL node's roles (four for ppo, three for the critic-free ones) must be placeable (stages/rl/placement.py)."""
    from stages.common.errors import StageInputError
    from stages.rl import placement

    rl = cfg.stage_config(name).resolved(cfg.run.num_workers)
    node_args = dict(node_gpus=tuple(n.gpus for n in resources.nodes), node_cpus=tuple(n.cpus for n in resources.nodes))
    try:
        placement.check_fits(rl, total_gpus=resources.gpus, total_cpus=resources.cpus, use_gpu=cfg.run.use_gpu, **node_args)
        layout = placement.plan(actors_per_role=rl.actors_per_role, cpus_per_actor=rl.cpus_per_actor,
                                gpus_per_actor=rl.gpus_per_actor, use_gpu=cfg.run.use_gpu, strategy=rl.placement_strategy,
                                resources=placement.ClusterResources(resources.gpus, resources.cpus, **node_args),
                                roles=placement.roles_of(rl), section=name,
                                cpus_of_role=placement.role_cpus(rl))  # fmt: skip
    except StageInputError as e:
        raise ConfigError(f"{e} ({resources.where})") from None
    # the actors' placement group, then each reward function's actor (outside it, anywhere with room)
    bundles = [*layout.bundles, *[{"CPU": rl.reward.cpus}] * len(rl.reward.functions)]
    _check_placeable(resources, bundles, rl.placement_strategy, f"{name}: {len(layout.actor_bundle)} actors in "
                     f"{len(layout.bundles)} bundles" + (f" + {len(rl.reward.functions)} reward functions"
                                                          if rl.reward.functions else ""), "bundle")  # fmt: skip
