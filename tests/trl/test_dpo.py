"""DPO stage: metrics by hand, config and input checks, TRL's tokenization and first loss (fast, no Ray), then a
real run on 2 Ray workers and a rerun that reuses its result (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.gates import check
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from stages.dpo.metrics import demo_eval_prompts, implicit_reward_metrics
from stages.trl.tokens import token_ids_as_trl
from tests.tiny_models import publish_rows, publish_tiny_base_model

DEMO = DemoConfig(size="tiny")
PROMPT = "User: Describe the cat.\nAssistant:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store with a random tiny causal LM (standing in for an SFT model) and the tiny demo preference pairs."""
    root = tmp_path_factory.mktemp("dpo")
    store = ArtifactStore(root / "store")
    texts = [r["text"] for r in generate(DEMO)["corpus"]["train"][:2000]]
    sft_model = publish_tiny_base_model(store, texts, name="sft-model")
    preferences = ingest("demo", "preferences", store, demo_cfg=DEMO)
    return {"root": root, "store": store, "sft_model": sft_model, "preferences": preferences}


def _dpo():
    import stages.dpo as dpo

    return dpo


# ----------------------------------------------------------------------------------------------- fast: no Ray


def test_stage_interface_and_defaults():
    dpo = _dpo()
    assert dpo.NAME == "dpo"
    assert dpo.INPUTS == {"sft_model": "causal-lm", "preferences": "dataset"}
    assert dpo.OUTPUTS == ["policy-dpo"]
    config = dpo.Config()
    assert (config.beta, config.loss_type, config.zero_stage, config.bf16) == (0.1, "sigmoid", None, False)
    assert config.gate.checks() == [("eval_reward_accuracy", "min", 0.55)]  # the only check on by default


@pytest.mark.parametrize(
    ("field", "value"),
    [("loss_type", "exo_pair"), ("loss_type", "dpo"), ("beta", 0.0), ("beta", "0.1"), ("zero_stage", 4)],
    ids=["exo-needs-smoothing", "unknown-loss", "beta-zero", "beta-string", "zero-4"],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        _dpo().Config(**{field: value})


def test_gate_reads_the_published_reward_accuracy():
    gate = _dpo().Config().gate
    assert check("dpo", gate, {"eval_reward_accuracy": 0.6}) == []
    (miss,) = check("dpo", gate, {"eval_reward_accuracy": 0.5})
    assert str(miss) == (
        "dpo: quality gate missed: eval_reward_accuracy = 0.5, expected at least 0.55 (dpo.gate.min_eval_reward_accuracy)"
    )


def test_implicit_reward_metrics_take_the_last_evaluation_under_our_names():
    history = [
        {"loss": 0.69, "rewards/accuracies": 0.1, "step": 5},  # a training log line, not an evaluation
        {"eval_loss": 0.68, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.01, "step": 5},
        {"eval_loss": 0.61, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.25,
         "eval_rewards/chosen": 0.05, "eval_rewards/rejected": -0.2, "step": 10},
        {"train_loss": 0.65, "step": 10},
    ]
    assert implicit_reward_metrics(history) == {
        "eval_reward_accuracy": 0.75,
        "eval_reward_margin": 0.25,
        "eval_reward_chosen": 0.05,
        "eval_reward_rejected": -0.2,
    }
    assert implicit_reward_metrics(history[:1]) == {}


def test_demo_eval_prompts_are_distinct_strings_in_data_order():
    pairs = [{"prompt": p} for p in ("b", "a", "b", "c")] + [{"prompt": [{"role": "user", "content": "x"}]}]
    assert demo_eval_prompts(pairs, 10) == ["b", "a", "c"]
    assert demo_eval_prompts(pairs, 2) == ["b", "a"]
    assert demo_eval_prompts(pairs, 0) == []


def test_prepare_on_demo_pairs(setup):
    dpo = _dpo()
    cfg = dpo.stage.prepare(dpo.Config(beta=0.3, loss_type="ipo", eval_prompts=5), setup["sft_model"],
                            setup["preferences"], scaling=Scaling(num_workers=2))
    assert (cfg.beta, cfg.loss_type, cfg.per_worker_batch, cfg.max_length) == (0.3, "ipo", 8, 128)
    assert cfg.demo_task and len(cfg.demo_eval.prompts) == 5
    assert set(cfg.demo_eval.prompts) <= {r["prompt"] for r in cfg.test_rows}  # held-out prompts only
    assert set(cfg.train_rows[0]) == {"prompt", "chosen", "rejected"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": PROMPT, "chosen": " The cat is happy."}], r"missing column\(s\) rejected"),
        ([{"prompt": PROMPT, "chosen": " The cat is happy.", "rejected": " The cat is happy."}], "the same text"),
        (
            [{"prompt": PROMPT, "chosen": " The cat is happy.", "rejected": [{"role": "assistant", "content": "No."}]}],
            "mixes strings and message lists",
        ),
        (
            [{"prompt": PROMPT, "chosen": " The cat is" + " very" * 400 + ".", "rejected": " The cat is sad."}],
            r"1 of 1 pairs are longer than the 128-token limit \(row 0: \d+ tokens\)",
        ),
    ],
    ids=["missing-column", "identical-replies", "mixed-forms", "too-long"],
)
def test_bad_pairs_are_rejected_before_training(setup, rows, message):
    dpo = _dpo()
    data = publish_rows(setup["store"], "bad-prefs", rows, rows, fmt="preferences")
    with pytest.raises(StageInputError, match=message) as err:
        dpo.stage.prepare(dpo.Config(), setup["sft_model"], data, scaling=Scaling(num_workers=2))
    message = str(err.value)
    assert message.startswith("dpo: preferences") and "bad-prefs@v" in message and "\n" not in message


def test_bad_config_against_inputs_is_rejected(setup):
    dpo = _dpo()
    model, prefs = setup["sft_model"], setup["preferences"]
    with pytest.raises(StageInputError, match="max_length 512 exceeds the model's context of 128 tokens"):
        dpo.stage.prepare(dpo.Config(max_length=512), model, prefs, scaling=Scaling(num_workers=2))
    with pytest.raises(StageInputError, match="batch_size 15 is not divisible by num_workers 2"):
        dpo.stage.prepare(dpo.Config(batch_size=15), model, prefs, scaling=Scaling(num_workers=2))
    with pytest.raises(StageInputError, match="dpo: input sft_model = preference-data@v1: expected kind 'causal-lm'"):
        dpo.stage.prepare(dpo.Config(), prefs, prefs, scaling=Scaling(num_workers=2))


def test_trl_trains_on_the_sequences_we_length_check_and_starts_at_log_2(setup, tmp_path):
    """TRL's DPO tokenization as our stage configures it: prompt + reply + eos, exactly the ids `check_lengths`
    counts; the reference is a frozen copy of the SFT model, so the first loss is -log sigmoid(0) = log 2."""
    import torch

    from stages.dpo.train import build_trainer

    dpo = _dpo()
    config = dpo.Config(max_steps=1, batch_size=4, learning_rate=1e-2, warmup_steps=0, save_steps=10)
    cfg = dpo.stage.prepare(config, setup["sft_model"], setup["preferences"], scaling=Scaling(num_workers=1))
    trainer = build_trainer(cfg, str(tmp_path / "out"))
    tokenizer = trainer.processing_class
    for row, example in zip(cfg.train_rows[:5], trainer.train_dataset.select(range(5)), strict=True):
        for side in ("chosen", "rejected"):
            ids = example["prompt_ids"] + example[f"{side}_ids"]
            assert ids == token_ids_as_trl(tokenizer, row["prompt"], row[side])
            assert ids[-1] == tokenizer.eos_token_id
    assert len(trainer.train_dataset) == len(cfg.train_rows)  # nothing dropped as too long
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)

    # One optimizer step moves the policy; the reference stays the SFT model.
    trainer.train()
    sft = _tensors(setup["sft_model"].path)
    reference = {k: v.detach() for k, v in trainer.ref_model.state_dict().items()}
    policy = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(reference[k], sft[k]) for k in sft)
    assert not all(torch.equal(policy[k], sft[k]) for k in sft)


# --------------------------------------------------------------------------------------- slow: Ray Train workers


def _tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_dpo_trains_on_two_ray_workers_and_a_rerun_reuses_the_result(setup, local_ray):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dpo = _dpo()
    store, sft_model, prefs = setup["store"], setup["sft_model"], setup["preferences"]
    work = str(setup["root"] / "work")
    config = dpo.Config(max_steps=8, batch_size=8, learning_rate=1e-3, save_steps=4, logging_steps=2, eval_prompts=8)
    lines: list[str] = []
    ctx = StageContext(work_dir=work, cache_key="train", scaling=Scaling(num_workers=2), log=lines.append)
    policy = dpo.run(config, sft_model=sft_model, preferences=prefs, store=store, ctx=ctx)["policy-dpo"]

    assert policy.kind == "causal-lm" and policy.ref == "policy-dpo@v1"
    history = [json.loads(line) for line in (Path(policy.reports_path) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history if "loss" in e] == [2, 4, 6, 8]
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "first_logged_loss", "last_logged_loss",
                "format_rate", "gold_score", "wall_seconds"):
        assert math.isfinite(policy.metrics[key]), key
    assert policy.metrics["first_logged_loss"] == pytest.approx(math.log(2), abs=0.01)  # policy == reference at first
    assert 0.0 <= policy.metrics["eval_reward_accuracy"] <= 1.0 and 0.0 <= policy.metrics["format_rate"] <= 1.0
    assert (Path(policy.reports_path) / "loss_curve.png").stat().st_size > 0
    assert not list(Path(policy.path).glob("*.bin")) and not list(Path(policy.path).glob("*.pt"))  # no pickles
    lm = AutoModelForCausalLM.from_pretrained(policy.path)
    assert lm.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(policy.path))
    before, after = _tensors(sft_model.path), _tensors(policy.path)
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)  # DPO moved the policy away from the SFT model
    lineage = store.lineage(policy.ref)
    assert lineage["inputs"]["sft_model"]["ref"] == sft_model.ref
    assert lineage["inputs"]["preferences"]["ref"] == prefs.ref

    # A rerun with the same work_dir finds the final checkpoint and hands back the same model without training.
    lines.clear()
    again = dpo.run(config, sft_model=sft_model, preferences=prefs, store=store, ctx=ctx)["policy-dpo"]
    assert any("already finished" in line for line in lines)
    assert not any("step 2/8" in line for line in lines)
    assert again.digest == policy.digest and again.ref == policy.ref
