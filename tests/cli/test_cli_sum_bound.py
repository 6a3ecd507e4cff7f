"""``govshare query sql --sum-bound`` in the SUM column's declared unit, as a real subprocess.

The client reads the column's scale from the value holder's catalogue before it signs the plan,
converts the bound exactly (yuan to fen at scale 2), and the signed plan carries stored units as
before; a bound the scale cannot hold exactly, or a scale it cannot read, is refused before
anything is signed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PURPOSE, FederationFixture, PsiData, grant, register

from govshare.model.governance import QueryKind
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.protocols.suite import STANDARD

# Yuan per row; the bound below clips most of them.
BOUND_YUAN = "105.5"
BOUND_FEN = 10550


def govshare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def received(fed: FederationFixture, node: str) -> int:
    """How many queries ``node``'s audit log shows it received."""
    path = NodeConfig.load(fed.node_home(node)).audit_database_path
    with AuditLog.open(path, suite=STANDARD) as log:
        return sum(1 for e in log.iter_entries() if e.decode().kind == "query.received")


def refused_sql(fed: FederationFixture, tmp_path: Path, bound: str, sql: str) -> str:
    """Ask ``sql`` with ``--sum-bound bound``, which must fail before anything is signed (no
    node logs a query received); the CLI's one-line error."""
    before = received(fed, "tax"), received(fed, "civil")
    refused = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--sum-bound", bound, sql, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stdout
    assert (received(fed, "tax"), received(fed, "civil")) == before
    return refused.stderr.strip()


@pytest.fixture(scope="module")
def costs(
    fed: FederationFixture, psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory
) -> list[int]:
    """tax.bounded_costs: 80 of civil's keys with a cost in yuan at scale 2, granted to alice
    for intersection aggregates; civil.bounded_costs: the same costs in whole units. Returns
    the costs in fen."""
    tmp_path = tmp_path_factory.mktemp("costs")
    keys = psi_data.civil.catalogue.keys("assistance", "id_number")[:80]
    costs = [f"{100 + i}.{(7 * i) % 100:02d}" for i in range(len(keys))]
    path = tmp_path / "costs.csv"
    lines = ["id_number,cost_yuan"] + [f"{k},{c}" for k, c in zip(keys, costs, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tax_home, operator = str(fed.node_home("tax")), fed.operator("tax")
    added = govshare(
        "dataset", "add", str(path), "--home", tax_home, "--name", "bounded_costs",
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "state",
        "--owner", "State Taxation Administration", "--column", "id_number=join_key:resident_id",
        "--column", "cost_yuan=aggregate:scale=2", "--identity", operator, cwd=tmp_path,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    granted = govshare(
        "grant", "add", "--home", tax_home, "--dataset", "bounded_costs", "--grantee", "alice",
        "--purpose", PURPOSE, "--columns", "id_number,cost_yuan",
        "--kinds", "intersection_aggregate", "--expires", "2099-12-31", "--epsilon", "100",
        "--max-queries", "10", "--identity", operator, cwd=tmp_path,
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    grant(psi_data.civil, "assistance", "alice", ["id_number"], [QueryKind.INTERSECTION_AGGREGATE])
    whole = tmp_path / "whole.csv"
    whole.write_text("\n".join(c.split(".")[0] for c in lines) + "\n", encoding="utf-8")
    register(
        psi_data.civil, whole, name="bounded_costs",
        columns=("id_number=join_key:resident_id", "cost_yuan=aggregate"),
    )  # fmt: skip
    return [int(c.replace(".", "")) for c in costs]


SQL = (
    "SELECT COUNT(*), SUM(t.cost_yuan) FROM civil.assistance a "
    "JOIN tax.bounded_costs t ON a.id_number = t.id_number"
)


def test_sum_bound_is_in_the_declared_unit(
    fed: FederationFixture, costs: list[int], tmp_path: Path
) -> None:
    """--sum-bound 105.5 on a column kept to 2 decimal places signs the stored bound 10550 (what
    --sum-bound 10550 used to mean) and clips every cost to 105.50 yuan; a bound with a third
    decimal is refused naming the column's scale, before anything reaches a node."""
    fen, alice = costs, str(fed.bundles["alice"])

    asked = govshare(
        "query", "sql", "--identity", alice, "--purpose", PURPOSE, "--epsilon", "8",
        "--sum-bound", BOUND_YUAN, "--results", "mine", "--json", SQL, cwd=tmp_path,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    saved = govshare(
        "query", "result", answer["query_id"], "--identity", alice, "--results", "mine",
        "--json", cwd=tmp_path,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    plan = json.loads(saved.stdout)["plan"]
    assert plan["sums"] == [{"column": "cost_yuan", "bound": BOUND_FEN}]  # signed, in fen

    (group,) = answer["groups"]
    total = group["sums"]["cost_yuan"]
    clipped, unclipped = sum(min(f, BOUND_FEN) for f in fen), sum(fen)
    assert abs(total["value"] - clipped) <= 4 * total["interval95"] + 1
    # The clipping shows: the bound read as fen (100 x smaller) or not applied lands far away.
    assert unclipped - clipped > 8 * total["interval95"]
    assert clipped - sum(min(f, 105) for f in fen) > 8 * total["interval95"]

    assert refused_sql(fed, tmp_path, "105.555", SQL) == (
        "error: the SUM bound 105.555 has 3 decimal places; SUM(cost_yuan) is kept to 2 "
        "decimal places (catalog show), so the bound cannot be exact"
    )


def test_sum_bound_refused_when_the_nodes_keep_the_column_at_different_scales(
    fed: FederationFixture, costs: list[int], tmp_path: Path
) -> None:
    """A horizontal SUM over yuan at scale 2 (tax) and whole yuan (civil): one bound in the
    declared unit would be two stored bounds, so the client refuses rather than pick one."""
    horizontal = (
        "SELECT COUNT(*), SUM(h.cost_yuan) FROM (SELECT * FROM tax.bounded_costs "
        "UNION ALL SELECT * FROM civil.bounded_costs) AS h"
    )
    assert refused_sql(fed, tmp_path, "200", horizontal) == (
        "error: SUM(cost_yuan): the nodes keep it to different decimal places (tax 2, civil 0), "
        "so a bound in its declared unit has no one stored value"
    )


def test_sum_bound_refused_when_the_scale_cannot_be_read(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """The value holder ghost is enrolled but never serves: its column's scale is unknown, so
    the bound is not guessed; the query is refused before anything is signed."""
    line = refused_sql(
        fed, tmp_path, "5000",
        "SELECT COUNT(*), SUM(g.cost_yuan) FROM civil.assistance a "
        "JOIN ghost.costs g ON a.id_number = g.id_number",
    )  # fmt: skip
    assert line.startswith(
        "error: the SUM bound is in each column's declared unit, and ghost.costs's scale could "
        "not be read from its catalogue (node ghost: "
    ), line
    assert line.endswith("; nothing was signed"), line


def test_sum_bound_not_a_plain_positive_decimal_is_refused(tmp_path: Path) -> None:
    for bad in ("0", "-5", "1e3", "5,000", "abc"):
        refused = govshare(
            "query", "sql", "--identity", str(tmp_path), "--purpose", PURPOSE,
            "--sum-bound", bad, "SELECT COUNT(*) FROM a.b x JOIN c.d y ON x.k = y.k",
            cwd=tmp_path,
        )  # fmt: skip
        assert refused.returncode == 2, bad
        assert "is not a positive decimal number" in refused.stderr, refused.stderr
