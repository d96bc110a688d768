"""LoRA with peft on the tiny architectures users bring: a fresh adapter changes nothing, the adapter off is the base,
the merged model is the adapted one, both published forms load, and a section that cannot wrap fails in one line."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from stages.common.lora import LoraError, LoraSection, check_wraps, merged, save_adapter, trainable_parameters, wrap
from tests.tiny_models import TINY_ARCHS, build_tiny_model, build_tiny_tokenizer

TEXTS = [f"User: Describe the {n}.\nAssistant: The {n} is red and small." for n in ("cat", "dog", "fox", "owl")] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, 300)


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), -1)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_a_fresh_adapter_changes_nothing_and_the_adapter_off_is_the_base(tokenizer, arch):
    base = build_tiny_model(arch, tokenizer).eval()
    ids = torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    before = _logprobs(base, ids)
    model = wrap(build_tiny_model(arch, tokenizer).eval(), LoraSection(r=4), task_type="CAUSAL_LM", where="sft.lora")
    assert torch.equal(_logprobs(model, ids), before)  # B = 0: the update is exactly zero

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss = -torch.log_softmax(model(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.allclose(_logprobs(model, ids), before)  # the adapter learnt something
    with model.disable_adapter():
        assert torch.equal(_logprobs(model, ids), before)  # the frozen base is untouched: the reference is free
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total / 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_merged_model_and_the_adapter_load_as_published(tokenizer, arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    build_tiny_model(arch, tokenizer).save_pretrained(base_dir)
    model = wrap(AutoModelForCausalLM.from_pretrained(base_dir), LoraSection(r=4), task_type="CAUSAL_LM", where="x")
    with torch.no_grad():  # move B off zero, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    adapted = _logprobs(model.eval(), ids)

    out = tmp_path / "out"
    merged(model).save_pretrained(out)
    save_adapter(model, out, str(base_dir))
    assert torch.allclose(_logprobs(AutoModelForCausalLM.from_pretrained(out).eval(), ids), adapted, atol=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                         out / "adapter").eval()  # fmt: skip
    assert torch.allclose(_logprobs(reloaded, ids), adapted, atol=1e-6)
    assert _logprobs(model, ids).equal(adapted)  # merging published a copy: the training model still has its adapter


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_check_wraps_reads_only_the_config(tokenizer, arch):
    config = build_tiny_model(arch, tokenizer).config.to_dict()
    check_wraps(LoraSection(), config, head="causal-lm", where="sft.lora")
    check_wraps(LoraSection(), config, head="reward-model", where="reward.lora")
    with pytest.raises(LoraError) as err:
        check_wraps(LoraSection(target_modules=["q_projj"]), config, head="causal-lm", where="dpo.lora")
    message = str(err.value)
    assert message.startswith("dpo.lora.target_modules: [q_projj] cannot wrap") and "\n" not in message


def test_the_section_refuses_a_rank_below_one_and_unknown_keys():
    with pytest.raises(ValidationError):
        LoraSection(r=0)
    with pytest.raises(ValidationError):
        LoraSection.model_validate({"rank": 8})
    assert LoraSection.model_validate({"alpha": 16}).alpha == 16.0  # an int alpha from YAML is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is allowed where CUDA exists")
def test_qlora_is_refused_without_cuda(tokenizer):
    config = build_tiny_model("llama", tokenizer).config.to_dict()
    with pytest.raises(LoraError, match=r"^sft\.lora\.quantize: 4bit \(QLoRA\) needs a CUDA device"):
        check_wraps(LoraSection(quantize="4bit"), config, head="causal-lm", where="sft.lora")


def test_log_probs_are_recorded_while_a_peft_model_samples(tokenizer):
    # generate on a PeftModel steps its base model's forward: the recorder must hook that module, not the wrapper
    from stages.common.sampling import SampledLogprobs

    model = wrap(build_tiny_model("llama", tokenizer).eval(), LoraSection(r=4), task_type="CAUSAL_LM", where="x")
    ids = torch.tensor([[5, 6, 7, 8]])
    with SampledLogprobs(model, 1.0) as recorder:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=True,
                             pad_token_id=0)  # fmt: skip
    sampled = recorder.result(out)
    assert sampled.shape == (1, out.shape[1] - 4)
    expected = _logprobs(model, out)[0, 3:-1].gather(-1, out[0, 4:, None]).squeeze(-1)
    torch.testing.assert_close(sampled[0], expected, atol=1e-5, rtol=1e-5)
