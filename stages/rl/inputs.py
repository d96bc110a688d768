"""Checks of the PPO inputs on the driver, before any actor starts; each problem is one `StageInputError` line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.common.errors import StageInputError
from stages.common.tokens import check_same_tokenizer, special_token_ids
from stages.reward_functions.artifact import load_functions
from stages.rl.config import RLConfig


@dataclass
class PreparedInputs:
    """What the loop needs from the inputs: the policy's tokenizer (left padding), the prompt lists, and the
    special token ids the actors use (`{"pad_token_id": int, "eos_token_ids": [int, ...]}`)."""

    tokenizer: Any
    train_prompts: list[str]
    test_prompts: list[str]
    gold: Any  # the built-in task's gold scorer (prompt, reply) -> float, None for a user's prompts
    special_tokens: dict
    # the prompt data's other columns (e.g. `answer`), aligned with the prompts: keyword arguments of reward functions
    train_columns: dict[str, list] = field(default_factory=dict)
    test_columns: dict[str, list] = field(default_factory=dict)
    functions: list = field(default_factory=list)  # runner.LoadedFunction per reward function, verified


def _context_length(model_config, where: str) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(model_config, key, None)
        if isinstance(value, int):
            return value
    raise StageInputError(f"{where}: config.json: expected n_positions or max_position_embeddings, found neither")


def _load_prompts(artifact, split: str) -> tuple[list[str], dict[str, list]]:
    from stages.data.read import DataError, load_dataset_artifact

    where = f"prompts {artifact.ref} [{split}.jsonl]"
    try:
        ds = load_dataset_artifact(artifact, split)
    except DataError as e:
        raise StageInputError(f"prompts: {e}") from None
    if "prompt" not in ds.column_names:
        raise StageInputError(f"{where}: expected a 'prompt' column, found columns {ds.column_names}")
    prompts = list(ds["prompt"])
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise StageInputError(f"{where}: row {i}: column 'prompt': expected a non-empty string, found {p!r:.60}")
    if not prompts:
        raise StageInputError(f"{where}: no rows (expected at least one prompt)")
    return prompts, {c: list(ds[c]) for c in ds.column_names if c != "prompt"}


def check_inputs(cfg: RLConfig, *, sft_model, reward_model=None, prompts, reward_fns=None) -> PreparedInputs:
    """Tokenizers match, the reward model (when the section uses one) has one output, every prompt leaves room for
    max_new_tokens, every reward function (`reward_fns`: {label: reward-fn artifact}) can be called on the prompt
    data's columns."""
    from transformers import AutoConfig, AutoTokenizer

    algo = cfg.algorithm
    if cfg.reward.uses_model and reward_model is None:
        raise StageInputError(f"{algo}: {algo}.reward.model is set but no reward_model input was given")
    inputs = [("sft_model", sft_model, "causal-lm"), ("prompts", prompts, "dataset")]
    if cfg.reward.uses_model:
        inputs.append(("reward_model", reward_model, "reward-model"))
    for role, artifact, kind in inputs:
        if artifact.kind != kind:
            raise StageInputError(f"{algo} input {role}: {artifact.ref} is a {artifact.kind!r}, expected a {kind!r}")
    sft_where = f"sft_model {sft_model.ref}"
    policy_tok = AutoTokenizer.from_pretrained(sft_model.path)
    if policy_tok.eos_token is None:
        raise StageInputError(f"{sft_where}: tokenizer needs an eos token, found {policy_tok.special_tokens_map}")
    policy_config = AutoConfig.from_pretrained(sft_model.path)
    models = [(sft_where, policy_config)]
    if cfg.reward.uses_model:
        rm_where = f"reward_model {reward_model.ref}"
        check_same_tokenizer(policy_tok, AutoTokenizer.from_pretrained(reward_model.path), rm_where,
                             reference_name="the SFT policy's", hint="train the reward model from the same SFT model")
        rm_config = AutoConfig.from_pretrained(reward_model.path)
        if rm_config.num_labels != 1:
            raise StageInputError(
                f"{rm_where}: config.json num_labels: expected 1 (one scalar score), found {rm_config.num_labels}"
            )
        models.append((rm_where, rm_config))
    for where, conf in models:
        if getattr(conf, "vocab_size", len(policy_tok)) < len(policy_tok):
            raise StageInputError(
                f"{where}: config.json vocab_size {conf.vocab_size} is smaller than the tokenizer ({len(policy_tok)})"
            )
    context = min(_context_length(conf, where) for where, conf in models)
    budget = context - cfg.max_new_tokens
    if budget < 1:
        raise StageInputError(
            f"{cfg.algorithm}.max_new_tokens: expected less than the model context {context}, found {cfg.max_new_tokens}"
        )
    loaded = {split: _load_prompts(prompts, split) for split in ("train", "test")}
    splits = {split: rows for split, (rows, _) in loaded.items()}
    for split, rows in splits.items():
        lengths = [len(ids) for ids in policy_tok(rows, add_special_tokens=False)["input_ids"]]
        worst = max(range(len(rows)), key=lengths.__getitem__)
        if lengths[worst] > budget:
            raise StageInputError(
                f"prompts {prompts.ref} [{split}.jsonl]: row {worst}: the prompt is {lengths[worst]} tokens, expected "
                f"at most {budget} (context {context} minus {cfg.algorithm}.max_new_tokens {cfg.max_new_tokens})"
            )
    policy_tok.padding_side = "left"  # generation continues every prompt from its last token
    special_tokens = special_token_ids(policy_tok, sft_model.path)
    from stages.data.ingest import task_gold_scorer

    columns = {split: cols for split, (_, cols) in loaded.items()}
    functions = load_functions(cfg.reward.functions, reward_fns or {}, sorted(columns["train"]),
                               f"{algo}.reward.functions")  # fmt: skip
    return PreparedInputs(policy_tok, splits["train"], splits["test"], task_gold_scorer(prompts), special_tokens,
                          columns["train"], columns["test"], functions)  # fmt: skip


def check_data(cfg: RLConfig, *, scaling, sft_model, prompts, reward_model=None, **reward_fns) -> None:
    """`check_inputs` on prompts not yet published (a prompt that leaves no room for max_new_tokens, ...): the flow
    runs it before the prompts become a dataset version (`stages.data.ingest.ingest`). `scaling` is unused here;
    the reward functions are checked by the stage itself."""
    without_functions = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"functions": []})})
    check_inputs(without_functions, sft_model=sft_model, reward_model=reward_model, prompts=prompts)
