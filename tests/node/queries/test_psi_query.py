"""Joint PSI queries end to end over real mTLS nodes: counts, receipts, refusals."""

from __future__ import annotations

import dataclasses
import time

import pytest
from conftest import (
    CIVIL_COLUMNS,
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    PsiData,
    grant,
    psi_shift,
    register,
)

from govshare.client.analyst import log_keys, run_psi
from govshare.examples import synth
from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.protocols.errors import (
    Aborted,
    AlreadyExists,
    Conflict,
    MalformedInput,
    NotFound,
    PermissionDenied,
    PolicyRefused,
    VerificationFailed,
)
from govshare.protocols.receipt import ReceiptPart, verify_receipt
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient


def plan(where: tuple[Condition, ...] = (), purpose: str = PURPOSE) -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_CARDINALITY,
        purpose=purpose,
        left=Side("tax", "residents", "id_number", where),
        right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )


def near(value: int, true: int, within: int) -> bool:
    return max(true - within, 0) <= value <= true + within


def test_cardinality_matches_the_known_overlap(fed: FederationFixture, psi_data: PsiData) -> None:
    outcome = run_psi(fed.identity("alice"), plan())
    true = psi_data.manifest["intersections"]["tax.residents & civil.assistance"]
    t = psi_shift()
    # The shifted, truncated noise is bounded: the estimate is within t of the truth.
    assert near(outcome.count, true, t), (outcome.count, true)
    assert outcome.interval is not None and outcome.interval[0] <= outcome.count
    assert all(near(size, 400, 2 * t) for size in outcome.sizes.values()), outcome.sizes


def test_filters_run_at_the_node(fed: FederationFixture, psi_data: PsiData) -> None:
    expected = psi_data.manifest["filtered"]["tax_high & civil"]["count"]
    outcome = run_psi(fed.identity("alice"), plan((Condition("income_band", "=", "high"),)))
    assert near(outcome.count, expected, psi_shift())
    assert outcome.sizes["tax"] < 400 - 2 * psi_shift()


def test_receipt_verifies_and_tampering_is_detected(
    fed: FederationFixture, psi_data: PsiData
) -> None:
    outcome = run_psi(fed.identity("alice"), plan())
    assert outcome.receipt is not None, outcome.receipt_error
    keys = log_keys(fed.federation.roster)
    verified = verify_receipt(outcome.receipt, keys)
    assert {p.node for p in verified} == {"tax", "civil"}
    assert all(p.entry.kind == "result.released" for p in verified)
    part = outcome.receipt.parts[0]
    flipped = bytearray(part.entry)
    flipped[-3] ^= 1
    tampered = dataclasses.replace(
        outcome.receipt,
        parts=(ReceiptPart(part.node, bytes(flipped), part.index, part.proof, part.checkpoint),
               *outcome.receipt.parts[1:]),
    )  # fmt: skip
    with pytest.raises((VerificationFailed, MalformedInput)):
        verify_receipt(tampered, keys)


def test_both_logs_record_the_query(fed: FederationFixture, psi_data: PsiData) -> None:
    outcome = run_psi(fed.identity("alice"), plan())
    for node in (psi_data.tax, psi_data.civil):
        kinds = [e.decode().kind for e in node.audit.entries_for_query(outcome.query_id)]
        assert kinds[:2] == ["query.received", "policy.decision"]
        # The shared dummy keys (left to right), then each node's own set sent and received.
        assert kinds.count("protocol.step") == 3
        assert kinds[-2:] == ["result.released", "budget.settled"]
        assert node.query_store.reservation(outcome.query_id) == "spent"


def _submit(fed: FederationFixture, sender: str, signed: bytes, node: str = "tax") -> str:
    with NodeClient.to(fed.identity(sender), node) as client:
        return client.submit(signed).state


def test_replayed_request_is_refused(fed: FederationFixture, psi_data: PsiData) -> None:
    alice = fed.identity("alice")
    request = sign_request(
        alice.signing_key, analyst="alice", kind="psi_cardinality", body=plan().to_json(),
        now=int(time.time()),
    )  # fmt: skip
    assert _submit(fed, "alice", request.encode()) == "approved"
    with pytest.raises(AlreadyExists, match="replayed request"):
        _submit(fed, "alice", request.encode())


def test_expired_request_is_refused(fed: FederationFixture, psi_data: PsiData) -> None:
    alice = fed.identity("alice")
    request = sign_request(
        alice.signing_key, analyst="alice", kind="psi_cardinality", body=plan().to_json(),
        now=int(time.time()) - 7200, lifetime=3600,
    )  # fmt: skip
    with pytest.raises(MalformedInput, match="expired"):
        _submit(fed, "alice", request.encode())


def test_tampered_request_is_refused(fed: FederationFixture, psi_data: PsiData) -> None:
    alice = fed.identity("alice")
    encoded = bytearray(
        sign_request(
            alice.signing_key, analyst="alice", kind="psi_cardinality",
            body=plan().to_json(), now=int(time.time()),
        ).encode()
    )  # fmt: skip
    encoded[-70] ^= 0x01  # inside the body, before the signature
    with pytest.raises((VerificationFailed, MalformedInput)):
        _submit(fed, "alice", bytes(encoded))


def test_request_signed_by_another_analyst_is_refused(
    fed: FederationFixture, psi_data: PsiData
) -> None:
    alice = fed.identity("alice")
    request = sign_request(
        alice.signing_key, analyst="alice", kind="psi_cardinality", body=plan().to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with pytest.raises(PermissionDenied, match="signed for 'alice' but sent by 'hkana'"):
        _submit(fed, "hkana", request.encode())


def test_analyst_without_a_grant_is_refused_by_rule(
    fed: FederationFixture, psi_data: PsiData
) -> None:
    before = psi_data.tax.audit.size
    with pytest.raises(PolicyRefused) as refused:
        run_psi(fed.identity("hkana"), plan())
    assert refused.value.rule == "grant.missing"
    decisions = [
        e.decode() for e in psi_data.tax.audit.entries(before, psi_data.tax.audit.size)
        if e.decode().kind == "policy.decision"
    ]  # fmt: skip
    assert decisions and decisions[-1].fields["rule"] == "grant.missing"


def test_column_outside_the_grant_is_refused(fed: FederationFixture, psi_data: PsiData) -> None:
    with pytest.raises(PolicyRefused) as refused:
        run_psi(fed.identity("alice"), plan((Condition("district", "=", "Haidian"),)))
    assert refused.value.rule == "grant.column"


def test_wrong_purpose_is_refused(fed: FederationFixture, psi_data: PsiData) -> None:
    with pytest.raises(PolicyRefused) as refused:
        run_psi(fed.identity("alice"), plan(purpose="marketing"))
    assert refused.value.rule == "grant.purpose"


def test_duplicate_and_invalid_keys(
    fed: FederationFixture, psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Invalid resident IDs are rejected at import; duplicates count once in the intersection."""
    data = tmp_path_factory.mktemp("faulty")
    manifest = synth.generate(data, size=300, seed=8, inject_faults=True)
    assert manifest["injected"][synth.TAX]  # the generator did inject faults
    register(psi_data.tax, data / f"{synth.TAX}.csv", name="residents_faulty",
             columns=TAX_COLUMNS, skip_invalid=True)  # fmt: skip
    register(psi_data.civil, data / f"{synth.CIVIL}.csv", name="assistance_faulty",
             columns=CIVIL_COLUMNS, skip_invalid=True)  # fmt: skip
    grant(psi_data.tax, "residents_faulty", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
    grant(psi_data.civil, "assistance_faulty", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
    outcome = run_psi(
        fed.identity("alice"),
        PsiPlan(
            kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
            left=Side("tax", "residents_faulty", "id_number"),
            right=Side("civil", "assistance_faulty", "id_number"),
            epsilon=PSI_EPSILON,
        ),
    )  # fmt: skip
    true = manifest["intersections"]["tax.residents & civil.assistance"]
    assert near(outcome.count, true, psi_shift())
    # distinct valid keys only (300 of them), give or take the dummies
    assert all(near(size, 300, 2 * psi_shift()) for size in outcome.sizes.values())


def test_garbage_request_is_invalid_argument_naming_the_field(
    fed: FederationFixture, psi_data: PsiData
) -> None:
    before = psi_data.tax.audit.size
    with pytest.raises(MalformedInput, match="field 'signed_request'"):
        _submit(fed, "alice", b"govshare/request/v1\n\x00")
    assert psi_data.tax.audit.size > before  # the failed call is logged
    assert _submit(fed, "alice", sign_request(
        fed.identity("alice").signing_key, analyst="alice", kind="psi_cardinality",
        body=plan().to_json(), now=int(time.time()),
    ).encode()) == "approved"  # fmt: skip


def test_late_message_for_an_aborted_query_says_why(
    fed: FederationFixture, psi_data: PsiData
) -> None:
    """civil never heard of the query, so tax's run fails; a message civil sends tax afterwards
    is told the query was aborted there, and why."""
    alice = fed.identity("alice")
    request = sign_request(
        alice.signing_key, analyst="alice", kind="psi_cardinality", body=plan().to_json(),
        now=int(time.time()),
    )  # fmt: skip
    assert _submit(fed, "alice", request.encode(), node="tax") == "approved"
    with NodeClient.to(alice, "tax") as client, pytest.raises(Aborted, match="not open on civil"):
        client.run(request.query_id_hex, timeout=30)
    with NodeClient.to(fed.identity("civil"), "tax") as peer:
        with pytest.raises(Aborted, match=r"was aborted on tax: node civil: .*not open on civil"):
            peer.deliver(request.query_id_hex, "own", [])


def test_a_refusal_at_one_node_withdraws_the_query_from_the_other(
    fed: FederationFixture, psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """civil refuses (no grant on its dataset); tax had admitted and reserved: the analyst's
    client withdraws the query there, and tax returns the reservation at once."""
    data = tmp_path_factory.mktemp("ungranted")
    synth.generate(data, size=50, seed=21)
    register(psi_data.civil, data / f"{synth.CIVIL}.csv", name="assistance_ungranted",
             columns=CIVIL_COLUMNS)  # fmt: skip
    tax = psi_data.tax
    before = {r.query_id for r in tax.query_store.with_state("cancelled")}
    refused = dataclasses.replace(plan(), right=Side("civil", "assistance_ungranted", "id_number"))
    with pytest.raises(PolicyRefused) as refusal:
        run_psi(fed.identity("alice"), refused)
    assert refusal.value.rule == "grant.missing"
    (withdrawn,) = [r for r in tax.query_store.with_state("cancelled") if r.query_id not in before]
    assert tax.query_store.reservation(withdrawn.query_id) == "returned"
    kinds = [e.decode().kind for e in tax.audit.entries_for_query(withdrawn.query_id)]
    assert kinds[-2:] == ["query.cancelled", "budget.settled"]
    # Another analyst cannot withdraw alice's query; a query that ran cannot be withdrawn.
    with NodeClient.to(fed.identity("hkana"), "tax") as client:
        with pytest.raises(NotFound):
            client.cancel(withdrawn.query_id)
    ran = run_psi(fed.identity("alice"), plan())
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        with pytest.raises(Conflict, match="is done"):
            client.cancel(ran.query_id)
    assert tax.query_store.reservation(ran.query_id) == "spent"
