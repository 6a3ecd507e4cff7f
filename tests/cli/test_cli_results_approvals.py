"""Issue 14, items 2 and 3, through the real CLI as subprocesses against real nodes: results
kept in the analyst's store and shown again, approvals an operator can judge (``approvals
show``), id prefixes, whole ids at 80 columns and tab-separated output when piped, queries
that cannot be approved any more, and ``--approval-timeout`` on aggregates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PSI_EPSILON, PURPOSE, FederationFixture, PsiData, grant, register

from govshare.cli.main import main
from govshare.client.results import ResultsStore
from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.states import CANCELLED, PENDING
from govshare.protocols.errors import Unavailable
from govshare.protocols.signed_request import DEFAULT_LIFETIME_SECONDS, sign_request
from govshare.rpc.client import NodeClient
from govshare.v1 import query_pb2

GATE = "assistance_gated"  # civil's dataset that waits for its operator's approval
SQL = (
    "SELECT COUNT(*) FROM civil.assistance a JOIN tax.residents t "
    "ON a.id_number = t.id_number WHERE t.income_band = 'high'"
)
GATED_SQL = SQL.replace("civil.assistance", f"civil.{GATE}")
# Generous: a subprocess waits for real nodes on a shared, sometimes slow machine.
TIMEOUT = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def govshare(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip


def as_terminal(columns: int) -> dict[str, str]:
    """The environment under which rich renders as for a terminal ``columns`` wide."""
    return {"COLUMNS": str(columns), "TTY_COMPATIBLE": "1", "NO_COLOR": "1", "TERM": "xterm"}


@pytest.fixture(scope="module")
def gate(psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory) -> str:
    data = tmp_path_factory.mktemp("review")
    synth.generate(data, size=200, seed=14)
    register(
        psi_data.civil, data / f"{synth.CIVIL}.csv", name=GATE,
        columns=(
            "id_number=join_key:resident_id", "district=group_key:domain={districts}",
            "year=plaintext",
            "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
            "amount=aggregate",
        ),
        require_approval=True,
    )  # fmt: skip
    kinds = [QueryKind.PSI_CARDINALITY, QueryKind.INTERSECTION_AGGREGATE]
    grant(psi_data.civil, GATE, "alice", ["id_number", "assistance_type", "amount"], kinds)
    grant(
        psi_data.tax, "residents", "alice", ["id_number", "income_band"],
        [QueryKind.INTERSECTION_AGGREGATE],
    )  # fmt: skip
    return GATE


def submit_pending(
    fed: FederationFixture, *, query_id: bytes | None = None, now: int | None = None
) -> str:
    """A PSI on the gated dataset submitted to civil alone, as alice: it waits there."""
    alice = fed.identity("alice")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", GATE, "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()) if now is None else now, query_id=query_id,
    )  # fmt: skip
    with NodeClient.to(alice, "civil") as client:
        assert client.submit(request.encode()).state == PENDING
    return request.query_id_hex


def pending_ids(fed: FederationFixture, cwd: Path) -> list[str]:
    listed = govshare("approvals", "list", "--home", str(fed.node_home("civil")), "--json",
                      cwd=cwd)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    return [str(q["query_id"]) for q in json.loads(listed.stdout)]


# ------------------------------------------------------------------ item 2: results kept


def test_a_released_result_is_kept_and_shown_again_by_id_or_prefix(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    alice = str(fed.bundles["alice"])
    ran = govshare(
        "query", "sql", "--identity", alice, "--purpose", PURPOSE,
        "--epsilon", str(PSI_EPSILON), "--receipt", "r.json", "--json", SQL, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout)
    query_id = answer["query_id"]
    # Kept by default in the identity bundle's results folder, with its plan, SQL and receipt.
    kept = fed.bundles["alice"] / "results" / f"{query_id}.json"
    assert answer["saved"] == str(kept) and kept.is_file()
    for shown_by in (query_id, query_id[:10]):
        again = govshare("query", "result", shown_by, "--identity", alice, "--json", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        saved = json.loads(again.stdout)
        assert saved["query_id"] == query_id and saved["kind"] == "psi_cardinality"
        assert saved["result"]["count"] == answer["count"]
        assert saved["result"]["interval_95"] == answer["interval_95"]
        assert saved["sql"] == SQL and saved["plan"]["right"]["dataset"] == "residents"
        assert saved["receipt_verified"] is True
        assert saved["receipt"]["query_id"] == query_id
    text = govshare("query", "result", query_id[:10], "--identity", alice, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"|intersection| ≈ {answer['count']:,}" in text.stdout and query_id in text.stdout
    # The receipt kept in the store is the one the nodes signed: written again, it verifies.
    rewritten = govshare("query", "result", query_id[:10], "--identity", alice,
                         "--receipt", "again.json", cwd=tmp_path)  # fmt: skip
    assert rewritten.returncode == 0, rewritten.stderr
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "r.json").read_bytes()
    # Listed, piped: one tab-separated line per result, the whole id first.
    listed = govshare("query", "results", "--identity", alice, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert lines[0] == ["query", "kind", "saved (UTC)", "result", "receipt"]
    assert [query_id, "psi_cardinality"] in [row[:2] for row in lines[1:]]


def test_an_aggregate_result_is_kept_in_the_folder_given_and_shown_as_a_table(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    grant(psi_data.civil, "assistance", "alice", ["id_number", "assistance_type", "amount"],
          [QueryKind.INTERSECTION_AGGREGATE])  # fmt: skip
    sql = (
        "SELECT a.assistance_type, COUNT(*), SUM(a.amount) FROM civil.assistance a "
        "JOIN tax.residents t ON a.id_number = t.id_number GROUP BY a.assistance_type"
    )
    ran = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--sum-bound", "30000", "--results", "mine", sql, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    (kept,) = (tmp_path / "mine").glob("*.json")
    query_id = kept.stem
    assert "result kept in" in ran.stdout
    assert ran.stdout.index("result kept in") < ran.stdout.index("receipt from")
    again = govshare("query", "result", query_id[:8], "--identity", str(fed.bundles["alice"]),
                     "--results", "mine", cwd=tmp_path, env=as_terminal(160))  # fmt: skip
    assert again.returncode == 0, again.stderr
    for label in ("COUNT(*)", "SUM(amount)", *synth.ASSISTANCE_TYPES, "ε spent", sql):
        assert label in again.stdout
    shown = govshare("query", "result", query_id, "--results", "mine", "--json",
                     "--identity", str(fed.bundles["alice"]), cwd=tmp_path)  # fmt: skip
    saved = json.loads(shown.stdout)
    assert saved["plan"]["kind"] == "intersection_aggregate" and saved["sql"] == sql
    assert [g["group"] for g in saved["result"]["groups"]] == list(synth.ASSISTANCE_TYPES)


@pytest.mark.parametrize("failure", ["unreachable", "tampered"])
def test_a_receipt_lost_after_release_does_not_lose_the_result(
    fed: FederationFixture,
    psi_data: PsiData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:
    """Both nodes released (and spent the budget); then civil's receipt part never arrives, or
    arrives altered. The analyst still sees the result and keeps it, and is told why there is
    no receipt (exit 1). In-process, so that the network can fail at exactly that moment."""
    fetch = NodeClient.receipt

    def receipt(self: NodeClient, query_id: str) -> query_pb2.ReceiptPart:
        part = fetch(self, query_id)
        if part.node != "civil":
            return part
        if failure == "unreachable":
            raise Unavailable("node civil is unreachable: connection reset")
        part.entry = part.entry.replace(b"civil", b"cIvil", 1)
        return part

    monkeypatch.setattr(NodeClient, "receipt", receipt)
    monkeypatch.chdir(tmp_path)
    alice = str(fed.bundles["alice"])
    with pytest.raises(SystemExit) as ended:
        main(["query", "sql", "--identity", alice, "--purpose", PURPOSE,
              "--epsilon", str(PSI_EPSILON), "--receipt", "r.json", SQL])  # fmt: skip
    assert ended.value.code == 1
    out, err = capsys.readouterr()
    out = ANSI.sub("", out)
    count = re.search(r"\|intersection\| ≈ ([\d,]+)", out)
    assert count is not None, out
    why = "node civil gave no receipt" if failure == "unreachable" else "does not verify"
    assert "error: the result is shown above and kept;" in err and why in err
    assert not (tmp_path / "r.json").exists()
    ids = re.findall(r"^query ([0-9a-f]{32})$", out, flags=re.M)
    assert len(ids) == 1, out
    query_id = ids[0]
    saved = ResultsStore(fed.bundles["alice"] / "results").get(query_id)
    assert saved.receipt is None and f"{saved.result['count']:,}" == count.group(1)
    assert why in saved.result["receipt_error"]
    again = govshare("query", "result", query_id[:12], "--identity", alice, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"|intersection| ≈ {count.group(1)}" in again.stdout
    assert "receipt: none saved" in again.stdout and why in again.stdout


def test_a_result_prefix_must_be_unique_and_known(fed: FederationFixture, tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "kept")
    for tail in ("01", "02"):
        store.save(
            "beef" + tail * 14, kind="psi_cardinality", plan={}, receipt=None,
            result={"query_id": "beef" + tail * 14, "kind": "psi_cardinality", "count": 3,
                    "set_sizes": {}, "exact": True},
        )  # fmt: skip
    args = ("--identity", str(fed.bundles["alice"]), "--results", "kept")
    ambiguous = govshare("query", "result", "beef", *args, cwd=tmp_path)
    assert ambiguous.returncode == 1
    assert "ambiguous" in ambiguous.stderr
    assert "beef" + "01" * 14 in ambiguous.stderr and "beef" + "02" * 14 in ambiguous.stderr
    unknown = govshare("query", "result", "beef03", *args, cwd=tmp_path)
    assert unknown.returncode == 1 and "no saved result for query beef03" in unknown.stderr
    one = govshare("query", "result", "beef02", *args, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert "|intersection| = 3" in one.stdout


# ------------------------------------------------------------ item 3: approvals to judge


def test_approvals_show_prints_what_the_signed_request_asks(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    """The analyst's CLI waits on civil; its operator reads the request, then denies it."""
    home = str(fed.node_home("civil"))
    before = set(pending_ids(fed, tmp_path))
    analyst = subprocess.Popen(
        [sys.executable, "-m", "govshare.cli", "query", "sql", "--identity",
         str(fed.bundles["alice"]), "--purpose", PURPOSE, "--epsilon", str(PSI_EPSILON),
         "--approval-timeout", str(TIMEOUT), GATED_SQL],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        new: set[str] = set()
        while not new and time.monotonic() < deadline:
            new = set(pending_ids(fed, tmp_path)) - before
        assert len(new) == 1, "the query never waited for civil's approval"
        (query_id,) = new
        shown = govshare("approvals", "show", query_id[:12], "--home", home, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout
        for expected in (
            query_id, "alice", PURPOSE, "psi_cardinality", f"DP noise, ε {PSI_EPSILON}",
            "tax.residents [right]", f"civil.{GATE} [left]  (this node)",
            "id_number (join)", "income_band (filter)", "income_band = 'high'",
            "deadline:", "pending_approval", f"FROM civil.{GATE} a JOIN",
        ):  # fmt: skip
            assert expected in out, f"{expected!r} not in:\n{out}"
        data = json.loads(
            govshare("approvals", "show", query_id[:12], "--home", home, "--json",
                     cwd=tmp_path).stdout
        )  # fmt: skip
        assert data["query_id"] == query_id and data["sql"] == GATED_SQL
        assert data["epsilon"] == str(PSI_EPSILON) and data["exact"] is False
        assert data["analyst"] == "alice" and data["purpose"] == PURPOSE
        parties = {p["node"]: p for p in data["parties"]}
        assert parties["tax"]["dataset"] == "residents"
        assert parties["tax"]["filters"] == ["income_band = 'high'"]
        assert parties["tax"]["columns"] == ["id_number (join)", "income_band (filter)"]
        assert parties["civil"]["dataset"] == GATE and parties["civil"]["filters"] == []
        assert data["expires_at"] - data["issued_at"] == DEFAULT_LIFETIME_SECONDS
        denied = govshare("approvals", "deny", query_id[:12], "--home", home,
                          "--reason", "purpose too broad", "--identity", fed.operator("civil"),
                          cwd=tmp_path)  # fmt: skip
        assert denied.returncode == 0, denied.stderr
        assert f"query {query_id} denied" in denied.stdout
        _, err = analyst.communicate(timeout=TIMEOUT)
    finally:
        if analyst.poll() is None:
            analyst.kill()
    assert analyst.returncode == 1 and "purpose too broad" in err


def test_an_ambiguous_or_unknown_prefix_is_refused_by_name(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    home = str(fed.node_home("civil"))
    first = submit_pending(fed, query_id=bytes.fromhex("c0ffee") + os.urandom(13))
    second = submit_pending(fed, query_id=bytes.fromhex("c0ffee") + os.urandom(13))
    for command in (("approve", "--reason", "ok"), ("deny", "--reason", "no"), ("show",)):
        signed = ("--identity", fed.operator("civil")) if command[0] != "show" else ()
        refused = govshare("approvals", command[0], "c0ffee", *command[1:], "--home", home,
                           *signed, cwd=tmp_path)  # fmt: skip
        assert refused.returncode == 1
        (line,) = refused.stderr.strip().splitlines()
        assert "ambiguous" in line and first in line and second in line
    unknown = govshare("approvals", "approve", "c0ffee" + "0" * 20, "--home", home,
                       "--identity", fed.operator("civil"), cwd=tmp_path)  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == f"error: no query c0ffee{'0' * 20}"
    approved = govshare("approvals", "approve", first[:12], "--home", home, "--reason", "ok",
                        "--identity", fed.operator("civil"), cwd=tmp_path)  # fmt: skip
    assert approved.returncode == 0, approved.stderr
    assert psi_data.civil.query_store.get(first).state == "approved"
    assert psi_data.civil.query_store.get(second).state == PENDING


def test_ids_are_whole_at_80_columns_and_tab_separated_when_piped(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    home = str(fed.node_home("civil"))
    ours = submit_pending(fed)
    narrow = govshare("approvals", "list", "--home", home, cwd=tmp_path, env=as_terminal(80))
    assert narrow.returncode == 0, narrow.stderr
    text = ANSI.sub("", narrow.stdout)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for query_id in pending_ids(fed, tmp_path):
        assert query_id in text, f"{query_id} is cut in:\n{text}"
    piped = govshare("approvals", "list", "--home", home, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    rows = [line.split("\t") for line in piped.stdout.splitlines()]
    assert rows[0] == ["query", "analyst", "kind", "release", "dataset", "purpose",
                       "expires (UTC)"]  # fmt: skip
    assert all(len(row) == 7 for row in rows)
    mine = next(row for row in rows if row[0] == ours)
    assert mine[1:6] == ["alice", "psi_cardinality", f"ε {PSI_EPSILON}", GATE, PURPOSE]


def test_a_withdrawn_or_expired_query_leaves_the_queue_and_cannot_be_approved(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    home = str(fed.node_home("civil"))
    withdrawn = submit_pending(fed)
    with NodeClient.to(fed.identity("alice"), "civil") as client:
        assert client.cancel(withdrawn).state == CANCELLED
    # Signed an hour ago less a few seconds: it expires while it waits.
    issued = int(time.time()) - DEFAULT_LIFETIME_SECONDS + 4
    expiring = submit_pending(fed, now=issued)
    while time.time() <= issued + DEFAULT_LIFETIME_SECONDS + 1:
        time.sleep(0.2)
    waiting = pending_ids(fed, tmp_path)
    assert withdrawn not in waiting and expiring not in waiting
    cancelled = govshare("approvals", "approve", withdrawn[:12], "--home", home,
                         "--identity", fed.operator("civil"), cwd=tmp_path)  # fmt: skip
    assert cancelled.returncode == 1
    assert cancelled.stderr.strip() == (
        f"error: query {withdrawn} is cancelled (withdrawn by the analyst before it ran): "
        "only a query waiting for approval can be approved"
    )
    expired = govshare("approvals", "approve", expiring[:12], "--home", home,
                       "--identity", fed.operator("civil"), cwd=tmp_path)  # fmt: skip
    assert expired.returncode == 1
    assert f"query {expiring} expired" in expired.stderr
    assert psi_data.civil.query_store.get(expiring).state == "expired"


def test_a_query_refused_at_the_other_node_leaves_this_nodes_queue(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    """tax refuses a filter on a column alice has no grant for; civil would have waited."""
    before = {r.query_id for r in psi_data.civil.query_store.with_state(CANCELLED)}
    refused = govshare(
        "query", "psi", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--left", f"civil.{GATE}.id_number", "--right", "tax.residents.id_number",
        "--where", "tax.residents.annual_income = 5", "--epsilon", str(PSI_EPSILON),
        cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 1 and "error: node tax" in refused.stderr
    withdrawn = [
        r for r in psi_data.civil.query_store.with_state(CANCELLED)
        if r.query_id not in before and r.dataset == GATE
    ]  # fmt: skip
    assert len(withdrawn) == 1
    assert withdrawn[0].query_id not in pending_ids(fed, tmp_path)


def test_an_aggregate_gives_up_after_its_approval_timeout(
    fed: FederationFixture, psi_data: PsiData, gate: str, tmp_path: Path
) -> None:
    sql = (
        f"SELECT COUNT(*), SUM(a.amount) FROM civil.{GATE} a "
        "JOIN tax.residents t ON a.id_number = t.id_number"
    )
    before = set(pending_ids(fed, tmp_path))
    gave_up = govshare(
        "query", "sql", "--identity", str(fed.bundles["alice"]), "--purpose", PURPOSE,
        "--approval-timeout", "2", "--json", sql, cwd=tmp_path,
    )  # fmt: skip
    assert gave_up.returncode == 1
    assert gave_up.stderr.strip().splitlines()[-1] == (
        "error: approval timed out after 2 s waiting for civil"
    )
    # Withdrawn when the analyst gave up: nothing left for civil's operator to approve.
    assert set(pending_ids(fed, tmp_path)) <= before
