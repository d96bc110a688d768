"""The TRL stages' loop config: typed, frozen, through Ray Train's pickle intact; each trainer two hops from stage.py."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

from stages.trl.demo_eval import DemoEval
from stages.trl.loop_config import LOOP_KEY, TokenizerPlan, TrainLoopConfig, from_ray, to_ray

REPO = Path(__file__).resolve().parents[2]
PLAN = TokenizerPlan(pad_token="<eos>", pad_token_id=0, pad_is_eos=True, pad_note="pad = eos", chat_template=False)
SHARED = dict(stage="dpo", tokenizer=PLAN, model_dir="/m", model_digest="0" * 64, store_root=None,
              train_rows=({"prompt": "p", "chosen": "a", "rejected": "b"},), test_rows=(), max_length=32,
              per_worker_batch=2, max_steps=3, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0,
              weight_decay=0.0, save_steps=2, logging_steps=1, bf16=False, deepspeed=None, seed=0, use_gpu=False,
              cpus_per_worker=1.0, demo_task=True)  # fmt: skip


def _dpo_loop():
    from stages.dpo.train import DPOLoopConfig

    demo = DemoEval(prompts=("The cat is",), max_new_tokens=8, batch_size=4)
    return DPOLoopConfig(**SHARED, beta=0.3, loss_type="ipo", demo_eval=demo)


def test_the_loop_config_is_frozen_and_typed():
    loop = _dpo_loop()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop.beta = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop.demo_eval.max_new_tokens = 1  # type: ignore[misc]
    with pytest.raises(TypeError):  # a stage field is a declared attribute, not a free key
        TrainLoopConfig(**SHARED, beta=0.3)
    with pytest.raises(TypeError):  # and a subclass's own fields are required
        _dpo_loop().__class__(**SHARED)
    assert "train_rows" not in repr(loop) and "beta=0.3" in repr(loop)  # Ray's run state shows the repr, not rows


def test_the_loop_config_travels_through_ray_trains_pickle():
    """Ray Train sends train_loop_config to the workers with cloudpickle; the worker gets the same typed object."""
    from ray import cloudpickle

    loop = _dpo_loop()
    sent = to_ray(loop)
    assert set(sent) == {LOOP_KEY}
    for dumps in (cloudpickle.dumps, pickle.dumps):
        received = from_ray(pickle.loads(dumps(sent)))
        assert received == loop and type(received) is type(loop)
        assert received.demo_eval.prompts == ("The cat is",) and received.tokenizer.pad_is_eos
    with pytest.raises(TypeError, match="expected a TrainLoopConfig"):
        from_ray({LOOP_KEY: dataclasses.asdict(loop)})


def test_the_tokenizer_plan_is_recorded_as_before():
    assert PLAN.to_dict() == {"pad_token": "<eos>", "pad_token_id": 0, "pad_is_eos": True, "pad_note": "pad = eos",
                              "chat_template": False}  # fmt: skip


@pytest.mark.parametrize(("stage", "trainer"), [("sft", "SFTTrainer"), ("reward", "RewardTrainer"),
                                                ("dpo", "DPOTrainer")])  # fmt: skip
def test_the_trainer_is_two_hops_from_stage_py(stage, trainer):
    """stage.py imports train_loop from train.py, whose build_trainer is the one place the TRL trainer is built."""
    stage_tree = ast.parse((REPO / f"stages/{stage}/stage.py").read_text())
    imported = {(n.module, a.name) for n in ast.walk(stage_tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert (f"stages.{stage}.train", "train_loop") in imported
    calls = [
        (fn.name, node.func.id)
        for fn in ast.parse((REPO / f"stages/{stage}/train.py").read_text()).body
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Trainer")
    ]
    assert calls == [("build_trainer", trainer)]
