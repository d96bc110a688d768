"""Checks and preparation of the SFT inputs, on the driver, before any Ray worker starts.

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Sequences longer than the limit are rejected, not truncated: truncating a prompt+completion cuts off its eos (the
model would never learn to stop on those rows) or, for long prompts, the whole completion, and both failures are
silent in the loss curve. A clear error with the count lets the user fix the data or the limit.

Rows come as prompt/completion strings, `messages` (a chat whose last turn is the reply), or TRL's conversational
prompt/completion (message lists). With a chat template in the tokenizer, chats go to TRL as conversational
prompt/completion: TRL renders the prompt with the generation prompt, the whole chat without it, and masks the loss
to the tokens after the prompt. Without a template they are rendered in the project's plain format as strings.
"""

from __future__ import annotations

from typing import Any

from stages.common.errors import StageInputError
from stages.common.hf import plain_chat_pair
from stages.trl.driver import check_turns
from stages.trl.tokens import token_ids_as_trl


def split_chat(messages: Any, where: str) -> tuple[list[dict], list[dict]]:
    """A `messages` row as (prompt turns, [the last turn]): the last turn is the assistant's reply to learn."""
    if not isinstance(messages, list):
        raise StageInputError(f"{where}: column 'messages': expected a list of turns, found {messages!r:.80}")
    if len(messages) < 2:
        raise StageInputError(f"{where}: column 'messages': expected at least 2 turns, found {len(messages)}")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise StageInputError(
            f"{where}: column 'messages': the last turn must be the assistant's reply, "
            f"found role {last.get('role') if isinstance(last, dict) else last!r}"
        )
    return messages[:-1], messages[-1:]


def _chat_row(prompt: list[dict], completion: list[dict], chat_template: bool, where: str) -> dict[str, Any]:
    check_turns(prompt, "prompt", where)
    check_turns(completion, "completion", where, replies=True)
    if chat_template:
        return {"prompt": prompt, "completion": completion}
    prompt_text, completion_text = plain_chat_pair(prompt, completion)
    return {"prompt": prompt_text, "completion": completion_text}


def to_prompt_completion(rows: list[dict[str, Any]], where: str, *, chat_template: bool = False) -> list[dict]:
    """Validate SFT rows (prompt/completion strings, messages, or conversational prompt/completion) and return them
    as prompt/completion rows: message lists when `chat_template` (TRL renders them), else plain-format strings."""
    if not rows:
        raise StageInputError(f"{where}: no rows (expected prompt/completion or messages rows)")
    columns = set(rows[0])
    if "messages" in columns and "prompt" not in columns:
        out = []
        for i, row in enumerate(rows):
            if "messages" not in row:
                raise StageInputError(f"{where}: row {i}: missing column 'messages'")
            prompt, completion = split_chat(row["messages"], f"{where}: row {i}")
            out.append(_chat_row(prompt, completion, chat_template, f"{where}: row {i}"))
        return out
    for column in ("prompt", "completion"):
        if column not in columns:
            raise StageInputError(
                f"{where}: missing column {column!r} (expected prompt/completion or messages; found {sorted(columns)})"
            )
    out = []
    for i, row in enumerate(rows):
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            out.append(_chat_row(prompt, completion, chat_template, f"{where}: row {i}"))
            continue
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise StageInputError(
                f"{where}: row {i}: prompt and completion must be strings (or both message lists), found "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )
        if not completion.strip():
            raise StageInputError(f"{where}: row {i}: empty completion (nothing to learn)")
        out.append({"prompt": prompt, "completion": completion})
    return out


def check_lengths(rows: list[dict], tokenizer, limit: int, where: str) -> list[int]:
    """Token counts of the sequences TRL will build from `rows`; any over `limit` is rejected with the count and
    the first offender."""
    lengths = [len(token_ids_as_trl(tokenizer, r["prompt"], r["completion"])) for r in rows]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long:
        first = too_long[0]
        raise StageInputError(
            f"{where}: {len(too_long)} of {len(rows)} rows are longer than the {limit}-token limit (row {first}: "
            f"{lengths[first]} tokens); shorten them, or use a model with a longer context"
        )
    return lengths
