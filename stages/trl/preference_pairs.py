"""Checks on preference pairs (prompt / chosen / rejected), shared by the stages that train on them (reward, DPO).

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Pairs longer than the limit are rejected, not truncated or dropped: truncation cuts the reply's end (its eos, where a
reward model reads its score and where DPO learns to stop), so chosen and rejected could become the same text; TRL's
own behaviour is to truncate or drop such pairs silently, which would change the data without a trace. A clear error
lets the user decide.

Pairs come as strings or in TRL's conversational form (prompt: a list of turns; chosen/rejected: lists of assistant
turns). With a chat template in the tokenizer TRL renders those; without one they become plain-format strings.
"""

from __future__ import annotations

from typing import Any

from stages.common.errors import StageInputError
from stages.common.hf import plain_chat_pair
from stages.trl.driver import check_turns
from stages.trl.tokens import token_ids_as_trl

COLUMNS = ("prompt", "chosen", "rejected")


def check_pairs(rows: list[dict[str, Any]], where: str, *, chat_template: bool = False) -> list[dict]:
    """Validate preference rows (strings or conversational, chosen != rejected); returns just those columns, as
    message lists when `chat_template` (TRL renders them), else as plain-format strings."""
    if not rows:
        raise StageInputError(f"{where}: no rows (expected prompt/chosen/rejected rows)")
    for column in COLUMNS:
        if column not in rows[0]:
            raise StageInputError(
                f"{where}: missing column {column!r} (expected prompt, chosen, rejected; found {sorted(rows[0])})"
            )
    out = []
    for i, row in enumerate(rows):
        values = {c: row.get(c) for c in COLUMNS}
        if all(isinstance(values[c], list) for c in COLUMNS):
            out.append(_chat_pair(values, chat_template, f"{where}: row {i}"))
            continue
        bad = next((c for c, v in values.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise StageInputError(
                f"{where}: row {i}: column {bad!r} must be a string (or all three message lists), "
                f"found {values[bad]!r:.60}"
            )
        if values["chosen"] == values["rejected"]:
            raise StageInputError(f"{where}: row {i}: chosen and rejected are the same text (no preference to learn)")
        out.append(values)
    return out


def _chat_pair(values: dict[str, list], chat_template: bool, where: str) -> dict:
    """A conversational pair, checked; as it is for TRL to render, or as plain-format strings without a template."""
    check_turns(values["prompt"], "prompt", where)
    for side in ("chosen", "rejected"):
        check_turns(values[side], side, where, replies=True)
    if values["chosen"] == values["rejected"]:
        raise StageInputError(f"{where}: chosen and rejected are the same reply (no preference to learn)")
    if chat_template:
        return values
    prompt, chosen = plain_chat_pair(values["prompt"], values["chosen"])
    return {"prompt": prompt, "chosen": chosen, "rejected": plain_chat_pair(values["prompt"], values["rejected"])[1]}


def check_lengths(rows: list[dict], tokenizer, limit: int, where: str) -> None:
    """Reject pairs whose prompt+chosen or prompt+rejected, as TRL tokenizes it (eos included), exceeds `limit`."""
    longest = [
        max(len(token_ids_as_trl(tokenizer, r["prompt"], r[side])) for side in ("chosen", "rejected")) for r in rows
    ]
    too_long = [i for i, n in enumerate(longest) if n > limit]
    if too_long:
        first = too_long[0]
        raise StageInputError(
            f"{where}: {len(too_long)} of {len(rows)} pairs are longer than the {limit}-token limit (row {first}: "
            f"{longest[first]} tokens); shorten them, or use a model with a longer context"
        )
