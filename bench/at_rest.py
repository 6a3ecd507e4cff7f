"""Queries over rows sealed at rest against the same queries over rows in the clear, one run.

Two federations of two nodes (tax, civil) hold the same synthetic rows: in one, the nodes' stores
are opened with the node's data key, so rows are sealed (``govshare.node.data.at_rest``: AES-256-GCM
or SM4-GCM chunks of 10,000 rows) and every read decrypts and filters in the node; in the other,
the same stores are opened without a key and SQLite reads the rows in the clear. ``node serve``
always seals, so both federations' nodes are built the same way in this process (the stores
injected, as the tests build them) and served over mutual TLS on loopback; their per-row
cryptography runs in each node's process pool, as in ``node serve``. The analyst asks noised
PSI-cardinality queries of each federation in turn (clear, sealed, clear, ... ``--repeat``
times) after a warm-up, timed from the moment the nodes start their parts to the verified
receipt; the ratio is of the fastest run of each, which a busy machine slows least. The same
for a horizontal aggregate (COUNT and SUM of visits by district over both nodes' ``visits``,
Paillier), whose local step is the GROUP BY that sealed rows slow most. The reads alone
(``keys`` of the join column, ``group_sums`` by district) are timed too, the fastest of three.

    .venv/bin/python bench/at_rest.py [--size 100000] [--repeat 2] [--suite standard|sm]

Target (issue 12): a query over sealed rows <= 1.2 x the same query over rows in the clear.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_federation

from govshare.cli.dataset import parse_column
from govshare.client.analyst import StatusCallback, run_psi
from govshare.client.analyst_aggregate import run_horizontal_aggregate
from govshare.examples import synth
from govshare.model.aggregate_plan import (
    PAILLIER,
    Figures,
    GroupSpec,
    HorizontalPlan,
    Part,
    SumSpec,
)
from govshare.model.governance import Grade, Owner, OwnerKind, QueryKind, SharingType
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.api.server import create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.witness import WitnessStore
from govshare.node.config import NodeConfig
from govshare.node.data.at_rest import open_at_rest
from govshare.node.data.catalog import Catalogue
from govshare.node.data.mask_key import MaskSecret
from govshare.node.node import Node
from govshare.node.policy.crossborder import CrossBorderStore
from govshare.node.policy.grants import GrantStore
from govshare.node.stores.query_store import QueryStore
from govshare.protocols import dp
from govshare.protocols.suite import STANDARD

PURPOSE = "benchmark"
EPSILON = Fraction(1)
PROTOCOL_TIMEOUT = 1800.0
DISTRICTS = "|".join(synth.DISTRICTS)
DATASETS = {
    "tax": ("residents", synth.TAX, ("id_number=join_key:resident_id",
            f"district=group_key:domain={DISTRICTS}", "year=plaintext",
            "income_band=group_key:domain=low|middle|high", "annual_income=aggregate")),
    "civil": ("assistance", synth.CIVIL, ("id_number=join_key:resident_id",
              f"district=group_key:domain={DISTRICTS}", "year=plaintext",
              "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
              "amount=aggregate")),
}  # fmt: skip
SUM_COLUMN = {"tax": "annual_income", "civil": "amount"}
VISITS_COLUMNS = (f"district=group_key:domain={DISTRICTS}", "visits=aggregate")
VISITS_BOUND = 100  # above every visit count written


def write_visits(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        handle.write("district,visits\n")
        for _ in range(rows):
            handle.write(f"{rng.choice(synth.DISTRICTS)},{rng.randrange(31)}\n")


def build_node(home: Path, *, sealed: bool, suite: str) -> Node:
    """The node of ``home`` as ``Node.from_config`` builds it, with or without its data key."""
    config = NodeConfig.load(home)
    identity = Identity.load(config.identity_dir)
    database = config.database_path
    at_rest = open_at_rest(home, database, suite) if sealed else None
    return Node(
        identity=identity,
        catalogue=Catalogue(database, at_rest=at_rest),
        grants=GrantStore(database),
        crossborder_store=CrossBorderStore(database),
        query_store=QueryStore(database, at_rest=at_rest),
        audit=AuditLog.open(config.audit_database_path, suite=STANDARD),
        witness_store=WitnessStore(database),
        mask_secret=MaskSecret.load_or_create(home),
        protocol_timeout=PROTOCOL_TIMEOUT,
        rate_limit_per_minute=100_000,
    )


def setup(root: Path, data: Path, *, sealed: bool, suite: str) -> dict[str, Node]:
    make_federation(root, list(DATASETS), protocol_timeout=PROTOCOL_TIMEOUT)
    nodes = {}
    for name, (dataset, source, columns) in DATASETS.items():
        node = build_node(root / name, sealed=sealed, suite=suite)
        started = time.perf_counter()
        node.catalogue.add(
            data / f"{source}.csv", name=dataset, grade=Grade.GENERAL,
            sharing_type=SharingType.CONDITIONAL, owner=Owner(OwnerKind.STATE, "state", name),
            columns=[parse_column(c) for c in columns], actor=f"operator:{name}",
            audit=node.audit,
        )  # fmt: skip
        print(f"  {'sealed' if sealed else 'clear'} {name}: {dataset} imported in "
              f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        node.grants.issue(
            node.identity.signing_key, issuer=name, dataset=node.catalogue.get(dataset),
            grantee="alice", purpose=PURPOSE, columns=["id_number"],
            query_kinds=[QueryKind.PSI_CARDINALITY], expires_at=int(time.time()) + 86400,
            epsilon=Fraction(100), max_queries=1000, actor=f"operator:{name}", audit=node.audit,
        )  # fmt: skip
        visits = data / f"visits_{name}.csv"
        node.catalogue.add(
            visits, name="visits", grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
            owner=Owner(OwnerKind.STATE, "state", name),
            columns=[parse_column(c) for c in VISITS_COLUMNS], actor=f"operator:{name}",
            audit=node.audit,
        )  # fmt: skip
        node.grants.issue(
            node.identity.signing_key, issuer=name, dataset=node.catalogue.get("visits"),
            grantee="alice", purpose=PURPOSE, columns=["district", "visits"],
            query_kinds=[QueryKind.HORIZONTAL_AGGREGATE], expires_at=int(time.time()) + 86400,
            epsilon=Fraction(100), max_queries=1000, actor=f"operator:{name}", audit=node.audit,
        )  # fmt: skip
        nodes[name] = node
    return nodes


@contextmanager
def serving(nodes: dict[str, Node]) -> Iterator[None]:
    running = []
    try:
        for node in nodes.values():
            config = NodeConfig.load(node.identity.directory)
            running.append(create_server(node, config.listen))
        yield
    finally:
        for server in running:
            server.stop(0)
        for node in nodes.values():
            node.close()


def timed(start: list[float]) -> StatusCallback:
    def on_status(node: str, state: str, message: str) -> None:
        if state == "running" and not start:
            start.append(time.perf_counter())

    return on_status


def fastest(call: Callable[[], object], times: int = 3) -> float:
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


HORIZONTAL = HorizontalPlan(
    QueryKind.HORIZONTAL_AGGREGATE, PURPOSE, parts=tuple(Part(n, "visits") for n in DATASETS),
    figures=Figures(GroupSpec("district", synth.DISTRICTS),
                    (SumSpec("visits", VISITS_BOUND),), EPSILON),
    aggregator="tax", scheme=PAILLIER, public_key=b"",
)  # fmt: skip
PLAN = PsiPlan(
    kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE, left=Side("tax", "residents", "id_number"),
    right=Side("civil", "assistance", "id_number"), epsilon=EPSILON,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="rows per department")
    parser.add_argument("--repeat", type=int, default=2, help="queries of each federation")
    parser.add_argument("--suite", default="standard", choices=("standard", "sm"))
    parser.add_argument("--dir", type=Path, default=Path("bench-run/at_rest"))
    parser.add_argument(
        "--sealed-first", action="store_true", help="alternate sealed, clear (an order check)"
    )
    options = parser.parse_args()
    shutil.rmtree(options.dir, ignore_errors=True)
    options.dir.mkdir(parents=True)
    print(
        f"PSI cardinality over sealed rows vs rows in the clear, {options.size:,} rows a side, "
        f"suite {options.suite}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    data = options.dir / "data"
    manifest = synth.generate(data, size=options.size, seed=11)
    for i, name in enumerate(DATASETS):
        write_visits(data / f"visits_{name}.csv", options.size, seed=100 + i)
    expected = int(manifest["intersections"][synth.intersection_name(synth.TAX, synth.CIVIL)])
    feds = {
        variant: setup(options.dir / variant, data, sealed=variant == "sealed",
                       suite=options.suite)
        for variant in ("clear", "sealed")
    }  # fmt: skip
    reads: dict[str, dict[str, float]] = {}
    for variant, nodes in feds.items():
        tax = nodes["tax"].catalogue
        reads[variant] = {
            "keys": fastest(lambda: tax.keys("residents", "id_number")),  # noqa: B023
            "group_sums": fastest(lambda: tax.group_sums(  # noqa: B023
                "residents", group_by="district", sums=[(SUM_COLUMN["tax"], 10**9)])),
        }  # fmt: skip
    order = ("sealed", "clear") if options.sealed_first else ("clear", "sealed")
    walls: dict[str, list[float]] = {"clear": [], "sealed": []}
    horizontal: dict[str, list[float]] = {"clear": [], "sealed": []}
    alices = {v: Identity.load(options.dir / v / "alice") for v in feds}
    with serving(feds["clear"]), serving(feds["sealed"]):
        for variant in feds:
            run_psi(alices[variant], PLAN)  # warm-up: the nodes' process pools start
            run_horizontal_aggregate(alices[variant], HORIZONTAL)
        for variant in order * options.repeat:
            start: list[float] = []
            outcome = run_psi(alices[variant], PLAN, on_status=timed(start))
            walls[variant].append(time.perf_counter() - start[0])
            print(f"  {variant}: {walls[variant][-1]:.2f} s", flush=True)
            shift = dp.truncation_shift(EPSILON)
            if abs(outcome.count - expected) > shift:
                raise SystemExit(f"{variant}: count {outcome.count} is not {expected} +- {shift}")
        for variant in order * options.repeat:
            started = time.perf_counter()
            summed = run_horizontal_aggregate(alices[variant], HORIZONTAL)
            horizontal[variant].append(time.perf_counter() - started)
            print(f"  horizontal {variant}: {horizontal[variant][-1]:.2f} s "
                  f"({len(summed.groups)} groups)", flush=True)  # fmt: skip
    clear, sealed = min(walls["clear"]), min(walls["sealed"])
    print(f"{'':>22} {'clear s':>9} {'sealed s':>9} {'ratio':>6}  (fastest runs; load "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"{'PSI cardinality':>22} {clear:>9.2f} {sealed:>9.2f} {sealed / clear:>6.2f}")
    clear, sealed = min(horizontal["clear"]), min(horizontal["sealed"])
    print(f"{'horizontal aggregate':>22} {clear:>9.2f} {sealed:>9.2f} {sealed / clear:>6.2f}")
    for read in ("keys", "group_sums"):
        a, b = reads["clear"][read], reads["sealed"][read]
        print(f"{'read: ' + read:>22} {a:>9.3f} {b:>9.3f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
