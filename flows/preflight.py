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
class Resources:
    """CPUs and GPUs of the cluster (all nodes together), and the most GPUs any one node has."""

    cpus: float
    gpus: float
    gpus_per_node: float
    where: str  # "this machine" or "the Ray cluster at ADDRESS", for the message

    @classmethod
    def of_this_machine(cls) -> Resources:
        """What a local Ray started by the flow will see: every core, every visible CUDA device."""
        gpus = _local_gpu_count()
        return cls(cpus=float(os.cpu_count() or 1), gpus=float(gpus), gpus_per_node=float(gpus), where="this machine")

    @classmethod
    def of_ray_cluster(cls, address: str) -> Resources:
        """Totals of the cluster this process is connected to as a Ray driver."""
        import ray

        total = ray.cluster_resources()
        per_node = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        return cls(
            cpus=float(total.get("CPU", 0.0)),
            gpus=float(total.get("GPU", 0.0)),
            gpus_per_node=float(max(per_node, default=0.0)),
            where=f"the Ray cluster at {address}",
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
    for name in (s for s in stages if s in RL_METHODS):
        _check_rl_fits(cfg, name, resources)


def _check_rl_fits(cfg, name: str, resources: Resources) -> None:
    """The RL node's roles (four for ppo, three for the critic-free ones) must be placeable (stages/rl/placement.py)."""
    from stages.common.errors import StageInputError
    from stages.rl import placement

    try:
        placement.check_fits(
            cfg.stage_config(name).resolved(cfg.run.num_workers),
            total_gpus=resources.gpus,
            total_cpus=resources.cpus,
            use_gpu=cfg.run.use_gpu,
        )
    except StageInputError as e:
        raise ConfigError(f"{e} ({resources.where})") from None
