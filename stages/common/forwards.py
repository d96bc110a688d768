"""The full-sequence forwards over a rollout batch that the RL stage and the eval stage share (torch + transformers).

The batch is the left-padded prompt + reply layout of `sequences.py` (`rollout_layout`):
    tokens [B, P + T]: prompt left-padded to P, reply right-padded to T = max_new_tokens;
    attention_mask [B, P + T]; reply_mask [B, T] (1 up to and including the first eos).
What is read from a model over it: log p(reply token) at a temperature and the entropy there (`TokenLogprobs`), a
value model's output before each reply token (`TokenValues` over a `TokenValueModel`), both through
`per_reply_token`; a reward model's score per sequence (`sequence_scores`), read where transformers' classifier reads
it. Each forward computes only what is read: rows of similar length on their own column window (`length_buckets`:
the batch's edge padding skipped), a prompt that several rows share (GRPO/RLOO's groups) run once, no column past the
last reply token. Log-probs are always taken in fp32.

Shared here, not in `stages/rl`, because a stage never imports another stage: eval scores its replies with the very
forwards PPO trains on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.hf import score_position
from stages.common.sequences import length_buckets, position_ids


# ------------------------------------------------------------------------------------------- log-probs, entropy
def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits`: [B, T, V], [B, T] -> [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: [B, T, V] -> [B, T]."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# ----------------------------------------------------------------------------------------------------- readers
class TokenLogprobs:
    """What `per_reply_token` reads from a causal LM: log p(token) at `temperature` (and the entropy there)."""

    def __init__(self, model, temperature: float, with_entropy: bool = False):
        self.model, self.temperature, self.with_entropy = model, temperature, with_entropy

    def forward(self, input_ids, attention_mask, positions, cache, keep: int) -> torch.Tensor:
        """fp32 logits at the last `keep` positions: [b, L] -> [b, keep, V].

        Upcast before any temperature or log_softmax: bf16 keeps 8 bits of mantissa, so the policy's and the
        reference's log-probs (and the KL between them) would otherwise carry rounding of the order of 0.01 nats.
        """
        # logits_to_keep: the vocabulary projection only where a reply token is predicted (not over the prompt),
        # which on a 128k-vocabulary model with long prompts is most of the logits' memory; no KV cache is kept
        # unless `cache` is given (prompt sharing), as keeping one costs memory on every role
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
            use_cache=cache is not None, logits_to_keep=keep,
        )  # fmt: skip
        return out.logits.float()

    def finish(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple:
        logits = logits / self.temperature
        logprobs = logprobs_from_logits(logits, targets)
        return (logprobs, entropy_from_logits(logits)) if self.with_entropy else (logprobs,)


class TokenValues:
    """What `per_reply_token` reads from a `TokenValueModel`: the value before each reply token."""

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, attention_mask, positions, cache, keep: int) -> torch.Tensor:
        return self.model(input_ids, attention_mask, positions, cache)[:, -keep:]

    def finish(self, values: torch.Tensor, targets: torch.Tensor) -> tuple:
        return (values,)


def first_head(model) -> torch.nn.Module:
    """The one-output head of a sequence-classification model (`score` in most, `classifier` in some)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__}: no `score` or `classifier` head to read values from")


class TokenValueModel(torch.nn.Module):
    """A one-output sequence-classification model read at every position: backbone -> score head -> [B, L]."""

    def __init__(self, model):
        super().__init__()
        # the backbone under its prefix: `model` (Llama, Qwen2), `gpt_neox` (GPT-NeoX), `transformer` (GPT-2)
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = first_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:  # fmt: skip
        """[B, L] -> [B, L] fp32; `cache` (a transformers Cache) is read and extended when given (prompt sharing)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids(attention_mask) if positions is None else positions,
            past_key_values=cache, use_cache=cache is not None,
        ).last_hidden_state  # fmt: skip
        return self.head(hidden).squeeze(-1).float()


# ------------------------------------------------------------------------------------------ per reply token
def shared_prompts(tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """(one row per distinct prompt, each row's index into them) when at most half the rows have a prompt of
    their own, as in GRPO/RLOO's groups of replies; else None."""
    P = prompt_len
    key = torch.cat([tokens[:, :P] * attention_mask[:, :P], attention_mask[:, :P]], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if 2 * len(distinct) > len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def _prompt_shared_forward(reader, tokens, attention_mask, positions, prompt_len, start, end, shared):
    """The reader's outputs at positions P-1 .. end-2 with each distinct prompt run once: [B, end - P, ...].

    The prompt pass fills a KV cache for the distinct prompts, which is then gathered to one entry per row (an
    index_select, so gradients reach the prompt's weights through every reply), and the replies run on it.
    """
    from transformers import DynamicCache

    first, inverse = shared
    P = prompt_len
    cache = DynamicCache()
    at_prompt_end = reader.forward(
        tokens[first, start:P], attention_mask[first, start:P], positions[first, start:P], cache, 1
    )[inverse]  # fmt: skip
    if end - 1 == P:  # every reply is one token: the last prompt position predicts all there is
        return at_prompt_end
    cache.reorder_cache(inverse)
    replies = reader.forward(
        tokens[:, P : end - 1], attention_mask[:, start : end - 1], positions[:, P : end - 1], cache, end - 1 - P
    )  # fmt: skip
    return torch.cat([at_prompt_end, replies], dim=1)


def per_reply_token(
    reader, tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, *, max_buckets: int = 4,
    share_prompts: bool = True,
) -> tuple:  # fmt: skip
    """A reader's per-reply-token outputs (`TokenLogprobs`, `TokenValues`) over a rollout batch: [B, T] each.

    Rows sharing a prompt (GRPO/RLOO) run it once (`share_prompts`); otherwise each bucket of rows of similar
    length (`length_buckets`) runs on its own column window. A window ends one column before its last reply
    token, which predicts nothing read. Columns past a window come back as zeros (every row's reply mask is 0
    there). Exact up to float rounding, and differentiable.
    """
    P, T = prompt_len, tokens.shape[1] - prompt_len
    positions = position_ids(attention_mask)

    def padded(outs: tuple) -> list:  # [b, n] -> [b, T]
        return [torch.nn.functional.pad(o, (0, T - o.shape[1])) for o in outs]

    shared = shared_prompts(tokens, attention_mask, P) if share_prompts else None
    if shared is not None:
        ((_, start, end),) = length_buckets(attention_mask, max_buckets=1)
        out = _prompt_shared_forward(reader, tokens, attention_mask, positions, P, start, end, shared)
        return tuple(padded(reader.finish(out, tokens[:, P:end])))
    parts, order = [], []
    for rows, start, end in length_buckets(attention_mask, max_buckets):
        window = slice(start, end - 1)
        out = reader.forward(tokens[rows, window], attention_mask[rows, window], positions[rows, window], None,
                             end - P)  # fmt: skip
        parts.append(padded(reader.finish(out, tokens[rows, P:end])))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    return tuple(torch.cat(column)[inverse] for column in zip(*parts, strict=True))


# ----------------------------------------------------------------------------------------- reward-model scores
def reward_read_positions(tokens: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Where the reward model reads each sequence's score: [B, L] -> [B] positions into the whole sequence.

    The same position transformers' *ForSequenceClassification takes on this sequence padded with the reward model's
    pad id (the rightmost non-pad token), so PPO scores a reply as the reward stage trained and evaluated it: the
    eos when pad != eos, the last token before the trailing eos when pad == eos.
    """
    return score_position(tokens.masked_fill(attention_mask == 0, pad_token_id), pad_token_id)


def sequence_scores(model: TokenValueModel, tokens: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int,
                    max_buckets: int = 4) -> torch.Tensor:  # fmt: skip
    """A reward model's score of each (prompt, reply) sequence at `reward_read_positions`: [B] in fp32.

    Each bucket of rows of similar length (`length_buckets`) runs on its own column window, which holds its read
    positions; left padding does not shift positions (`position_ids`).
    """
    read = reward_read_positions(tokens, attention_mask, pad_token_id)
    scores = torch.zeros(read.shape[0], dtype=torch.float32, device=read.device)
    for rows, start, end in length_buckets(attention_mask, max_buckets):
        per_token = model(tokens[rows, start:end], attention_mask[rows, start:end])
        scores[rows] = per_token[torch.arange(len(rows), device=read.device), read[rows] - start]
    return scores
