"""PRC resident identity numbers (公民身份号码), GB 11643-1999.

An 18-character number is laid out as::

    RRRRRR YYYYMMDD SSS C
    region birth    seq check

- ``RRRRRR``: the administrative division code (GB/T 2260) of the place of registration.
- ``YYYYMMDD``: the date of birth.
- ``SSS``: the sequence code; odd for men, even for women.
- ``C``: the check character, ISO 7064 MOD 11-2 over the first 17 digits: with weights
  ``W_i = 2^(18-i) mod 11`` (7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2) and ``S = Σ W_i·d_i``,
  the check value is ``(12 - S mod 11) mod 11``, written ``X`` when it is 10.

:func:`normalise` is the key normaliser of ``join_key`` columns with ``key_type = "resident_id"``:
two spellings of the same number (surrounding blanks, a lower-case ``x``) must map to the same PSI
item, and a mistyped number must be refused rather than silently fail to match.

Error messages never quote the number itself: it is personal data, and errors end up in logs.
The first-generation 15-digit numbers (withdrawn in 2013) are refused, not converted.
"""

from __future__ import annotations

import re
from datetime import date

from govshare.protocols.errors import MalformedInput

LENGTH = 18
# ISO 7064 MOD 11-2 weights for positions 1..17 from the left: 2^(18-i) mod 11, i.e. 2^(k-1)
# mod 11 for position k counted from the right, the check character being k = 1..
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# Check character for each value of (sum mod 11).
CHECK_BY_REMAINDER = "10X98765432"
# Earliest birth year accepted. The standard sets no bound; no living resident was born before
# this, so an earlier year is a typing error (e.g. 0949 for 1949), not a person.
MIN_BIRTH_YEAR = 1850
FIELD = "resident_id"
_DIGITS = frozenset("0123456789")
# 17 ASCII digits then a digit or X: a number the checks below need not take apart.
_SHAPE = re.compile(r"[0-9]{17}[0-9X]")


def check_digit(first17: str) -> str:
    """Return the check character ('0'-'9' or 'X') for the first 17 digits of a number.

    Raises:
        MalformedInput: ``first17`` is not exactly 17 ASCII digits.
    """
    if not isinstance(first17, str):
        raise TypeError("first17 must be a str")
    if len(first17) != LENGTH - 1 or not _DIGITS.issuperset(first17):
        raise MalformedInput("check digit needs exactly 17 ASCII digits", field=FIELD)
    # sum(w_k * d_k) with w_k = 2^(18-k) mod 11 is 2 * sum(d_k * 2^(17-k)) mod 11, and 13 is 2
    # mod 11: reading the 17 digits in base 13 gives that sum mod 11 at C speed (the import and
    # every read of a live source check each key; a test pins this against WEIGHTS).
    return CHECK_BY_REMAINDER[2 * int(first17, 13) % 11]


def normalise(raw: str) -> str:
    """Return the canonical form of a resident identity number.

    Surrounding whitespace is stripped and a trailing lower-case ``x`` upper-cased. The result
    has 18 characters: 17 ASCII digits then a digit or ``X``; a real calendar date of birth no
    earlier than :data:`MIN_BIRTH_YEAR`; and the correct ISO 7064 MOD 11-2 check character.

    Raises:
        TypeError: ``raw`` is not a str.
        MalformedInput: the number is not valid; the message says which rule failed (and never
            contains the number).
    """
    if not isinstance(raw, str):
        raise TypeError("resident id must be a str")
    value = raw.strip().upper()
    if _SHAPE.fullmatch(value) is not None:  # the common case: 17 digits and a digit or X
        _check_birth_date(value)
        if CHECK_BY_REMAINDER[2 * int(value[:17], 13) % 11] != value[17]:
            raise MalformedInput("resident id check character is wrong (character 18)", field=FIELD)
        return value
    if len(value) == 15 and _DIGITS.issuperset(value):
        raise MalformedInput(
            "15-digit first-generation resident ids are not accepted; 18 characters required",
            field=FIELD,
        )
    if len(value) != LENGTH:
        raise MalformedInput(
            f"resident id must have {LENGTH} characters, got {len(value)}", field=FIELD
        )
    if not _DIGITS.issuperset(value[:17]):
        position = next(i for i, c in enumerate(value[:17], start=1) if c not in _DIGITS)
        raise MalformedInput(
            f"resident id character {position} must be an ASCII digit", field=FIELD
        )
    last = value[17]
    if last not in _DIGITS and last != "X":
        raise MalformedInput("resident id character 18 must be an ASCII digit or X", field=FIELD)
    _check_birth_date(value)
    if check_digit(value[:17]) != last:
        raise MalformedInput("resident id check character is wrong (character 18)", field=FIELD)
    return value


def _check_birth_date(value: str) -> None:
    year, month, day = int(value[6:10]), int(value[10:12]), int(value[12:14])
    if year < MIN_BIRTH_YEAR:
        raise MalformedInput(
            f"resident id birth year is before {MIN_BIRTH_YEAR} (characters 7-10)", field=FIELD
        )
    try:
        date(year, month, day)
    except ValueError:
        raise MalformedInput(
            "resident id birth date is not a calendar date (characters 7-14)", field=FIELD
        ) from None


def is_valid(raw: str) -> bool:
    """True if :func:`normalise` accepts ``raw``."""
    try:
        normalise(raw)
    except MalformedInput:
        return False
    return True


def make(region: str, birth: date, sequence: int) -> str:
    """Build a valid 18-character number, for synthetic data and tests.

    Args:
        region: six-digit administrative division code, e.g. ``"110101"`` (Dongcheng, Beijing).
        birth: date of birth, year at least :data:`MIN_BIRTH_YEAR` and at most 9999.
        sequence: 0-999; odd for men, even for women.

    Raises:
        TypeError: wrong argument types.
        MalformedInput: an argument is out of range.
    """
    if not isinstance(region, str) or not isinstance(birth, date) or isinstance(sequence, bool):
        raise TypeError("make(region: str, birth: date, sequence: int)")
    if not isinstance(sequence, int):
        raise TypeError("sequence must be an int")
    if len(region) != 6 or not _DIGITS.issuperset(region):
        raise MalformedInput("region must be exactly 6 ASCII digits", field="region")
    if birth.year < MIN_BIRTH_YEAR:
        raise MalformedInput(f"birth year must be at least {MIN_BIRTH_YEAR}", field="birth")
    if not 0 <= sequence <= 999:
        raise MalformedInput("sequence must be between 0 and 999", field="sequence")
    first17 = f"{region}{birth:%Y%m%d}{sequence:03d}"
    return first17 + check_digit(first17)
