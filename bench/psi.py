"""PSI cardinality benchmark: two node processes over mutual TLS on loopback.

For each size n, generates n rows per department (tax, civil), registers them in each node's
store, starts both nodes as separate processes, and times one PSI-cardinality query end to end
through the analyst client (sign, submit, policy, masking on all cores, exchange, counting,
receipt). It does so once per masking path on the same data — ``batched`` (the native batch
loop over OpenSSL, the default) and ``pointwise`` (pyca/cryptography point by point, the
fallback; the nodes run with ``GOVSHARE_X25519_BATCH=off``) — and prints the ratio of the two.
Printed with each, from the same run on the same cores:

- items per second (2n items through the protocol);
- the CPU seconds both nodes' process trees (nodes and masking workers) spent on the query, a
  figure other work on the machine disturbs less than the wall time;
- peak RSS per node, its process tree (the node and its masking workers) summed;
- the ratio of the wall time to the raw cost of the protocol's 4n X25519 scalar
  multiplications on the path's own loop (the native batch loop, or pyca/cryptography's calls;
  OpenSSL under both), measured by ``bench/x25519_raw.py``'s worker loops on all cores;
- on the batched path, the DP PSI-CA overhead: the noised query (ε 1, shared and private dummy
  keys, the dummies' extra message) timed against the exact release of the same query on the
  same running nodes (approved by both operators), after a warm-up query. Target: <= 1.05 x.

With ``--engine rr22`` it times membership kept by a receiving node instead (tax learns which
of its keys match, the analyst how many, noised; after a warm-up query): on the RR22 engine
(``govshare.node.queries.engines.rr22``, its driver under the engine's interpreter) and on
ECDH-PSI's batched path, on the same running nodes, with the ratio of the two. Peak RSS there
is the node's process tree, and a driver's own peak (sampled) beside it. It runs ``--rounds``
timed queries per engine (3 by default) and prints medians: on a shared machine one run moves
by a quarter from the next, for govshare and SecretFlow alike.

With ``--anchor secretflow`` it also runs SecretFlow's PSI (``spu`` 0.9.5's libpsi, two local
processes, ECDH on Curve25519 and RR22) on the same keys (``bench/secretflow_psi.py``), and
prints govshare's ratios to both: PSI-CA's to SecretFlow's ECDH and RR22, or with ``--engine
rr22`` membership on RR22 to SecretFlow's RR22 (target <= 1.5 x), there run after each round's
queries and the ratio taken round by round (the median printed). SecretFlow and the RR22
engine run in the engine's own virtual environment (spu's numpy < 2 and jax clash with
govshare's): ``make secretflow`` builds .venv/secretflow, run here when missing; or
``--secretflow-python``.

    .venv/bin/python bench/psi.py [--sizes 10000,100000,1000000] [--dir bench-run/psi]
        [--paths batched,pointwise] [--no-dp] [--engine ecdh|rr22 [--no-ecdh] [--rounds N]]
        [--anchor secretflow]

Targets (DESIGN.md): 1M x 1M <= 60 s on 2 cores, ratio <= 1.3, <= 1.5 GB per node.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_federation, node_processes, tree_peak_rss_mb
from x25519_raw import raw_native_ops_per_second, raw_x25519_ops_per_second

from govshare.cli.dataset import parse_column
from govshare.client.analyst import StatusCallback, run_psi
from govshare.examples import synth
from govshare.model.governance import Grade, Owner, OwnerKind, QueryKind, SharingType
from govshare.model.identity import Identity
from govshare.model.query_plan import ECDH, ENGINES, RR22, PsiPlan, Side
from govshare.model.states import PENDING
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.node.policy import approvals
from govshare.node.queries.engines import rr22
from govshare.node.stores.query_store import QueryStore
from govshare.protocols import dp, ecdh_psi, x25519_batch
from govshare.protocols.suite import STANDARD, Suite

PURPOSE = "benchmark"
# The noised run's ε (shift t = 21 dummy keys on average, shared and private, per side).
DP_EPSILON = Fraction(1)
DATASETS = {
    "tax": ("residents", synth.TAX, ("id_number=join_key:resident_id",)),
    "civil": ("assistance", synth.CIVIL, ("id_number=join_key:resident_id",)),
}


def key_column_csv(source: Path, target: Path) -> None:
    """Keep only the id_number column: the benchmark measures PSI, not the import."""
    with source.open(encoding="utf-8") as src, target.open("w", encoding="utf-8") as dst:
        for line in src:
            dst.write(line.split(",", 1)[0] + "\n")


def setup(root: Path, n: int, *, suite: Suite = STANDARD) -> int:
    """Federation (on ``suite``), stores and grants for size ``n``; returns the known |A ∩ B|."""
    data = root / "data"
    manifest = synth.generate(data, size=n, seed=11)
    make_federation(root, list(DATASETS), suite=suite)
    for name, (dataset, source, columns) in DATASETS.items():
        csv = data / f"{dataset}.csv"
        key_column_csv(data / f"{source}.csv", csv)
        node = Node.from_home(root / name)
        try:
            node.catalogue.add(
                csv, name=dataset, grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
                owner=Owner(OwnerKind.STATE, "state", name),
                columns=[parse_column(c) for c in columns],
                actor=f"operator:{name}", audit=node.audit,
            )  # fmt: skip
            node.grants.issue(
                node.identity.signing_key, issuer=name, dataset=node.catalogue.get(dataset),
                grantee="alice", purpose=PURPOSE, columns=["id_number"],
                query_kinds=[QueryKind.PSI_CARDINALITY, QueryKind.PSI_MEMBERSHIP],
                expires_at=int(time.time()) + 86400,
                epsilon=Fraction(10), max_queries=100, actor=f"operator:{name}", audit=node.audit,
            )  # fmt: skip
        finally:
            node.close()
    return int(manifest["intersections"][synth.intersection_name(synth.TAX, synth.CIVIL)])


def approve_when_pending(root: Path, running: list[float]) -> StatusCallback:
    """Each node's operator approves the exact release (as ``govshare approvals approve``);
    ``running`` gets the moment the nodes start their parts (approvals are not protocol time)."""

    def on_status(node: str, state: str, message: str) -> None:
        if state == "running" and not running:
            running.append(time.perf_counter())
        if state != PENDING:
            return
        config = NodeConfig.load(root / node)
        suite = Identity.load(config.identity_dir).roster.crypto
        store = QueryStore(config.database_path)
        try:
            with AuditLog.open(config.audit_database_path, suite=suite) as audit:
                for waiting in approvals.pending(store, suite=suite):
                    approvals.decide(
                        store, audit, waiting.record.query_id, approve=True,
                        operator=f"operator:{node}", reason="benchmark", suite=suite,
                    )  # fmt: skip
        finally:
            store.close()

    return on_status


REPO = Path(__file__).resolve().parents[1]
SECRETFLOW_DRIVER = REPO / "bench" / "secretflow_psi.py"
SECRETFLOW_PYTHON = REPO / ".venv" / "secretflow" / "bin" / "python"


def secretflow_python(given: Path | None) -> Path:
    """The interpreter of a virtual environment with spu: ``given``, or the one ``make
    secretflow`` builds (the RR22 engine's, whose version the Makefile pins), made when
    missing."""
    if given is not None:
        return given
    subprocess.run(["make", "--no-print-directory", "secretflow"], cwd=REPO, check=True)
    return SECRETFLOW_PYTHON


def enable_rr22(root: Path, python: Path) -> None:
    """Both nodes offer the RR22 engine, under ``python`` ([engines] rr22_python)."""
    for name in DATASETS:
        config = root / name / "node.toml"
        text = config.read_text()
        if 'rr22_python = ""' not in text:
            raise SystemExit(f"{config} has no default [engines] rr22_python to set")
        config.write_text(text.replace('rr22_python = ""', f'rr22_python = "{python.absolute()}"'))


class DriverPeak:
    """The peak RSS of each RR22 driver process while it runs, sampled from /proc (a driver
    is not a node's descendant for long enough for tree_peak_rss_mb to see it)."""

    def __init__(self) -> None:
        self.peak_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> DriverPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        marker = str(rr22.DRIVER).encode()
        while not self._stop.wait(0.05):
            for entry in Path("/proc").iterdir():
                try:
                    if not entry.name.isdigit() or marker not in (entry / "cmdline").read_bytes():
                        continue
                    status = (entry / "status").read_text().splitlines()
                except OSError:
                    continue
                for line in status:
                    if line.startswith("VmHWM:"):
                        mb = int(line.split()[1]) / 1024
                        self.peak_mb[int(entry.name)] = max(
                            mb, self.peak_mb.get(int(entry.name), 0)
                        )


def run_secretflow(
    python: Path, root: Path, protocol: str, *, mtls: bool = False
) -> dict[str, float]:
    """SecretFlow's PSI on the keys the nodes hold (tax receives); returns its outcome. With
    ``mtls`` its link presents the nodes' own federation certificates, as the RR22 engine's."""
    inputs = [str(root / "data" / f"{DATASETS[name][0]}.csv") for name in ("tax", "civil")]
    tls: list[str] = []
    if mtls:
        certs = root / "secretflow-certs"
        certs.mkdir(exist_ok=True)
        shutil.copyfile(root / "tax" / "ca.crt", certs / "ca.pem")
        for rank, name in enumerate(("tax", "civil")):
            shutil.copyfile(root / name / "tls.crt", certs / f"party{rank}.pem")
            shutil.copyfile(root / name / "tls.key", certs / f"party{rank}.key")
        tls = ["--cert-dir", str(certs)]
    out = subprocess.run(
        [str(python), str(SECRETFLOW_DRIVER), "--protocol", protocol, "--inputs", *inputs,
         "--key", "id_number", "--dir", str(root / "secretflow"), *tls],
        capture_output=True, text=True, check=True, timeout=3600,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith("secretflow-result:"):
            result: dict[str, float] = json.loads(line.split(":", 1)[1])
            return result
    raise SystemExit(f"no result from SecretFlow {protocol}: {out.stdout[-2000:]}")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (its masking workers)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the command: state, ppid, ..., utime and stime are fields 12 and 13.
            ticks = int(fields[11]) + int(fields[12])
            stats[int(entry.name)] = (int(fields[1]), ticks / os.sysconf("SC_CLK_TCK"))
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += stats.get(current, (0, 0.0))[1]
        stack.extend(child for child, (parent, _) in stats.items() if parent == current)
    return total


def run_path(
    root: Path, n: int, expected: int, raw_rate: float, *, path: str, with_dp: bool
) -> dict[str, float]:
    """One node run on ``path`` (``batched`` or ``pointwise``): warm-up, the exact release
    timed, and with ``with_dp`` the noised query timed."""
    if path == "pointwise":
        os.environ[x25519_batch.DISABLE_ENV] = "off"  # the nodes and their workers inherit it
    try:
        return _run_nodes(root, n, expected, raw_rate, with_dp=with_dp)
    finally:
        os.environ.pop(x25519_batch.DISABLE_ENV, None)


def bench_plan(kind: QueryKind, **release: Any) -> PsiPlan:
    """The benchmark's query: tax.residents against civil.assistance on id_number."""
    return PsiPlan(
        kind=kind, purpose=PURPOSE, left=Side("tax", "residents", "id_number"),
        right=Side("civil", "assistance", "id_number"), **release,
    )  # fmt: skip


def _run_nodes(
    root: Path, n: int, expected: int, raw_rate: float, *, with_dp: bool
) -> dict[str, float]:
    with node_processes(root, list(DATASETS)) as processes:
        alice = Identity.load(root / "alice")
        plan = bench_plan(QueryKind.PSI_CARDINALITY)
        noised = replace(plan, epsilon=DP_EPSILON)
        run_psi(alice, noised)  # warm-up: the nodes' process pools start
        # Both runs timed from the moment the nodes start their parts to the verified receipt.
        exact_start: list[float] = []
        cpu_before = sum(tree_cpu_seconds(p.pid) for p in processes.values())
        outcome = run_psi(
            alice, replace(plan, exact=True), on_status=approve_when_pending(root, exact_start),
            poll=0.05,
        )  # fmt: skip
        wall = time.perf_counter() - exact_start[0]
        cpu = sum(tree_cpu_seconds(p.pid) for p in processes.values()) - cpu_before
        dp_wall = math.nan
        if with_dp:
            dp_start: list[float] = []
            dp_outcome = run_psi(alice, noised, on_status=approve_when_pending(root, dp_start))
            dp_wall = time.perf_counter() - dp_start[0]
            shift = dp.truncation_shift(DP_EPSILON)
            if abs(dp_outcome.count - expected) > shift:
                raise SystemExit(
                    f"noised count {dp_outcome.count} is more than {shift} from {expected}"
                )
        rss = {name: tree_peak_rss_mb(p.pid) for name, p in processes.items()}
    if outcome.count != expected:
        raise SystemExit(f"wrong count {outcome.count}, the generator says {expected}")
    raw_seconds = 4 * n / raw_rate
    return {
        "n": n,
        "count": outcome.count,
        "wall": wall,
        "cpu": cpu,
        "items_per_s": 2 * n / wall,
        "raw_seconds": raw_seconds,
        "ratio": wall / raw_seconds,
        "rss_tax": rss["tax"],
        "rss_civil": rss["civil"],
        "dp_wall": dp_wall,
        "dp_ratio": dp_wall / wall,
    }


def timed_membership(
    root: Path, alice: Identity, plan: PsiPlan, expected: int
) -> tuple[float, dict[int, float]]:
    """One membership query kept by tax: its wall time from the nodes' start, and the drivers'
    peaks."""
    start: list[float] = []
    with DriverPeak() as drivers:
        outcome = run_psi(alice, plan, on_status=approve_when_pending(root, start), poll=0.05)
        wall = time.perf_counter() - start[0]
    # The count is noised (ε 1, discrete Laplace of scale 1: |noise| > 30 has p < 1e-12); tax
    # keeps the exact matches.
    if abs(outcome.count - expected) > 30:
        raise SystemExit(f"{plan.engine}: about {outcome.count} matched, not {expected}")
    return wall, drivers.peak_mb


def run_membership(
    root: Path, expected: int, python: Path, engines: tuple[str, ...], *, rounds: int,
    anchor: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:  # fmt: skip
    """Membership kept by tax on each of ``engines``, ``rounds`` times on the same running
    nodes after a warm-up each; with ``anchor``, SecretFlow's RR22 (plain, then over mTLS on
    the nodes' certificates, as the engine's link always runs) after each round's queries, so
    that each round's figures are taken side by side. Returns per engine its walls and peaks,
    and SecretFlow's walls by link."""
    enable_rr22(root, python)
    rows: dict[str, dict[str, Any]] = {}
    theirs: dict[str, list[float]] = {"plain": [], "mTLS": []}
    with node_processes(root, list(DATASETS)) as processes:
        alice = Identity.load(root / "alice")
        plan = bench_plan(QueryKind.PSI_MEMBERSHIP, recipient="tax", epsilon=DP_EPSILON)
        plans = {engine: replace(plan, engine=engine) for engine in engines}
        for engined in plans.values():
            run_psi(alice, engined, on_status=approve_when_pending(root, []), poll=0.05)  # warm-up
        for _ in range(rounds):
            for engine, engined in plans.items():
                wall, peaks = timed_membership(root, alice, engined, expected)
                row = rows.setdefault(engine, {"walls": [], "driver_mb": 0.0})
                row["walls"].append(wall)
                row["driver_mb"] = max([row["driver_mb"], *peaks.values()])
            for link in theirs if anchor else ():
                outcome = run_secretflow(python, root, RR22, mtls=link == "mTLS")
                if outcome["intersection"] != expected:
                    raise SystemExit(f"SecretFlow rr22 found {outcome['intersection']}")
                theirs[link].append(outcome["wall"])
        rss = {name: tree_peak_rss_mb(p.pid) for name, p in processes.items()}
    for row in rows.values():
        row.update(rss_tax=rss["tax"], rss_civil=rss["civil"])
    return rows, theirs


def membership_bench(
    root: Path, n: int, expected: int, python: Path, *, anchor: bool, with_ecdh: bool,
    rounds: int,
) -> None:  # fmt: skip
    engines = (RR22, ECDH) if with_ecdh else (RR22,)
    rows, theirs = run_membership(root, expected, python, engines, rounds=rounds, anchor=anchor)
    for engine, row in rows.items():
        walls = row["walls"]
        wall = statistics.median(walls)
        print(f"{n:>12,} membership to tax on {engine.upper():<4}: wall {wall:.1f} s (median of "
              f"{len(walls)}: {', '.join(f'{w:.1f}' for w in walls)}), {2 * n / wall:,.0f} "
              f"items/s; peak RSS tax {row['rss_tax']:.0f} MB, civil {row['rss_civil']:.0f} MB, "
              f"a driver {row['driver_mb']:.0f} MB", flush=True)  # fmt: skip
    if with_ecdh:
        ratio = statistics.median(rows[ECDH]["walls"]) / statistics.median(rows[RR22]["walls"])
        print(f"{n:>12,} membership RR22 vs ECDH: {ratio:.2f} x faster", flush=True)
    ours = rows[RR22]["walls"]
    for link, walls in theirs.items() if anchor else ():
        # Each round's govshare query beside SecretFlow's run of the same round.
        ratios = [a / b for a, b in zip(ours, walls, strict=True)]
        print(f"{n:>12,} SecretFlow RR22 ({link:<5}, spu 0.9.5): wall "
              f"{statistics.median(walls):.1f} s (median of {len(walls)}: "
              f"{', '.join(f'{w:.1f}' for w in walls)}); govshare membership on RR22 is "
              f"{statistics.median(ratios):.2f} x its time, the median of the rounds' "
              f"ratios ({', '.join(f'{r:.2f}' for r in ratios)}; target <= 1.5 x)",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dir", type=Path, default=Path("bench-run/psi"))
    parser.add_argument(
        "--paths", default="batched,pointwise", help="masking paths to run, in this order"
    )
    parser.add_argument("--no-dp", action="store_true", help="skip the noised (DP) query")
    parser.add_argument(
        "--no-ecdh", action="store_true",
        help="with --engine rr22: skip membership on ECDH-PSI (many minutes at 1M)",
    )  # fmt: skip
    parser.add_argument("--anchor", choices=["none", "secretflow"], default="none")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="with --engine rr22: timed queries per engine (each beside SecretFlow's runs of "
        "the same round with --anchor); medians are printed",
    )  # fmt: skip
    parser.add_argument(
        "--engine", choices=ENGINES, default=ECDH,
        help="ecdh: PSI cardinality on the masking paths; rr22: membership kept by a node, on "
        "the RR22 engine and on ECDH-PSI",
    )  # fmt: skip
    parser.add_argument("--secretflow-python", type=Path, help="a Python with spu installed")
    options = parser.parse_args()
    paths = options.paths.split(",")
    if not set(paths) <= {"batched", "pointwise"}:
        raise SystemExit("--paths: batched, pointwise or both")
    if "batched" in paths and not x25519_batch.available():
        raise SystemExit(f"no batched path here: {x25519_batch.unavailable_reason()}")
    anchor = (
        secretflow_python(options.secretflow_python)
        if options.anchor == "secretflow" or options.engine == RR22
        else None
    )
    workers = os.cpu_count() or 1
    if options.engine == RR22 and anchor is not None:
        print(f"PSI membership kept by tax, two node processes over mTLS on loopback, {workers} "
              "cores")  # fmt: skip
        for n in (int(s) for s in options.sizes.split(",")):
            root = options.dir / str(n)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            expected = setup(root, n)
            membership_bench(
                root, n, expected, anchor, anchor=options.anchor == "secretflow",
                with_ecdh=not options.no_ecdh, rounds=options.rounds,
            )  # fmt: skip
        return
    print(f"PSI cardinality, two node processes over mTLS on loopback, {workers} cores")
    print(f"{'n per side':>12} {'path':>9} {'wall s':>8} {'CPU s':>7} {'items/s':>10} "
          f"{'raw 4n s':>9} {'ratio':>6} {'RSS tax MB':>11} {'RSS civil MB':>13} {'|A∩B|':>8} "
          f"{'DP wall s':>10} {'DP/exact':>9}")  # fmt: skip
    for n in (int(s) for s in options.sizes.split(",")):
        root = options.dir / str(n)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        expected = setup(root, n)
        raw_n = min(4 * n, 400_000)
        with ecdh_psi.make_pool(workers) as pool:
            raw_rates = {
                "pointwise": raw_x25519_ops_per_second(raw_n, executor=pool, workers=workers),
                "batched": (
                    raw_native_ops_per_second(raw_n, executor=pool, workers=workers)
                    if "batched" in paths
                    else math.nan
                ),
            }
        rows: dict[str, dict[str, float]] = {}
        for path in paths:
            with_dp = path == "batched" and not options.no_dp
            row = run_path(root, n, expected, raw_rates[path], path=path, with_dp=with_dp)
            rows[path] = row
            print(f"{row['n']:>12,} {path:>9} {row['wall']:>8.1f} {row['cpu']:>7.1f} "
                  f"{row['items_per_s']:>10,.0f} {row['raw_seconds']:>9.1f} {row['ratio']:>6.2f} "
                  f"{row['rss_tax']:>11.0f} {row['rss_civil']:>13.0f} {row['count']:>8,} "
                  f"{row['dp_wall']:>10.1f} {row['dp_ratio']:>9.3f}", flush=True)  # fmt: skip
        if len(rows) == 2:
            fast, slow = rows["batched"], rows["pointwise"]
            print(f"{n:>12,} batched vs point by point: wall {fast['wall']:.1f} s vs "
                  f"{slow['wall']:.1f} s ({slow['wall'] / fast['wall']:.2f} x faster); node CPU "
                  f"{fast['cpu']:.1f} s vs {slow['cpu']:.1f} s "
                  f"({slow['cpu'] / fast['cpu']:.2f} x less); raw X25519 batch loop "
                  f"{raw_rates['batched']:,.0f}/s vs pyca {raw_rates['pointwise']:,.0f}/s",
                  flush=True)  # fmt: skip
        if anchor is not None:
            ours = rows[paths[0]]
            for protocol in ("ecdh", "rr22"):
                theirs = run_secretflow(anchor, root, protocol)
                if theirs["intersection"] != expected:
                    raise SystemExit(f"SecretFlow {protocol} found {theirs['intersection']}")
                print(f"{n:>12,} SecretFlow {protocol.upper():<5} (spu 0.9.5): wall "
                      f"{theirs['wall']:.1f} s; govshare PSI-CA {ours['wall']:.1f} s is "
                      f"{ours['wall'] / theirs['wall']:.2f} x its time", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
