"""Hugging Face plumbing shared by the stages: the tokenizer recipe, chat rendering, pad tokens, model loading.

Every model or tokenizer a stage publishes is a standard HF directory (safetensors + JSON), so plain
`AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)` load it. No pickles.

Chat: the project's plain format is "User: ...\nAssistant: ..." (one turn per line, eos after the final reply).
`plain_chat` renders it in Python for tokenizers without a chat template; `PLAIN_CHAT_TEMPLATE` is the same format
as a Jinja chat template, saved with every tokenizer the project trains, so a published model carries its format.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Special tokens of every tokenizer this project trains. The prompt format itself ("User: ...\nAssistant:") is plain
# text, so it needs no special tokens; eos ends a response and lets generation stop.
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN]
BYTE_ALPHABET_SIZE = 256

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
# `plain_chat` as a chat template: turns joined by newlines, eos after a final assistant turn only (earlier replies
# carry none, as in the plain format), "\nAssistant:" as the generation prompt. An unknown role is an error.
PLAIN_CHAT_TEMPLATE = (
    "{%- set names = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in names -%}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ' (expected system, user or assistant)') }}"
    "{%- endif -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ names[message['role']] ~ ': ' ~ message['content'] }}"
    "{%- if loop.last and message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nAssistant:' }}{%- endif -%}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a `PreTrainedTokenizerFast` with pad/eos set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus special tokens ({min_size})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        chat_template=PLAIN_CHAT_TEMPLATE,  # saved in tokenizer_config.json / chat_template.jinja with the model
    )


def plain_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """`messages` in the project's plain format, as PLAIN_CHAT_TEMPLATE renders them but without the final eos
    (TRL appends eos to plain-text completions itself)."""
    lines = []
    for turn in messages:
        if turn.get("role") not in ROLE_NAMES:
            raise ValueError(f"unknown role {turn.get('role')!r} (expected system, user or assistant)")
        lines.append(f"{ROLE_NAMES[turn['role']]}: {turn['content']}")
    text = "\n".join(lines)
    return text + "\nAssistant:" if add_generation_prompt else text


def plain_chat_pair(prompt: list[dict[str, str]], reply: list[dict[str, str]]) -> tuple[str, str]:
    """A chat split at the reply, as plain-format (prompt, reply) strings: `[{user: q}], [{assistant: a}]` ->
    ("User: q\nAssistant:", " a"), the demo task's format; the trainers append eos to the reply."""
    prompt_text = plain_chat(prompt, add_generation_prompt=True)
    return prompt_text, plain_chat(prompt + reply, add_generation_prompt=False)[len(prompt_text) :]


def render_prompt(tokenizer, prompt_or_messages: str | list[dict[str, str]]) -> str:
    """The text a model is asked to continue: a string prompt as it is; a message list through the tokenizer's chat
    template with the generation prompt, or in the plain format ("...\nAssistant:") when it has no template.

    Templates may put special tokens (bos) in the text, so tokenize the result with add_special_tokens=False.
    """
    if isinstance(prompt_or_messages, str):
        return prompt_or_messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_or_messages, tokenize=False, add_generation_prompt=True)
    return plain_chat(prompt_or_messages, add_generation_prompt=True)


def use_eos_as_pad(tokenizer) -> str | None:
    """Give a tokenizer without a pad token eos as its pad (Llama-style tokenizers ship none); pads on the right.

    Returns a one-line note of what was done, or None when the tokenizer already had a pad token. With pad == eos a
    sequence classifier reads its score at the last token that is not eos (transformers takes the rightmost non-pad
    token), i.e. the reply's last text token; eos tokens inside a prompt do not move that position.
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    tokenizer.pad_token = tokenizer.eos_token
    return f"the tokenizer had no pad token: pad = eos ({tokenizer.eos_token!r}, id {tokenizer.eos_token_id})"


def score_position(input_ids, pad_token_id: int | None):
    """Where transformers' *ForSequenceClassification reads its score: the rightmost token that is not pad.

    input_ids: [B, T] -> [B]; the last position when there is no pad id. With pad == eos this is the last token
    before a trailing eos, so a reader of per-token reward-model outputs (PPO) must take this position, not the eos.
    """
    import torch

    width = input_ids.shape[-1]
    if pad_token_id is None:
        return torch.full(input_ids.shape[:-1], width - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(width, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def model_load_kwargs(bf16: bool) -> dict[str, Any]:
    """from_pretrained keywords for training: SDPA attention (every supported architecture has it) and an explicit
    dtype, so a checkpoint stored in bf16 is not silently trained in bf16 by an fp32 stage, nor the reverse."""
    import torch

    return {"attn_implementation": "sdpa", "dtype": torch.bfloat16 if bf16 else torch.float32}


def fuse_gelu_tanh(model) -> int:
    """Swap the Python-written tanh-GELU modules (GPT-2's "gelu_new", "gelu_fast") for torch's one-kernel
    `gelu(approximate="tanh")`, in place; returns how many were swapped.

    The same function (outputs differ by float rounding, ~1e-6), but one kernel instead of seven elementwise ops
    and their saved activations: 10-15% of a small GPT-2's training step on CPU. config.json is untouched, so
    what a stage saves still loads as the architecture it was.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def check_vocab_matches(tokenizer_len: int, embedding_rows: int, what: str) -> None:
    """The classic `size mismatch` between stages, caught early with both sizes named."""
    if tokenizer_len > embedding_rows:
        raise ValueError(
            f"{what}: tokenizer has {tokenizer_len} tokens but the model's embedding has {embedding_rows} rows; "
            "the tokenizer and model come from different runs"
        )


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer into one standard HF directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
