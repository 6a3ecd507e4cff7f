"""Masking rules: parsing, each rule's output, and refusals."""

from __future__ import annotations

import pytest

from govshare.node.masking import MaskRule, apply_mask, parse_mask
from govshare.protocols.errors import MalformedInput

KEY = b"k" * 16


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        ("keep_last:4", "11010119900307123X", "**************123X"),
        ("keep_first:6", "11010119900307123X", "110101************"),
        ("keep_last:1", "张三丰", "**丰"),
        ("keep_last:4", "abc", "***"),  # never reveals a short value whole
        ("year_only", "1990-03-07", "1990"),
        ("year_only", "19900307", "1990"),
        ("year_only", "1990/03/07", "1990"),
        ("redact", "anything", "***"),
    ],
)
def test_rules(rule: str, value: str, expected: str) -> None:
    assert apply_mask(rule, value) == expected


def test_hash_prefix_is_keyed_and_stable() -> None:
    a = apply_mask("hash_prefix", "110101199003071234", key=KEY)
    assert len(a) == 16 and int(a, 16) >= 0
    assert apply_mask("hash_prefix", "110101199003071234", key=KEY) == a
    assert apply_mask("hash_prefix", "110101199003071234", key=b"j" * 16) != a
    with pytest.raises(TypeError):
        apply_mask("hash_prefix", "x")
    with pytest.raises(TypeError):
        apply_mask("hash_prefix", "x", key=b"short")


def test_parse_gives_canonical_text() -> None:
    assert parse_mask(" keep_last:4 ") == MaskRule("keep_last", 4)
    assert str(parse_mask("redact")) == "redact"


@pytest.mark.parametrize(
    "text", ["shuffle", "keep_last", "keep_last:0", "keep_last:7", "redact:2", "KEEP_LAST:4", ""]
)
def test_bad_rules_are_malformed(text: str) -> None:
    with pytest.raises(MalformedInput):
        parse_mask(text)


def test_year_only_refuses_non_dates() -> None:
    with pytest.raises(MalformedInput, match="dates"):
        apply_mask("year_only", "March 1990")
