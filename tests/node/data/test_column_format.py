"""Fixed-point decimals and NULL policies: exact, refused with a reason, never quoting a cell."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.model.governance import MAX_SCALE, ColumnKind, ColumnRule
from govshare.node.data.column_format import (
    MAX_ABS_AGGREGATE,
    ColumnFormat,
    NullPolicy,
    format_from_json,
    parse_fixed_point,
    validate_format,
)
from govshare.protocols.errors import MalformedInput

AMOUNT = ColumnRule("amount", ColumnKind.AGGREGATE)
NOTES = ColumnRule("notes", ColumnKind.PLAINTEXT)
KEY = ColumnRule("id", ColumnKind.JOIN_KEY, key_type="text")


@pytest.mark.parametrize(
    ("cell", "scale", "stored"),
    [
        ("12.34", 2, 1234),
        ("12.3", 2, 1230),
        ("12", 2, 1200),
        ("12.340", 2, 1234),  # trailing zeros are not significant
        ("-0.05", 2, -5),
        ("+7.5", 1, 75),
        ("0.000000001", 9, 1),
        ("42", 0, 42),
        ("42.000", 0, 42),
        ("-9223372036854775807", 0, -MAX_ABS_AGGREGATE),
        ("92233720368547758.07", 2, MAX_ABS_AGGREGATE),
    ],
)
def test_fixed_point(cell: str, scale: int, stored: int) -> None:
    assert parse_fixed_point(cell, scale) == stored


@pytest.mark.parametrize(
    ("cell", "scale", "reason"),
    [
        ("12.345", 2, "3 decimal places, more than the column's scale 2"),
        ("4.5", 0, "not an integer: it has decimal places; declare the column's scale"),
        ("1,234.50", 2, "not a decimal number"),
        ("1e3", 2, "not a decimal number"),
        ("¥12", 2, "not a decimal number"),
        (".5", 2, "not a decimal number"),
        ("5.", 2, "not a decimal number"),
        ("1_000", 0, "not an integer"),
        ("9223372036854775808", 0, "not an integer: out of the signed 64-bit range"),
        ("92233720368547758.08", 2, "out of range: at scale 2 the column holds at most"),
        ("9" * 100, 0, "not an integer"),
    ],
)
def test_fixed_point_refused(cell: str, scale: int, reason: str) -> None:
    with pytest.raises(MalformedInput) as info:
        parse_fixed_point(cell, scale)
    assert str(info.value).startswith(reason)
    assert cell not in str(info.value)  # a cell may be personal data


@given(
    st.integers(min_value=-MAX_ABS_AGGREGATE, max_value=MAX_ABS_AGGREGATE),
    st.integers(min_value=0, max_value=MAX_SCALE),
    st.integers(min_value=0, max_value=3),
)
def test_fixed_point_round_trips(stored: int, scale: int, padding: int) -> None:
    """Any stored integer written in its declared unit (with any trailing zeros) reads back."""
    text = format(Decimal(stored).scaleb(-scale), "f")
    if padding:
        text += ("" if "." in text else ".") + "0" * padding
    assert parse_fixed_point(text, scale) == stored


def test_formats_validated_per_kind() -> None:
    assert validate_format(AMOUNT, ColumnFormat()) == ColumnFormat(0, NullPolicy.REFUSE)
    assert validate_format(NOTES, ColumnFormat()) == ColumnFormat(0, NullPolicy.KEEP)
    assert validate_format(KEY, ColumnFormat(null=NullPolicy.SKIP_ROW)).null is NullPolicy.SKIP_ROW
    for rule, fmt, message in (
        (NOTES, ColumnFormat(scale=2), "only an aggregate column takes a scale"),
        (AMOUNT, ColumnFormat(scale=MAX_SCALE + 1), "the scale is 0 to 9"),
        (NOTES, ColumnFormat(null=NullPolicy.ZERO), "only an aggregate column takes null=zero"),
        (KEY, ColumnFormat(null=NullPolicy.KEEP), "a blank cell there is refused"),
    ):
        with pytest.raises(MalformedInput, match=message):
            validate_format(rule, fmt)


def test_stored_formats_read_back_and_default() -> None:
    fmt = ColumnFormat(2, NullPolicy.ZERO)
    assert format_from_json(fmt.to_json(), ColumnKind.AGGREGATE) == fmt
    # A column stored before formats existed: scale 0, its kind's default policy.
    assert format_from_json({"name": "x"}, ColumnKind.DENY) == ColumnFormat(0, NullPolicy.KEEP)
    with pytest.raises(ValueError):
        format_from_json({"scale": "2"}, ColumnKind.AGGREGATE)
