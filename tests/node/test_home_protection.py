"""A node's home at rest (issue 12, items 4 and 5): private modes checked at start, rows and
results sealed, the data key split and recovered, results deleted after their retention.

Real parts: the session federation's serving nodes over mutual TLS, ``govshare node serve`` and
``govshare node key`` as subprocesses, SQLite files grepped byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import date
from pathlib import Path

import pytest
from conftest import PSI_EPSILON, PURPOSE, FederationFixture, PsiData, grant

from govshare.client.analyst import run_psi
from govshare.model.conditions import Condition
from govshare.model.governance import ColumnKind, ColumnRule, Owner, OwnerKind, QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig, write_default
from govshare.node.data import resident_id
from govshare.node.data.at_rest import open_at_rest
from govshare.node.home_permissions import (
    HomeNotPrivate,
    check_home_permissions,
    refuse_unless_private,
)
from govshare.node.keystore import data_key_path
from govshare.node.node import Node
from govshare.node.stores.query_store import QueryStore
from govshare.node.stores.retention import DAY, ResultsRetention
from govshare.protocols.errors import MalformedInput
from govshare.protocols.suite import STANDARD

IDS = [resident_id.make("110101", date(1970, 1 + i, 1 + i), i) for i in range(2)]


# Reads every file under a home in a child process: a read here would open and close node.db in
# the process that serves it, which drops SQLite's POSIX locks on it (sqlite.org/howtocorrupt).
_GREP = """
import json, pathlib, sys
home, needles = pathlib.Path(sys.argv[1]), [bytes.fromhex(h) for h in sys.argv[2:]]
files = [(str(p.relative_to(home)), p.read_bytes()) for p in home.rglob("*") if p.is_file()]
print(json.dumps([[name for name, data in files if n in data] for n in needles]))
"""


def grep_homes(home: Path, needles: list[bytes]) -> list[list[str]]:
    """For each needle, the files under ``home`` holding it (node.db, its WAL, the log, all)."""
    found = subprocess.run(
        [sys.executable, "-c", _GREP, str(home), *(n.hex() for n in needles)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result: list[list[str]] = json.loads(found.stdout)
    return result


def grep_home(home: Path, needle: bytes) -> list[str]:
    return grep_homes(home, [needle])[0]


def govshare(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def copy_home(fed: FederationFixture, tmp_path: Path) -> Path:
    """A copy of the never-started ghost node's home (modes kept), for tests that damage it."""
    home = tmp_path / "ghost"
    shutil.copytree(fed.node_home("ghost"), home)
    return home


def logged(log: AuditLog) -> list[tuple[str, dict[str, object], str]]:
    """(kind, fields, actor) of every entry of a real audit log."""
    return [
        (e.kind, dict(e.fields), e.actor) for e in (x.decode() for x in log.entries(0, log.size))
    ]


# --------------------------------------------------------------------------- modes


def test_node_init_makes_a_bundle_folder_a_private_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "tls.crt").write_text("certificate")
    (home / "sub").mkdir(mode=0o755)
    (home / "sub" / "x").write_text("x")
    os.chmod(home / "tls.crt", 0o644)
    write_default(home, listen="127.0.0.1:1")
    assert check_home_permissions(home) == []
    assert NodeConfig.load(home).results_days == 90


def test_a_home_open_to_others_is_refused_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "a").write_text("a")
    (home / "b").write_text("b")
    os.chmod(home / "a", 0o644)
    os.chmod(home / "b", 0o640)
    with pytest.raises(HomeNotPrivate) as refused:
        refuse_unless_private(home)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{home / 'a'}: mode 0644, expected 0600" in message
    assert f"chmod 600 '{home / 'a'}'" in message and "1 more path(s)" in message


def test_serve_refuses_a_home_with_a_world_readable_file(
    fed: FederationFixture, tmp_path: Path
) -> None:
    home = copy_home(fed, tmp_path)
    assert check_home_permissions(home) == []
    os.chmod(home / "tls.crt", 0o644)
    refused = govshare("node", "serve", "--home", str(home))
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: refusing to start: node home not private: ")
    assert f"{home / 'tls.crt'}: mode 0644, expected 0600" in line
    assert f"chmod 600 '{home / 'tls.crt'}'" in line
    assert not (home / "node.db").exists()  # refused before any store was opened


def test_serve_refuses_a_wrong_data_key(fed: FederationFixture, tmp_path: Path) -> None:
    home = copy_home(fed, tmp_path)
    config = NodeConfig.load(home)
    os.close(os.open(config.database_path, os.O_CREAT | os.O_RDWR, 0o600))
    open_at_rest(home, config.database_path, STANDARD)  # the store records this key
    data_key_path(home).write_bytes(os.urandom(32))  # another key in its place (mode kept)
    refused = govshare("node", "serve", "--home", str(home))
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert "the data key does not open" in line and "govshare node key recover" in line


# --------------------------------------------------------------------------- the serving node


def test_a_serving_node_keeps_its_home_private_and_holds_no_plaintext_id(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """After a membership query whose matches tax keeps: every mode in both homes is right,
    and no file of tax's home holds a resident ID of its dataset or a key it kept."""
    grant(psi_data.tax, "residents", "alice", ["id_number", "income_band"],
          [QueryKind.PSI_MEMBERSHIP])  # fmt: skip
    grant(psi_data.civil, "assistance", "alice", ["id_number"], [QueryKind.PSI_MEMBERSHIP])
    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP, purpose=PURPOSE,
        left=Side("civil", "assistance", "id_number"),
        right=Side("tax", "residents", "id_number", (Condition("income_band", "=", "high"),)),
        recipient="tax", epsilon=PSI_EPSILON,
    )  # fmt: skip
    outcome = run_psi(fed.identity("alice"), plan)
    kept = psi_data.tax.query_store.matches(outcome.query_id)
    assert kept  # the manifest's tax_high & civil is not empty at this seed
    for name in ("tax", "civil"):
        assert check_home_permissions(fed.node_home(name)) == [], name
    home = fed.node_home("tax")
    ids = psi_data.tax.catalogue.keys("residents", "id_number")
    assert len(ids) > 300
    needles = [k.encode() for k in [*kept, *ids[::7]]]
    assert grep_homes(home, needles) == [[] for _ in needles]


# --------------------------------------------------------------------------- key recovery


def test_k_of_n_recovery_restores_a_working_node(fed: FederationFixture, tmp_path: Path) -> None:
    home = copy_home(fed, tmp_path)
    config = NodeConfig.load(home)
    node = Node.from_config(config)  # its first start makes the data key
    try:
        rows = tmp_path / "rows.csv"
        rows.write_text(f"id_number,amount\n{IDS[0]},5\n{IDS[1]},7\n")
        node.catalogue.add(
            rows, name="kept", grade="general", sharing_type="conditional",
            owner=Owner(OwnerKind.STATE, "state", "ghost"),
            columns=[ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
                     ColumnRule("amount", ColumnKind.AGGREGATE)],
            actor="op-ghost", audit=node.audit,
        )  # fmt: skip
    finally:
        node.close()
    key_file = data_key_path(home)
    original = key_file.read_bytes()
    officers = ("li", "wang", "zhao", "chen")
    split = govshare(
        "node", "key", "split", "--key-file", str(key_file), "--node", "ghost",
        *[arg for officer in officers for arg in ("--officer", officer)], "-k", "3",
        "--out", str(tmp_path / "shares"),
    )  # fmt: skip
    assert split.returncode == 0, split.stderr
    shares = sorted((tmp_path / "shares").iterdir())
    assert len(shares) == 4
    key_file.unlink()  # the key is lost; node.db still holds rows sealed under it
    lost = govshare("node", "serve", "--home", str(home))
    assert lost.returncode == 1 and "no data key" in lost.stderr and "recover" in lost.stderr
    too_few = govshare("node", "key", "recover", *map(str, shares[:2]), "--out", str(key_file))
    assert too_few.returncode == 1 and not key_file.exists()
    recovered = govshare("node", "key", "recover", *map(str, shares[1:]), "--out", str(key_file))
    assert recovered.returncode == 0, recovered.stderr
    assert key_file.read_bytes() == original
    assert check_home_permissions(home) == []
    node = Node.from_config(NodeConfig.load(home))
    try:
        assert node.catalogue.keys("kept", "id_number") == sorted(IDS)
    finally:
        node.close()


# --------------------------------------------------------------------------- retention


def test_retention_setting_is_read_and_checked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_default(home, listen="127.0.0.1:1")
    config = home / "node.toml"
    config.write_text(config.read_text().replace("results_days = 90", "results_days = 7"))
    assert NodeConfig.load(home).results_days == 7
    config.write_text(config.read_text().replace("results_days = 7", "results_days = -1"))
    with pytest.raises(MalformedInput, match=r"retention\.results_days"):
        NodeConfig.load(home)


def test_results_are_deleted_after_their_retention_and_it_is_logged(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    db = home / "node.db"
    store = QueryStore(db, at_rest=open_at_rest(home, db, STANDARD))
    saved = 1_700_000_000
    store.save_matches("q-old", ["110101197001010008", "110101197002020003"], now=saved)
    store.save_matches("q-new", ["110101197003030007"], now=saved + 5 * DAY)
    audit = AuditLog.open(tmp_path / "audit.db", suite=STANDARD)
    retention = ResultsRetention(store, audit, days=30, actor="tax")
    assert retention.run(now=saved + 30 * DAY - 1) == []  # not yet
    assert logged(audit) == []
    [sealed_old] = [bytes(r[0]) for r in store._db.execute(
        "SELECT sealed FROM sealed_matches WHERE query_id = 'q-old'")]  # fmt: skip
    assert grep_home(home, sealed_old[-16:])
    assert retention.run(now=saved + 30 * DAY + 1) == [("q-old", 2)]
    [(kind, fields, actor)] = logged(audit)
    assert (kind, actor) == ("results.expired", "tax")
    assert fields["queries"] == ["q-old"] and fields["keys"] == 2 and fields["results_days"] == 30
    assert grep_home(home, sealed_old[-16:]) == []  # overwritten, WAL cut
    left = [r[0] for r in store._db.execute("SELECT query_id FROM sealed_matches")]
    assert left == ["q-new"]
    for needle in (b"110101197001010008", b"110101197003030007"):
        assert grep_home(home, needle) == []  # sealed all along
    store.close()


def test_a_pass_runs_at_start_with_the_clock_it_is_given(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    db = home / "node.db"
    store = QueryStore(db, at_rest=open_at_rest(home, db, STANDARD))
    store.save_matches("q-1", ["110101197001010008"], now=1_000)
    audit = AuditLog.open(tmp_path / "audit.db", suite=STANDARD)
    retention = ResultsRetention(
        store, audit, days=1, actor="tax", clock=lambda: 1_000 + DAY + 1, interval=10**9
    )
    retention.start()
    try:
        assert [kind for kind, _, _ in logged(audit)] == ["results.expired"]
    finally:
        retention.stop()
        store.close()
    never = ResultsRetention(QueryStore(db), audit, days=0, actor="tax")
    assert never.run(now=10**12) == []


# --------------------------------------------------------------------------- destruction


def test_dataset_remove_on_a_serving_node_leaves_no_byte_of_it(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """The operator removes a dataset with the CLI while tax serves: its rows' key and chunks
    are gone from every file of the home, and the log names the person who signed the act."""
    home = fed.node_home("tax")
    ids = [resident_id.make("440103", date(1988, 3, 1 + i), 700 + i) for i in range(25)]
    rows = tmp_path / "doomed.csv"
    rows.write_text("id_number,amount\n" + "".join(f"{k},{i}\n" for i, k in enumerate(ids)))
    added = govshare(
        "dataset", "add", str(rows), "--home", str(home), "--name", "doomed", "--grade",
        "general", "--sharing", "conditional", "--owner-kind", "state", "--owner", "state",
        "--column", "id_number=join_key:resident_id", "--column", "amount=aggregate",
        "--identity", fed.operator("tax"),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert psi_data.tax.catalogue.count("doomed") == 25  # the serving node reads it
    db = NodeConfig.load(home).database_path
    with closing(sqlite3.connect(db)) as conn:  # SQLite's own locks: safe in this process
        [(table, wrapped)] = conn.execute(
            "SELECT table_name, wrapped_key FROM sealed_tables JOIN datasets USING (table_name)"
            " WHERE name = 'doomed'"
        ).fetchall()
        [(chunk,)] = conn.execute(f'SELECT sealed FROM "{table}"').fetchall()
    assert grep_home(home, bytes(wrapped)[-16:]) and grep_home(home, bytes(chunk)[40:72])
    removed = govshare(
        "dataset", "remove", "doomed", "--home", str(home), "--yes", "--json",
        "--identity", fed.operator("tax"),
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    destroyed = json.loads(removed.stdout)["destroyed"]
    assert (destroyed["rows"], destroyed["key_shredded"]) == (25, True)
    assert destroyed["wal_truncated"] is True  # no reader held an older snapshot
    needles = [bytes(wrapped)[-16:], bytes(chunk)[40:72], *(k.encode() for k in ids)]
    assert grep_homes(home, needles) == [[] for _ in needles]
    person = fed.identity("op-tax").name
    entries = [e.decode() for e in psi_data.tax.audit.entries(0, psi_data.tax.audit.size)]
    [record] = [
        e for e in entries if e.kind == "dataset.destroyed" and e.fields["name"] == "doomed"
    ]
    assert record.actor == person and record.fields["digest"] == destroyed["digest"]
