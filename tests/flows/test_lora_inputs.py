"""A `lora:` section that cannot work is refused by `rlhf run` before Prefect or Ray start: one line, exit 2, nothing
written to the store. The model it is checked against is the one the run starts from (the from-scratch GPT-2 of the
tiny preset, or a user's Llama given as sft.base_model), read from its config alone."""

from __future__ import annotations

import pytest

from flows.cli import main
from tests.tiny_models import save_tiny_model_dir


@pytest.fixture
def llama_dir(tmp_path):
    texts = ["User: Describe the cat.\nAssistant: The cat is happy."] * 40
    return save_tiny_model_dir("llama", texts, tmp_path / "my-llama")


def _refused(capsys, tmp_path, *overrides: str) -> str:
    capsys.readouterr()  # what set-up printed (the fixture's model save) is not the command's
    store = tmp_path / "store"
    args = ["run", "--preset", "tiny", "--store", str(store), "--dry-run"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert not store.exists() or not list(store.rglob("*.json"))  # nothing published
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sft.lora={target_modules: [q_projj]}"],
            "error: sft.lora.target_modules: [q_projj] cannot wrap this GPT2LMHeadModel",
        ),
        (
            ["reward.lora={target_modules: [up_proj]}"],
            "error: reward.lora.target_modules: [up_proj] cannot wrap this GPT2ForSequenceClassification",
        ),
        (["ppo.lora={r: 0}"], "ppo.lora.r: expected a value >= 1, found 0"),
        (["dpo.lora={rank: 8}"], "dpo.lora.rank: unknown key"),
        (["sft.lora={}", "sft.zero_stage=3"], "lora with zero_stage 3 is not supported"),
        (
            ["grpo.lora={quantize: 4bit}", "align.methods=[grpo]"],
            "grpo.lora.quantize: 4bit (QLoRA) needs a CUDA device",
        ),
    ],
    ids=["no-matching-module", "reward-head-of-gpt2", "rank-0", "unknown-key", "zero3", "qlora-on-cpu"],
)
def test_a_lora_section_that_cannot_work_is_one_line(capsys, tmp_path, overrides, message):
    import torch

    if "quantize" in overrides[0] and torch.cuda.is_available():
        pytest.skip("QLoRA is allowed where CUDA exists")
    assert message in _refused(capsys, tmp_path, *overrides)


def test_sections_are_checked_against_the_users_own_base_model(capsys, tmp_path, llama_dir):
    base = f"sft.base_model={llama_dir}"
    # GPT-2's fused attention projection does not exist in a Llama
    line = _refused(capsys, tmp_path, base, "dpo.lora={target_modules: [c_attn]}", "align.methods=[dpo]")
    assert "dpo.lora.target_modules: [c_attn] cannot wrap this LlamaForCausalLM" in line
    # Llama's own projection names are fine, in every stage that trains
    ok = ["run", "--preset", "tiny", "--store", str(tmp_path / "ok"), "--dry-run", "--set", base]
    for item in ("sft.lora={target_modules: [q_proj, v_proj]}", "reward.lora={}", "ppo.lora={}"):
        ok += ["--set", item]
    assert main(ok) == 0
