"""Sampling replies from the policy as the RL math assumes: from the model's own distribution at a temperature.

Two things HF generate does not give us directly:
- `decoding_config`: a GenerationConfig that samples from softmax(logits / temperature) (or decodes greedily)
  and nothing else. Generate fills every field left unset from the checkpoint's generation_config.json, so a
  Qwen2.5 instruct model would otherwise sample with its repetition_penalty 1.05: draws from a distribution the
  policy-gradient never sees.
- `SampledLogprobs`: log p(sampled token) read from the sampling pass's own logits, so the RL stage needs no second
  forward over the whole sequence for them. A forward hook on the model sees the raw logits of every decoding step
  (before any logits processor), the same quantity `TokenLogprobs` reads in a full forward; the token each step
  drew is the input of the next step (and the last column of the output for the final step). Only one step's
  [B, V] is held.
"""

from __future__ import annotations

import torch


def decoding_config(*, temperature: float | None, top_p: float, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """GenerationConfig for plain temperature (and optional nucleus) sampling, or greedy decoding when `temperature`
    is None, immune to the checkpoint's defaults: every logits processor a hub generation_config.json may switch on
    is pinned to "off" (greedy decoding runs no sampling-only warper, so only the penalties need pinning)."""
    from transformers import GenerationConfig

    pinned = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if temperature is not None:
        pinned.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0)  # fmt: skip
    else:
        pinned.update(do_sample=False)
    return GenerationConfig(**pinned, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                            use_cache=True)  # fmt: skip


class SampledLogprobs:
    """Context manager over `model.generate`: records log p(token) at `temperature` for each token it samples.

        with SampledLogprobs(model, temperature) as rec:
            out = model.generate(...)
        logprobs = rec.result(out)  # [B, generated], fp32
    """

    def __init__(self, model: torch.nn.Module, temperature: float):
        self.model = model
        self.temperature = temperature
        self._pending: torch.Tensor | None = None  # log-softmax of the last step's logits: [B, V]
        self._taken: list[torch.Tensor] = []
        self._handle = None

    def _take(self, drawn: torch.Tensor) -> None:
        """Log-prob of the tokens `drawn` [B] from the pending step's distribution."""
        if self._pending is not None:
            self._taken.append(self._pending.gather(-1, drawn[:, None]).squeeze(-1))
            self._pending = None

    def _hook(self, module, args, kwargs, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._take(input_ids[:, -1])  # the token the previous step sampled is this step's input
        # fp32 before the temperature, as TokenLogprobs does: bf16 logits would round the log-probs by ~0.01
        self._pending = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

    def __enter__(self) -> SampledLogprobs:
        # generate on a peft model runs its base model's forward, not the wrapper's: hook the module generate steps
        stepped = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._handle = stepped.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def result(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, generated] log-probs of sequences[:, P:] (generate's output; the final step's token is its last column).

        generate always takes at least one step (max_new_tokens >= 1), so there is always a column.
        """
        self._take(sequences[:, -1])
        return torch.stack(self._taken, dim=1)
