"""The tokenizer checks the RL stage and the eval stage share: one tokenizer for every model they read, its pad and
stop ids. Each problem is one `StageInputError` line."""

from __future__ import annotations

from stages.common.errors import StageInputError


def check_same_tokenizer(reference, other, where: str, *, reference_name: str, hint: str) -> None:
    """`other` has `reference`'s vocabulary, eos and pad token, or log-probs and reward scores would read other tokens.

    A missing pad token counts as eos, as every stage fills it in (`special_token_ids`, the reward stage).
    `reference_name` names the reference in the messages ("the SFT policy's"); `hint` ends the vocabulary message.
    """
    mine, theirs = reference.get_vocab(), other.get_vocab()
    if mine != theirs:
        first = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:1]
        raise StageInputError(
            f"{where}: its tokenizer differs from {reference_name} ({len(theirs)} vs {len(mine)} tokens; first "
            f"difference {first[0] if first else '?'}); {hint}"
        )
    for special, (a, b) in {
        "eos_token": (reference.eos_token, other.eos_token),
        "pad_token": (reference.pad_token or reference.eos_token, other.pad_token or other.eos_token),
    }.items():
        if a != b:
            raise StageInputError(f"{where}: tokenizer {special} is {b!r}, expected {reference_name} {a!r}")


def special_token_ids(tokenizer, model_dir: str) -> dict:
    """Pad and eos ids for generation; sets the tokenizer's pad token to eos when it has none (Llama, GPT-2, Qwen).

    Pad == eos is safe here: prompts are masked by the attention mask and replies end at their first eos
    (`sequences.reply_mask_from_eos`), never at the first pad. The eos ids are the tokenizer's eos first, then any
    other stop ids the model's generation_config.json lists (chat models often stop on several).
    Returns {"pad_token_id": int, "eos_token_ids": [int, ...]}.
    """
    from transformers import GenerationConfig

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = [int(tokenizer.eos_token_id)]
    try:
        extra = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's eos is the only stop token
        extra = None
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if int(i) not in eos_ids:
            eos_ids.append(int(i))
    return {"pad_token_id": int(tokenizer.pad_token_id), "eos_token_ids": eos_ids}
