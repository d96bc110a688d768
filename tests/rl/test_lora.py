"""The RL stage with LoRA: no reference actor (the policy's adapter off is the reference, exactly), an adapter on the
critic beside its full value head, the policy published merged and as an adapter, and a resume from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages import rl
from stages.common.lora import LoraSection
from stages.rl.placement import roles_of
from tests.rl.test_stage import TINY, _ctx, setup  # noqa: F401 (the module's store fixture)

LORA = LoraSection(r=4, alpha=16)


def _run(setup, work_dir, logs=None, method=rl.PPOConfig, **overrides):  # noqa: F811
    config = method(**{**TINY, "learning_rate": 3e-3, "old_logprobs": "recompute", "lora": LORA, **overrides})
    return rl.run(config, store=setup["store"], ctx=_ctx(work_dir, logs), sft_model=setup["sft"],
                  reward_model=setup["rm"], prompts=setup["prompts"])["policy"]  # fmt: skip


def _history(artifact) -> list[dict]:
    return [json.loads(x) for x in (Path(artifact.reports_path) / "metrics.jsonl").read_text().splitlines()]


def test_lora_drops_the_reference_role_and_is_refused_with_zero3():
    assert roles_of(rl.PPOConfig(lora=LORA)) == ("policy", "critic", "reward")
    assert roles_of(rl.GRPOConfig(lora=LORA)) == ("policy", "reward")
    assert roles_of(rl.PPOConfig()) == ("policy", "critic", "reference", "reward")
    with pytest.raises(ValueError, match="lora with zero_stage 3 is not supported"):
        rl.PPOConfig(lora=LORA, zero_stage=3)


@pytest.mark.slow
def test_ppo_with_lora_starts_at_kl_zero_and_publishes_both_forms(setup, local_ray, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # old log-probs read from the sampling pass (the fp32 default): generate runs the peft model's base forward
    policy = _run(setup, tmp_path / "work", iterations=3, old_logprobs="sampling")
    history = _history(policy)
    # iteration 1's rollout is scored before any update: the policy's fresh adapter (B = 0) against its own base, up
    # to the rounding between the sampling pass and a full forward (exactly 0 with recomputed log-probs: below)
    assert abs(history[0]["kl"]) < 1e-5
    assert abs(history[-1]["kl"]) > 0  # ... and by iteration 3 the adapter has moved the policy
    logs = {p.name for p in (tmp_path / "work" / "logs").glob("*-rank0.log")}
    assert logs == {"policy-rank0.log", "critic-rank0.log", "reward-rank0.log"}  # no reference actor

    assert policy.manifest["extra"] == {"lora": LORA.to_dict(), "adapter": "adapter"}
    adapter = Path(policy.path) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == setup["sft"].path
    merged = AutoModelForCausalLM.from_pretrained(policy.path).eval()
    as_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["sft"].path), adapter).eval()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, as_adapter(ids).logits, atol=1e-4)
        sft = AutoModelForCausalLM.from_pretrained(setup["sft"].path).eval()
        assert not torch.allclose(merged(ids).logits, sft(ids).logits, atol=1e-4)  # the adapter learnt


@pytest.mark.slow
def test_grpo_with_lora_resumes_from_its_checkpoint(setup, local_ray, tmp_path):  # noqa: F811
    fast = dict(checkpoint_every=2, method=rl.GRPOConfig, rollout_batch_size=8, group_size=4)
    straight = _run(setup, tmp_path / "straight", iterations=4, **fast)
    _run(setup, tmp_path / "work", iterations=2, **fast)
    logs: list[str] = []
    resumed = _run(setup, tmp_path / "work", logs, iterations=4, **fast)
    assert any("resuming from the checkpoint after iteration 2" in line for line in logs)
    h_straight, h_resumed = _history(straight), _history(resumed)
    assert h_straight[0]["kl"] == 0.0  # recomputed old log-probs: the same forward as the reference, adapter off
    assert [h["iteration"] for h in h_resumed] == [1, 2, 3, 4]
    for key in ("kl", "policy_loss", "reward_score"):  # iteration 3 from the restored adapter and optimizer
        assert h_resumed[2][key] == pytest.approx(h_straight[2][key], rel=1e-3, abs=1e-4), key
