"""`<stage>.activation_checkpointing`: the TRL stages recompute activations in the backward pass when asked, and
train exactly as without (the same loss at every step), with LoRA too (fast, no Ray)."""

from __future__ import annotations

import dataclasses

import pytest

from stages.common.context import Scaling
from stages.common.lora import LoraSection
from stages.trl.worker import training_args
from tests.trl.test_loop_config import SHARED
from tests.trl.test_sft_packing import setup  # noqa: F401  (the module's store fixture, found by name)


def _trainer(setup, tmp_path, **fields):  # noqa: F811
    import stages.sft as sft
    from stages.sft.train import build_trainer

    config = sft.Config(max_steps=3, logging_steps=1, save_steps=10, warmup_steps=0, eval_prompts=0, **fields)
    cfg = sft.stage.prepare(config, setup["gpt2"], setup["data"], scaling=Scaling(num_workers=1))
    return build_trainer(cfg, str(tmp_path))


@pytest.mark.parametrize("lora", [None, LoraSection(r=4, alpha=8)], ids=["full", "lora"])
def test_checkpointing_recomputes_and_trains_the_same(setup, tmp_path, lora):  # noqa: F811
    losses = {}
    for on in (False, True):
        trainer = _trainer(setup, tmp_path / f"out-{on}", activation_checkpointing=on, lora=lora)
        trainer.train()
        model = trainer.model.get_base_model() if lora else trainer.model
        assert model.is_activation_checkpointing is on
        losses[on] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_every_trl_stage_passes_the_knob_to_its_trainer():
    import stages.dpo as dpo
    import stages.reward as reward
    import stages.sft as sft
    from stages.trl.loop_config import TrainLoopConfig

    for section in (sft.Config, reward.Config, dpo.Config):
        assert section().activation_checkpointing is False  # off by default, as before
        assert section(activation_checkpointing=True).activation_checkpointing is True
    loop = TrainLoopConfig(**SHARED)
    assert training_args(loop, "/out")["activation_checkpointing"] is False
    on = dataclasses.replace(loop, activation_checkpointing=True)
    assert training_args(on, "/out")["activation_checkpointing"] is True
