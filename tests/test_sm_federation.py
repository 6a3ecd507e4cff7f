"""One story on both crypto suites: a federation made with ``--suite sm`` answers the same joint
queries as one on ``standard`` (the same data, exact figures where the test allows them), its
logs and receipts verify under SM2 and SM3, and a signature of the other suite is refused."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import (
    CIVIL_COLUMNS,
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    build_federation,
    grant,
    intersection_plan,
    psi_shift,
    register,
    served,
)

from govshare.client.analyst import log_keys, run_psi
from govshare.client.analyst_aggregate import run_horizontal_aggregate, run_intersection_aggregate
from govshare.client.auditor import Auditor
from govshare.examples import synth
from govshare.model.aggregate_plan import (
    BFV,
    Figures,
    HorizontalPlan,
    Part,
    SumSpec,
)
from govshare.model.digests import digests_for
from govshare.model.governance import QueryKind, Role, SharingType
from govshare.model.identity import create_request
from govshare.model.operator_act import ActSigner, OperatorAct, verify_act
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.states import PENDING
from govshare.node.data import resident_id
from govshare.node.data.mask_key import MASK_SECRET, MaskSecret
from govshare.node.data.masking import apply_mask
from govshare.node.node import Node
from govshare.node.operator import Operator
from govshare.node.policy.approvals import PendingQuery
from govshare.protocols.checkpoint import open_checkpoint
from govshare.protocols.errors import MalformedInput, NotFound, VerificationFailed
from govshare.protocols.receipt import verify_receipt
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import SM, STANDARD, Suite
from govshare.rpc.client import NodeClient

KINDS = [
    QueryKind.PSI_CARDINALITY,
    QueryKind.INTERSECTION_AGGREGATE,
    QueryKind.HORIZONTAL_AGGREGATE,
]


@dataclass
class Story:
    suite: Suite
    fed: FederationFixture
    nodes: dict[str, Node]
    manifest: dict[str, object]
    root: Path


def _story(root: Path, suite: Suite) -> Iterator[Story]:
    fed = build_federation(root / "fed", f"{suite.name}fed", suite=suite)
    data = root / "data"
    manifest = synth.generate(data, size=300, seed=11)  # same data on both suites
    # Exact figures (served's default, test-only): the two suites must then give equal answers.
    with served(fed, ("tax", "civil")) as nodes:
        _register(data, nodes)
        yield Story(suite, fed, nodes, manifest, root)


def _register(data: Path, nodes: dict[str, Node]) -> None:
    tax, civil = nodes["tax"], nodes["civil"]
    register(tax, data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
    register(civil, data / f"{synth.CIVIL}.csv", name="assistance", columns=CIVIL_COLUMNS)
    grant(tax, "residents", "alice", ["id_number", "income_band", "year", "annual_income"], KINDS)
    grant(
        civil, "assistance", "alice", ["id_number", "year", "district", "amount"], KINDS
    )  # fmt: skip
    # The tax registry's incomes cut in two same-schema parts, one per node.
    rows = (data / f"{synth.TAX}.csv").read_text(encoding="utf-8").splitlines()
    for i, (name, node) in enumerate(nodes.items()):
        part = data / f"incomes_{name}.csv"
        part.write_text("\n".join([rows[0], *rows[1 + i :: 2]]) + "\n", encoding="utf-8")
        register(node, part, name="incomes", columns=TAX_COLUMNS)
        grant(node, "incomes", "alice", ["annual_income"], KINDS)
    # Both registries again, their keys released by pseudonym; tax's only once its operator has
    # approved.
    pseudonym = "id_number=join_key:resident_id:mask=hash_prefix"
    register(
        tax, data / f"{synth.TAX}.csv", name="pseudonyms", require_approval=True,
        sharing=SharingType.UNCONDITIONAL, columns=(pseudonym, *TAX_COLUMNS[1:]),
    )  # fmt: skip
    register(
        civil, data / f"{synth.CIVIL}.csv", name="pseudonyms",
        sharing=SharingType.UNCONDITIONAL, columns=(pseudonym, *CIVIL_COLUMNS[1:]),
    )  # fmt: skip
    for node in (tax, civil):
        grant(node, "pseudonyms", "alice", ["id_number"], [QueryKind.PSI_MEMBERSHIP])


@pytest.fixture(scope="module")
def standard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    yield from _story(tmp_path_factory.mktemp("standard-story"), STANDARD)


@pytest.fixture(scope="module")
def sm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    yield from _story(tmp_path_factory.mktemp("sm-story"), SM)


def _income_plan() -> HorizontalPlan:
    return HorizontalPlan(
        QueryKind.HORIZONTAL_AGGREGATE,
        PURPOSE,
        parts=(Part("tax", "incomes"), Part("civil", "incomes")),
        figures=Figures(None, (SumSpec("annual_income", 10_000_000),), Fraction(1)),
        aggregator="civil",
        scheme=BFV,
        public_key=b"",
    )


def _figures(story: Story) -> dict[str, object]:
    alice = story.fed.identity("alice")
    joined = run_intersection_aggregate(alice, intersection_plan())
    assert joined.receipt is not None, joined.receipt_error
    verified = verify_receipt(joined.receipt, log_keys(story.fed.federation.roster))
    assert {p.node for p in verified} == {"tax", "civil"}
    reconciled = Auditor(story.fed.identity("audra"), story.root / "audit").show_query(
        joined.query_id
    )
    assert reconciled.ok, reconciled.disagreements
    return {
        "groups": {
            g.label: (g.suppressed, g.count.value, g.sums["amount"].value) for g in joined.groups
        },
    }


def test_the_roster_and_every_key_are_the_suites(sm: Story, standard: Story) -> None:
    for story in (sm, standard):
        roster = story.fed.federation.roster
        assert roster.suite == story.suite.name and roster.crypto is story.suite
        for member in roster.members:
            assert len(member.signing_key) == story.suite.public_key_size
        assert story.nodes["tax"].audit.suite is story.suite
    assert sm.fed.identity("alice").signing_key.suite == "sm"


def test_the_same_intersection_aggregate_on_both_suites(sm: Story, standard: Story) -> None:
    ours, theirs = _figures(sm), _figures(standard)
    assert ours == theirs
    groups = ours["groups"]
    assert isinstance(groups, dict) and any(count for _, count, _ in groups.values())


def test_psi_count_and_logs_on_the_sm_suite(sm: Story) -> None:
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY,
        purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"),
        right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )
    outcome = run_psi(sm.fed.identity("alice"), plan)
    true = sm.manifest["intersections"]
    assert isinstance(true, dict)
    truth = true["tax.residents & civil.assistance"]
    assert abs(outcome.count - truth) <= psi_shift()
    assert outcome.receipt is not None
    keys = log_keys(sm.fed.federation.roster)
    verify_receipt(outcome.receipt, keys)
    # Each node's whole log verifies under its SM2 key and the SM3 tree, and a checkpoint does
    # not open under the standard suite's verifier (no key of that suite in this roster).
    for name, node in sm.nodes.items():
        member = sm.fed.federation.roster.member(name)
        origin = node.publisher.origin
        note = node.audit.checkpoint(node.identity.signing_key, origin)
        report = node.audit.verify(member.verify_key(), origin)
        assert report.ok, report.first_problem
        opened = open_checkpoint(note, member.verify_key(), origin=origin)
        assert opened.size >= 1
        foreign = STANDARD.verify_key(STANDARD.public_key(STANDARD.generate_signing_key()))
        with pytest.raises(VerificationFailed):
            open_checkpoint(note, foreign, origin=origin)


def test_the_same_horizontal_aggregate_on_both_suites(sm: Story, standard: Story) -> None:
    """Pairwise masks on SM4-CTR / HKDF-SM3 cancel as they do on AES / HKDF-SHA256."""
    answers = []
    for story in (sm, standard):
        outcome = run_horizontal_aggregate(story.fed.identity("alice"), _income_plan())
        (group,) = outcome.groups
        answers.append((group.count.value, group.sums["annual_income"].value))
    assert answers[0] == answers[1]
    count, total = answers[0]
    rows = list((sm.root / "data" / f"{synth.TAX}.csv").read_text(encoding="utf-8").splitlines())
    header = rows[0].split(",")
    column = header.index("annual_income")
    expected = sum(int(line.split(",")[column]) for line in rows[1:])
    assert (count, total) == (len(rows) - 1, expected)


def test_a_signature_of_the_other_suite_is_refused(sm: Story) -> None:
    """A patched client signs alice's query with an Ed25519 key on an SM federation; a department
    that made standard-suite keys cannot be enrolled into it."""
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    forged = sign_request(
        STANDARD.generate_signing_key(), analyst="alice", kind=plan.kind.value,
        body=plan.to_json(), now=int(time.time()),
    )  # fmt: skip
    alice = sm.fed.identity("alice")
    with NodeClient.to(alice, "tax") as client:
        with pytest.raises(VerificationFailed) as refused:
            client.submit(forged.encode())
        assert "signature" in str(refused.value)
        with pytest.raises(NotFound):
            client.status(forged.query_id_hex)
    request, _ = create_request(sm.root / "newdept", "newdept", STANDARD)
    with pytest.raises(MalformedInput, match="runs on 'sm'"):
        sm.fed.federation.sign_request(
            request, role=Role.NODE, jurisdiction="CN", address="127.0.0.1:1",
            out=sm.root / "newdept-public",
        )  # fmt: skip


def test_an_approved_pseudonymous_release_is_the_sm_suites_throughout(sm: Story) -> None:
    """A membership query on a dataset that needs approval, its keys released by ``hash_prefix``:
    the operator's queue, the signed approval act and every log entry name the request by one SM3
    digest, and the pseudonyms are HMAC-SM3 under an HKDF-SM3 key of tax's secret. (An approval
    or masking path left on the standard suite logs a SHA-256 digest the query's other entries
    do not share, or releases HMAC-SHA256 pseudonyms.)"""
    home = sm.fed.node_home("tax")
    me = sm.fed.identity("op-tax")
    operator = Operator(home, signer=ActSigner(me.name, me.signing_key))
    queued: list[PendingQuery] = []

    def approve(node: str, state: str, message: str) -> None:
        if node == "tax" and state == PENDING and not queued:
            queued.extend(operator.pending())
            for waiting in queued:
                operator.decide(waiting.record.query_id, approve=True, reason="checked")

    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP, purpose=PURPOSE,
        left=Side("tax", "pseudonyms", "id_number"), right=Side("civil", "pseudonyms", "id_number"),
    )  # fmt: skip
    outcome = run_psi(sm.fed.identity("alice"), plan, on_status=approve, poll=0.05)

    (waiting,) = queued
    request = waiting.record.request
    digest = digests_for(SM).request_digest(request)
    assert digest != digests_for(STANDARD).request_digest(request)
    assert waiting.record.query_id == outcome.query_id and waiting.request_digest == digest
    assert operator.query_details(outcome.query_id).request_digest == digest
    tax = sm.nodes["tax"]
    entries = [e.decode() for e in tax.audit.entries_for_query(outcome.query_id)]
    named = {e.kind: e.fields["request_digest"] for e in entries if "request_digest" in e.fields}
    assert {"query.received", "approval.granted"} <= named.keys()
    assert set(named.values()) == {digest}
    # The operator's approval act (logged beside the query's entries) is signed with op-tax's SM2
    # key over the same digest.
    (act,) = [
        OperatorAct.decode(fields["act"])
        for fields in (e.decode().fields for e in tax.audit.iter_entries())
        if fields.get("action") == "approval.approve"
    ]
    assert act.operator == "op-tax" and act.body["request_digest"] == digest
    verify_act(act, sm.fed.federation.roster.member("op-tax").verify_key(), now=act.issued_at)

    secret = MaskSecret.load(home / MASK_SECRET)
    rows = list(csv.DictReader((sm.root / "data" / f"{synth.TAX}.csv").open(encoding="utf-8")))
    civil = list(csv.DictReader((sm.root / "data" / f"{synth.CIVIL}.csv").open(encoding="utf-8")))
    shared = {resident_id.normalise(r["id_number"]) for r in rows} & {
        resident_id.normalise(r["id_number"]) for r in civil
    }
    assert shared

    def pseudonyms(suite: Suite) -> list[str]:
        key = secret.key("pseudonyms", "id_number", suite)
        return sorted(apply_mask("hash_prefix", k, key=key, suite=suite) for k in shared)

    assert sorted(outcome.records) == pseudonyms(SM)
    assert not set(outcome.records) & set(pseudonyms(STANDARD))
