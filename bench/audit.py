"""Audit log benchmark: durable appends/s, full verification time, proof size and time.

    .venv/bin/python bench/audit.py                   # 1,000,000 entries (about a minute)
    .venv/bin/python bench/audit.py --entries 100000  # quicker

Every figure comes with a ratio measured in the same run on the same machine and file system, so
it can be read without knowing the hardware:

- appends/s through ``record_many`` (one transaction per batch, WAL, synchronous=FULL) vs. raw
  ``executemany`` INSERTs of the same pre-encoded rows in the same transactions; and per-append
  durability (``record``, one fsynced transaction per entry) vs. batched.
- verify time of ``verify_log_file`` (decode every entry strictly, recompute every leaf hash and
  the tree, check every signed checkpoint) vs. a raw pass that only reads the rows and hashes
  them with hashlib.
- inclusion/consistency proof size vs. 32 * ceil(log2 n), and proof generation time vs. the
  client's verification time.
- start-up self-check (``govshare.node.audit.selfcheck``) at 100,000 entries and at ``--entries``:
  opening the log and checking it whole, as a node does before serving a log of up to
  ``WHOLE_AT_START_MAX`` entries, vs. the raw read + hashlib pass; and opening it and checking
  only the tail since the latest checkpoint (``--tail`` entries appended after it), as a node
  does at start for a larger log before it checks the whole log in the background.
- ``audit check`` (``govshare.model.risk.check``) over a log of the same size made of realistic
  query entries (signed request, decision, protocol steps, release, settlement; 50 analysts)
  vs. ``verify_log_file`` over the same file. Target (issue 10): <= 2 x verify.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from govshare.model import risk
from govshare.model.conditions import Condition
from govshare.model.events import Event
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.audit.auditlog import AuditLog, verify_log_file
from govshare.node.audit.selfcheck import WHOLE_AT_START_MAX
from govshare.protocols.checkpoint import open_checkpoint
from govshare.protocols.merkle import verify_consistency, verify_inclusion
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD, SigningKey

ORIGIN = "bench.govshare.example/audit"
TARGET_APPENDS_PER_S = 20_000
TARGET_VERIFY_S_PER_MILLION = 15.0
TARGET_START_S = 10.0  # issue 10: longer than this for a start on 2 cores -> split the check
SELFCHECK_SIZES = (100_000,)  # checked besides --entries


def _events(start: int, count: int) -> list[Event]:
    return [
        Event(
            "protocol.step",
            {
                "peer": "node-b",
                "step": "psi.round1",
                "digest": hashlib.sha256(i.to_bytes(8, "big")).digest(),
                "bytes": 4096 + i % 1000,
            },
            "member:tax-bureau",
            f"q-{i // 100:08d}",
        )
        for i in range(start, start + count)
    ]


def bench_appends(folder: Path, total: int, batch: int, key: SigningKey) -> Path:
    path = folder / "audit.db"
    with AuditLog.open(path, suite=STANDARD) as log:
        elapsed = 0.0
        every = max(1, total // (10 * batch))  # about ten checkpoints, as after batches
        for start in range(0, total, batch):
            events = _events(start, min(batch, total - start))
            begin = time.perf_counter()
            log.record_many(events)
            elapsed += time.perf_counter() - begin
            if (start // batch) % every == every - 1:
                log.checkpoint(key, ORIGIN)  # outside the timed region: signing is not appending
        log.checkpoint(key, ORIGIN)
        rate = total / elapsed

        # Raw baseline: the same rows, already encoded, inserted with the same batching.
        rows = [(e.index, e.data, e.leaf_hash) for e in log.entries(0, min(total, 200_000))]
    raw_path = folder / "raw.db"
    raw = sqlite3.connect(raw_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("CREATE TABLE t (idx INTEGER PRIMARY KEY, data BLOB, leaf BLOB)")
    begin = time.perf_counter()
    for start in range(0, len(rows), batch):
        raw.execute("BEGIN")
        raw.executemany("INSERT INTO t VALUES (?, ?, ?)", rows[start : start + batch])
        raw.execute("COMMIT")
    raw_rate = len(rows) / (time.perf_counter() - begin)
    raw.close()

    singles = min(500, total)
    with AuditLog.open(folder / "singles.db", suite=STANDARD) as log:
        events = _events(0, singles)
        begin = time.perf_counter()
        for event in events:
            log.record(event.kind, event.fields, actor=event.actor, query_id=event.query_id)
        single_rate = singles / (time.perf_counter() - begin)

    print(f"entries: {total:,} (~{len(rows[0][1])} bytes each), batches of {batch}")
    print(
        f"durable appends/s, batched: {rate:,.0f}/s  (target >= {TARGET_APPENDS_PER_S:,}: "
        f"{'met' if rate >= TARGET_APPENDS_PER_S else 'NOT met'}); "
        f"raw sqlite INSERT of the same rows: {raw_rate:,.0f}/s -> ratio {rate / raw_rate:.2f}"
    )
    print(
        f"durable appends/s, one fsynced transaction per entry (record): {single_rate:,.0f}/s "
        f"-> {rate / single_rate:.0f}x slower than batched"
    )
    return path


def _raw_read_and_hash(path: Path) -> float:
    """Seconds to read every entry's bytes and hash them with hashlib: the floor of any check."""
    raw = sqlite3.connect(path)
    begin = time.perf_counter()
    leaf_prefix = b"\x00"
    sha256 = hashlib.sha256
    for (data,) in raw.execute("SELECT data FROM entries ORDER BY idx"):
        sha256(leaf_prefix + data).digest()
    seconds = time.perf_counter() - begin
    raw.close()
    return seconds


def bench_verify(path: Path, key: SigningKey, total: int) -> None:
    begin = time.perf_counter()
    report = verify_log_file(path, public_key=key.public_key(), origin=ORIGIN)
    verify_s = time.perf_counter() - begin
    if not report.ok:
        sys.exit(f"benchmark log does not verify: {report.first_problem}")

    raw_s = _raw_read_and_hash(path)
    per_million = verify_s * 1_000_000 / total
    print(
        f"verify {total:,} entries: {verify_s:.2f} s ({per_million:.1f} s per million, target <= "
        f"{TARGET_VERIFY_S_PER_MILLION:.0f}: "
        f"{'met' if per_million <= TARGET_VERIFY_S_PER_MILLION else 'NOT met'}); "
        f"raw read + hashlib pass over the same bytes: {raw_s:.2f} s -> ratio "
        f"{verify_s / raw_s:.1f}; {report.checkpoints_verified} checkpoints checked"
    )


def bench_proofs(path: Path, key: SigningKey, samples: int) -> None:
    rng = random.Random(7)
    with AuditLog.open(path, suite=STANDARD) as log:
        latest = log.latest_checkpoint()
        if latest is None:
            sys.exit("no checkpoint")
        head = open_checkpoint(latest.note, key.public_key(), origin=ORIGIN)
        size = head.size
        gen: list[float] = []
        ver: list[float] = []
        sizes: list[int] = []
        for _ in range(samples):
            index = rng.randrange(size)
            leaf = log.entries(index, index + 1)[0].leaf_hash
            begin = time.perf_counter()
            proof = log.inclusion_proof(index, size)
            gen.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            verify_inclusion(index, size, leaf, proof, head.root)
            ver.append(time.perf_counter() - begin)
            sizes.append(32 * len(proof))
        bound = 32 * math.ceil(math.log2(size))
        print(
            f"inclusion proof at size {size:,}: {statistics.mean(sizes):.0f} bytes on average, "
            f"max {max(sizes)} (ratio to 32*ceil(log2 n) = {bound}: "
            f"{statistics.mean(sizes) / bound:.2f}); generation {statistics.mean(gen) * 1e3:.2f} ms"
            f", client verification {statistics.mean(ver) * 1e3:.3f} ms -> ratio "
            f"{statistics.mean(gen) / statistics.mean(ver):.0f}"
        )
        olds = [c for c in log.checkpoints() if 0 < c.size < size]
        if not olds:
            return
        gen, ver, sizes = [], [], []
        for _ in range(samples):
            old = open_checkpoint(rng.choice(olds).note, key.public_key(), origin=ORIGIN)
            begin = time.perf_counter()
            proof = log.consistency_proof(old.size, size)
            gen.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            verify_consistency(old.size, size, proof, old.root, head.root)
            ver.append(time.perf_counter() - begin)
            sizes.append(32 * len(proof))
        print(
            f"consistency proof to size {size:,} from earlier checkpoints: "
            f"{statistics.mean(sizes):.0f} bytes on average, max {max(sizes)} (ratio to "
            f"32*ceil(log2 n): {statistics.mean(sizes) / bound:.2f}); generation "
            f"{statistics.mean(gen) * 1e3:.2f} ms, client verification "
            f"{statistics.mean(ver) * 1e3:.3f} ms -> ratio "
            f"{statistics.mean(gen) / statistics.mean(ver):.0f}"
        )


def _build(path: Path, total: int, batch: int, key: SigningKey) -> None:
    """A log like bench_appends builds (about ten checkpoints), untimed."""
    every = max(1, total // (10 * batch))
    with AuditLog.open(path, suite=STANDARD) as log:
        for start in range(0, total, batch):
            log.record_many(_events(start, min(batch, total - start)))
            if (start // batch) % every == every - 1:
                log.checkpoint(key, ORIGIN)
        log.checkpoint(key, ORIGIN)


def bench_selfcheck(
    folder: Path, path: Path, key: SigningKey, total: int, batch: int, tail: int
) -> None:
    """Time a node's start-up self-check at each size, on logs with ``tail`` entries appended
    after their latest checkpoint (what a node that stopped between checkpoints holds)."""
    public_key = key.public_key()
    for size in sorted({*(s for s in SELFCHECK_SIZES if s < total), total}):
        log_path = path
        if size != total:
            log_path = folder / f"selfcheck-{size}.db"
            _build(log_path, size, batch, key)
        with AuditLog.open(log_path, suite=STANDARD) as log:
            log.record_many(_events(log.size, tail))
            entries = log.size
        raw_s = _raw_read_and_hash(log_path)

        begin = time.perf_counter()
        with AuditLog.open(log_path, suite=STANDARD) as log:
            whole = log.check_whole(public_key, ORIGIN)
        whole_s = time.perf_counter() - begin
        begin = time.perf_counter()
        with AuditLog.open(log_path, suite=STANDARD) as log:
            recent = log.check_tail(public_key, ORIGIN)
        tail_s = time.perf_counter() - begin
        if not (whole.ok and recent.ok):
            sys.exit(f"benchmark log fails its self-check: {whole.damage or recent.damage}")
        at_start = "whole, before serving" if entries <= WHOLE_AT_START_MAX else "tail only"
        print(
            f"start-up self-check, {entries:,} entries: open + whole check {whole_s:.2f} s "
            f"(target <= {TARGET_START_S:.0f} s: "
            f"{'met' if whole_s <= TARGET_START_S else 'NOT met'}); raw read + hashlib pass "
            f"{raw_s:.2f} s -> ratio {whole_s / raw_s:.1f}; open + tail check "
            f"({entries - recent.checked_from:,} entries since checkpoint "
            f"{recent.checkpoint:,}) {tail_s:.2f} s; a node checks this log {at_start} "
            f"(whole up to {WHOLE_AT_START_MAX:,} entries)"
        )


TARGET_CHECK_VS_VERIFY = 2.0
# Entries per query in the realistic log: received, decision, three steps, release, settlement.
QUERY_ENTRIES = 7


def _query_events(q: int, key: SigningKey) -> list[Event]:
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose="bench",
        left=Side("tax", "residents", "id_number", (Condition("year", "=", 2000 + q % 25),)),
        right=Side("civil", "assistance", "id_number"), epsilon=Fraction(1, 100),
    )  # fmt: skip
    analyst = f"analyst{q % 50}"
    request = sign_request(
        key, analyst=analyst, kind=plan.kind.value, body=plan.to_json(), now=1_750_000_000 + q
    )
    signed = request.encode()
    qid, digest = request.query_id_hex, hashlib.sha256(signed).hexdigest()
    decision = {
        "dataset": "residents", "request_digest": digest, "participants": ["civil", "tax"],
        "allowed": True, "rule": "allowed", "message": "allowed", "grant_id": "g1",
        "requires_approval": False, "dp_required": False, "min_group_size": 5,
        "min_set_size": 0, "masks": [], "epsilon": "0.01", "exact": False,
    }  # fmt: skip

    def step(direction: str, phase: str) -> dict[str, object]:
        return {"peer": "civil", "direction": direction, "phase": phase, "size": 1000,
                "digest": hashlib.sha256(f"{q}{phase}".encode()).hexdigest()}  # fmt: skip

    received = {"request": signed, "request_digest": digest, "kind": plan.kind.value}
    released = {
        "recipient": analyst, "result_digest": digest, "size": 1000, "request_digest": digest,
        "exact": False, "participants": ["civil", "tax"],
    }  # fmt: skip
    return [
        Event("query.received", received, analyst, qid),
        Event("policy.decision", decision, analyst, qid),
        Event("protocol.step", step("sent", "dummies"), "tax", qid),
        Event("protocol.step", step("sent", "own"), "tax", qid),
        Event("protocol.step", step("received", "own"), "tax", qid),
        Event("result.released", released, "tax", qid),
        Event("budget.settled", {"reservation": "spent", "reason": "released"}, "tax", qid),
    ]


def bench_check(folder: Path, total: int, key: SigningKey) -> None:
    path = folder / "queries.db"
    with AuditLog.open(path, suite=STANDARD) as log:
        events: list[Event] = []
        for q in range(max(total // QUERY_ENTRIES, 1)):
            events += _query_events(q, key)
            if len(events) >= 7_000:
                log.record_many(events)
                events = []
        if events:
            log.record_many(events)
        log.checkpoint(key, ORIGIN)
        size = log.size
        begin = time.perf_counter()
        report = verify_log_file(path, public_key=key.public_key(), origin=ORIGIN)
        verify_s = time.perf_counter() - begin
        if not report.ok:
            sys.exit(f"benchmark log does not verify: {report.first_problem}")
        begin = time.perf_counter()
        alerts = risk.check(
            {"tax": (risk.read_entry(e.data) for e in log.iter_entries()), "civil": ()}
        )
        check_s = time.perf_counter() - begin
    ratio = check_s / verify_s
    print(
        f"audit check over {size:,} query entries: {check_s:.2f} s, {len(alerts)} alerts; "
        f"verify of the same file {verify_s:.2f} s -> ratio {ratio:.2f} (target <= "
        f"{TARGET_CHECK_VS_VERIFY:.0f}: {'met' if ratio <= TARGET_CHECK_VS_VERIFY else 'NOT met'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="log size to build")
    parser.add_argument("--batch", type=int, default=1_000, help="entries per transaction")
    parser.add_argument("--proofs", type=int, default=200, help="proofs to time")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files (temp)")
    parser.add_argument(
        "--tail", type=int, default=1_000, help="entries after the last checkpoint (self-check)"
    )
    args = parser.parse_args()
    if args.entries < 2 or args.batch < 1:
        parser.error("need --entries >= 2 and --batch >= 1")
    key = STANDARD.generate_signing_key()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = bench_appends(Path(folder), args.entries, args.batch, key)
        bench_verify(path, key, args.entries)
        bench_proofs(path, key, args.proofs)
        bench_selfcheck(Path(folder), path, key, args.entries, args.batch, args.tail)
        bench_check(Path(folder), args.entries, key)


if __name__ == "__main__":
    main()
