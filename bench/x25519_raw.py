"""Raw X25519 throughput on all cores, and the batched vs point-by-point masking paths.

DESIGN.md asks PSI to cost at most 1.3 x "the raw X25519 cost of its scalar multiplications
measured in the same run". This script measures that raw cost twice — OpenSSL through
pyca/cryptography (``exchange`` calls on key objects built before the clock starts) and
OpenSSL through the native batch loop (``x25519_batch.mask_batch`` over prebuilt packed
chunks), one loop per core, timed inside each worker — and, in the same run, what
:func:`govshare.protocols.ecdh_psi.mask_many` and ``hash_and_mask_many`` achieve through a
process pool on the batch path, against the point-by-point path (``mask_chunk_pointwise``,
``hash_and_mask_chunk_pointwise``) through the same pool (parsing, chunking, pickling and pool
overhead included). The one-core rows run in this process and are timed in CPU seconds
(``time.process_time``), which other work on a shared machine disturbs least.

    .venv/bin/python bench/x25519_raw.py [--n 100000] [--workers 2] [--rounds 3]

:func:`raw_x25519_ops_per_second` and :func:`raw_native_ops_per_second` are importable by other
benchmarks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from govshare.protocols import ecdh_psi, x25519_batch


def _bench_points(count: int) -> list[bytes]:
    # Distinct peer points, as in PSI; built before timing.
    return [ecdh_psi.hash_to_point(b"bench", i.to_bytes(8, "big")) for i in range(count)]


def _raw_worker(count: int, clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """Time ``count`` OpenSSL exchanges with prebuilt keys; returns (count, seconds)."""
    private = X25519PrivateKey.generate()
    peers = [X25519PublicKey.from_public_bytes(point) for point in _bench_points(count)]
    exchange = private.exchange
    start = clock()
    for peer in peers:
        exchange(peer)
    return count, clock() - start


def _raw_native_worker(
    count: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[int, float]:
    """Time ``count`` OpenSSL scalar multiplications through the native batch loop, over prebuilt
    packed chunks of the protocol's chunk size; returns (count, seconds)."""
    scalar = ecdh_psi.generate_scalar()
    packed = b"".join(_bench_points(count))
    stride = ecdh_psi.DEFAULT_CHUNK_POINTS * ecdh_psi.POINT_SIZE
    chunks = [packed[i : i + stride] for i in range(0, len(packed), stride)]
    mask_batch = x25519_batch.mask_batch
    start = clock()
    for chunk in chunks:
        mask_batch(scalar, chunk)
    return count, clock() - start


def _rate_over_workers(
    worker: Callable[[int], tuple[int, float]], n: int, executor: Executor | None, workers: int
) -> float:
    if executor is None:
        count, seconds = worker(n)
        return count / seconds
    shares = [n // workers + (1 if k < n % workers else 0) for k in range(workers)]
    results = list(executor.map(worker, shares))
    return sum(c for c, _ in results) / max(s for _, s in results)


def raw_x25519_ops_per_second(n: int, *, executor: Executor | None, workers: int) -> float:
    """OpenSSL scalar multiplications per second over ``workers`` cores (n split evenly).

    With ``executor=None`` runs in this process (one core). The figure is ``n`` divided by the
    slowest worker's own loop time, so pool start-up and pickling are excluded.
    """
    return _rate_over_workers(_raw_worker, n, executor, workers)


def raw_native_ops_per_second(n: int, *, executor: Executor | None, workers: int) -> float:
    """OpenSSL scalar multiplications per second through the native batch loop, measured like
    :func:`raw_x25519_ops_per_second`.

    Raises:
        SystemExit: the native batch path is unavailable.
    """
    if not x25519_batch.available():
        raise SystemExit(f"native batch path unavailable: {x25519_batch.unavailable_reason()}")
    return _rate_over_workers(_raw_native_worker, n, executor, workers)


def _noop(value: int) -> int:
    return value


def _rate(n: int, start: float) -> float:
    return n / (time.perf_counter() - start)


def _pointwise_pool(
    function: Callable[[bytes], bytes] | Callable[[Sequence[bytes]], bytes],
    chunks: Sequence[bytes] | Sequence[Sequence[bytes]],
    pool: Executor,
) -> None:
    list(pool.map(function, chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=100_000, help="items per pooled measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    args = parser.parse_args()
    n, workers, rounds = args.n, args.workers, args.rounds
    if not x25519_batch.available():
        raise SystemExit(f"native batch path unavailable: {x25519_batch.unavailable_reason()}")

    scalar = ecdh_psi.generate_scalar()
    query_id = b"bench-query"
    keys = [f"{110101190001010000 + i:018d}".encode() for i in range(n)]
    points = [ecdh_psi.hash_to_point(query_id, k) for k in keys]
    single_n = max(1, n // 5)
    # The pooled point-by-point runs get the chunks mask_many would make.
    size = ecdh_psi._pool_chunk_size(n, workers, ecdh_psi.DEFAULT_CHUNK_POINTS)
    packed = ecdh_psi.encode_points(points)
    point_chunks = [
        packed[i : i + size * ecdh_psi.POINT_SIZE]
        for i in range(0, len(packed), size * ecdh_psi.POINT_SIZE)
    ]
    key_chunks = ecdh_psi.chunked(keys, size)
    single_packed = ecdh_psi.encode_points(points[:single_n])

    # Each round measures raw and protocol back to back, so a machine shared with other work
    # slows both alike; the ratio of each round is reported, and its median.
    rows: dict[str, list[float]] = {
        "raw pyca 1 core": [],
        "raw batch loop 1 core": [],
        "mask_many 1 core": [],
        "mask pointwise 1 core": [],
        "hash+mask batched 1 core": [],
        "hash+mask pointwise 1 core": [],
        "raw pyca pool": [],
        "raw batch loop pool": [],
        "mask_many pool": [],
        "mask pointwise pool": [],
        "hash_and_mask_many pool": [],
        "hash+mask pointwise pool": [],
    }
    with ecdh_psi.make_pool(workers) as pool:
        list(pool.map(_noop, range(workers * 4)))  # start the workers before timing
        for _ in range(rounds):
            # One core in this process, timed in CPU seconds: steadier than the wall clock
            # where other work shares the machine.
            count, seconds = _raw_worker(single_n, time.process_time)
            rows["raw pyca 1 core"].append(count / seconds)
            count, seconds = _raw_native_worker(single_n, time.process_time)
            rows["raw batch loop 1 core"].append(count / seconds)
            start = time.process_time()
            ecdh_psi.mask_many(scalar, points[:single_n], workers=1)
            rows["mask_many 1 core"].append(single_n / (time.process_time() - start))
            start = time.process_time()
            ecdh_psi.mask_chunk_pointwise(scalar, single_packed)
            rows["mask pointwise 1 core"].append(single_n / (time.process_time() - start))
            start = time.process_time()
            ecdh_psi.hash_and_mask_chunk(scalar, query_id, keys[:single_n])
            rows["hash+mask batched 1 core"].append(single_n / (time.process_time() - start))
            start = time.process_time()
            ecdh_psi.hash_and_mask_chunk_pointwise(scalar, query_id, keys[:single_n])
            rows["hash+mask pointwise 1 core"].append(single_n / (time.process_time() - start))
            rows["raw pyca pool"].append(
                raw_x25519_ops_per_second(n, executor=pool, workers=workers)
            )
            rows["raw batch loop pool"].append(
                raw_native_ops_per_second(n, executor=pool, workers=workers)
            )
            start = time.perf_counter()
            ecdh_psi.mask_many(scalar, points, executor=pool)
            rows["mask_many pool"].append(_rate(n, start))
            start = time.perf_counter()
            _pointwise_pool(partial(ecdh_psi.mask_chunk_pointwise, scalar), point_chunks, pool)
            rows["mask pointwise pool"].append(_rate(n, start))
            start = time.perf_counter()
            ecdh_psi.hash_and_mask_many(scalar, query_id, keys, executor=pool)
            rows["hash_and_mask_many pool"].append(_rate(n, start))
            start = time.perf_counter()
            _pointwise_pool(
                partial(ecdh_psi.hash_and_mask_chunk_pointwise, scalar, query_id), key_chunks, pool
            )
            rows["hash+mask pointwise pool"].append(_rate(n, start))

    print(f"cpus={os.cpu_count()} workers={workers} n={n} single-core n={single_n} rounds={rounds}")
    for name, rates in rows.items():
        unit = "ops/s" if name.startswith("raw") else "items/s"
        shown = " ".join(f"{r:8,.0f}" for r in rates)
        print(f"{name:<26} best {max(rates):8,.0f} {unit:<7}  rounds: {shown}")
    for label, fast, slow in (
        ("batched / pointwise, mask, 1 core", "mask_many 1 core", "mask pointwise 1 core"),
        (
            "batched / pointwise, hash+mask, 1 core",
            "hash+mask batched 1 core",
            "hash+mask pointwise 1 core",
        ),
        ("batch loop / pyca, raw, 1 core", "raw batch loop 1 core", "raw pyca 1 core"),
        ("batched / pointwise, mask, pool", "mask_many pool", "mask pointwise pool"),
        (
            "batched / pointwise, hash+mask, pool",
            "hash_and_mask_many pool",
            "hash+mask pointwise pool",
        ),
        ("batch loop / pyca, raw, pool", "raw batch loop pool", "raw pyca pool"),
    ):
        ratios = [f / s for f, s in zip(rows[fast], rows[slow], strict=True)]
        shown = " ".join(f"{x:.3f}" for x in ratios)
        print(f"speed-up {label:<38} median {statistics.median(ratios):.3f}  rounds: {shown}")
    for label, protocol, raw in (
        ("mask_many / raw batch loop, pool", "mask_many pool", "raw batch loop pool"),
        (
            "hash_and_mask_many / raw batch loop, pool",
            "hash_and_mask_many pool",
            "raw batch loop pool",
        ),
        ("mask pointwise / raw pyca, pool", "mask pointwise pool", "raw pyca pool"),
    ):
        ratios = [r / p for r, p in zip(rows[raw], rows[protocol], strict=True)]
        shown = " ".join(f"{x:.3f}" for x in ratios)
        print(f"cost ratio {label:<42} median {statistics.median(ratios):.3f}  rounds: {shown}")
    best = max(rows["raw batch loop pool"])
    print(
        "4,000,000 raw multiplications (1M x 1M PSI) at the best batch loop pool rate: "
        f"{4e6 / best:.1f} s"
    )


if __name__ == "__main__":
    main()
