"""Join-key normalisers: registry, resident IDs (via resident_id), text."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.node.data import keys, resident_id
from govshare.protocols.errors import MalformedInput

VALID_ID = resident_id.make("110101", date(1990, 3, 7), 123)  # ends in a digit or X


def test_registry_lists_the_builtin_types() -> None:
    assert {"resident_id", "text"} <= set(keys.key_types())


def test_unknown_key_type_is_malformed_and_lists_known_types() -> None:
    with pytest.raises(MalformedInput, match="resident_id") as info:
        keys.normaliser("passport")
    assert info.value.field == "key_type"


def test_register_refuses_duplicate_and_bad_names() -> None:
    with pytest.raises(TypeError):
        keys.register("text", str)
    with pytest.raises(TypeError):
        keys.register("Bad Name", str)


def test_resident_id_uppercases_x_and_strips() -> None:
    first17 = "11010519491231002"
    with_x = first17 + resident_id.check_digit(first17)
    assert with_x.endswith("X")
    assert keys.normalise("resident_id", f"  {with_x.lower()} ") == with_x


def test_resident_id_accepts_valid_number_unchanged() -> None:
    assert keys.normaliser("resident_id")(VALID_ID) == VALID_ID


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (VALID_ID[:17] + ("0" if VALID_ID[17] != "0" else "1"), "check character"),
        ("110101199002300012", "calendar date"),  # 30 February
        ("110101084901010012", "birth year"),
        (VALID_ID[:15], "15-digit"),
        ("11010119900307A23X", "ASCII digit"),
        ("", "18 characters"),
    ],
)
def test_resident_id_refusals_name_the_rule(raw: str, reason: str) -> None:
    with pytest.raises(MalformedInput, match=reason) as info:
        keys.normalise("resident_id", raw)
    # The number itself never appears in the message: it is personal data.
    if raw:
        assert raw not in str(info.value)


def test_text_nfkc_casefold_strip() -> None:
    # Full-width letters and digits, German sharp s, surrounding blanks.
    full_width = "\uff21\uff22\uff23\uff11\uff12\uff13"  # ABC123 in full width
    assert keys.normalise("text", f"  {full_width} ") == "abc123"
    assert keys.normalise("text", "STRASSE") == keys.normalise("text", "straße")
    assert keys.normalise("text", "张三") == "张三"


@pytest.mark.parametrize("raw", ["", "   ", "a\x00b", "x" * 300])
def test_text_refuses_empty_control_and_long(raw: str) -> None:
    with pytest.raises(MalformedInput):
        keys.normalise("text", raw)


@given(st.text(min_size=1, max_size=40))
def test_text_normalisation_is_idempotent(raw: str) -> None:
    try:
        once = keys.normalise("text", raw)
    except MalformedInput:
        return
    assert keys.normalise("text", once) == once


@given(
    st.dates(min_value=date(1900, 1, 1), max_value=date(2024, 12, 31)),
    st.integers(min_value=0, max_value=999),
)
def test_resident_id_round_trips_any_made_number(birth: date, sequence: int) -> None:
    number = resident_id.make("440305", birth, sequence)
    assert keys.normalise("resident_id", number.lower()) == number
