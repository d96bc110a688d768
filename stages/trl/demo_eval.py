"""Held-out evaluation of a causal LM on the demo task: replies, format adherence and gold score.

Shared by the stages that publish a policy (SFT, DPO), so their gold scores read against the same measure.
Two decodings are measured. Sampled replies (temperature 1, seeded) are what the policy produces and what the PPO
stage scores before and after RL, so `format_rate` / `gold_score` use them and PPO's gain reads against the same
measure. Greedy replies are reported as `greedy_format_rate` / `greedy_gold_score`: on the demo task every adjective
is equally likely, so greedy picks the one most-likely adjective again after "and" ("The cat is calm and calm.")
unless the model has learnt to suppress repeats, which a tiny model does slowly; greedy figures therefore swing
between runs and say more about tie-breaking than about format learning.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.data import demo


@dataclass(frozen=True, kw_only=True)
class DemoEval:
    """The held-out demo evaluation a policy stage (SFT, DPO) runs on rank 0 after training; no prompts = none.
    A nested field of their loop configs (`SFTLoopConfig.demo_eval`, `DPOLoopConfig.demo_eval`)."""

    prompts: tuple[str, ...]  # held-out prompts, answered sampled and greedily by `demo_metrics`
    max_new_tokens: int  # generation budget per prompt
    batch_size: int  # prompts per batched, left-padded generate call


def generate_replies(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, temperature: float | None = None
) -> list[str]:
    """Replies to `prompts` (greedy, or sampled when `temperature` is set), batched with left padding, cut at eos."""
    import torch

    from stages.common.sampling import decoding_config

    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    # the checkpoint's generation_config.json (a hub model's repetition_penalty, top_k) does not apply
    config = decoding_config(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)  # fmt: skip
    device = next(model.parameters()).device
    replies: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        # Plain-text prompts, tokenized as TRL tokenized them in training (a Llama tokenizer adds bos here).
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            replies.append(tokenizer.decode(row, skip_special_tokens=True))
    return replies


def score_replies(prompts: list[str], replies: list[str]) -> dict[str, float]:
    """format_rate: share of replies in the demo format; gold_score: their mean gold score (-1 for broken ones)."""
    if not prompts:
        return {"format_rate": 0.0, "gold_score": -1.0}
    ok = [demo.follows_format(p, r) for p, r in zip(prompts, replies, strict=True)]
    gold = [demo.gold_score(p, r) for p, r in zip(prompts, replies, strict=True)]
    return {"format_rate": sum(ok) / len(ok), "gold_score": sum(gold) / len(gold)}


def demo_metrics(
    model_dir: str,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    use_gpu: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Load the saved model, answer `prompts` sampled (T=1) and greedily, score both; also a few samples to show."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(torch.device("cuda" if use_gpu else "cpu"))
    kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    torch.manual_seed(seed)  # the same sampled replies on a rerun
    sampled = generate_replies(model, tokenizer, prompts, temperature=1.0, **kwargs)
    greedy = generate_replies(model, tokenizer, prompts, **kwargs)
    greedy_scores = score_replies(prompts, greedy)
    metrics = {
        **score_replies(prompts, sampled),
        "greedy_format_rate": greedy_scores["format_rate"],
        "greedy_gold_score": greedy_scores["gold_score"],
    }
    samples = [
        {
            "prompt": p,
            "sampled": s,
            "greedy": g,
            "follows_format": demo.follows_format(p, s),
            "gold_score": demo.gold_score(p, s),
        }
        for p, s, g in zip(prompts[:8], sampled[:8], greedy[:8], strict=True)
    ]
    return metrics, samples
