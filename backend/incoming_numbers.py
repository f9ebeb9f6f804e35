"""Numbers from outside (request bodies, label configs, the command line), read in one place.

``str.isdigit`` accepts "²" and other non-ASCII digits that ``int`` then refuses, ``int`` refuses
more than 4,300 digits, and ``float`` of a huge integer overflows: each was a 500 where a 400 was
due. These helpers accept ASCII digits of bounded length and finite numbers only, and answer None
for anything else, so that each caller refuses the value in its own words.
"""

from __future__ import annotations

import math

MAX_DIGITS = 19  # Label Studio's ids are 64-bit integers: at most 19 digits


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
