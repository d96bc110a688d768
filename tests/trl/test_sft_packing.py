"""`sft.packing`: TRL's padding-free "bfd" packing as our stage builds it keeps the completion-only loss per packed
sequence, and packed sequences do not attend to each other with the attention we load (sdpa); a model that would is
refused (fast, no Ray)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from stages.common.context import Scaling
from stages.common.lora import LoraSection
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from tests.tiny_models import publish_tiny_base_model, save_tiny_model_dir

DEMO = DemoConfig(size="tiny")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store with a tiny random GPT-2 and a tiny random Llama (tokenizer from the demo corpus), the demo SFT data."""
    from stages.common.artifact_import import import_model

    root = tmp_path_factory.mktemp("sft-packing")
    store = ArtifactStore(root / "store")
    texts = [r["text"] for r in generate(DEMO)["corpus"]["train"][:2000]]
    return {
        "store": store,
        "gpt2": publish_tiny_base_model(store, texts),
        "llama": import_model(store, save_tiny_model_dir("llama", texts, root / "llama"), "causal-lm", "my-llama"),
        "data": ingest("demo", "sft", store, demo_cfg=DEMO),
    }


def _trainer(setup, arch: str, tmp_path, **fields):
    import stages.sft as sft
    from stages.sft.train import build_trainer

    cfg = sft.stage.prepare(sft.Config(max_steps=1, **fields), setup[arch], setup["data"], scaling=Scaling(num_workers=1))
    return cfg, build_trainer(cfg, str(tmp_path / f"out-{arch}-{len(fields)}"))


def _pieces(example: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sequence packed into one row, cut at its seq_lengths."""
    out, start = [], 0
    for n in example["seq_lengths"]:
        out.append((example["input_ids"][start : start + n], example["labels"][start : start + n]))
        start += n
    assert start == len(example["input_ids"])
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_rows_keep_the_completion_only_loss_per_sequence(setup, arch, tmp_path):
    cfg, trainer = _trainer(setup, arch, tmp_path, packing=True)
    assert trainer.args.packing and trainer.args.packing_strategy == "bfd" and trainer.padding_free
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token_id
    by_ids = {}  # every train row's tokens -> (its prompt length, its completion)
    for row in cfg.train_rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        by_ids[tuple(prompt + completion + [eos])] = len(prompt)
    dataset = trainer.train_dataset
    assert len(dataset) < len(cfg.train_rows)  # several rows share a packed row
    seen = 0
    for example in dataset:
        assert sum(example["seq_lengths"]) <= cfg.max_length
        for ids, labels in _pieces(example):
            n_prompt = by_ids[tuple(ids)]  # each piece is one whole row: nothing cut, nothing glued
            assert labels[:n_prompt] == [-100] * n_prompt  # prompt tokens carry no loss
            assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == eos  # completion + eos are learnt
            seen += 1
    assert seen == len(cfg.train_rows)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_packed_batch_gives_each_sequence_the_logits_it_has_alone(setup, arch, tmp_path):
    """What TRL's collator sends (one flattened row, position ids restarting, no attention mask) through the model
    as compute_loss calls it (use_cache=False): every packed sequence's logits equal that sequence's alone."""
    _, trainer = _trainer(setup, arch, tmp_path, packing=True)
    examples = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    pieces = [p for e in examples for p in _pieces(e)]
    starts = torch.tensor([0, *[len(ids) for ids, _ in pieces]]).cumsum(0)
    positions = batch["position_ids"][0]
    assert (positions[starts[:-1]] == 0).all() and (batch["labels"][0][starts[:-1]] == -100).all()
    assert len(pieces) >= 3

    model = trainer.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        for (ids, _), start in zip(pieces, starts[:-1].tolist(), strict=True):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, atol=1e-4, rtol=1e-4)


def test_packing_with_lora_trains_adapters_on_packed_rows(setup, tmp_path):
    _, trainer = _trainer(setup, "llama", tmp_path, packing=True, lora=LoraSection(r=4, alpha=8))
    assert trainer.padding_free and "seq_lengths" in trainer.train_dataset.column_names
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_without_packing_nothing_changes(setup, tmp_path):
    cfg, trainer = _trainer(setup, "gpt2", tmp_path)
    assert not trainer.args.packing and not trainer.padding_free
    assert len(trainer.train_dataset) == len(cfg.train_rows)


def test_the_probe_refuses_a_model_that_attends_across_packed_sequences():
    """A stand-in whose every position sees every earlier token (a running sum, position ids ignored): refused."""
    from stages.sft.packing import PackingError, check_packed_attention

    class Leaky(torch.nn.Module):
        config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=50), _attn_implementation="sdpa")

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 4)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return SimpleNamespace(logits=self.emb(input_ids).cumsum(dim=1))

    model = Leaky().train()
    with pytest.raises(PackingError, match="attend to each other"):
        check_packed_attention(model, "sft: model x")
    assert model.training  # the probe leaves the train mode as it found it


def test_preflight_refuses_a_model_type_whose_mask_ignores_position_ids(setup, monkeypatch):
    import stages.sft as sft
    from stages.sft.packing import PackingError

    gpt2_module = sys.modules["transformers.models.gpt2.modeling_gpt2"]
    stripped = types.ModuleType(gpt2_module.__name__)  # the same classes, without transformers' masking utils
    monkeypatch.setitem(sys.modules, gpt2_module.__name__, stripped)
    with pytest.raises(PackingError, match="packed sequences would attend to each other; set sft.packing: false"):
        sft.stage.prepare(sft.Config(packing=True), setup["gpt2"], setup["data"], scaling=Scaling(num_workers=1))
    sft.stage.prepare(sft.Config(packing=False), setup["gpt2"], setup["data"], scaling=Scaling(num_workers=1))
