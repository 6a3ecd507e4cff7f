"""Masking rules: parsing, each rule's output, and refusals; the node's hash_prefix keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from govshare.node.data.mask_key import (
    INFO_PREFIX,
    KEY_BYTES,
    MASK_SECRET,
    MaskSecret,
    derive_mask_key,
)
from govshare.node.data.masking import MaskRule, apply_mask, needs_key, parse_mask
from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound
from govshare.protocols.suite import STANDARD

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
    assert apply_mask(rule, value, suite=STANDARD) == expected


def test_hash_prefix_is_keyed_and_stable() -> None:
    a = apply_mask("hash_prefix", "110101199003071234", key=KEY, suite=STANDARD)
    assert len(a) == 16 and int(a, 16) >= 0
    assert apply_mask("hash_prefix", "110101199003071234", key=KEY, suite=STANDARD) == a
    assert apply_mask("hash_prefix", "110101199003071234", key=b"j" * 16, suite=STANDARD) != a
    with pytest.raises(TypeError):
        apply_mask("hash_prefix", "x", suite=STANDARD)
    with pytest.raises(TypeError):
        apply_mask("hash_prefix", "x", key=b"short", suite=STANDARD)


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
        apply_mask("year_only", "March 1990", suite=STANDARD)


# --- the node's masking secret and its per-column hash_prefix keys --------------------------

SECRET = bytes(range(32))


def test_key_is_deterministic_per_secret_dataset_and_column() -> None:
    key = derive_mask_key(SECRET, "residents", "id_number", STANDARD)
    assert len(key) == KEY_BYTES == 32
    assert derive_mask_key(SECRET, "residents", "id_number", STANDARD) == key
    assert MaskSecret(SECRET).key("residents", "id_number", STANDARD) == key
    others = {
        derive_mask_key(SECRET, "residents", "spouse_id", STANDARD),
        derive_mask_key(SECRET, "registry", "id_number", STANDARD),
        derive_mask_key(bytes(32), "residents", "id_number", STANDARD),
        # Length prefixes keep the split between dataset and column in the derivation.
        derive_mask_key(SECRET, "residentsi", "d_number", STANDARD),
    }
    assert key not in others and len(others) == 4
    released = apply_mask("hash_prefix", "110101199003071234", key=key, suite=STANDARD)
    assert released != apply_mask(
        "hash_prefix",
        "110101199003071234",
        key=derive_mask_key(SECRET, "residents", "spouse_id", STANDARD),
        suite=STANDARD,
    )


def test_key_is_hkdf_sha256_over_the_named_info() -> None:
    """Pins the derivation (a changed one would silently change every released pseudonym)."""
    info = INFO_PREFIX + b"\x00\x09residents" + b"\x00\x09id_number"
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(SECRET)
    assert derive_mask_key(SECRET, "residents", "id_number", STANDARD) == expected
    assert b"govshare" in INFO_PREFIX


@pytest.mark.parametrize("secret", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_key_needs_a_32_byte_secret(secret: object) -> None:
    with pytest.raises(TypeError):
        derive_mask_key(secret, "residents", "id_number", STANDARD)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MaskSecret(secret)  # type: ignore[arg-type]


def test_secret_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = MaskSecret.load_or_create(tmp_path)
    path = tmp_path / MASK_SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert MaskSecret.load_or_create(tmp_path).key("d", "c", STANDARD) == first.key(
        "d", "c", STANDARD
    )
    assert MaskSecret.load(path).key("d", "c", STANDARD) == first.key("d", "c", STANDARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MASK_SECRET]  # no temporary left
    assert SECRET.hex() not in repr(first) and "hidden" in repr(first)
    with pytest.raises(AlreadyExists):
        MaskSecret.create(path, secret=SECRET)
    assert MaskSecret.load(path).key("d", "c", STANDARD) == first.key(
        "d", "c", STANDARD
    )  # never overwritten


def test_secrets_of_two_homes_differ(tmp_path: Path) -> None:
    for home in ("a", "b"):
        (tmp_path / home).mkdir()
    a, b = (MaskSecret.load_or_create(tmp_path / home) for home in ("a", "b"))
    assert a.key("d", "c", STANDARD) != b.key("d", "c", STANDARD)


def test_create_with_an_explicit_secret(tmp_path: Path) -> None:
    made = MaskSecret.create(tmp_path / MASK_SECRET, secret=SECRET)
    assert (tmp_path / MASK_SECRET).read_bytes() == SECRET
    assert made.key("residents", "id_number", STANDARD) == derive_mask_key(
        SECRET, "residents", "id_number", STANDARD
    )


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_a_secret_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / MASK_SECRET
    path.write_bytes(b"s" * size)
    with pytest.raises(MalformedInput, match=f"holds {size} bytes, not 32") as caught:
        MaskSecret.load(path)
    assert caught.value.field == MASK_SECRET
    with pytest.raises(MalformedInput, match="not 32"):
        MaskSecret.load_or_create(tmp_path)  # a damaged secret is never silently replaced
    assert path.read_bytes() == b"s" * size


def test_a_missing_secret_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        MaskSecret.load(tmp_path / MASK_SECRET)


def test_only_hash_prefix_needs_a_key() -> None:
    assert needs_key("hash_prefix") and needs_key(MaskRule("hash_prefix"))
    assert not any(needs_key(r) for r in ("keep_last:4", "keep_first:2", "year_only", "redact"))
    with pytest.raises(MalformedInput):
        needs_key("shuffle")
