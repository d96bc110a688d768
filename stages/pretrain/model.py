"""Which causal LM the stage trains: a from-scratch GPT-2 or Llama-style config, or any HF causal LM to continue.

The driver turns the stage config into a `spec` (a JSON-able dict) after checking it against the tokenizer and, for
`init_from`, against the model's own config; each Ray Train worker builds the model from that spec; rank 0 saves the
final weights with the model's own class, so `AutoModelForCausalLM.from_pretrained` gives back the same family.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# What a from-scratch architecture name becomes in transformers.
SCRATCH_CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig"}


def llama_intermediate_size(n_embd: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden size: 8/3 of the width (same FLOPs as a 4x GELU MLP with its three matrices), rounded up to
    a multiple of `multiple_of` so the matmuls tile well."""
    return multiple_of * math.ceil(int(8 * n_embd / 3) / multiple_of)


def scratch_spec(config, tokenizer) -> dict[str, Any]:
    """The from-scratch model of `config.architecture`, as {"architecture", "config": kwargs of its HF config}."""
    n_positions = config.n_positions or config.context
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    if config.architecture == "llama":
        kwargs = {
            **ids,
            "hidden_size": config.n_embd,
            "intermediate_size": llama_intermediate_size(config.n_embd),
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_head,
            "max_position_embeddings": n_positions,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,  # small vocab-heavy models: the embedding is a large share of the weights
            "attention_dropout": config.dropout,
        }
    else:
        kwargs = {
            **ids,
            "n_positions": n_positions,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
        }
    return {"architecture": config.architecture, "config": kwargs, "init_from": None}


def max_positions(hf_config) -> int | None:
    """The longest sequence a model config declares (max_position_embeddings; GPT-2 maps n_positions onto it)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_causal_lm(hf_config) -> bool:
    """True if AutoModelForCausalLM has a class for this config's model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def hf_config_from_spec(spec: dict[str, Any]):
    """The transformers config object of a from-scratch spec."""
    import transformers

    return getattr(transformers, SCRATCH_CONFIG_CLASSES[spec["architecture"]])(**spec["config"])


def build_model(spec: dict[str, Any], seed: int):
    """The fp32 model of `spec` with SDPA attention (flash/memory-efficient kernels on GPU); same init on every rank."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if spec["init_from"]:
        try:
            return AutoModelForCausalLM.from_pretrained(spec["init_from"], dtype=torch.float32, attn_implementation="sdpa")
        except ValueError:  # a family without an SDPA path: its own default attention
            return AutoModelForCausalLM.from_pretrained(spec["init_from"], dtype=torch.float32)
    return AutoModelForCausalLM.from_config(hf_config_from_spec(spec), attn_implementation="sdpa")


def tied_parameter_names(model) -> set[str]:
    """Names that alias a parameter already listed under another name (a tied lm_head, for instance)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def save_hf_model(weights: dict, model_config, out: Path) -> None:
    """Full weights as a plain fp32 model of the config's own class (safetensors), loadable with AutoModelForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config)
    missing, unexpected = model.load_state_dict(
        {k: v.detach().to(torch.float32).cpu() for k, v in weights.items()}, strict=False
    )
    missing = [k for k in missing if k not in tied_parameter_names(model)]  # loaded through the tensor they alias
    if missing or unexpected:
        raise RuntimeError(
            f"final weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.save_pretrained(out)
