"""Eval stage: the SFT model and every policy of a run scored on the same held-out prompts, in one Ray task.

Inputs: sft_model (causal-lm, the baseline row), reward_model (reward-model), prompts (dataset; its test split),
policies ({row name: causal-lm}). Output: eval-report (report.json, report.md, win_rates.png) with per-model
metrics `<row>.gold_score`, `<row>.win_rate_vs_sft`, `<row>.rm_score`, `<row>.kl`, ... and every policy in its
lineage as input `policy.<row>`.
"""

from stages.eval.config import Config
from stages.eval.stage import INPUTS, NAME, OUTPUTS, run

__all__ = ["NAME", "Config", "INPUTS", "OUTPUTS", "run"]
