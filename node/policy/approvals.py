"""Per-query approval by the department operator.

A dataset graded ``important``, or one the operator marked ``require_approval``, leaves every
query that uses it ``pending_approval`` at this node. The operator lists pending queries with
the analyst, purpose and signed request digest, and approves or denies each; the decision is
recorded in the node's audit log with the operator's reason. The analyst's client, polling the
query's status, proceeds on approval and stops with the operator's message on denial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from govshare.model.digests import request_digest
from govshare.model.epsilon import format_epsilon
from govshare.model.states import APPROVED, DENIED, PENDING
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.protocols.signed_request import SignedRequest


@dataclass(frozen=True)
class PendingQuery:
    record: QueryRecord
    request_digest: str
    release: str  # "exact", "ε <value>" (noised), or "records" (a membership release)


def release_of(record: QueryRecord) -> str:
    """How the query's result would be released, from its signed request (what the operator
    approves): an exact release, a noised one with its ε, or masked records."""
    body = SignedRequest.decode(record.request).body_json()
    if isinstance(body, dict) and body.get("exact") is True:
        return "exact"
    if record.epsilon > 0:
        return f"ε {format_epsilon(record.epsilon)}"
    return "records"


def pending(store: QueryStore) -> list[PendingQuery]:
    return [
        PendingQuery(r, request_digest(r.request), release_of(r)) for r in store.with_state(PENDING)
    ]


def decide(
    store: QueryStore,
    audit: AuditSink,
    query_id: str,
    *,
    approve: bool,
    operator: str,
    reason: str = "",
    now: int | None = None,
) -> QueryRecord:
    """Approve or deny a pending query and log the decision.

    Raises:
        NotFound: no such query.
        Conflict: the query is not pending (already decided, refused, or run).
    """
    when = int(time.time()) if now is None else now
    message = reason or ("approved by the operator" if approve else "denied by the operator")
    record = store.transition(
        query_id, from_states=[PENDING], to=APPROVED if approve else DENIED, now=when,
        message=message,
    )  # fmt: skip
    # A denied query never runs: its reserved ε and query go back to the analyst.
    returned = {} if approve else {"reservation": store.settle(query_id, spent=False, now=when)}
    audit.record(
        "approval.granted" if approve else "approval.denied",
        {
            "dataset": record.dataset,
            "analyst": record.analyst,
            "request_digest": request_digest(record.request),
            "reason": message,
            **returned,
        },
        actor=operator,
        query_id=query_id,
    )
    return record
