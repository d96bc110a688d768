"""Ray placement of the RL roles: one placement group, `actors_per_role` actors per role, sharded calls.

PPO runs four roles (policy, critic, reference, reward); GRPO and RLOO run three (no critic, see `placement.roles_for`).

The bundles and GPU fractions come from `placement.plan` over the cluster's resources: on CPU one bundle per actor,
on GPUs one bundle per GPU shared by the actors placed there. Trainable roles (policy, critic) form one
torch.distributed group per role (NCCL on GPU, gloo on CPU): rank 0 hosts the rendezvous and DeepSpeed all-reduces
gradients over the group, so a rollout batch is split evenly over the role's actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from stages.rl import placement
from stages.rl.actors import CriticActor, PolicyActor, ReferenceActor, RewardActor
from stages.rl.config import RLConfig
from stages.rl.devices import rl_precision

ROLE_CLASSES = {"policy": PolicyActor, "critic": CriticActor, "reference": ReferenceActor, "reward": RewardActor}
PLACEMENT_TIMEOUT_S = 120


@dataclass(frozen=True)
class ModelSource:
    """Where an actor finds its weights: the driver's local artifact path, or the store on another node."""

    path: str
    store_uri: str
    ref: str


def split_batch(batch: dict, n: int) -> list[dict]:
    """Split every tensor of a batch into `n` equal row shards (other values are copied to each shard).

    Every actor of a role must get a shard of the same size (DeepSpeed steps and ZeRO-3 gathers are collectives),
    so rows that do not divide by `n` are a bug of the caller: see `pad_to_multiple`.
    """
    if n == 1:
        return [batch]
    out: list[dict] = [{} for _ in range(n)]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.shape[0] % n:
                raise ValueError(f"split_batch: {key!r} has {value.shape[0]} rows, expected a multiple of {n} actors")
            parts = torch.chunk(value, n, dim=0)
        else:
            parts = [value] * n
        for shard, part in zip(out, parts, strict=True):
            shard[key] = part
    return out


def pad_to_multiple(items: list, n: int) -> list:
    """`items` repeated cyclically up to the next multiple of `n` (at least `n`), so `n` actors get equal shards."""
    if not items:
        raise ValueError("pad_to_multiple: expected at least one item, found none")
    size = max(n, -(-len(items) // n) * n)
    return [items[i % len(items)] for i in range(size)]


class RoleGroup:
    """The actors of one role; `submit` shards a batch over them, `gather` joins what they return."""

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


Join = Literal["concat", "mean"]


def join(parts: list, how: Join):
    """Join the per-actor results of one call, as the caller says.

    "concat": tensors, or dicts of tensors, concatenated along rows in rank order (sharded outputs);
    "mean": dicts of numbers (int or float) averaged over the actors (per-shard statistics).
    """
    if how == "concat":
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts, dim=0)
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
    if how == "mean":
        return {k: sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}
    raise ValueError(f"join: expected 'concat' or 'mean', found {how!r}")


def gather(refs: list, how: Join):
    """Wait for the sharded results of `RoleGroup.submit` and `join` them."""
    import ray

    return join(ray.get(refs), how)


def actor_settings(cfg: RLConfig, *, seed: int, use_gpu: bool, pad_token_id: int, eos_token_ids: list[int]) -> dict:
    """The plain settings every actor gets (no config objects cross the process boundary).

    The special token ids come from the driver's tokenizer: a model config may have no pad id (Llama) or
    several eos ids, and the policy's response mask must agree with the driver's decoding.
    """
    sampling_threads = generation_threads(cfg, use_gpu)
    return {
        **cfg.to_dict(),
        "seed": seed,
        "use_gpu": use_gpu,
        "precision": rl_precision(cfg.bf16, use_gpu, cfg.algorithm),
        "micro_batch_size": cfg.mini_batch_size // cfg.actors_per_role,
        "generation_threads": sampling_threads,
        # GRPO and RLOO train the policy alone (no critic beside it): it gets the waiting roles' CPUs then too
        "policy_train_threads": sampling_threads if cfg.critic_free else cfg.torch_threads,
        "pad_token_id": pad_token_id,
        "eos_token_ids": list(eos_token_ids),
    }


def generation_threads(cfg: RLConfig, use_gpu: bool) -> int:
    """The policy's sampling threads: `<method>.generation_threads`, else on CPU the CPUs that one actor of each role
    reserves (they wait while it samples; `placement.role_cpus`), never fewer than `torch_threads`; on GPU the
    threads do not matter, and a SPREAD placement puts the roles on other nodes, whose CPUs the policy cannot use."""
    if cfg.generation_threads is not None:
        return cfg.generation_threads
    if use_gpu or cfg.placement_strategy in ("SPREAD", "STRICT_SPREAD"):
        return cfg.torch_threads
    return max(cfg.torch_threads, round(sum(placement.role_cpus(cfg).values())))


class ActorPool:
    """Owns the placement group and one role group per role of the algorithm; `shutdown` releases them."""

    def __init__(
        self, cfg: RLConfig, sources: dict[str, ModelSource], *, seed: int, use_gpu: bool, special_tokens: dict,
        log=print, log_dir: str | None = None,
    ):  # fmt: skip
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = cfg.actors_per_role
        self.roles = placement.roles_of(cfg)
        layout = placement.plan(
            actors_per_role=n, cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=cfg.gpus_per_actor, use_gpu=use_gpu,
            resources=placement.cluster_resources(), strategy=cfg.placement_strategy, roles=self.roles,
            section=cfg.algorithm, cpus_of_role=placement.role_cpus(cfg),
        )  # fmt: skip
        self.pg = placement_group([dict(b) for b in layout.bundles], strategy=layout.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"{cfg.algorithm}: the Ray cluster did not place the bundles {list(layout.bundles)} with strategy "
                f"{layout.strategy} within {PLACEMENT_TIMEOUT_S}s (cluster resources: {ray.cluster_resources()}); "
                "other jobs may hold them"
            )
        settings = actor_settings(cfg, seed=seed, use_gpu=use_gpu, **special_tokens)
        self.groups: dict[str, RoleGroup] = {}
        for role in self.roles:
            remote_cls = ray.remote(ROLE_CLASSES[role])
            handles = []
            for rank in range(n):
                strategy = PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=layout.actor_bundle[(role, rank)]
                )
                handle = remote_cls.options(
                    num_cpus=layout.role_cpus[role],
                    num_gpus=layout.gpus_per_actor,
                    scheduling_strategy=strategy,
                    name=None,
                ).remote(_model_source(role, sources), {**settings, "rank": rank,
                         "log_file": f"{log_dir}/{role}-rank{rank}.log" if log_dir else None})  # fmt: skip
                handles.append(handle)
            self.groups[role] = RoleGroup(role, handles)
        # the trainable roles: rank 0's node hosts the rendezvous of its group, then DeepSpeed wraps each model
        starts = []
        rates = {"policy": cfg.learning_rate, "critic": getattr(cfg, "critic_learning_rate", None)}  # ppo only
        for role in self.trainable_roles:
            lr = rates[role]
            handles = self.groups[role].handles
            addr, port = ray.get(handles[0].address.remote())
            starts += [h.init_engine.remote(addr, port, n, lr) for h in handles]
        ray.get(starts)
        log(f"{cfg.algorithm}: {layout.describe()}")

    @property
    def trainable_roles(self) -> tuple[str, ...]:
        """The roles with a DeepSpeed engine (checkpointed, restored): policy and, for PPO, critic."""
        return tuple(r for r in placement.TRAINABLE_ROLES if r in self.roles)

    def __getitem__(self, role: str) -> RoleGroup:
        return self.groups[role]

    def placements(self) -> dict[str, list[dict]]:
        """Each role's actors' node id, node address and process id, by rank."""
        import ray

        refs = {role: [h.placement.remote() for h in group.handles] for role, group in self.groups.items()}
        return {role: ray.get(r) for role, r in refs.items()}

    def peak_rss(self) -> dict[str, int]:
        """Each role's peak resident memory so far, in bytes: the sum of its actors' `ru_maxrss`."""
        import ray

        refs = {role: [h.peak_rss.remote() for h in group.handles] for role, group in self.groups.items()}
        return {role: sum(ray.get(r)) for role, r in refs.items()}

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        import ray

        for group in self.groups.values():
            for h in group.handles:
                ray.kill(h)
        ray.util.remove_placement_group(self.pg)


def _model_source(role: str, sources: dict[str, ModelSource]) -> dict:
    """The role's weights as the actor resolves them on its own node (see `models.resolve_model_dir`)."""
    src = sources[role]
    return {"path": src.path, "store_uri": src.store_uri, "ref": src.ref}
