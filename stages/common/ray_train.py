"""Ray Train launch helpers shared by the training stages (pretrain, SFT, reward).

Driver side:
    ensure_ray()                       join RAY_ADDRESS or start a local Ray (once per process)
    fit(train_loop, loop_config, ...)  run `train_loop(loop_config)` on ctx.scaling workers with a TorchTrainer whose
                                       storage is ctx.work_dir, so a rerun with the same work_dir resumes from the
                                       latest checkpoint; a failure raises `TrainingFailed` (one line + cause)
Worker side (inside train_loop):
    set_torch_threads(cpus)            torch threads = the CPUs Ray gave this worker (no oversubscription)
    resume_dir()                       context manager: local dir of the checkpoint to resume from, or None
    report(metrics, checkpoint_dir)    every rank calls it (it is a barrier); ranks passing a dir get it uploaded
                                       into one merged checkpoint directory
    log(msg)                           a progress line shown on the driver through ctx.log (rank 0 only)
    world_rank(), world_size()

Ray Train 2.60 runs its "V2" trainer: a run with the same `RunConfig(name, storage_path)` loads the previous run's
checkpoint snapshot, and `ray.train.get_checkpoint()` returns its latest checkpoint in the workers. `fit` also finds the
latest checkpoint directory itself and hands it to the workers when no snapshot names it (a run killed between
uploading a checkpoint and writing the snapshot); `resume_from_checkpoint` is deprecated in V2 and raises.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stages.common import checkpoint_digests
from stages.common.context import StageContext
from stages.common.placements import describe_placements, worker_placement

_LOG_QUEUE_KEY = "__rlhf_log_queue"
_TRAIN_LOOP_KEY = "__rlhf_train_loop"
_RESUME_KEY = "__rlhf_resume_from"
_LOG_DIR_KEY = "__rlhf_log_dir"
_POLICY_KEY = "__rlhf_untrusted_checkpoints"
_worker_log_queue = None  # set inside each worker process by _worker_entry
_worker_policy = "refuse"  # run.untrusted_checkpoints, set by _worker_entry
_worker_resume_from: str | None = None  # fallback checkpoint dir, set by _worker_entry


class TrainingFailed(RuntimeError):
    """A Ray Train run ended in an error; the message names the run, the worker rank and the worker's error."""


# ----------------------------------------------------------------------------------------------------------- driver


VERBOSE_ENV = "RLHF_VERBOSE"  # "1": workers' own output (Ray, DeepSpeed, HF) on the console too (`rlhf run --verbose`)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


LOCAL_HEALTH_CHECK_INTERVAL_S = 0.5  # seconds; see init_ray


def init_ray(address: str | None = None) -> None:
    """Join `address`, or start a local Ray on every core, as the pipeline's driver.

    Workers' output stays off the console unless verbose (the stages' progress lines reach it through their own
    queue; the training workers write theirs to a log file per stage run, see `fit`). A local Ray runs its dashboard
    on 127.0.0.1: Ray Train's placement-group cleaner polls the state API, which the dashboard serves, and without it
    logs "Failed to query Ray Train Controller actor state" every second of every run.
    """
    import logging

    import ray

    # Ray's own driver-side notices (start-up banner, token and signal-handler warnings) only with --verbose
    quiet = {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.ERROR}
    if address:
        ray.init(address=address, **quiet)  # joins; shutdown() only disconnects
    else:
        # Ray Train's controller polls its workers every 2 s, so each fit() returned up to 2 s after training ended
        # (benchmarks/startup_bench.py); the controllers of a Ray started here inherit this environment
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(LOCAL_HEALTH_CHECK_INTERVAL_S))
        from stages.common.addresses import keep_ray_on_loopback

        keep_ray_on_loopback()  # this machine's alone: nothing of it listens beyond 127.0.0.1
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", **quiet)


def ensure_ray() -> bool:
    """Join the cluster at RAY_ADDRESS if set, else start a local Ray on all cores; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    init_ray(os.environ.get("RAY_ADDRESS"))
    return True


def console_log_dir(work_dir: str) -> str | None:
    """Where a stage run's workers write their output instead of the console: None with --verbose (the console
    keeps it) or for a remote work_dir (Ray's own logs keep it)."""
    return None if verbose() else worker_log_dir(work_dir)


def worker_log_dir(work_dir: str) -> str | None:
    """Where a stage run's workers write their output (None for a remote work_dir: then Ray's own logs keep it)."""
    if "://" in work_dir:
        return None
    return str(Path(work_dir).resolve() / "logs")


def redirect_output(log_file: str) -> None:
    """Send this process's stdout and stderr (file descriptors, so C++ and library output too) to `log_file`."""
    import sys

    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def output_to(log_file: str | None) -> Iterator[None]:
    """`redirect_output` for the length of a block, then the process's own stdout/stderr again: for a Ray task,
    whose worker process Ray reuses for other tasks. None leaves the output where it is (`--verbose`)."""
    if log_file is None:
        yield
        return
    import sys

    saved = [os.dup(1), os.dup(2)]
    try:
        redirect_output(log_file)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def storage_path(work_dir: str) -> str:
    """Ray Train storage for ctx.work_dir: an fsspec/pyarrow URI as is, a local path made absolute."""
    return work_dir if "://" in work_dir else str(Path(work_dir).resolve())


def latest_checkpoint_dir(
    work_dir: str, run_name: str, is_complete: Callable[[Path], bool] | None = None, policy: str = "refuse"
) -> str | None:
    """The newest whole, trusted `checkpoint_*` directory a previous run left under work_dir/run_name (local only).

    Ray uploads a checkpoint file by file (in threads), so a run killed mid-upload leaves a torn folder: a folder
    counts only if `is_complete(folder)` says so (the stage knows what its checkpoints hold; without it, any
    non-empty folder) and its files match the digests its writers recorded (`checkpoint_digests.check`, which
    raises under policy "refuse" for a folder whose files no run wrote).
    """
    if "://" in work_dir:
        return None  # remote storage: Ray's own run snapshot does the restoring, and resume_dir checks it
    run_dir = Path(storage_path(work_dir)) / run_name
    candidates = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir() and any(p.iterdir())),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:  # newest first: the older ones are hashed only if the newer are passed over
        if (is_complete is None or is_complete(p)) and checkpoint_digests.check(p, policy):
            return str(p)
    return None


def fit(
    train_loop: Callable[[dict], Any],
    loop_config: dict,
    *,
    ctx: StageContext,
    run_name: str,
    max_failures: int = 1,
    checkpoints_to_keep: int = 2,
    checkpoint_complete: Callable[[Path], bool] | None = None,
):
    """Run `train_loop(loop_config)` on ctx.scaling Ray Train workers; returns the `ray.train.Result`.

    Checkpoints go to ctx.work_dir/run_name (the last `checkpoints_to_keep` are kept); a rerun with the same work_dir
    and run_name resumes from the latest one. Worker errors are retried `max_failures` times (from the latest
    checkpoint), then raised as `TrainingFailed`. `result.return_value` is what rank 0's train_loop returned.
    `checkpoint_complete(dir)` tells a whole checkpoint from one a killed run left half-uploaded (see
    `latest_checkpoint_dir`).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    ensure_ray()
    # Ray Train's print patch breaks `datasets` inside workers (dill captures stdout to hash map functions, and the
    # patched print sends that capture to the logs as pages of bytecode). Ray 2.60 copies this variable from the
    # driver's environment, when `trainer.fit()` starts, into the runtime_env of its controller and then of the
    # workers (ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE), so setting it here reaches every worker.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    scaling = ctx.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    previous = latest_checkpoint_dir(ctx.work_dir, run_name, checkpoint_complete, ctx.untrusted_checkpoints)
    if previous:
        ctx.log(f"{run_name}: a previous run left checkpoints; resuming from the latest ({Path(previous).name})")
    has_snapshot = previous is not None and any((Path(previous).parent).glob("checkpoint_manager_snapshot*"))
    log_dir = console_log_dir(ctx.work_dir)
    if log_dir and not ctx.logs_announced:
        ctx.log(f"{run_name}: worker output (Ray, DeepSpeed, HF) goes to {log_dir}/{run_name}-rank*.log")
    # The queue actor carries progress lines from rank 0 to the driver; it takes no CPU from the workers, and it
    # lives on the driver's node (hard affinity: it needs no resources, and that node is alive while the driver is;
    # a soft one let Ray place it on a worker node, whose loss then cut off the restarted group's lines).
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    from stages.common.addresses import node_bound_torch_config

    trainer = TorchTrainer(
        _worker_entry,
        torch_config=node_bound_torch_config(),  # the rendezvous listens on rank 0's node address only
        train_loop_config={
            **loop_config,
            _TRAIN_LOOP_KEY: train_loop,
            _LOG_QUEUE_KEY: queue,
            _RESUME_KEY: None if has_snapshot else previous,
            _LOG_DIR_KEY: f"{log_dir}/{run_name}" if log_dir else None,
            _POLICY_KEY: ctx.untrusted_checkpoints,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(ctx.work_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
        ),
    )
    done = threading.Event()
    pump = threading.Thread(target=_pump_logs, args=(queue, ctx.log, done, ctx.placements), daemon=True)
    pump.start()
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingFailed(f"{run_name}: {_describe_failure(exc)}") from exc
    finally:
        done.set()
        pump.join(timeout=5)
        if ctx.placements:
            ctx.log(f"{run_name}: {describe_placements(ctx.placements)}")
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)


def _pump_logs(queue, log: Callable[[str], None], done: threading.Event, placements: list[dict]) -> None:
    """Forward worker progress lines to the driver's logger until the run ends (then drain what is left); the
    workers' placement records (dicts) go to `placements` instead."""
    from ray.util.queue import Empty

    while True:
        try:
            item = queue.get(timeout=0.5)
        except Empty:
            if done.is_set():
                return
            continue
        except Exception:  # noqa: BLE001 - the queue actor unreachable for a moment (a node lost, a restart)
            if done.is_set():
                return  # or gone with the run
            time.sleep(1)  # keep listening: the worker group's restart reports through the same queue
            continue
        if isinstance(item, dict):
            placements.append(item)
        else:
            log(item)


def _describe_failure(exc: Exception) -> str:
    """One line: which worker failed and its own error message (not Ray's multi-line wrapper)."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, err = sorted(failures.items())[0]
        cause = getattr(err, "cause", None) or err  # RayTaskError keeps the user's exception in .cause
        lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
        message = lines[-1] if lines and "Traceback" in lines[0] else (lines[0] if lines else "")
        return f"training failed on worker rank {rank}: {type(cause).__name__}: {message}"
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"training failed: {lines[-1] if lines else type(exc).__name__}"


# ----------------------------------------------------------------------------------------------------------- worker


def _worker_entry(config: dict) -> Any:
    """What each Ray Train worker runs: unpack the driver's helpers, then the stage's own train loop."""
    global _worker_log_queue, _worker_resume_from, _worker_policy
    config = dict(config)
    train_loop = config.pop(_TRAIN_LOOP_KEY)
    _worker_log_queue = config.pop(_LOG_QUEUE_KEY, None)
    _worker_resume_from = config.pop(_RESUME_KEY, None)
    log_prefix = config.pop(_LOG_DIR_KEY, None)
    _worker_policy = config.pop(_POLICY_KEY, "refuse")
    if log_prefix:
        redirect_output(f"{log_prefix}-rank{world_rank()}.log")
    if _worker_log_queue is not None:  # every rank says where it runs (the stage's report records it)
        with contextlib.suppress(Exception):
            _worker_log_queue.put_nowait({"rank": world_rank(), **worker_placement()})
    return train_loop(config)


def world_rank() -> int:
    """This worker's rank in the Ray Train worker group."""
    import ray.train

    return ray.train.get_context().get_world_rank()


def world_size() -> int:
    """Number of workers in the Ray Train worker group."""
    import ray.train

    return ray.train.get_context().get_world_size()


def set_torch_threads(cpus: float) -> int:
    """Give torch as many intra-op threads as CPUs Ray reserved for this worker (at least 1); returns that number.

    Without it every worker starts one thread per core of the machine and two workers on 2 cores fight for them.
    """
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op in the process
        torch.set_num_interop_threads(1)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


@contextlib.contextmanager
def resume_dir() -> Iterator[str | None]:
    """Local directory of the checkpoint this run resumes from (downloaded if remote), or None on a fresh start.

    Only a checkpoint whose files match the digests its writers recorded is handed out: the stages unpickle it.
    One that does not is refused (`UntrustedCheckpoint`) or, under run.untrusted_checkpoints=retrain, passed over.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        found = _worker_resume_from if _worker_resume_from and Path(_worker_resume_from).is_dir() else None
        yield found if found and checkpoint_digests.check(found, _worker_policy) else None
        return
    with checkpoint.as_directory() as path:
        trusted = checkpoint_digests.check(path, _worker_policy)
        if not trusted:
            log(f"passing over the checkpoint {Path(path).name}: not as this product's runs wrote it; starting afresh")
        yield path if trusted else None


def report(metrics: dict, checkpoint_dir: str | os.PathLike | None = None) -> None:
    """Report metrics (rank 0's are kept) and optionally a checkpoint; every rank must call it the same number of times.

    Usual pattern: rank 0 writes the checkpoint into a temp dir and passes it, the others pass None. DeepSpeed ZeRO
    writes one shard per rank: then every rank passes its own dir and Ray merges them into one checkpoint directory.
    """
    import ray.train
    from ray.train import Checkpoint

    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint_digests.record(checkpoint_dir, f"rank{world_rank()}")  # what a resume will accept
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir))
    ray.train.report(metrics, checkpoint=checkpoint)


def log(message: str) -> None:
    """Send a progress line to the driver's ctx.log (rank 0 only; other ranks' lines are dropped)."""
    if world_rank() != 0:
        return
    if _worker_log_queue is None:
        print(message, flush=True)
        return
    try:
        _worker_log_queue.put_nowait(message)
    except Exception:
        print(message, flush=True)
