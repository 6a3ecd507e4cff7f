"""``stored_bound``: a SUM bound in the column's declared unit to the stored units a plan signs,
exactly, or refused with the column's scale named."""

from __future__ import annotations

from decimal import Decimal

import pytest

from govshare.client.analyst_aggregate import stored_bound
from govshare.model.aggregate_plan import MAX_BOUND
from govshare.protocols.errors import MalformedInput


@pytest.mark.parametrize(
    ("bound", "places", "stored"),
    [
        ("5000", 2, 500_000),  # 5,000 yuan in fen
        ("105.5", 2, 10_550),
        ("0.01", 2, 1),
        ("12.50", 1, 125),  # a trailing zero is not a decimal place
        ("30000", 0, 30_000),  # a whole-unit column: unchanged
        ("1E+3", 0, 1_000),
        ("0.000000001", 9, 1),
    ],
)
def test_bound_converted_exactly(bound: str, places: int, stored: int) -> None:
    assert stored_bound("amount", Decimal(bound), places) == stored


def test_an_int_bound_is_in_the_declared_unit_too() -> None:
    assert stored_bound("amount", 300, 2) == 30_000


@pytest.mark.parametrize(
    ("bound", "places", "message"),
    [
        ("105.555", 2, "has 3 decimal places; SUM(amount) is kept to 2 decimal places"),
        ("0.5", 0, "has 1 decimal place; SUM(amount) is kept in whole units"),
        ("0.05", 1, "has 2 decimal places; SUM(amount) is kept to 1 decimal place "),
        # 31 significant digits: Decimal's 28-digit context must not round it to 1.00.
        ("1.000000000000000000000000000001", 2, "has 30 decimal places"),
        ("0", 2, "is not a positive number"),
        ("-1", 2, "is not a positive number"),
        ("NaN", 2, "is not a positive number"),
        ("10995116277.77", 2, "is over the largest SUM(amount) takes: 10995116277.76 (kept to"),
        ("1E+20", 0, f"is over the largest SUM(amount) takes: {MAX_BOUND} (kept in whole"),
    ],
)
def test_bound_refused(bound: str, places: int, message: str) -> None:
    with pytest.raises(MalformedInput, match=r"^the SUM bound ") as raised:
        stored_bound("amount", Decimal(bound), places)
    assert message in str(raised.value)
    assert raised.value.field == "sum_bound"
