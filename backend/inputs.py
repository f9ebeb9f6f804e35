"""What this backend accepts from outside, beyond bytes: numbers, labels per config, a typed prompt's size.

Numbers: ``str.isdigit`` accepts "²" and other non-ASCII digits that ``int`` then refuses, ``int``
refuses more than 4,300 digits, and ``float`` of a huge integer overflows: each was a 500 where a
400 was due. The helpers here accept ASCII digits of bounded length and finite numbers only, and
answer None for anything else, so that each caller refuses the value in its own words.

Work: labels and a prompt are worked through on the only inference thread for every task, so an
unbounded one holds every prediction behind it. ``Settings`` takes its defaults from here
(FREESEG_MAX_LABELS, FREESEG_MAX_PROMPT_CHARS, FREESEG_MAX_PROMPT_WORDS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_DIGITS = 19  # Label Studio's ids are 64-bit integers: at most 19 digits

# Every label is a CLIP prompt and a score per cluster on every task; Label Studio's largest
# segmentation template (ADE20K) has 150. docs/reliability.md has the measurement behind the bound.
MAX_LABELS = 300


@dataclass(frozen=True)
class PromptLimits:
    """A typed prompt's bounds: far above what a person types, far below what would hold the worker."""

    max_chars: int = 1000
    max_words: int = 100


def whole_number(value: object, max_digits: int = MAX_DIGITS) -> int | None:
    """A whole number from zero up, from an int or a string of at most ``max_digits`` ASCII digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 10**max_digits else None
    if isinstance(value, str):
        text = value.strip()
        if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
            return int(text)
    return None


def finite_number(value: object) -> float | None:
    """A JSON number (int or float, not a boolean) as a finite float; None for anything else or too large."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return number if math.isfinite(number) else None
