"""The operator's queue (node/policy/approvals.py): what is in it, what a query shows, which
id a prefix names, and what cannot be decided any more."""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import pytest

from govshare.model.aggregate_plan import (
    PAILLIER,
    Figures,
    GroupSpec,
    HorizontalPlan,
    Part,
    SumSpec,
)
from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind
from govshare.model.states import CANCELLED, PENDING
from govshare.node.policy import approvals
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.protocols.errors import MalformedInput, NotFound
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD

NOW = 1_800_000_000
KEY = STANDARD.signing_key_from_bytes(b"\x05" * 32)
PURPOSE = "clinic capacity planning"


class Sink:
    """An audit sink that keeps what it is told."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, object]]] = []

    def record(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str,
        query_id: str | None = None,
    ) -> int:
        self.entries.append((kind, dict(fields)))
        return len(self.entries) - 1


def horizontal() -> HorizontalPlan:
    figures = Figures(
        GroupSpec("age_band", ("0-17", "18-64", "65+")), (SumSpec("visits", 30),), Fraction(1)
    )
    return HorizontalPlan(
        QueryKind.HORIZONTAL_AGGREGATE,
        PURPOSE,
        (
            Part("health", "clinic_visits", (Condition("year", "=", 2025),)),
            Part("haidian", "clinic_visits"),
        ),
        figures,
        "health",
        PAILLIER,
        b"\x01\x02",
    )


def store_with(
    tmp_path: Path, *ids: bytes, lifetime: int = 3600, sql: str | None = None
) -> QueryStore:
    store = QueryStore(tmp_path / "node.db")
    body = {**horizontal().to_json(), **({"sql": sql} if sql else {})}
    for query_id in ids:
        request = sign_request(
            KEY, analyst="alice", kind=QueryKind.HORIZONTAL_AGGREGATE.value, body=body,
            now=NOW, lifetime=lifetime, query_id=query_id,
        )  # fmt: skip
        store.create(
            QueryRecord(
                query_id=query_id.hex(),
                analyst="alice",
                kind=request.kind,
                dataset="clinic_visits",
                purpose=PURPOSE,
                request=request.encode(),
                state=PENDING,
                rule="allowed",
                message="waiting for the operator's approval",
                grant_id="g1",
                epsilon=Fraction(1),
                received_at=NOW,
                updated_at=NOW,
            )
        )
    return store


def test_a_prefix_names_one_query_or_is_refused_naming_the_candidates(tmp_path: Path) -> None:
    a, b = b"\xab\xcd" + b"\x01" * 14, b"\xab\xcd" + b"\x02" * 14
    store = store_with(tmp_path, a, b)
    assert store.resolve("ABCD01") == a.hex() and store.resolve(b.hex()) == b.hex()
    with pytest.raises(MalformedInput, match="ambiguous") as refused:
        store.resolve("abcd")
    assert a.hex() in str(refused.value) and b.hex() in str(refused.value)
    for unknown in ("abce", "", "abcd%", "zz"):
        with pytest.raises(NotFound, match="no query"):
            store.resolve(unknown)


def test_the_queue_holds_only_requests_that_have_not_expired(tmp_path: Path) -> None:
    store = store_with(tmp_path, b"\x10" * 16, lifetime=60)
    assert [p.record.query_id for p in approvals.pending(store, now=NOW + 59, suite=STANDARD)] == [
        "10" * 16
    ]
    assert approvals.pending(store, now=NOW + 60, suite=STANDARD) == []


def test_details_of_a_horizontal_aggregate_name_every_part(tmp_path: Path) -> None:
    sql = "SELECT h.age_band, COUNT(*), SUM(h.visits) FROM (...) AS h GROUP BY h.age_band"
    store = store_with(tmp_path, b"\x20" * 16, sql=sql)
    d = approvals.details(store, "2020", suite=STANDARD)
    assert d.sql == sql and d.epsilon == "1" and not d.exact and d.release == "ε 1"
    assert d.expires_at == NOW + 3600 and d.issued_at == NOW
    health, haidian = d.parties
    assert (health.node, health.role, haidian.role) == ("health", "aggregator", "part")
    assert health.columns == ("visits (aggregate)", "age_band (group)", "year (filter)")
    assert health.filters == ("year = 2025",) and haidian.filters == ()


def test_a_withdrawn_query_cannot_be_decided_and_its_state_is_named(tmp_path: Path) -> None:
    store = store_with(tmp_path, b"\x30" * 16)
    store.transition("30" * 16, from_states=[PENDING], to=CANCELLED, now=NOW,
                     message="withdrawn by the analyst before it ran")  # fmt: skip
    sink = Sink()
    with pytest.raises(approvals.QueryNotPending) as refused:
        approvals.decide(
            store, sink, "3030", approve=True, operator="op", now=NOW + 1, suite=STANDARD
        )
    assert str(refused.value) == (
        f"query {'30' * 16} is cancelled (withdrawn by the analyst before it ran): only a "
        "query waiting for approval can be approved"
    )
    assert sink.entries == []
