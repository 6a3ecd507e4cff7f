"""Every digest two parties must agree on, in one place, with the federation's suite's hash.

A node logs, for each query, the digest of the signed request (``request_digest``), of each
message it sent or received (``protocol.step`` ``digest``: a set of points, or points and
ciphertext items) and of each result it released (``result_digest``); the auditor reconciles
these fields across the nodes' logs (``govshare.model.reconcile``), so sender and receiver must
compute them identically. Also here: the tracker's digests of the items of an exact release, and
the fingerprint by which a plan names the analyst's public key.

The hash is the federation's suite's (:mod:`govshare.protocols.suite`): SHA-256 under
``standard``, SM3 under ``sm``; take a :class:`Digests` with :func:`digests_for`. Both are 32
bytes, so every field keeps its width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from govshare.protocols.suite import Suite

# Bytes kept of each item's digest for the tracker check: 128 bits, no collisions in practice.
ITEM_DIGEST_BYTES = 16


# What the tracker keeps of an exact release's filtered set: its rows and, where the query
# matched on a join key, its distinct keys (a key may span several rows: one person, k rows).
ROW_ITEM = b"r"
KEY_ITEM = b"k"


class Digests:
    """The digests of one suite (use :func:`digests_for`)."""

    __slots__ = ("suite",)

    def __init__(self, suite: Suite) -> None:
        self.suite = suite

    def item_digest(self, dataset: str, kind: bytes, item: bytes) -> bytes:
        """One tracked item: its kind byte, then a truncated digest of (dataset, kind, item)."""
        body = b"govshare/exact-item/v1\n" + dataset.encode() + b"\n" + kind + b"\n" + item
        return kind + self.suite.hash(body)[: ITEM_DIGEST_BYTES - 1]

    def digest(self, data: bytes) -> str:
        """Hex digest of one blob: a released result (``result_digest``), a public key sent."""
        return self.suite.hash(data).hex()

    def request_digest(self, signed_request: bytes) -> str:
        """Hex digest of a signed request's encoding: how every node, the operator approving
        it and the auditor name the request (``request_digest``)."""
        return self.digest(signed_request)

    def points_digest(self, points: Iterable[bytes]) -> str:
        """Hex digest over a set of points in the order sent (a PSI message, a released set)."""
        hasher = self.suite.new_hasher()
        for point in points:
            hasher.update(point)
        return hasher.digest().hex()

    def message_digest(self, points: Sequence[bytes], items: Sequence[bytes]) -> str:
        """Hex digest of an aggregate message: its points' digest, then each item's digest."""
        hasher = self.suite.new_hasher()
        hasher.update(bytes.fromhex(self.points_digest(points)))
        for item in items:
            hasher.update(self.suite.hash(item))
        return hasher.digest().hex()

    def key_fingerprint(self, data: bytes) -> bytes:
        """Digest of a public key's encoding: how a plan names the analyst's key."""
        return self.suite.hash(data)


_BY_SUITE: Final[dict[str, Digests]] = {}


def digests_for(suite: Suite) -> Digests:
    """The digests of ``suite`` (a federation's: ``roster.crypto``)."""
    found = _BY_SUITE.get(suite.name)
    if found is None:
        found = _BY_SUITE.setdefault(suite.name, Digests(suite))
    return found
