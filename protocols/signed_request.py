"""Signed analyst requests: canonical encoding, nonce, expiry, Ed25519 signature.

An analyst signs every joint query. Each node that takes part verifies the signature against
the analyst's key in the signed roster, refuses an expired request or a nonce it has seen
before (the replay store lives in the node), and keeps the signed bytes in its audit log, so
the analyst cannot later deny having asked (non-repudiation).

Encoding (all integers big-endian, strings UTF-8 with a 2-byte length, blobs with 4-byte):

    "govshare/request/v1\\n" | analyst | query_id (16 bytes) | nonce (16 bytes)
    | issued_at (8, unix s) | expires_at (8, unix s) | kind | body (canonical JSON)
    | signature (64 bytes, Ed25519 over everything before it)

The domain tag keeps a request signature from ever verifying as a grant or checkpoint
signature made with the same key.

What it proves: the holder of the analyst's signing key asked exactly this query, at most once,
before ``expires_at``. It does not hide the query from the nodes, which must read it to decide.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import SigningKey, VerifyKey

DOMAIN = b"govshare/request/v1\n"
QUERY_ID_BYTES = 16
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
# Longest validity a node accepts: long enough for a query waiting on operator approval.
MAX_LIFETIME_SECONDS = 24 * 3600
DEFAULT_LIFETIME_SECONDS = 3600
# Clock skew tolerated between the analyst and a node.
CLOCK_SKEW_SECONDS = 300
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class SignedRequest:
    analyst: str
    query_id: bytes
    nonce: bytes
    issued_at: int
    expires_at: int
    kind: str
    body: bytes
    signature: bytes

    @property
    def query_id_hex(self) -> str:
        return self.query_id.hex()

    def body_json(self) -> Any:
        return json.loads(self.body)

    def signed_bytes(self) -> bytes:
        return _signed_part(
            self.analyst,
            self.query_id,
            self.nonce,
            self.issued_at,
            self.expires_at,
            self.kind,
            self.body,
        )

    def encode(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> SignedRequest:
        """Strictly parse an encoded request (no trailing bytes)."""
        reader = _Reader(data)
        if reader.take(len(DOMAIN)) != DOMAIN:
            raise MalformedInput("not a govshare request (domain tag)", field="request")
        analyst = reader.text(2)
        query_id = reader.take(QUERY_ID_BYTES)
        nonce = reader.take(NONCE_BYTES)
        issued_at = reader.u64()
        expires_at = reader.u64()
        kind = reader.text(2)
        body = reader.blob(4, MAX_BODY_BYTES)
        signature = reader.take(SIGNATURE_BYTES)
        reader.end()
        try:
            json.loads(body)
        except ValueError:
            raise MalformedInput("request body is not JSON", field="body") from None
        return cls(analyst, query_id, nonce, issued_at, expires_at, kind, body, signature)


def _signed_part(
    analyst: str,
    query_id: bytes,
    nonce: bytes,
    issued_at: int,
    expires_at: int,
    kind: str,
    body: bytes,
) -> bytes:
    name = analyst.encode()
    kind_bytes = kind.encode()
    return b"".join(
        (
            DOMAIN,
            struct.pack(">H", len(name)),
            name,
            query_id,
            nonce,
            struct.pack(">QQ", issued_at, expires_at),
            struct.pack(">H", len(kind_bytes)),
            kind_bytes,
            struct.pack(">I", len(body)),
            body,
        )
    )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            raise MalformedInput("request is truncated", field="request")
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def text(self, width: int) -> str:
        (length,) = struct.unpack(">H" if width == 2 else ">I", self.take(width))
        try:
            return self.take(length).decode()
        except UnicodeDecodeError:
            raise MalformedInput("request text is not UTF-8", field="request") from None

    def blob(self, width: int, limit: int) -> bytes:
        (length,) = struct.unpack(">I", self.take(width))
        if length > limit:
            raise MalformedInput("request body is too large", field="body")
        return self.take(length)

    def end(self) -> None:
        if self.offset != len(self.data):
            raise MalformedInput("trailing bytes after request", field="request")


def sign_request(
    key: SigningKey,
    *,
    analyst: str,
    kind: str,
    body: Any,
    now: int,
    lifetime: int = DEFAULT_LIFETIME_SECONDS,
    query_id: bytes | None = None,
    nonce: bytes | None = None,
) -> SignedRequest:
    """Sign a query description; ``query_id`` and ``nonce`` default to fresh random bytes."""
    if not 0 < lifetime <= MAX_LIFETIME_SECONDS:
        raise TypeError(f"lifetime must be in (0, {MAX_LIFETIME_SECONDS}] seconds")
    query_id = os.urandom(QUERY_ID_BYTES) if query_id is None else query_id
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(query_id) != QUERY_ID_BYTES or len(nonce) != NONCE_BYTES:
        raise TypeError("query_id and nonce must be 16 bytes")
    payload = canonical_json(body)
    signed = _signed_part(analyst, query_id, nonce, now, now + lifetime, kind, payload)
    return SignedRequest(
        analyst, query_id, nonce, now, now + lifetime, kind, payload, key.sign(signed)
    )


def verify_request(request: SignedRequest, public_key: VerifyKey, *, now: int) -> None:
    """Check the signature and the validity window.

    Raises:
        VerificationFailed: the signature is not the analyst's over these bytes.
        MalformedInput: expired, not yet valid, or valid for longer than a node accepts.
    """
    try:
        public_key.verify(request.signature, request.signed_bytes())
    except VerificationFailed:
        raise VerificationFailed("request signature does not verify") from None
    if request.expires_at - request.issued_at > MAX_LIFETIME_SECONDS:
        raise MalformedInput("request lifetime exceeds 24 hours", field="expires_at")
    if request.issued_at > now + CLOCK_SKEW_SECONDS:
        raise MalformedInput("request is issued in the future", field="issued_at")
    if now >= request.expires_at:
        raise MalformedInput("request has expired", field="expires_at")
