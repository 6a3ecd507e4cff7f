"""GB 11643-1999 resident identity numbers: check character, normalisation, generation."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.node.data import resident_id
from govshare.node.data.resident_id import check_digit, is_valid, make, normalise
from govshare.protocols.errors import MalformedInput

# The example printed in GB 11643-1999: region 110105, born 1949-12-31, sequence 002.
STANDARD_EXAMPLE = "11010519491231002X"


def _reference_check(first17: str) -> str:
    # Independent formulation: weights as 2^(18-i) mod 11, check value (12 - S mod 11) mod 11.
    s = sum(pow(2, 18 - i, 11) * int(d) for i, d in enumerate(first17, start=1))
    value = (12 - s % 11) % 11
    return "X" if value == 10 else str(value)


def test_standard_example_is_valid() -> None:
    assert check_digit(STANDARD_EXAMPLE[:17]) == "X"
    assert normalise(STANDARD_EXAMPLE) == STANDARD_EXAMPLE
    assert is_valid(STANDARD_EXAMPLE)


def test_weights_are_powers_of_two_mod_11() -> None:
    assert resident_id.WEIGHTS == tuple(pow(2, 18 - i, 11) for i in range(1, 18))


def test_hand_computed_checks() -> None:
    # 1101011990030700d: the first 16 digits times their weights sum to
    # 7+9+0+5+0+4+2+9+54+0+0+27+0+35+0+0 = 152, and the 17th weighs 2; the check character
    # is "10X98765432"[S mod 11].
    assert check_digit("11010119900307005") == "4"  # S = 162, 162 mod 11 = 8 -> '4'
    assert check_digit("11010119900307006") == "2"  # S = 164, mod 11 = 10 -> '2'
    assert check_digit("11010119900307007") == "0"  # S = 166, mod 11 = 1 -> '0'
    assert normalise("110101199003070070") == "110101199003070070"
    assert not is_valid("110101199003070071")


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_check_digit_matches_reference(first17: str) -> None:
    assert check_digit(first17) == _reference_check(first17)


def test_normalise_strips_and_upper_cases() -> None:
    assert normalise("  11010519491231002x\t") == STANDARD_EXAMPLE
    assert normalise("\n11010519491231002X ") == STANDARD_EXAMPLE


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "18 characters, got 0"),
        ("11010519491231002", "18 characters, got 17"),
        ("11010519491231002X0", "18 characters, got 19"),
        ("110105491231002", "15-digit first-generation"),
        ("1101051949123100 X", "character 17 must be an ASCII digit"),
        ("A1010519491231002X", "character 1 must be an ASCII digit"),
        ("11010519491231002Y", "character 18 must be an ASCII digit or X"),
        # Fullwidth and Arabic-Indic digits pass str.isdigit() but are not ASCII digits.
        ("１1010519491231002X", "character 1 must be an ASCII digit"),  # noqa: RUF001
        ("11010519491231002\u0663", "character 18"),
        ("110105194912310021", "check character is wrong"),
        ("110105194902300020", "not a calendar date"),  # 30 February
        ("110105194913010020", "not a calendar date"),  # month 13
        ("110105194912000020", "not a calendar date"),  # day 0
        ("110105190002290020", "not a calendar date"),  # 1900 was not a leap year
        ("110105084912310020", "birth year is before 1850"),
    ],
)
def test_normalise_refuses(raw: str, reason: str) -> None:
    with pytest.raises(MalformedInput, match=reason) as info:
        normalise(raw)
    assert info.value.field == "resident_id"
    assert not is_valid(raw)


def test_error_messages_do_not_quote_the_number() -> None:
    bad = "110105194912310021"
    with pytest.raises(MalformedInput) as info:
        normalise(bad)
    assert bad not in str(info.value)
    assert bad[:14] not in str(info.value)


def test_leap_day_accepted() -> None:
    first17 = "11010520000229003"
    number = first17 + _reference_check(first17)
    assert normalise(number) == number


def test_lower_case_x_with_wrong_check_is_refused() -> None:
    # Upper-casing must not turn an invalid number into a valid one.
    with pytest.raises(MalformedInput, match="check character"):
        normalise("110105194912310020")


def test_normalise_type_error() -> None:
    with pytest.raises(TypeError):
        normalise(110105194912310020)  # type: ignore[arg-type]


def test_check_digit_refuses_bad_input() -> None:
    for bad in ("", "1101051949123100", "110105194912310020", "1101051949123100A"):
        with pytest.raises(MalformedInput):
            check_digit(bad)


def test_make_standard_example() -> None:
    assert make("110105", date(1949, 12, 31), 2) == STANDARD_EXAMPLE


@given(
    region=st.text(alphabet="0123456789", min_size=6, max_size=6),
    birth=st.dates(min_value=date(1850, 1, 1), max_value=date(2099, 12, 31)),
    sequence=st.integers(min_value=0, max_value=999),
)
def test_make_round_trips(region: str, birth: date, sequence: int) -> None:
    number = make(region, birth, sequence)
    assert normalise(number) == number
    assert number[:6] == region
    assert number[6:14] == birth.strftime("%Y%m%d")
    assert int(number[14:17]) == sequence


@given(
    birth=st.dates(min_value=date(1850, 1, 1), max_value=date(2099, 12, 31)),
    sequence=st.integers(min_value=0, max_value=999),
    position=st.integers(min_value=0, max_value=16),
    delta=st.integers(min_value=1, max_value=9),
)
def test_single_digit_error_is_always_detected(
    birth: date, sequence: int, position: int, delta: int
) -> None:
    # MOD 11-2 detects every single-digit substitution.
    number = make("110108", birth, sequence)
    digit = (int(number[position]) + delta) % 10
    typo = number[:position] + str(digit) + number[position + 1 :]
    assert not is_valid(typo)


@pytest.mark.parametrize(
    ("region", "birth", "sequence"),
    [
        ("11010", date(1990, 1, 1), 1),
        ("1101011", date(1990, 1, 1), 1),
        ("11010a", date(1990, 1, 1), 1),
        ("110101", date(1849, 12, 31), 1),
        ("110101", date(1990, 1, 1), -1),
        ("110101", date(1990, 1, 1), 1000),
    ],
)
def test_make_refuses_out_of_range(region: str, birth: date, sequence: int) -> None:
    with pytest.raises(MalformedInput):
        make(region, birth, sequence)


def test_make_type_errors() -> None:
    with pytest.raises(TypeError):
        make("110101", "1990-01-01", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make("110101", date(1990, 1, 1), True)
