"""Closed sets of words (modes, readers, verify modes) as enums that stay strings."""

from __future__ import annotations

import enum


class Word(str, enum.Enum):
    """A ``str`` enum: compares equal to its value and JSON-encodes as it, and also prints
    as its value, so log lines and metric labels show ``tokens``, not ``Mode.TOKENS``.
    (``enum.StrEnum`` does this from Python 3.11; the project supports 3.10.)"""

    def __str__(self) -> str:
        return self.value
