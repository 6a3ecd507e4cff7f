"""Benchmark: ms per Paillier encryption, phe's own ``encrypt`` vs govshare's fixed-base one.

Both run in the same process on the same fresh key (3072 bits by default), so the ratio stays
comparable on a noisy machine. phe's ``encrypt`` pays one ``r^n mod n^2`` (a 3072-bit exponent);
govshare's pays ``exponent_bits / window_bits`` table multiplications (DJN short exponent).

    .venv/bin/python bench/paillier_encrypt.py [--bits 3072] [--window 10] [--phe 20] [--fast 500]
"""

from __future__ import annotations

import argparse
import secrets
import time

from govshare.protocols import paillier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=paillier.DEFAULT_N_BITS)
    parser.add_argument("--window", type=int, default=None, help="fixed-base window bits")
    parser.add_argument("--phe", type=int, default=20, help="phe encryptions to time")
    parser.add_argument("--fast", type=int, default=500, help="fast encryptions to time")
    args = parser.parse_args()

    start = time.perf_counter()
    public, private = paillier.generate_keypair(args.bits, window_bits=args.window)
    keygen_s = time.perf_counter() - start

    start = time.perf_counter()
    public.precompute()  # builds the fixed-base table
    table_s = time.perf_counter() - start

    limit = 2**64
    phe_values = [secrets.randbelow(limit) for _ in range(args.phe)]
    fast_values = [secrets.randbelow(limit) for _ in range(args.fast)]

    start = time.perf_counter()
    phe_cts = [public.phe.encrypt(v) for v in phe_values]
    phe_ms = (time.perf_counter() - start) * 1e3 / args.phe

    start = time.perf_counter()
    fast_cts = [public.encrypt(v) for v in fast_values]
    fast_ms = (time.perf_counter() - start) * 1e3 / args.fast

    # Both must decrypt correctly, or the figures mean nothing.
    if [private.decrypt(c) for c in phe_cts[:3]] != phe_values[:3]:
        raise SystemExit("phe encryption did not round-trip")
    if [paillier.decrypt_raw(private, c) for c in fast_cts[:3]] != fast_values[:3]:
        raise SystemExit("fast encryption did not round-trip")

    print(
        f"paillier {public.n_bits}-bit, exponent {public.exponent_bits} bits, "
        f"window {public.window_bits} bits"
    )
    print(f"keygen {keygen_s:.2f} s; fixed-base table {table_s:.2f} s (once per key)")
    print(f"phe encrypt      {phe_ms:8.3f} ms/encryption ({args.phe} runs)")
    print(f"govshare encrypt {fast_ms:8.3f} ms/encryption ({args.fast} runs)")
    print(f"ratio phe/govshare {phe_ms / fast_ms:.1f}x")


if __name__ == "__main__":
    main()
