"""Tiny models for tests: a BPE tokenizer and a randomly initialised GPT-2, published as a `base-model` artifact.

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
