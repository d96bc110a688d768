"""Hugging Face plumbing shared by the stages: the tokenizer recipe, model save/load, cross-stage checks.

Every model or tokenizer a stage publishes is a standard HF directory (safetensors + JSON), so plain
`AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)` load it. No pickles.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Special tokens of every tokenizer this project trains. The prompt format itself ("User: ...\nAssistant:") is plain
# text, so it needs no special tokens; eos ends a response and lets generation stop.
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN]
BYTE_ALPHABET_SIZE = 256


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
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


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
