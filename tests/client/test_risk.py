"""Risk rules (govshare.model.risk), the node's own monitor (govshare.node.policy.alerts) and the
CLI.

Each rule fires on a real SQLite audit log built to trigger it and stays silent on its near
miss; a federation of real nodes answering real queries raises nothing but the informational
exact release; ``govshare audit check`` runs as a subprocess (exit 0, then 2 once a HIGH is in a
log); a node set to suspend on HIGH alerts refuses a prober with ``risk.suspended`` until its
operator clears it from another process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import (
    CIVIL_COLUMNS,
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    build_federation,
    grant,
    register,
)

from govshare.cli.main import cli
from govshare.client.analyst import run_psi
from govshare.client.auditor import Auditor
from govshare.client.risk import check_pulled
from govshare.examples import synth
from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.risk import (
    RULES,
    Alert,
    Scope,
    Severity,
    Thresholds,
    check,
    one_condition_apart,
)
from govshare.model.states import PENDING
from govshare.node.api.server import RunningNode, create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.node.policy import approvals
from govshare.node.policy.alerts import logged_alerts
from govshare.protocols.auditverify import AuditEntry
from govshare.protocols.errors import PolicyRefused
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD, SigningKey
from govshare.rpc.client import NodeClient

T0 = 1_750_000_000  # unix seconds: the built logs' clock starts here


# --- logs built to trigger each rule ----------------------------------------------------------


class Log:
    """A real audit log file whose clock the test sets (unix seconds, as float)."""

    def __init__(self, path: Path, node: str) -> None:
        self.node = node
        self.now = float(T0)
        self.audit = AuditLog.open(path, clock=lambda: int(self.now * 1000), suite=STANDARD)

    def add(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str | None = None,
        query_id: str | None = None,
        at: float | None = None,
    ) -> int:
        if at is not None:
            self.now = T0 + at
        return self.audit.record(kind, fields, actor=actor or self.node, query_id=query_id)

    def entries(self) -> list[AuditEntry]:
        return [e.decode() for e in self.audit.iter_entries()]

    def close(self) -> None:
        self.audit.close()


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[dict[str, Log]]:
    opened = {name: Log(tmp_path / f"{name}.db", name) for name in ("tax", "civil")}
    yield opened
    for log in opened.values():
        log.close()


def run(*logs: Log, thresholds: Thresholds | None = None) -> list[Alert]:
    return check({log.node: log.entries() for log in logs}, thresholds=thresholds or Thresholds())


def fired(alerts: list[Alert], rule: str) -> list[Alert]:
    return [a for a in alerts if a.rule == rule]


def decision(
    dataset: str = "residents",
    *,
    allowed: bool = True,
    rule: str = "allowed",
    grant_id: str = "g1",
    epsilon: str = "0.5",
    requires_approval: bool = False,
    exact: bool = False,
) -> dict[str, object]:
    """The fields of a policy.decision as QueryEngine.admit records them."""
    fields: dict[str, object] = {
        "dataset": dataset, "request_digest": "ab" * 32, "participants": ["civil", "tax"],
        "allowed": allowed, "rule": rule, "message": f"rule {rule}",
    }  # fmt: skip
    if allowed:
        fields.update(
            grant_id=grant_id, requires_approval=requires_approval, dp_required=False,
            min_group_size=5, min_set_size=0, masks=[], epsilon=epsilon, exact=exact,
        )  # fmt: skip
    return fields


def released(*, exact: bool = False, recipient: str = "alice") -> dict[str, object]:
    return {
        "recipient": recipient, "result_digest": "cd" * 32, "size": 10,
        "request_digest": "ab" * 32, "exact": exact, "participants": ["civil", "tax"],
    }  # fmt: skip


def grant_created(
    grant_id: str = "g1", *, epsilon: str = "2", expires_at: int = T0 + 86400
) -> dict[str, object]:
    return {
        "grant_id": grant_id, "dataset": "residents", "grantee": "alice", "purpose": PURPOSE,
        "columns": ["id_number"], "query_kinds": ["psi_cardinality"], "expires_at": expires_at,
        "epsilon": epsilon, "max_queries": 100, "created_at": T0, "issuer": "tax",
        "signature": b"\x00" * 64,
    }  # fmt: skip


def test_every_rule_is_registered_with_a_docstring() -> None:
    assert set(RULES) == {
        "release.without_decision", "approval.missing", "grant.used_after_end",
        "probing.refusal_burst", "rate_limit.hit", "budget.mostly_spent", "release.exact",
        "differencing.filters", "witness.refused", "handoff.missing", "application.overdue",
        "incident.frozen", "member.suspended", "operator.refused",
    }  # fmt: skip
    for rule in RULES.values():
        assert rule.severities and len(rule.description) > 40, rule.name
    assert RULES["handoff.missing"].scope is Scope.FEDERATION
    assert all(r.scope is Scope.LOG for n, r in RULES.items() if n != "handoff.missing")


def test_check_lists_its_rules() -> None:
    result = CliRunner().invoke(cli, ["audit", "check", "--rules", "--json"])
    assert result.exit_code == 0, result.output
    listed = {r["rule"]: r for r in json.loads(result.output)}
    assert listed.keys() == RULES.keys()
    assert listed["probing.refusal_burst"]["severities"] == ["MEDIUM", "HIGH"]
    assert listed["handoff.missing"]["scope"] == "federation"
    assert ":attr:" not in listed["probing.refusal_burst"]["catches"]


def test_a_release_without_an_allowed_decision(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    tax.add("query.received", {"request_digest": "ab" * 32}, actor="alice", query_id="q1")
    tax.add("policy.decision", decision(), actor="alice", query_id="q1")
    tax.add("result.released", released(), query_id="q1")  # allowed first: fine
    tax.add("query.received", {"request_digest": "ab" * 32}, actor="alice", query_id="q2")
    tax.add("policy.decision", decision(allowed=False, rule="grant.missing"), actor="alice",
            query_id="q2")  # fmt: skip
    bad = tax.add("result.released", released(), query_id="q2")
    orphan = tax.add("result.released", released(), query_id="q3")
    alerts = fired(run(tax), "release.without_decision")
    assert [(a.query_id, a.severity, a.node) for a in alerts] == [
        ("q2", Severity.HIGH, "tax"),
        ("q3", Severity.HIGH, "tax"),
    ]
    assert "logged no allowed policy decision" in alerts[0].detail
    assert alerts[0].entries[-1].index == bad and alerts[1].entries[-1].index == orphan


def test_an_important_query_released_without_approval(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    tax.add("dataset.added", {"name": "health", "grade": "important", "require_approval": False})
    # Approved, then released: fine.
    tax.add("policy.decision", decision("health", requires_approval=True), actor="alice",
            query_id="ok")  # fmt: skip
    tax.add("approval.granted", {"dataset": "health", "analyst": "alice"}, actor="operator:tax",
            query_id="ok")  # fmt: skip
    tax.add("result.released", released(), query_id="ok")
    # Released with no approval logged.
    tax.add("policy.decision", decision("health", requires_approval=True), actor="alice",
            query_id="skipped")  # fmt: skip
    tax.add("result.released", released(), query_id="skipped")
    # The decision itself let important data through without requiring approval.
    tax.add("policy.decision", decision("health"), actor="alice", query_id="lax")
    # An exact release on general data, released after the operator denied it.
    tax.add("policy.decision", decision(requires_approval=True, exact=True, epsilon="0"),
            actor="alice", query_id="denied")  # fmt: skip
    tax.add("approval.denied", {"dataset": "residents", "analyst": "alice"},
            actor="operator:tax", query_id="denied")  # fmt: skip
    tax.add("result.released", released(exact=True), query_id="denied")
    alerts = fired(run(tax), "approval.missing")
    assert sorted((a.query_id, a.severity) for a in alerts) == [
        ("lax", Severity.HIGH), ("skipped", Severity.HIGH),
    ]  # fmt: skip
    by_query = {a.query_id: a.detail for a in alerts}
    assert "health is important data" in by_query["skipped"]
    assert "without requiring approval" in by_query["lax"]
    # The denied query was evicted when its reservation went back: its release is an orphan.
    assert [a.query_id for a in fired(run(tax), "release.without_decision")] == ["denied"]


def test_a_grant_used_after_its_revocation_or_expiry(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    tax.add("grant.created", grant_created("g1"), actor="operator:tax", at=0)
    tax.add("grant.created", grant_created("g2", expires_at=T0 + 100), actor="operator:tax")
    tax.add("policy.decision", decision(grant_id="g1"), actor="alice", query_id="before", at=10)
    revoked = tax.add("grant.revoked", {"grant_id": "g1", "revoked_at": T0 + 20, "reason": "x"},
                      actor="operator:tax", at=20)  # fmt: skip
    # Logged within the revocation's slack (an admission that read the grant just before).
    tax.add("policy.decision", decision(grant_id="g1"), actor="alice", query_id="race", at=20.4)
    tax.add("policy.decision", decision(grant_id="g1"), actor="alice", query_id="after", at=30)
    # Admitted before the revocation, released after it.
    tax.add("result.released", released(), query_id="before", at=31)
    tax.add("policy.decision", decision(grant_id="g2"), actor="alice", query_id="live", at=99)
    tax.add("policy.decision", decision(grant_id="g2"), actor="alice", query_id="late", at=102)
    alerts = fired(run(tax), "grant.used_after_end")
    assert sorted(a.key.split("/", 2)[2] for a in alerts) == [
        "after/allowed", "before/released", "late/allowed",
    ]  # fmt: skip
    after = next(a for a in alerts if a.query_id == "after")
    assert after.severity is Severity.HIGH and revoked in [e.index for e in after.entries]
    assert "after its revocation" in after.detail
    assert "after its expiry" in next(a for a in alerts if a.query_id == "late").detail


def test_a_refusal_burst_is_probing_and_sustained_probing_is_high(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    refusal = decision(allowed=False, rule="grant.missing")
    for n in range(4):  # four refusals in ten minutes: an analyst fixing a query
        tax.add("policy.decision", refusal, actor="mallory", query_id=f"a{n}", at=n * 60)
    for n in range(30):  # rate-limit refusals do not count as probing
        tax.add("policy.decision", decision(allowed=False, rule="rate_limit"), actor="mallory",
                query_id=f"r{n}", at=300 + n)  # fmt: skip
    assert fired(run(tax), "probing.refusal_burst") == []
    fifth = tax.add("policy.decision", refusal, actor="mallory", query_id="a4", at=400)
    [medium] = fired(run(tax), "probing.refusal_burst")
    assert medium.severity is Severity.MEDIUM and medium.analyst == "mallory"
    assert medium.entries[-1].index == fifth and len(medium.entries) == 5
    for n in range(5, 15):
        tax.add("policy.decision", refusal, actor="mallory", query_id=f"a{n}", at=400 + n)
    alerts = fired(run(tax), "probing.refusal_burst")
    assert [a.severity for a in alerts] == [Severity.HIGH, Severity.MEDIUM]
    assert "15 refusals" in alerts[0].detail
    assert len(alerts[1].entries) == 15  # one alert for the whole run, not one per refusal
    # An hour later a new run starts: a new alert.
    for n in range(5):
        tax.add("policy.decision", refusal, actor="mallory", query_id=f"b{n}", at=4000 + n)
    assert len(fired(run(tax), "probing.refusal_burst")) == 3


def test_rate_limit_hits(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    limited = decision(allowed=False, rule="rate_limit")
    tax.add("policy.decision", limited, actor="alice", query_id="x0", at=0)
    [low] = fired(run(tax), "rate_limit.hit")
    assert low.severity is Severity.LOW and low.analyst == "alice"
    for n in range(1, 10):
        tax.add("policy.decision", limited, actor="alice", query_id=f"x{n}", at=n)
    alerts = fired(run(tax), "rate_limit.hit")
    assert [a.severity for a in alerts] == [Severity.MEDIUM, Severity.LOW]
    assert "10 refusals" in alerts[0].detail


def test_a_budget_mostly_spent(logs: dict[str, Log]) -> None:
    tax, civil = logs["tax"], logs["civil"]
    for log in (tax, civil):
        log.add("grant.created", grant_created(epsilon="2"), actor=f"operator:{log.node}")
    # tax: 0.5 + 0.5, then 0.5 returned, then 0.6: 1.1 of 2 — below 80 %.
    # civil: 0.5 + 0.5 + 0.6 = 1.6 of 2 — 80 %.
    for log in (tax, civil):
        for n, eps in enumerate(("0.5", "0.5")):
            log.add("policy.decision", decision(epsilon=eps), actor="alice", query_id=f"q{n}")
    tax.add("budget.settled", {"reservation": "returned", "reason": "failed"}, query_id="q0")
    for log in (tax, civil):
        log.add("policy.decision", decision(epsilon="0.6"), actor="alice", query_id="q2")
    alerts = fired(run(tax, civil), "budget.mostly_spent")
    assert [(a.node, a.severity, a.analyst, a.dataset) for a in alerts] == [
        ("civil", Severity.MEDIUM, "alice", "residents")
    ]
    assert "ε 1.6 of 2 (80%)" in alerts[0].detail


def test_exact_releases_are_informational(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    tax.add("policy.decision", decision(exact=True, requires_approval=True, epsilon="0"),
            actor="alice", query_id="e1")  # fmt: skip
    tax.add("approval.granted", {}, actor="operator:tax", query_id="e1")
    tax.add("result.released", released(exact=True), query_id="e1")
    tax.add("policy.decision", decision(), actor="alice", query_id="n1")
    tax.add("result.released", released(), query_id="n1")
    assert [(a.rule, a.severity, a.query_id) for a in run(tax)] == [
        ("release.exact", Severity.LOW, "e1")
    ]


def received(key: SigningKey, where: tuple[Condition, ...]) -> tuple[str, dict[str, Any]]:
    """A real signed PSI request filtering tax.residents by ``where``: (query id, fields)."""
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number", where),
        right=Side("civil", "assistance", "id_number"), epsilon=PSI_EPSILON,
    )  # fmt: skip
    request = sign_request(key, analyst="alice", kind=plan.kind.value, body=plan.to_json(), now=T0)
    signed = request.encode()
    fields = {"request": signed, "request_digest": hashlib.sha256(signed).hexdigest(),
              "kind": plan.kind.value}  # fmt: skip
    return request.query_id_hex, fields


def test_filters_one_condition_apart_are_differencing(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    key = STANDARD.generate_signing_key()
    year = Condition("year", "=", 2025)
    asked = [
        (year,),
        (year, Condition("district", "=", "d1")),  # one condition added: nested sets
        (year, Condition("district", "=", "d2")),  # vs the previous one: disjoint, not nested
    ]
    ids = []
    for n, where in enumerate(asked):
        query_id, fields = received(key, where)
        ids.append(query_id)
        tax.add("query.received", fields, actor="alice", query_id=query_id, at=n * 60)
        tax.add("policy.decision", decision(), actor="alice", query_id=query_id)
    alerts = fired(run(tax), "differencing.filters")
    assert len(alerts) == 1 and alerts[0].severity is Severity.MEDIUM
    assert alerts[0].analyst == "alice" and alerts[0].dataset == "residents"
    # The second query is one condition apart from the first; the third from the first too.
    assert ids[1] in alerts[0].detail or ids[2] in alerts[0].detail
    assert "2 in a run" in alerts[0].detail
    # A day later the same pair is a new series; the tracker's refusal also counts.
    tax.add("policy.decision", decision(allowed=False, rule="filter.overlap"), actor="tax",
            query_id=ids[2], at=2 * 86400)  # fmt: skip
    assert len(fired(run(tax), "differencing.filters")) == 2


def test_one_condition_apart() -> None:
    def conds(*items: tuple[str, str, object]) -> frozenset[tuple[str, str, object]]:
        return frozenset(items)

    base = conds(("year", "=", 2025))
    assert one_condition_apart(base, conds(("year", "=", 2025), ("district", "=", "d1")))
    assert one_condition_apart(conds(("age", ">=", 30)), conds(("age", ">", 31)))
    assert one_condition_apart(conds(("d", "in", ("a", "b"))), conds(("d", "in", ("a",))))
    assert one_condition_apart(conds(("d", "!=", "a")), conds(("d", "!=", "b")))
    assert not one_condition_apart(base, base)
    assert not one_condition_apart(conds(("d", "=", "a")), conds(("d", "=", "b")))
    assert not one_condition_apart(conds(("age", ">=", 30)), conds(("age", "<=", 30)))
    assert not one_condition_apart(conds(("a", "=", 1)), conds(("b", "=", 1)))
    assert not one_condition_apart(base, conds(("year", "=", 2025), ("a", "=", 1), ("b", "=", 2)))


def test_a_witness_refused_a_checkpoint(logs: dict[str, Log]) -> None:
    civil = logs["civil"]
    refusal = {"log": "govshare/testfed/tax", "rule": "witness.rollback", "reason": "older"}
    civil.add("witness.refused", refusal, actor="tax")
    civil.add("witness.refused", refusal, actor="tax")
    civil.add("witness.cosigned", {"log": "govshare/testfed/tax", "size": 9}, actor="tax")
    [alert] = run(civil, logs["tax"])
    assert (alert.rule, alert.severity, alert.node) == ("witness.refused", Severity.HIGH, "tax")
    assert len(alert.entries) == 2 and {e.node for e in alert.entries} == {"civil"}
    assert "witness civil refused tax's checkpoint (witness.rollback" in alert.detail


def step(peer: str, direction: str, digest: str = "11" * 32) -> dict[str, object]:
    return {"peer": peer, "direction": direction, "phase": "own", "digest": digest, "size": 3}


def test_a_handoff_missing_at_the_peer(logs: dict[str, Log]) -> None:
    tax, civil = logs["tax"], logs["civil"]
    # q1: matched on both sides. q2: civil logged another digest. q3: civil logged nothing yet
    # and its log does not reach past the grace period: not judged.
    for log, peer in ((tax, "civil"), (civil, "tax")):
        log.add("protocol.step", step(peer, "sent"), query_id="q1", at=0)
        log.add("protocol.step", step(peer, "received"), query_id="q1")
        log.add("result.released", released(), query_id="q1")
    tax.add("protocol.step", step("civil", "sent"), query_id="q2", at=10)
    tax.add("result.released", released(), query_id="q2")
    civil.add("protocol.step", step("tax", "received", "22" * 32), query_id="q2", at=10)
    civil.add("result.released", released(), query_id="q2")
    tax.add("protocol.step", step("civil", "sent"), query_id="q3", at=20)
    tax.add("result.released", released(), query_id="q3")
    alerts = fired(run(tax, civil), "handoff.missing")
    assert {(a.query_id, a.severity) for a in alerts} == {("q2", Severity.HIGH)}
    assert {a.node for a in alerts} == {"tax", "civil"}
    sent = next(a for a in alerts if a.node == "tax")
    assert "tax logged sending own (3 items" in sent.detail and "no such message" in sent.detail
    # civil's log now reaches well past q3: the missing receipt is judged.
    civil.add("witness.cosigned", {"log": "x", "size": 1}, actor="tax", at=20 + 301)
    assert {a.query_id for a in fired(run(tax, civil), "handoff.missing")} == {"q2", "q3"}
    # A failed query stops mid-protocol by design: not a missing hand-off.
    tax.add("query.failed", {"reason": "peer aborted", "released": False}, query_id="q3")
    assert {a.query_id for a in fired(run(tax, civil), "handoff.missing")} == {"q2"}


def test_since_keeps_only_recent_alerts(logs: dict[str, Log]) -> None:
    tax = logs["tax"]
    tax.add("result.released", released(), query_id="old", at=0)
    tax.add("result.released", released(), query_id="new", at=3600)
    entries = {"tax": tax.entries()}
    assert len(check(entries)) == 2
    assert [a.query_id for a in check(entries, since_ms=(T0 + 60) * 1000)] == ["new"]


# --- real nodes, real queries -----------------------------------------------------------------


@dataclass
class Federation:
    fed: FederationFixture
    nodes: dict[str, Node]
    servers: list[RunningNode]
    state: Path  # the auditor's state, pulled right after the clean queries


def start(fed: FederationFixture, name: str, **config: Any) -> tuple[Node, RunningNode]:
    settings = dataclasses.replace(NodeConfig.load(fed.node_home(name)), **config)
    node = Node.from_config(settings)
    assert node.risk.caught_up.wait(30)
    return node, create_server(node, settings.listen)


def approve_pending(nodes: dict[str, Node]) -> Any:
    def on_status(node: str, state: str, message: str) -> None:
        if state == PENDING:
            store = nodes[node].query_store
            for waiting in approvals.pending(store, suite=STANDARD):
                approvals.decide(
                    store, nodes[node].audit, waiting.record.query_id, approve=True,
                    operator=f"operator:{node}", reason="reviewed", suite=STANDARD,
                )  # fmt: skip

    return on_status


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """tax and civil answer three real queries (two noised counts, one exact count approved by
    both operators); ghost, with no data, only witnesses (every checkpoint then has the
    witness quorum); the auditor pulls the three logs right away."""
    root = tmp_path_factory.mktemp("risk")
    fed = build_federation(root)
    nodes: dict[str, Node] = {}
    servers: list[RunningNode] = []
    for name in ("tax", "civil", "ghost"):
        node, server = start(fed, name)
        nodes[name], servers = node, [*servers, server]
    synth.generate(root / "data", size=300, seed=5)
    register(nodes["tax"], root / "data" / f"{synth.TAX}.csv", name="residents",
             columns=TAX_COLUMNS)  # fmt: skip
    register(nodes["civil"], root / "data" / f"{synth.CIVIL}.csv", name="assistance",
             columns=CIVIL_COLUMNS)  # fmt: skip
    kinds = [QueryKind.PSI_CARDINALITY]
    grant(nodes["tax"], "residents", "alice", ["id_number", "income_band", "year"], kinds)
    grant(nodes["civil"], "assistance", "alice", ["id_number", "year"], kinds)
    alice = fed.identity("alice")
    high = (Condition("income_band", "=", "high"),)
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number", high),
        right=Side("civil", "assistance", "id_number"), epsilon=PSI_EPSILON,
    )  # fmt: skip
    run_psi(alice, plan)
    run_psi(alice, plan)  # the same question twice: not differencing
    run_psi(alice, dataclasses.replace(plan, epsilon=None, exact=True),
            on_status=approve_pending(nodes))  # fmt: skip
    auditor = Auditor(fed.identity("audra"), root / "state")
    for name in nodes:
        verdict = auditor.pull(name)
        assert verdict.ok, verdict.problems
    yield Federation(fed, nodes, servers, root / "state")
    for server in servers:
        server.stop(0)
    for node in nodes.values():
        node.close()


def test_real_queries_raise_only_the_informational_exact_release(
    federation: Federation,
) -> None:
    alerts = check_pulled(federation.state, ["tax", "civil", "ghost"])
    assert sorted((a.rule, a.severity, a.node) for a in alerts) == [
        ("release.exact", Severity.LOW, "civil"),
        ("release.exact", Severity.LOW, "tax"),
    ]
    # The queries did reach the rules' facts: three decisions per node, ε charged.
    entries = {n: [e.decode() for e in node.audit.iter_entries()]
               for n, node in federation.nodes.items()}  # fmt: skip
    kinds = [e.kind for e in entries["tax"]]
    # Two noised counts (shared dummies, own set sent and received) and one exact count.
    assert kinds.count("result.released") == 3 and kinds.count("protocol.step") == 3 + 3 + 2


def test_a_node_records_what_the_auditor_finds_in_its_log(federation: Federation) -> None:
    for name, node in federation.nodes.items():
        node.risk.poll()
        recorded = {a.key for a in logged_alerts(node.audit)}
        entries = [e.decode() for e in node.audit.iter_entries()]
        found = {
            a.key
            for a in check({name: entries})
            if RULES[a.rule].scope is Scope.LOG and a.rule != "witness.refused"
        }
        # tax and civil each released the exact count; ghost only witnessed.
        assert recorded == found and len(found) == (name != "ghost"), (name, recorded, found)


def govshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_audit_check_as_a_subprocess(federation: Federation, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(federation.state, state)
    audra = ["--state", str(state), "--identity", str(federation.fed.bundles["audra"])]
    clean = govshare("audit", "check", "--all", *audra)
    assert clean.returncode == 0, clean.stderr
    assert "audit check: 0 HIGH, 0 MEDIUM, 2 LOW over 3 node log(s): tax, civil, ghost" in (
        clean.stdout
    )
    assert "release.exact" in clean.stdout
    listed = json.loads(govshare("audit", "check", "--all", "--json", *audra).stdout)
    assert [(a["rule"], a["severity"]) for a in listed] == [("release.exact", "LOW")] * 2
    assert set(listed[0]) == {
        "rule", "severity", "node", "detail", "entries", "time_ms", "key", "analyst", "dataset",
        "query_id",
    }  # fmt: skip

    # tax logs a release for a query it never decided; the auditor pulls it.
    tax = federation.nodes["tax"]
    tax.audit.record("result.released", released(), actor="tax", query_id="f0" * 16)
    assert Auditor(federation.fed.identity("audra"), state).pull("tax").ok
    high = govshare("audit", "check", "--all", *audra)
    assert high.returncode == 2, high.stderr
    assert "release.without_decision" in high.stdout and "1 HIGH" in high.stdout
    as_json = json.loads(govshare("audit", "check", "tax", "--json", *audra).stdout)
    assert as_json[0]["severity"] == "HIGH" and as_json[0]["query_id"] == "f0" * 16
    future = govshare("audit", "check", "--all", "--json", "--since", "2999-01-01", *audra)
    assert future.returncode == 0 and json.loads(future.stdout) == []
    bad = govshare("audit", "check", "--since", "yesterday", *audra)
    assert bad.returncode == 2 and "--since" in bad.stderr  # click's usage error

    # --watch pulls, checks, prints each alert once (JSON lines), and keeps the HIGH exit code.
    watched = govshare(
        "audit", "check", "--all", "--watch", "0.05", "--iterations", "2", "--json", *audra
    )  # fmt: skip
    assert watched.returncode == 2, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert sorted(a["rule"] for a in lines) == [
        "release.exact", "release.exact", "release.without_decision",
    ]  # fmt: skip
    assert len({a["key"] for a in lines}) == len(lines)


# --- a node warns its operator ------------------------------------------------------------------


def submit(identity: Identity, node: str = "tax") -> str:
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    request = sign_request(
        identity.signing_key, analyst=identity.name, kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with NodeClient.to(identity, node) as client:
        client.submit(request.encode())
        return client.status(request.query_id_hex).state


def rules_logged(node: Node) -> list[tuple[str, str, bool]]:
    return [(a.rule, a.severity, a.suspended) for a in logged_alerts(node.audit)]


def test_a_node_suspends_a_prober_until_the_operator_clears_it(tmp_path: Path) -> None:
    fed = build_federation(tmp_path)
    home = fed.node_home("tax")
    node, server = start(fed, "tax", suspend_on_high_alert=True)
    try:
        synth.generate(tmp_path / "data", size=100, seed=4)
        register(node, tmp_path / "data" / f"{synth.TAX}.csv", name="residents",
                 columns=TAX_COLUMNS)  # fmt: skip
        grant(node, "residents", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
        prober, alice = fed.identity("hkana"), fed.identity("alice")
        for n in range(1, 16):
            with pytest.raises(PolicyRefused) as refused:
                submit(prober)
            assert refused.value.rule == "grant.missing"
            if n == 4:
                assert rules_logged(node) == []
            if n == 5:
                assert rules_logged(node) == [("probing.refusal_burst", "MEDIUM", False)]
        assert rules_logged(node)[-1] == ("probing.refusal_burst", "HIGH", True)
        assert node.suspensions.get("hkana") is not None
        with pytest.raises(PolicyRefused) as refused:
            submit(prober)
        assert refused.value.rule == "risk.suspended"
        assert submit(alice) == "approved"  # only the prober is suspended

        listed = govshare("node", "alerts", "--home", str(home), "--json")
        assert listed.returncode == 0, listed.stderr
        shown = json.loads(listed.stdout)
        assert [(a["severity"], a["analyst"]) for a in shown["alerts"]] == [
            ("MEDIUM", "hkana"), ("HIGH", "hkana"),
        ]  # fmt: skip
        assert [s["analyst"] for s in shown["suspended"]] == ["hkana"]

        # The operator clears it from another process while the node serves.
        cleared = govshare("node", "alerts", "clear", "--home", str(home), "--analyst", "hkana",
                           "--reason", "spoke to the analyst; script fixed",
                           "--identity", fed.operator("tax"))  # fmt: skip
        assert cleared.returncode == 0, cleared.stderr
        with pytest.raises(PolicyRefused) as refused:
            submit(prober)
        assert refused.value.rule == "grant.missing"
        logged = [e.decode() for e in node.audit.iter_entries()]
        [clear_entry] = [e for e in logged if e.kind == "risk.cleared"]
        assert clear_entry.actor == "op-tax"
        assert clear_entry.fields["analyst"] == "hkana"
        assert clear_entry.fields["reason"] == "spoke to the analyst; script fixed"
        suspended_refusals = [
            e for e in logged
            if e.kind == "policy.decision" and e.fields.get("rule") == "risk.suspended"
        ]  # fmt: skip
        assert len(suspended_refusals) == 1 and suspended_refusals[0].actor == "hkana"
        again = govshare("node", "alerts", "clear", "--home", str(home), "--analyst", "hkana",
                         "--reason", "twice", "--identity", fed.operator("tax"))  # fmt: skip
        assert again.returncode == 1 and "not suspended" in again.stderr
    finally:
        server.stop(0)
        node.close()

    # A restart reads the log again and repeats no alert.
    config = dataclasses.replace(NodeConfig.load(home), suspend_on_high_alert=True)
    restarted = Node.from_config(config)
    try:
        assert restarted.risk.caught_up.wait(30)
        assert len(rules_logged(restarted)) == 2
        assert restarted.suspensions.get("hkana") is None
    finally:
        restarted.close()
