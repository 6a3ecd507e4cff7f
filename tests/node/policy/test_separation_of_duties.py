"""Separation of duties (issue 11, item 2): on important data the approver of a query is not
the person who issued the grant it uses; a dataset may require two different approvers.

The queries are stored pending in the node's real store and decided through the operator's
façade (the node code path the CLI uses), each approval a signed act of a named person.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import FederationFixture, build_federation

from govshare.model.governance import ColumnKind, ColumnRule, Grade, OwnerKind, Role, SharingType
from govshare.model.identity import Identity
from govshare.model.operator_act import ActSigner
from govshare.model.states import APPROVED, PENDING
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.operator import Operator
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.protocols.auditverify import AuditEntry
from govshare.protocols.errors import PolicyRefused
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD

IDS = [resident_id.make("110101", date(1960 + i, 1 + i % 12, 1 + i % 28), i) for i in range(30)]
RULES = [
    ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
    ColumnRule("visits", ColumnKind.AGGREGATE),
]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    fed = build_federation(tmp_path_factory.mktemp("duties"), "dutiesfed")
    for name in ("li-na", "zhou-min"):  # approvers only
        fed.federation, _ = fed.federation.enrol(
            role=Role.OPERATOR, name=name, jurisdiction="CN", out=fed.root / name,
            node="tax", duties=("approve",),
        )  # fmt: skip
        fed.bundles[name] = fed.root / name
    for bundle in fed.bundles.values():
        fed.federation.publish_roster(bundle)
    return fed


def operator(fed: FederationFixture, name: str) -> Operator:
    me = Identity.load(fed.bundles[name])
    return Operator(fed.node_home("tax"), signer=ActSigner(me.name, me.signing_key))


def registered(fed: FederationFixture, tmp_path: Path, name: str, grade: Grade) -> str:
    """Dataset ``name`` at tax, and a grant on it to alice issued by op-tax; returns its id."""
    csv = tmp_path / f"{name}.csv"
    csv.write_text("id_number,visits\n" + "".join(f"{k},{i}\n" for i, k in enumerate(IDS)))
    registrar = operator(fed, "op-tax")
    registrar.add_dataset(
        csv, name=name, grade=grade, sharing_type=SharingType.CONDITIONAL, legal_basis="",
        owner_kind=OwnerKind.STATE, owner="state", holder=None, columns=RULES, description="",
        skip_invalid=False, allowed_jurisdictions=(), min_group_size=0, min_set_size=0,
        require_dp=False, require_approval=True,
    )  # fmt: skip
    return registrar.issue_grant(
        dataset=name, grantee="alice", purpose="clinic review", columns=["id_number", "visits"],
        query_kinds=["intersection_aggregate"], expires_at=4_000_000_000, epsilon="1",
        max_queries=5,
    ).grant_id  # fmt: skip


def pending(fed: FederationFixture, dataset: str, grant_id: str) -> str:
    """A query on ``dataset`` under ``grant_id`` waiting for approval at tax."""
    alice = fed.identity("alice")
    request = sign_request(
        alice.signing_key, analyst="alice", kind="intersection_aggregate", body={"q": dataset},
        now=int(time.time()),
    )  # fmt: skip
    store = QueryStore(NodeConfig.load(fed.node_home("tax")).database_path)
    try:
        store.create(
            QueryRecord(
                query_id=request.query_id_hex, analyst="alice", kind=request.kind,
                dataset=dataset, purpose="clinic review", request=request.encode(),
                state=PENDING, rule="allowed", message="waiting for the operator's approval",
                grant_id=grant_id, epsilon=Fraction(1), received_at=request.issued_at,
                updated_at=request.issued_at,
            )
        )  # fmt: skip
    finally:
        store.close()
    return request.query_id_hex


def state(fed: FederationFixture, query_id: str) -> str:
    store = QueryStore(NodeConfig.load(fed.node_home("tax")).database_path)
    try:
        return store.get(query_id).state
    finally:
        store.close()


def logged(fed: FederationFixture, query_id: str) -> list[AuditEntry]:
    with AuditLog.open(
        NodeConfig.load(fed.node_home("tax")).audit_database_path, suite=STANDARD
    ) as log:
        return [e.decode() for e in log.entries_for_query(query_id)]


def test_the_grant_issuer_cannot_approve_a_query_on_important_data(
    fed: FederationFixture, tmp_path: Path
) -> None:
    grant_id = registered(fed, tmp_path, "visits_important", Grade.IMPORTANT)
    query_id = pending(fed, "visits_important", grant_id)
    with pytest.raises(PolicyRefused, match="op-tax issued grant") as refused:
        operator(fed, "op-tax").decide(query_id, approve=True, reason="looks fine")
    assert refused.value.rule == "duty.separation"
    assert state(fed, query_id) == PENDING
    [entry] = [e for e in logged(fed, query_id) if e.kind == "approval.refused"]
    assert (entry.actor, entry.fields["rule"]) == ("op-tax", "duty.separation")

    operator(fed, "li-na").decide(query_id, approve=True, reason="checked by a second person")
    assert state(fed, query_id) == APPROVED
    granted = [e for e in logged(fed, query_id) if e.kind == "approval.granted"]
    assert [(e.actor, e.fields["approvers"]) for e in granted] == [("li-na", ["li-na"])]


def test_on_general_data_the_issuer_may_approve(fed: FederationFixture, tmp_path: Path) -> None:
    grant_id = registered(fed, tmp_path, "visits_general", Grade.GENERAL)
    query_id = pending(fed, "visits_general", grant_id)
    operator(fed, "op-tax").decide(query_id, approve=True, reason="general data")
    assert state(fed, query_id) == APPROVED


def test_a_dataset_requiring_two_approvers_counts_different_persons(
    fed: FederationFixture, tmp_path: Path
) -> None:
    grant_id = registered(fed, tmp_path, "visits_two", Grade.IMPORTANT)
    home = fed.node_home("tax")
    # The option is set from the CLI, as a signed act of the registrar.
    env = {**os.environ, "GOVSHARE_OPERATOR": str(fed.bundles["op-tax"])}
    set_two = subprocess.run(
        [sys.executable, "-m", "govshare.cli", "dataset", "approvers", "visits_two", "2",
         "--home", str(home), "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert set_two.returncode == 0, set_two.stderr
    assert json.loads(set_two.stdout) == {"dataset": "visits_two", "approvers": 2}
    query_id = pending(fed, "visits_two", grant_id)

    first = subprocess.run(
        [sys.executable, "-m", "govshare.cli", "approvals", "approve", query_id[:12],
         "--home", str(home), "--reason", "first look", "--identity", str(fed.bundles["li-na"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "your approval is recorded" in first.stdout and "2 different" in first.stdout
    assert state(fed, query_id) == PENDING
    with pytest.raises(PolicyRefused, match="already approved") as again:
        operator(fed, "li-na").decide(query_id, approve=True, reason="me again")
    assert again.value.rule == "approval.distinct"
    assert state(fed, query_id) == PENDING
    with pytest.raises(PolicyRefused) as issuer:
        operator(fed, "op-tax").decide(query_id, approve=True, reason="the issuer")
    assert issuer.value.rule == "duty.separation"

    operator(fed, "zhou-min").decide(query_id, approve=True, reason="second look")
    assert state(fed, query_id) == APPROVED
    kinds = [(e.kind, e.actor) for e in logged(fed, query_id)]
    assert kinds == [
        ("approval.recorded", "li-na"),
        ("approval.refused", "li-na"),
        ("approval.refused", "op-tax"),
        ("approval.granted", "zhou-min"),
    ]
    last = logged(fed, query_id)[-1]
    assert last.fields["approvers"] == ["li-na", "zhou-min"]


def test_setting_approvers_needs_the_register_duty(fed: FederationFixture) -> None:
    with pytest.raises(PolicyRefused) as refused:
        operator(fed, "li-na").set_approvers("visits_two", 1)
    assert refused.value.rule == "operator.duty"
    assert Operator(fed.node_home("tax")).approvers("visits_two") == 2
