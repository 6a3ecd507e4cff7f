"""``to_fixed_point``: the one decimal → stored integer conversion the node's CSV import and the
analyst's SUM bound share; exact, or refused with the rule (places, range) that refused."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.model.fixed_point import MAX_STORED, OutOfRange, TooManyPlaces, to_fixed_point
from govshare.protocols.errors import MalformedInput


def parts(text: str) -> tuple[bool, str, int]:
    """A decimal's parts as Decimal.as_tuple gives them, exactly as written."""
    sign, digits, exponent = Decimal(text).as_tuple()
    assert isinstance(exponent, int)
    return bool(sign), "".join(map(str, digits)), exponent


@pytest.mark.parametrize(
    ("text", "places", "stored"),
    [
        ("12.50", 1, 125),  # a trailing zero after the point is not a decimal place
        ("12.500000", 1, 125),
        ("12.50", 2, 1250),
        ("0.00", 0, 0),  # every digit a trailing zero
        ("-12.5", 1, -125),
        ("-0.05", 2, -5),
        ("-0", 0, 0),
        ("0E+999999999", 0, 0),  # zero however large its exponent
        ("1E+3", 0, 1_000),  # a positive exponent: zeros appended, not places
        ("120", 0, 120),  # trailing zeros before the point are the number's
        ("42", 0, 42),  # scale 0: the integer itself
        ("0.000000001", 9, 1),
        ("9223372036854775807", 0, MAX_STORED),  # the signed 64-bit range, both ends
        ("-9223372036854775807", 0, -MAX_STORED),
        ("92233720368547758.07", 2, MAX_STORED),
        ("000000000000000000000000000000000012", 0, 12),  # leading zeros count for nothing
    ],
)
def test_converted_exactly(text: str, places: int, stored: int) -> None:
    assert to_fixed_point(*parts(text), places) == stored


@pytest.mark.parametrize(
    ("text", "places", "written"),
    [
        ("12.55", 1, 2),
        ("0.5", 0, 1),  # scale 0 keeps whole units only
        ("-0.001", 2, 3),
        ("1.000000000000000000000000000001", 2, 30),  # past Decimal's 28-digit context
    ],
)
def test_too_many_places(text: str, places: int, written: int) -> None:
    with pytest.raises(TooManyPlaces) as raised:
        to_fixed_point(*parts(text), places)
    assert (raised.value.written, raised.value.places) == (written, places)
    assert isinstance(raised.value, MalformedInput)


@pytest.mark.parametrize(
    ("text", "places", "limit"),
    [
        ("9223372036854775808", 0, MAX_STORED),  # one over the 64-bit range
        ("-9223372036854775808", 0, MAX_STORED),  # the range is symmetric
        ("92233720368547758.08", 2, MAX_STORED),
        ("1E+999999999", 0, MAX_STORED),  # refused by its length: no billion-digit int
        ("0" * 5000 + "1" + "0" * 19, 0, MAX_STORED),  # and past int()'s 4300-digit limit
        ("1025", 0, 1024),  # another limit (the SUM bound's)
        ("10.25", 2, 1024),
    ],
)
def test_out_of_range(text: str, places: int, limit: int) -> None:
    with pytest.raises(OutOfRange) as raised:
        to_fixed_point(*parts(text), places, limit=limit)
    assert (raised.value.limit, raised.value.places) == (limit, places)


def test_places_are_checked_before_the_range() -> None:
    with pytest.raises(TooManyPlaces):
        to_fixed_point(*parts("99999999999999999999.999"), 2)


@given(
    st.integers(min_value=-MAX_STORED, max_value=MAX_STORED),
    st.integers(min_value=0, max_value=12),
    st.integers(min_value=0, max_value=3),
)
def test_round_trips(stored: int, places: int, padding: int) -> None:
    """Any stored integer written in its declared unit, with trailing zeros, reads back."""
    sign, digits, exponent = parts(format(Decimal(stored).scaleb(-places), "f"))
    assert to_fixed_point(sign, digits + "0" * padding, exponent - padding, places) == stored
