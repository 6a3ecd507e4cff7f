"""Decimals in a column's declared unit as the fixed-point integers its nodes store.

An ``aggregate`` column kept to ``places`` decimal places stores ``12.34`` (yuan) as ``1234``
(fen) when ``places`` is 2: sums stay exact integer sums. Both sides convert the same way: a
node each CSV cell it imports (``govshare.node.data.column_format``), the analyst a SUM bound
written in the declared unit (``govshare.client.analyst_aggregate``). The rules, here once:

- the conversion is exact: a number with more *significant* decimal places than the column
  keeps is refused, never rounded (rounding would change certified data, or a signed bound);
- trailing zeros after the point are not significant (``12.50`` has 1 place, ``12.340`` 2);
- the stored integer's magnitude is at most ``limit`` (by default the signed 64-bit range of
  SQLite's ``INTEGER``); a number whose digits alone put it past the limit is refused before
  any ``int()`` is built, so a number of any length or exponent costs nothing to refuse.

The number comes as its parts, as :meth:`decimal.Decimal.as_tuple` gives them: a sign, the
digits and the exponent (``-12.50`` is ``True, "1250", -2``). How it is written (a CSV cell's
plain notation, a ``Decimal`` argument) is the caller's to parse; so are the messages, which
differ by side (a node never quotes a cell; the analyst is told the column and its scale).
"""

from __future__ import annotations

from typing import Final

from govshare.protocols.errors import MalformedInput

# A stored aggregate value is a signed 64-bit integer (SQLite's INTEGER): ±(2^63 - 1).
MAX_STORED: Final = 2**63 - 1


class TooManyPlaces(MalformedInput):
    """The number has more significant decimal places (``written``) than the column keeps."""

    def __init__(self, written: int, places: int) -> None:
        super().__init__(f"{written} decimal places, more than the column's scale {places}")
        self.written = written
        self.places = places


class OutOfRange(MalformedInput):
    """The stored integer would be larger in magnitude than ``limit``."""

    def __init__(self, limit: int, places: int) -> None:
        super().__init__(f"out of range: at scale {places} at most {limit} stored units")
        self.limit = limit
        self.places = places


def to_fixed_point(
    negative: bool, digits: str, exponent: int, places: int, *, limit: int = MAX_STORED
) -> int:
    """The integer ``(-1)**negative * int(digits) * 10**(exponent + places)``, exactly.

    Args:
        negative: the number's sign (``-0`` is 0).
        digits: its decimal digits, ASCII ``0``-``9``, at least one.
        exponent: the power of ten of the last digit (``-len(fraction)`` for plain notation).
        places: the decimal places the column keeps (its scale, 0 or more).
        limit: the largest magnitude the stored integer may have.

    Raises:
        TooManyPlaces: more significant decimal places than ``places``.
        OutOfRange: a magnitude over ``limit``.
    """
    shift = exponent + places
    if shift < 0:  # more places written than kept: the extra ones may only be trailing zeros
        if digits[shift:].strip("0"):  # 12.50 has 1 place, 12.55 has 2
            raise TooManyPlaces(-exponent - (len(digits) - len(digits.rstrip("0"))), places)
        digits, shift = digits[:shift] or "0", 0
    # k significant digits are at least 10**(k-1) >= 2**(3*(k-1)): when that is past the
    # limit's bit length the number is over it, refused before a (maybe huge) int() is built.
    if 3 * (len(digits) + shift - 1) >= limit.bit_length():
        digits = digits.lstrip("0")
        if not digits:  # zero, whatever its exponent
            return 0
        if 3 * (len(digits) + shift - 1) >= limit.bit_length():
            raise OutOfRange(limit, places)
    value = int(digits + "0" * shift)
    if value > limit:
        raise OutOfRange(limit, places)
    return -value if negative else value
