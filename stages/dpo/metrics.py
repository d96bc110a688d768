"""The DPO stage's published metrics read from TRL's log, as plain functions (hand-checked in tests/test_dpo.py)."""

from __future__ import annotations

from typing import Any

# TRL's eval keys (means over the held-out pairs of beta * log-ratio terms) -> the names the stage publishes
EVAL_REWARD_KEYS = {
    "eval_rewards/accuracies": "eval_reward_accuracy",  # share of pairs whose chosen implicit reward is higher
    "eval_rewards/margins": "eval_reward_margin",  # mean of r_chosen - r_rejected
    "eval_rewards/chosen": "eval_reward_chosen",  # mean beta * (log pi(chosen) - log pi_ref(chosen))
    "eval_rewards/rejected": "eval_reward_rejected",
}


def implicit_reward_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The implicit-reward metrics of the last evaluation in the Trainer's log history, under our names.

    DPO's implicit reward of a reply y is r(y) = beta * (log pi(y|x) - log pi_ref(y|x)); TRL logs its held-out means
    when `trainer.evaluate()` runs. An empty dict when no evaluation was logged.
    """
    for entry in reversed(log_history):
        if "eval_rewards/accuracies" in entry:
            return {ours: float(entry[trl]) for trl, ours in EVAL_REWARD_KEYS.items() if trl in entry}
    return {}


def demo_eval_prompts(pairs: list[dict[str, Any]], limit: int) -> list[str]:
    """Up to `limit` distinct string prompts of the held-out pairs, in data order (the demo task's eval prompts)."""
    seen: dict[str, None] = {}
    for pair in pairs:
        if isinstance(pair["prompt"], str):
            seen.setdefault(pair["prompt"], None)
    return list(seen)[:limit]
