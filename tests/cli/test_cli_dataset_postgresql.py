"""``govshare dataset add --source ... --table ...``: a live PostgreSQL table, from the CLI.

A real PostgreSQL server (``govshare.examples.postgres``) holds the department's table; the
node's credential is a libpq password file in its environment, as a department would set it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import free_port

from govshare.cli.main import cli, main
from govshare.examples.postgres import PgServer
from govshare.model.governance import Role
from govshare.model.identity import Federation, init_federation
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig, write_default
from govshare.node.data import resident_id
from govshare.protocols.suite import STANDARD

IDS = [resident_id.make("310101", date(1960 + i, 1 + i % 12, 1 + i), 2 * i) for i in range(6)]
COLUMNS = [
    "--column", "id_number=join_key:resident_id:mask=keep_last:4",
    "--column", "district=group_key:domain=east|west",
    "--column", "amount=aggregate",
    "--column", "name=masked:keep_last:1",
    "--column", "notes=deny",
]  # fmt: skip


def make_home(root: Path) -> Path:
    """One node, 'social', and its operator zhang-wei (bundle in HOME/operators/zhang-wei)."""
    init_federation(root / "federation", "testfed", suite=STANDARD)
    federation = Federation.load(root / "federation")
    federation, _ = federation.enrol(
        role=Role.NODE, name="social", jurisdiction="CN", address="127.0.0.1:7999",
        out=root / "social",
    )  # fmt: skip
    federation, _ = federation.enrol(
        role=Role.OPERATOR, name="zhang-wei", jurisdiction="CN",
        out=root / "social" / "operators" / "zhang-wei", node="social", duties=("register",),
    )  # fmt: skip
    federation.publish_roster(root / "social")
    write_default(root / "social", listen="127.0.0.1:7999")
    return root / "social"


def audit_kinds(home: Path) -> list[tuple[str, str]]:
    with AuditLog.open(NodeConfig.load(home).audit_database_path, suite=STANDARD) as log:
        return [(e.decode().kind, e.decode().actor) for e in log.iter_entries()]


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer(free_port(), secrets.token_hex(16))
    server.init()
    server.start()
    try:
        server.create_database()
        with server.admin() as conn:
            conn.execute(
                "CREATE TABLE benefits (id_number text, district text, amount integer,"
                " name text, notes text)"
            )
            for i, id_number in enumerate(IDS):
                conn.execute(
                    "INSERT INTO benefits VALUES (%s, %s, %s, %s, %s)",
                    (id_number.lower(), "east" if i % 2 else "west", 100 * i, f"P{i}", None),
                )
        yield server
    finally:
        server.stop()
        server.remove()


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, pg: PgServer) -> None:
    monkeypatch.setenv("GOVSHARE_OPERATOR", "zhang-wei")
    monkeypatch.setenv("PGPASSFILE", str(pg.passfile))
    monkeypatch.delenv("PGPASSWORD", raising=False)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def add_args(
    home: Path, location: str, *extra: str, columns: tuple[str, ...] = tuple(COLUMNS)
) -> list[str]:
    return [
        "dataset", "add", "--source", location, "--table", "public.benefits",
        "--home", str(home), "--name", "benefits", "--grade", "general",
        "--sharing", "conditional", "--owner-kind", "state", "--owner", "civil affairs",
        *columns, *extra,
    ]  # fmt: skip


def test_add_registers_a_live_table_without_copying_it(tmp_path: Path, pg: PgServer) -> None:
    home = make_home(tmp_path)
    added = run(*add_args(home, pg.location(), "--json"))
    assert added.exit_code == 0, added.output
    report = json.loads(added.output)
    assert (report["imported"], report["rejected"], report["check"]) == (6, 0, False)
    shown = json.loads(run("dataset", "show", "benefits", "--home", str(home), "--json").output)
    assert shown["source"] == {
        "kind": "postgresql",
        "location": f"{pg.location()} table public.benefits",
    }
    assert shown["row_count"] == 6
    database = NodeConfig.load(home).database_path
    assert b"P5" not in database.read_bytes()  # no row was copied into node.db
    assert ("dataset.added", "zhang-wei") in audit_kinds(home)
    human = run("dataset", "show", "benefits", "--home", str(home))
    assert "│ source " in human.output and "(live; rows at" in human.output  # the table wraps


def test_add_prints_where_the_rows_stay(tmp_path: Path, pg: PgServer) -> None:
    home = make_home(tmp_path)
    added = run(*add_args(home, pg.location()))
    assert added.exit_code == 0, added.output
    assert "dataset benefits registered: 6 rows imported, 0 rejected" in added.output
    assert f"read live from {pg.location()} table public.benefits" in added.output


def test_a_password_in_the_source_is_refused_in_one_line(
    tmp_path: Path, pg: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    home = make_home(tmp_path)
    location = pg.location().replace("govshare@", f"govshare:{pg.password}@")
    with pytest.raises(SystemExit) as exited:
        main(add_args(home, location))
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: --source holds a password") and "PGPASSWORD" in error
    assert pg.password not in error
    assert run("dataset", "list", "--home", str(home), "--json").output.strip() == "[]"


def test_source_and_file_are_exclusive(tmp_path: Path, pg: PgServer) -> None:
    home = make_home(tmp_path)
    both = CliRunner().invoke(cli, ["dataset", "add", "x.csv", *add_args(home, pg.location())[2:]])
    assert both.exit_code == 2 and "give CSV_FILE, or --source" in both.output
    no_table = [a for a in add_args(home, pg.location()) if a not in ("--table", "public.benefits")]
    missing = CliRunner().invoke(cli, no_table)
    assert missing.exit_code == 2 and "--table" in missing.output


def test_a_rule_missing_for_a_column_is_refused(tmp_path: Path, pg: PgServer) -> None:
    home = make_home(tmp_path)
    assert COLUMNS[-2:] == ["--column", "notes=deny"]
    refused = CliRunner().invoke(cli, add_args(home, pg.location(), columns=tuple(COLUMNS[:-2])))
    assert refused.exit_code != 0
    assert "column(s) 'notes' have no rule" in str(refused.exception)
    assert "deny to keep it out of every query" in str(refused.exception)


def test_check_writes_nothing_and_remove_leaves_the_table(tmp_path: Path, pg: PgServer) -> None:
    home = make_home(tmp_path)
    checked = run(*add_args(home, pg.location(), "--check", "--json"))
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.output)["check"] is True
    assert run("dataset", "list", "--home", str(home), "--json").output.strip() == "[]"
    assert run(*add_args(home, pg.location())).exit_code == 0
    removed = json.loads(
        run("dataset", "remove", "benefits", "--home", str(home), "--yes", "--json").output
    )
    assert (removed["removed"], removed["row_count"]) == ("benefits", 6)
    # The node held none of a live table's rows: nothing of them to destroy here, no key.
    assert removed["destroyed"]["rows"] == 0 and removed["destroyed"]["key_shredded"] is False
    with pg.admin() as conn:
        row = conn.execute("SELECT count(*) FROM benefits").fetchone()
    assert row is not None and row[0] == 6  # the department's table is untouched
