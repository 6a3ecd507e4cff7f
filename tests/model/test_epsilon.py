"""The ε codec (govshare.model.epsilon): exact decimals, one canonical text, refusals."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.model.epsilon import format_epsilon, parse_epsilon
from govshare.protocols.errors import MalformedInput


@pytest.mark.parametrize(
    ("text", "value", "canonical"),
    [
        ("1.0", Fraction(1), "1"),
        ("0.1", Fraction(1, 10), "0.1"),
        ("0.25", Fraction(1, 4), "0.25"),
        (" 2.50 ", Fraction(5, 2), "2.5"),
        ("0", Fraction(0), "0"),
        ("0.000001", Fraction(1, 1_000_000), "0.000001"),
    ],
)
def test_epsilon_is_exact(text: str, value: Fraction, canonical: str) -> None:
    assert parse_epsilon(text) == value
    assert format_epsilon(value) == canonical


@pytest.mark.parametrize("text", ["-1", "1e-3", "nan", "inf", "0x1", "1/3", "", ".5", "1."])
def test_epsilon_refuses_non_decimals(text: str) -> None:
    with pytest.raises(MalformedInput):
        parse_epsilon(text)


def test_epsilon_refuses_non_terminating_fraction() -> None:
    with pytest.raises(MalformedInput, match="finite decimal"):
        format_epsilon(Fraction(1, 3))


@given(st.integers(min_value=0, max_value=10**6 - 1), st.integers(min_value=0, max_value=12))
def test_epsilon_text_round_trips(units: int, scale: int) -> None:
    value = Fraction(units, 10**scale)
    assert parse_epsilon(format_epsilon(value)) == value


def test_epsilon_beyond_the_text_form_is_refused_both_ways() -> None:
    with pytest.raises(MalformedInput, match="below"):
        format_epsilon(Fraction(10**6))
    with pytest.raises(MalformedInput):
        parse_epsilon("1000000")


def test_ten_tenths_make_exactly_one() -> None:
    spent = sum((parse_epsilon("0.1") for _ in range(10)), Fraction(0))
    assert spent == parse_epsilon("1.0")  # float arithmetic would give 0.9999999999999999
