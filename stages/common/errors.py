"""Errors shared by the stages."""

from __future__ import annotations


class StageInputError(ValueError):
    """Bad stage input or config found before any compute (corpus too small, sizes that cannot fit, ...).

    The message is one line naming what is wrong, where, what was expected and what was found.
    """
