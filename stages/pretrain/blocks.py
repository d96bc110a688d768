"""Token blocks: the corpus tokenized once on the driver, packed into fixed-length rows, sharded across workers.

Blocks live in a `.npy` file (no pickle) that workers memory-map; worker `rank` of `world` touches only rows
`rank::world`, and the batch order is a pure function of (seed, rank, step), so resuming at step s continues the
same data stream without saving any iterator state.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pack_blocks(docs: Sequence[Sequence[int]], eos_id: int, context: int) -> np.ndarray:
    """Concatenate documents, each followed by eos, and cut into (n_blocks, context) rows; the tail is dropped."""
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        stream.append(eos_id)
    n_blocks = len(stream) // context
    dtype = np.uint16 if max(stream, default=0) < 2**16 else np.int32
    return np.asarray(stream[: n_blocks * context], dtype=dtype).reshape(n_blocks, context)


def shard_rows(n_blocks: int, rank: int, world: int) -> np.ndarray:
    """Row indices of worker `rank`: every world-th row, cut so all workers hold the same count (lockstep steps)."""
    per_worker = n_blocks // world
    return np.arange(rank, per_worker * world, world)


def batch_rows(
    step: int, micro: int, *, shard_size: int, micro_batch_size: int, grad_accum: int, seed: int, rank: int
) -> np.ndarray:
    """Positions within this worker's shard for micro-batch `micro` of optimizer step `step` (both 0-based).

    Each epoch is a fresh seeded permutation of the shard, so every row is seen once per epoch.
    """
    batches_per_epoch = shard_size // micro_batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"a shard of {shard_size} blocks cannot fill one micro-batch of {micro_batch_size}")
    index = step * grad_accum + micro
    epoch, within = divmod(index, batches_per_epoch)
    order = np.random.default_rng([seed, rank, epoch]).permutation(shard_size)
    return order[within * micro_batch_size : (within + 1) * micro_batch_size]


def write_blocks(blocks: np.ndarray, path: str) -> str:
    """Save blocks as .npy, atomically (a reader never sees half a file); fsspec URIs work too."""
    if "://" in path:
        import fsspec

        with fsspec.open(path, "wb") as f:
            np.save(f, blocks, allow_pickle=False)
        return path
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, blocks, allow_pickle=False)
    os.replace(tmp, target)
    return str(target)


def read_shard(path: str, rank: int, world: int) -> np.ndarray:
    """This worker's rows of a block file, as int64 (memory-mapped locally, so other shards are never read)."""
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as f, tempfile.NamedTemporaryFile(suffix=".npy") as local:
            local.write(f.read())
            local.flush()
            return read_shard(local.name, rank, world)
    blocks = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.asarray(blocks[shard_rows(len(blocks), rank, world)], dtype=np.int64)
