"""SFT stage: input checks and prompt masking (fast, no Ray), then real training on 2 Ray workers (slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.context import Scaling, StageContext
from stages.common.errors import StageInputError
from stages.common.hf import save_model_dir
from stages.common.store import ArtifactStore
from stages.data.demo import DemoConfig, generate
from stages.data.ingest import ingest
from tests.tiny_models import build_tiny_gpt2, build_tiny_tokenizer, publish_rows, publish_tiny_base_model

TESTS_DIR = Path(__file__).resolve().parents[1]
DEMO = DemoConfig(size="tiny")


@pytest.fixture(scope="module")
def demo_sets():
    return generate(DEMO)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_sets):
    """A store with a random tiny base model (tokenizer trained on the demo corpus) and the tiny demo SFT data."""
    root = tmp_path_factory.mktemp("sft")
    store = ArtifactStore(root / "store")
    base = publish_tiny_base_model(store, [r["text"] for r in demo_sets["corpus"]["train"][:2000]])
    data = ingest("demo", "sft", store, demo_cfg=DEMO)
    return {"root": root, "store": store, "base": base, "data": data}


def _sft():
    import stages.sft as sft

    return sft


# ----------------------------------------------------------------------------------------------- fast: no Ray


def test_stage_interface():
    sft = _sft()
    assert sft.NAME == "sft"
    assert sft.INPUTS == {"base_model": "causal-lm", "data": "dataset"}
    assert sft.OUTPUTS == ["sft-model"]
    assert sft.Config().to_dict()["zero_stage"] is None


def test_prompt_tokens_are_masked_and_eos_is_learnt(setup, tmp_path):
    """TRL's completion-only loss as our stage configures it: prompt labels -100, completion + eos labelled."""
    from stages.sft.train import build_trainer

    sft = _sft()
    cfg = sft.stage.prepare(sft.Config(max_steps=1), setup["base"], setup["data"], scaling=Scaling(num_workers=1))
    trainer = build_trainer(cfg, str(tmp_path / "out"))
    tokenizer = trainer.processing_class
    rows = cfg.train_rows[:5]
    for row, example in zip(rows, trainer.train_dataset.select(range(5)), strict=True):
        ids, labels = example["input_ids"], example["labels"]
        n_prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert len(ids) > n_prompt + 1
        assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[n_prompt:-1]) == row["completion"]


def test_messages_rows_train_like_prompt_completion():
    from stages.sft.inputs import to_prompt_completion

    rows = [
        {
            "messages": [
                {"role": "user", "content": "Describe the cat."},
                {"role": "assistant", "content": "The cat is happy."},
            ]
        }
    ]
    assert to_prompt_completion(rows, "x") == [
        {"prompt": "User: Describe the cat.\nAssistant:", "completion": " The cat is happy."}
    ]
    with pytest.raises(StageInputError, match="last turn must be the assistant"):
        to_prompt_completion([{"messages": rows[0]["messages"][:1] * 2}], "x")


def test_score_replies_counts_format_and_gold():
    from stages.sft.evaluate import score_replies

    prompts = ["User: Describe the cat.\nAssistant:"] * 4
    replies = [" The cat is happy.", " The cat is happy and sad.", " The dog is happy.", " cat"]
    scores = score_replies(prompts, replies)
    assert scores["format_rate"] == pytest.approx(0.5)
    assert scores["gold_score"] == pytest.approx((1.0 + 0.0 - 1.0 - 1.0) / 4)


def test_batched_left_padded_generation_matches_one_by_one(demo_sets):
    from stages.sft.evaluate import generate_replies

    tokenizer = build_tiny_tokenizer([r["text"] for r in demo_sets["corpus"]["train"][:500]])
    model = build_tiny_gpt2(tokenizer, seed=1)
    prompts = [
        "User: Hi! Describe the cat.\nAssistant:",
        "User: Tell me about the owl.\nAssistant:",
        "User: Quick question. What is the lake like?\nAssistant:",
    ]
    batched = generate_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_replies(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(batched)  # a random model emits something, and never the eos text itself
    assert not any(tokenizer.eos_token in r for r in batched)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "User: Describe the cat.\nAssistant:"}], "completion"),
        (
            [{"prompt": "User: Describe the cat.\nAssistant:", "completion": " The cat is" + " very" * 400 + "."}],
            r"1 of 1 rows are longer than the 128-token limit \(row 0: \d+ tokens\)",
        ),
        ([{"prompt": "User: Describe the cat.\nAssistant:", "completion": "   "}], "row 0: column 'completion' is empty"),
    ],
    ids=["missing-column", "too-long", "empty-completion"],
)
def test_bad_data_is_rejected_before_training(setup, rows, message):
    sft = _sft()
    data = publish_rows(setup["store"], "bad-sft", rows, rows, fmt="sft")
    with pytest.raises(StageInputError, match=message) as err:
        sft.stage.prepare(sft.Config(), setup["base"], data, scaling=Scaling(num_workers=2))
    assert "bad-sft@v" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_larger_than_embedding_is_rejected(setup, demo_sets, tmp_path):
    """The classic size mismatch between stages, caught before Ray starts, with both sizes named."""
    sft = _sft()
    tokenizer = build_tiny_tokenizer([r["text"] for r in demo_sets["corpus"]["train"][:500]])
    model = build_tiny_gpt2(build_tiny_tokenizer([r["text"] for r in demo_sets["corpus"]["train"][:500]], 300))
    save_model_dir(model, tokenizer, tmp_path / "mismatched")
    bad = setup["store"].publish(tmp_path / "mismatched", name="mismatched-model", kind="causal-lm", stage="tests")
    with pytest.raises(
        StageInputError,
        match=rf"mismatched-model@v1: tokenizer has {len(tokenizer)} tokens but the "
        r"model's embedding has 300 rows",
    ):
        sft.stage.prepare(sft.Config(), bad, setup["data"], scaling=Scaling(num_workers=2))


def test_bad_config_against_inputs_is_rejected(setup):
    sft = _sft()
    with pytest.raises(StageInputError, match="max_length 512 exceeds the model's context of 128 tokens"):
        sft.stage.prepare(sft.Config(max_length=512), setup["base"], setup["data"], scaling=Scaling(num_workers=2))
    with pytest.raises(StageInputError, match="batch_size 15 is not divisible by num_workers 2"):
        sft.stage.prepare(sft.Config(batch_size=15), setup["base"], setup["data"], scaling=Scaling(num_workers=2))
    with pytest.raises(StageInputError, match="expected kind 'causal-lm', found 'dataset'"):
        sft.stage.prepare(sft.Config(), setup["data"], setup["data"], scaling=Scaling(num_workers=2))


# --------------------------------------------------------------------------------------- slow: Ray Train workers


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """The session's one local Ray (tests/conftest.py), shut down when the session ends."""
    yield


def _tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_sft_trains_on_two_ray_workers(setup, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = _sft()
    store, base, data = setup["store"], setup["base"], setup["data"]
    ctx = StageContext(work_dir=str(setup["root"] / "work-train"), cache_key="train", scaling=Scaling(num_workers=2))
    config = sft.Config(max_steps=40, save_steps=20, logging_steps=5, eval_prompts=16, learning_rate=2e-3)
    model = sft.run(config, base_model=base, data=data, store=store, ctx=ctx)["sft-model"]

    assert model.kind == "causal-lm" and model.ref == "sft-model@v1"
    history = [json.loads(line) for line in (Path(model.reports_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    before, after = _tensors(base.path), _tensors(model.path)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if (before[k] == after[k]).all()]
    assert unchanged == []  # every tensor was trained
    for key in (
        "eval_loss",
        "format_rate",
        "gold_score",
        "greedy_format_rate",
        "wall_seconds",
        "train_samples_per_second",
    ):
        assert key in model.metrics
    assert 0.0 <= model.metrics["format_rate"] <= 1.0 and model.metrics["eval_loss"] < losses[0]
    assert (Path(model.reports_path) / "loss_curve.png").stat().st_size > 0
    assert not list(Path(model.path).glob("*.bin")) and not list(Path(model.path).glob("*.pt"))  # no pickles
    lm = AutoModelForCausalLM.from_pretrained(model.path)
    tok = AutoTokenizer.from_pretrained(model.path)
    assert lm.get_input_embeddings().weight.shape[0] == len(tok)
    lineage = store.lineage(model.ref)
    assert lineage["inputs"]["base_model"]["ref"] == base.ref
    assert lineage["inputs"]["data"]["ref"] == data.ref


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """HF Trainer checkpoints fully uploaded into the Ray run storage (weights, optimizer and state all there)."""
    needed = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
    found = run_dir.glob("checkpoint_*/checkpoint")
    return [c for c in found if all((c / name).is_file() for name in needed)]


_CRASHING_RUN = """
import sys
from stages.common.context import Scaling, StageContext
from stages.common.store import ArtifactStore
import stages.sft as sft
store = ArtifactStore(sys.argv[1])
ctx = StageContext(work_dir=sys.argv[2], cache_key="resume", scaling=Scaling(num_workers=2))
config = sft.Config.model_validate_json(sys.argv[3])
sft.run(config, base_model=store.get(sys.argv[4]), data=store.get(sys.argv[5]), store=store, ctx=ctx)
"""


@pytest.mark.slow
def test_sft_resumes_after_a_crash(setup, ray_session):
    """Kill a run after its first checkpoint; the rerun with the same work_dir continues from it, not from step 0."""
    sft = _sft()
    store, base, data = setup["store"], setup["base"], setup["data"]
    work = setup["root"] / "work-resume"
    config = sft.Config(max_steps=40, save_steps=10, logging_steps=10, eval_prompts=0)
    import ray

    # The crashing driver joins this test's Ray cluster, so killing it is a driver crash: Ray tears down its trainer.
    # PYTHONPATH: the repo, then what conftest put there (the loopback folder that keeps this Ray on 127.0.0.1)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR.parent), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_RUN, store.root, str(work), config.model_dump_json(), base.ref, data.ref],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not _complete_checkpoints(work / "sft"):
            assert proc.poll() is None, "the run to be crashed ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray then ends its trainer and workers
        proc.wait()
    saved = [
        json.loads((c / "trainer_state.json").read_text())["global_step"] for c in _complete_checkpoints(work / "sft")
    ]
    assert 0 < max(saved) < config.max_steps

    lines: list[str] = []
    ctx = StageContext(work_dir=str(work), cache_key="resume", scaling=Scaling(num_workers=2), log=lines.append)
    model = sft.run(config, base_model=base, data=data, store=store, ctx=ctx)["sft-model"]
    resumed = [int(m.group(1)) for ln in lines if (m := re.search(r"resuming the trainer from step (\d+)", ln))]
    assert resumed and resumed[0] in saved, lines  # one of the crashed run's checkpoints, named by its step
    assert model.metrics["resumed_from_step"] == resumed[0]  # and the report says it too
    assert {p["rank"] for p in model.manifest["timings"]["placements"]} == {0, 1}
    history = [json.loads(line) for line in (Path(model.reports_path) / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == list(range(10, config.max_steps + 1, 10))  # the crashed run's entries, then the rest, no gap

    # A rerun after success finds the final checkpoint and hands back the same model without training, on the
    # driver: no Ray Train run starts (fit would say it resumes from the latest checkpoint).
    lines.clear()
    again = sft.run(config, base_model=base, data=data, store=store, ctx=ctx)["sft-model"]
    assert any("already finished" in line for line in lines)
    assert not any("resuming from the latest" in line for line in lines), lines
    assert _tensors(again.path).keys() == _tensors(model.path).keys()
    assert all((_tensors(again.path)[k] == _tensors(model.path)[k]).all() for k in _tensors(model.path))


def test_deepspeed_config_follows_the_typed_config():
    from stages.trl.driver import deepspeed_config

    assert deepspeed_config(None, bf16=False) is None  # plain DDP: the CPU default
    zero3 = deepspeed_config(3, bf16=True, use_gpu=True)
    assert zero3["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert zero3["bf16"] == {"enabled": True, "check_grad_overflow": False}  # the loss is checked when logged
    assert deepspeed_config(2, bf16=False)["zero_optimization"] == {"stage": 2}


def test_bf16_weights_only_under_deepspeed(setup):
    """`bf16: true` under plain DDP is autocast over fp32 weights (AdamW keeps fp32 state); only DeepSpeed's bf16
    optimizer, which holds its own fp32 master copy, gets bf16 weights."""
    import dataclasses

    import torch

    from stages.trl.worker import load_causal_lm

    sft = _sft()
    cfg = sft.stage.prepare(sft.Config(max_steps=1), setup["base"], setup["data"], scaling=Scaling(num_workers=1))
    ddp = dataclasses.replace(cfg, bf16=True, deepspeed=None)
    assert not ddp.bf16_weights
    assert {p.dtype for p in load_causal_lm(ddp)[0].parameters()} == {torch.float32}
    zero = dataclasses.replace(cfg, bf16=True, deepspeed={"bf16": {"enabled": True}})
    assert zero.bf16_weights
    assert {p.dtype for p in load_causal_lm(zero)[0].parameters()} == {torch.bfloat16}
