"""Held-out evaluation of a fine-tuned model on the demo task: greedy replies, format adherence and gold score."""

from __future__ import annotations

from stages.common import demo


def greedy_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies to `prompts`, batched with left padding, each cut at the first eos (eos not included)."""
    import torch

    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    device = next(model.parameters()).device
    replies: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
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
    model_dir: str, prompts: list[str], *, max_new_tokens: int, batch_size: int, use_gpu: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """Load the saved model, answer `prompts` greedily, score the replies; also returns a few samples to show."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(torch.device("cuda" if use_gpu else "cpu"))
    replies = greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    samples = [
        {"prompt": p, "response": r, "follows_format": demo.follows_format(p, r), "gold_score": demo.gold_score(p, r)}
        for p, r in zip(prompts[:8], replies[:8], strict=True)
    ]
    return score_replies(prompts, replies), samples
