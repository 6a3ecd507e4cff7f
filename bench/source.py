"""A PostgreSQL-sourced PSI against the SQLite-sourced one: two node processes, one run.

For each size n, generates n rows per department (tax residents, civil assistance), starts a
throwaway PostgreSQL server (``govshare.examples.postgres``) and loads the same rows into it,
and registers every dataset twice on its node: imported from the CSV into the node's SQLite
store, and as a live PostgreSQL table (the same column rules). With both nodes running as
separate processes over mutual TLS, it asks noised PSI-cardinality queries of each pair in
turn (SQLite, PostgreSQL, SQLite, ... ``--repeat`` times each) after a warm-up, and times each
from the moment the nodes start their parts to the verified receipt; the ratio is of the
fastest run of each, which a busy machine slows least.
A live query also opens its snapshot and reads and validates every row through the rules (the
import did that once for the SQLite copy), so the ratio is what a department pays for leaving
its data where it lives.

    .venv/bin/python bench/source.py [--sizes 100000,1000000] [--repeat 2] [--dir ...]

Target (issue 13): a 1M-row PostgreSQL-sourced PSI <= 1.2 x the SQLite-sourced one.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, make_federation, node_processes

from govshare.cli.dataset import parse_column
from govshare.client.analyst import StatusCallback, run_psi
from govshare.examples import synth
from govshare.examples.postgres import PgServer
from govshare.model.governance import Grade, Owner, OwnerKind, QueryKind, SharingType
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.data.sources.postgresql import PostgresSource
from govshare.node.node import Node
from govshare.protocols import dp

PURPOSE = "benchmark"
EPSILON = Fraction(1)
# A generous wait for the peer: a 1M-row part masks for tens of seconds on two cores.
PROTOCOL_TIMEOUT = 1800.0
DISTRICTS = "|".join(synth.DISTRICTS)
DATASETS = {
    "tax": (
        "residents", synth.TAX,
        "id_number text, district text, year integer, income_band text, annual_income bigint",
        ("id_number=join_key:resident_id", f"district=group_key:domain={DISTRICTS}",
         "year=plaintext", "income_band=group_key:domain=low|middle|high",
         "annual_income=aggregate"),
    ),
    "civil": (
        "assistance", synth.CIVIL,
        "id_number text, district text, year integer, assistance_type text, amount integer",
        ("id_number=join_key:resident_id", f"district=group_key:domain={DISTRICTS}",
         "year=plaintext",
         "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
         "amount=aggregate"),
    ),
}  # fmt: skip


def setup(root: Path, n: int, pg: PgServer) -> int:
    """Federation, both copies of each dataset, grants; returns the known |A ∩ B|."""
    data = root / "data"
    manifest = synth.generate(data, size=n, seed=11)
    make_federation(root, list(DATASETS), protocol_timeout=PROTOCOL_TIMEOUT)
    for name, (dataset, source, ddl, columns) in DATASETS.items():
        csv = data / f"{source}.csv"
        with pg.admin() as conn:
            conn.execute(f"CREATE TABLE {dataset} ({ddl})")
            with conn.cursor().copy(f"COPY {dataset} FROM STDIN WITH (FORMAT csv, HEADER)") as cp:
                with csv.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        cp.write(block)
        node = Node.from_home(root / name)
        try:
            for suffix, origin in (
                ("sql", csv),
                ("pg", PostgresSource.parse(pg.location(), f"public.{dataset}")),
            ):
                started = time.perf_counter()
                node.catalogue.add(
                    origin, name=f"{dataset}_{suffix}", grade=Grade.GENERAL,
                    sharing_type=SharingType.CONDITIONAL,
                    owner=Owner(OwnerKind.STATE, "state", name),
                    columns=[parse_column(c) for c in columns],
                    actor=f"operator:{name}", audit=node.audit,
                )  # fmt: skip
                print(f"  {name}: {dataset}_{suffix} registered in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
                node.grants.issue(
                    node.identity.signing_key, issuer=name,
                    dataset=node.catalogue.get(f"{dataset}_{suffix}"), grantee="alice",
                    purpose=PURPOSE, columns=["id_number"],
                    query_kinds=[QueryKind.PSI_CARDINALITY], expires_at=int(time.time()) + 86400,
                    epsilon=Fraction(10), max_queries=100, actor=f"operator:{name}",
                    audit=node.audit,
                )  # fmt: skip
        finally:
            node.close()
    return int(manifest["intersections"][synth.intersection_name(synth.TAX, synth.CIVIL)])


def timed(running: list[float]) -> StatusCallback:
    def on_status(node: str, state: str, message: str) -> None:
        if state == "running" and not running:
            running.append(time.perf_counter())

    return on_status


def run_size(root: Path, n: int, pg: PgServer, repeat: int) -> dict[str, float]:
    expected = setup(root, n, pg)
    alice = Identity.load(root / "alice")

    def plan(suffix: str) -> PsiPlan:
        return PsiPlan(
            kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
            left=Side("tax", f"residents_{suffix}", "id_number"),
            right=Side("civil", f"assistance_{suffix}", "id_number"), epsilon=EPSILON,
        )  # fmt: skip

    walls: dict[str, list[float]] = {"sql": [], "pg": []}
    with node_processes(root, list(DATASETS)):
        run_psi(alice, plan("sql"))  # warm-up: the nodes' process pools start
        for suffix in ("sql", "pg") * repeat:
            start: list[float] = []
            outcome = run_psi(alice, plan(suffix), on_status=timed(start))
            walls[suffix].append(time.perf_counter() - start[0])
            print(f"  {n:,} {suffix}: {walls[suffix][-1]:.1f} s", flush=True)
            shift = dp.truncation_shift(EPSILON)
            if abs(outcome.count - expected) > shift:
                raise SystemExit(
                    f"{suffix}: noised count {outcome.count} is more than {shift} from {expected}"
                )
    sql, pg_wall = min(walls["sql"]), min(walls["pg"])
    return {"n": n, "sql": sql, "pg": pg_wall, "ratio": pg_wall / sql}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each source")
    parser.add_argument("--dir", type=Path, default=Path("bench-run/source"))
    options = parser.parse_args()
    print(f"PSI cardinality, SQLite-sourced vs PostgreSQL-sourced, {os.cpu_count()} cores")
    rows = []
    for n in (int(s) for s in options.sizes.split(",")):
        root = options.dir / str(n)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        pg = PgServer(free_port(), secrets.token_hex(16))
        pg.init()
        pg.start()
        previous = os.environ.get("PGPASSFILE")
        os.environ["PGPASSFILE"] = str(pg.passfile)  # the nodes' credential, as a department's
        try:
            pg.create_database()
            rows.append(run_size(root, n, pg, options.repeat))
        finally:
            if previous is None:
                os.environ.pop("PGPASSFILE", None)
            else:
                os.environ["PGPASSFILE"] = previous
            pg.stop()
            pg.remove()
    print(f"{'n per side':>12} {'SQLite s':>9} {'PostgreSQL s':>13} {'ratio':>6}  (fastest runs)")
    for row in rows:
        print(f"{row['n']:>12,} {row['sql']:>9.1f} {row['pg']:>13.1f} {row['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
