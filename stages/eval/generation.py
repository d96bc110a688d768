"""What the evaluation does with a loaded model: sample replies, take their log-probs, read reward-model scores.

One batch layout for everything, the one PPO uses:
    tokens [B, P + T]: the prompt left-padded to P, the reply right-padded to T = max_new_tokens;
    attention_mask [B, P + T]; reply_mask [B, T] (1 up to and including the first eos).
Every tensor is created on (or moved to) the model's device; log-probs are taken in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch

from stages.common.sampling import decoding_config
from stages.common.sequences import position_ids, reply_mask_from_eos, seeded


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
    P, T = ids.shape[1], max_new_tokens
    config = decoding_config(temperature=temperature, top_p=1.0, max_new_tokens=T, eos_ids=eos_ids, pad_id=pad_id)
    with seeded(seed):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    replies = torch.full((out.shape[0], T), pad_id, dtype=torch.long, device=device)
    replies[:, : out.shape[1] - P] = out[:, P:]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    reply_mask = reply_mask_from_eos(replies, eos, generated=out.shape[1] - P)
    replies = replies.masked_fill(reply_mask == 0, pad_id)
    ended = (torch.isin(replies, eos) & (reply_mask > 0)).any(-1)
    return {
        "tokens": torch.cat([ids, replies], dim=1),
        "attention_mask": torch.cat([mask, reply_mask], dim=1),
        "reply_mask": reply_mask,
        "ended": ended,
    }


@torch.no_grad()
def reply_logprobs(model, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log p(reply token | everything before it) at `temperature`, in fp32, 0 on padding: [B, T].

    The batch may come from another model (the SFT model scoring a policy's samples): it is moved to this model's
    device first.
    """
    device = model_device(model)
    tokens, attention = batch["tokens"].to(device), batch["attention_mask"].to(device)
    reply_mask = batch["reply_mask"].to(device)
    T = reply_mask.shape[1]
    logits = model(input_ids=tokens, attention_mask=attention, position_ids=position_ids(attention)).logits
    # position t predicts token t + 1; upcast before dividing (bf16 would round log-probs by ~0.01 nats)
    logits = logits[:, -T - 1 : -1].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, -T:].unsqueeze(-1)).squeeze(-1)
    return logprobs * reply_mask


def score_head(model) -> torch.nn.Module:
    """The one-output head of a sequence classifier (`score` in most architectures, `classifier` in some)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__}: no `score` or `classifier` head to read reward-model scores from")


@torch.no_grad()
def reward_scores(reward_model, batch: dict[str, torch.Tensor], rm_pad_id: int) -> torch.Tensor:
    """The reward model's score of each (prompt, reply) sequence: [B] in fp32.

    Read at `hf.score_position` of the sequence padded with the reward model's own pad id, i.e. where transformers'
    classifier reads it in the reward stage (pad == eos: the last token before the trailing eos). The backbone gets
    explicit position ids, so left padding does not shift them.
    """
    from stages.common.hf import score_position

    device = model_device(reward_model)
    tokens, attention = batch["tokens"].to(device), batch["attention_mask"].to(device)
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = backbone(
        input_ids=tokens, attention_mask=attention, position_ids=position_ids(attention)
    ).last_hidden_state
    per_token = score_head(reward_model)(hidden).squeeze(-1).float()  # [B, L]
    where = score_position(tokens.masked_fill(attention == 0, rm_pad_id), rm_pad_id)
    return per_token[torch.arange(per_token.shape[0], device=device), where]
