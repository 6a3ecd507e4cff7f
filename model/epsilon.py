"""Differential-privacy budgets ε as exact decimals: the one text form every party writes and reads.

An ε is written as a plain decimal string (``"1.0"``, ``"0.25"``) and held as a
:class:`fractions.Fraction`; no float ever touches a ledger. Grants, plans, ledgers and the
catalogue all use this codec.
"""

from __future__ import annotations

import re
from fractions import Fraction

from govshare.protocols.errors import MalformedInput

# ε as an operator writes it: a plain non-negative decimal.
_EPSILON_TEXT = re.compile(r"^[0-9]{1,6}(?:\.[0-9]{1,12})?$")
# The largest ε text the pattern reads, plus one: no meaningful budget comes near it.
MAX_EPSILON = 10**6


def parse_epsilon(text: str) -> Fraction:
    """Parse an ε budget written as a plain decimal (``"1"``, ``"0.5"``) into an exact Fraction.

    Raises:
        MalformedInput: not a non-negative decimal without exponent (``"1e-3"``, ``"-1"``,
            ``"nan"`` and ``"0x1"`` are all refused).
    """
    stripped = text.strip()
    if not _EPSILON_TEXT.match(stripped):
        raise MalformedInput(
            f"epsilon {text!r} must be a non-negative decimal such as 1.0 or 0.25",
            field="epsilon",
        )
    return Fraction(stripped)


def format_epsilon(value: Fraction) -> str:
    """The canonical decimal text of an exact ε: no exponent, no trailing zeros.

    Raises:
        MalformedInput: negative, not a terminating decimal (such as 1/3), or beyond what
            :func:`parse_epsilon` reads back (six integer digits, twelve decimals).
    """
    if value < 0:
        raise MalformedInput("epsilon must not be negative", field="epsilon")
    if value >= MAX_EPSILON:
        raise MalformedInput(f"epsilon must be below {MAX_EPSILON}", field="epsilon")
    denominator = value.denominator
    twos = fives = 0
    while denominator % 2 == 0:
        denominator //= 2
        twos += 1
    while denominator % 5 == 0:
        denominator //= 5
        fives += 1
    if denominator != 1:
        raise MalformedInput(f"epsilon {value} is not a finite decimal", field="epsilon")
    scale = max(twos, fives)
    digits = str(value.numerator * 10**scale // value.denominator).rjust(scale + 1, "0")
    if scale == 0:
        return digits
    whole, fraction = digits[:-scale], digits[-scale:].rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole
