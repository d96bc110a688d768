"""What a stage gets from whoever runs it (the flow, a test, a benchmark) besides its config and inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scaling:
    """How many Ray Train workers (or actors per PPO role) and what each one gets."""

    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    placement_strategy: str = "PACK"  # Ray placement group strategy of the worker group (SPREAD: across nodes)


@dataclass
class StageContext:
    """Run-level facts a stage needs: seed, scaling, where to checkpoint, and how to report progress.

    `work_dir` is unique per (stage, cache key): a stage rerun with the same key finds its checkpoints there and
    resumes instead of starting from step 0. It may be an fsspec URI on a multi-node cluster (Ray Train storage).
    """

    work_dir: str
    cache_key: str = ""
    seed: int = 0
    scaling: Scaling = field(default_factory=Scaling)
    log: Callable[[str], None] = print
    report_to: tuple[str, ...] = ()  # experiment trackers the trainers report to as well (tensorboard, wandb, ...)
    # the runner already told the user where the workers' own output goes (the flow says it on its "running" line)
    logs_announced: bool = False
    # a checkpoint in work_dir whose files this product did not record writing: "refuse" (one line) or
    # "retrain" (pass it over); see stages/common/checkpoint_digests.py
    untrusted_checkpoints: str = "refuse"
    # where the stage's Ray Train workers ran, one entry per worker start: {"rank", "node_id", "node_ip", "pid"}
    # (ray_train.fit fills it; a worker group restarted after a lost node adds its new entries)
    placements: list[dict] = field(default_factory=list)
    # called by the RL stage after each iteration with (method, that iteration's metrics): a sweep's trial hands
    # them to Ray Tune, whose ASHA scheduler may then stop the trial (flows/sweep_trial.py)
    on_iteration: Callable[[str, dict], None] | None = None
