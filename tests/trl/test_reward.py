"""Reward stage: metrics by hand, input checks, scoring (fast, no Ray), then real training on 2 Ray workers (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.hf import save_model_dir
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from stages.reward.metrics import mean_margin, pairwise_accuracy, pearson
from tests.tiny_models import build_tiny_gpt2, build_tiny_tokenizer, publish_rows, publish_tiny_base_model

# Noise-free labels for the tests: held-out accuracy then measures what the model learnt, not the label noise.
DEMO = DemoConfig(size="tiny", label_noise=0.0)
PROMPT = "User: Describe the cat.\nAssistant:"


@pytest.fixture(scope="module")
def demo_sets():
    return generate(DEMO)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_sets):
    """A store with a random tiny causal LM (standing in for an SFT model) and the tiny demo preference pairs."""
    root = tmp_path_factory.mktemp("reward")
    store = ArtifactStore(root / "store")
    texts = [r["text"] for r in demo_sets["corpus"]["train"][:2000]]
    sft_model = publish_tiny_base_model(store, texts, name="sft-model")
    preferences = ingest("demo", "preferences", store, demo_cfg=DEMO)
    return {"root": root, "store": store, "sft_model": sft_model, "preferences": preferences}


def _reward():
    import stages.reward as reward

    return reward


# ----------------------------------------------------------------------------------------------- fast: no Ray


def test_stage_interface():
    reward = _reward()
    assert reward.NAME == "reward"
    assert reward.INPUTS == {"sft_model": "causal-lm", "preferences": "dataset"}
    assert reward.OUTPUTS == ["reward-model"]


def test_pairwise_metrics_by_hand():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 3.0, 1.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(2 / 3)
    assert mean_margin(chosen, rejected) == pytest.approx((1 - 1 + 2) / 3)
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0  # a tie is not a win


def test_pearson_by_hand():
    # x = [1, 2, 3], y = [2, 4, 7]: centred x = [-1, 0, 1], centred y = [-7/3, -1/3, 8/3]
    # sum(xc*yc) = 5, sum(xc^2) = 2, sum(yc^2) = 114/9 -> 5 / sqrt(2 * 114 / 9)
    expected = 5 / (2 * 114 / 9) ** 0.5
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(expected)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 5.0])) == 0.0


def test_reward_model_reads_the_last_real_token_whatever_the_padding(demo_sets, tmp_path):
    """A score must not depend on the batch it is in (right padding, pad id set on the config)."""
    from stages.reward.evaluate import score_pairs
    from stages.reward.train import load_reward_model

    tokenizer = build_tiny_tokenizer([r["text"] for r in demo_sets["corpus"]["train"][:500]])
    save_model_dir(build_tiny_gpt2(tokenizer, seed=2), tokenizer, tmp_path)
    model, tok = load_reward_model(str(tmp_path))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    pairs = [{"prompt": PROMPT, "chosen": " The cat is happy."},
             {"prompt": PROMPT, "chosen": " The cat is sad, dirty and ugly." + " Yes." * 10}]
    alone = score_pairs(model, tok, pairs[:1], "chosen", batch_size=1)
    together = score_pairs(model, tok, pairs, "chosen", batch_size=2)
    assert together[0] == pytest.approx(alone[0], abs=1e-5)
    assert together[0] != pytest.approx(together[1], abs=1e-6)


def test_check_pairs_rejects_identical_replies_and_missing_columns():
    from stages.reward.inputs import check_pairs

    good = {"prompt": PROMPT, "chosen": " The cat is happy.", "rejected": " The cat is sad."}
    assert check_pairs([good], "w") == [good]
    with pytest.raises(StageInputError, match="w: row 1: chosen and rejected are the same text"):
        check_pairs([good, {**good, "rejected": good["chosen"]}], "w")
    with pytest.raises(StageInputError, match="w: missing column 'rejected'"):
        check_pairs([{"prompt": PROMPT, "chosen": " The cat is happy."}], "w")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": PROMPT, "chosen": " The cat is happy.", "rejected": " The cat is happy."},
            "row 0: chosen and rejected are the same text",
        ),
        ({"prompt": PROMPT, "chosen": " The cat is happy."}, "rejected"),
        (
            {"prompt": PROMPT, "chosen": " The cat is happy.", "rejected": " The cat is" + " very" * 400 + " sad."},
            r"1 of 1 pairs are longer than the 128-token limit \(row 0: \d+ tokens\)",
        ),
    ],
    ids=["chosen-equals-rejected", "missing-column", "too-long"],
)
def test_bad_preferences_are_rejected_before_training(setup, row, message):
    reward = _reward()
    bad = publish_rows(setup["store"], "bad-preferences", [row], [row], fmt="preferences")
    with pytest.raises(StageInputError, match=message) as err:
        reward.stage.prepare(reward.Config(), setup["sft_model"], bad, scaling=Scaling(num_workers=2))
    assert "bad-preferences@v" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_larger_than_embedding_is_rejected(setup, demo_sets, tmp_path):
    reward = _reward()
    texts = [r["text"] for r in demo_sets["corpus"]["train"][:500]]
    tokenizer = build_tiny_tokenizer(texts)
    save_model_dir(build_tiny_gpt2(build_tiny_tokenizer(texts, 300)), tokenizer, tmp_path / "m")
    bad = setup["store"].publish(tmp_path / "m", name="mismatched-sft", kind="causal-lm", stage="tests")
    with pytest.raises(
        StageInputError,
        match=rf"sft_model mismatched-sft@v1: tokenizer has {len(tokenizer)} tokens but the model's embedding has 300",
    ):
        reward.stage.prepare(reward.Config(), bad, setup["preferences"], scaling=Scaling(num_workers=2))


def test_wrong_input_kind_is_rejected(setup):
    reward = _reward()
    with pytest.raises(StageInputError, match="preferences = sft-model@v1: expected kind 'dataset', found 'causal-lm'"):
        reward.stage.prepare(reward.Config(), setup["sft_model"], setup["sft_model"], scaling=Scaling(num_workers=2))


# --------------------------------------------------------------------------------------- slow: Ray Train workers


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """The session's one local Ray (tests/conftest.py), shut down when the session ends."""
    yield


@pytest.mark.slow
def test_reward_model_trains_on_two_ray_workers(setup, ray_session):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = _reward()
    store, sft_model, preferences = setup["store"], setup["sft_model"], setup["preferences"]
    ctx = StageContext(work_dir=str(setup["root"] / "work"), cache_key="train", scaling=Scaling(num_workers=2))
    config = reward.Config(max_steps=150, batch_size=16, learning_rate=1e-3, save_steps=75, logging_steps=10)
    model = reward.run(config, sft_model=sft_model, preferences=preferences, store=store, ctx=ctx)["reward-model"]

    assert model.kind == "reward-model" and model.ref == "reward-model@v1"
    metrics = model.metrics
    for key in ("eval_accuracy", "eval_margin", "gold_correlation", "eval_loss", "wall_seconds"):
        assert key in metrics
    # 100 held-out pairs: chance is 0.5 with a standard deviation of 0.05, so 0.6 is two of them above it.
    assert metrics["eval_accuracy"] > 0.6 and metrics["eval_margin"] > 0
    assert metrics["gold_correlation"] > 0.2
    history = [json.loads(line) for line in (Path(model.reports_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0]

    rm = AutoModelForSequenceClassification.from_pretrained(model.path)
    tok = AutoTokenizer.from_pretrained(model.path)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert rm.score.out_features == 1
    assert not list(Path(model.path).glob("*.bin"))  # safetensors only, no pickles
    lineage = store.lineage(model.ref)
    assert lineage["inputs"]["sft_model"]["ref"] == sft_model.ref == "sft-model@v1"
    assert lineage["inputs"]["preferences"]["ref"] == preferences.ref
