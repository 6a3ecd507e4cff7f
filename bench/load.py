"""Load benchmark: many analysts' PSI-CA queries at once against two node processes.

DESIGN.md "Performance": 50 concurrent analysts looping PSI-CA 10k x 10k against two nodes give
0 errors and a throughput of at least 0.9 x the same queries run one at a time: on 2 cores,
concurrency costs nothing. The real path (``bench/common.py``): two ``govshare node serve``
processes over mutual TLS on loopback, each analyst a member with its own certificate, grants
and ε ledger, asking the noised PSI-CA (ε 1) through ``run_psi``. Phases, on the same running
nodes, so that every ratio comes from one run on one machine:

1. serial: one analyst, one query after another (after a warm-up query) -> queries/s;
2. concurrent: ``--analysts`` threads, each its own analyst, loop the query for ``--seconds``
   -> queries/s (every completed query over the wall time until the last one ends, in-flight
   queries included), p50/p99 latency, errors by kind, peak RSS per node (its process tree,
   masking workers included); the ratio to (1) is the headline figure;
3. burst: ``--burst`` queries submitted at the same moment, round-robin over the analysts:
   each completes or is refused at once with RESOURCE_EXHAUSTED (beyond ``max_running +
   max_queued`` runs at a node), and none takes longer than its deadline (the client's run
   timeout, ``--deadline``).

During (2) and (3) a probe thread asks each node's catalogue (ListDatasets) once a second: its
p50/max latency show that control RPCs answer promptly under full load. In (2) a refused run
counts as an error and its analyst waits for the node's retry hint before the next query.
Every count is checked against the generator's intersection, within the DP shift.

    .venv/bin/python bench/load.py [--analysts 50 --seconds 120 --rows 10000 --burst 200]
    .venv/bin/python bench/load.py --quick    # 8 analysts, 20 s, 2,000 rows, burst 40

Exits 1 when a correctness check fails (a wrong count, a burst outcome other than completed or
RESOURCE_EXHAUSTED, a query past its deadline); the throughput ratio is reported, not enforced.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    enrol_analysts,
    make_federation,
    node_processes,
    set_node_options,
    tree_peak_rss_mb,
)
from psi import DATASETS, PURPOSE, key_column_csv

from govshare.cli.dataset import parse_column
from govshare.client.analyst import run_psi
from govshare.examples import synth
from govshare.model.governance import Grade, Owner, OwnerKind, QueryKind, SharingType
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.config import DEFAULT_MAX_QUEUED, DEFAULT_MAX_RUNNING
from govshare.node.node import Node
from govshare.protocols import dp
from govshare.protocols.errors import GovshareError, PolicyRefused, ResourceExhausted, Unavailable
from govshare.rpc.client import NodeClient

NODES = tuple(DATASETS)
# ε of each query: the default noised release (shift t = 21 dummy keys per side).
EPSILON = Fraction(1)
# Each analyst's grant on each dataset: room for every query of a long run at ε 1 (under the
# grants' cap of 10^6), and for refused runs, whose ε stays reserved until the request expires.
GRANT_EPSILON = Fraction(500_000)
GRANT_QUERIES = 500_000
# The nodes' per-analyst submission limit, raised out of the way: this measures capacity, not
# the probing defence (whose default of 30 a minute one looping analyst would exceed).
RATE_LIMIT_PER_MINUTE = 1_000_000
# Seconds between the probe's catalogue calls (and RSS samples).
PROBE_INTERVAL = 1.0
# The serial baseline runs at least this many queries, however short --serial-seconds is.
MIN_SERIAL_QUERIES = 3
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
QUICK = {"analysts": 8, "seconds": 20.0, "rows": 2000, "burst": 40, "serial_seconds": 10.0}
# --quick also shrinks each node's queue so that its burst of 40 meets the refusal path.
QUICK_MAX_QUEUED = 16


@dataclass(frozen=True)
class Sample:
    """One query as its analyst saw it: when it started, was submitted to both nodes (its runs
    asked for; None if it never got that far) and ended, and how it failed if it did."""

    started: float
    ended: float
    running: float | None
    error: str | None = None
    retry_after: float | None = None
    message: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-quantile (0 < p <= 1) of ``values``; NaN for none."""
    if not values:
        return math.nan
    ranked = sorted(values)
    return ranked[max(0, math.ceil(p * len(ranked)) - 1)]


def throughput(samples: Sequence[Sample], started: float) -> float:
    """Completed queries per second, from ``started`` to the end of the last query."""
    done = [s for s in samples if s.error is None]
    if not done:
        return 0.0
    return len(done) / (max(s.ended for s in samples) - started)


def error_kind(exc: Exception) -> str:
    if isinstance(exc, ResourceExhausted):
        return RESOURCE_EXHAUSTED
    if isinstance(exc, PolicyRefused):
        return f"PolicyRefused {exc.rule}"
    if isinstance(exc, Unavailable) and "deadline" in str(exc).lower():
        return "DEADLINE_EXCEEDED"
    if isinstance(exc, GovshareError):
        return type(exc).__name__
    return f"unexpected {type(exc).__name__}"


class LoadRun:
    """The benchmark's two running nodes, their analysts, the query and its true answer."""

    def __init__(
        self,
        analysts: Sequence[Identity],
        processes: dict[str, subprocess.Popen[str]],
        expected: int,
        deadline: float,
    ) -> None:
        self.analysts = analysts
        self.processes = processes
        self.expected = expected
        self.deadline = deadline
        self.plan = PsiPlan(
            kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
            left=Side("tax", "residents", "id_number"),
            right=Side("civil", "assistance", "id_number"),
            epsilon=EPSILON,
        )  # fmt: skip
        self.shift = dp.truncation_shift(EPSILON)

    def query(self, analyst: Identity) -> Sample:
        """One noised PSI-CA, end to end (sign, submit, run at both nodes, count, receipt)."""
        started = time.perf_counter()
        running: list[float] = []

        def on_status(node: str, state: str, message: str) -> None:
            if state == "running" and not running:
                running.append(time.perf_counter())

        try:
            outcome = run_psi(analyst, self.plan, on_status=on_status, run_timeout=self.deadline)
        except Exception as exc:  # every failure is a figure of the benchmark, counted by kind
            retry = exc.retry_after if isinstance(exc, ResourceExhausted) else None
            ended, kind = time.perf_counter(), error_kind(exc)
            return Sample(started, ended, next(iter(running), None), kind, retry, str(exc))
        ended = time.perf_counter()
        wrong = "wrong count" if abs(outcome.count - self.expected) > self.shift else None
        return Sample(started, ended, running[0], wrong)

    def peak_rss(self) -> dict[str, float]:
        return {name: tree_peak_rss_mb(p.pid) for name, p in self.processes.items()}


class Probe:
    """While open: each node's ListDatasets timed once a second, and its peak RSS sampled."""

    def __init__(self, run: LoadRun) -> None:
        self._bench = run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.rss = dict.fromkeys(NODES, 0.0)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        analyst = self._bench.analysts[0]
        clients = {name: NodeClient.to(analyst, name) for name in NODES}
        try:
            while not self._stop.is_set():
                tick = time.perf_counter()
                for client in clients.values():
                    started = time.perf_counter()
                    try:
                        client.list_datasets()
                    except GovshareError as exc:
                        self.errors[error_kind(exc)] += 1
                        continue
                    self.latencies.append(time.perf_counter() - started)
                for name, rss in self._bench.peak_rss().items():
                    self.rss[name] = max(self.rss[name], rss)
                self._stop.wait(max(0.0, PROBE_INTERVAL - (time.perf_counter() - tick)))
        finally:
            for client in clients.values():
                client.close()


def setup(root: Path, *, rows: int, analysts: int, max_queued: int | None) -> tuple[int, int]:
    """Federation, node configs, stores and grants; the true |A ∩ B| and the queue size."""
    data = root / "data"
    manifest = synth.generate(data, size=rows, seed=11)
    federation = make_federation(root, NODES)
    names = [f"analyst-{i:03d}" for i in range(1, analysts + 1)]
    enrol_analysts(root, federation, names)
    queued = DEFAULT_MAX_QUEUED if max_queued is None else max_queued
    for name, (dataset, source, columns) in DATASETS.items():
        set_node_options(
            root / name, rate_limit_per_minute=RATE_LIMIT_PER_MINUTE, max_queued=queued
        )
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
            for analyst in names:
                node.grants.issue(
                    node.identity.signing_key, issuer=name, dataset=node.catalogue.get(dataset),
                    grantee=analyst, purpose=PURPOSE, columns=["id_number"],
                    query_kinds=[QueryKind.PSI_CARDINALITY],
                    expires_at=int(time.time()) + 86400, epsilon=GRANT_EPSILON,
                    max_queries=GRANT_QUERIES, actor=f"operator:{name}", audit=node.audit,
                )  # fmt: skip
        finally:
            node.close()
    return int(manifest["intersections"][synth.intersection_name(synth.TAX, synth.CIVIL)]), queued


def drain(process: subprocess.Popen[str], lines: deque[str]) -> None:
    """Keep reading a node's output (its warnings) so that a full pipe never blocks it."""
    if process.stdout is not None:
        for line in process.stdout:
            lines.append(line.rstrip())


def serial(run: LoadRun, seconds: float) -> tuple[list[Sample], float]:
    """One analyst's queries one after another, for ``seconds`` (and at least a few)."""
    analyst = run.analysts[0]
    samples: list[Sample] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(samples) < MIN_SERIAL_QUERIES:
        samples.append(run.query(analyst))
    return samples, started


def concurrent(run: LoadRun, seconds: float) -> tuple[list[Sample], float]:
    """Every analyst looping the query on a thread of its own until ``seconds`` have passed;
    a refused run waits for the node's hint before the next."""
    started = time.perf_counter()
    until = started + seconds

    def loop(analyst: Identity) -> list[Sample]:
        samples: list[Sample] = []
        while time.perf_counter() < until:
            sample = run.query(analyst)
            samples.append(sample)
            if sample.retry_after is not None:
                time.sleep(min(sample.retry_after, max(0.0, until - time.perf_counter())))
        return samples

    with ThreadPoolExecutor(len(run.analysts)) as pool:
        futures = [pool.submit(loop, a) for a in run.analysts]
        return [s for f in futures for s in f.result()], started


def burst(run: LoadRun, size: int) -> list[Sample]:
    """``size`` queries released at the same moment, round-robin over the analysts."""
    gate = threading.Barrier(size)

    def one(i: int) -> Sample:
        analyst = run.analysts[i % len(run.analysts)]
        gate.wait()
        return run.query(analyst)

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(one, range(size)))


def loadavg() -> str:
    """The machine's 1-minute load average: other work on the cores shows in the figures."""
    return f"load average {os.getloadavg()[0]:.1f}"


def errors_by_kind(samples: Sequence[Sample]) -> str:
    kinds = Counter(s.error for s in samples if s.error is not None)
    return ", ".join(f"{kind} {count}" for kind, count in kinds.most_common()) or "none"


def error_examples(samples: Sequence[Sample]) -> list[str]:
    """One message for each kind of error other than a refusal for capacity."""
    first: dict[str, str] = {}
    for s in samples:
        if s.error is not None and s.error != RESOURCE_EXHAUSTED:
            first.setdefault(s.error, s.message)
    return [f"  {kind}: {message}" for kind, message in first.items()]


@dataclass(frozen=True)
class Phase:
    """One phase's queries, when it began, and the probe's view of the nodes meanwhile."""

    samples: list[Sample]
    started: float
    probe: Probe | None = None

    @property
    def latencies(self) -> list[float]:
        """Of the completed queries."""
        return [s.latency for s in self.samples if s.error is None]

    @property
    def rate(self) -> float:
        return throughput(self.samples, self.started)

    def catalogue(self) -> str:
        """The probe's ListDatasets latency, p50 / max in ms."""
        if self.probe is None:
            return ""
        values, lost = self.probe.latencies, sum(self.probe.errors.values())
        failed = f", {lost} failed" if lost else ""
        return (
            f"{percentile(values, 0.5) * 1000:.0f} / {percentile(values, 1.0) * 1000:.0f}{failed}"
        )


def measure(
    root: Path, options: argparse.Namespace, expected: int, outputs: dict[str, deque[str]]
) -> tuple[Phase, Phase, Phase, dict[str, float]]:
    """The serial, concurrent and burst phases on one pair of running nodes, and the nodes'
    peak RSS at the end."""
    with node_processes(root, NODES) as processes:
        for name, process in processes.items():
            threading.Thread(target=drain, args=(process, outputs[name]), daemon=True).start()
        analysts = [
            Identity.load(root / f"analyst-{i:03d}") for i in range(1, options.analysts + 1)
        ]
        run = LoadRun(analysts, processes, expected, options.deadline)
        warm = run.query(analysts[0])  # the nodes' process pools start
        if warm.error is not None:
            raise SystemExit(f"the warm-up query failed: {warm.error}")

        one = Phase(*serial(run, options.serial_seconds))
        print(
            f"serial: {len(one.samples)} queries, {one.rate:.3f} queries/s, "
            f"p50 {percentile(one.latencies, 0.5):.2f} s; errors: {errors_by_kind(one.samples)}",
            flush=True,
        )

        with Probe(run) as probe:
            loaded = Phase(*concurrent(run, options.seconds), probe)
        for name, peak in run.peak_rss().items():
            probe.rss[name] = max(probe.rss[name], peak)
        wall = max(s.ended for s in loaded.samples) - loaded.started
        print(
            f"concurrent: {options.analysts} analysts, {len(loaded.latencies)} completed in "
            f"{wall:.1f} s, {loaded.rate:.3f} queries/s, p50 "
            f"{percentile(loaded.latencies, 0.5):.2f} s, p99 "
            f"{percentile(loaded.latencies, 0.99):.2f} s; errors: {errors_by_kind(loaded.samples)}",
            flush=True,
        )

        with Probe(run) as probe:
            started = time.perf_counter()
            bursting = Phase(burst(run, options.burst), started, probe)
        rss = run.peak_rss()
    return one, loaded, bursting, {n: max(rss[n], probe.rss[n]) for n in NODES}


def summary(
    options: argparse.Namespace,
    one: Phase,
    loaded: Phase,
    bursting: Phase,
    rss: dict[str, float],
) -> bool:
    """Print the table of figures; whether every correctness check held."""
    refused = [s for s in bursting.samples if s.error == RESOURCE_EXHAUSTED]
    others = [s for s in bursting.samples if s.error not in (None, RESOURCE_EXHAUSTED)]
    late = [s for s in bursting.samples if s.latency > options.deadline]
    failed = [s for s in loaded.samples if s.error is not None]
    wrong = [s for p in (one, loaded, bursting) for s in p.samples if s.error == "wrong count"]
    ratio = loaded.rate / one.rate if one.rate else math.nan
    completed_max = max(bursting.latencies, default=0.0)
    refused_max = max((s.latency for s in refused), default=0.0)
    print(
        f"burst: {options.burst} at once, {len(bursting.latencies)} completed, {len(refused)} "
        f"refused with {RESOURCE_EXHAUSTED}, {len(others)} other ({errors_by_kind(others)}); "
        f"max latency {max(completed_max, refused_max):.1f} s",
        flush=True,
    )
    for line in burst_breakdown(bursting.samples):
        print(line)
    loaded_rss = loaded.probe.rss if loaded.probe is not None else rss
    p50, p99 = percentile(loaded.latencies, 0.5), percentile(loaded.latencies, 0.99)
    rows: list[tuple[str, str, str, bool | None]] = [
        ("serial queries/s (1 analyst)", f"{one.rate:.3f}", "", None),
        ("serial latency p50 s", f"{percentile(one.latencies, 0.5):.2f}", "", None),
        (f"concurrent queries/s ({options.analysts} analysts)", f"{loaded.rate:.3f}", "", None),
        ("ratio concurrent / serial", f"{ratio:.2f}", ">= 0.90", ratio >= 0.9),
        ("concurrent latency p50 / p99 s", f"{p50:.2f} / {p99:.2f}", "", None),
        ("concurrent completed", f"{len(loaded.latencies)}", "", None),
        ("concurrent errors", f"{len(failed)}", "0", not failed),
        ("catalogue p50 / max ms (concurrent)", loaded.catalogue(), "", None),
        ("peak RSS MB tax / civil (concurrent)", megabytes(loaded_rss), "", None),
        (
            f"burst {options.burst}: completed / refused / other",
            f"{len(bursting.latencies)} / {len(refused)} / {len(others)}",
            "other 0",
            not others,
        ),
        (
            "burst max latency s: completed / refused",
            f"{completed_max:.1f} / {refused_max:.1f}",
            f"<= {options.deadline:g}",
            not late,
        ),
        ("catalogue p50 / max ms (burst)", bursting.catalogue(), "", None),
        ("peak RSS MB tax / civil (whole run)", megabytes(rss), "", None),
        ("wrong counts (all phases)", f"{len(wrong)}", "0", not wrong),
    ]
    print(f"\n{'':<44} {'value':>22} {'target':>9}")
    for label, value, target, met in rows:
        verdict = "" if met is None else ("  ok" if met else "  MISSED")
        print(f"{label:<44} {value:>22} {target:>9}{verdict}")
    print(f"{'machine at the end':<44} {loadavg():>22}")
    examples = error_examples([s for p in (one, loaded, bursting) for s in p.samples])
    if examples:
        print(
            "\nerrors other than RESOURCE_EXHAUSTED, one message of each kind:", *examples, sep="\n"
        )
    return not (wrong or others or late)


def burst_breakdown(samples: Sequence[Sample]) -> list[str]:
    """Per outcome: how long submission took (sign, submit to both nodes, until the runs are
    asked for), and how long the whole query, each as p50 / max."""
    lines = []
    outcomes = Counter(s.error or "completed" for s in samples)
    for outcome, count in outcomes.most_common():
        some = [s for s in samples if (s.error or "completed") == outcome]
        submit = [s.running - s.started for s in some if s.running is not None]
        total = [s.latency for s in some]
        ran = f"{len(submit)} reached the run, submission p50 / max " + (
            f"{percentile(submit, 0.5):.1f} / {max(submit):.1f} s" if submit else "-"
        )
        lines.append(
            f"  {outcome} {count}: {ran}; whole query p50 / max "
            f"{percentile(total, 0.5):.1f} / {max(total):.1f} s"
        )
    return lines


def megabytes(rss: dict[str, float]) -> str:
    return " / ".join(f"{rss[n]:.0f}" for n in NODES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysts", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=120.0, help="concurrent phase")
    parser.add_argument("--rows", type=int, default=10_000, help="rows per dataset")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--serial-seconds", type=float, default=30.0, help="serial baseline")
    parser.add_argument(
        "--deadline", type=float, default=300.0, help="the client's run timeout, seconds"
    )
    parser.add_argument(
        "--max-queued", type=int, default=None, help="each node's max_queued (node default)"
    )
    parser.add_argument("--dir", type=Path, default=Path("bench-run/load"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 analysts, 20 s, 2,000 rows, burst 40, max_queued 16",
    )
    options = parser.parse_args()
    if options.quick:
        for key, setting in QUICK.items():
            setattr(options, key, setting)
        if options.max_queued is None:
            options.max_queued = QUICK_MAX_QUEUED
    root: Path = options.dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    expected, queued = setup(
        root, rows=options.rows, analysts=options.analysts, max_queued=options.max_queued
    )
    print(
        f"PSI-CA (ε {EPSILON}) {options.rows:,} x {options.rows:,}, two node processes over mTLS "
        f"on loopback, {os.cpu_count()} cores; per node max_running {DEFAULT_MAX_RUNNING}, "
        f"max_queued {queued} ({DEFAULT_MAX_RUNNING + queued} places); run deadline "
        f"{options.deadline:g} s; {loadavg()}",
        flush=True,
    )
    outputs: dict[str, deque[str]] = {name: deque(maxlen=20) for name in NODES}
    one, loaded, bursting, rss = measure(root, options, expected, outputs)
    held = summary(options, one, loaded, bursting, rss)
    for name, lines in outputs.items():
        if lines:
            print(f"\nlast output of node {name}:", *lines, sep="\n  ")
    if not held:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
