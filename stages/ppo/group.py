"""Ray placement of the four PPO roles: one placement group, `actors_per_role` actors per role, sharded calls.

On one node the bundles are packed together with fractional CPUs; on a GPU cluster `SPREAD` places them over the
nodes. Trainable roles (policy, critic) form one torch.distributed group per role: rank 0 hosts the rendezvous and
DeepSpeed all-reduces gradients over the group, so a rollout batch is split evenly over the role's actors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.ppo.actors import CriticActor, PolicyActor, ReferenceActor, RewardActor
from stages.ppo.config import Config

ROLE_CLASSES = {"policy": PolicyActor, "critic": CriticActor, "reference": ReferenceActor, "reward": RewardActor}
PLACEMENT_TIMEOUT_S = 120


@dataclass(frozen=True)
class ModelSource:
    """Where an actor finds its weights: the driver's local artifact path, or the store on another node."""

    path: str
    store_uri: str
    ref: str


def split_batch(batch: dict, n: int) -> list[dict]:
    """Split every tensor of a batch into `n` equal row shards (other values are copied to each shard)."""
    if n == 1:
        return [batch]
    out: list[dict] = [{} for _ in range(n)]
    for key, value in batch.items():
        parts = torch.chunk(value, n, dim=0) if isinstance(value, torch.Tensor) else [value] * n
        for shard, part in zip(out, parts, strict=True):
            shard[key] = part
    return out


class RoleGroup:
    """The actors of one role; `call` shards a batch over them and concatenates what they return."""

    def __init__(self, role: str, handles: list):
        self.role = role
        self.handles = handles

    def submit(self, method: str, batch: dict, *args) -> list:
        """Start `method(shard, *args)` on every actor; returns the object refs (for overlapping roles)."""
        shards = split_batch(batch, len(self.handles))
        return [getattr(h, method).remote(shard, *args) for h, shard in zip(self.handles, shards, strict=True)]

    def broadcast(self, method: str, *args) -> list:
        """Start `method(*args)` on every actor (collectives such as checkpointing need all ranks)."""
        return [getattr(h, method).remote(*args) for h in self.handles]


def gather(refs: list):
    """Wait for sharded results and join them: tensors are concatenated, metric dicts averaged."""
    import ray

    parts = ray.get(refs)
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, dict) and all(isinstance(v, float) for v in first.values()):
        return {k: sum(p[k] for p in parts) / len(parts) for k in first}
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in first}
    return parts


def actor_settings(cfg: Config, *, seed: int, use_gpu: bool) -> dict:
    """The plain settings every actor gets (no config objects cross the process boundary)."""
    return {
        **cfg.to_dict(),
        "seed": seed,
        "use_gpu": use_gpu,
        "micro_batch_size": cfg.mini_batch_size // cfg.actors_per_role,
    }


class ActorPool:
    """Owns the placement group and the four role groups; `shutdown` releases them."""

    def __init__(self, cfg: Config, sources: dict[str, ModelSource], *, seed: int, use_gpu: bool, log=print):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = cfg.actors_per_role
        bundle: dict[str, float] = {"CPU": cfg.cpus_per_actor}
        if use_gpu:
            bundle["GPU"] = cfg.gpus_per_actor
        self.pg = placement_group([dict(bundle) for _ in range(4 * n)], strategy=cfg.placement_strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"ppo: the Ray cluster cannot place {4 * n} actors of {bundle} with strategy "
                f"{cfg.placement_strategy} (cluster resources: {ray.cluster_resources()}); lower ppo.cpus_per_actor, "
                "ppo.actors_per_role or ppo.gpus_per_actor"
            )
        settings = actor_settings(cfg, seed=seed, use_gpu=use_gpu)
        self.groups: dict[str, RoleGroup] = {}
        for role_index, (role, cls) in enumerate(ROLE_CLASSES.items()):
            remote_cls = ray.remote(cls)
            handles = []
            for rank in range(n):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=role_index * n + rank)
                handle = remote_cls.options(
                    num_cpus=cfg.cpus_per_actor,
                    num_gpus=cfg.gpus_per_actor if use_gpu else 0,
                    scheduling_strategy=strategy,
                    name=None,
                ).remote(_model_source(role, sources), {**settings, "rank": rank})
                handles.append(handle)
            self.groups[role] = RoleGroup(role, handles)
        # the trainable roles: rank 0's node hosts the rendezvous of its group, then DeepSpeed wraps each model
        starts = []
        for role, lr in (("policy", cfg.learning_rate), ("critic", cfg.critic_learning_rate)):
            handles = self.groups[role].handles
            addr, port = ray.get(handles[0].address.remote())
            starts += [h.init_engine.remote(addr, port, n, lr) for h in handles]
        ray.get(starts)
        log(f"ppo: {4 * n} actors up ({n} per role, {bundle} each, placement {cfg.placement_strategy})")

    def __getitem__(self, role: str) -> RoleGroup:
        return self.groups[role]

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        import ray

        for group in self.groups.values():
            for h in group.handles:
                ray.kill(h)
        ray.util.remove_placement_group(self.pg)


def _model_source(role: str, sources: dict[str, ModelSource]) -> dict:
    """The role's weights as the actor resolves them on its own node (see `actors.resolve_model_dir`)."""
    src = sources[role]
    return {"path": src.path, "store_uri": src.store_uri, "ref": src.ref}
