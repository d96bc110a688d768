"""What the PPO actors compute in and talk over (stages/rl/devices.py) and the DeepSpeed config they build."""

from __future__ import annotations

import pytest
import torch

from stages import rl
from stages.common.deepspeed_config import native_cpu_bf16, needs_compiled_op
from stages.common.errors import StageInputError
from stages.rl.actor_pool import actor_settings
from stages.rl.actors import engine_config
from stages.rl.devices import dist_backend, model_dtype, rl_precision


def test_all_roles_load_in_the_trained_roles_dtype():
    assert rl_precision(bf16=True, use_gpu=True) == "bf16"
    assert model_dtype(rl_precision(bf16=True, use_gpu=True)) == torch.bfloat16
    assert model_dtype(rl_precision(bf16=False, use_gpu=True)) == torch.float32
    assert model_dtype(rl_precision(bf16=False, use_gpu=False)) == torch.float32
    with pytest.raises(ValueError, match="expected one of"):
        model_dtype("int8")


def test_bf16_on_a_cpu_without_native_bf16_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # the detection's override: a CPU that would emulate bf16
    with pytest.raises(StageInputError, match=r"ppo.bf16: true needs a GPU .* or a CPU with native bf16") as info:
        rl_precision(bf16=True, use_gpu=False)
    assert "\n" not in str(info.value)


def test_bf16_on_a_cpu_with_native_bf16_is_bf16_end_to_end(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
    assert native_cpu_bf16() and rl_precision(bf16=True, use_gpu=False) == "bf16"
    cpu = engine_config(_settings(False, bf16=True))
    assert cpu["bf16"] == {"enabled": True, "check_grad_overflow": False} and cpu["fp16"] == {"enabled": False}
    monkeypatch.setenv("RLHF_CPU_BF16", "0")
    with pytest.raises(ValueError, match="needs a GPU"):
        engine_config({**_settings(False), "precision": "bf16"})


def test_the_policy_samples_with_the_cpus_of_the_waiting_roles():
    assert _settings(False)["generation_threads"] == 2  # 4 roles x 0.5 CPU
    assert _settings(False, method="grpo", group_size=2)["generation_threads"] == 2  # 3 x 0.5 rounds to 2
    assert _settings(False, cpus_per_actor=2.0)["generation_threads"] == 8
    assert _settings(False, torch_threads=4)["generation_threads"] == 4  # never fewer than the actor's own
    assert _settings(False, generation_threads=3)["generation_threads"] == 3
    assert _settings(True)["generation_threads"] == 1  # on a GPU the sampling threads do not matter
    assert _settings(False, placement_strategy="SPREAD")["generation_threads"] == 1  # the others' CPUs are elsewhere
    assert _settings(False)["policy_train_threads"] == 1  # PPO: the critic trains beside the policy
    assert _settings(False, method="rloo", group_size=2)["policy_train_threads"] == 2
    # with LoRA the policy runs the reference's forwards and reserves its CPUs: as many threads as without
    from stages.common.lora import LoraSection

    assert _settings(False, method="grpo", group_size=2, lora=LoraSection())["generation_threads"] == 2


def test_nccl_on_gpu_gloo_on_cpu():
    assert dist_backend(torch.device("cuda", 0)) == "nccl"
    assert dist_backend(torch.device("cpu")) == "gloo"


def _settings(use_gpu: bool, method: str = "ppo", **overrides) -> dict:
    cfg = rl.CONFIGS[method](mini_batch_size=8, rollout_batch_size=16, actors_per_role=2, **overrides)
    return actor_settings(cfg, seed=0, use_gpu=use_gpu, pad_token_id=3, eos_token_ids=[3, 9])


def test_actor_settings_carry_precision_micro_batch_and_special_tokens():
    s = _settings(True, bf16=True)
    assert s["precision"] == "bf16" and s["micro_batch_size"] == 4
    assert s["pad_token_id"] == 3 and s["eos_token_ids"] == [3, 9]


def test_engine_config_comes_from_the_shared_builder():
    gpu = engine_config(_settings(True, bf16=True, zero_stage=3))
    assert gpu["bf16"] == {"enabled": True, "check_grad_overflow": False} and gpu["fp16"] == {"enabled": False}
    assert gpu["train_micro_batch_size_per_gpu"] == 4 and gpu["gradient_clipping"] == 1.0
    assert gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in gpu and not needs_compiled_op(gpu)  # the client torch AdamW: nothing to compile
    cpu = engine_config(_settings(False))
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"] == {"stage": 0}


def test_deepspeed_builds_no_shared_memory_op_on_a_cpu_node():
    from deepspeed.comm.torch import build_shm_op

    from stages.common.deepspeed_config import forbid_cpu_shm_build

    forbid_cpu_shm_build()
    assert build_shm_op() is None  # DeepSpeed's own check: no JIT build, the gloo allreduce instead
