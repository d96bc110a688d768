"""Held-out evaluation of a reward model: scores of chosen/rejected replies, accuracy, margin, gold correlation."""

from __future__ import annotations

from stages.data import demo
from stages.reward.metrics import mean_margin, pairwise_accuracy, pearson
from stages.trl.tokens import load_tokenizer, token_ids_as_trl


def score_sequences(model, pad_token_id: int, sequences: list[list[int]], *, batch_size: int) -> list[float]:
    """The reward model's scalar score of each token sequence, batched with right padding (as in training); the
    model reads each score at the last token that is not pad."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        with torch.no_grad():
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        scores += out.logits[:, 0].float().tolist()
    return scores


def score_pairs(model, tokenizer, pairs: list[dict], side: str, *, batch_size: int) -> list[float]:
    """Scores of prompt + pair[side] ("chosen" or "rejected"), tokenized exactly as TRL's RewardTrainer does."""
    sequences = [token_ids_as_trl(tokenizer, p["prompt"], p[side]) for p in pairs]
    return score_sequences(model, tokenizer.pad_token_id, sequences, batch_size=batch_size)


def evaluate_pairs(
    model_dir: str, pairs: list[dict[str, str]], *, demo_task: bool, batch_size: int, use_gpu: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """Load the saved reward model, score every held-out reply (tokenized as in training) and compute the metrics.

    eval_accuracy / eval_margin: over the pairs; gold_correlation (demo task): Pearson between the model's score and
    demo.gold_score over all chosen and rejected replies. Also returns a few scored samples to show.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(torch.device("cuda" if use_gpu else "cpu"))
    chosen = torch.tensor(score_pairs(model, tokenizer, pairs, "chosen", batch_size=batch_size))
    rejected = torch.tensor(score_pairs(model, tokenizer, pairs, "rejected", batch_size=batch_size))
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
