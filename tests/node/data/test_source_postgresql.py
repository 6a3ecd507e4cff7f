"""Datasets read live from a real PostgreSQL server, through real nodes over mutual TLS.

The same synthetic data is registered twice on each node — imported from its CSV (SQLite) and
as a live PostgreSQL table — and every query is asked of both: the answers must be equal.
Then what only a live source has: a row committed while a query runs stays out of it (one
snapshot per query), a bad row is left out and counted, a server that is down refuses the
query naming the source while the node goes on answering from its other datasets, and no
password reaches node.db or the audit log.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PURPOSE,
    FederationFixture,
    build_federation,
    intersection_plan,
    postgres_server,
    served,
)

from govshare.client.analyst import run_psi
from govshare.client.analyst_aggregate import run_horizontal_aggregate, run_intersection_aggregate
from govshare.examples import synth
from govshare.examples.postgres import PgServer
from govshare.model.aggregate_plan import (
    Figures,
    GroupSpec,
    HorizontalPlan,
    IntersectionPlan,
    Part,
    SumSpec,
)
from govshare.model.conditions import Condition
from govshare.model.governance import Grade, Owner, OwnerKind, QueryKind, SharingType
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.states import FAILED
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.data.live import READ_EVENT
from govshare.node.data.masking import apply_mask
from govshare.node.data.sources import LiveSource, parse_source
from govshare.node.data.sources.postgresql import WHITESPACE, PostgresSource
from govshare.node.node import Node
from govshare.protocols import dp
from govshare.protocols.errors import Conflict, MalformedInput, Unavailable
from govshare.protocols.suite import STANDARD

KEY_BITS = 1024  # small test keys; the aggregate tests run 3072
MASK = "keep_last:4"
VISITS_BOUND = 100
KINDS = [
    QueryKind.PSI_CARDINALITY,
    QueryKind.PSI_MEMBERSHIP,
    QueryKind.INTERSECTION_AGGREGATE,
    QueryKind.HORIZONTAL_AGGREGATE,
]
SOURCES = ("sql", "pg")  # dataset name suffixes: imported from the CSV, or live in PostgreSQL


def _columns() -> dict[str, tuple[str, ...]]:
    districts = "|".join(synth.DISTRICTS)
    return {
        "residents": (
            f"id_number=join_key:resident_id:mask={MASK}", f"district=group_key:domain={districts}",
            "year=plaintext", "income_band=group_key:domain=low|middle|high",
            "annual_income=aggregate",
        ),
        "assistance": (
            f"id_number=join_key:resident_id:mask={MASK}", f"district=group_key:domain={districts}",
            "year=plaintext",
            "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
            "amount=aggregate",
        ),
        "visits": (
            "id_number=join_key:resident_id", f"district=group_key:domain={districts}",
            "age_band=group_key:domain=" + "|".join(synth.AGE_BANDS), "year=plaintext",
            "visits=aggregate",
        ),
    }  # fmt: skip


# Realistic column types: the years and amounts are numbers in the department's database.
TABLES = {
    "residents": "id_number text, district text, year integer, income_band text,"
    " annual_income bigint",
    "assistance": "id_number text, district text, year integer, assistance_type text,"
    " amount numeric(12, 0)",
    "visits": "id_number text, district text, age_band text, year integer, visits integer",
}


@dataclass
class Live:
    fed: FederationFixture
    pg: PgServer
    nodes: dict[str, Node]
    data: Path
    csvs: dict[str, Path]  # table -> the CSV both sources were loaded from


def _rules(specs: tuple[str, ...]) -> tuple[list[Any], dict[str, Any]]:
    from govshare.cli.dataset import parse_column_spec

    parsed = [parse_column_spec(s) for s in specs]
    return [r for r, _ in parsed], {r.name: f for r, f in parsed}


def add(
    node: Node, source: Path | LiveSource, name: str, table: str, *, skip_invalid: bool = False
) -> None:
    rules, formats = _rules(_columns()[table])
    node.catalogue.add(
        source, name=name, grade=Grade.GENERAL, sharing_type=SharingType.UNCONDITIONAL,
        owner=Owner(OwnerKind.STATE, "state", node.name), columns=rules, formats=formats,
        actor=f"operator:{node.name}", audit=node.audit, skip_invalid=skip_invalid,
    )  # fmt: skip
    node.grants.issue(
        node.identity.signing_key, issuer=node.name, dataset=node.catalogue.get(name),
        grantee="alice", purpose=PURPOSE, columns=[r.name for r in rules], query_kinds=KINDS,
        expires_at=2**40, epsilon=Fraction(1000), max_queries=1000,
        actor=f"operator:{node.name}", audit=node.audit,
    )  # fmt: skip


def load(
    pg: PgServer, table: str, csv_path: Path, *, extra: Sequence[tuple[object, ...]] = ()
) -> None:
    """Create ``table`` from ``csv_path`` (and ``extra`` rows) in the department's database."""
    with pg.admin() as conn:
        kind = table.split("_")[0]
        conn.execute(f"CREATE TABLE {table} ({TABLES[kind]})")
        with conn.cursor() as cursor:
            with cursor.copy(f"COPY {table} FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
                copy.write(csv_path.read_bytes())
            for row in extra:
                marks = ", ".join(["%s"] * len(row))
                cursor.execute(f"INSERT INTO {table} VALUES ({marks})", row)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with postgres_server() as pg:
        fed = build_federation(tmp_path_factory.mktemp("pgfed"), "pgfed")
        data = tmp_path_factory.mktemp("pgdata")
        synth.generate(data, size=1000, seed=5)
        csvs = {
            "residents": data / f"{synth.TAX}.csv",
            "assistance": data / f"{synth.CIVIL}.csv",
        }
        # The clinic visits in two parts, one per node (a horizontal aggregate).
        with open(data / f"{synth.HEALTH}.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        for i, owner in enumerate(("tax", "civil")):
            part = data / f"visits_{owner}.csv"
            with open(part, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([rows[0], *rows[1:][i::2]])
            csvs[f"visits_{owner}"] = part
        for table, path in csvs.items():
            load(pg, table, path)
        homes = {"tax": ("residents", "visits_tax"), "civil": ("assistance", "visits_civil")}
        with served(fed, homes) as nodes:
            for name, tables in homes.items():
                for table in tables:
                    kind = table.split("_")[0]
                    add(nodes[name], csvs[table], f"{kind}_sql", kind)
                    source = PostgresSource.parse(pg.location(), table)
                    add(nodes[name], source, f"{kind}_pg", kind)
            yield Live(fed, pg, nodes, data, csvs)


def membership(source: str, where: tuple[Condition, ...] = ()) -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP,
        purpose=PURPOSE,
        left=Side("tax", f"residents_{source}", "id_number", where),
        right=Side("civil", f"assistance_{source}", "id_number"),
    )


def district_plan(source: str) -> IntersectionPlan:
    return intersection_plan(
        f"assistance_{source}", f"residents_{source}",
        matcher_where=(Condition("income_band", "!=", "low"),),
        group=GroupSpec("assistance_type", synth.ASSISTANCE_TYPES),
    )  # fmt: skip


def reads(node: Node, query_id: str) -> list[dict[str, Any]]:
    return [
        dict(e.fields)
        for e in (entry.decode() for entry in node.audit.entries_for_query(query_id))
        if e.kind == READ_EVENT
    ]


def csv_keys(path: Path, **where: str) -> set[str]:
    with path.open(encoding="utf-8") as handle:
        return {
            resident_id.normalise(row["id_number"])
            for row in csv.DictReader(handle)
            if all(row[k] == v for k, v in where.items())
        }


# --------------------------------------------------------------------------- same answers


def test_psi_membership_is_the_same_from_postgresql_and_sqlite(live: Live) -> None:
    where = (Condition("income_band", "=", "high"),)
    alice = live.fed.identity("alice")
    answers = {source: run_psi(alice, membership(source, where)) for source in SOURCES}
    matching = csv_keys(live.csvs["residents"], income_band="high") & csv_keys(
        live.csvs["assistance"]
    )
    expected = sorted(apply_mask(MASK, k, suite=STANDARD) for k in matching)
    assert len(expected) > 5
    assert sorted(answers["sql"].records) == expected
    assert sorted(answers["pg"].records) == expected
    # Each PostgreSQL-sourced node logged its read: the filtered rows and their digest.
    pg_query = answers["pg"].query_id
    (tax_read,) = reads(live.nodes["tax"], pg_query)
    assert tax_read["dataset"] == "residents_pg" and tax_read["read"] == "keys"
    assert tax_read["rows"] == sum(1 for _ in _csv_rows(live.csvs["residents"], "high"))
    assert tax_read["rejected_rows"] == 0 and len(tax_read["rows_sha256"]) == 64
    assert tax_read["source"] == f"{live.pg.location()} table public.residents"
    assert reads(live.nodes["tax"], answers["sql"].query_id) == []  # imported rows: no entry


def _csv_rows(path: Path, band: str) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        yield from (row for row in csv.DictReader(handle) if row["income_band"] == band)


def test_psi_cardinality_reads_the_rows_its_pushed_down_filters_select(live: Live) -> None:
    tax_where = (Condition("year", "=", "2025"), Condition("annual_income", ">=", 200000))
    civil_where = (Condition("assistance_type", "in", ("temporary", "extreme_poverty")),)
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents_pg", "id_number", tax_where),
        right=Side("civil", "assistance_pg", "id_number", civil_where),
        epsilon=Fraction(2),
    )  # fmt: skip
    outcome = run_psi(live.fed.identity("alice"), plan)
    with live.csvs["residents"].open(encoding="utf-8") as handle:
        tax_rows = [
            r for r in csv.DictReader(handle)
            if r["year"] == "2025" and int(r["annual_income"]) >= 200000
        ]  # fmt: skip
    with live.csvs["assistance"].open(encoding="utf-8") as handle:
        civil_rows = [
            r for r in csv.DictReader(handle)
            if r["assistance_type"] in ("temporary", "extreme_poverty")
        ]  # fmt: skip
    (tax_read,) = reads(live.nodes["tax"], outcome.query_id)
    (civil_read,) = reads(live.nodes["civil"], outcome.query_id)
    assert (tax_read["rows"], civil_read["rows"]) == (len(tax_rows), len(civil_rows))
    assert 0 < len(tax_rows) < 1000 and 0 < len(civil_rows) < 1000
    truth = len(
        {resident_id.normalise(r["id_number"]) for r in tax_rows}
        & {resident_id.normalise(r["id_number"]) for r in civil_rows}
    )
    shift = dp.truncation_shift(Fraction(2))
    assert max(truth - shift, 0) <= outcome.count <= truth + shift


def test_intersection_aggregate_is_the_same_from_postgresql_and_sqlite(live: Live) -> None:
    alice = live.fed.identity("alice")
    outcomes = {
        source: run_intersection_aggregate(
            alice, district_plan(source), key_bits=KEY_BITS, unsafe_allow_short_modulus=True
        )
        for source in SOURCES
    }
    figures = {
        source: [(g.label, g.suppressed, g.count.value, g.sums["amount"].value)
                 for g in outcome.groups]
        for source, outcome in outcomes.items()
    }  # fmt: skip
    assert figures["pg"] == figures["sql"]
    assert sum(1 for _, suppressed, _, _ in figures["pg"] if not suppressed) >= 2
    # The value holder read its rows twice (a count, then the rows) from one snapshot.
    count_read, rows_read = reads(live.nodes["civil"], outcomes["pg"].query_id)
    assert (count_read["read"], rows_read["read"]) == ("count", "rows")
    assert count_read["rows_sha256"] == rows_read["rows_sha256"]
    assert count_read["snapshot"] == rows_read["snapshot"] != ""


def test_horizontal_aggregate_is_the_same_from_postgresql_and_sqlite(live: Live) -> None:
    alice = live.fed.identity("alice")
    totals = {}
    for source in SOURCES:
        plan = HorizontalPlan(
            QueryKind.HORIZONTAL_AGGREGATE, PURPOSE,
            parts=(Part("tax", f"visits_{source}"), Part("civil", f"visits_{source}",
                                                          (Condition("year", "=", "2025"),))),
            figures=Figures(GroupSpec("age_band", synth.AGE_BANDS),
                            (SumSpec("visits", VISITS_BOUND),), Fraction(1)),
            aggregator="civil", scheme="paillier", public_key=b"",
        )  # fmt: skip
        outcome = run_horizontal_aggregate(
            alice, plan, key_bits=KEY_BITS, unsafe_allow_short_modulus=True
        )
        totals[source] = [(g.label, g.count.value, g.sums["visits"].value) for g in outcome.groups]
    assert totals["pg"] == totals["sql"]
    assert any(count for _, count, _ in totals["pg"])


def test_filters_give_the_same_rows_as_the_imported_copy(live: Live) -> None:
    catalogue = live.nodes["tax"].catalogue
    some = sorted(csv_keys(live.csvs["residents"]))[:3]
    conditions = [
        (),
        (Condition("income_band", "!=", "low"),),
        (Condition("district", "<", "M"), Condition("year", ">=", "2025")),
        (Condition("annual_income", ">", 150000), Condition("annual_income", "<=", 400000)),
        (Condition("annual_income", "in", (0, 271555, 1)),),
        (Condition("id_number", "in", tuple(k.lower() for k in some)),),  # join key: normalised
        (Condition("id_number", "=", some[0]),),
    ]
    for where in conditions:
        assert catalogue.count("residents_pg", where=where) == catalogue.count(
            "residents_sql", where=where
        ), where
        assert catalogue.keys("residents_pg", "id_number", where=where) == catalogue.keys(
            "residents_sql", "id_number", where=where
        ), where
        # A live table has no import order: its keys come sorted whatever is asked.
        assert catalogue.keys(
            "residents_pg", "id_number", where=where, import_order=True
        ) == catalogue.keys("residents_sql", "id_number", where=where)
    assert catalogue.keys("residents_pg", "id_number", where=conditions[-1]) == [some[0]]
    assert catalogue.group_sums(
        "residents_pg", group_by="income_band", sums=[("annual_income", 300000)]
    ) == catalogue.group_sums(
        "residents_sql", group_by="income_band", sums=[("annual_income", 300000)]
    )


# --------------------------------------------------------------------------- one snapshot


def _insert_during(
    monkeypatch: pytest.MonkeyPatch,
    live: Live,
    node: str,
    read: str,
    row: tuple[object, ...],
    table: str,
    *,
    after: bool,
) -> list[bool]:
    """Commit ``row`` into ``table`` from another connection when ``node`` first calls
    ``catalogue.<read>`` (before or after that read): the hook stands in for a department's
    application writing while a query runs."""
    catalogue = live.nodes[node].catalogue
    original: Callable[..., Any] = getattr(catalogue, read)
    done: list[bool] = []

    def insert() -> None:
        if not done:
            with live.pg.admin() as conn:
                marks = ", ".join(["%s"] * len(row))
                conn.execute(f"INSERT INTO {table} VALUES ({marks})", row)
            done.append(True)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if not after:
            insert()
        result = original(*args, **kwargs)
        if after:
            insert()
        return result

    monkeypatch.setattr(catalogue, read, hooked)
    return done


def _new_resident(serial: int) -> str:
    return resident_id.make("110101", date(1955, 5, 5), serial)


def test_a_row_inserted_between_the_passes_does_not_change_the_answer(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = live.fed.identity("alice")
    before = run_intersection_aggregate(
        alice, district_plan("pg"), key_bits=KEY_BITS, unsafe_allow_short_modulus=True
    )
    # A 2025 payment to a resident tax knows, not of low income, of the largest released kind:
    # it would join and change that group's figures.
    kind = max(
        (g for g in before.groups if not g.suppressed), key=lambda g: g.count.value or 0
    ).label
    with live.csvs["residents"].open(encoding="utf-8") as handle:
        high = next(
            resident_id.normalise(r["id_number"]) for r in csv.DictReader(handle)
            if r["income_band"] != "low"
        )  # fmt: skip
    row = (high, synth.DISTRICTS[0], 2025, kind, 20000)
    inserted = _insert_during(monkeypatch, live, "civil", "count", row, "assistance", after=True)
    try:
        during = run_intersection_aggregate(
            alice, district_plan("pg"), key_bits=KEY_BITS, unsafe_allow_short_modulus=True
        )
        assert inserted == [True]  # the row was committed after the count, before the rows
        monkeypatch.undo()
        after = run_intersection_aggregate(
            alice, district_plan("pg"), key_bits=KEY_BITS, unsafe_allow_short_modulus=True
        )
    finally:
        monkeypatch.undo()
        with live.pg.admin() as conn:
            conn.execute("DELETE FROM assistance WHERE amount = 20000 AND id_number = %s", (high,))

    def sums(outcome: Any) -> dict[str, tuple[int | None, int | None]]:
        return {g.label: (g.count.value, g.sums["amount"].value) for g in outcome.groups}

    assert sums(during) == sums(before)
    count_read, rows_read = reads(live.nodes["civil"], during.query_id)
    assert count_read["rows"] == rows_read["rows"]
    assert count_read["rows_sha256"] == rows_read["rows_sha256"]
    # The next query saw the row: the hook did change the data.
    count, total = sums(before)[kind]
    assert sums(after)[kind] == ((count or 0) + 1, (total or 0) + 20000)


def test_a_row_inserted_once_the_query_runs_stays_out_of_its_psi(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = live.fed.identity("alice")
    plan = membership("pg")
    before = sorted(run_psi(alice, plan).records)
    civil_only = sorted(csv_keys(live.csvs["assistance"]) - csv_keys(live.csvs["residents"]))[0]
    # The query has started on tax (its snapshot is taken) when the row lands, just before tax
    # reads its keys: a resident civil also knows, so it would join.
    row = (civil_only, synth.DISTRICTS[0], 2025, "high", 500000)
    inserted = _insert_during(monkeypatch, live, "tax", "keys", row, "residents", after=False)
    try:
        during = sorted(run_psi(alice, plan).records)
        assert inserted == [True]
        monkeypatch.undo()
        after = sorted(run_psi(alice, plan).records)
    finally:
        monkeypatch.undo()
        with live.pg.admin() as conn:
            conn.execute("DELETE FROM residents WHERE id_number = %s", (civil_only,))
    assert during == before
    assert after == sorted([*before, apply_mask(MASK, civil_only, suite=STANDARD)])


# --------------------------------------------------------------------------- bad rows


def test_a_bad_key_row_is_skipped_and_counted(live: Live) -> None:
    good = sorted(csv_keys(live.csvs["residents"]))[0]
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")  # wrong check character
    load(live.pg, "residents_dirty", live.csvs["residents"],
         extra=[(bad, synth.DISTRICTS[0], 2025, "high", 1)])  # fmt: skip
    tax = live.nodes["tax"]
    source = PostgresSource.parse(live.pg.location(), "public.residents_dirty")
    with pytest.raises(MalformedInput, match=r"row \d+ of the read: column id_number"):
        add(tax, source, "dirty", "residents")  # as a CSV import: refused without --skip-invalid
    add(tax, source, "dirty", "residents", skip_invalid=True)
    assert tax.catalogue.get("dirty").row_count == tax.catalogue.get("residents_pg").row_count
    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP, purpose=PURPOSE,
        left=Side("tax", "dirty", "id_number"), right=Side("civil", "assistance_sql", "id_number"),
    )  # fmt: skip
    outcome = run_psi(live.fed.identity("alice"), plan)
    clean = run_psi(live.fed.identity("alice"), membership("sql"))
    assert sorted(outcome.records) == sorted(clean.records)
    (read,) = reads(tax, outcome.query_id)
    assert read["rejected_rows"] == 1
    assert read["rows"] == tax.catalogue.get("residents_sql").row_count
    (reason,) = read["first_rejections"]
    assert "column id_number" in reason and bad not in reason  # never the value


# --------------------------------------------------------------------------- credentials


def test_a_location_with_a_password_is_refused_without_echoing_it() -> None:
    for location in (
        "postgresql://dept:s3cret-pw@db.example/registry",
        "host=db.example dbname=registry password=s3cret-pw",
    ):
        with pytest.raises(MalformedInput) as refused:
            parse_source(location, "public.residents")
        assert "s3cret-pw" not in str(refused.value)
        assert "PGPASSWORD" in str(refused.value) and "service file" in str(refused.value)
    with pytest.raises(MalformedInput, match=r"schema\.name"):
        parse_source("service=dept", "a.b.c")
    assert parse_source("service=dept", "residents").describe() == (
        "service=dept table public.residents"
    )


def test_no_password_in_node_db_or_the_audit_log(live: Live) -> None:
    secret = live.pg.password.encode()
    for name in ("tax", "civil"):
        config = NodeConfig.load(live.fed.node_home(name))
        for path in config.home.rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), path
    stored = live.nodes["tax"].catalogue.record("residents_pg")
    assert stored.live == PostgresSource(live.pg.location(), "public", "residents")


def test_whitespace_is_what_python_strips() -> None:
    assert WHITESPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


# --------------------------------------------------------------------------- source down


def test_a_source_that_is_down_refuses_its_query_and_the_node_serves_the_others(
    live: Live,
) -> None:
    alice = live.fed.identity("alice")
    tax = live.nodes["tax"]
    live.pg.stop()
    try:
        with pytest.raises(Unavailable) as refused:
            run_psi(alice, membership("pg"))
        message = str(refused.value)
        assert "node tax: dataset 'residents_pg' cannot be read" in message
        assert f"source {live.pg.location()} table public.residents is unavailable" in message
        assert live.pg.password not in message
        failed = [
            e.decode()
            for e in tax.audit.entries_for_query(_last_query(tax))
            if e.decode().kind == "query.failed"
        ]
        assert len(failed) == 1 and "residents_pg" in str(failed[0].fields["reason"])
        # The same node, the same moment: its imported datasets still answer.
        outcome = run_psi(alice, membership("sql"))
        assert len(outcome.records) > 10
    finally:
        live.pg.start()
    assert sorted(run_psi(alice, membership("pg")).records) == sorted(outcome.records)


def _last_query(node: Node) -> str:
    (record,) = [r for r in node.query_store.with_state(FAILED) if r.dataset == "residents_pg"]
    return record.query_id


def test_pushed_down_filters_agree_with_the_catalogue_on_blanks_and_white_space(
    live: Live, tmp_path: Path
) -> None:
    """Cells with surrounding (Unicode) white space, NULLs and blanks under each NULL policy,
    decimals at a scale: every filter counts the same rows from PostgreSQL as from the CSV
    copy, and the same rows are rejected or skipped."""
    ids = [resident_id.make("110101", date(1970, 1, 1 + i), i) for i in range(9)]
    rows: list[tuple[str | None, ...]] = [
        (ids[0], "a", "x", "12.50"),
        (ids[1], " a ", "  x", "3"),
        (ids[2], "\u3000b", None, None),  # note blank (keep), amount blank (zero)
        (ids[3], "b", "", "-7.25"),
        (ids[4], "b", "y\u00a0", "0"),
        (ids[5], "c", "x", "1"),  # label outside the domain: rejected
        (ids[6], None, "x", "1"),  # label blank: null=skip-row
        (ids[7].lower(), "a", "é", "100.01"),
        (ids[8], "a", "z", "1.001"),  # more places than the scale: rejected
    ]
    with live.pg.admin() as conn:
        conn.execute(
            "CREATE TABLE edges (id_number text, label varchar(10), note text, amount numeric)"
        )
        for row in rows:
            conn.execute("INSERT INTO edges VALUES (%s, %s, %s, %s)", row)
    path = tmp_path / "edges.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(
            [("id_number", "label", "note", "amount"), *[["" if v is None else v for v in r]
                                                        for r in rows]]
        )  # fmt: skip
    tax = live.nodes["tax"]
    rules, formats = _rules(
        ("id_number=join_key:resident_id", "label=group_key:domain=a|b:null=skip-row",
         "note=plaintext", "amount=aggregate:scale=2:null=zero")
    )  # fmt: skip
    for name, origin in (
        ("edges_sql", path),
        ("edges_pg", PostgresSource.parse(live.pg.location(), "edges")),
    ):
        report = tax.catalogue.add(
            origin, name=name, grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
            owner=Owner(OwnerKind.STATE, "state", "tax"), columns=rules, formats=formats,
            actor="operator:tax", audit=None, skip_invalid=True,
        )  # fmt: skip
        assert (report.imported, report.rejected, report.skipped) == (6, 2, 1), name
    # (filter, rows it keeps of the six good ones)
    conditions = [
        (Condition("label", "=", "a"), 3),
        (Condition("label", "!=", "a"), 3),
        (Condition("label", ">=", "b"), 3),
        (Condition("note", "=", "x"), 2),
        (Condition("note", "!=", "x"), 4),
        (Condition("note", "<", "y"), 4),  # "", "", "x", "x" (blank kept as "")
        (Condition("note", ">", "x"), 2),  # "y", "é"
        (Condition("note", "=", ""), 2),
        (Condition("note", "in", ("x", "", "é")), 5),
        (Condition("amount", ">=", 0), 5),
        (Condition("amount", "<", 1), 3),  # 0 (blank, zero), -725, 0
        (Condition("amount", "=", 1250), 1),
        (Condition("amount", "in", (0, 300, 10001)), 4),
        (Condition("id_number", "=", ids[7].lower()), 1),
    ]
    columns = ["id_number", "note", "amount"]
    for condition, kept in conditions:
        sql_rows = sorted(tax.catalogue.rows("edges_sql", columns, where=(condition,)))
        pg_rows = sorted(tax.catalogue.rows("edges_pg", columns, where=(condition,)))
        assert pg_rows == sql_rows, condition
        assert len(sql_rows) == kept, condition


def test_a_relation_that_changed_under_the_registration_is_a_conflict_naming_it(
    live: Live,
) -> None:
    tax = live.nodes["tax"]
    load(live.pg, "residents_moving", live.csvs["residents"])
    add(tax, PostgresSource.parse(live.pg.location(), "residents_moving"), "moving", "residents")
    assert tax.catalogue.keys("moving", "id_number") == tax.catalogue.keys(
        "residents_pg", "id_number"
    )
    with live.pg.admin() as conn:
        conn.execute("ALTER TABLE residents_moving RENAME COLUMN income_band TO band")
    with pytest.raises(Conflict, match=r"residents_moving has no column\(s\) 'income_band'"):
        tax.catalogue.keys("moving", "id_number")
    with live.pg.admin() as conn:
        conn.execute("ALTER TABLE residents_moving RENAME TO residents_gone")
    with pytest.raises(Conflict) as gone:
        tax.catalogue.count("moving")
    assert f"source {live.pg.location()} table public.residents_moving cannot be read" in str(
        gone.value
    )
