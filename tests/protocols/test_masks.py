"""Tests for govshare.protocols.masks: cancellation, key derivation, signed ephemeral keys."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from govshare.protocols import masks
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import SM, STANDARD

QUERY = b"query-7f3a"

names_strategy = st.lists(
    st.text(min_size=1, max_size=12), min_size=2, max_size=6, unique_by=lambda s: s.encode()
)


def _keys(seeds: list[bytes]) -> list[X25519PrivateKey]:
    return [X25519PrivateKey.from_private_bytes(seed) for seed in seeds]


def _run(
    names: list[str],
    privates: list[X25519PrivateKey],
    values: list[list[int]],
    *,
    published: list[bytes] | None = None,
) -> list[list[int]]:
    publics = published or [masks.public_bytes(k) for k in privates]
    length = len(values[0])
    out = []
    for i, (name, key) in enumerate(zip(names, privates, strict=True)):
        peers = {n: publics[j] for j, n in enumerate(names) if j != i}
        mask = masks.node_mask(
            key, query_id=QUERY, own=name, peers=peers, length=length, suite=STANDARD
        )
        out.append(masks.mask_vector(values[i], mask))
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data(), names=names_strategy, length=st.integers(1, 16))
def test_masks_cancel(data: st.DataObject, names: list[str], length: int) -> None:
    seeds = data.draw(
        st.lists(st.binary(min_size=32, max_size=32), min_size=len(names), max_size=len(names))
    )
    values = data.draw(
        st.lists(
            st.lists(st.integers(-(2**63), 2**64 - 1), min_size=length, max_size=length),
            min_size=len(names),
            max_size=len(names),
        )
    )
    masked = _run(names, _keys(seeds), values)
    expected = [sum(col) % masks.MASK_MODULUS for col in zip(*values, strict=True)]
    assert masks.add_vectors(masked) == expected


def test_signed_totals_survive_masking() -> None:
    names = ["tax", "social", "health"]
    privates = [masks.generate_ephemeral() for _ in names]
    values = [[5, -7], [-20, 3], [1, 1]]
    total = masks.add_vectors(_run(names, privates, values))
    assert [masks.from_u64_signed(v) for v in total] == [-14, -3]


def test_single_masked_vector_is_not_the_value() -> None:
    names = ["a", "b", "c"]
    privates = [masks.generate_ephemeral() for _ in names]
    values = [[0] * 8 for _ in names]
    masked = _run(names, privates, values)
    # All-zero inputs: any mask word equal to 0 has probability 2^-64 per word.
    assert all(all(word != 0 for word in vector) for vector in masked)


def test_wrong_key_does_not_cancel() -> None:
    names = ["a", "b", "c", "d"]
    privates = [masks.generate_ephemeral() for _ in names]
    published = [masks.public_bytes(k) for k in privates]
    published[2] = masks.public_bytes(masks.generate_ephemeral())  # c announces another key
    values = [[1, 2, 3] for _ in names]
    total = masks.add_vectors(_run(names, privates, values, published=published))
    assert total != [4, 8, 12]


def test_query_id_separates_masks() -> None:
    a, b = masks.generate_ephemeral(), masks.generate_ephemeral()
    pub_b = masks.public_bytes(b)
    m1 = masks.node_mask(a, query_id=b"q1", own="a", peers={"b": pub_b}, length=4, suite=STANDARD)
    m2 = masks.node_mask(a, query_id=b"q2", own="a", peers={"b": pub_b}, length=4, suite=STANDARD)
    assert m1 != m2


def _hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 written out with hmac, independent of the module under test.
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _alpha_and_beta() -> tuple[X25519PrivateKey, X25519PrivateKey, bytes, bytes]:
    """Two fixed ephemeral keys, their shared secret, and the HKDF info of ``alpha``/``beta``
    (length-prefixed domain tag, query id and the ordered names), written out by hand."""
    a = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    b = X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))

    def lp(x: bytes) -> bytes:
        return struct.pack(">I", len(x)) + x

    info = lp(b"govshare/masks/pairwise/v1") + lp(QUERY) + lp(b"alpha") + lp(b"beta")
    return a, b, a.exchange(b.public_key()), info


def test_pairwise_key_is_hkdf_over_ordered_names() -> None:
    a, b, shared, info = _alpha_and_beta()
    expected = _hkdf_sha256(shared, info, 32)
    k_ab = masks.pairwise_key(
        a, masks.public_bytes(b), query_id=QUERY, own="alpha", peer="beta", suite=STANDARD
    )
    k_ba = masks.pairwise_key(
        b, masks.public_bytes(a), query_id=QUERY, own="beta", peer="alpha", suite=STANDARD
    )
    assert k_ab == k_ba == expected


def test_pairwise_stream_is_aes_ctr_little_endian() -> None:
    key = bytes(32)
    # AES-256 of the all-zero block under the all-zero key (FIPS-197-style known value).
    first_block = bytes.fromhex("dc95c078a2408989ad48a21492842087")
    words = masks.pairwise_stream(key, 2, suite=STANDARD)
    assert words == list(struct.unpack("<2Q", first_block))
    assert masks.pairwise_stream(key, 0, suite=STANDARD) == []


def test_signed_ephemeral_round_trip_and_tamper() -> None:
    signer = STANDARD.generate_signing_key()
    verify = signer.public_key()
    eph = masks.public_bytes(masks.generate_ephemeral())
    sig = masks.sign_ephemeral(signer, query_id=QUERY, node="tax", public_key=eph)
    masks.verify_ephemeral(verify, query_id=QUERY, node="tax", public_key=eph, signature=sig)

    other_eph = masks.public_bytes(masks.generate_ephemeral())
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    cases = [
        {"query_id": b"other", "node": "tax", "public_key": eph, "signature": sig},
        {"query_id": QUERY, "node": "taxx", "public_key": eph, "signature": sig},
        {"query_id": QUERY, "node": "tax", "public_key": other_eph, "signature": sig},
        {"query_id": QUERY, "node": "tax", "public_key": eph, "signature": flipped},
        {"query_id": QUERY, "node": "tax", "public_key": eph, "signature": sig[:-1]},
    ]
    for case in cases:
        with pytest.raises(VerificationFailed):
            masks.verify_ephemeral(verify, **case)  # type: ignore[arg-type]
    with pytest.raises(VerificationFailed):
        masks.verify_ephemeral(
            STANDARD.generate_signing_key().public_key(),
            query_id=QUERY,
            node="tax",
            public_key=eph,
            signature=sig,
        )


def test_statement_is_canonical_and_unambiguous() -> None:
    eph = bytes(range(32))
    s1 = masks.ephemeral_statement(query_id=b"ab", node="c", public_key=eph)
    s2 = masks.ephemeral_statement(query_id=b"a", node="bc", public_key=eph)
    assert s1 != s2
    assert s1.endswith(eph)
    assert s1 == masks.ephemeral_statement(query_id=b"ab", node="c", public_key=eph)


def test_malformed_inputs() -> None:
    key = masks.generate_ephemeral()
    good = masks.public_bytes(masks.generate_ephemeral())
    with pytest.raises(MalformedInput):
        masks.pairwise_key(key, good[:31], query_id=QUERY, own="a", peer="b", suite=STANDARD)
    with pytest.raises(MalformedInput):
        masks.pairwise_key(key, good, query_id=QUERY, own="a", peer="a", suite=STANDARD)
    with pytest.raises(MalformedInput):
        masks.pairwise_key(key, good, query_id=b"", own="a", peer="b", suite=STANDARD)
    with pytest.raises(MalformedInput):
        masks.pairwise_key(key, good, query_id=QUERY, own="", peer="b", suite=STANDARD)
    with pytest.raises(VerificationFailed):  # low-order point
        masks.pairwise_key(key, bytes(32), query_id=QUERY, own="a", peer="b", suite=STANDARD)
    with pytest.raises(MalformedInput):
        masks.node_mask(key, query_id=QUERY, own="a", peers={}, length=3, suite=STANDARD)
    with pytest.raises(MalformedInput):
        masks.node_mask(key, query_id=QUERY, own="a", peers={"b": good}, length=-1, suite=STANDARD)
    with pytest.raises(MalformedInput):
        masks.ephemeral_statement(query_id=QUERY, node="a", public_key=b"short")
    with pytest.raises(MalformedInput):
        masks.mask_vector([1, 2], [0])
    with pytest.raises(MalformedInput):
        masks.to_u64(2**64)
    with pytest.raises(MalformedInput):
        masks.to_u64(-(2**63) - 1)
    with pytest.raises(MalformedInput):
        masks.add_vectors([])
    with pytest.raises(MalformedInput):
        masks.add_vectors([[1], [1, 2]])
    with pytest.raises(TypeError):
        masks.pairwise_key(key, good, query_id="q", own="a", peer="b", suite=STANDARD)  # type: ignore[arg-type]


@settings(max_examples=50)
@given(v=st.integers(-(2**63), 2**63 - 1))
def test_u64_signed_round_trip(v: int) -> None:
    assert masks.from_u64_signed(masks.to_u64(v)) == v


def test_sm_suite_masks_are_hkdf_sm3_and_sm4_ctr_and_cancel() -> None:
    """Under the SM suite the pairwise key is HKDF-SM3 over the same info (16 bytes, SM4's) and
    the stream SM4-CTR from the zero block: the suite's HKDF-SM3 and SM4-CTR are themselves
    checked against gmssl in test_suite.py."""
    a, b, shared, info = _alpha_and_beta()
    key = masks.pairwise_key(
        a, masks.public_bytes(b), query_id=QUERY, own="alpha", peer="beta", suite=SM
    )
    assert key == SM.kdf(shared, info=info, length=16)
    standard = masks.pairwise_key(
        a, masks.public_bytes(b), query_id=QUERY, own="alpha", peer="beta", suite=STANDARD
    )
    assert key != standard[:16]
    stream = SM.stream(key, bytes(16), 32)
    assert masks.pairwise_stream(key, 4, suite=SM) == list(struct.unpack("<4Q", stream))
    assert (
        masks.pairwise_stream(key, 4, suite=SM)
        != masks.pairwise_stream(standard, 4, suite=STANDARD)[:4]
    )
    with pytest.raises(TypeError):
        masks.pairwise_stream(bytes(32), 4, suite=SM)  # an AES-256 key is not SM4's
    # Whole vectors still cancel.
    keys = [X25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 3)]
    names = ["civil", "health", "tax"]
    publics = [masks.public_bytes(k) for k in keys]
    values = [[5, -3], [7, 11], [2**40, 1]]
    masked = []
    for i, name in enumerate(names):
        peers = {n: publics[j] for j, n in enumerate(names) if j != i}
        mask = masks.node_mask(keys[i], query_id=QUERY, own=name, peers=peers, length=2, suite=SM)
        masked.append(masks.mask_vector(values[i], mask))
    total = masks.add_vectors(masked)
    assert [masks.from_u64_signed(w) for w in total] == [5 + 7 + 2**40, -3 + 11 + 1]
