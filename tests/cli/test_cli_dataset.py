"""``govshare dataset`` and ``govshare grant``: CliRunner, main()'s error handler, a subprocess."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from govshare.cli.dataset import parse_column
from govshare.cli.grant import parse_expiry
from govshare.cli.main import cli, main
from govshare.model.governance import ColumnKind, ColumnRule, Role
from govshare.model.identity import Federation, Identity, init_federation
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig, write_default
from govshare.node.data import resident_id
from govshare.node.data.catalog import Catalogue
from govshare.node.policy.grants import GrantStore, verify_grant
from govshare.protocols.errors import MalformedInput, NotFound
from govshare.protocols.suite import STANDARD

IDS = [resident_id.make("310101", date(1960 + i, 1 + i % 12, 1 + i), 2 * i) for i in range(8)]
COLUMNS = [
    "--column", "id_number=join_key:resident_id:mask=keep_last:4",
    "--column", "district=group_key:domain=east|west",
    "--column", "amount=aggregate",
    "--column", "name=masked:keep_last:1",
    "--column", "notes=deny",
]  # fmt: skip


def make_home(root: Path) -> Path:
    """A federation with one node, 'social' (CN), an analyst, and social's operator zhang-wei
    (every duty; bundle in HOME/operators/zhang-wei); returns the node's home."""
    init_federation(root / "federation", "testfed", suite=STANDARD)
    federation = Federation.load(root / "federation")
    federation, _ = federation.enrol(
        role=Role.NODE,
        name="social",
        jurisdiction="CN",
        address="127.0.0.1:7999",
        out=root / "social",
    )
    federation, _ = federation.enrol(
        role=Role.ANALYST, name="alice", jurisdiction="CN", out=root / "alice"
    )
    federation, _ = federation.enrol(
        role=Role.OPERATOR, name="zhang-wei", jurisdiction="CN",
        out=root / "social" / "operators" / "zhang-wei", node="social",
        duties=("register", "grant"),
    )  # fmt: skip
    federation.publish_roster(root / "social")
    write_default(root / "social", listen="127.0.0.1:7999")
    return root / "social"


def write_csv(path: Path, amounts: list[str]) -> Path:
    lines = ["id_number,district,amount,name,notes"]
    for i, amount in enumerate(amounts):
        lines.append(f"{IDS[i]},{'east' if i % 2 else 'west'},{amount},Person{i},n")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def audit_kinds(home: Path) -> list[tuple[str, str]]:
    """(kind, actor) of every entry in the node's audit log."""
    with AuditLog.open(NodeConfig.load(home).audit_database_path, suite=STANDARD) as log:
        return [(e.decode().kind, e.decode().actor) for e in log.iter_entries()]


@pytest.fixture(autouse=True)
def operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command acts as zhang-wei, found by name in the home's operators folder."""
    monkeypatch.setenv("GOVSHARE_OPERATOR", "zhang-wei")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def add_args(home: Path, csv_path: Path, *extra: str) -> list[str]:
    return [
        "dataset", "add", str(csv_path), "--home", str(home), "--name", "benefits",
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "individual",
        "--owner", "residents (in trust)", "--description", "monthly benefits",
        *COLUMNS, *extra,
    ]  # fmt: skip


def test_add_list_show_remove(home: Path, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "b.csv", ["100", "200", "300", "400"])
    added = run(*add_args(home, csv_path, "--json"))
    assert added.exit_code == 0, added.output
    report = json.loads(added.output)
    assert (report["dataset"], report["imported"], report["rejected"]) == ("benefits", 4, 0)

    listed = json.loads(run("dataset", "list", "--home", str(home), "--json").output)
    assert [d["name"] for d in listed] == ["benefits"]
    assert listed[0]["owner"] == {
        "kind": "individual",
        "name": "residents (in trust)",
        "holder": "social",  # defaults to this node
    }

    shown = json.loads(run("dataset", "show", "benefits", "--home", str(home), "--json").output)
    assert shown["columns"][0] == {
        "name": "id_number",
        "kind": "join_key",
        "key_type": "resident_id",
        "domain": [],
        "mask": "keep_last:4",
    }
    table = run("dataset", "show", "benefits", "--home", str(home))
    assert "east|west" in table.output and "keep_last:1" in table.output

    removed = run("dataset", "remove", "benefits", "--home", str(home), "--yes", "--json")
    said = json.loads(removed.output)
    assert (said["removed"], said["row_count"]) == ("benefits", 4)
    assert (said["destroyed"]["rows"], said["destroyed"]["key_shredded"]) == (4, True)
    assert Catalogue(NodeConfig.load(home).database_path).list() == []
    assert audit_kinds(home) == [
        ("dataset.added", "zhang-wei"),
        ("operator.act", "zhang-wei"),
        ("dataset.removed", "zhang-wei"),
        ("dataset.destroyed", "zhang-wei"),
        ("operator.act", "zhang-wei"),
    ]


def test_skip_invalid_reports_rejections(home: Path, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "b.csv", ["100", "x", "300", "4.5"])
    result = run(*add_args(home, csv_path, "--skip-invalid"))
    assert result.exit_code == 0, result.output
    assert "2 rows imported, 2 rejected" in result.output
    assert "row 2 (line 3): column amount: not an integer" in result.output


def test_bad_row_is_one_line_error_and_exit_1(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = write_csv(tmp_path / "b.csv", ["100", "200", "lots", "400"])
    with pytest.raises(SystemExit) as exited:
        main(add_args(home, csv_path))
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: row 3 (line 4): column amount: not an integer"]
    assert Catalogue(NodeConfig.load(home).database_path).list() == []
    assert audit_kinds(home) == []  # a refused import leaves no trace but its error


def test_unknown_dataset_as_subprocess(home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()",
         "dataset", "show", "nothing", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: no dataset 'nothing'"]


def test_none_sharing_without_legal_basis_refused(home: Path, tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "b.csv", ["1"])
    args = add_args(home, csv_path)
    args[args.index("conditional")] = "none"
    with pytest.raises(MalformedInput, match="legal_basis"):
        run(*args)


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ("id=join_key:resident_id", ColumnRule("id", ColumnKind.JOIN_KEY, key_type="resident_id")),
        (
            "id=join_key:text:mask=hash_prefix",
            ColumnRule("id", ColumnKind.JOIN_KEY, key_type="text", mask="hash_prefix"),
        ),
        ("d=group_key:domain=a|b|c", ColumnRule("d", ColumnKind.GROUP_KEY, domain=("a", "b", "c"))),
        ("n=masked:keep_last:1", ColumnRule("n", ColumnKind.MASKED, mask="keep_last:1")),
        ("amount=aggregate", ColumnRule("amount", ColumnKind.AGGREGATE)),
        ("x=deny", ColumnRule("x", ColumnKind.DENY)),
    ],
)
def test_parse_column(spec: str, rule: ColumnRule) -> None:
    assert parse_column(spec) == rule


@pytest.mark.parametrize(
    "spec",
    ["noequals", "=aggregate", "x=secret", "x=aggregate:1", "d=group_key:a|b", "k=join_key:t:x"],
)
def test_parse_column_refuses(spec: str) -> None:
    with pytest.raises(MalformedInput):
        parse_column(spec)


# --------------------------------------------------------------------------- govshare grant


@pytest.fixture
def registered(tmp_path: Path) -> Path:
    """A node home with the dataset 'benefits' registered."""
    home = make_home(tmp_path)
    csv_path = write_csv(tmp_path / "b.csv", ["100", "200", "300"])
    assert run(*add_args(home, csv_path)).exit_code == 0
    return home


def grant_args(home: Path, *extra: str, grantee: str = "alice") -> list[str]:
    return [
        "grant", "add", "--home", str(home), "--dataset", "benefits", "--grantee", grantee,
        "--purpose", "poverty relief evaluation", "--columns", "id_number, amount",
        "--kinds", "psi_cardinality,intersection_aggregate", "--expires", "2099-12-31",
        "--epsilon", "1.5", "--max-queries", "100", *extra,
    ]  # fmt: skip


def test_grant_add_list_revoke(registered: Path) -> None:
    added = run(*grant_args(registered, "--json"))
    assert added.exit_code == 0, added.output
    grant = json.loads(added.output)
    assert grant["columns"] == ["amount", "id_number"]
    assert grant["epsilon"] == "1.5"
    assert grant["issuer"] == "social"
    assert grant["expires_at"] == int(dt.datetime(2100, 1, 1, tzinfo=dt.UTC).timestamp())

    # The stored grant carries the node's signature, checkable with the roster's key.
    stored = GrantStore(NodeConfig.load(registered).database_path).get(grant["grant_id"])
    node_key = Identity.load(registered).roster.member("social").verify_key()
    verify_grant(stored, node_key)

    listed = json.loads(
        run("grant", "list", "--home", str(registered), "--grantee", "alice", "--json").output
    )
    assert [g["grant_id"] for g in listed] == [grant["grant_id"]]
    assert (
        json.loads(
            run("grant", "list", "--home", str(registered), "--grantee", "bob", "--json").output
        )
        == []
    )

    table = run("grant", "list", "--home", str(registered))
    assert grant["grant_id"] in table.output and "active" in table.output

    revoked = run(
        "grant",
        "revoke",
        grant["grant_id"],
        "--home",
        str(registered),
        "--reason",
        "done",
        "--json",
    )
    assert json.loads(revoked.output)["revoked_at"] is not None
    assert (
        json.loads(run("grant", "list", "--home", str(registered), "--active", "--json").output)
        == []
    )
    shown = run("grant", "show", grant["grant_id"], "--home", str(registered))
    assert "revoked" in shown.output and "done" in shown.output
    assert audit_kinds(registered) == [
        ("dataset.added", "zhang-wei"),
        ("operator.act", "zhang-wei"),
        ("grant.created", "zhang-wei"),
        ("operator.act", "zhang-wei"),
        ("grant.revoked", "zhang-wei"),
        ("operator.act", "zhang-wei"),
    ]
    assert (
        GrantStore(NodeConfig.load(registered).database_path).get(grant["grant_id"]).granted_by
        == "zhang-wei"
    )


def test_grantee_must_be_a_member(registered: Path) -> None:
    with pytest.raises(NotFound, match="not a member"):
        run(*grant_args(registered, grantee="mallory"))


def test_unknown_column_is_one_line_error(
    registered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = grant_args(registered)
    args[args.index("id_number, amount")] = "notes"
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: column 'notes' of 'benefits' is 'deny' and cannot be granted"
    ]
    assert GrantStore(NodeConfig.load(registered).database_path).list() == []


def test_past_expiry_refused(registered: Path) -> None:
    args = grant_args(registered)
    args[args.index("2099-12-31")] = "2001-01-01"
    with pytest.raises(MalformedInput, match="future"):
        run(*args)


def test_parse_expiry() -> None:
    assert parse_expiry("2027-12-31") == int(dt.datetime(2028, 1, 1, tzinfo=dt.UTC).timestamp())
    assert parse_expiry("2027-12-31T18:00:00+08:00") == int(
        dt.datetime(2027, 12, 31, 10, 0, tzinfo=dt.UTC).timestamp()
    )
    for bad in ("31/12/2027", "2027-12-31T18:00:00", "soon"):
        with pytest.raises(MalformedInput):
            parse_expiry(bad)
