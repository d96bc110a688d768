"""Where every RL role's model comes from: one loader per role, each from an artifact directory (never the driver).

All roles hold their weights in the run's precision (`devices.py`), with dropout off (PPO's ratio must be exactly 1
before the first step) and GPT-2's tanh-GELU as one kernel. The policy and the reference load the same SFT model;
with LoRA the policy and the critic carry an adapter and there is no reference role (the policy's adapter off is the
reference: `PolicyActor.reference_logprobs`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.common.forwards import TokenValueModel
from stages.common.hf import fuse_gelu_tanh


def resolve_model_dir(path: str, store_uri: str, ref: str) -> str:
    """The artifact's local directory: the driver's path when this node sees it, else fetched from the store here."""
    if Path(path).is_dir():
        return path
    from stages.common.store import ArtifactStore

    return ArtifactStore(store_uri).get(ref).path


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO's ratio must be exactly 1 before the first step, so no dropout in any forward pass."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_role_model(auto_class: str, model_dir: str, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    """`transformers.<auto_class>.from_pretrained` as every role runs it: no dropout, one-kernel tanh-GELU."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=dtype, **kwargs)
    disable_dropout(model)
    fuse_gelu_tanh(model)
    return model


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy(source: dict, dtype: torch.dtype, lora: dict | None = None) -> torch.nn.Module:
    """The trainable policy: the SFT causal LM (`source`: a `ModelSource` as a dict); with `lora` (a LoraSection
    as a dict) a peft model whose fresh adapter leaves every log-prob exactly as the SFT model's."""
    model = load_role_model("AutoModelForCausalLM", resolve_model_dir(**source), dtype)
    if lora is None:
        return model
    from stages.common.lora import LoraSection, wrap

    return wrap(model, LoraSection(**lora), task_type="CAUSAL_LM", where="policy.lora")


def load_reference(source: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen reference of the KL penalty: the SFT causal LM, in eval mode, without gradients."""
    return _frozen(load_role_model("AutoModelForCausalLM", resolve_model_dir(**source), dtype))


def load_critic(source: dict, dtype: torch.dtype, lora: dict | None = None) -> TokenValueModel:
    """The trainable value model: a one-output sequence classifier (the SFT model or the reward model) read per
    token; with `lora` an adapter on its transformer and its value head trained in full (peft's SEQ_CLS task keeps
    `score` whole: a fresh head must be learnt, not nudged)."""
    base = load_role_model("AutoModelForSequenceClassification", resolve_model_dir(**source), dtype, num_labels=1)
    if lora is not None:
        from stages.common.lora import LoraSection, wrap

        base = wrap(base, LoraSection(**lora), task_type="SEQ_CLS", where="critic.lora").base_model.model
    return TokenValueModel(base)


def load_reward_model(source: dict, dtype: torch.dtype, pad_token_id: int) -> tuple[TokenValueModel, int]:
    """The frozen reward model read per token, and the pad id it reads its score against: the one the reward stage
    trained (and evaluated) the classifier with, the tokenizer's (`pad_token_id`) when its config has none."""
    base = load_role_model("AutoModelForSequenceClassification", resolve_model_dir(**source), dtype)
    rm_pad = base.config.pad_token_id
    return _frozen(TokenValueModel(base)), int(pad_token_id if rm_pad is None else rm_pad)
