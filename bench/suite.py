"""Crypto suite benchmark: the SM suite (SM2, SM3, SM4) against the standard one (Ed25519,
SHA-256, AES), figure by figure in one run, printed as SM / standard ratios (issue 12: target
<= 1.5 x on every figure).

    .venv/bin/python bench/suite.py                       # micro figures, PSI 100k, aggregate 10k
    .venv/bin/python bench/suite.py --psi 0 --aggregate 0 # micro figures only (a minute)

Each figure is taken ``--rounds`` times (default 2) on each suite, the suites in alternating
order, and the best kept: the ratio of bests resists a machine whose load changes.

Figures, each on both suites:

- audit appends/s: ``AuditLog.record_many`` in batches of 1,000 (WAL, synchronous=FULL), leaf
  and node hashes with the suite's hash, a checkpoint signed every 10,000 entries;
- audit verification: ``verify_log_file`` over that log (every leaf, the tree, every signed
  checkpoint);
- signed requests: signatures/s and verifications/s of an analyst's signed query (the node
  verifies one per query, each operator act and grant too);
- pairwise mask streams (HKDF + CTR keystream of 100,000 u64 words) and at-rest sealing (GCM of
  1 MB chunks);
- end to end, nodes as processes over mTLS: a PSI of ``--psi`` rows per side (exact release, no
  noise: the count is checked) and an intersection aggregate of ``--aggregate`` rows per side
  (bfv-simd, grouped by district, checked against the CSVs).

The ratio is what to read: both suites run on the same machine in the same minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aggregate as aggregate_bench
import psi as psi_bench
from audit import ORIGIN, _events
from common import node_processes

from govshare.client.analyst import run_psi
from govshare.model.aggregate_plan import BFV_SIMD, VALUES_SIDE
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.audit.auditlog import AuditLog, verify_log_file
from govshare.protocols import masks
from govshare.protocols.signed_request import sign_request, verify_request
from govshare.protocols.suite import SM, STANDARD, Suite

TARGET_RATIO = 1.5


def rate(action: Callable[[], object], seconds: float = 2.0) -> float:
    """Calls of ``action`` per second over about ``seconds``."""
    count, begin = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - begin) < seconds:
        action()
        count += 1
    return count / elapsed


def audit_figures(folder: Path, suite: Suite, entries: int) -> dict[str, float]:
    key = suite.generate_signing_key()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"audit-{suite.name}.db"
    elapsed = 0.0
    with AuditLog.open(path, suite=suite) as log:
        for start in range(0, entries, 1000):
            events = _events(start, min(1000, entries - start))
            begin = time.perf_counter()
            log.record_many(events)
            if (start // 1000) % 10 == 9:
                log.checkpoint(key, ORIGIN)
            elapsed += time.perf_counter() - begin
        log.checkpoint(key, ORIGIN)
    begin = time.perf_counter()
    report = verify_log_file(path, public_key=key.public_key(), origin=ORIGIN)
    verify = time.perf_counter() - begin
    if not report.ok:
        raise SystemExit(f"{suite.name}: the log does not verify: {report.first_problem}")
    return {"appends/s": entries / elapsed, "verify s": verify}


def signature_figures(suite: Suite) -> dict[str, float]:
    key = suite.generate_signing_key()
    public = key.public_key()
    body = {"purpose": "benchmark", "left": "tax.residents", "right": "civil.assistance"}
    now = int(time.time())
    request = sign_request(key, analyst="alice", kind="psi_cardinality", body=body, now=now)
    return {
        "requests signed/s": rate(
            lambda: sign_request(key, analyst="alice", kind="psi_cardinality", body=body, now=now)
        ),
        "requests verified/s": rate(lambda: verify_request(request, public, now=now)),
    }


def symmetric_figures(suite: Suite) -> dict[str, float]:
    secret = os.urandom(32)
    chunk = os.urandom(1 << 20)
    key = suite.kdf(secret, info=b"bench", length=suite.cipher_key_size)
    return {
        "mask streams/s (100k words)": rate(
            lambda: masks.pairwise_stream(
                suite.kdf(secret, info=b"pair", length=suite.cipher_key_size), 100_000, suite=suite
            )
        ),
        "MB sealed/s": rate(lambda: suite.seal(key, chunk)),
    }


def psi_figures(root: Path, suite: Suite, n: int, expected: int) -> dict[str, float]:
    """One timed exact PSI on fresh node processes (after a warm-up query)."""
    with node_processes(root, list(psi_bench.DATASETS)):
        alice = Identity.load(root / "alice")
        plan = PsiPlan(
            kind=QueryKind.PSI_CARDINALITY, purpose=psi_bench.PURPOSE,
            left=Side("tax", "residents", "id_number"),
            right=Side("civil", "assistance", "id_number"),
        )  # fmt: skip
        run_psi(alice, replace(plan, epsilon=psi_bench.DP_EPSILON))  # warm-up: worker pools
        started: list[float] = []
        outcome = run_psi(
            alice, replace(plan, exact=True),
            on_status=psi_bench.approve_when_pending(root, started), poll=0.05,
        )  # fmt: skip
        wall = time.perf_counter() - started[0]
    if outcome.count != expected:
        raise SystemExit(f"{suite.name}: PSI count {outcome.count}, expected {expected}")
    return {f"PSI {n:,} x {n:,} s": wall}


def aggregate_figures(root: Path, n: int, expected: aggregate_bench.Expected) -> dict[str, float]:
    wall, _ = aggregate_bench.timed_intersection(root, BFV_SIMD, expected[VALUES_SIDE])
    return {f"intersection aggregate {n:,} s": wall}


def best(kept: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """The best of each figure so far: the shortest time, the highest rate."""
    for name, value in measured.items():
        if name in kept:
            value = min(kept[name], value) if name.endswith(" s") else max(kept[name], value)
        kept[name] = value
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="audit log entries")
    parser.add_argument("--psi", type=int, default=100_000, help="PSI rows per side (0: skip)")
    parser.add_argument(
        "--aggregate", type=int, default=10_000, help="aggregate rows per side (0: skip)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="rounds; each measures both suites, in alternating order, and the best is kept",
    )  # fmt: skip
    options = parser.parse_args()
    figures: dict[str, dict[str, float]] = {STANDARD.name: {}, SM.name: {}}
    with tempfile.TemporaryDirectory(prefix="govshare-suite-") as tmp:
        folder = Path(tmp)
        psi_expected = {
            suite.name: psi_bench.setup(folder / f"psi-{suite.name}", options.psi, suite=suite)
            for suite in (STANDARD, SM)
            if options.psi
        }
        agg_expected = {
            suite.name: aggregate_bench.intersection_setup(
                folder / f"agg-{suite.name}", options.aggregate, suite=suite
            )[0]
            for suite in (STANDARD, SM)
            if options.aggregate
        }
        for round_ in range(options.rounds):
            # Alternating order: a machine that grows busier does not favour one suite.
            for suite in (STANDARD, SM) if round_ % 2 == 0 else (SM, STANDARD):
                print(f"round {round_ + 1}: the {suite.name} suite ...", flush=True)
                measured = audit_figures(folder / f"r{round_}", suite, options.entries)
                measured |= signature_figures(suite)
                measured |= symmetric_figures(suite)
                if options.psi:
                    measured |= psi_figures(
                        folder / f"psi-{suite.name}", suite, options.psi, psi_expected[suite.name]
                    )
                if options.aggregate:
                    measured |= aggregate_figures(
                        folder / f"agg-{suite.name}", options.aggregate, agg_expected[suite.name]
                    )
                best(figures[suite.name], measured)
    print(f"\n{'figure':<36} {'standard':>14} {'sm':>14} {'SM cost':>9}  target <= "
          f"{TARGET_RATIO} x")  # fmt: skip
    for name, standard in figures[STANDARD.name].items():
        sm = figures[SM.name][name]
        # A cost ratio: time over time, or the standard rate over the SM rate.
        cost = sm / standard if name.endswith(" s") else standard / sm
        verdict = "met" if cost <= TARGET_RATIO else "NOT met"
        print(f"{name:<36} {standard:>14,.2f} {sm:>14,.2f} {cost:>8.2f}x  {verdict}")


if __name__ == "__main__":
    main()
