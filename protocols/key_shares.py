"""k-of-n split of a node's 32-byte data key among named officers (issue 12, recovery).

Scheme: Shamir's secret sharing (Shamir 1979) over GF(2^128), as pycryptodome's
``Crypto.Protocol.SecretSharing.Shamir`` implements it: it shares 16-byte secrets, with share
indices 1..n. The 32-byte data key is split as **two independent 16-byte halves**, each with its
own random polynomial of degree k-1 at the same indices; an officer's share is the pair (32
bytes). Rejected alternative: share a 16-byte key-encryption key and keep the data key wrapped
under it. That caps the data key's strength at 128 bits under the standard suite (AES-256), adds
a wrapped-key file that recovery would also need (and that a lost home loses with it), and buys
only re-splitting without re-keying, which :func:`split_key` already allows (split the same key
again; old shares stay valid until the key itself is rotated).

Security: any k-1 shares of each half are uniformly distributed whatever the key
(information-theoretic), so k-1 officers learn nothing about it. Shamir itself has no integrity:
``Shamir.combine`` of too few or altered shares returns a wrong key without complaint. Three
checks make every failure loud:

- ``key_check_value`` (every share carries it): ``KDF(key, salt="govshare/key-share/check/v1",
  info="", 8 bytes)`` with the suite's HKDF. Recovery returns a key only if its check value
  matches; the check value is a one-way PRF output and reveals nothing usable about the key.
- ``tag`` (per share): ``KDF(key, salt="govshare/key-share/tag/v1", info=<the share's labelled
  fields>, 16 bytes)``, made at split time. After a key is recovered from a consistent subset,
  every share given is checked against it, so an altered extra share is named, not ignored.
- ``checksum`` (per encoded file): the suite hash of the encoded fields, truncated to 16 bytes.
  Not a MAC (anyone can recompute it): it catches damaged or hand-edited files before combining.

Randomness: the polynomials come from pycryptodome's own generator (``Crypto.Random``); its API
takes no randomness, so there is no explicit-randomness variant (STYLE.md §2). Splits are
therefore not reproducible; the tests check properties, not bytes.
"""

from __future__ import annotations

import binascii
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from Crypto.Protocol.SecretSharing import Shamir

from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import Suite, suite_by_name

__all__ = [
    "DATA_KEY_BYTES",
    "FORMAT",
    "MAX_OFFICERS",
    "KeyShare",
    "key_check_value",
    "recover_key",
    "split_key",
]

FORMAT: Final = "govshare-key-share/v1"
DATA_KEY_BYTES: Final = 32
_HALF: Final = 16  # pycryptodome's Shamir shares 16-byte secrets
# An operational bound, not Shamir's: recovery tries k-subsets of the shares given to name an
# altered one, C(16, 8) = 12,870 combinations at most; a department has a handful of officers.
MAX_OFFICERS: Final = 16
_CHECK_BYTES: Final = 8
_TAG_BYTES: Final = 16
_CHECKSUM_BYTES: Final = 16
_CHECK_SALT: Final = b"govshare/key-share/check/v1"
_TAG_SALT: Final = b"govshare/key-share/tag/v1"
# Officer and node names end up in file names: no separators, no spaces.
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_ENCODED_BYTES: Final = 4096


def key_check_value(suite: Suite, key: bytes) -> bytes:
    """8-byte check value of a data key (see the module docstring)."""
    return suite.kdf(key, salt=_CHECK_SALT, info=b"", length=_CHECK_BYTES)


@dataclass(frozen=True)
class KeyShare:
    """One officer's share of a node's data key, with the labels an officer reads."""

    node: str
    officer: str
    index: int  # 1..n, Shamir's x-coordinate
    k: int
    n: int
    suite: str
    key_check_value: bytes
    share: bytes  # share of the first half ‖ share of the second half, 32 bytes
    tag: bytes

    def _labels(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "node": self.node,
            "officer": self.officer,
            "index": self.index,
            "k": self.k,
            "n": self.n,
            "suite": self.suite,
            "key_check_value": self.key_check_value.hex(),
        }

    def _tagged_bytes(self) -> bytes:
        return _canonical({**self._labels(), "share": self.share.hex()})

    def encode(self) -> bytes:
        """Canonical JSON (sorted keys, one line) with a checksum over every other field."""
        body = {**self._labels(), "share": self.share.hex(), "tag": self.tag.hex()}
        checksum = suite_by_name(self.suite).hash(_canonical(body))[:_CHECKSUM_BYTES]
        return _canonical({**body, "checksum": checksum.hex()}) + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> KeyShare:
        """Parse and check an encoded share.

        Raises:
            MalformedInput: not a share file, a field out of range, or a checksum mismatch
                (a damaged or hand-edited file).
        """
        if len(data) > _MAX_ENCODED_BYTES:
            raise MalformedInput("a key share file is at most 4 KiB", field="share")
        try:
            fields = json.loads(data.decode("utf-8"))
            if not isinstance(fields, dict) or fields.get("format") != FORMAT:
                raise MalformedInput(f"not a {FORMAT} file", field="format")
            checksum = bytes.fromhex(fields.pop("checksum"))
            suite = suite_by_name(fields["suite"])
            if suite.hash(_canonical(fields))[:_CHECKSUM_BYTES] != checksum:
                raise MalformedInput(
                    "key share file is damaged or was edited (checksum mismatch)", field="checksum"
                )
            share = cls(
                node=_str(fields, "node"),
                officer=_str(fields, "officer"),
                index=_int(fields, "index"),
                k=_int(fields, "k"),
                n=_int(fields, "n"),
                suite=suite.name,
                key_check_value=bytes.fromhex(fields["key_check_value"]),
                share=bytes.fromhex(fields["share"]),
                tag=bytes.fromhex(fields["tag"]),
            )
            if set(fields) != {*share._labels(), "share", "tag"}:
                raise MalformedInput("key share file has unexpected fields", field="share")
        except (KeyError, TypeError, ValueError, UnicodeDecodeError, binascii.Error):
            raise MalformedInput("not a well-formed key share file", field="share") from None
        share.check()
        return share

    def check(self) -> None:
        """Field ranges and lengths (no key needed)."""
        _check_name(self.node, "node")
        _check_name(self.officer, "officer")
        _check_k_n(self.k, self.n)
        if not 1 <= self.index <= self.n:
            raise MalformedInput("share index is outside 1..n", field="index")
        lengths = (
            (self.key_check_value, _CHECK_BYTES, "key_check_value"),
            (self.share, 2 * _HALF, "share"),
            (self.tag, _TAG_BYTES, "tag"),
        )
        for value, size, name in lengths:
            if len(value) != size:
                raise MalformedInput(f"{name} must be {size} bytes", field=name)


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _str(fields: dict[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise MalformedInput(f"{name} must be a string", field=name)
    return value


def _int(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedInput(f"{name} must be an integer", field=name)
    return value


def _check_name(name: str, field: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise MalformedInput(
            f"{field} name must be 1-64 letters, digits, '.', '_' or '-'", field=field
        )


def _check_k_n(k: int, n: int) -> None:
    if not 2 <= k <= n <= MAX_OFFICERS:
        raise MalformedInput(
            f"need 2 <= k <= n <= {MAX_OFFICERS} (one officer alone must never hold the key)",
            field="k",
        )


def _tag(suite: Suite, key: bytes, share: KeyShare) -> bytes:
    return suite.kdf(key, salt=_TAG_SALT, info=share._tagged_bytes(), length=_TAG_BYTES)


def split_key(
    key: bytes, *, suite: Suite, node: str, officers: Sequence[str], k: int
) -> list[KeyShare]:
    """Split ``key`` so that any ``k`` of the named ``officers`` recover it (indices 1..n in
    the order given).

    Raises:
        MalformedInput: a key that is not 32 bytes, bad or repeated names, k or n out of range.
    """
    if len(key) != DATA_KEY_BYTES:
        raise MalformedInput("a data key is 32 bytes", field="key")
    _check_name(node, "node")
    for officer in officers:
        _check_name(officer, "officer")
    if len(set(officers)) != len(officers):
        raise MalformedInput("officer names must be distinct", field="officer")
    n = len(officers)
    _check_k_n(k, n)
    halves = [Shamir.split(k, n, key[i : i + _HALF]) for i in (0, _HALF)]
    check = key_check_value(suite, key)
    shares = []
    for officer, (index, first), (index_again, second) in zip(
        officers, halves[0], halves[1], strict=True
    ):
        if index != index_again:  # pycryptodome numbers shares 1..n in order
            raise RuntimeError("Shamir.split returned unaligned share indices")
        unsigned = KeyShare(node, officer, index, k, n, suite.name, check, first + second, b"")
        shares.append(
            KeyShare(
                node, officer, index, k, n, suite.name, check, first + second,
                _tag(suite, key, unsigned),
            )
        )  # fmt: skip
    return shares


def _combine(shares: Sequence[KeyShare]) -> bytes:
    return b"".join(
        Shamir.combine([(s.index, s.share[i : i + _HALF]) for s in shares]) for i in (0, _HALF)
    )


def recover_key(shares: Sequence[KeyShare]) -> bytes:
    """The data key from at least k shares of one split.

    Raises:
        MalformedInput: shares of different splits (node, k, n, suite or check value differ),
            repeated indices or officers, or fewer than k shares.
        VerificationFailed: no k of the shares reconstruct a key with the split's check value
            (altered shares, or a lie about k), or a share given does not belong to the key
            that the others reconstruct; the message names the officers whose shares failed.
    """
    if not shares:
        raise MalformedInput("no key shares given", field="share")
    for share in shares:
        share.check()
    first = shares[0]
    split_id = (first.node, first.k, first.n, first.suite, first.key_check_value)
    for share in shares:
        if (share.node, share.k, share.n, share.suite, share.key_check_value) != split_id:
            raise MalformedInput(
                "the shares come from different splits (node, k, n, suite or check value differ)",
                field="share",
            )
    if len({s.index for s in shares}) != len(shares):
        raise MalformedInput("two shares have the same index", field="index")
    if len({s.officer for s in shares}) != len(shares):
        raise MalformedInput("two shares name the same officer", field="officer")
    if len(shares) < first.k:
        raise MalformedInput(
            f"{first.k} of {first.n} shares are needed, {len(shares)} given", field="share"
        )
    suite = suite_by_name(first.suite)
    for subset in itertools.combinations(shares, first.k):
        key = _combine(subset)
        if key_check_value(suite, key) != first.key_check_value:
            continue
        altered = sorted(s.officer for s in shares if _tag(suite, key, s) != s.tag)
        if altered:
            raise VerificationFailed(
                "key shares of officer(s) " + ", ".join(altered) + " were altered"
            )
        return key
    raise VerificationFailed(
        "the shares do not reconstruct the key: key check value mismatch (altered shares?)"
    )
