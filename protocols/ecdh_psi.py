"""ECDH-PSI on X25519: intersection cardinality (PSI-CA) and membership (PSI).

The Diffie-Hellman PSI of Meadows (1986) and Huberman, Franklin and Hogg (1999), as deployed in
Ion et al., "On Deploying Secure Computing: Private Intersection-Sum-with-Cardinality" (Google,
EuroS&P 2020), over X25519 (RFC 7748) from pyca/cryptography.

Items and masks
---------------
An item (a normalised join key, as bytes) maps to a u-coordinate::

    H(q, k) = SHA-256(DOMAIN_TAG || u16be(len(q)) || q || k), bit 255 cleared, reduced mod p

where ``q`` is the query id (so points never repeat across queries) and ``p = 2^255 - 19``. The
32 bytes are used as an X25519 public key. Masking with a scalar ``a`` is the X25519 function
itself, ``M_a(u) = X25519(a, u)`` — the u-coordinate of ``[clamp(a)]·P`` for a point ``P`` with
u-coordinate ``u``. Scalars are 32 uniformly random bytes, fresh for every query and party;
X25519 clamps them (bits 0-2 and 255 cleared, bit 254 set, RFC 7748 §5), so an effective scalar
is ``8·s`` with ``2^251 ≤ 8·s < 2^255``. Because clamped scalars are plain integers,
``M_b(M_a(u)) = x([ab]P) = M_a(M_b(u))``: double masking commutes, and a key held by both
parties yields the same doubly masked point on both sides.

Clamping handling: the hash output is not mapped onto the curve (no Elligator); a random ``u``
lies on Curve25519 or on its quadratic twist, about half each. X25519 is defined on both, and the
twist's large subgroup also has prime order (~2^252, cofactor 4). Clamping's factor 8 removes
the small-order component, so every masked point lies in one of the two prime-order subgroups.
Two distinct items collide after masking only if their points differ by a point of small
order, which a SHA-256 output does with probability about 2^-250 per pair. A point of small
order itself (u = 0, u = 1, the order-8 points, or their non-canonical encodings) maps to the
all-zero output, which X25519 implementations refuse; :func:`mask` turns that into
:class:`~govshare.protocols.errors.MalformedInput`. Received points must also be canonical:
32 bytes, bit 255 clear, ``u < p`` (:func:`decode_points`); our own outputs always are.

Roles (who sends what)
----------------------
PSI-CA between holders A and B, counted by C (the analyst)::

    A: XA  = [M_a(H(x)) for x in A]                  -> B
    B: YB  = [M_b(H(y)) for y in B]                  -> A
    B: XAB = shuffle([M_b(u) for u in XA])           -> C
    A: YBA = shuffle([M_a(u) for u in YB])           -> C
    C: |A ∩ B| = number of XAB points found in YBA

PSI (membership) where a receiver R learns which of its own rows match a sender S's set::

    R: XR  = [M_r(H(x)) for x in R]  (R's row order)  -> S
    S: XRS = [M_s(u) for u in XR]    (order KEPT)     -> R
    S: YS  = shuffle([M_s(H(y)) for y in S])           -> R
    R: YSR = [M_r(u) for u in YS];  rows i with XRS[i] in YSR match

:func:`cardinality_locally` and :func:`membership_locally` run these flows in one process and
are the reference a networked driver follows; :class:`PsiParty` holds one party's state.

Who learns what (semi-honest parties, no collusion)
---------------------------------------------------
- A learns ``|B|``; B learns ``|A|``. Each sees only points ``M_x(H(.))`` under the other's
  scalar, which are pseudorandom under DDH in the random-oracle model for H.
- C learns ``|A|``, ``|B|`` and ``|A ∩ B|``, and nothing else: which *positions* match carries no
  information because each doubly masked set was shuffled by the party whose own data it is not
  (B shuffles A's set, A shuffles B's), so neither holder's row order — often sorted or
  correlated with attributes — nor a collusion of C with one holder reveals which of that
  holder's rows matched. Neither holder sees a doubly masked version of its own set.
- In membership, R learns which of its rows are in S's set and ``|S|``; S learns ``|R|``. S's
  set reaches R shuffled, so R cannot tell which of S's rows matched.
- Sets must hold distinct keys: equal keys give equal masked points, so a repeated key leaks its
  multiplicity to everyone downstream. The whole-set functions refuse duplicates.

Assumptions: DDH in the prime-order subgroups of Curve25519 and of its twist; SHA-256 as a random
oracle; fresh independent scalars per query (never reuse a scalar across queries: masked sets
from two queries would then be linkable, which the query id in H also prevents). Malicious
parties are out of scope: a party may send any points of the right form, and a holder who
masks a different set is not detected.

DP PSI-CA
---------
The exact PSI-CA gives C ``|A ∩ B|``. Its DP variant (DESIGN.md "noise by default") hides it
behind *dummy keys*, counts of which are drawn from :mod:`govshare.protocols.dp`'s shifted,
truncated discrete Laplace: scale ``1/ε`` (sensitivity 1), shift ``t = dp.truncation_shift(ε)``
(the least ``t`` with ``e^{-εt} <= δ``, ``δ = dp.PSI_DELTA = 2^-30``), values in ``[0, 2t]``.
L is the plan's left node (the designated node), R the right node::

    L: d   ~ t + Z, Z ~ DLap(1/ε) given |Z| <= t;  D = d dummy keys  -> R  (draw_shared_dummies)
    L: E_L = e_L dummy keys, e_L drawn like d, kept secret              (draw_private_dummies)
    R: checks D (check_shared_dummies); E_R = e_R dummy keys, kept secret
    L: PSI-CA with pad_with_dummies(A, D, E_L);  R: with pad_with_dummies(B, D, E_R)
    C: count = |A ∩ B| + d;  sizes |A| + d + e_L and |B| + d + e_R

The keys of D are in both padded sets, so all ``d`` land in the intersection; private dummies
never match. :func:`dp_cardinality_locally` runs this in one process, and
:func:`dp_cardinality_estimate` is C's reading: estimate ``count - t`` (unbiased: ``Z`` is
symmetric), a 95% interval from the truncated distribution, and the hard bound
``count - 2t <= |A ∩ B| <= count`` that the truncation guarantees.

Why private dummies: C sees the sizes of both doubly masked sets. With shared dummies only,
``(|A| + d) - (|A ∩ B| + d) = |A \\ B|`` exactly, and with a one-row filter that is a membership
oracle. With them, C's view ``(count, |A|+d+e_L, |B|+d+e_R)`` is a bijective post-processing of
``(|A ∩ B| + d, |A \\ B| + e_L, |B \\ A| + e_R)``: three counts each with independent noise.

ε and δ: adding or removing one row of either (filtered) set changes exactly one of those three
counts by one, so the release is ``(ε, δ')``-DP per row of each set, with
``δ' = dp.truncated_delta(ε, t) < e^{-εt} <= δ``. Charge ``ε`` per dataset under add/remove
neighbours; a row whose key *changes* can move from ``A ∩ B`` to ``A \\ B``, which is
``(2ε, 2δ')`` by composition.

Who learns what (semi-honest; no node colludes with C):

- C: ``count`` and the two sizes, i.e. the DP view above; never ``d``, ``e_L``, ``e_R`` or any
  dummy key (D travels only from L to R).
- L: ``d`` (it drew it), ``e_L``, and the size of R's once-masked set, ``|B| + d + e_R``, so
  ``|B| + e_R``: a DP version of ``|B|`` where the exact PSI-CA reveals ``|B|``.
- R: ``d`` (it receives D), ``e_R``, and ``|A| + e_L`` likewise.
- ``d`` says nothing about the data (drawn independently of it), and neither node learns
  ``|A ∩ B|``. Dummy points are indistinguishable from real ones under DDH, as every masked
  point is.

Assumption: *both* nodes know ``d`` -- L draws it, R must hash and mask D like its own keys. A
node colluding with C hands it ``|A ∩ B|`` (and, with that node's own ``e``, its set's
``|A \\ B|``) exactly: no worse than the exact PSI-CA, but without DP. This is the model of
:mod:`~govshare.protocols.dp`'s designated-noise node (L draws the noise, the plan names it, the
audit log records it), extended to R because R sees D. Semi-honest only: L could send more or
fewer dummies than drawn, R only checks ``d <= 2t``.

Driver rules: the dummies must look like rows in everything the peer sees. Pad *before* the first
masking and stream the padded set (:func:`pad_with_dummies` mixes the dummies in at uniformly
random positions); never send dummies in a separate message or chunk, whose boundary would reveal
the real size. Draw D and both E afresh for every query: the dummies are keys hashed with the
query id, never reused. R and C compute ``t`` themselves from the plan's exact ε.

Dummy keys (:func:`dummy_keys`): 32 random bytes with bit 255 clear and value below p, i.e.
canonical u-coordinates, so D travels as a point chunk (:func:`encode_points` /
:func:`decode_points`); they are *keys*, hashed by ``H`` like every key. A dummy is uniform over the
``p = 2^255 - 19`` canonical values, so it equals a given real key (normalised UTF-8 text; only a
32-byte key could) with probability ``1/p ≈ 2^-255``: below ``2^-200`` for a whole run with sets
under 2^30 keys. The at most ``n = 6t`` dummies of one run (D, E_L, E_R) include two equal ones
with probability below ``n^2 / 2^256``, under ``2^-210`` for ``t <= dp.MAX_PSI_SHIFT``.
:func:`pad_with_dummies` refuses a repeat within one node's set; a private dummy of L equal to
one of R (same bound) would add one to the count.

Overhead: ``d``, ``e_L``, ``e_R`` each lie in ``[0, 2t]`` with mean ``t``. Each node's set grows
by ``d + e <= 4t`` keys (mean ``2t``); each extra key costs two X25519 multiplications (its
owner's and the peer's), so a run costs at most ``16t`` more (mean ``8t``). Bytes: D is
``32 d <= 64t`` from L to R, and each of the four point messages (``XA``, ``YB``, ``XAB``,
``YBA``) grows by at most ``128t``. ``t`` is 208 at ε = 0.1, 42 at 0.5, 21 at 1 and 11 at 2
(at most 832, 168, 84 and 44 extra keys per node): noise against sets of a million rows.

Performance: the cost is one X25519 scalar multiplication per item per masking (each item is
masked twice). :func:`mask_many` and :func:`hash_and_mask_many` split the work into chunks for a
process pool (the scalar travels to the pool's workers over a pipe; they are the node's own
processes). Pools use the ``forkserver`` start method, because forking a process that runs gRPC
threads is unsafe.

Batch path: :func:`mask_chunk` and :func:`hash_and_mask_chunk` hand a whole chunk to
:mod:`govshare.protocols.x25519_batch`, a native loop over OpenSSL's X25519 and SHA-256 built
with cffi at install time: packed bytes in, packed bytes out, no Python object per point. It
computes the same function as the point-by-point path through pyca/cryptography
(:func:`mask_chunk_pointwise`, :func:`hash_and_mask_chunk_pointwise`), byte for byte, with the
same refusals and messages (the tests compare them on random and edge inputs), so who learns
what above is unchanged: the same party computes the same points in its own process. Where the
extension is missing, the point-by-point path runs and warns once per process;
``GOVSHARE_X25519_BATCH=off`` forces it. Here (2 cores, one core's CPU time) the batch path
masks about 35,200 points per second against about 32,900 point by point: the same ladder, and
the gain is the per-point Python work (``bench/x25519_raw.py``).

Pure: this module imports no transport or storage code.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import random
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from govshare.protocols import dp, x25519_batch
from govshare.protocols.errors import MalformedInput

T = TypeVar("T")
C = TypeVar("C")

DOMAIN_TAG = b"govshare/ecdh-psi/x25519/v1"
POINT_SIZE = 32
SCALAR_SIZE = 32
P = 2**255 - 19  # the field prime of Curve25519
# The query id is length-prefixed with two bytes; ids are UUIDs or digests in practice.
MAX_QUERY_ID_SIZE = 1024
# Points per wire chunk: 4096 x 32 B = 128 KiB, well under gRPC's 4 MiB default message limit.
DEFAULT_CHUNK_POINTS = 4096
# Largest chunk a parser accepts: 2 MiB of points, half gRPC's default message limit.
MAX_CHUNK_POINTS = 65_536
# A pool worker gets at least this many chunks, so that uneven finishing times even out.
_CHUNKS_PER_WORKER = 4
# Most dummy keys one draw gives: a shifted truncated noise value is at most 2 * shift.
MAX_DUMMY_KEYS = 2 * dp.MAX_PSI_SHIFT


# --- items, scalars, masking ---------------------------------------------------------------


def _check_query_id(query_id: bytes) -> None:
    if not isinstance(query_id, bytes):
        raise TypeError("query_id must be bytes")
    if not 1 <= len(query_id) <= MAX_QUERY_ID_SIZE:
        raise MalformedInput(f"query id must have 1..{MAX_QUERY_ID_SIZE} bytes", field="query_id")


def _check_scalar(scalar: bytes) -> None:
    if not isinstance(scalar, bytes):
        raise TypeError("scalar must be bytes")
    if len(scalar) != SCALAR_SIZE:
        raise MalformedInput(f"scalar must have {SCALAR_SIZE} bytes", field="scalar")


def _point_prefix(query_id: bytes) -> bytes:
    return DOMAIN_TAG + len(query_id).to_bytes(2, "big") + query_id


def _hash_with_prefix(prefix: bytes, key: bytes) -> bytes:
    return canonical_u(hashlib.sha256(prefix + key).digest())


def canonical_u(digest: bytes) -> bytes:
    """32 bytes -> the canonical u-coordinate X25519 would read: bit 255 cleared, then reduced
    mod p (RFC 7748 section 5 decodeUCoordinate, made explicit)."""
    top = digest[31] & 0x7F
    if top == 0x7F:  # u may be in [p, 2^255): probability 19 / 2^255, kept canonical anyway
        u = int.from_bytes(digest[:31] + bytes([top]), "little")
        return (u % P).to_bytes(POINT_SIZE, "little")
    return digest[:31] + bytes([top])


def hash_to_point(query_id: bytes, key: bytes) -> bytes:
    """The u-coordinate (32 bytes, little-endian, canonical) of ``key`` in query ``query_id``.

    ``key`` is the normalised join key as bytes (e.g. ``normalise(raw).encode()``).
    """
    _check_query_id(query_id)
    if not isinstance(key, bytes):
        raise TypeError("key must be bytes")
    return _hash_with_prefix(_point_prefix(query_id), key)


def generate_scalar() -> bytes:
    """A fresh secret scalar (32 bytes from the OS CSPRNG via X25519PrivateKey.generate).

    Never reuse it across queries.
    """
    return X25519PrivateKey.generate().private_bytes_raw()


def _small_order(index: int) -> MalformedInput:
    return MalformedInput(f"point {index} has small order (all-zero X25519 output)", field="point")


def _not_canonical(index: int) -> MalformedInput:
    return MalformedInput(f"point {index} is not a canonical u-coordinate", field="points")


def _exchange(private: X25519PrivateKey, point: bytes, index: int) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(point))
    except ValueError:
        # cryptography refuses an all-zero result: the point has small order.
        raise _small_order(index) from None


def mask(scalar: bytes, point: bytes) -> bytes:
    """``X25519(scalar, point)``: mask one point.

    Raises:
        MalformedInput: the point is not 32 bytes or has small order (all-zero output).
    """
    _check_scalar(scalar)
    if not isinstance(point, bytes):
        raise TypeError("point must be bytes")
    if len(point) != POINT_SIZE:
        raise MalformedInput(f"point must have {POINT_SIZE} bytes", field="point")
    return _exchange(X25519PrivateKey.from_private_bytes(scalar), point, 0)


def mask_chunk(scalar: bytes, packed: bytes, first: int = 0) -> bytes:
    """Mask every point of a packed chunk (see :func:`encode_points`); same order, packed.

    The chunk is parsed strictly first (as :func:`decode_points` does). Runs on the native batch
    path when it is available, else :func:`mask_chunk_pointwise`: the same bytes either way.
    ``first``: the place of the chunk's first point in the whole set, so that a refusal names
    the point's place in the set, not in the chunk.

    Raises:
        MalformedInput: bad chunk encoding, or a point of small order.
    """
    if not x25519_batch.available():
        x25519_batch.warn_fallback()
        return mask_chunk_pointwise(scalar, packed, first)
    _check_scalar(scalar)
    _chunk_count(packed, MAX_CHUNK_POINTS)
    try:
        return x25519_batch.mask_batch(scalar, packed)
    except x25519_batch.RefusedPointError as refused:
        error = _small_order if refused.small_order else _not_canonical
        raise error(first + refused.index) from None


def mask_chunk_pointwise(scalar: bytes, packed: bytes, first: int = 0) -> bytes:
    """:func:`mask_chunk` point by point through pyca/cryptography (the fallback path)."""
    _check_scalar(scalar)
    points = decode_points(packed, first=first)
    private = X25519PrivateKey.from_private_bytes(scalar)
    return b"".join(_exchange(private, point, first + i) for i, point in enumerate(points))


def hash_and_mask_chunk(scalar: bytes, query_id: bytes, keys: Sequence[bytes]) -> bytes:
    """``M_scalar(H(query_id, k))`` for each key, packed in input order.

    Runs on the native batch path when it is available, else
    :func:`hash_and_mask_chunk_pointwise`: the same bytes either way.
    """
    if not x25519_batch.available():
        x25519_batch.warn_fallback()
        return hash_and_mask_chunk_pointwise(scalar, query_id, keys)
    _check_scalar(scalar)
    _check_query_id(query_id)
    for key in keys:
        if not isinstance(key, bytes):
            raise TypeError("keys must be bytes")
    try:
        return x25519_batch.hash_and_mask_batch(scalar, _point_prefix(query_id), keys)
    except x25519_batch.RefusedPointError as refused:
        raise _small_order(refused.index) from None


def hash_and_mask_chunk_pointwise(scalar: bytes, query_id: bytes, keys: Sequence[bytes]) -> bytes:
    """:func:`hash_and_mask_chunk` point by point through hashlib and pyca/cryptography (the
    fallback path)."""
    _check_scalar(scalar)
    _check_query_id(query_id)
    prefix = _point_prefix(query_id)
    private = X25519PrivateKey.from_private_bytes(scalar)
    out = []
    for i, key in enumerate(keys):
        if not isinstance(key, bytes):
            raise TypeError("keys must be bytes")
        out.append(_exchange(private, _hash_with_prefix(prefix, key), i))
    return b"".join(out)


# --- wire encoding ---------------------------------------------------------------------------


def encode_points(points: Iterable[bytes]) -> bytes:
    """Pack 32-byte points into one chunk: their concatenation, nothing else.

    Raises:
        MalformedInput: a point is not 32 bytes.
    """
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, bytes):
            raise TypeError("points must be bytes")
        if len(point) != POINT_SIZE:
            raise MalformedInput(f"point {i} must have {POINT_SIZE} bytes", field="point")
        out.append(point)
    return b"".join(out)


def decode_points(
    packed: bytes, *, max_points: int = MAX_CHUNK_POINTS, first: int = 0
) -> list[bytes]:
    """Parse a chunk strictly: a multiple of 32 bytes, at most ``max_points`` points, each a
    canonical u-coordinate (bit 255 clear, value below 2^255 - 19). A refusal names the point
    as ``first`` plus its index in the chunk.

    Raises:
        TypeError: ``packed`` is not bytes.
        MalformedInput: any violation; the message names it (and the point index).
    """
    _chunk_count(packed, max_points)
    points = [packed[i : i + POINT_SIZE] for i in range(0, len(packed), POINT_SIZE)]
    for i, point in enumerate(points):
        # Bit 255 set, or u in [p, 2^255): both rare enough that only the top byte is tested
        # before the exact comparison.
        if point[31] >= 0x7F and (point[31] & 0x80 or int.from_bytes(point, "little") >= P):
            raise _not_canonical(first + i)
    return points


def _chunk_count(packed: bytes, max_points: int) -> int:
    """The number of points of a packed chunk, after its type, length and size checks."""
    if not isinstance(packed, bytes):
        raise TypeError("packed points must be bytes")
    if len(packed) % POINT_SIZE:
        raise MalformedInput(
            f"chunk length {len(packed)} is not a multiple of {POINT_SIZE}", field="points"
        )
    count = len(packed) // POINT_SIZE
    if count > max_points:
        raise MalformedInput(f"chunk has {count} points, limit {max_points}", field="points")
    return count


def chunked(items: Sequence[T], chunk_points: int = DEFAULT_CHUNK_POINTS) -> list[Sequence[T]]:
    """Split a sequence into consecutive slices of at most ``chunk_points`` items."""
    if chunk_points < 1:
        raise ValueError("chunk_points must be positive")
    return [items[i : i + chunk_points] for i in range(0, len(items), chunk_points)]


# --- shuffling, matching -------------------------------------------------------------------


def random_permutation(n: int) -> list[int]:
    """A uniformly random permutation of ``range(n)``: the positions sorted by fresh 128-bit
    keys from the operating system's CSPRNG (``os.urandom``).

    When no two keys are equal, every order is equally likely (the keys are independent and
    identically distributed); a tie, with probability below n^2 / 2^129 (2^-89 at a million),
    is the only departure from uniform. One NumPy sort instead of a ``secrets`` call per
    position: 1,000,000 positions in about 0.3 s instead of about 4 s.
    """
    if n < 2:
        return list(range(n))
    keys = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(n, 2)
    order: list[int] = np.lexsort((keys[:, 1], keys[:, 0])).tolist()
    return order


def permute(items: Sequence[T], permutation: Sequence[int]) -> list[T]:
    """``[items[permutation[0]], items[permutation[1]], ...]`` — the explicit shuffle.

    Raises:
        MalformedInput: ``permutation`` is not a permutation of ``range(len(items))``.
    """
    n = len(items)
    if len(permutation) != n or sorted(permutation) != list(range(n)):
        raise MalformedInput("not a permutation of the items", field="permutation")
    return [items[k] for k in permutation]


def shuffle(items: Sequence[T]) -> list[T]:
    """A uniformly shuffled copy of ``items`` (:func:`random_permutation`, whose output needs
    none of :func:`permute`'s checks)."""
    return [items[k] for k in random_permutation(len(items))]


def _require_distinct(points: Sequence[bytes], what: str) -> set[bytes]:
    distinct = set(points)
    if len(distinct) != len(points):
        raise MalformedInput(f"{what} contains repeated points", field=what)
    return distinct


def count_matches(left: Sequence[bytes], right: Sequence[bytes]) -> int:
    """The counting party's step: how many doubly masked points the two sets share.

    Raises:
        MalformedInput: a set repeats a point (its sender did not deduplicate its keys).
    """
    distinct_left = _require_distinct(left, "left")
    distinct_right = _require_distinct(right, "right")
    return len(distinct_left & distinct_right)


def matching_positions(own: Sequence[bytes], peer: Sequence[bytes]) -> list[int]:
    """The membership receiver's step: indices ``i`` (ascending) with ``own[i]`` in ``peer``.

    ``own`` is the receiver's set doubly masked in its original row order; ``peer`` is the
    sender's set doubly masked.

    Raises:
        MalformedInput: a set repeats a point.
    """
    _require_distinct(own, "own")
    peer_set = _require_distinct(peer, "peer")
    return [i for i, point in enumerate(own) if point in peer_set]


# --- process pool -----------------------------------------------------------------------------


def make_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for masking, with the ``forkserver`` start method (safe beside gRPC).

    For scoped use (``with make_pool() as pool``: benchmarks, tests, one call): if the process
    that made it is killed, its workers are orphaned. A long-lived service uses
    ``govshare.node.workers.make_pool``, whose workers end with the node.
    ``workers`` defaults to the number of CPUs.
    """
    return ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1,
        mp_context=multiprocessing.get_context("forkserver"),
    )


def _pool_chunk_size(n: int, workers: int, chunk_points: int) -> int:
    if isinstance(chunk_points, bool) or not 1 <= chunk_points <= MAX_CHUNK_POINTS:
        raise ValueError(f"chunk_points must be 1..{MAX_CHUNK_POINTS}")
    return max(1, min(chunk_points, math.ceil(n / (workers * _CHUNKS_PER_WORKER))))


def _run_chunks(
    function: Callable[..., bytes],
    chunks: list[C],
    *,
    workers: int | None,
    executor: Executor | None,
    firsts: Sequence[int] | None = None,
) -> list[bytes]:
    """``function`` over ``chunks`` (and, given ``firsts``, each chunk's first place)."""
    args: list[Sequence[Any]] = [chunks] if firsts is None else [chunks, firsts]
    if executor is not None:
        packed = list(executor.map(function, *args))
    elif workers == 1 or len(chunks) <= 1:
        packed = [function(*one) for one in zip(*args, strict=True)]
    else:
        with make_pool(workers) as pool:
            packed = list(pool.map(function, *args))
    return [blob[i : i + POINT_SIZE] for blob in packed for i in range(0, len(blob), POINT_SIZE)]


def _worker_count(workers: int | None) -> int:
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ValueError("workers must be a positive int")
    return workers or os.cpu_count() or 1


def mask_many(
    scalar: bytes,
    points: Sequence[bytes],
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    chunk_points: int = DEFAULT_CHUNK_POINTS,
) -> list[bytes]:
    """Mask every point with ``scalar``, keeping order, on ``workers`` processes.

    With ``executor`` (preferably a long-lived :func:`make_pool`), the chunks go to it;
    otherwise a pool of ``workers`` processes (default: all CPUs) is made for this call, or
    the work runs inline when ``workers == 1``.

    Raises:
        MalformedInput: a point is not a canonical 32-byte u-coordinate, or has small order.
    """
    _check_scalar(scalar)
    packed = encode_points(points)
    size = _pool_chunk_size(len(points), _worker_count(workers), chunk_points)
    stride = size * POINT_SIZE
    starts = range(0, len(packed), stride)
    return _run_chunks(
        partial(mask_chunk, scalar),
        [packed[i : i + stride] for i in starts],
        workers=workers,
        executor=executor,
        firsts=[i // POINT_SIZE for i in starts],
    )


def hash_and_mask_many(
    scalar: bytes,
    query_id: bytes,
    keys: Sequence[bytes],
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    chunk_points: int = DEFAULT_CHUNK_POINTS,
) -> list[bytes]:
    """``M_scalar(H(query_id, k))`` for every key, keeping order; parallel like
    :func:`mask_many`. Does not check for duplicates (:meth:`PsiParty.mask_own` does)."""
    _check_scalar(scalar)
    _check_query_id(query_id)
    size = _pool_chunk_size(len(keys), _worker_count(workers), chunk_points)
    return _run_chunks(
        partial(_hash_mask_task, scalar, query_id),
        chunked(keys, size),
        workers=workers,
        executor=executor,
    )


def _hash_mask_task(scalar: bytes, query_id: bytes, keys: Sequence[bytes]) -> bytes:
    return hash_and_mask_chunk(scalar, query_id, list(keys))


# --- one party's state ------------------------------------------------------------------------


class PsiParty:
    """One party in one PSI run: the query id and its secret scalar.

    ``PsiParty.fresh(query_id)`` draws a new scalar; the constructor takes an explicit one
    (known-answer tests only — a scalar must never serve two queries). The repr hides the
    scalar.
    """

    __slots__ = ("_scalar", "query_id")

    def __init__(self, query_id: bytes, scalar: bytes) -> None:
        _check_query_id(query_id)
        _check_scalar(scalar)
        self.query_id = query_id
        self._scalar = scalar

    @classmethod
    def fresh(cls, query_id: bytes) -> PsiParty:
        return cls(query_id, generate_scalar())

    def __repr__(self) -> str:
        return f"PsiParty(query_id={self.query_id!r}, scalar=<secret>)"

    def mask_own(
        self,
        keys: Sequence[bytes],
        *,
        workers: int | None = 1,
        executor: Executor | None = None,
    ) -> list[bytes]:
        """First masking of the party's own distinct keys, in input order.

        Raises:
            MalformedInput: ``keys`` repeats a key.
        """
        if len(set(keys)) != len(keys):
            raise MalformedInput("keys must be distinct before PSI", field="keys")
        return hash_and_mask_many(
            self._scalar, self.query_id, keys, workers=workers, executor=executor
        )

    def mask_peer(
        self,
        points: Sequence[bytes],
        *,
        workers: int | None = 1,
        executor: Executor | None = None,
    ) -> list[bytes]:
        """Second masking of the peer's once-masked points, in input order (shuffle separately
        with :func:`shuffle` when the result goes to a counting party)."""
        return mask_many(self._scalar, points, workers=workers, executor=executor)

    def mask_own_chunk(self, keys: Sequence[bytes]) -> bytes:
        """Streaming form of :meth:`mask_own` for one chunk; the caller ensures distinct keys."""
        return hash_and_mask_chunk(self._scalar, self.query_id, keys)

    def mask_peer_chunk(self, packed: bytes) -> bytes:
        """Streaming form of :meth:`mask_peer` for one packed chunk."""
        return mask_chunk(self._scalar, packed)


# --- the flows, in one process ----------------------------------------------------------------


def cardinality_locally(
    a: PsiParty,
    a_keys: Sequence[bytes],
    b: PsiParty,
    b_keys: Sequence[bytes],
    *,
    workers: int | None = 1,
    executor: Executor | None = None,
) -> int:
    """Run PSI-CA with all three roles in this process; return ``|A ∩ B|``.

    The reference for a networked driver: every intermediate value here is one message.
    """
    xab, yba = _doubly_masked_sets(a, a_keys, b, b_keys, workers=workers, executor=executor)
    return count_matches(xab, yba)  # C


def _doubly_masked_sets(
    a: PsiParty,
    a_keys: Sequence[bytes],
    b: PsiParty,
    b_keys: Sequence[bytes],
    *,
    workers: int | None,
    executor: Executor | None,
) -> tuple[list[bytes], list[bytes]]:
    # The PSI-CA messages up to what reaches C: (XAB, YBA).
    if a.query_id != b.query_id:
        raise MalformedInput("parties disagree on the query id", field="query_id")
    xa = a.mask_own(a_keys, workers=workers, executor=executor)  # A -> B
    yb = b.mask_own(b_keys, workers=workers, executor=executor)  # B -> A
    xab = shuffle(b.mask_peer(xa, workers=workers, executor=executor))  # B -> C
    yba = shuffle(a.mask_peer(yb, workers=workers, executor=executor))  # A -> C
    return xab, yba


def membership_locally(
    receiver: PsiParty,
    receiver_keys: Sequence[bytes],
    sender: PsiParty,
    sender_keys: Sequence[bytes],
    *,
    workers: int | None = 1,
    executor: Executor | None = None,
) -> list[int]:
    """Run PSI (membership) in this process; return the receiver's matching row indices."""
    if receiver.query_id != sender.query_id:
        raise MalformedInput("parties disagree on the query id", field="query_id")
    xr = receiver.mask_own(receiver_keys, workers=workers, executor=executor)  # R -> S
    xrs = sender.mask_peer(xr, workers=workers, executor=executor)  # S -> R, order kept
    ys = shuffle(sender.mask_own(sender_keys, workers=workers, executor=executor))  # S -> R
    ysr = receiver.mask_peer(ys, workers=workers, executor=executor)
    return matching_positions(xrs, ysr)


# --- DP PSI-CA: dummy keys (see "DP PSI-CA" above) ---------------------------------------------


def dummy_keys(n: int, rng: random.Random | None = None) -> list[bytes]:
    """``n`` distinct random dummy keys: 32 bytes each, canonical u-coordinates (bit 255 clear,
    value below p), so that they pass :func:`decode_points`.

    Args:
        n: how many, at most :data:`MAX_DUMMY_KEYS`.
        rng: random source (``randbytes``); ``secrets.SystemRandom()`` (``os.urandom``) when
            None. A seeded source is for tests only: dummy keys must be unpredictable.

    Raises:
        TypeError: ``n`` is not a non-negative int.
        MalformedInput: ``n`` above :data:`MAX_DUMMY_KEYS`.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise TypeError("n must be a non-negative int")
    if n > MAX_DUMMY_KEYS:
        raise MalformedInput(f"at most {MAX_DUMMY_KEYS} dummy keys", field="n")
    source = rng if rng is not None else secrets.SystemRandom()
    keys: list[bytes] = []
    seen: set[bytes] = set()
    while len(keys) < n:
        raw = bytearray(source.randbytes(POINT_SIZE))
        raw[31] &= 0x7F
        key = bytes(raw)
        # Redraw u >= p (probability 19 / 2^255) rather than reduce, so keys stay uniform;
        # and a repeat (probability ~ n / 2^255).
        if int.from_bytes(key, "little") >= P or key in seen:
            continue
        seen.add(key)
        keys.append(key)
    return keys


def _draw_dummies(epsilon: Fraction | int, rng: random.Random | None) -> list[bytes]:
    shift = dp.truncation_shift(epsilon)
    return dummy_keys(dp.shifted_truncated_laplace(epsilon, shift, rng), rng)


def draw_shared_dummies(epsilon: Fraction | int, rng: random.Random | None = None) -> list[bytes]:
    """The designated (left) node's shared dummies D: ``d = dp.shifted_truncated_laplace(ε, t)``
    fresh dummy keys, ``t = dp.truncation_shift(ε)``, so ``0 <= d <= 2t``.

    The left node sends D to the right node (a point chunk, :func:`encode_points`) and both add
    it to their own keys (:func:`pad_with_dummies`). Never to the analyst. Fresh per query.

    Raises:
        TypeError: a float epsilon.
        MalformedInput: ``epsilon <= 0`` or too small (shift above ``dp.MAX_PSI_SHIFT``).
    """
    return _draw_dummies(epsilon, rng)


def draw_private_dummies(epsilon: Fraction | int, rng: random.Random | None = None) -> list[bytes]:
    """A node's private dummies E: drawn exactly like :func:`draw_shared_dummies`, independently,
    and kept by the node (each node draws its own). They never match, and hide the node's set
    size from the analyst (and from the peer).

    Raises:
        TypeError: a float epsilon.
        MalformedInput: ``epsilon <= 0`` or too small.
    """
    return _draw_dummies(epsilon, rng)


def check_shared_dummies(keys: Sequence[bytes], *, epsilon: Fraction | int) -> list[bytes]:
    """The right node's check of the shared dummies D it received: at most
    ``2 * dp.truncation_shift(ε)`` keys, each a canonical 32-byte u-coordinate, all distinct.

    D may arrive in several chunks (more than :data:`MAX_CHUNK_POINTS` only for ε below about
    6e-4): decode each with :func:`decode_points` and pass their concatenation. The count itself
    cannot be checked further (semi-honest model).

    Raises:
        TypeError: a key is not bytes, or a float epsilon.
        MalformedInput: too many keys, a malformed or repeated key, or a bad epsilon.
    """
    limit = 2 * dp.truncation_shift(epsilon)
    if len(keys) > limit:
        raise MalformedInput(
            f"{len(keys)} shared dummy keys, at most {limit} for this epsilon", field="dummies"
        )
    checked = decode_points(encode_points(keys), max_points=limit)
    _require_distinct(checked, "dummies")
    return checked


def pad_with_dummies(
    keys: Sequence[bytes],
    shared: Sequence[bytes],
    private: Sequence[bytes],
    *,
    rng: random.Random | None = None,
) -> list[bytes]:
    """A node's keys with the shared and its private dummies mixed in at uniformly random
    positions: the set the node runs PSI-CA on (:meth:`PsiParty.mask_own`).

    The real keys keep their relative order; the dummies take a uniformly random set of
    positions, in random order. (Order is not secret -- every masked point looks random -- but
    mixing keeps the dummies out of any chunk or message of their own.)

    Args:
        rng: source of the positions; ``secrets.SystemRandom()`` when None.

    Raises:
        MalformedInput: a key occurs twice in the result (repeated keys, or a dummy equal to a
            real key: probability about 2^-255 per pair).
    """
    dummies = [*shared, *private]
    total = len(keys) + len(dummies)
    if len(set(keys).union(dummies)) != total:
        raise MalformedInput("keys and dummy keys must all be distinct", field="keys")
    source = rng if rng is not None else secrets.SystemRandom()
    source.shuffle(dummies)
    slots = set(source.sample(range(total), len(dummies)))
    real = iter(keys)
    mixed = iter(dummies)
    return [next(mixed) if i in slots else next(real) for i in range(total)]


@dataclass(frozen=True, slots=True)
class DpCardinality:
    """What the analyst sees of a DP PSI-CA: the match count and both doubly masked set sizes."""

    count: int  # |A ∩ B| + d
    left_size: int  # |A| + d + e_L
    right_size: int  # |B| + d + e_R


@dataclass(frozen=True, slots=True)
class DpCardinalityEstimate:
    """The analyst's reading of a DP PSI-CA count (:func:`dp_cardinality_estimate`)."""

    estimate: int  # count - t, unbiased; may be negative when |A ∩ B| is small
    low: int  # the interval at the requested confidence, within [max(0, count - 2t), count]
    high: int  # 0 <= low <= high <= count
    shift: int  # t: the hard bound is max(0, count - 2t) <= |A ∩ B| <= count


def dp_cardinality_from_dummies(
    left: PsiParty,
    left_keys: Sequence[bytes],
    right: PsiParty,
    right_keys: Sequence[bytes],
    *,
    shared: Sequence[bytes],
    left_private: Sequence[bytes],
    right_private: Sequence[bytes],
    workers: int | None = 1,
    executor: Executor | None = None,
) -> DpCardinality:
    """DP PSI-CA in one process with the dummies given (the explicit variant of
    :func:`dp_cardinality_locally`); returns the analyst's view.

    Raises:
        MalformedInput: parties disagree on the query id, or repeated keys.
    """
    xab, yba = _doubly_masked_sets(
        left,
        pad_with_dummies(left_keys, shared, left_private),
        right,
        pad_with_dummies(right_keys, shared, right_private),
        workers=workers,
        executor=executor,
    )
    return DpCardinality(count_matches(xab, yba), len(xab), len(yba))


def dp_cardinality_locally(
    left: PsiParty,
    left_keys: Sequence[bytes],
    right: PsiParty,
    right_keys: Sequence[bytes],
    *,
    epsilon: Fraction | int,
    rng: random.Random | None = None,
    workers: int | None = 1,
    executor: Executor | None = None,
) -> DpCardinality:
    """Run DP PSI-CA with all three roles in this process; return the analyst's view.

    The reference for a networked driver, in its order: the left (designated) node draws D
    (:func:`draw_shared_dummies`) and its E_L, then the right node checks D
    (:func:`check_shared_dummies`) and draws E_R (:func:`draw_private_dummies`), each from
    ``rng`` in that order; then PSI-CA on the padded sets (:func:`dp_cardinality_from_dummies`).

    Raises:
        TypeError: a float epsilon.
        MalformedInput: a bad epsilon, parties disagree on the query id, or repeated keys.
    """
    shared = draw_shared_dummies(epsilon, rng)  # left -> right
    left_private = draw_private_dummies(epsilon, rng)
    received = check_shared_dummies(shared, epsilon=epsilon)  # right
    right_private = draw_private_dummies(epsilon, rng)
    return dp_cardinality_from_dummies(
        left,
        left_keys,
        right,
        right_keys,
        shared=received,
        left_private=left_private,
        right_private=right_private,
        workers=workers,
        executor=executor,
    )


def dp_cardinality_estimate(
    count: int, *, epsilon: Fraction | int, confidence: Fraction = dp.DEFAULT_CONFIDENCE
) -> DpCardinalityEstimate:
    """The analyst's estimate of ``|A ∩ B|`` from a DP PSI-CA ``count``: ``count - t``, with
    ``[low, high] = [count - t - h, count - t + h]`` (``h`` from
    ``dp.truncated_laplace_interval``) covering it with probability at least ``confidence``.

    ``h <= t`` keeps the interval inside the hard bound ``[count - 2t, count]``; both ends are
    raised to at least 0 (a cardinality is never negative), which loses no coverage. The
    estimate itself is left unclipped, so that it stays unbiased; a display may clip it.

    Raises:
        TypeError: ``count`` not an int, or a float epsilon.
        MalformedInput: ``count < 0``, a bad epsilon or confidence.
    """
    if not isinstance(count, int) or isinstance(count, bool):
        raise TypeError("count must be an int")
    if count < 0:
        raise MalformedInput("count must be >= 0", field="count")
    shift = dp.truncation_shift(epsilon)
    half_width = dp.truncated_laplace_interval(epsilon, shift, confidence)
    estimate = count - shift
    return DpCardinalityEstimate(
        estimate=estimate,
        low=max(0, estimate - half_width),
        high=max(0, estimate + half_width),
        shift=shift,
    )
