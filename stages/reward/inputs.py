"""Checks on the reward-model inputs, on the driver, before any Ray worker starts.

Every problem is a one-line `StageInputError` naming the artifact, the file, the row or column, and the sizes.
Pairs longer than the limit are rejected, not truncated or dropped: the reply's end (its eos, where the score is
read) is what truncation would cut, so chosen and rejected could become the same text; TRL's own behaviour is to
drop such pairs silently, which would shrink the data without a trace. A clear error lets the user decide.

Pairs come as strings or in TRL's conversational form (prompt: a list of turns; chosen/rejected: lists of assistant
turns). With a chat template in the tokenizer TRL renders those; without one they become plain-format strings.
"""

from __future__ import annotations

# The pair checks live in stages/trl/preference_pairs.py (the DPO stage uses them too); re-exported here so
# `from stages.reward.inputs import check_pairs` keeps working.
from stages.trl.preference_pairs import COLUMNS, check_lengths, check_pairs

__all__ = ["COLUMNS", "check_lengths", "check_pairs"]
