"""The built-in reward functions, with the signature of TRL's (`fn(prompts, completions, **columns)`).

This file is imported into the store as a `reward-fn` artifact when a run uses one of them, and the actor runs it
from there, exactly as a user's file: so a policy's lineage names the code that rewarded it, built-in or not.
It imports nothing of ours at the top (the demo's scorer is imported when called).
"""

from __future__ import annotations

import re


def _text(completion) -> str:
    """A reply's text: the string itself, or the content of the last turn of a conversational reply."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def _normalise(text: str) -> str:
    """Equal answers compare equal despite surrounding space, a final period or letter case."""
    return text.strip().rstrip(".").strip().casefold()


def _column(columns: dict, column: str, function: str) -> list:
    if column not in columns:
        found = ", ".join(sorted(k for k in columns if isinstance(columns[k], list))) or "none"
        raise KeyError(f"{function} needs the prompt data's column {column!r}; its columns are {found}")
    return columns[column]


def exact_match(completions, column: str = "answer", **columns) -> list[float]:
    """1.0 when the reply is the row's `column` value (after `_normalise`), else 0.0."""
    answers = _column(columns, column, "exact_match")
    return [float(_normalise(_text(c)) == _normalise(str(a))) for c, a in zip(completions, answers, strict=True)]


def math_match(completions, column: str = "answer", **columns) -> list[float | None]:
    """1.0 when `math-verify` finds the reply's final answer equal to the row's `column` (as LaTeX or plain text);
    None (left out) when the gold answer itself cannot be parsed."""
    from math_verify import parse, verify

    out: list[float | None] = []
    for completion, answer in zip(completions, _column(columns, column, "math_match"), strict=True):
        gold = parse(str(answer))
        if not gold:
            out.append(None)
            continue
        out.append(float(verify(gold, parse(_text(completion)))))
    return out


def format_regex(completions, pattern: str = r".+", **columns) -> list[float]:
    """1.0 when the whole reply (stripped) matches `pattern` (dot matches newlines), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(_text(c).strip()) is not None) for c in completions]


def demo_gold(prompts, completions, **columns) -> list[float]:
    """The demo task's gold scorer (`stages.data.demo.gold_score`): in [-1, 1], higher is better."""
    from stages.data.demo import gold_score

    return [gold_score(_text(p) if isinstance(p, list) else p, _text(c)) for p, c in zip(prompts, completions, strict=True)]
