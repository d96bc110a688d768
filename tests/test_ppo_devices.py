"""What the PPO actors compute in and talk over (stages/ppo/devices.py) and the DeepSpeed config they build."""

from __future__ import annotations

import pytest
import torch

from stages import ppo
from stages.common.deepspeed_config import needs_compiled_op
from stages.common.errors import StageInputError
from stages.ppo.actor_pool import actor_settings
from stages.ppo.actors import engine_config
from stages.ppo.devices import dist_backend, model_dtype, ppo_precision


def test_all_roles_load_in_the_trained_roles_dtype():
    assert ppo_precision(bf16=True, use_gpu=True) == "bf16"
    assert model_dtype(ppo_precision(bf16=True, use_gpu=True)) == torch.bfloat16
    assert model_dtype(ppo_precision(bf16=False, use_gpu=True)) == torch.float32
    assert model_dtype(ppo_precision(bf16=False, use_gpu=False)) == torch.float32
    with pytest.raises(ValueError, match="expected one of"):
        model_dtype("int8")


def test_bf16_on_cpu_is_refused_in_one_line():
    with pytest.raises(StageInputError, match=r"ppo.bf16: true needs a GPU") as info:
        ppo_precision(bf16=True, use_gpu=False)
    assert "\n" not in str(info.value)


def test_nccl_on_gpu_gloo_on_cpu():
    assert dist_backend(torch.device("cuda", 0)) == "nccl"
    assert dist_backend(torch.device("cpu")) == "gloo"


def _settings(use_gpu: bool, **overrides) -> dict:
    cfg = ppo.Config(mini_batch_size=8, rollout_batch_size=16, actors_per_role=2, **overrides)
    return actor_settings(cfg, seed=0, use_gpu=use_gpu, pad_token_id=3, eos_token_ids=[3, 9])


def test_actor_settings_carry_precision_micro_batch_and_special_tokens():
    s = _settings(True, bf16=True)
    assert s["precision"] == "bf16" and s["micro_batch_size"] == 4
    assert s["pad_token_id"] == 3 and s["eos_token_ids"] == [3, 9]


def test_engine_config_comes_from_the_shared_builder():
    gpu = engine_config(_settings(True, bf16=True, zero_stage=3))
    assert gpu["bf16"] == {"enabled": True} and gpu["fp16"] == {"enabled": False}
    assert gpu["train_micro_batch_size_per_gpu"] == 4 and gpu["gradient_clipping"] == 1.0
    assert gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in gpu and not needs_compiled_op(gpu)  # the client torch AdamW: nothing to compile
    cpu = engine_config(_settings(False))
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"] == {"stage": 0}
