"""What the evaluation does with a loaded model: sample replies, take their log-probs, read reward-model scores.

One batch layout for everything, PPO's (`stages/common/sequences.py`: `rollout_layout`), and PPO's forwards over it
(`stages/common/forwards.py`), so a policy's log-probs and scores here are read as the RL stage read them:
    tokens [B, P + T]: the prompt left-padded to P, the reply right-padded to T = max_new_tokens;
    attention_mask [B, P + T]; reply_mask [B, T] (1 up to and including the first eos).
Every tensor is created on (or moved to) the model's device; log-probs are taken in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch

from stages.common.forwards import TokenLogprobs, TokenValueModel, per_reply_token, sequence_scores
from stages.common.sampling import decoding_config
from stages.common.sequences import rollout_layout, seeded


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, P], mask [B, P]) left-padded, so every reply starts at column P."""
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, seq in enumerate(prompt_ids):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_batch(
    model,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Sample one reply per prompt (HF generate, KV cache, stop at eos) under `seed`; returns the batch layout."""
    device = model_device(model)
    ids, mask = left_pad(prompt_ids, pad_id, device)
    config = decoding_config(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                             pad_id=pad_id)  # fmt: skip
    with seeded(seed):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return rollout_layout(ids, mask, out, max_new_tokens=max_new_tokens, pad_id=pad_id, eos_ids=eos_ids)


@torch.no_grad()
def reply_logprobs(model, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log p(reply token | everything before it) at `temperature`, in fp32, 0 on padding: [B, T].

    PPO's forward (`per_reply_token`). The batch may come from another model (the SFT model scoring a policy's
    samples): it is moved to this model's device first.
    """
    device = model_device(model)
    tokens, attention = batch["tokens"].to(device), batch["attention_mask"].to(device)
    reply_mask = batch["reply_mask"].to(device)
    prompt_len = tokens.shape[1] - reply_mask.shape[1]
    (logprobs,) = per_reply_token(TokenLogprobs(model, temperature), tokens, attention, prompt_len)
    return logprobs * reply_mask


@torch.no_grad()
def reward_scores(reward_model, batch: dict[str, torch.Tensor], rm_pad_id: int) -> torch.Tensor:
    """The reward model's score of each (prompt, reply) sequence: [B] in fp32.

    PPO's read (`sequence_scores`): at `hf.score_position` of the sequence padded with the reward model's own pad id,
    i.e. where transformers' classifier reads it in the reward stage (pad == eos: the last token before the trailing
    eos), with position ids that left padding does not shift.
    """
    device = model_device(reward_model)
    tokens, attention = batch["tokens"].to(device), batch["attention_mask"].to(device)
    return sequence_scores(TokenValueModel(reward_model), tokens, attention, rm_pad_id)
