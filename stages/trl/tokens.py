"""The tokenizer as the TRL stages use it, on the driver (checks) and on the workers (training, scoring)."""

from __future__ import annotations

from stages.common.hf import use_eos_as_pad
from stages.trl.loop_config import TokenizerPlan


def tokenizer_plan(tokenizer) -> TokenizerPlan:
    """What the stage does to the tokenizer (applied to `tokenizer` here, and again on each worker by
    `load_tokenizer`), recorded in the published artifact: pad = eos when it has no pad token; chat template or not."""
    note = use_eos_as_pad(tokenizer)
    return TokenizerPlan(
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        pad_is_eos=tokenizer.pad_token_id == tokenizer.eos_token_id,
        pad_note=note,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def load_tokenizer(model_dir: str):
    """The model's tokenizer as the stages train with it: pad = eos when it has none, padding on the right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    use_eos_as_pad(tokenizer)
    return tokenizer


def token_ids_as_trl(tokenizer, prompt: str | list, reply: str | list) -> list[int]:
    """The ids TRL's SFT and reward trainers build for prompt + reply: a conversational row through the chat
    template (which ends the reply itself), a plain-text row tokenized as TRL does, with eos appended."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token
    return list(tokenizer(prompt + (reply if reply.endswith(eos) else reply + eos))["input_ids"])
