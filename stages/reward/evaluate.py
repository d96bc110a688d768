"""Held-out evaluation of a reward model: scores of chosen/rejected replies, accuracy, margin, gold correlation."""

from __future__ import annotations

from stages.common import demo
from stages.reward.metrics import mean_margin, pairwise_accuracy, pearson


def score_texts(model, tokenizer, texts: list[str], *, batch_size: int) -> list[float]:
    """The reward model's scalar score of each text (read at the last non-pad token)."""
    import torch

    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    model.eval()
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        with torch.no_grad():
            scores += model(**enc).logits[:, 0].float().tolist()
    return scores


def evaluate_pairs(
    model_dir: str, pairs: list[dict[str, str]], *, demo_task: bool, batch_size: int, use_gpu: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """Load the saved reward model, score every held-out reply (+eos, as in training) and compute the metrics.

    eval_accuracy / eval_margin: over the pairs; gold_correlation (demo task): Pearson between the model's score and
    demo.gold_score over all chosen and rejected replies. Also returns a few scored samples to show.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(torch.device("cuda" if use_gpu else "cpu"))
    eos = tokenizer.eos_token
    chosen = torch.tensor(
        score_texts(model, tokenizer, [p["prompt"] + p["chosen"] + eos for p in pairs], batch_size=batch_size)
    )
    rejected = torch.tensor(
        score_texts(model, tokenizer, [p["prompt"] + p["rejected"] + eos for p in pairs], batch_size=batch_size)
    )
    metrics = {"eval_accuracy": pairwise_accuracy(chosen, rejected), "eval_margin": mean_margin(chosen, rejected)}
    samples = [
        {
            "prompt": p["prompt"],
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "score_chosen": c,
            "score_rejected": r,
        }
        for p, c, r in zip(pairs[:8], chosen[:8].tolist(), rejected[:8].tolist(), strict=True)
    ]
    if demo_task:
        gold = [demo.gold_score(p["prompt"], p["chosen"]) for p in pairs]
        gold += [demo.gold_score(p["prompt"], p["rejected"]) for p in pairs]
        metrics["gold_correlation"] = pearson(torch.cat([chosen, rejected]), torch.tensor(gold))
        # The labels carry noise: how often they agree with the gold scorer is the ceiling for eval_accuracy, and
        # gold_accuracy says how often the model ranks a pair as the gold scorer does.
        gold_prefers_chosen = torch.tensor(gold[: len(pairs)]) > torch.tensor(gold[len(pairs) :])
        metrics["label_gold_agreement"] = gold_prefers_chosen.float().mean().item()
        metrics["gold_accuracy"] = ((chosen > rejected) == gold_prefers_chosen).float().mean().item()
    return metrics, samples
