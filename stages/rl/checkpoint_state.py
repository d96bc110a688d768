"""The RL stage's checkpoints under work_dir/checkpoints: each trainable role's DeepSpeed shards and `state.json`,
the commit marker written last and whole (see `CheckpointState`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.rl.actor_pool import ActorPool

STATE_FILE = "state.json"


class CheckpointState:
    """Checkpoints under work_dir/checkpoints: DeepSpeed dirs per trainable role (policy, and critic for PPO) plus
    `state.json` (the commit marker).

    state.json holds the iteration, the KL controller, the metric history and the pre-training evaluation, so a
    restarted stage continues the same curves. It is written last and whole on every backend (a local disk: a temp
    file synced and renamed over the old one; an object store: one put of the full bytes), so a crash mid-save leaves
    the previous checkpoint in force. work_dir may be an fsspec URI shared by the nodes of a cluster.
    """

    def __init__(self, work_dir: str):
        import fsspec

        self.is_uri = "://" in work_dir
        self.root = (
            f"{work_dir.rstrip('/')}/checkpoints" if self.is_uri else str(Path(work_dir).resolve() / "checkpoints")
        )
        self.fs, self._path = fsspec.core.url_to_fs(self.root)

    def load(self) -> dict | None:
        path = f"{self._path}/{STATE_FILE}"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def save(self, pool: ActorPool, *, iteration: int, kl_controller, history: list[dict], eval_before: dict) -> None:
        """Every actor of the trainable roles writes its shard, then the driver commits state.json."""
        import uuid

        import fsspec.implementations.local
        import ray

        tag = f"iter-{iteration:06d}"
        self.fs.makedirs(self._path, exist_ok=True)
        ray.get([ref for role in pool.trainable_roles
                 for ref in pool[role].broadcast("save_checkpoint", f"{self.root}/{role}", tag)])  # fmt: skip
        state = {"iteration": iteration, "tag": tag, "kl_controller": kl_controller.state_dict(),
                 "history": history, "eval_before": eval_before}  # fmt: skip
        # The marker is committed whole or not at all, on every backend: serialised before any I/O; on a local disk
        # (a folder or a file:// URI) written to a temp file, synced and renamed over the old one; on an object
        # store one put of the full bytes (an object appears whole). An in-place write cut short by a kill left a
        # truncated state.json that failed every retry.
        data = json.dumps(state).encode()
        target = f"{self._path}/{STATE_FILE}"
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            tmp = Path(self._path) / f".{STATE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            dir_fd = os.open(self._path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        else:
            self.fs.pipe_file(target, data)
        for role in pool.trainable_roles:  # keep only the committed tag
            for old in self.fs.glob(f"{self._path}/{role}/iter-*"):
                if old.rstrip("/").rsplit("/", 1)[-1] != tag:
                    self.fs.rm(old, recursive=True)

    def restore(self, pool: ActorPool, state: dict) -> None:
        """Load the committed tag into every actor of the trainable roles."""
        import ray

        ray.get([ref for role in pool.trainable_roles
                 for ref in pool[role].broadcast("load_checkpoint", f"{self.root}/{role}", state["tag"])])  # fmt: skip
