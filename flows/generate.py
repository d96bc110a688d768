"""Sampling from any causal-LM artifact, so a user can see what each stage changed."""

from __future__ import annotations

from stages.common.store import Artifact, ArtifactError


def generate_text(
    artifact: Artifact,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    num_samples: int = 1,
    seed: int = 0,
) -> list[str]:
    """Greedy (temperature 0) or sampled continuations of `prompt`, without the prompt and the eos token."""
    if artifact.kind != "causal-lm":
        raise ArtifactError(f"{artifact.ref} is a {artifact.kind}, not a causal-lm; pick a base-model, sft-model or policy")
    if max_new_tokens < 1 or num_samples < 1 or temperature < 0:
        raise ArtifactError("generate: --max-new-tokens and --num-samples must be >= 1 and --temperature >= 0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.common.sampling import decoding_config

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    model = AutoModelForCausalLM.from_pretrained(artifact.path).eval()
    enc = tokenizer([prompt] * num_samples, return_tensors="pt")
    # every artifact decodes the same way, whatever its generation_config.json asks for (a hub model's
    # repetition_penalty or top_k), so the outputs of two stages differ only by their weights
    config = decoding_config(temperature=temperature if temperature > 0 else None, top_p=1.0,
                             max_new_tokens=max_new_tokens, eos_ids=[tokenizer.eos_token_id],
                             pad_id=tokenizer.pad_token_id)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]
