"""What makes the pretraining stage right on a GPU, tested on CPU: collectives on the backend's device, the peak
FLOP/s table MFU divides by, FLOPs per token for either architecture, the Llama-style shape, the compile switch, the
final save with the model's own class. Fast: no Ray, no DeepSpeed engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from stages.common.collectives import all_reduce_floats, collective_device, device_for_backend
from stages.pretrain.config import Config
from stages.pretrain.metrics import (
    GPU_PEAK_FLOPS,
    gpu_model,
    model_flops_per_token,
    peak_flops,
    table_peak_flops,
    transformer_dims,
)
from stages.pretrain.model import llama_intermediate_size, save_hf_model, scratch_spec, tied_parameter_names
from stages.pretrain.stage import startup_breakdown, use_compile

STAGES = Path(__file__).resolve().parents[2] / "stages"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather",
               "scatter"}

# ------------------------------------------------------------------------------------------------ collectives


def _direct_collective_calls(source: str) -> list[str]:
    """`dist.all_reduce(...)`-style calls (any alias of torch.distributed, or names imported from it) in `source`."""
    tree = ast.parse(source)
    aliases, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            elif node.module == "torch.distributed":
                imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            found.append(f"line {node.lineno}: {func.id}")
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            owner = ast.unparse(func.value)
            if owner in aliases or owner == "torch.distributed":
                found.append(f"line {node.lineno}: {owner}.{func.attr}")
    return found


def test_the_scan_finds_direct_collectives():
    assert _direct_collective_calls("import torch.distributed as dist\ndist.all_reduce(t)\n") == ["line 2: dist.all_reduce"]
    assert _direct_collective_calls("import torch\ntorch.distributed.broadcast(t, 0)\n")
    assert _direct_collective_calls("from torch.distributed import all_gather as ag\nag(out, t)\n")
    assert _direct_collective_calls("from torch import distributed as d\nd.reduce_scatter(o, i)\n")
    # a Ray actor group's own `broadcast` method is not a torch collective
    assert _direct_collective_calls("pool['policy'].broadcast('save', path)\n") == []


def test_no_stage_calls_a_collective_outside_the_collectives_module():
    offenders = {}
    for path in sorted(STAGES.rglob("*.py")):
        if path == STAGES / "common" / "collectives.py":
            continue
        calls = _direct_collective_calls(path.read_text())
        if calls:
            offenders[str(path.relative_to(STAGES.parent))] = calls
    assert offenders == {}, f"use stages.common.collectives (tensor on the backend's device) instead: {offenders}"


def test_device_for_backend():
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend(None) == torch.device("cpu")
    assert device_for_backend("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert device_for_backend("NCCL", torch.device("cuda", 1)).type == "cuda"
    # a CPU engine device under NCCL is not good enough: NCCL takes CUDA tensors only
    if torch.cuda.is_available():
        assert device_for_backend("nccl", torch.device("cpu")).type == "cuda"


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-process gloo process group (FileStore), torn down afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_all_reduce_floats_without_a_group_is_the_identity():
    assert not dist.is_initialized()
    assert all_reduce_floats([1, 2.5]) == [1.0, 2.5]
    assert collective_device() == torch.device("cpu")


def test_all_reduce_floats_in_a_gloo_group(gloo_group):
    assert collective_device() == torch.device("cpu")
    assert all_reduce_floats([1.5, -2.0, 3.25]) == [1.5, -2.0, 3.25]
    assert all_reduce_floats([7.0, 1e15], op="max", device=torch.device("cpu")) == [7.0, 1e15]
    result = all_reduce_floats([0.1])
    assert isinstance(result[0], float) and result[0] == pytest.approx(0.1, rel=0, abs=1e-15)  # float64 on the wire
    with pytest.raises(ValueError, match="op must be 'sum' or 'max'"):
        all_reduce_floats([1.0], op="mean")


# ------------------------------------------------------------------------------------------------ peak FLOP/s


@pytest.mark.parametrize(
    ("device_name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),  # the SXM part
        ("NVIDIA H100 80GB HBM3", "fp32", 67.0e12),
        ("NVIDIA H100 PCIe", "bf16", 756.0e12),
        ("NVIDIA H100 NVL", "fp16", 835.0e12),
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),  # not the SXM part's row
        ("NVIDIA H200 NVL", "fp32", 60.0e12),
        ("NVIDIA GH200 480GB", "bf16", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0e12),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
        ("NVIDIA A10G", "bf16", 70.0e12),
        ("NVIDIA A10", "bf16", 125.0e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA L4", "bf16", 121.0e12),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
        ("NVIDIA B200", "bf16", 2.25e15),
    ],
)
def test_peak_table_by_device_name(device_name, precision, expected):
    assert table_peak_flops(device_name, precision) == expected


def test_peak_table_does_not_confuse_similar_names():
    assert [gpu_model(n) for n in ("NVIDIA A100 80GB PCIe", "NVIDIA A10", "NVIDIA A10G")] == ["A100", "A10", "A10G"]
    assert [gpu_model(n) for n in ("NVIDIA L4", "NVIDIA L40", "NVIDIA L40S")] == ["L4", "L40", "L40S"]
    assert [gpu_model(n) for n in ("NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA H100 NVL")] == ["H200", "GH200", "H100 NVL"]
    # unknown parts and precisions have no row: the stage measures instead of guessing
    assert gpu_model("NVIDIA GeForce RTX 4090 D") is None and gpu_model("Tesla T4") is None
    assert table_peak_flops("NVIDIA B200", "fp32") is None
    assert all(v < 3e15 for row in GPU_PEAK_FLOPS.values() for v in row.values())  # dense, never the sparse figure


def test_peak_flops_source():
    assert peak_flops(torch.float32, "cpu", configured=5e12) == (5e12, "config")
    measured, source = peak_flops(torch.float32, "cpu")
    assert source == "measured" and 1e8 < measured < 1e13  # a real matmul on this CPU


# --------------------------------------------------------------------------------------- FLOPs per token, shapes


def test_flops_per_token_reads_either_architecture():
    from transformers import GPT2Config, LlamaConfig

    gpt2 = GPT2Config(n_layer=3, n_embd=64, n_head=4)
    llama = LlamaConfig(num_hidden_layers=5, hidden_size=96, num_attention_heads=3, intermediate_size=256)
    assert transformer_dims(gpt2) == (3, 64)
    assert transformer_dims(llama) == (5, 96)
    # 6N + 12·L·d·T with N=1000, L=5, d=96, T=32
    assert model_flops_per_token(llama, n_params=1000, context=32) == 6 * 1000 + 12 * 5 * 96 * 32
    # a family whose heads x head_dim is not the width (Qwen3-style): attention FLOPs use heads x head_dim
    wide_heads = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=32)
    assert transformer_dims(wide_heads) == (2, 128)


def test_llama_intermediate_size_is_8_thirds_rounded_up_to_64():
    # 8/3 x 64 = 170.7 -> 192; x 768 = 2048 exactly; x 256 = 682.7 -> 704; x 100 = 266.7 -> 320
    assert [llama_intermediate_size(d) for d in (64, 768, 256, 100)] == [192, 2048, 704, 320]


@pytest.fixture(scope="module")
def tokenizer():
    from tests.tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer(["User: Describe the cat.\nAssistant: The cat is calm and brave."] * 50, 300)


def test_llama_spec_from_the_stage_config(tokenizer):
    from stages.pretrain.model import hf_config_from_spec

    spec = scratch_spec(Config(architecture="llama", n_layer=2, n_embd=64, n_head=4, context=32), tokenizer)
    llama = hf_config_from_spec(spec)
    assert llama.model_type == "llama" and spec["init_from"] is None
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads) == (64, 2, 4)
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.max_position_embeddings) == (4, 192, 32)
    assert llama.tie_word_embeddings and llama.vocab_size == len(tokenizer)
    assert (llama.eos_token_id, llama.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    gpt2 = hf_config_from_spec(scratch_spec(Config(n_layer=2, n_embd=64, n_head=4, context=32), tokenizer))
    assert (gpt2.model_type, gpt2.n_positions, gpt2.vocab_size) == ("gpt2", 32, len(tokenizer))


def test_final_save_uses_the_models_own_class(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages.pretrain.model import build_model

    spec = scratch_spec(Config(architecture="llama", n_layer=1, n_embd=32, n_head=2, context=16), tokenizer)
    model = build_model(spec, seed=0)
    assert tied_parameter_names(model) == {"lm_head.weight"}
    weights = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_hf_model(weights, model.config, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.float32
    expected = model.model.embed_tokens.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.lm_head.weight, expected)  # tied, restored through the embedding
    with pytest.raises(RuntimeError, match="do not fit LlamaForCausalLM"):
        save_hf_model({"model.norm.weight": torch.ones(32)}, model.config, tmp_path / "bad")


# ------------------------------------------------------------------------------------------- switches, start-up


def test_compile_is_on_for_gpu_and_off_for_cpu_unless_set():
    assert use_compile(Config(), use_gpu=True) is True
    assert use_compile(Config(), use_gpu=False) is False
    assert use_compile(Config(compile=False), use_gpu=True) is False
    assert use_compile(Config(compile=True), use_gpu=False) is True


def test_startup_breakdown_by_hand():
    # run() at t=100; 2 s preparing, blocks written by 102.5; workers up at 110; then 3 s imports, 1 s model ...
    marks = {"worker_start": 110.0, "imports": 113.0, "build_model": 114.0, "first_step": 120.0}
    assert startup_breakdown(100.0, 2.0, 102.5, marks) == {
        "prepare": 2.0, "write_blocks": 0.5, "worker_start": 7.5, "imports": 3.0, "build_model": 1.0, "first_step": 6.0}


def test_gpu_deepspeed_config_uses_torch_fused_adamw():
    from stages.common.deepspeed_config import needs_compiled_op
    from stages.pretrain.deepspeed_setup import deepspeed_config

    gpu = deepspeed_config(Config(), use_gpu=True)
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    assert gpu["bf16"]["enabled"] and not needs_compiled_op(gpu)
    assert "fused" not in deepspeed_config(Config(), use_gpu=False)["optimizer"]["params"]  # no fused kernel on CPU
