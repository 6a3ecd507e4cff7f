"""Real department files through ``govshare dataset add|replace`` as a real subprocess.

GBK with Chinese headers, decimals, blank cells, a dry run, and refreshing a dataset without
voiding its grants (issue 14, item 5). Each test drives the installed CLI the way an operator
does and checks what landed in the node's stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import date
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    FederationFixture,
    PsiData,
    grant,
    psi_shift,
    wait_for_next_second,
)

from govshare.model.governance import ColumnAccess, ColumnUse, QueryKind, Role
from govshare.model.identity import Federation, Identity, init_federation
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig, write_default
from govshare.node.data import resident_id
from govshare.node.data.at_rest import open_at_rest
from govshare.node.data.catalog import Catalogue
from govshare.node.policy.decision import ALLOWED, AccessRequest, decide
from govshare.node.policy.grants import GrantStore
from govshare.protocols.suite import STANDARD

IDS = [resident_id.make("440106", date(1950 + i, 1 + i % 12, 1 + i % 28), i) for i in range(40)]


def make_home(root: Path) -> Path:
    """A federation with one node, 'social' (CN), an analyst, and social's operator zhang-wei
    (bundle in HOME/operators/zhang-wei, $GOVSHARE_OPERATOR of every command here); returns
    the node's home."""
    init_federation(root / "federation", "testfed", suite=STANDARD)
    federation = Federation.load(root / "federation")
    federation, _ = federation.enrol(
        role=Role.NODE, name="social", jurisdiction="CN", address="127.0.0.1:7999",
        out=root / "social",
    )  # fmt: skip
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


def govshare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "GOVSHARE_OPERATOR": "zhang-wei"},
    )  # fmt: skip


def audit_entries(home: Path) -> list[tuple[str, dict[str, object]]]:
    with AuditLog.open(NodeConfig.load(home).audit_database_path, suite=STANDARD) as log:
        return [(e.decode().kind, dict(e.decode().fields)) for e in log.iter_entries()]


def catalogue(home: Path) -> Catalogue:
    """The node's catalogue with its data key (rows the CLI imported are sealed at rest)."""
    config = NodeConfig.load(home)
    suite = Identity.load(config.identity_dir).roster.crypto
    return Catalogue(config.database_path, at_rest=open_at_rest(home, config.database_path, suite))


def digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path)


# A hospital's export: GBK (code page 936), Chinese headers, yuan with fen, some blank cells.
GBK_HEADER = "身份证号,区县,总费用(元),备注"
MAPS = (
    "--map", "身份证号=id_number", "--map", "区县=district",
    "--map", "总费用(元)=total_cost_yuan", "--map", "备注=notes",
)  # fmt: skip


def cost_args(home: Path, csv_path: Path, *extra: str, name: str = "costs") -> list[str]:
    return [
        "dataset", "add", str(csv_path), "--home", str(home), "--name", name,
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "state",
        "--owner", "Municipal Health Commission", *MAPS,
        "--column", "id_number=join_key:resident_id",
        "--column", "district=group_key:domain=越秀|天河",
        "--column", "total_cost_yuan=aggregate:scale=2",
        *extra,
    ]  # fmt: skip


def write_costs(path: Path, costs: list[str], *, notes: str = "无", encoding: str = "gbk") -> Path:
    lines = [GBK_HEADER]
    for i, cost in enumerate(costs):
        lines.append(f"{IDS[i]},{'天河' if i % 2 else '越秀'},{cost},{notes}")
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode(encoding))
    return path


def test_gbk_file_with_chinese_headers_mapped(home: Path, tmp_path: Path) -> None:
    csv_path = write_costs(tmp_path / "costs.csv", ["120.50", "80.00", "5"])
    with pytest.raises(UnicodeDecodeError):
        csv_path.read_text(encoding="utf-8")  # what today's main choked on
    result = govshare(*cost_args(home, csv_path, "--column", "notes=deny"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 rows imported, 0 rejected" in result.stdout
    assert "encoding gbk (detected)" in result.stdout
    stored = catalogue(home)
    assert [r.name for r in stored.get("costs").columns] == [
        "id_number", "district", "total_cost_yuan", "notes",
    ]  # fmt: skip
    assert list(stored.rows("costs", ["district", "total_cost_yuan"])) == [
        ("越秀", 12050),
        ("天河", 8000),
        ("越秀", 500),
    ]
    shown = json.loads(
        govshare("dataset", "show", "costs", "--home", str(home), "--json", cwd=tmp_path).stdout
    )
    assert shown["encoding"] == "gbk"
    assert shown["source_format"]["header_map"][0] == ["身份证号", "id_number"]
    [(kind, fields), (act, _)] = audit_entries(home)
    assert kind == "dataset.added" and fields["encoding"] == "gbk"
    assert act == "operator.act"


def test_named_encoding_and_tab_delimiter(home: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "costs.tsv"
    lines = [GBK_HEADER.replace(",", "\t")] + [
        f"{IDS[i]}\t越秀\t{i}.25\t无" for i in range(3)
    ]  # fmt: skip
    csv_path.write_bytes(("\n".join(lines) + "\n").encode("gb18030"))
    result = govshare(
        *cost_args(home, csv_path, "--column", "notes=deny"),
        "--encoding", "GB18030", "--delimiter", "\\t", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "encoding gb18030 (named)" in result.stdout
    assert sum(int(v[0]) for v in catalogue(home).rows("costs", ["total_cost_yuan"])) == 375


def test_a_mapped_header_the_file_lacks_is_refused(home: Path, tmp_path: Path) -> None:
    csv_path = write_costs(tmp_path / "costs.csv", ["1.00"])
    result = govshare(
        *cost_args(home, csv_path, "--column", "notes=deny"), "--map", "姓名=name", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {csv_path}: the header map names header(s) '姓名' that the file does not "
        "have; its headers: '身份证号', '区县', '总费用(元)', '备注'"
    ]
    assert catalogue(home).list() == []


def test_decimals_with_a_scale_are_stored_as_exact_integers(home: Path, tmp_path: Path) -> None:
    costs = ["0.10", "0.20", "1234.5", "-0.05", "12.340", "7"]
    csv_path = write_costs(tmp_path / "costs.csv", costs)
    result = govshare(*cost_args(home, csv_path, "--column", "notes=deny", "--json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["imported"] == 6
    stored = catalogue(home)
    fen = [v for (v,) in stored.rows("costs", ["total_cost_yuan"])]
    assert fen == [10, 20, 123450, -5, 1234, 700]
    # Sums stay exact integers in the stored unit: 0.10 + 0.20 is 30 fen, not 0.30000000000000004.
    [(count, total)] = stored.group_sums(
        "costs", group_by=None, sums=[("total_cost_yuan", 10**9)]
    ).values()
    assert (count, total) == (6, 10 + 20 + 123450 + 0 + 1234 + 700)  # clipped at 0, as always
    shown = json.loads(
        govshare("dataset", "show", "costs", "--home", str(home), "--json", cwd=tmp_path).stdout
    )
    assert shown["column_formats"]["total_cost_yuan"] == {"scale": 2, "null": "refuse"}
    table = govshare("dataset", "show", "costs", "--home", str(home), cwd=tmp_path).stdout
    assert "scale 2" in table


def test_too_many_decimal_places_refused_with_row_and_column(home: Path, tmp_path: Path) -> None:
    csv_path = write_costs(tmp_path / "costs.csv", ["1.50", "2.25", "3.125", "4"])
    result = govshare(*cost_args(home, csv_path, "--column", "notes=deny"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: row 3 (line 4): column total_cost_yuan: 3 decimal places, more than the "
        "column's scale 2"
    ]
    assert catalogue(home).list() == []
    assert audit_entries(home) == []


def write_blanks(path: Path) -> Path:
    """Four rows; row 2 has a blank cost, row 3 a blank note."""
    lines = [
        "id_number,total_cost_yuan,notes",
        f"{IDS[0]},1.00,a",
        f"{IDS[1]},,b",
        f"{IDS[2]},3.00,",
        f"{IDS[3]},4.00,d",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def blank_args(home: Path, csv_path: Path, cost_rule: str, notes_rule: str) -> list[str]:
    return [
        "dataset", "add", str(csv_path), "--home", str(home), "--name", "costs",
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "state",
        "--owner", "Health", "--column", "id_number=join_key:resident_id",
        "--column", cost_rule, "--column", notes_rule, "--json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("cost_rule", "notes_rule", "imported", "skipped", "blanks", "costs", "notes"),
    [
        # An aggregate's blank is refused by default: see the next test. Zero counts it as 0.
        (
            "total_cost_yuan=aggregate:scale=2:null=zero",
            "notes=plaintext",
            4,
            0,
            {"total_cost_yuan": 1, "notes": 1},
            [100, 0, 300, 400],
            ["a", "b", "", "d"],
        ),
        # skip-row leaves the row out and says so.
        (
            "total_cost_yuan=aggregate:scale=2:null=skip-row",
            "notes=plaintext",
            3,
            1,
            {"total_cost_yuan": 1, "notes": 1},
            [100, 300, 400],
            ["a", "", "d"],
        ),
        (
            "total_cost_yuan=aggregate:scale=2:null=zero",
            "notes=plaintext:null=skip-row",
            3,
            1,
            {"total_cost_yuan": 1, "notes": 1},
            [100, 0, 400],
            ["a", "b", "d"],
        ),
        # keep (a text column's default, here stated) stores the empty string.
        (
            "total_cost_yuan=aggregate:scale=2:null=zero",
            "notes=plaintext:null=keep",
            4,
            0,
            {"total_cost_yuan": 1, "notes": 1},
            [100, 0, 300, 400],
            ["a", "b", "", "d"],
        ),
    ],
)
def test_blank_cells_follow_their_null_policy(
    home: Path,
    tmp_path: Path,
    cost_rule: str,
    notes_rule: str,
    imported: int,
    skipped: int,
    blanks: dict[str, int],
    costs: list[int],
    notes: list[str],
) -> None:
    csv_path = write_blanks(tmp_path / "b.csv")
    result = govshare(*blank_args(home, csv_path, cost_rule, notes_rule), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["imported"], report["rejected"], report["skipped"]) == (imported, 0, skipped)
    assert report["blank_cells"] == blanks
    rows = list(catalogue(home).rows("costs", ["total_cost_yuan", "notes"]))
    assert [r[0] for r in rows] == costs
    assert [r[1] for r in rows] == notes


@pytest.mark.parametrize(
    ("cost_rule", "notes_rule", "message"),
    [
        (
            "total_cost_yuan=aggregate:scale=2",
            "notes=plaintext",
            "error: row 2 (line 3): column total_cost_yuan: not a decimal number: blank cell "
            "(null=refuse)",
        ),
        (
            "total_cost_yuan=aggregate:scale=2:null=refuse",
            "notes=plaintext:null=refuse",
            "error: row 2 (line 3): column total_cost_yuan: not a decimal number: blank cell "
            "(null=refuse)",
        ),
        (
            "total_cost_yuan=aggregate:scale=2:null=zero",
            "notes=plaintext:null=refuse",
            "error: row 3 (line 4): column notes: blank cell (null=refuse)",
        ),
        (
            "total_cost_yuan=aggregate:scale=2",
            "notes=plaintext:null=zero",
            "error: only an aggregate column takes null=zero ('notes')",
        ),
    ],
)
def test_blank_cells_refused_under_refuse(
    home: Path, tmp_path: Path, cost_rule: str, notes_rule: str, message: str
) -> None:
    csv_path = write_blanks(tmp_path / "b.csv")
    result = govshare(*blank_args(home, csv_path, cost_rule, notes_rule), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [message]
    assert catalogue(home).list() == []


def test_check_writes_nothing(home: Path, tmp_path: Path) -> None:
    good = write_costs(tmp_path / "v1.csv", ["1.00", "2.00", "3.00"])
    assert govshare(*cost_args(home, good, "--column", "notes=deny"), cwd=tmp_path).returncode == 0
    config = NodeConfig.load(home)
    stores = (config.database_path, config.audit_database_path)
    before = [digest(p) for p in stores]

    other = write_costs(tmp_path / "other.csv", ["1.00", "2.005", "", "4.00"])
    checked = govshare(
        *cost_args(home, other, "--column", "notes=deny", name="other"), "--check", cwd=tmp_path
    )
    # Refused as an import would be (exit 1), with every reason, and the encoding.
    assert checked.returncode == 1, checked.stderr
    assert "check of dataset other (nothing written): 2 rows to import, 2 rejected" in (
        checked.stdout
    )
    assert "encoding gbk (detected)" in checked.stdout
    assert (
        "rejected row 2 (line 3): column total_cost_yuan: 3 decimal places, more than the "
        "column's scale 2" in checked.stdout
    )
    assert "rejected row 3 (line 4): column total_cost_yuan: not a decimal number: blank cell" in (
        checked.stdout
    )
    assert "the import would be refused: 2 bad row(s)" in checked.stdout

    fine = govshare(
        *cost_args(home, other, "--column", "notes=deny", name="other"),
        "--check", "--skip-invalid", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert fine.returncode == 0, fine.stderr
    assert json.loads(fine.stdout)["would_import"] is True

    newer = write_costs(tmp_path / "v2.csv", ["1.00", "2.00", "3.00", "4.00"])
    replaced = govshare(
        "dataset", "replace", "costs", str(newer), "--home", str(home), "--check", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    report = json.loads(replaced.stdout)
    assert (report["imported"], report["version"], report["previous_row_count"]) == (4, 2, 3)

    assert [digest(p) for p in stores] == before
    assert [d.name for d in catalogue(home).list()] == ["costs"]
    assert catalogue(home).record("costs").version == 1
    assert [kind for kind, _ in audit_entries(home)] == ["dataset.added", "operator.act"]


def grant_args(home: Path) -> list[str]:
    return [
        "grant", "add", "--home", str(home), "--dataset", "costs", "--grantee", "alice",
        "--purpose", PURPOSE, "--columns", "id_number,total_cost_yuan",
        "--kinds", "intersection_aggregate", "--expires", "2099-12-31", "--epsilon", "5",
        "--max-queries", "10", "--json",
    ]  # fmt: skip


def aggregate_request() -> AccessRequest:
    return AccessRequest(
        requester="alice",
        role=Role.ANALYST,
        jurisdiction="CN",
        query_kind=QueryKind.INTERSECTION_AGGREGATE,
        columns=(
            ColumnAccess("id_number", ColumnUse.JOIN),
            ColumnAccess("total_cost_yuan", ColumnUse.AGGREGATE),
        ),
        purpose=PURPOSE,
        dp_noise=True,
        epsilon=Fraction(1),
    )


def test_replace_keeps_grants_and_is_logged(home: Path, tmp_path: Path) -> None:
    v1 = write_costs(tmp_path / "v1.csv", ["1.00", "2.00", "3.00"])
    assert govshare(*cost_args(home, v1, "--column", "notes=deny"), cwd=tmp_path).returncode == 0
    added = govshare(*grant_args(home), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    grant_id = json.loads(added.stdout)["grant_id"]
    registered = catalogue(home).get("costs").created_at
    # The refresh comes in a later second than the grant: a refresh that registered the dataset
    # anew would then void the grant (grant.predates_dataset compares whole seconds).
    wait_for_next_second(int(time.time()))

    again = govshare(*cost_args(home, v1, "--column", "notes=deny"), cwd=tmp_path)
    assert again.returncode == 1
    assert "already registered" in again.stderr  # add still refuses an existing name

    v2 = write_costs(tmp_path / "v2.csv", ["1.00", "2.00", "3.00", "4.50", "5.25"])
    replaced = govshare("dataset", "replace", "costs", str(v2), "--home", str(home), cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert "dataset costs replaced: 5 rows imported, 0 rejected" in replaced.stdout
    assert "version 2, replacing 3 rows" in replaced.stdout
    assert "encoding gbk (detected)" in replaced.stdout  # read as the first file was

    shown = json.loads(
        govshare("dataset", "show", "costs", "--home", str(home), "--json", cwd=tmp_path).stdout
    )
    assert (shown["version"], shown["row_count"], shown["created_at"]) == (2, 5, registered)
    assert shown["replaced_at"] >= registered + 1
    table = govshare("dataset", "show", "costs", "--home", str(home), cwd=tmp_path).stdout
    assert "version" in table and "replaced" in table
    assert sum(int(v[0]) for v in catalogue(home).rows("costs", ["total_cost_yuan"])) == 1575

    kinds = [kind for kind, _ in audit_entries(home)]
    assert kinds == [
        "dataset.added", "operator.act", "grant.created", "operator.act", "dataset.replaced",
        "operator.act",
    ]  # fmt: skip
    fields = audit_entries(home)[-2][1]
    assert fields["name"] == "costs"
    assert (fields["previous_row_count"], fields["row_count"]) == (3, 5)
    assert (fields["previous_version"], fields["version"]) == (1, 2)
    assert fields["previous_source_sha256"] == digest(v1)[1]
    assert fields["source_sha256"] == digest(v2)[1]

    # The grant is still in force for the refreshed dataset: the node's policy admits it.
    database = NodeConfig.load(home).database_path
    grants = GrantStore(database).list(dataset="costs")
    assert [g.grant_id for g in grants] == [grant_id]
    decision = decide(
        aggregate_request(),
        catalogue(home).get("costs"),
        grants,
        now=int(time.time()),
        node_jurisdiction="CN",
    )
    assert (decision.allowed, decision.rule) == (True, ALLOWED), decision.message
    listed = govshare("grant", "list", "--home", str(home), "--json", cwd=tmp_path)
    assert [g["grant_id"] for g in json.loads(listed.stdout)] == [grant_id]


def test_grants_voided_by_remove_then_add_are_listed_as_void(home: Path, tmp_path: Path) -> None:
    """A grant outlives neither its dataset's removal nor its registration anew (queries are
    refused with grant.predates_dataset): 'grant list' and 'grant show' say so."""
    v1 = write_costs(tmp_path / "v1.csv", ["1.00", "2.00"])
    assert govshare(*cost_args(home, v1, "--column", "notes=deny"), cwd=tmp_path).returncode == 0
    added = govshare(*grant_args(home), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    grant_id = json.loads(added.stdout)["grant_id"]

    def listed() -> dict[str, object]:
        out = govshare("grant", "list", "--home", str(home), "--json", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        (only,) = json.loads(out.stdout)
        assert only["grant_id"] == grant_id
        return dict(only)

    assert (listed()["status"], listed()["not_in_force"]) == ("active", None)
    wait_for_next_second(int(time.time()))
    removed = govshare("dataset", "remove", "costs", "--yes", "--home", str(home), cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    gone = listed()
    assert (gone["status"], gone["not_in_force"]) == ("void", "grant.predates_dataset")
    assert "was removed" in str(gone["why"])
    assert govshare(*cost_args(home, v1, "--column", "notes=deny"), cwd=tmp_path).returncode == 0
    again = listed()
    assert (again["status"], again["not_in_force"]) == ("void", "grant.predates_dataset")
    assert "predates the registration of 'costs'" in str(again["why"])
    table = govshare("grant", "list", "--home", str(home), cwd=tmp_path)
    assert "void: dataset re-added" in table.stdout and "active" not in table.stdout
    shown = govshare("grant", "show", grant_id, "--home", str(home), cwd=tmp_path)
    assert "void: dataset re-added" in shown.stdout
    # The node's own check agrees: the policy refuses the grant with the rule listed.
    database = NodeConfig.load(home).database_path
    decision = decide(
        aggregate_request(), catalogue(home).get("costs"), GrantStore(database).list(),
        now=int(time.time()), node_jurisdiction="CN",
    )  # fmt: skip
    assert (decision.allowed, decision.rule) == (False, "grant.predates_dataset")


def test_replace_refuses_to_change_the_registration(home: Path, tmp_path: Path) -> None:
    v1 = write_costs(tmp_path / "v1.csv", ["1.00", "2.00"])
    assert govshare(*cost_args(home, v1, "--column", "notes=deny"), cwd=tmp_path).returncode == 0
    before = digest(NodeConfig.load(home).audit_database_path)
    for change in (
        ["--grade", "important"],
        ["--column", "id_number=join_key:resident_id", "--column",
         "district=group_key:domain=越秀|天河", "--column", "total_cost_yuan=aggregate:scale=3",
         "--column", "notes=deny"],
    ):  # fmt: skip
        result = govshare(
            "dataset", "replace", "costs", str(v1), "--home", str(home), *change, cwd=tmp_path
        )
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert line.startswith("error: dataset replace keeps the registration of 'costs'")
        assert "remove the dataset and add it again" in line
        assert change[0] in line
    # Restating what is registered is fine.
    same = govshare(
        "dataset", "replace", "costs", str(v1), "--home", str(home), "--grade", "general",
        "--column", "id_number=join_key:resident_id", "--column",
        "district=group_key:domain=越秀|天河", "--column", "total_cost_yuan=aggregate:scale=2",
        "--column", "notes=deny", "--check", cwd=tmp_path,
    )  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert digest(NodeConfig.load(home).audit_database_path) == before


def test_a_grant_still_admits_real_queries_after_replace(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """A PSI through the running nodes, asked after the tax operator refreshed the dataset."""
    tax_home = fed.node_home("tax")
    civil_keys = psi_data.civil.catalogue.keys("assistance", "id_number")
    outsiders = [resident_id.make("650102", date(1940 + i % 50, 1, 1), i) for i in range(60)]

    def tax_file(path: Path, shared: int) -> Path:
        lines = ["身份证号,年份"] + [f"{k},2025" for k in [*civil_keys[:shared], *outsiders]]
        path.write_bytes(("\n".join(lines) + "\n").encode("gbk"))
        return path

    added = govshare(
        "dataset", "add", str(tax_file(tmp_path / "v1.csv", 60)), "--home", str(tax_home),
        "--name", "refreshed", "--grade", "general", "--sharing", "conditional",
        "--owner-kind", "state", "--owner", "State Taxation Administration",
        "--map", "身份证号=id_number", "--map", "年份=year",
        "--column", "id_number=join_key:resident_id", "--column", "year=plaintext",
        "--identity", fed.operator("tax"), cwd=tmp_path,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    granted = govshare(
        "grant", "add", "--home", str(tax_home), "--dataset", "refreshed", "--grantee", "alice",
        "--purpose", PURPOSE, "--columns", "id_number", "--kinds", "psi_cardinality",
        "--expires", "2099-12-31", "--epsilon", "100", "--max-queries", "10",
        "--identity", fed.operator("tax"), cwd=tmp_path,
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    wait_for_next_second(int(time.time()))  # as above: a re-registration would void the grant
    replaced = govshare(
        "dataset", "replace", "refreshed", str(tax_file(tmp_path / "v2.csv", 120)),
        "--home", str(tax_home), "--identity", fed.operator("tax"), cwd=tmp_path,
    )  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr

    asked = govshare(
        "query", "psi", "--identity", str(fed.bundles["alice"]),
        "--left", "civil.assistance.id_number", "--right", "tax.refreshed.id_number",
        "--purpose", PURPOSE, "--epsilon", str(PSI_EPSILON), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    # Of the refreshed rows: 120 shared keys, not the first version's 60.
    assert abs(answer["count"] - 120) <= psi_shift()


def test_sums_of_a_decimal_column_are_shown_in_its_declared_unit(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """Yuan imported at scale 2 are summed as fen and read back as yuan: the catalogue says
    the scale, the result carries it, and the table and --json show the sum in yuan."""
    tax_home = fed.node_home("tax")
    keys = psi_data.civil.catalogue.keys("assistance", "id_number")[:80]
    costs = [f"{100 + i}.{(7 * i) % 100:02d}" for i in range(len(keys))]
    fen = sum(int(c.replace(".", "")) for c in costs)
    path = tmp_path / "costs.csv"
    lines = ["id_number,total_cost_yuan"] + [f"{k},{c}" for k, c in zip(keys, costs, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    added = govshare(
        "dataset", "add", str(path), "--home", str(tax_home), "--name", "costs_yuan",
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "state",
        "--owner", "State Taxation Administration", "--column", "id_number=join_key:resident_id",
        "--column", "total_cost_yuan=aggregate:scale=2", "--identity", fed.operator("tax"),
        cwd=tmp_path,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    granted = govshare(
        "grant", "add", "--home", str(tax_home), "--dataset", "costs_yuan", "--grantee", "alice",
        "--purpose", PURPOSE, "--columns", "id_number,total_cost_yuan",
        "--kinds", "intersection_aggregate", "--expires", "2099-12-31", "--epsilon", "100",
        "--max-queries", "10", "--identity", fed.operator("tax"), cwd=tmp_path,
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    grant(psi_data.civil, "assistance", "alice", ["id_number"], [QueryKind.INTERSECTION_AGGREGATE])
    alice = str(fed.bundles["alice"])

    shown = govshare("catalog", "show", "tax.costs_yuan", "--identity", alice, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "total_cost_yuan aggregate, kept to 2 decimal places" in shown.stdout
    entry = json.loads(
        govshare("catalog", "show", "tax.costs_yuan", "--identity", alice, "--json",
                 cwd=tmp_path).stdout
    )  # fmt: skip
    assert {c["name"]: c["scale"] for c in entry["columns"]} == {
        "id_number": 0, "total_cost_yuan": 2
    }  # fmt: skip

    sql = (
        "SELECT COUNT(*), SUM(t.total_cost_yuan) FROM civil.assistance a "
        "JOIN tax.costs_yuan t ON a.id_number = t.id_number"
    )
    asked = govshare(
        "query", "sql", "--identity", alice, "--purpose", PURPOSE, "--epsilon", "8",
        "--sum-bound", "500", "--json", sql, cwd=tmp_path,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["units"] == {"total_cost_yuan": 2} and answer["unit_warning"] is None
    (group,) = answer["groups"]
    total = group["sums"]["total_cost_yuan"]
    # The noisy sum, in fen, within a generous multiple of its 95% half-width of the truth...
    assert abs(total["value"] - fen) <= 4 * total["interval95"] + 1
    # ...and the same figure in yuan, exactly: value / 100 as decimal text, two places.
    assert Decimal(total["amount"]) == Decimal(total["value"]) / 100
    assert len(total["amount"].split(".")[1]) == 2
    average = group["averages"]["total_cost_yuan"]
    assert average == pytest.approx(total["value"] / group["count"]["value"] / 100)

    table = govshare(
        "query", "sql", "--identity", alice, "--purpose", PURPOSE, "--epsilon", "8",
        "--sum-bound", "500", sql, cwd=tmp_path,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "sums and averages in each column's declared unit" in table.stdout
    assert "total_cost_yuan to 2 decimal places" in table.stdout
