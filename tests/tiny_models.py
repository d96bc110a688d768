"""Tiny models for tests: a BPE tokenizer and randomly initialised GPT-2, Llama, Qwen2 and GPT-NeoX models, saved as
HF directories or published as a `base-model` artifact.

Random init is enough to test the mechanics of SFT, reward modelling and PPO in seconds; tests that need a model
that already knows the text can train it a few steps first.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from stages.common.hf import save_model_dir, train_bpe_tokenizer

# Small enough that one optimizer step takes milliseconds on one CPU thread, big enough to learn the demo format.
TINY_VOCAB = 400
TINY_CONTEXT = 128
TINY_WIDTH = 64
TINY_LAYERS = 2
TINY_HEADS = 2


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB):
    """The project's tokenizer recipe, trained on `texts` (pad and eos set)."""
    return train_bpe_tokenizer(list(texts), vocab_size)


def build_tiny_gpt2(tokenizer, *, context: int = TINY_CONTEXT, seed: int = 0):
    """A randomly initialised GPT-2 whose embedding matches `tokenizer` exactly."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=context,
        n_embd=TINY_WIDTH,
        n_layer=TINY_LAYERS,
        n_head=TINY_HEADS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


# Tiny random causal LMs of the architecture families users bring: (model_type, config class, config keywords).
# Llama and Qwen2 use grouped-query attention (4 query heads, 2 key/value heads) and RoPE, GPT-NeoX partial RoPE.
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": TINY_LAYERS, "max_position_embeddings": TINY_CONTEXT, "tie_word_embeddings": False},
    ),
    "qwen2": (
        "Qwen2Config",
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": TINY_LAYERS, "max_position_embeddings": TINY_CONTEXT, "tie_word_embeddings": True},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": TINY_LAYERS,
         "max_position_embeddings": TINY_CONTEXT},
    ),
    "gpt2": (
        "GPT2Config",
        {"n_embd": TINY_WIDTH, "n_head": TINY_HEADS, "n_layer": TINY_LAYERS, "n_positions": TINY_CONTEXT},
    ),
}


def tiny_config(arch: str, tokenizer, *, num_labels: int | None = None):
    """The config of a tiny `arch` model whose embedding has exactly len(tokenizer) rows."""
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r} (expected one of {', '.join(TINY_ARCHS)})")
    class_name, kwargs = TINY_ARCHS[arch]
    labels = {} if num_labels is None else {"num_labels": num_labels}
    return getattr(transformers, class_name)(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,  # None for a tokenizer without a pad token, as in Llama's
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **kwargs,
        **labels,
    )


def build_tiny_model(arch: str, tokenizer, *, head: str = "causal-lm", num_labels: int = 1, seed: int = 0):
    """A randomly initialised tiny `arch` model: a causal LM, or (head="reward-model") a sequence classifier."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if head == "causal-lm":
        return AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    if head == "reward-model":
        return AutoModelForSequenceClassification.from_config(tiny_config(arch, tokenizer, num_labels=num_labels))
    raise ValueError(f"unknown head {head!r} (expected causal-lm or reward-model)")


def save_tiny_model_dir(
    arch: str,
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    pad_token: bool = True,
    chat_template: bool = True,
    head: str = "causal-lm",
    num_labels: int = 1,
    vocab_size: int = TINY_VOCAB,
    seed: int = 0,
) -> Path:
    """Save a tiny random `arch` model with the project's BPE tokenizer trained on `texts` as one HF directory.

    pad_token=False saves a tokenizer with no pad token (as Llama's have none; `<|pad|>` stays in the vocabulary as a
    plain special token); chat_template=False one without the project's chat template.
    """
    tokenizer = build_tiny_tokenizer(texts, vocab_size)
    if not pad_token:
        tokenizer.pad_token = None
    if not chat_template:
        tokenizer.chat_template = None
    model = build_tiny_model(arch, tokenizer, head=head, num_labels=num_labels, seed=seed)
    return save_model_dir(model, tokenizer, out_dir)


def publish_tiny_base_model(
    store,
    texts: Iterable[str],
    *,
    name: str = "base-model",
    context: int = TINY_CONTEXT,
    seed: int = 0,
    vocab_size: int = TINY_VOCAB,
):
    """Train a tokenizer on `texts`, build a random tiny GPT-2, publish both as one `causal-lm` artifact."""
    tokenizer = build_tiny_tokenizer(texts, vocab_size)
    model = build_tiny_gpt2(tokenizer, context=context, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(model, tokenizer, d)
        return store.publish(d, name=name, kind="causal-lm", stage="tests", config={"tiny": True, "seed": seed})


def publish_rows(store, name: str, train: list[dict], test: list[dict], *, fmt: str, task: str | None = None):
    """Publish `train`/`test` rows as a `dataset` artifact (train.jsonl/test.jsonl), the layout stages read."""
    with tempfile.TemporaryDirectory() as d:
        for split, rows in (("train", train), ("test", test)):
            with open(Path(d) / f"{split}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return store.publish(d, name=name, kind="dataset", stage="tests", extra={"format": fmt, "task": task})
