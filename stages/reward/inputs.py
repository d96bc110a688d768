"""Checks on the reward-model inputs, on the driver, before any Ray worker starts.

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Pairs longer than the limit are rejected, not truncated or dropped: the reply's end (its eos, where the score is
read) is what truncation would cut, so chosen and rejected could become the same text; TRL's own behaviour is to
drop such pairs silently, which would shrink the data without a trace. A clear error lets the user decide.
"""

from __future__ import annotations

from typing import Any

from stages.common.errors import StageInputError
from stages.common.hf import check_vocab_matches

COLUMNS = ("prompt", "chosen", "rejected")


def load_rows(artifact, split: str, where: str) -> list[dict[str, Any]]:
    """Rows of one split of a dataset artifact (train.jsonl / test.jsonl) as plain dicts."""
    from stages.common.data import DataError, load_dataset_artifact

    try:
        dataset = load_dataset_artifact(artifact, split)
    except DataError as e:
        raise StageInputError(f"{where}: {e}") from None
    return [dict(row) for row in dataset]


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
    """The model's context length, after checking its embedding matches the tokenizer and pad/eos exist."""
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    try:
        check_vocab_matches(len(tokenizer), text_config.vocab_size, where)
    except ValueError as e:
        raise StageInputError(str(e)) from None
    if tokenizer.eos_token is None or tokenizer.pad_token is None:
        raise StageInputError(
            f"{where}: the tokenizer needs an eos and a pad token (the score is read at the last non-pad token), "
            f"found eos={tokenizer.eos_token!r}, pad={tokenizer.pad_token!r}"
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


def per_worker_batch(batch_size: int, num_workers: int, where: str) -> int:
    """Split the global batch over the workers, so results do not depend on the worker count."""
    if batch_size % num_workers:
        raise StageInputError(f"{where}: batch_size {batch_size} is not divisible by num_workers {num_workers}")
    return batch_size // num_workers
