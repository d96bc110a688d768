"""Checks of the eval inputs on the driver, before Ray starts; each problem is one `StageInputError` line.

What the evaluation needs from its inputs: the held-out prompts rendered and tokenized once with the SFT tokenizer
(every model shares it: `stages/common/tokens.py`, the RL stage's check), the pad and eos ids, and the pad id the
reward model reads its score against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from stages.common.errors import StageInputError
from stages.common.tokens import check_same_tokenizer, special_token_ids
from stages.data.ingest import task_of
from stages.eval.config import Config
from stages.eval.worker import SFT
from stages.reward_functions.artifact import load_functions

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # no dots: names become `<name>.<metric>` keys; \Z: no "\n"


@dataclass
class PreparedInputs:
    """The prompts (as rendered text and token ids), whether they are the demo task's, and the special token ids."""

    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    task: Any  # the built-in task module the prompts came from (gold_score, follows_format), None for a user's
    pad_id: int
    eos_ids: list[int]
    rm_pad_id: int
    columns: dict[str, list] = field(default_factory=dict)  # the held-out rows' other columns (e.g. answer)
    functions: list = field(default_factory=list)  # reward_functions.runner.LoadedFunction per function


def check_kind(role: str, artifact, kind: str) -> None:
    if getattr(artifact, "kind", None) != kind:
        found = getattr(artifact, "kind", type(artifact).__name__)
        raise StageInputError(f"eval input {role}: {getattr(artifact, 'ref', artifact)} is a {found!r}, expected a "
                              f"{kind!r}")  # fmt: skip


def check_policy_names(policies: dict) -> None:
    """Names become table rows and metric prefixes: letters, digits, '_' or '-', and never the baseline's name."""
    for name in policies:
        if not isinstance(name, str) or not _MODEL_NAME_RE.match(name) or name == SFT:
            raise StageInputError(
                f"eval input policies: model name {name!r}: expected letters, digits, '_' or '-' (no dots) and not "
                f"{SFT!r} (the SFT baseline's row)"
            )


def _context_length(path: str, where: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise StageInputError(f"{where}: config.json: expected n_positions or max_position_embeddings, found neither")


def _held_out_prompts(prompts, count: int) -> tuple[list, dict[str, list]]:
    from stages.data.read import DataError, load_dataset_artifact

    where = f"eval input prompts {prompts.ref} [test.jsonl]"
    try:
        ds = load_dataset_artifact(prompts, "test")
    except (DataError, FileNotFoundError) as e:
        raise StageInputError(f"eval input prompts: {e}") from None
    if "prompt" not in ds.column_names:
        raise StageInputError(f"{where}: expected a 'prompt' column, found columns {ds.column_names}")
    rows = list(ds["prompt"])[:count]
    columns = {c: list(ds[c])[:count] for c in ds.column_names if c != "prompt"}  # reward functions' keywords
    if not rows:
        raise StageInputError(f"{where}: no rows (expected at least one held-out prompt)")
    for i, p in enumerate(rows):
        if not (isinstance(p, str) and p) and not isinstance(p, list):
            raise StageInputError(f"{where}: row {i}: 'prompt': expected a string or a message list, found {p!r:.60}")
    return rows, columns


def prepare(config: Config, *, sft_model, reward_model, prompts, policies: dict, reward_fns=None) -> PreparedInputs:
    """Kinds, names, one shared tokenizer, a one-output reward model (when the run has one), prompts that leave room
    for the reply, reward functions the prompt data's columns can be passed to."""
    from transformers import AutoConfig, AutoTokenizer

    from stages.common.hf import render_prompt

    check_kind("sft_model", sft_model, "causal-lm")
    if reward_model is not None:
        check_kind("reward_model", reward_model, "reward-model")
    check_kind("prompts", prompts, "dataset")
    check_policy_names(policies)
    for name, artifact in policies.items():
        check_kind(f"policies[{name!r}]", artifact, "causal-lm")

    tokenizer = AutoTokenizer.from_pretrained(sft_model.path)
    if tokenizer.eos_token is None:
        raise StageInputError(f"eval input sft_model {sft_model.ref}: its tokenizer has no eos token (replies could "
                              "never stop)")  # fmt: skip
    others = {f"eval input reward_model {reward_model.ref}": reward_model} if reward_model is not None else {}
    others.update({f"eval input policies[{n!r}] {a.ref}": a for n, a in policies.items()})
    for where, artifact in others.items():
        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(artifact.path), where,
                             reference_name=f"sft_model {sft_model.ref}'s",
                             hint="evaluate models fine-tuned from the same SFT model")  # fmt: skip
    rm_config = AutoConfig.from_pretrained(reward_model.path) if reward_model is not None else None
    if rm_config is not None and rm_config.num_labels != 1:
        raise StageInputError(f"eval input reward_model {reward_model.ref}: config.json num_labels: expected 1 (one "
                              f"scalar score), found {rm_config.num_labels}")  # fmt: skip

    rows, columns = _held_out_prompts(prompts, config.eval_prompts)
    functions = load_functions(config.reward_functions, reward_fns or {}, sorted(columns), "eval.reward_functions")
    texts = [render_prompt(tokenizer, p) for p in rows]
    # a chat template may already hold special tokens (bos); a plain string is tokenized as the SFT trainer did
    ids = [tokenizer(t, add_special_tokens=isinstance(p, str))["input_ids"] for t, p in zip(texts, rows, strict=True)]
    models = {f"sft_model {sft_model.ref}": sft_model}
    if reward_model is not None:
        models[f"reward_model {reward_model.ref}"] = reward_model
    models.update({f"policies[{n!r}] {a.ref}": a for n, a in policies.items()})
    context, where = min((_context_length(a.path, w), w) for w, a in models.items())
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) + config.max_new_tokens > context:
        raise StageInputError(
            f"eval input prompts {prompts.ref} [test.jsonl]: row {longest}: the prompt is {len(ids[longest])} tokens; "
            f"with eval.max_new_tokens {config.max_new_tokens} that exceeds the context {context} of {where}"
        )
    special = special_token_ids(tokenizer, sft_model.path)  # pad = eos for a tokenizer without pad, as in PPO
    pad_id = special["pad_token_id"]
    rm_pad_id = rm_config.pad_token_id if rm_config is not None and rm_config.pad_token_id is not None else pad_id
    return PreparedInputs(
        prompt_texts=texts, prompt_ids=ids, task=task_of(prompts),
        pad_id=int(pad_id), eos_ids=special["eos_token_ids"], rm_pad_id=int(rm_pad_id),
        columns=columns, functions=functions,
    )  # fmt: skip
