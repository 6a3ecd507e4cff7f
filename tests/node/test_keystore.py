"""The node's data key, its k-of-n split among officers, and the home's file modes."""

from __future__ import annotations

import itertools
import json
import os
import stat
from pathlib import Path

import pytest

from govshare.node.home_permissions import check_home_permissions
from govshare.node.keystore import (
    at_rest_key,
    create_data_key,
    data_key_path,
    read_data_key,
    restore_data_key,
)
from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound, VerificationFailed
from govshare.protocols.key_shares import KeyShare, key_check_value, recover_key, split_key
from govshare.protocols.suite import SM, STANDARD, Suite

OFFICERS = ("wang-li", "chen-jing", "zhao-min", "liu-yang", "sun-hui")
KEY = bytes(range(100, 132))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _reencode(original: KeyShare, **fields: object) -> KeyShare:
    """A share edited by hand, checksum recomputed: only the key-based checks can catch it."""
    body = json.loads(original.encode())
    body.pop("checksum")
    body.update(fields)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = STANDARD.hash(canonical)[:16].hex()
    return KeyShare.decode(json.dumps(body).encode())


# -- data key file ----------------------------------------------------------------------------


def test_data_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # a permissive umask must not loosen the key file
    try:
        path = create_data_key(tmp_path)
    finally:
        os.umask(previous)
    assert path == data_key_path(tmp_path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    key = read_data_key(tmp_path)
    assert len(key) == 32
    with pytest.raises(AlreadyExists):
        create_data_key(tmp_path)
    with pytest.raises(AlreadyExists):
        restore_data_key(tmp_path, bytes(32))
    assert read_data_key(tmp_path) == key
    other = tmp_path / "other"
    other.mkdir()
    create_data_key(other)
    assert read_data_key(other) != key  # random, not derived from anything


def test_data_key_missing_or_malformed(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read_data_key(tmp_path)
    path = data_key_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(bytes(31))
    with pytest.raises(MalformedInput):
        read_data_key(tmp_path)
    with pytest.raises(MalformedInput):
        restore_data_key(tmp_path / "x", bytes(16))


@pytest.mark.parametrize("suite", [STANDARD, SM], ids=lambda s: s.name)
def test_at_rest_key_per_suite_and_purpose(suite: Suite) -> None:
    rows = at_rest_key(suite, KEY, "dataset-rows")
    assert len(rows) == suite.cipher_key_size
    assert rows != at_rest_key(suite, KEY, "membership-results")
    assert rows != at_rest_key(suite, bytes(32), "dataset-rows")
    sealed = suite.seal(rows, b"110101199003077777")
    assert suite.open(rows, sealed) == b"110101199003077777"
    assert at_rest_key(STANDARD, KEY, "dataset-rows")[:16] != at_rest_key(SM, KEY, "dataset-rows")


# -- k-of-n split -----------------------------------------------------------------------------


@pytest.mark.parametrize("suite", [STANDARD, SM], ids=lambda s: s.name)
def test_any_k_of_n_recover_the_key(suite: Suite) -> None:
    shares = split_key(KEY, suite=suite, node="tax", officers=OFFICERS, k=3)
    assert [(s.officer, s.index, s.k, s.n) for s in shares] == [
        (o, i + 1, 3, 5) for i, o in enumerate(OFFICERS)
    ]
    assert {s.key_check_value for s in shares} == {key_check_value(suite, KEY)}
    for subset in itertools.combinations(shares, 3):
        assert recover_key(subset) == KEY
    assert recover_key(shares) == KEY
    assert recover_key(list(reversed(shares[1:]))) == KEY


def test_shares_round_trip_through_their_files() -> None:
    shares = split_key(KEY, suite=SM, node="tax", officers=OFFICERS[:3], k=2)
    encoded = [s.encode() for s in shares]
    labels = json.loads(encoded[1])
    assert (labels["officer"], labels["index"], labels["k"], labels["n"]) == ("chen-jing", 2, 2, 3)
    assert labels["key_check_value"] == key_check_value(SM, KEY).hex()
    assert labels["suite"] == "sm" and labels["node"] == "tax"
    assert [KeyShare.decode(e) for e in encoded] == shares
    assert recover_key([KeyShare.decode(e) for e in encoded[1:]]) == KEY


def test_k_minus_one_shares_fail_loudly() -> None:
    shares = split_key(KEY, suite=STANDARD, node="tax", officers=OFFICERS, k=3)
    with pytest.raises(MalformedInput, match="3 of 5 shares are needed, 2 given"):
        recover_key(shares[:2])
    # Shamir alone would hand back a wrong key for two shares: lying about k in the files
    # (checksums recomputed) meets the key check value instead of a silent wrong key.
    lying = [_reencode(s, k=2) for s in shares[:2]]
    with pytest.raises(VerificationFailed, match="key check value mismatch"):
        recover_key(lying)


def test_a_tampered_share_is_refused() -> None:
    shares = split_key(KEY, suite=STANDARD, node="tax", officers=OFFICERS, k=3)
    share = shares[0]
    flipped = bytes([share.share[0] ^ 1]) + share.share[1:]
    # Edited without fixing the checksum: refused as damaged before anything is combined.
    body = json.loads(share.encode())
    body["share"] = flipped.hex()
    with pytest.raises(MalformedInput, match="checksum"):
        KeyShare.decode(json.dumps(body).encode())
    # Edited with the checksum recomputed, exactly k shares: no key.
    tampered = _reencode(share, share=flipped.hex())
    with pytest.raises(VerificationFailed, match="key check value mismatch"):
        recover_key([tampered, shares[1], shares[2]])
    # More than k shares: the good ones reconstruct the key and the altered one is named.
    with pytest.raises(VerificationFailed, match="wang-li"):
        recover_key([tampered, *shares[1:]])
    # A relabelled share (another officer's name on it) is caught by its tag.
    relabelled = _reencode(shares[3], officer="mallory")
    with pytest.raises(VerificationFailed, match="mallory"):
        recover_key([*shares[:3], relabelled])


def test_shares_of_different_splits_or_repeats_refused() -> None:
    one = split_key(KEY, suite=STANDARD, node="tax", officers=OFFICERS, k=3)
    two = split_key(KEY, suite=STANDARD, node="tax", officers=OFFICERS, k=3)
    # Same key, same labels, fresh polynomials: mixing splits gives no key.
    with pytest.raises(VerificationFailed):
        recover_key([one[0], one[1], two[2]])
    other_key = split_key(bytes(32), suite=STANDARD, node="tax", officers=OFFICERS, k=3)
    with pytest.raises(MalformedInput, match="different splits"):
        recover_key([one[0], one[1], other_key[2]])
    with pytest.raises(MalformedInput, match="same index"):
        recover_key([one[0], one[0], one[1]])
    with pytest.raises(MalformedInput):
        recover_key([])


@pytest.mark.parametrize(
    ("officers", "k"),
    [
        (OFFICERS, 1),
        (OFFICERS, 6),
        (("a", "a", "b"), 2),
        (("a/b", "c"), 2),
        (tuple(f"o{i}" for i in range(17)), 3),
    ],
    ids=["k_one", "k_above_n", "repeated_officer", "separator_in_name", "too_many_officers"],
)
def test_split_arguments_refused(officers: tuple[str, ...], k: int) -> None:
    with pytest.raises(MalformedInput):
        split_key(KEY, suite=STANDARD, node="tax", officers=officers, k=k)


def test_split_refuses_a_short_key() -> None:
    with pytest.raises(MalformedInput):
        split_key(KEY[:16], suite=STANDARD, node="tax", officers=OFFICERS, k=2)


@pytest.mark.parametrize(
    "data",
    [b"", b"{}", b"[1]", b"\xff", b'{"format":"govshare-key-share/v1"}', b"x" * 5000],
    ids=["empty", "empty_object", "list", "not_utf8", "fields_missing", "too_long"],
)
def test_malformed_share_files(data: bytes) -> None:
    with pytest.raises(MalformedInput):
        KeyShare.decode(data)


def test_share_with_index_outside_range_refused() -> None:
    share = split_key(KEY, suite=STANDARD, node="tax", officers=OFFICERS[:3], k=2)[0]
    with pytest.raises(MalformedInput, match="index"):
        _reencode(share, index=4)


# -- home permissions -------------------------------------------------------------------------


def _private_home(root: Path) -> Path:
    home = root / "home"
    (home / "keys").mkdir(parents=True)
    (home / "audit").mkdir()
    for path in (home, home / "keys", home / "audit"):
        path.chmod(0o700)
    for name in ("node.db", "keys/signing.key", "audit/log.db"):
        (home / name).write_bytes(b"x")
        (home / name).chmod(0o600)
    return home


def test_private_home_passes(tmp_path: Path) -> None:
    assert check_home_permissions(_private_home(tmp_path)) == []


def test_permissions_check_finds_each_offence(tmp_path: Path) -> None:
    home = _private_home(tmp_path)
    (home / "node.db").chmod(0o644)
    (home / "audit").chmod(0o755)
    (home / "keys" / "signing.key").chmod(0o400)
    (home / "keys" / "elsewhere").symlink_to(tmp_path)
    found = check_home_permissions(home)
    assert [(o.path.relative_to(home), o.mode, o.expected) for o in found] == [
        (Path("audit"), 0o755, 0o700),
        (Path("node.db"), 0o644, 0o600),
        (Path("keys/elsewhere"), _mode(home / "keys" / "elsewhere"), None),
        (Path("keys/signing.key"), 0o400, 0o600),
    ]
    assert found[1].describe() == f"{home / 'node.db'}: mode 0644, expected 0600"
    assert "symbolic link" in found[2].describe()


def test_permissions_check_covers_the_home_itself(tmp_path: Path) -> None:
    home = _private_home(tmp_path)
    home.chmod(0o750)
    assert [(o.path, o.mode) for o in check_home_permissions(home)] == [(home, 0o750)]
    with pytest.raises(NotFound):
        check_home_permissions(tmp_path / "missing")


def test_permissions_check_accepts_a_keystore_it_made(tmp_path: Path) -> None:
    home = _private_home(tmp_path)
    create_data_key(home)
    assert check_home_permissions(home) == []
