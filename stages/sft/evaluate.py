"""Held-out evaluation of a fine-tuned model on the demo task: replies, format adherence and gold score.

Two decodings are measured. Sampled replies (temperature 1, seeded) are what the policy produces and what the PPO
stage scores before and after RL, so `format_rate` / `gold_score` use them and PPO's gain reads against the same
measure. Greedy replies are reported as `greedy_format_rate` / `greedy_gold_score`: on the demo task every adjective
is equally likely, so greedy picks the one most-likely adjective again after "and" ("The cat is calm and calm.")
unless the model has learnt to suppress repeats, which a tiny model does slowly; greedy figures therefore swing
between runs and say more about tie-breaking than about format learning.
"""

from __future__ import annotations

# The evaluation lives in stages/trl/demo_eval.py (the DPO stage uses it too); re-exported here so
# `from stages.sft.evaluate import demo_metrics` keeps working.
from stages.trl.demo_eval import demo_metrics, generate_replies, score_replies

__all__ = ["demo_metrics", "generate_replies", "score_replies"]
