"""Which nodes run together: consecutive sibling branches form a group, and a group splits into waves of branches
that fit the cluster at the same time (by each branch's CPU and GPU demand). Pure but for `branch_demand`'s reading
of the RL placement; the flow asks the Ray driver for the cluster's resources only when a group has siblings."""

from __future__ import annotations

from collections.abc import Callable

from flows.config import PipelineConfig
from flows.dag import Node


def groups(nodes: dict[str, Node], stages: list[str], only: str | None) -> list[list[str]]:
    """Consecutive sibling branches form one group (they may run together); every other node is a group of one."""
    out: list[list[str]] = []
    for name in stages:
        is_branch = nodes[name].is_branch and not only
        if is_branch and out and nodes[out[-1][0]].is_branch:
            out[-1].append(name)
        else:
            out.append([name])
    return out


def waves(cfg: PipelineConfig, group: list[str], resources: Callable) -> list[list[str]]:
    """Split a group of sibling branches into waves that fit the cluster at the same time (one by one if not);
    `resources()` gives the cluster's (flows/preflight.py Resources), asked only for a group of several."""
    if len(group) == 1 or not cfg.align.concurrent:
        return [[name] for name in group]
    have = resources()
    demand = {name: branch_demand(cfg, name, have.gpus) for name in group}
    return branch_waves(group, demand, have.cpus, have.gpus)


def branch_demand(cfg: PipelineConfig, name: str, total_gpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) one alignment branch holds while it runs, for grouping siblings into waves that fit."""
    run = cfg.run
    if name == "dpo":
        return run.num_workers * run.cpus_per_worker, float(run.num_workers if run.use_gpu else 0)
    from stages.rl import placement

    rl = cfg.stage_config(name).resolved(run.num_workers)
    actors = len(placement.roles_of(rl)) * rl.actors_per_role  # GRPO and RLOO have no critic
    gpus = 0.0
    if run.use_gpu:  # derived fractions spread the roles over every GPU: a branch then holds them all
        gpus = actors * rl.gpus_per_actor if rl.gpus_per_actor else total_gpus
    return sum(placement.reserved_cpus(rl, rl.actors_per_role)), gpus


def branch_waves(branches: list[str], demand: dict[str, tuple[float, float]], cpus: float, gpus: float) -> list[list[str]]:
    """Group sibling branches into waves that fit the cluster together: (CPUs, GPUs) demand per branch.

    Greedy in the given order: a branch joins the current wave if the wave's total still fits, else starts the next
    one. A branch that does not fit alone gets a wave of its own (the pre-flight check has refused what can never fit).
    """
    out: list[list[str]] = []
    used = (0.0, 0.0)
    for branch in branches:
        need_cpu, need_gpu = demand[branch]
        fits = out and used[0] + need_cpu <= cpus + 1e-9 and used[1] + need_gpu <= gpus + 1e-9
        if fits:
            out[-1].append(branch)
            used = (used[0] + need_cpu, used[1] + need_gpu)
        else:
            out.append([branch])
            used = (need_cpu, need_gpu)
    return out
