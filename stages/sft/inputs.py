"""Checks and preparation of the SFT inputs, on the driver, before any Ray worker starts.

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Sequences longer than the limit are rejected, not truncated: truncating a prompt+completion cuts off its eos (the
model would never learn to stop on those rows) or, for long prompts, the whole completion, and both failures are
silent in the loss curve. A clear error with the count lets the user fix the data or the limit.
"""

from __future__ import annotations

from typing import Any

from stages.common.errors import StageInputError

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


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
