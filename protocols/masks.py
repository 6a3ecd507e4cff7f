"""Pairwise additive masks for the horizontal aggregate (DESIGN.md protocol 3).

The construction is the pairwise masking of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), without its dropout recovery: a query either
completes with every node or is aborted.

Per query, every node draws an ephemeral X25519 key (RFC 7748) and publishes its public key,
signed with its long-term key of the federation's suite (Ed25519, or SM2 under ``sm``) over a
canonical statement binding the query id and the node's name (:func:`sign_ephemeral` /
:func:`verify_ephemeral`; the caller takes the public key from the federation roster). For each
pair of nodes ``a < b`` (names ordered by their UTF-8 bytes) both compute the X25519 shared
secret, derive a key with HKDF over the suite's hash (RFC 5869; HKDF-SHA256 or HKDF-SM3; info =
domain tag, query id, ``a``, ``b``), and expand it with the suite's cipher in CTR mode (AES-256
or SM4; zero initial counter block: each key is used for exactly one stream) into a vector of
unsigned 64-bit words ``m_ab``. X25519 stays in both suites (:mod:`govshare.protocols.suite`).
Node ``i`` adds ``+m_ij`` for every peer ``j > i`` and ``-m_ji`` for every peer ``j < i``, all
modulo 2^64, so the masks cancel in the sum over all nodes.

Who learns what (semi-honest; the signatures also stop a man-in-the-middle from
substituting ephemeral keys):

- A party that sees one node's masked vector, but not every other node's masking key towards
  that node, learns nothing about the vector: it is one-time-padded by a pseudorandom mask
  (X25519 CDH/gap-DH in the random-oracle view of HKDF, AES or SM4 as a PRF).
- The sum of all masked vectors equals the sum of the plain vectors modulo 2^64: whoever sees
  all masked vectors learns that sum and nothing more. In govshare the masked vectors are also
  encrypted under the analyst's key, so the aggregator sees neither.
- Coalitions: nodes that pool their pairwise keys can unmask a node only if they hold *all* of
  that node's pairwise keys, i.e. all other nodes collude.
- Values are integers modulo 2^64; signed values use two's complement (:func:`to_u64`,
  :func:`from_u64_signed`), so a true sum must lie in ``[-2^63, 2^63)`` to be recovered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import SigningKey, Suite, VerifyKey

__all__ = [
    "MASK_MODULUS",
    "MAX_MASK_LENGTH",
    "add_vectors",
    "ephemeral_statement",
    "from_u64_signed",
    "generate_ephemeral",
    "mask_vector",
    "node_mask",
    "pairwise_key",
    "pairwise_stream",
    "public_bytes",
    "sign_ephemeral",
    "to_u64",
    "verify_ephemeral",
]

MASK_MODULUS: Final = 1 << 64
# 16 Mi words = 128 MiB of keystream; far beyond any histogram govshare releases.
MAX_MASK_LENGTH: Final = 1 << 24
_MAX_FIELD_BYTES: Final = 1 << 16  # query ids and node names are short identifiers
_X25519_PUBLIC_BYTES: Final = 32
_SIGN_DOMAIN: Final = b"govshare/masks/ephemeral-key/v1"
_HKDF_DOMAIN: Final = b"govshare/masks/pairwise/v1"
_ZERO_COUNTER_BLOCK: Final = bytes(16)


def _length_prefixed(field: str, value: bytes) -> bytes:
    if len(value) > _MAX_FIELD_BYTES:
        raise MalformedInput(f"{field} is longer than {_MAX_FIELD_BYTES} bytes", field=field)
    return struct.pack(">I", len(value)) + value


def _check_query_id(query_id: bytes) -> bytes:
    if not isinstance(query_id, bytes):
        raise TypeError("query_id must be bytes")
    if not query_id:
        raise MalformedInput("query id is empty", field="query_id")
    return query_id


def _name_bytes(name: str) -> bytes:
    if not isinstance(name, str):
        raise TypeError("node names must be str")
    if not name:
        raise MalformedInput("node name is empty", field="node")
    return name.encode("utf-8")


def _load_public(public_key: bytes) -> X25519PublicKey:
    if not isinstance(public_key, bytes):
        raise TypeError("public keys must be bytes")
    if len(public_key) != _X25519_PUBLIC_BYTES:
        raise MalformedInput("an X25519 public key is 32 bytes", field="public_key")
    return X25519PublicKey.from_public_bytes(public_key)


def generate_ephemeral() -> X25519PrivateKey:
    """A fresh X25519 key for one query (OS randomness)."""
    return X25519PrivateKey.generate()


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key to publish (RFC 7748 u-coordinate)."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ephemeral_statement(*, query_id: bytes, node: str, public_key: bytes) -> bytes:
    """Canonical bytes that a node signs for its ephemeral key.

    ``domain | u32 len | query_id | u32 len | node (UTF-8) | public key (32 bytes)``.
    """
    _check_query_id(query_id)
    _load_public(public_key)
    return (
        _length_prefixed("domain", _SIGN_DOMAIN)
        + _length_prefixed("query_id", query_id)
        + _length_prefixed("node", _name_bytes(node))
        + public_key
    )


def sign_ephemeral(
    signing_key: SigningKey, *, query_id: bytes, node: str, public_key: bytes
) -> bytes:
    """Ed25519 signature over :func:`ephemeral_statement`."""
    if not isinstance(signing_key, SigningKey):
        raise TypeError("signing_key must be an SigningKey")
    return signing_key.sign(
        ephemeral_statement(query_id=query_id, node=node, public_key=public_key)
    )


def verify_ephemeral(
    verify_key: VerifyKey,
    *,
    query_id: bytes,
    node: str,
    public_key: bytes,
    signature: bytes,
) -> None:
    """Check a peer's signed ephemeral key.

    Raises:
        VerificationFailed: the signature does not verify (detail-free on purpose).
        MalformedInput: the public key or the identifiers are malformed.
    """
    if not isinstance(verify_key, VerifyKey):
        raise TypeError("verify_key must be an VerifyKey")
    if not isinstance(signature, bytes):
        raise TypeError("signature must be bytes")
    statement = ephemeral_statement(query_id=query_id, node=node, public_key=public_key)
    try:
        verify_key.verify(signature, statement)
    except VerificationFailed:
        raise VerificationFailed() from None


def pairwise_key(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    query_id: bytes,
    own: str,
    peer: str,
    suite: Suite,
) -> bytes:
    """The stream-cipher key shared by ``own`` and ``peer`` for this query: HKDF with the
    federation's suite's hash, of its cipher's key size (AES-256: 32 bytes; SM4: 16).

    Raises:
        MalformedInput: malformed public key, equal names.
        VerificationFailed: the peer's key is a low-order point (all-zero shared secret).
    """
    _check_query_id(query_id)
    own_b, peer_b = _name_bytes(own), _name_bytes(peer)
    if own_b == peer_b:
        raise MalformedInput("a node has no mask with itself", field="peer")
    public = _load_public(peer_public_key)
    try:
        shared = private_key.exchange(public)
    except ValueError:
        # RFC 7748 section 6.1: an all-zero result means a low-order point was supplied.
        raise VerificationFailed() from None
    low, high = sorted((own_b, peer_b))
    info = (
        _length_prefixed("domain", _HKDF_DOMAIN)
        + _length_prefixed("query_id", query_id)
        + _length_prefixed("node", low)
        + _length_prefixed("node", high)
    )
    return suite.kdf(shared, info=info, length=suite.cipher_key_size)


def pairwise_stream(key: bytes, length: int, *, suite: Suite) -> list[int]:
    """CTR keystream of the suite's cipher (AES-256 or SM4; zero counter block) read as
    ``length`` little-endian u64 words."""
    if not isinstance(key, bytes) or len(key) != suite.cipher_key_size:
        raise TypeError(f"key must be {suite.cipher_key_size} bytes")
    _check_length(length)
    stream = suite.stream(key, _ZERO_COUNTER_BLOCK, 8 * length)
    return list(struct.unpack(f"<{length}Q", stream))


def _check_length(length: int) -> None:
    if not isinstance(length, int) or isinstance(length, bool):
        raise TypeError("length must be an int")
    if not 0 <= length <= MAX_MASK_LENGTH:
        raise MalformedInput(f"mask length must be in [0, {MAX_MASK_LENGTH}]", field="length")


def node_mask(
    private_key: X25519PrivateKey,
    *,
    query_id: bytes,
    own: str,
    peers: Mapping[str, bytes],
    length: int,
    suite: Suite,
) -> list[int]:
    """The total mask node ``own`` adds: ``sum_{j>own} m - sum_{j<own} m`` modulo 2^64.

    Args:
        private_key: this node's ephemeral X25519 key for the query.
        query_id: the query's identifier (bytes).
        own: this node's name.
        peers: every *other* participating node's name -> verified ephemeral public key.
        length: vector length.

    Raises:
        MalformedInput: no peers, ``own`` among the peers, malformed keys.
        VerificationFailed: a peer key is a low-order point.
    """
    _check_length(length)
    if not peers:
        raise MalformedInput("masking needs at least one peer", field="peers")
    own_b = _name_bytes(own)
    total = [0] * length
    for peer, peer_public in peers.items():
        key = pairwise_key(
            private_key, peer_public, query_id=query_id, own=own, peer=peer, suite=suite
        )
        stream = pairwise_stream(key, length, suite=suite)
        if own_b < _name_bytes(peer):
            total = [(t + s) % MASK_MODULUS for t, s in zip(total, stream, strict=True)]
        else:
            total = [(t - s) % MASK_MODULUS for t, s in zip(total, stream, strict=True)]
    return total


def to_u64(value: int) -> int:
    """Two's-complement image of a signed value in ``[-2^63, 2^64)`` modulo 2^64."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("value must be an int")
    if not -(1 << 63) <= value < MASK_MODULUS:
        raise MalformedInput("value does not fit 64 bits", field="value")
    return value % MASK_MODULUS


def from_u64_signed(value: int) -> int:
    """Read a u64 word as a two's-complement signed value in ``[-2^63, 2^63)``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("value must be an int")
    if not 0 <= value < MASK_MODULUS:
        raise MalformedInput("not a u64 word", field="value")
    return value - MASK_MODULUS if value >= 1 << 63 else value


def mask_vector(values: Sequence[int], mask: Sequence[int]) -> list[int]:
    """``(to_u64(v) + m) mod 2^64`` element-wise; ``values`` may be signed (two's complement)."""
    if len(values) != len(mask):
        raise MalformedInput("values and mask differ in length", field="values")
    return [(to_u64(v) + m) % MASK_MODULUS for v, m in zip(values, mask, strict=True)]


def add_vectors(vectors: Iterable[Sequence[int]]) -> list[int]:
    """Element-wise sum modulo 2^64 (what the analyst obtains after decryption)."""
    total: list[int] | None = None
    for vector in vectors:
        if total is None:
            total = [0] * len(vector)
        if len(vector) != len(total):
            raise MalformedInput("vectors differ in length", field="vectors")
        total = [(t + v) % MASK_MODULUS for t, v in zip(total, vector, strict=True)]
    if total is None:
        raise MalformedInput("no vectors to add", field="vectors")
    return total
