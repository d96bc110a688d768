"""Checks and preparation of the SFT inputs, on the driver, before any Ray worker starts.

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Sequences longer than the limit are rejected, not truncated: truncating a prompt+completion cuts off its eos (the
model would never learn to stop on those rows) or, for long prompts, the whole completion, and both failures are
silent in the loss curve. A clear error with the count lets the user fix the data or the limit.
"""

from __future__ import annotations

from typing import Any

from stages.common.errors import StageInputError
from stages.common.hf import check_vocab_matches

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def load_rows(artifact, split: str, where: str) -> list[dict[str, Any]]:
    """Rows of one split of a dataset artifact (train.jsonl / test.jsonl) as plain dicts."""
    from stages.common.data import DataError, load_dataset_artifact

    try:
        dataset = load_dataset_artifact(artifact, split)
    except DataError as e:
        raise StageInputError(f"{where}: {e}") from None
    return [dict(row) for row in dataset]


def render_messages(messages: Any, where: str) -> dict[str, str]:
    """A chat (`messages`) row as prompt/completion in the project's plain-text format: the last turn is the reply.

    `[{user: q}, {assistant: a}]` -> prompt "User: q\\nAssistant:", completion " a" (the demo task's format), so
    both data forms train the same model the same way without a chat template in the tokenizer.
    """
    if not isinstance(messages, list) or len(messages) < 2:
        raise StageInputError(
            f"{where}: column 'messages': expected a list of at least 2 turns, found {messages!r:.80}"
        )
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLE_NAMES or not isinstance(turn.get("content"), str):
            raise StageInputError(
                f"{where}: column 'messages': expected turns like {{'role': 'user'|'assistant'|'system', "
                f"'content': str}}, found {turn!r:.80}"
            )
    if messages[-1]["role"] != "assistant":
        raise StageInputError(
            f"{where}: column 'messages': the last turn must be the assistant's reply, "
            f"found role {messages[-1]['role']!r}"
        )
    history = "\n".join(f"{ROLE_NAMES[t['role']]}: {t['content']}" for t in messages[:-1])
    return {"prompt": f"{history}\nAssistant:", "completion": " " + messages[-1]["content"].lstrip()}


def to_prompt_completion(rows: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    """Validate SFT rows (prompt/completion or messages form) and return them as prompt/completion rows."""
    if not rows:
        raise StageInputError(f"{where}: no rows (expected prompt/completion or messages rows)")
    columns = set(rows[0])
    if "messages" in columns and "prompt" not in columns:
        out = []
        for i, row in enumerate(rows):
            if "messages" not in row:
                raise StageInputError(f"{where}: row {i}: missing column 'messages'")
            out.append(render_messages(row["messages"], f"{where}: row {i}"))
        return out
    for column in ("prompt", "completion"):
        if column not in columns:
            raise StageInputError(
                f"{where}: missing column {column!r} (expected prompt/completion or messages; found {sorted(columns)})"
            )
    out = []
    for i, row in enumerate(rows):
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise StageInputError(
                f"{where}: row {i}: prompt and completion must be strings, found "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )
        if not completion.strip():
            raise StageInputError(f"{where}: row {i}: empty completion (nothing to learn)")
        out.append({"prompt": prompt, "completion": completion})
    return out


def model_context(model_dir: str, tokenizer, where: str) -> int:
    """The model's context length, after checking its embedding matches the tokenizer and pad/eos exist."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text_config = config.get_text_config()
    try:
        check_vocab_matches(len(tokenizer), text_config.vocab_size, where)
    except ValueError as e:
        raise StageInputError(str(e)) from None
    if tokenizer.eos_token is None or tokenizer.pad_token is None:
        raise StageInputError(
            f"{where}: the tokenizer needs an eos and a pad token, found eos={tokenizer.eos_token!r}, "
            f"pad={tokenizer.pad_token!r}"
        )
    context = getattr(text_config, "n_positions", None) or getattr(text_config, "max_position_embeddings", None)
    if not context:
        raise StageInputError(f"{where}: config.json names no context length (n_positions / max_position_embeddings)")
    return int(context)


def token_limit(max_length: int | None, context: int, where: str) -> int:
    """The longest sequence allowed: the config's max_length, which may not exceed the model's context."""
    if max_length is None:
        return context
    if max_length > context:
        raise StageInputError(f"{where}: max_length {max_length} exceeds the model's context of {context} tokens")
    return max_length


def check_lengths(texts: list[str], tokenizer, limit: int, where: str) -> list[int]:
    """Token counts of `texts`; any text over `limit` tokens is rejected with the count and the first offender."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long:
        first = too_long[0]
        raise StageInputError(
            f"{where}: {len(too_long)} of {len(texts)} rows are longer than the {limit}-token limit (row {first}: "
            f"{lengths[first]} tokens); shorten them, or use a model with a longer context"
        )
    return lengths


def per_worker_batch(batch_size: int, num_workers: int, where: str) -> int:
    """Split the global batch over the workers, so results do not depend on the worker count."""
    if batch_size % num_workers:
        raise StageInputError(f"{where}: batch_size {batch_size} is not divisible by num_workers {num_workers}")
    return batch_size // num_workers
