"""Tests for govshare.protocols.bfv: public-only contexts, chunked u64 sums, strict parsing."""

from __future__ import annotations

import struct

import gmpy2
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from govshare.protocols import bfv, masks
from govshare.protocols.bfv import BfvPublicContext, BfvSecretContext
from govshare.protocols.errors import MalformedInput
from govshare.protocols.suite import STANDARD

U64 = 2**64


@pytest.fixture(scope="module")
def analyst() -> BfvSecretContext:
    return BfvSecretContext.create()  # degree 8192, the default


@pytest.fixture(scope="module")
def small_analyst() -> BfvSecretContext:
    return BfvSecretContext.create(poly_modulus_degree=4096)


@pytest.fixture(scope="module")
def node_context(analyst: BfvSecretContext) -> BfvPublicContext:
    return BfvPublicContext.from_bytes(analyst.public_bytes())


def test_parameters() -> None:
    assert gmpy2.is_prime(bfv.PLAIN_MODULUS, 64)
    assert bfv.PLAIN_MODULUS % (2 * 16384) == 1
    assert bfv.PLAIN_MODULUS < 2**50
    assert bfv.MAX_SUMMANDS * (2**32 - 1) < bfv.PLAIN_MODULUS
    assert (bfv.MAX_SUMMANDS + 1) * (2**32 - 1) >= bfv.PLAIN_MODULUS
    assert bfv.MAX_SUMMANDS == 262143


def test_public_context_cannot_decrypt(
    analyst: BfvSecretContext, node_context: BfvPublicContext
) -> None:
    assert not hasattr(node_context, "decrypt")
    inner = node_context._context
    assert inner.is_public() and not inner.has_secret_key()
    vector = ts.bfv_vector(inner, [1, 2, 3])
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()
    # The wire bytes themselves hold no secret key.
    assert not ts.context_from(analyst.public_bytes()[5:]).has_secret_key()


def test_sum_of_three_nodes_over_two_chunks(
    analyst: BfvSecretContext, node_context: BfvPublicContext
) -> None:
    per = node_context.words_per_chunk
    assert per == 4096
    length = per + 5
    vectors = [[(i * 7919 + node) % U64 for i in range(length)] for node in range(3)]
    vectors[0][0] = U64 - 1  # limb carries
    vectors[1][0] = U64 - 1
    vectors[2][per + 4] = 2**63
    encrypted = [node_context.encrypt(v) for v in vectors]
    assert all(len(chunks) == 2 for chunks in encrypted)
    total = node_context.sum(encrypted)
    expected = [sum(col) % U64 for col in zip(*vectors, strict=True)]
    assert analyst.decrypt(total) == expected


def test_masked_vectors_sum_to_the_plain_sum(small_analyst: BfvSecretContext) -> None:
    node_ctx = BfvPublicContext.from_bytes(small_analyst.public_bytes())
    names = ["health", "social", "tax"]
    keys = {name: masks.generate_ephemeral() for name in names}
    publics = {name: masks.public_bytes(k) for name, k in keys.items()}
    values = {"health": [3, -2, 0, 7], "social": [1, 1, 1, 1], "tax": [0, 5, -9, 2]}
    contributions = []
    for name in names:
        peers = {n: p for n, p in publics.items() if n != name}
        mask = masks.node_mask(
            keys[name], query_id=b"q1", own=name, peers=peers, length=4, suite=STANDARD
        )
        contributions.append(node_ctx.encrypt(masks.mask_vector(values[name], mask)))
    total = small_analyst.decrypt(node_ctx.sum(contributions))
    assert [masks.from_u64_signed(v) for v in total] == [4, 4, -8, 10]


@settings(max_examples=10, deadline=None)
@given(
    vectors=st.integers(1, 4).flatmap(
        lambda length: st.lists(
            st.lists(st.integers(0, U64 - 1), min_size=length, max_size=length),
            min_size=1,
            max_size=4,
        )
    )
)
def test_sum_property(small_analyst: BfvSecretContext, vectors: list[list[int]]) -> None:
    encrypted = [small_analyst.encrypt(v) for v in vectors]
    expected = [sum(col) % U64 for col in zip(*vectors, strict=True)]
    assert small_analyst.decrypt(small_analyst.sum(encrypted)) == expected


def test_partial_sums_compose(small_analyst: BfvSecretContext) -> None:
    a, b, c = ([x] * 3 for x in (5, 6, 7))
    ea, eb, ec = (small_analyst.encrypt(v) for v in (a, b, c))
    partial = small_analyst.sum([ea, eb])
    assert small_analyst.decrypt(small_analyst.sum([partial, ec])) == [18, 18, 18]


def test_private_context_refused_by_nodes(analyst: BfvSecretContext) -> None:
    leaked = analyst._context.serialize(save_secret_key=True)
    with pytest.raises(MalformedInput, match="secret key"):
        BfvPublicContext.from_bytes(b"GSBC\x01" + leaked)


def test_malformed_contexts_refused(analyst: BfvSecretContext) -> None:
    good = analyst.public_bytes()
    ckks = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 60]
    )
    other_t = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=8192, plain_modulus=1032193)
    bad = {
        "empty": b"",
        "magic_only": b"GSBC",
        "bad_magic": b"XSBC" + good[4:],
        "bad_version": good[:4] + b"\x02" + good[5:],
        "truncated": good[:-7],
        "junk": b"GSBC\x01" + b"\x00" * 64,
        "ckks": b"GSBC\x01" + ckks.serialize(save_secret_key=False),
        "other_plain_modulus": b"GSBC\x01" + other_t.serialize(save_secret_key=False),
    }
    for name, data in bad.items():
        with pytest.raises(MalformedInput):
            BfvPublicContext.from_bytes(data)
            pytest.fail(name)


def _reheader(chunk: bytes, **fields: int) -> bytes:
    magic, version, index, count, length, summands = struct.unpack_from(">4sBIIII", chunk)
    values = {"index": index, "count": count, "length": length, "summands": summands}
    values.update(fields)
    header = struct.pack(
        ">4sBIIII",
        magic,
        version,
        values["index"],
        values["count"],
        values["length"],
        values["summands"],
    )
    return header + chunk[21:]


def test_malformed_chunks_refused(
    analyst: BfvSecretContext, node_context: BfvPublicContext, small_analyst: BfvSecretContext
) -> None:
    (chunk,) = node_context.encrypt([1, 2, 3])
    foreign = small_analyst.encrypt([1, 2, 3])[0]
    bad = {
        "empty": b"",
        "truncated_header": chunk[:10],
        "bad_magic": b"XSBV" + chunk[4:],
        "bad_version": chunk[:4] + b"\x09" + chunk[5:],
        "truncated_body": chunk[:-100],
        "junk_body": chunk[:21] + b"\x01" * 50,
        "index_beyond_count": _reheader(chunk, index=1),
        "count_inconsistent": _reheader(chunk, count=2),
        "size_mismatch": _reheader(chunk, length=4),
        "zero_length": _reheader(chunk, length=0),
        "zero_summands": _reheader(chunk, summands=0),
        "too_many_summands": _reheader(chunk, summands=bfv.MAX_SUMMANDS + 1),
        "other_degree": foreign,
    }
    for name, data in bad.items():
        with pytest.raises(MalformedInput):
            analyst.decrypt([data])
            pytest.fail(name)
    assert analyst.decrypt([chunk]) == [1, 2, 3]


def test_chunk_order_and_count_checked(node_context: BfvPublicContext) -> None:
    chunks = node_context.encrypt(list(range(node_context.words_per_chunk + 1)))
    with pytest.raises(MalformedInput):
        node_context.sum([list(reversed(chunks))])
    with pytest.raises(MalformedInput):
        node_context.sum([chunks[:1]])
    with pytest.raises(MalformedInput):
        node_context.sum([[]])
    with pytest.raises(MalformedInput):
        node_context.sum([])


def test_sum_refuses_mismatched_lengths_and_too_many_summands(
    small_analyst: BfvSecretContext,
) -> None:
    a = small_analyst.encrypt([1, 2])
    b = small_analyst.encrypt([1, 2, 3])
    with pytest.raises(MalformedInput):
        small_analyst.sum([a, b])
    many = [_reheader(a[0], summands=bfv.MAX_SUMMANDS)]
    with pytest.raises(MalformedInput):
        small_analyst.sum([many, a])


def test_values_out_of_range_refused(node_context: BfvPublicContext) -> None:
    for values in ([-1], [U64], []):
        with pytest.raises(MalformedInput):
            node_context.encrypt(values)
    with pytest.raises(TypeError):
        node_context.encrypt([1.0])  # type: ignore[list-item]


def test_only_allowed_degrees() -> None:
    with pytest.raises(MalformedInput):
        BfvSecretContext.create(poly_modulus_degree=2048)
