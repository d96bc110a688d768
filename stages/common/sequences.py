"""Token-sequence helpers shared by the RL stage and the eval stage (torch only): the left-padded prompt + reply layout.

    tokens [B, P + T]: the prompt left-padded to P, the reply right-padded to T; reply mask [B, T] (1 up to and
    including the first eos).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reply_mask_from_eos(replies: torch.Tensor, eos_ids: torch.Tensor, generated: int) -> torch.Tensor:
    """1 on each reply token up to and including the first eos and within the `generated` columns, else 0: [B, T].

    Derived from the first eos, never from the pad id: when pad == eos (tokenizers without a pad token) the
    padding HF generate writes after a finished reply is indistinguishable from eos itself.
    """
    is_eos = torch.isin(replies, eos_ids).long()
    after_first_eos = (is_eos.cumsum(-1) - is_eos) > 0
    within = torch.arange(replies.shape[1], device=replies.device) < generated
    return (~after_first_eos & within).long()


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block under a fixed torch seed (CPU and CUDA), restoring the previous random state; None = no seeding."""
    if seed is None:
        yield
        return
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
