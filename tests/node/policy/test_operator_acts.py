"""Operators are people: every act is signed by a named operator and checked by the node.

Attacker-style: no identity, a key that is not the roster's, an act that signs other
parameters than those performed, a replayed act, a person without the duty, an operator of
another node. Each is refused naming its rule, logged as ``operator.refused``, and changes
nothing; an accepted act names its person in every entry it writes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from conftest import FederationFixture, build_federation

from govshare.model.governance import ColumnKind, ColumnRule, Grade, OwnerKind, Role, SharingType
from govshare.model.identity import Identity
from govshare.model.operator_act import (
    ActSigner,
    NoSigner,
    OperatorAct,
    sign_act,
    verify_act,
)
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.operator import Operator
from govshare.node.policy.grants import GrantStore
from govshare.protocols.auditverify import AuditEntry
from govshare.protocols.errors import PolicyRefused
from govshare.protocols.suite import STANDARD, SigningKey

IDS = [resident_id.make("310101", date(1970 + i, 1 + i % 12, 1 + i), i) for i in range(6)]
RULES = [
    ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
    ColumnRule("amount", ColumnKind.AGGREGATE),
]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    fed = build_federation(tmp_path_factory.mktemp("acts"), "actsfed")
    # A person with one duty, to be refused the others.
    fed.federation, _ = fed.federation.enrol(
        role=Role.OPERATOR, name="li-na", jurisdiction="CN", out=fed.root / "li-na",
        node="tax", duties=("approve",),
    )  # fmt: skip
    fed.bundles["li-na"] = fed.root / "li-na"
    for bundle in fed.bundles.values():
        fed.federation.publish_roster(bundle)
    return fed


def signer(fed: FederationFixture, name: str) -> ActSigner:
    me = Identity.load(fed.bundles[name])
    return ActSigner(me.name, me.signing_key)


def entries(home: Path) -> list[AuditEntry]:
    with AuditLog.open(NodeConfig.load(home).audit_database_path, suite=STANDARD) as log:
        return [e.decode() for e in log.iter_entries()]


def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "people.csv"
    path.write_text("id_number,amount\n" + "".join(f"{k},{i}\n" for i, k in enumerate(IDS)))
    return path


def add_dataset(operator: Operator, csv: Path, name: str) -> None:
    operator.add_dataset(
        csv, name=name, grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
        legal_basis="", owner_kind=OwnerKind.STATE, owner="state", holder=None, columns=RULES,
        description="", skip_invalid=False, allowed_jurisdictions=(), min_group_size=0,
        min_set_size=0, require_dp=False, require_approval=False,
    )  # fmt: skip


def issue(operator: Operator, dataset: str, epsilon: str = "1") -> str:
    return operator.issue_grant(
        dataset=dataset, grantee="alice", purpose="a review", columns=["id_number"],
        query_kinds=["psi_cardinality"], expires_at=4_000_000_000, epsilon=epsilon,
        max_queries=5,
    ).grant_id  # fmt: skip


@dataclasses.dataclass
class Forger:
    """Signs as ``name`` with its own key (not the roster's)."""

    name: str
    key: SigningKey = dataclasses.field(default_factory=STANDARD.generate_signing_key)

    def sign(self, *, node: str, action: str, body: Mapping[str, Any], now: int) -> OperatorAct:
        return sign_act(self.key, operator=self.name, node=node, action=action, body=body, now=now)


@dataclasses.dataclass
class Swapper:
    """The real person's key, over other parameters than those the node performs."""

    inner: ActSigner

    def sign(self, *, node: str, action: str, body: Mapping[str, Any], now: int) -> OperatorAct:
        return self.inner.sign(node=node, action=action, body={**body, "epsilon": "100"}, now=now)


@dataclasses.dataclass
class Replayer:
    """Signs once, then hands the same act again."""

    inner: ActSigner
    held: OperatorAct | None = None

    def sign(self, *, node: str, action: str, body: Mapping[str, Any], now: int) -> OperatorAct:
        if self.held is None:
            self.held = self.inner.sign(node=node, action=action, body=body, now=now)
        return self.held


def test_accepted_acts_name_their_person(fed: FederationFixture, tmp_path: Path) -> None:
    home = fed.node_home("tax")
    operator = Operator(home, signer=signer(fed, "op-tax"))
    add_dataset(operator, csv_file(tmp_path), "named")
    grant_id = issue(operator, "named")
    assert GrantStore(NodeConfig.load(home).database_path).get(grant_id).granted_by == "op-tax"
    log = entries(home)
    created = next(e for e in log if e.kind == "grant.created" and e.fields["grant_id"] == grant_id)
    act_entry = log[created.index + 1]
    assert (created.actor, act_entry.kind, act_entry.actor) == ("op-tax", "operator.act", "op-tax")
    # The logged act is the person's signature over exactly what was done.
    act = OperatorAct.decode(act_entry.fields["act"])
    roster = Identity.load(home).roster
    verify_act(act, roster.member("op-tax").verify_key(), now=act.issued_at)
    assert (act.node, act.action, act.body["grantee"], act.body["epsilon"]) == (
        "tax",
        "grant.add",
        "alice",
        "1",
    )


@pytest.mark.parametrize(
    ("make_signer", "rule", "why"),
    [
        (lambda fed: None, "operator.identity", "no valid operator identity"),
        (lambda fed: NoSigner("no bundle at x", claimed="x"), "operator.identity", "no bundle"),
        (lambda fed: Forger("op-tax"), "operator.identity", "signature does not verify"),
        (lambda fed: Swapper(signer(fed, "op-tax")), "operator.identity", "does not sign"),
        (lambda fed: signer(fed, "op-civil"), "operator.identity", "not an operator of tax"),
        (lambda fed: signer(fed, "alice"), "operator.identity", "not an operator of tax"),
        (lambda fed: signer(fed, "li-na"), "operator.duty", "no duty 'grant'"),
    ],
    ids=["none", "no-bundle", "forged-key", "other-body", "other-node", "analyst", "no-duty"],
)
def test_refused_acts_are_logged_and_change_nothing(
    fed: FederationFixture, tmp_path: Path, make_signer: Any, rule: str, why: str
) -> None:
    home = fed.node_home("tax")
    add_dataset(Operator(home, signer=signer(fed, "op-tax")), csv_file(tmp_path), "refusing")
    store = GrantStore(NodeConfig.load(home).database_path)
    before, logged = len(store.list()), len(entries(home))
    with pytest.raises(PolicyRefused, match=why) as refused:
        issue(Operator(home, signer=make_signer(fed)), "refusing")
    assert refused.value.rule == rule
    assert len(store.list()) == before
    new = entries(home)[logged:]
    assert [(e.kind, e.actor) for e in new] == [("operator.refused", "operator:unknown")]
    assert (new[0].fields["rule"], new[0].fields["action"]) == (rule, "grant.add")
    Operator(home, signer=signer(fed, "op-tax")).remove_dataset("refusing")


def test_a_replayed_act_is_refused(fed: FederationFixture, tmp_path: Path) -> None:
    home = fed.node_home("tax")
    add_dataset(Operator(home, signer=signer(fed, "op-tax")), csv_file(tmp_path), "replayed")
    replayer = Replayer(signer(fed, "op-tax"))
    issue(Operator(home, signer=replayer), "replayed")
    with pytest.raises(PolicyRefused, match="replay"):
        issue(Operator(home, signer=replayer), "replayed")
    assert entries(home)[-1].kind == "operator.refused"
    assert len(GrantStore(NodeConfig.load(home).database_path).list(dataset="replayed")) == 1


def test_cli_act_without_operator_identity_is_refused_and_logged(
    fed: FederationFixture, tmp_path: Path
) -> None:
    home = fed.node_home("civil")
    logged = len(entries(home))

    def govshare(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no $GOVSHARE_OPERATOR
        return subprocess.run(
            [sys.executable, "-m", "govshare.cli", *args], capture_output=True, text=True,
            timeout=120, env=env,
        )  # fmt: skip

    add = (
        "dataset", "add", str(csv_file(tmp_path)), "--home", str(home), "--name", "cli_acts",
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "state", "--owner",
        "state", "--column", "id_number=join_key:resident_id", "--column", "amount=aggregate",
    )  # fmt: skip
    refused = govshare(*add)
    assert refused.returncode == 1
    assert "refused by rule operator.identity" in refused.stderr
    assert "GOVSHARE_OPERATOR" in refused.stderr
    # An analyst's bundle is no operator identity either.
    analyst = govshare(*add, "--identity", str(fed.bundles["alice"]))
    assert analyst.returncode == 1 and "not operator" in analyst.stderr
    new = entries(home)[logged:]
    assert [e.kind for e in new] == ["operator.refused", "operator.refused"]
    assert new[1].fields["claimed"] == "alice"

    accepted = govshare(*add, "--identity", fed.operator("civil"))
    assert accepted.returncode == 0, accepted.stderr
    assert [(e.kind, e.actor) for e in entries(home)[logged + 2 :]] == [
        ("dataset.added", "op-civil"),
        ("operator.act", "op-civil"),
    ]
