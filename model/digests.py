"""Every digest two parties must agree on, in one place.

A node logs, for each query, the digest of the signed request (``request_digest``), of each
message it sent or received (``protocol.step`` ``digest``: a set of points, or points and
ciphertext items) and of each result it released (``result_digest``); the auditor reconciles
these fields across the nodes' logs (``govshare.model.reconcile``), so sender and receiver must
compute them identically. Also here: the tracker's digests of the items of an exact release, and
the fingerprint by which a plan names the analyst's public key. All are SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

# Bytes kept of each item's digest for the tracker check: 128 bits, no collisions in practice.
ITEM_DIGEST_BYTES = 16


# What the tracker keeps of an exact release's filtered set: its rows and, where the query
# matched on a join key, its distinct keys (a key may span several rows: one person, k rows).
ROW_ITEM = b"r"
KEY_ITEM = b"k"


def item_digest(dataset: str, kind: bytes, item: bytes) -> bytes:
    """One tracked item: its kind byte, then a truncated digest of (dataset, kind, item)."""
    body = b"govshare/exact-item/v1\n" + dataset.encode() + b"\n" + kind + b"\n" + item
    return kind + hashlib.sha256(body).digest()[: ITEM_DIGEST_BYTES - 1]


def digest(data: bytes) -> str:
    """Hex SHA-256 of one blob: a released result (``result_digest``), a public key sent."""
    return hashlib.sha256(data).hexdigest()


def request_digest(signed_request: bytes) -> str:
    """Hex SHA-256 of a signed request's encoding: how every node, the operator approving it
    and the auditor name the request (``request_digest``)."""
    return digest(signed_request)


def points_digest(points: Iterable[bytes]) -> str:
    """Hex SHA-256 over a set of points in the order sent (a PSI message, a released set)."""
    hasher = hashlib.sha256()
    for point in points:
        hasher.update(point)
    return hasher.hexdigest()


def message_digest(points: Sequence[bytes], items: Sequence[bytes]) -> str:
    """Hex SHA-256 of an aggregate message: its points' digest, then each item's SHA-256."""
    hasher = hashlib.sha256()
    hasher.update(bytes.fromhex(points_digest(points)))
    for item in items:
        hasher.update(hashlib.sha256(item).digest())
    return hasher.hexdigest()


def key_fingerprint(data: bytes) -> bytes:
    """SHA-256 of a public key's encoding: how a plan names the analyst's key."""
    return hashlib.sha256(data).digest()
