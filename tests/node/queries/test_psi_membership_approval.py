"""Record-level release through masking rules, and per-query operator approval."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    PsiData,
    grant,
    psi_shift,
    register,
)

from govshare.client.analyst import run_psi
from govshare.examples import synth
from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind, SharingType
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.states import PENDING
from govshare.node.data.masking import apply_mask
from govshare.node.policy import approvals
from govshare.protocols.errors import Aborted, Conflict, MalformedInput, PolicyRefused
from govshare.protocols.suite import STANDARD

MASK = "keep_last:4"


@pytest.fixture(scope="module")
def open_registry(psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tax.open_registry: unconditional sharing, join key released as its last four digits."""
    data = tmp_path_factory.mktemp("open")
    synth.generate(data, size=400, seed=3)
    columns = (f"id_number=join_key:resident_id:mask={MASK}", *TAX_COLUMNS[1:])
    register(
        psi_data.tax, data / f"{synth.TAX}.csv", name="open_registry", columns=columns,
        sharing=SharingType.UNCONDITIONAL,
    )  # fmt: skip
    grant(psi_data.tax, "open_registry", "alice", ["id_number", "income_band"],
          [QueryKind.PSI_MEMBERSHIP])  # fmt: skip
    civil_columns = (
        f"id_number=join_key:resident_id:mask={MASK}", "district=group_key:domain={districts}",
        "year=plaintext",
        "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
        "amount=aggregate",
    )  # fmt: skip
    register(
        psi_data.civil, data / f"{synth.CIVIL}.csv", name="assistance_open",
        columns=civil_columns, sharing=SharingType.UNCONDITIONAL,
    )  # fmt: skip
    for dataset in ("assistance", "assistance_open"):
        grant(psi_data.civil, dataset, "alice", ["id_number"], [QueryKind.PSI_MEMBERSHIP])
    register(
        psi_data.civil, data / f"{synth.CIVIL}.csv", name="assistance_review",
        columns=(
            "id_number=join_key:resident_id", "district=group_key:domain={districts}",
            "year=plaintext",
            "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
            "amount=aggregate",
        ),
        require_approval=True,
    )  # fmt: skip
    grant(psi_data.civil, "assistance_review", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
    return data


def keys(path: Path, **where: str) -> set[str]:
    with path.open(encoding="utf-8") as handle:
        return {
            row["id_number"]
            for row in csv.DictReader(handle)
            if all(row[k] == v for k, v in where.items())
        }


def membership(where: tuple[Condition, ...] = ()) -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP,
        purpose=PURPOSE,
        left=Side("tax", "open_registry", "id_number", where),
        right=Side("civil", "assistance_open", "id_number"),
    )


def test_membership_releases_matching_keys_masked(
    fed: FederationFixture, open_registry: Path
) -> None:
    outcome = run_psi(fed.identity("alice"), membership((Condition("income_band", "=", "high"),)))
    matching = keys(open_registry / f"{synth.TAX}.csv", income_band="high") & keys(
        open_registry / f"{synth.CIVIL}.csv"
    )
    assert outcome.count == len(matching) > 0
    assert sorted(outcome.records) == sorted(apply_mask(MASK, k, suite=STANDARD) for k in matching)
    assert all(len(r.replace("*", "")) == 4 for r in outcome.records)  # never the whole key


def test_membership_on_a_conditional_dataset_is_refused(
    fed: FederationFixture, psi_data: PsiData, open_registry: Path
) -> None:
    # Membership reveals that the released residents are in civil's set too: both sides'
    # record-level rules apply.
    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP,
        purpose=PURPOSE,
        left=Side("tax", "open_registry", "id_number"),
        right=Side("civil", "assistance", "id_number"),
    )
    with pytest.raises(PolicyRefused) as refused:
        run_psi(fed.identity("alice"), plan)
    assert refused.value.rule == "record_release.conditional"


def review_plan() -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_CARDINALITY,
        purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"),
        right=Side("civil", "assistance_review", "id_number"),
        epsilon=PSI_EPSILON,
    )


def _decide_when_pending(psi_data: PsiData, approve: bool, seen: list[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        # Only this module's gated dataset: other modules may leave queries pending on the
        # session's civil node.
        waiting = [
            p
            for p in approvals.pending(
                psi_data.civil.query_store, suite=psi_data.civil.identity.roster.crypto
            )
            if p.record.dataset == "assistance_review"
        ]
        if waiting:
            query_id = waiting[0].record.query_id
            seen.append(query_id)
            approvals.decide(
                psi_data.civil.query_store, psi_data.civil.audit, query_id, approve=approve,
                operator="operator:civil", reason="checked" if approve else "purpose too broad",
                suite=psi_data.civil.identity.roster.crypto,
            )  # fmt: skip
            return
        time.sleep(0.05)


def test_query_waits_for_approval_then_runs(
    fed: FederationFixture, psi_data: PsiData, open_registry: Path
) -> None:
    seen: list[str] = []
    operator = threading.Thread(target=_decide_when_pending, args=(psi_data, True, seen))
    operator.start()
    states: list[tuple[str, str]] = []
    outcome = run_psi(
        fed.identity("alice"), review_plan(), poll=0.05,
        on_status=lambda node, state, message: states.append((node, state)),
    )  # fmt: skip
    operator.join()
    assert seen == [outcome.query_id]
    assert ("civil", PENDING) in states and ("civil", "approved") in states
    true = psi_data.manifest["intersections"]["tax.residents & civil.assistance"]
    assert abs(outcome.count - true) <= psi_shift()
    kinds = [e.decode().kind for e in psi_data.civil.audit.entries_for_query(outcome.query_id)]
    assert "approval.granted" in kinds
    assert psi_data.civil.query_store.reservation(outcome.query_id) == "spent"


def test_denied_query_ends_with_the_operators_message(
    fed: FederationFixture, psi_data: PsiData, open_registry: Path
) -> None:
    seen: list[str] = []
    operator = threading.Thread(target=_decide_when_pending, args=(psi_data, False, seen))
    operator.start()
    with pytest.raises(Aborted, match="purpose too broad"):
        run_psi(fed.identity("alice"), review_plan(), poll=0.05)
    operator.join()
    with pytest.raises(Conflict, match="is denied"):
        approvals.decide(
            psi_data.civil.query_store, psi_data.civil.audit, seen[0], approve=True,
            operator="operator:civil", suite=STANDARD,
        )  # fmt: skip
    # A denied query never runs: civil gives its reserved ε and query back.
    assert psi_data.civil.query_store.reservation(seen[0]) == "returned"


def test_approval_timeout_is_a_clear_error(
    fed: FederationFixture, psi_data: PsiData, open_registry: Path
) -> None:
    with pytest.raises(Aborted, match=r"approval timed out .* civil"):
        run_psi(fed.identity("alice"), review_plan(), approval_timeout=0.3, poll=0.05)


def test_membership_to_a_receiving_node_keeps_the_keys_there(
    fed: FederationFixture, psi_data: PsiData, open_registry: Path, tmp_path: Path
) -> None:
    """tax learns which of its own high-income residents receive assistance; alice learns only
    how many; civil (conditional sharing) allows it under alice's membership grant."""
    grant(psi_data.tax, "residents", "alice", ["id_number", "income_band"],
          [QueryKind.PSI_MEMBERSHIP])  # fmt: skip
    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP, purpose=PURPOSE,
        left=Side("civil", "assistance", "id_number"),
        right=Side("tax", "residents", "id_number", (Condition("income_band", "=", "high"),)),
        recipient="tax", epsilon=PSI_EPSILON,
    )  # fmt: skip
    outcome = run_psi(fed.identity("alice"), plan)
    expected = psi_data.manifest["filtered"]["tax_high & civil"]["count"]
    # alice learns how many, noised (discrete Laplace, scale 1/2: |noise| > 20 has p < 1e-8).
    assert abs(outcome.count - expected) <= 20 and outcome.records == ()
    assert outcome.interval is not None and outcome.epsilon == PSI_EPSILON
    kept = psi_data.tax.query_store.matches(outcome.query_id)
    assert len(kept) == expected and all(len(k) == 18 for k in kept)
    civil_log = [e.decode() for e in psi_data.civil.audit.entries_for_query(outcome.query_id)]
    released = [e for e in civil_log if e.kind == "result.released"]
    assert [e.fields["recipient"] for e in released] == ["tax"]
    # The operator reads the kept keys with the CLI; nobody else holds them.
    shown = subprocess.run(
        [sys.executable, "-m", "govshare.cli", "node", "results", outcome.query_id,
         "--home", str(fed.node_home("tax")), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(shown.stdout)["matched"] == kept
    assert psi_data.civil.query_store.matches(outcome.query_id) == []


def test_membership_to_a_node_outside_the_query_is_refused(
    fed: FederationFixture, psi_data: PsiData, open_registry: Path
) -> None:
    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP, purpose=PURPOSE,
        left=Side("civil", "assistance", "id_number"), right=Side("tax", "residents", "id_number"),
        recipient="ghost",
    )  # fmt: skip
    with pytest.raises(MalformedInput, match="recipient"):
        run_psi(fed.identity("alice"), plan)
