"""Checks on the reward-model inputs, on the driver, before any Ray worker starts.

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Pairs longer than the limit are rejected, not truncated or dropped: the reply's end (its eos, where the score is
read) is what truncation would cut, so chosen and rejected could become the same text; TRL's own behaviour is to
drop such pairs silently, which would shrink the data without a trace. A clear error lets the user decide.
"""

from __future__ import annotations

from typing import Any

from stages.common import trl_stage
from stages.common.errors import StageInputError

COLUMNS = ("prompt", "chosen", "rejected")


def check_pairs(rows: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    """Validate preference rows (prompt/chosen/rejected strings, chosen != rejected); returns just those columns."""
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
        bad = next((c for c, v in values.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise StageInputError(f"{where}: row {i}: column {bad!r} must be a string, found {values[bad]!r:.60}")
        if values["chosen"] == values["rejected"]:
            raise StageInputError(f"{where}: row {i}: chosen and rejected are the same text (no preference to learn)")
        out.append(values)
    return out


def model_context(model_dir: str, tokenizer, where: str) -> int:
    """The model's context length, after the shared tokenizer checks; the pad token is where the score is read."""
    return trl_stage.model_context(model_dir, tokenizer, where, pad_reason="the score is read at the last non-pad token")


def check_lengths(rows: list[dict[str, str]], tokenizer, limit: int, where: str) -> None:
    """Reject pairs whose prompt+chosen+eos or prompt+rejected+eos exceeds `limit` tokens (count + first row)."""
    eos = tokenizer.eos_token
    lengths = []
    for side in ("chosen", "rejected"):
        texts = [r["prompt"] + r[side] + eos for r in rows]
        lengths.append([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    longest = [max(c, r) for c, r in zip(*lengths, strict=True)]
    too_long = [i for i, n in enumerate(longest) if n > limit]
    if too_long:
        first = too_long[0]
        raise StageInputError(
            f"{where}: {len(too_long)} of {len(rows)} pairs are longer than the {limit}-token limit (row {first}: "
            f"{longest[first]} tokens); shorten them, or use a model with a longer context"
        )
