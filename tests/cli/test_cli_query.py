"""The analyst's and operator's query commands as real subprocesses against real nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import (
    GRANT_EPSILON,
    PSI_EPSILON,
    PURPOSE,
    FederationFixture,
    PsiData,
    grant,
    psi_shift,
    register,
)

from govshare.examples import synth
from govshare.model.events import log_origin
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.protocols.receipt import decode_receipt
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient

SQL = (
    "SELECT COUNT(*) FROM civil.assistance a JOIN tax.residents t "
    "ON a.id_number = t.id_number WHERE t.income_band = 'high'"
)


def govshare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_query_psi_prints_json_and_saves_a_receipt(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    result = govshare(
        "query", "psi", "--identity", str(fed.bundles["alice"]),
        "--left", "civil.assistance.id_number", "--right", "tax.residents.id_number",
        "--where", "tax.residents.income_band = 'high'", "--purpose", PURPOSE,
        "--epsilon", str(PSI_EPSILON), "--receipt", "r.json", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    true = psi_data.manifest["filtered"]["tax_high & civil"]["count"]
    # Noised by default: within the shift t of the truth, with its interval and ε.
    assert abs(answer["count"] - true) <= psi_shift()
    assert answer["exact"] is False and answer["epsilon"] == str(PSI_EPSILON)
    low, high = answer["interval_95"]
    assert low <= answer["count"] <= high
    receipt = decode_receipt((tmp_path / "r.json").read_bytes())
    assert receipt.query_id == answer["query_id"]
    checked = govshare(
        # ghost is enrolled in the session federation but never runs: 1 of the 2 other nodes
        # can cosign, so the quorum is set to what the federation can give.
        "audit", "verify-receipt", "--identity", str(fed.bundles["audra"]), "--quorum", "1",
        "r.json", cwd=tmp_path,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_query_sql_gives_the_same_count(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    result = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--epsilon", str(PSI_EPSILON), "--json", SQL, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    true = psi_data.manifest["filtered"]["tax_high & civil"]["count"]
    assert abs(answer["count"] - true) <= psi_shift() and answer["exact"] is False


def test_exact_count_waits_for_every_operator_then_is_exact(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """--exact: the CLI waits while both operators approve from their own processes."""

    def waiting(home: str) -> list[dict[str, object]]:
        listed = govshare("approvals", "list", "--home", home, "--json", cwd=tmp_path)
        return list(json.loads(listed.stdout))

    # Other modules' queries may wait on the session's nodes: approve only this one.
    before = {n: {q["query_id"] for q in waiting(str(fed.node_home(n)))} for n in ("tax", "civil")}
    analyst = subprocess.Popen(
        [sys.executable, "-m", "govshare.cli", "query", "sql", "--identity",
         str(fed.bundles["alice"]), "--purpose", PURPOSE, "--exact", "--json", SQL],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for node in ("tax", "civil"):
            home = str(fed.node_home(node))
            deadline = time.monotonic() + 120
            pending: list[dict[str, object]] = []
            while not pending and time.monotonic() < deadline:
                pending = [q for q in waiting(home) if q["query_id"] not in before[node]]
            assert pending, f"{node}: the exact query never waited for approval"
            assert pending[0]["release"] == "exact"  # the operator sees what it approves
            approved = govshare(
                "approvals", "approve", str(pending[0]["query_id"]), "--home", home,
                "--reason", "exact count for the annual review", "--identity", fed.operator(node),
                cwd=tmp_path,
            )  # fmt: skip
            assert approved.returncode == 0, approved.stderr
        out, err = analyst.communicate(timeout=120)
    finally:
        if analyst.poll() is None:
            analyst.kill()
    assert analyst.returncode == 0, err
    answer = json.loads(out)
    assert answer["exact"] is True and "interval_95" not in answer
    assert answer["count"] == psi_data.manifest["filtered"]["tax_high & civil"]["count"]
    for holder in (psi_data.tax, psi_data.civil):
        entries = [e.decode() for e in holder.audit.entries_for_query(answer["query_id"])]
        kinds = [e.kind for e in entries]
        assert kinds.index("approval.granted") < kinds.index("result.released")
        released = entries[kinds.index("result.released")]
        assert released.fields["exact"] is True  # logged as an exact release


def test_unsupported_sql_is_one_line_naming_the_construct(
    fed: FederationFixture, tmp_path: Path
) -> None:
    result = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        SQL.replace(" AND ", " OR ").replace("WHERE", "WHERE a.year = 2025 OR"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unsupported SQL: OR in WHERE (a.year = 2025 OR t.income_band = 'high'); "
        "each node's filter is a conjunction"
    ]


def test_refusal_names_the_node_and_rule(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    result = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", "marketing",
        SQL, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: node ") and "refused by rule grant.purpose" in line


@pytest.fixture(scope="module")
def gated(psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory) -> str:
    data = tmp_path_factory.mktemp("gated")
    synth.generate(data, size=200, seed=9)
    register(
        psi_data.civil, data / f"{synth.CIVIL}.csv", name="assistance_gate",
        columns=(
            "id_number=join_key:resident_id", "district=group_key:domain={districts}",
            "year=plaintext",
            "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
            "amount=aggregate",
        ),
        require_approval=True,
    )  # fmt: skip
    grant(psi_data.civil, "assistance_gate", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
    return "assistance_gate"


def test_operator_approves_from_another_process(
    fed: FederationFixture, psi_data: PsiData, gated: str, tmp_path: Path
) -> None:
    alice = fed.identity("alice")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", gated, "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with NodeClient.to(alice, "civil") as client:
        assert client.submit(request.encode()).state == "pending_approval"
    home = str(fed.node_home("civil"))
    listed = json.loads(
        govshare("approvals", "list", "--home", home, "--json", cwd=tmp_path).stdout
    )
    # Other modules' queries may wait on the session's civil node too: this one is among them.
    assert request.query_id_hex in [q["query_id"] for q in listed]
    approved = govshare(
        "approvals", "approve", request.query_id_hex, "--home", home, "--reason", "checked",
        "--identity", fed.operator("civil"), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert approved.returncode == 0, approved.stderr
    decided = json.loads(approved.stdout)
    assert (decided["query_id"], decided["state"]) == (request.query_id_hex, "approved")
    assert decided["dataset"] == gated and decided["approvers_needed"] is None
    again = govshare("approvals", "deny", request.query_id_hex, "--home", home, "--reason", "x",
                     "--identity", fed.operator("civil"), cwd=tmp_path)  # fmt: skip
    assert again.returncode == 1 and "is approved" in again.stderr
    with NodeClient.to(alice, "civil") as client:
        assert client.status(request.query_id_hex).state == "approved"
    # The operator's entry, appended by another process, sits in a log that still verifies.
    civil = psi_data.civil
    kinds = [e.decode().kind for e in civil.audit.entries_for_query(request.query_id_hex)]
    assert "approval.granted" in kinds
    roster = fed.federation.roster
    civil.publisher.publish()
    verdict = civil.audit.verify(
        roster.member("civil").verify_key(), log_origin(roster.federation, "civil")
    )
    assert verdict.ok, verdict.first_problem


def test_query_sql_aggregate_prints_figures_intervals_and_budgets(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    kinds = [QueryKind.INTERSECTION_AGGREGATE]
    grant(psi_data.tax, "residents", "alice", ["id_number", "income_band"], kinds)
    grant(psi_data.civil, "assistance", "alice", ["id_number", "assistance_type", "amount"], kinds)
    sql = (
        "SELECT a.assistance_type, COUNT(*), SUM(a.amount) FROM civil.assistance a "
        "JOIN tax.residents t ON a.id_number = t.id_number GROUP BY a.assistance_type"
    )
    result = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--epsilon", "1", "--sum-bound", "30000", "--receipt", "agg.json", "--json", sql,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["kind"] == "intersection_aggregate" and answer["epsilon"] == "1"
    assert [g["group"] for g in answer["groups"]] == list(synth.ASSISTANCE_TYPES)
    assert {b["epsilon_spent"] for b in answer["budgets"].values()} == {"1"}
    truth = psi_data.manifest["intersections"]["tax.residents & civil.assistance"]
    groups = answer["groups"]
    released = [g["count"]["value"] for g in groups if not g["suppressed"]]
    interval = groups[0]["count"]["interval95"]
    k = answer["min_group_size"]
    # Discrete Laplace: 4 x the 95% half-width is exceeded with probability < 1e-5 per figure;
    # a suppressed group's true count is under k plus its noise.
    slack = 4 * interval * len(groups) + (k + 4 * interval) * (len(groups) - len(released))
    assert released and abs(sum(released) - truth) <= slack
    assert decode_receipt((tmp_path / "agg.json").read_bytes()).query_id == answer["query_id"]


def test_analyst_and_operator_see_epsilon_spent_reserved_and_left(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    ran = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--epsilon", "0.5", "--json", SQL, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    # Other modules' queries share the session ledger (some wait, reserved, for approval that
    # never comes): compare with what tax's own store says, not with constants.
    budget = psi_data.tax.query_store.budget("alice", "residents")
    spent = budget.spent
    assert spent >= Fraction("0.5")
    shown = govshare(
        "catalog", "show", "tax.residents", "--identity", str(fed.bundles["alice"]), "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    ledger = json.loads(shown.stdout)["epsilon"]
    assert Fraction(ledger["spent"]) == spent
    assert Fraction(ledger["reserved"]) == budget.reserved
    assert Fraction(ledger["left"]) == GRANT_EPSILON - spent - budget.reserved
    listed = govshare(
        "grant", "list", "--home", str(fed.node_home("tax")), "--grantee", "alice",
        "--dataset", "residents", "--json", cwd=tmp_path,
    )  # fmt: skip
    grants = json.loads(listed.stdout)
    assert sum(Fraction(g["epsilon_spent"]) for g in grants) == spent
    assert all(g["queries_used"] <= g["max_queries"] for g in grants)
    ledgers = json.loads(
        govshare("grant", "ledger", "--home", str(fed.node_home("tax")), "--json",
                 cwd=tmp_path).stdout
    )  # fmt: skip
    assert {"analyst": "alice", "dataset": "residents", "spent": ledger["spent"],
            "reserved": ledger["reserved"], "left": ledger["left"]} in ledgers  # fmt: skip


def test_a_receipt_path_that_cannot_be_written_is_refused_before_anything_is_asked(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    """A typo in the receipt's folder once cost a released result and its budget."""
    nodes = (psi_data.tax, psi_data.civil)
    before = [n.query_store.count_since("alice", 0) for n in nodes]
    spent = psi_data.tax.query_store.budget("alice", "residents")
    for bad in ("missing/r.json", "."):
        result = govshare(
            "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
            "--receipt", bad, SQL, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "--receipt" in result.stderr
    # Nothing reached a node: no query received, no decision, no reservation.
    assert [n.query_store.count_since("alice", 0) for n in nodes] == before
    assert psi_data.tax.query_store.budget("alice", "residents") == spent
    saved = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--epsilon", str(PSI_EPSILON), "--receipt", "ok.json", SQL, cwd=tmp_path,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    out = saved.stdout
    assert out.index("|intersection|") < out.index("saved to ok.json")  # the result comes first
    assert decode_receipt((tmp_path / "ok.json").read_bytes()).query_id in out
