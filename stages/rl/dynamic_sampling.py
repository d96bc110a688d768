"""DAPO's dynamic sampling (Yu et al. 2025): train only on the groups whose replies did not all get one reward.

A group whose replies all scored the same (all right, or all wrong, under an exact-match reward) has zero advantage
on every reply under GRPO and RLOO alike: it adds no policy gradient and only dilutes the batch. With
`dynamic_sampling` on (GRPO and RLOO), the loop keeps each rollout's informative groups
(`algorithm.informative_rows`) and samples further prompts, in refill rounds, until it holds `rollout_batch_size`
groups or has sampled `max_sampling_rounds` rollouts (`RLLoop._informative`). It trains on the kept groups: at most
`rollout_batch_size`, a whole number per actor of the role. When the kept rows do not fill one minibatch per actor,
the iteration trains on its first rollout as without the filter (its flat groups then add only the KL term).

This module joins and cuts the pieces: rollout batches (`stages/common/sequences.py`'s layout, whose prompts are
left-padded to each round's longest) and the loop's per-row scores.
"""

from __future__ import annotations

import dataclasses

import torch


def take_rows(value, rows: list[int]):
    """The `rows` of a per-row value: a tensor's rows, a list's items, a dict's or a dataclass's fields in turn;
    anything else (a prompt length, None) as it is."""
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, list):
        return [value[i] for i in rows]
    if isinstance(value, dict):
        return {k: take_rows(v, rows) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: take_rows(getattr(value, f.name), rows)
                                             for f in dataclasses.fields(value)})  # fmt: skip
    return value


def join_rows(parts: list):
    """Per-row values of several pieces, one after another (the inverse of `take_rows` over a split); for rollout
    batches, whose prompt widths differ, see `join_rollouts`."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, list):
        return [item for part in parts for item in part]
    if isinstance(first, dict):
        return {k: join_rows([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: join_rows([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first)})  # fmt: skip
    return first  # None stays None


def join_rollouts(batches: list[dict], pad_id: int) -> dict:
    """Rollout batches sampled in separate rounds as one: each round left-padded its prompts to its own longest, so
    `tokens` and `attention_mask` gain pad columns on the left up to the widest prompt (pad_id, attention 0); the
    reply-aligned tensors ([B, T]: reply_mask, logprobs; [B]: ended) join as they are."""
    width = max(b["prompt_len"] for b in batches)
    padded = []
    for b in batches:
        extra, rows = width - b["prompt_len"], b["tokens"].shape[0]
        padded.append({**b, "prompt_len": width,
                       "tokens": torch.cat([b["tokens"].new_full((rows, extra), pad_id), b["tokens"]], dim=1),
                       "attention_mask": torch.cat([b["attention_mask"].new_zeros((rows, extra)), b["attention_mask"]],
                                                   dim=1)})  # fmt: skip
    return join_rows(padded)  # prompt_len, the same in every piece now, is kept as it is


def kept_groups(found: int, target: int, actors: int) -> int:
    """How many of the `found` informative groups an iteration trains on: at most `target` (rollout_batch_size), cut
    to a multiple of the role's `actors` (each takes an equal shard)."""
    return min(found, target) // actors * actors
