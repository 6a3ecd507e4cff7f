"""Raw X25519 throughput on all cores: the denominator of the PSI benchmark's ratio.

DESIGN.md asks PSI to cost at most 1.3 x "the raw X25519 cost of its scalar multiplications
measured in the same run". This script measures that raw cost — ``exchange`` calls on key
objects built before the clock starts, one loop per core, timed inside each worker — and, in
the same run, what :func:`govshare.protocols.ecdh_psi.mask_many` and ``hash_and_mask_many``
achieve through a process pool (parsing, chunking, pickling and pool overhead included).

    .venv/bin/python bench/x25519_raw.py [--n 100000] [--workers 2] [--rounds 3]

:func:`raw_x25519_ops_per_second` is importable by other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import Executor

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from govshare.protocols import ecdh_psi


def _raw_worker(count: int) -> tuple[int, float]:
    """Time ``count`` exchanges with prebuilt keys; returns (count, seconds)."""
    private = X25519PrivateKey.generate()
    # Distinct peer points, as in PSI; built before timing.
    peers = [
        X25519PublicKey.from_public_bytes(ecdh_psi.hash_to_point(b"bench", i.to_bytes(8, "big")))
        for i in range(count)
    ]
    exchange = private.exchange
    start = time.perf_counter()
    for peer in peers:
        exchange(peer)
    return count, time.perf_counter() - start


def _noop(value: int) -> int:
    return value


def raw_x25519_ops_per_second(n: int, *, executor: Executor | None, workers: int) -> float:
    """Scalar multiplications per second over ``workers`` cores (n split evenly).

    With ``executor=None`` runs in this process (one core). The figure is ``n`` divided by the
    slowest worker's own loop time, so pool start-up and pickling are excluded.
    """
    if executor is None:
        count, seconds = _raw_worker(n)
        return count / seconds
    shares = [n // workers + (1 if k < n % workers else 0) for k in range(workers)]
    results = list(executor.map(_raw_worker, shares))
    return sum(c for c, _ in results) / max(s for _, s in results)


def _rate(n: int, start: float) -> float:
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=100_000, help="items per pooled measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    args = parser.parse_args()
    n, workers, rounds = args.n, args.workers, args.rounds

    scalar = ecdh_psi.generate_scalar()
    query_id = b"bench-query"
    keys = [f"{110101190001010000 + i:018d}".encode() for i in range(n)]
    points = [ecdh_psi.hash_to_point(query_id, k) for k in keys]
    single_n = max(1, n // 5)

    # Each round measures raw and protocol back to back, so a machine shared with other work
    # slows both alike; the ratio of each round is reported, and its median.
    rows: dict[str, list[float]] = {
        "raw 1 core": [],
        "mask_many 1 core": [],
        "raw pool": [],
        "mask_many pool": [],
        "hash_and_mask_many pool": [],
    }
    with ecdh_psi.make_pool(workers) as pool:
        list(pool.map(_noop, range(workers * 4)))  # start the workers before timing
        for _ in range(rounds):
            rows["raw 1 core"].append(raw_x25519_ops_per_second(single_n, executor=None, workers=1))
            start = time.perf_counter()
            ecdh_psi.mask_many(scalar, points[:single_n], workers=1)
            rows["mask_many 1 core"].append(_rate(single_n, start))
            rows["raw pool"].append(raw_x25519_ops_per_second(n, executor=pool, workers=workers))
            start = time.perf_counter()
            ecdh_psi.mask_many(scalar, points, executor=pool)
            rows["mask_many pool"].append(_rate(n, start))
            start = time.perf_counter()
            ecdh_psi.hash_and_mask_many(scalar, query_id, keys, executor=pool)
            rows["hash_and_mask_many pool"].append(_rate(n, start))

    print(f"cpus={os.cpu_count()} workers={workers} n={n} single-core n={single_n} rounds={rounds}")
    for name, rates in rows.items():
        unit = "ops/s" if name.startswith("raw") else "items/s"
        shown = " ".join(f"{r:8,.0f}" for r in rates)
        print(f"{name:<24} best {max(rates):8,.0f} {unit:<7}  rounds: {shown}")
    for label, protocol, raw in (
        ("mask_many / raw, 1 core", "mask_many 1 core", "raw 1 core"),
        ("mask_many / raw, pool", "mask_many pool", "raw pool"),
        ("hash_and_mask_many / raw, pool", "hash_and_mask_many pool", "raw pool"),
    ):
        ratios = [r / p for r, p in zip(rows[raw], rows[protocol], strict=True)]
        shown = " ".join(f"{x:.3f}" for x in ratios)
        print(f"cost ratio {label:<32} median {statistics.median(ratios):.3f}  rounds: {shown}")
    best_raw = max(rows["raw pool"])
    print(f"4,000,000 raw multiplications (1M x 1M PSI) at best pool rate: {4e6 / best_raw:.1f} s")


if __name__ == "__main__":
    main()
