"""LoRA in the TRL stages: each trainer gets peft's adapters (the reward model's score head in full, DPO's reference
the same model with the adapter off), fast without Ray; then a Llama base through SFT, reward and DPO with LoRA on
Ray workers, each output loading merged in transformers and as an adapter in peft (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.common.artifact_import import import_model
from stages.common.context import Scaling, StageContext
from stages.common.lora import LoraSection
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from tests.tiny_models import save_tiny_model_dir

DEMO = DemoConfig(size="tiny")
LORA = LoraSection(r=4, alpha=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store holding a tiny random Llama (imported as a user's model would be) and the tiny demo data sets."""
    root = tmp_path_factory.mktemp("lora")
    store = ArtifactStore(root / "store")
    texts = [r["text"] for r in generate(DEMO)["corpus"]["train"][:2000]]
    base = import_model(store, save_tiny_model_dir("llama", texts, root / "llama"), "causal-lm", "my-llama")
    return {
        "root": root,
        "store": store,
        "base": base,
        "sft_data": ingest("demo", "sft", store, demo_cfg=DEMO),
        "preferences": ingest("demo", "preferences", store, demo_cfg=DEMO),
    }


def _trainable(model) -> tuple[set[str], int, int]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names, sum(p.numel() for p in model.parameters() if p.requires_grad), sum(
        p.numel() for p in model.parameters()
    )


# ----------------------------------------------------------------------------------------------- fast: no Ray


def test_sft_trains_adapters_only_and_the_completion_only_loss_still_holds(setup, tmp_path):
    import stages.sft as sft
    from stages.sft.train import build_trainer

    cfg = sft.stage.prepare(sft.Config(max_steps=1, lora=LORA), setup["base"], setup["sft_data"],
                            scaling=Scaling(num_workers=1))  # fmt: skip
    trainer = build_trainer(cfg, str(tmp_path / "out"))
    names, trainable, total = _trainable(trainer.model)
    assert names and all("lora_" in n for n in names) and trainable < total / 4
    tokenizer = trainer.processing_class
    for row, example in zip(cfg.train_rows[:5], trainer.train_dataset.select(range(5)), strict=True):
        n_prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        assert example["labels"][:n_prompt] == [-100] * n_prompt
        assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]


def test_the_reward_model_trains_its_score_head_in_full_beside_the_adapters(setup, tmp_path):
    import stages.reward as reward
    from stages.reward.train import build_trainer

    cfg = reward.stage.prepare(reward.Config(max_steps=1, lora=LORA), setup["base"], setup["preferences"],
                               scaling=Scaling(num_workers=1))  # fmt: skip
    names, _, _ = _trainable(build_trainer(cfg, str(tmp_path / "out")).model)
    heads = {n for n in names if "lora_" not in n}
    assert heads and all(".score." in n and "modules_to_save" in n for n in heads)
    assert any("lora_" in n for n in names)


def test_dpo_with_lora_holds_one_model_and_its_reference_is_the_adapter_off(setup, tmp_path):
    import stages.dpo as dpo
    from stages.dpo.train import build_trainer

    cfg = dpo.stage.prepare(dpo.Config(max_steps=1, lora=LORA), setup["base"], setup["preferences"],
                            scaling=Scaling(num_workers=1))  # fmt: skip
    trainer = build_trainer(cfg, str(tmp_path / "out"))
    assert trainer.ref_model is None  # TRL takes the reference from the same weights with the adapter disabled
    names, trainable, total = _trainable(trainer.model)
    assert all("lora_" in n for n in names) and trainable < total / 4


# ----------------------------------------------------------------------------------------------- slow: Ray


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _check_both_forms(artifact, head: str) -> dict:
    """The merged model loads in transformers, the adapter in peft on the base it names, and both agree."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "reward-model" else AutoModelForCausalLM
    adapter = Path(artifact.path) / artifact.manifest["extra"]["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    kwargs = {"num_labels": 1} if head == "reward-model" else {}
    as_adapter = PeftModel.from_pretrained(auto.from_pretrained(config["base_model_name_or_path"], **kwargs),
                                           adapter).eval()  # fmt: skip
    merged = auto.from_pretrained(artifact.path).eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(merged, ids), _logits(as_adapter, ids), atol=1e-4)
    assert not list(Path(artifact.path).rglob("*.bin")) and not list(Path(artifact.path).rglob("*.pt"))
    return config


@pytest.mark.slow
def test_sft_then_reward_and_dpo_with_lora_on_a_llama_base(setup, local_ray):
    import stages.dpo as dpo
    import stages.reward as reward
    import stages.sft as sft

    store, base, root = setup["store"], setup["base"], setup["root"]

    def ctx(name):
        return StageContext(work_dir=str(root / f"work-{name}"), cache_key=name, scaling=Scaling(num_workers=1))

    sft_model = sft.run(sft.Config(max_steps=20, logging_steps=5, eval_prompts=8, learning_rate=3e-3, lora=LORA),
                        base_model=base, data=setup["sft_data"], store=store, ctx=ctx("sft"))["sft-model"]  # fmt: skip
    losses = [row["loss"] for row in map(json.loads, (Path(sft_model.reports_path) / "metrics.jsonl").open())
              if "loss" in row]  # fmt: skip
    assert losses[-1] < losses[0]  # the adapter learnt
    config = _check_both_forms(sft_model, "causal-lm")
    assert config["base_model_name_or_path"] == base.path and config["r"] == 4
    assert sft_model.manifest["extra"]["lora"]["r"] == 4
    assert store.lineage(sft_model.ref)["inputs"]["base_model"]["ref"] == base.ref

    rm = reward.run(reward.Config(max_steps=10, logging_steps=5, lora=LORA), sft_model=sft_model,
                    preferences=setup["preferences"], store=store, ctx=ctx("reward"))["reward-model"]  # fmt: skip
    assert rm.kind == "reward-model"
    assert _check_both_forms(rm, "reward-model")["base_model_name_or_path"] == sft_model.path

    policy = dpo.run(dpo.Config(max_steps=10, logging_steps=5, eval_prompts=4, lora=LORA), sft_model=sft_model,
                     preferences=setup["preferences"], store=store, ctx=ctx("dpo"))["policy-dpo"]  # fmt: skip
    assert _check_both_forms(policy, "causal-lm")["base_model_name_or_path"] == sft_model.path
    assert store.lineage(policy.ref)["inputs"]["sft_model"]["ref"] == sft_model.ref
