"""The native batch path of ECDH-PSI (protocols/x25519_batch*) against the point-by-point path.

Both must compute the same function: the same masked points byte for byte, the same refusals
with the same messages, on random inputs and on the edge inputs (u = 0, u = 1, the points of
order 8, non-canonical encodings). The fallback (extension missing, or turned off) is run in
subprocesses and must give the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from govshare.protocols import ecdh_psi, x25519_batch
from govshare.protocols.ecdh_psi import (
    MAX_CHUNK_POINTS,
    P,
    hash_and_mask_chunk,
    hash_and_mask_chunk_pointwise,
    hash_to_point,
    mask_chunk,
    mask_chunk_pointwise,
)
from govshare.protocols.errors import MalformedInput

QID = b"query-0001"
SCALAR = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
RFC_U = "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"
RFC_OUT = "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
# Generous: a wait on the other threads, never a measure of speed.
TIMEOUT = 120.0


def u(value: int) -> bytes:
    return value.to_bytes(32, "little")


ORDER_8_A = "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
ORDER_8_B = "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"
# Canonical encodings whose X25519 output is all zero: refused as small order.
SMALL_ORDER = {
    "u=0": u(0),
    "u=1": u(1),
    "order 8 (a)": bytes.fromhex(ORDER_8_A),
    "order 8 (b)": bytes.fromhex(ORDER_8_B),
    "u=p-1 (order 2)": u(P - 1),
}
# Encodings the strict chunk parse refuses before any masking.
NOT_CANONICAL = {
    "u=p (0)": u(P),
    "u=p+1 (1)": u(P + 1),
    "u=2^255-1": u(2**255 - 1),
    "bit 255 over 0": u(2**255),
    "bit 255 over 1": u(2**255 + 1),
    "bit 255 over order 8": u(int.from_bytes(bytes.fromhex(ORDER_8_A), "little") + 2**255),
    "bit 255 over a good point": u(9 + 2**255),
}
# Canonical points at the edges of the range that mask normally.
ORDINARY_EDGES = {
    "u=2": u(2),
    "u=9 (base point)": u(9),
    "u=p-2": u(P - 2),
    "u=2^254": u(2**254),
    "u=p-3": u(P - 3),
}


def outcome(function: Callable[..., bytes], *args: Any) -> tuple[str, ...]:
    """What a call gives: its bytes, or its error's type, message and field."""
    try:
        return ("ok", function(*args).hex())
    except MalformedInput as error:
        return ("MalformedInput", str(error), str(error.field))
    except TypeError as error:
        return ("TypeError", type(error).__name__)


def good_points(n: int) -> list[bytes]:
    return [hash_to_point(QID, f"{i:018d}".encode()) for i in range(n)]


def test_native_batch_path_is_built() -> None:
    # make pytest installs libssl-dev first; without it the extension is not built and
    # the tests below would only compare the fallback with itself.
    assert x25519_batch.available(), (
        f"native batch path unavailable: {x25519_batch.unavailable_reason()}; install "
        "libssl-dev and reinstall govshare (pip install -e .)"
    )
    assert x25519_batch.unavailable_reason() is None


def test_rfc7748_vector_through_the_batch_path() -> None:
    assert x25519_batch.mask_batch(SCALAR, bytes.fromhex(RFC_U)).hex() == RFC_OUT
    assert mask_chunk(SCALAR, bytes.fromhex(RFC_U) * 3) == bytes.fromhex(RFC_OUT) * 3


def test_mask_chunk_takes_the_batch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    native = x25519_batch.mask_batch

    def spy(scalar: bytes, packed: bytes) -> bytes:
        calls.append(len(packed))
        return native(scalar, packed)

    monkeypatch.setattr(x25519_batch, "mask_batch", spy)
    packed = b"".join(good_points(5))
    assert mask_chunk(SCALAR, packed) == mask_chunk_pointwise(SCALAR, packed)
    assert calls == [5 * 32]


def test_hash_and_mask_chunk_takes_the_batch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    native = x25519_batch.hash_and_mask_batch

    def spy(scalar: bytes, prefix: bytes, keys: Any) -> bytes:
        calls.append(len(keys))
        return native(scalar, prefix, keys)

    monkeypatch.setattr(x25519_batch, "hash_and_mask_batch", spy)
    keys = [b"a", b"b", b"c"]
    assert hash_and_mask_chunk(SCALAR, QID, keys) == hash_and_mask_chunk_pointwise(
        SCALAR, QID, keys
    )
    assert calls == [3]


# --- random inputs ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    scalar=st.binary(min_size=32, max_size=32),
    raw=st.lists(st.binary(min_size=32, max_size=32), max_size=12),
)
def test_random_chunks_give_identical_outcomes(scalar: bytes, raw: list[bytes]) -> None:
    # Raw 32-byte strings: mostly canonical points, sometimes (as hypothesis likes zeros and
    # 0xff bytes) small-order or non-canonical ones; both paths must agree on every one.
    packed = b"".join(raw)
    assert outcome(mask_chunk, scalar, packed) == outcome(mask_chunk_pointwise, scalar, packed)


@settings(max_examples=40, deadline=None)
@given(
    scalar=st.binary(min_size=32, max_size=32),
    raw=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=12),
)
def test_random_canonical_points_give_identical_masks(scalar: bytes, raw: list[bytes]) -> None:
    points = [r[:31] + bytes([r[31] & 0x3F]) for r in raw]  # below 2^254 < p: canonical
    points = [p for p in points if p not in SMALL_ORDER.values()] or [u(9)]
    packed = b"".join(points)
    batched = mask_chunk(scalar, packed)
    assert batched == mask_chunk_pointwise(scalar, packed)
    assert len(batched) == len(packed)


@settings(max_examples=60, deadline=None)
@given(
    scalar=st.binary(min_size=32, max_size=32),
    query_id=st.binary(min_size=1, max_size=40),
    keys=st.lists(st.binary(max_size=70), max_size=12),
)
def test_random_keys_give_identical_hashed_masks(
    scalar: bytes, query_id: bytes, keys: list[bytes]
) -> None:
    batched = hash_and_mask_chunk(scalar, query_id, keys)
    assert batched == hash_and_mask_chunk_pointwise(scalar, query_id, keys)
    assert len(batched) == 32 * len(keys)


def test_a_realistic_chunk_gives_identical_masks() -> None:
    keys = [f"{110101190001010000 + i:018d}".encode() for i in range(3000)]
    scalar = ecdh_psi.generate_scalar()
    hashed = hash_and_mask_chunk(scalar, QID, keys)
    assert hashed == hash_and_mask_chunk_pointwise(scalar, QID, keys)
    assert mask_chunk(SCALAR, hashed) == mask_chunk_pointwise(SCALAR, hashed)
    # Keys of every length around SHA-256's 64-byte block boundary.
    odd = [bytes(range(n % 256)) * (1 + n // 256) for n in range(0, 140)]
    assert hash_and_mask_chunk(scalar, QID, odd) == hash_and_mask_chunk_pointwise(scalar, QID, odd)


def test_threads_masking_at_once_each_get_their_own_scalars_masks() -> None:
    """The loop keeps its OpenSSL objects per call: threads of one process masking under their
    own scalars at once (a node without a pool answers and streams on two threads) each get
    the point-by-point bytes, and a refused point in one thread's chunk leaves the next chunk
    of that thread, and the other threads, unharmed."""
    points = b"".join(good_points(400))
    refused = points[:64] + SMALL_ORDER["order 8 (a)"]
    scalars = [ecdh_psi.generate_scalar() for _ in range(4)]
    start = threading.Barrier(len(scalars))

    def work(scalar: bytes) -> list[tuple[str, ...]]:
        start.wait(TIMEOUT)
        out = []
        for _ in range(5):
            out.append(outcome(mask_chunk, scalar, points))
            out.append(outcome(mask_chunk, scalar, refused))
            out.append(outcome(hash_and_mask_chunk, scalar, QID, [b"one", b"two"]))
        return out

    with ThreadPoolExecutor(len(scalars)) as pool:
        results = list(pool.map(work, scalars))
    for scalar, got in zip(scalars, results, strict=True):
        want = [
            outcome(mask_chunk_pointwise, scalar, points),
            outcome(mask_chunk_pointwise, scalar, refused),
            outcome(hash_and_mask_chunk_pointwise, scalar, QID, [b"one", b"two"]),
        ]
        assert want[1][0] == "MalformedInput"  # the refused chunk is refused
        assert got == want * 5
    assert len({r[0] for r in results}) == len(scalars)  # four scalars, four different masks


# --- edge inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL_ORDER))
def test_small_order_points_refused_alike(name: str) -> None:
    packed = b"".join(good_points(2)) + SMALL_ORDER[name] + b"".join(good_points(1))
    expected = ("MalformedInput", "point 2 has small order (all-zero X25519 output)", "point")
    assert outcome(mask_chunk, SCALAR, packed) == expected
    assert outcome(mask_chunk_pointwise, SCALAR, packed) == expected
    with pytest.raises(x25519_batch.RefusedPointError) as info:
        x25519_batch.mask_batch(SCALAR, packed)
    assert (info.value.index, info.value.small_order) == (2, True)


@pytest.mark.parametrize("name", sorted(NOT_CANONICAL))
def test_non_canonical_points_refused_alike(name: str) -> None:
    # A small-order point comes first: the strict parse refuses the non-canonical one before
    # any masking, on both paths.
    packed = u(0) + NOT_CANONICAL[name] + b"".join(good_points(2))
    expected = ("MalformedInput", "point 1 is not a canonical u-coordinate", "points")
    assert outcome(mask_chunk, SCALAR, packed) == expected
    assert outcome(mask_chunk_pointwise, SCALAR, packed) == expected


@pytest.mark.parametrize("name", sorted(ORDINARY_EDGES))
def test_edge_points_mask_alike(name: str) -> None:
    packed = ORDINARY_EDGES[name] + b"".join(good_points(1))
    batched = mask_chunk(SCALAR, packed)
    assert batched == mask_chunk_pointwise(SCALAR, packed)
    assert batched[:32] != bytes(32)


def test_chunk_encoding_refused_alike() -> None:
    for packed in (bytes(31), bytes(33), bytes(65)):
        assert outcome(mask_chunk, SCALAR, packed) == outcome(mask_chunk_pointwise, SCALAR, packed)
        assert outcome(mask_chunk, SCALAR, packed)[0] == "MalformedInput"
    too_many = u(9) * (MAX_CHUNK_POINTS + 1)
    expected = ("MalformedInput", f"chunk has {MAX_CHUNK_POINTS + 1} points, limit 65536", "points")
    assert outcome(mask_chunk, SCALAR, too_many) == expected
    assert outcome(mask_chunk_pointwise, SCALAR, too_many) == expected
    assert mask_chunk(SCALAR, b"") == mask_chunk_pointwise(SCALAR, b"") == b""
    assert hash_and_mask_chunk(SCALAR, QID, []) == b""


def test_wrong_types_refused_alike() -> None:
    bad_key = [b"a", "b"]
    assert outcome(hash_and_mask_chunk, SCALAR, QID, bad_key) == ("TypeError", "TypeError")
    assert outcome(hash_and_mask_chunk_pointwise, SCALAR, QID, bad_key) == (
        "TypeError",
        "TypeError",
    )
    assert outcome(mask_chunk, SCALAR, bytearray(32)) == ("TypeError", "TypeError")
    for scalar in (bytes(31), bytes(33)):
        assert outcome(mask_chunk, scalar, u(9))[0] == "MalformedInput"
        assert outcome(hash_and_mask_chunk, scalar, QID, [b"k"])[0] == "MalformedInput"
    assert outcome(hash_and_mask_chunk, SCALAR, b"", [b"k"])[0] == "MalformedInput"


@pytest.mark.parametrize(
    "value",
    [0, 1, 9, P - 19, P - 1, P, P + 1, P + 17, 2**255 - 1, 2**255, 2**255 + P, 2**256 - 1],
)
def test_native_canonical_u_matches_python(value: int) -> None:
    # hash_and_mask_batch reduces SHA-256 outputs in C; values at or above p occur with
    # probability 19 / 2^255, so the reduction is held to ecdh_psi.canonical_u here.
    encoded = u(value)
    assert x25519_batch.canonical_u(encoded) == ecdh_psi.canonical_u(encoded)
    assert int.from_bytes(x25519_batch.canonical_u(encoded), "little") == (value % 2**255) % P


# --- the fallback ----------------------------------------------------------------------------

_FALLBACK_SCRIPT = """
import json, sys, warnings
if sys.argv[1] == "blocked":
    sys.modules["govshare.protocols.x25519_batch_native"] = None  # import fails
warnings.simplefilter("always")  # so that a second warning would show
caught = []
warnings.showwarning = lambda message, category, *rest: caught.append((message, category))
from govshare.protocols import ecdh_psi, x25519_batch
at_import = len(caught)
scalar, query_id = bytes.fromhex(sys.argv[2]), b"query-0001"
keys = [str(i).encode() for i in range(50)]
with ecdh_psi.make_pool(2) as pool:
    pooled = ecdh_psi.hash_and_mask_many(scalar, query_id, keys, executor=pool, chunk_points=8)
    worker_available = pool.submit(x25519_batch.available).result()
hashed = ecdh_psi.hash_and_mask_chunk(scalar, query_id, keys)
try:
    ecdh_psi.mask_chunk(scalar, hashed + bytes(32))
    refusal = None
except Exception as error:
    refusal = f"{type(error).__name__}: {error}"
print(json.dumps({
    "available": x25519_batch.available(),
    "worker_available": worker_available,
    "reason": x25519_batch.unavailable_reason(),
    "at_import": at_import,
    "warnings": [str(m) for m, category in caught if category is RuntimeWarning],
    "hashed": hashed.hex(),
    "pooled": b"".join(pooled).hex(),
    "masked": ecdh_psi.mask_chunk(scalar, hashed).hex(),
    "refusal": refusal,
}))
"""


def run_fallback(mode: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, mode, SCALAR.hex()],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=120,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def expected_fallback_bytes() -> tuple[str, str]:
    keys = [str(i).encode() for i in range(50)]
    hashed = hash_and_mask_chunk(SCALAR, QID, keys)
    return hashed.hex(), mask_chunk(SCALAR, hashed).hex()


def test_fallback_when_the_extension_cannot_be_imported() -> None:
    result = run_fallback("blocked", {})
    assert result["available"] is False
    assert "x25519_batch_native could not be imported" in result["reason"]
    # One warning, at the first masking (not at import: a node's first line is "serving on").
    assert result["at_import"] == 0
    assert len(result["warnings"]) == 1
    assert "falls back to pyca/cryptography point by point" in result["warnings"][0]
    hashed, masked = expected_fallback_bytes()
    assert (result["hashed"], result["masked"]) == (hashed, masked)
    assert result["pooled"] == hashed  # the workers load the extension: same bytes
    assert result["worker_available"] is True
    assert result["refusal"] == "MalformedInput: point 50 has small order (all-zero X25519 output)"


def test_fallback_turned_off_by_the_environment_reaches_the_workers() -> None:
    result = run_fallback("env", {x25519_batch.DISABLE_ENV: "off"})
    assert result["available"] is False
    assert result["worker_available"] is False
    assert result["reason"] == "turned off by GOVSHARE_X25519_BATCH"
    assert result["at_import"] == 0
    assert result["warnings"] == []  # a deliberate choice, not a broken install
    hashed, masked = expected_fallback_bytes()
    assert (result["hashed"], result["masked"], result["pooled"]) == (hashed, masked, hashed)
    assert result["refusal"] == "MalformedInput: point 50 has small order (all-zero X25519 output)"
