"""Per-query approval by the department operator.

A dataset graded ``important``, or one the operator marked ``require_approval``, leaves every
query that uses it ``pending_approval`` at this node. The operator lists pending queries with
the analyst, purpose and signed request digest, and approves or denies each; the decision is
recorded in the node's audit log with the operator's reason. The analyst's client, polling the
query's status, proceeds on approval and stops with the operator's message on denial.

A query whose signed request has expired cannot be decided: the operator's decision finds it
expired, marks it so, returns its reservation (as the node's own ``QueryEngine.expire_stale``
does) and is refused with :class:`QueryExpired`.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from govshare.model.digests import request_digest
from govshare.model.epsilon import format_epsilon
from govshare.model.states import APPROVED, DENIED, EXPIRED, PENDING
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.protocols.errors import Conflict
from govshare.protocols.signed_request import SignedRequest

# The words QueryEngine.expire_stale records for a query it expires; the same here, so that
# the log reads alike whichever side found the query expired.
EXPIRED_MESSAGE = "the signed request expired before the query ran"
EXPIRED_REASON = "the request expired before it ran"


class QueryExpired(Conflict):
    """The query's signed request expired before the operator's decision: it will never run."""


@dataclass(frozen=True)
class PendingQuery:
    record: QueryRecord
    request_digest: str
    release: str  # "exact", "ε <value>" (noised), or "records" (a membership release)
    expires_at: int  # when the signed request expires; the query can be approved until then


def release_of(record: QueryRecord) -> str:
    """How the query's result would be released, from its signed request (what the operator
    approves): an exact release, a noised one with its ε, or masked records."""
    body = SignedRequest.decode(record.request).body_json()
    if isinstance(body, dict) and body.get("exact") is True:
        return "exact"
    if record.epsilon > 0:
        return f"ε {format_epsilon(record.epsilon)}"
    return "records"


def expires_at_of(record: QueryRecord) -> int:
    """When the query's signed request expires (unix seconds)."""
    return SignedRequest.decode(record.request).expires_at


def pending(store: QueryStore) -> list[PendingQuery]:
    return [
        PendingQuery(r, request_digest(r.request), release_of(r), expires_at_of(r))
        for r in store.with_state(PENDING)
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
        QueryExpired: the query's signed request has expired (now or before); it is marked
            ``expired`` and its reservation returned, and no decision is logged.
        Conflict: the query is not pending (already decided, refused, or run).
    """
    when = int(time.time()) if now is None else now
    _refuse_expired(store, audit, query_id, now=when, actor=operator)
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


def expire(
    store: QueryStore, audit: AuditSink, query_id: str, *, from_state: str, now: int, actor: str
) -> bool:
    """Mark a query whose signed request expired ``expired`` and return its reservation (logged
    as ``budget.settled``). False if it left ``from_state`` meanwhile (decided, run, expired).

    The one way a query expires, whether the node finds it (``QueryEngine.expire_stale``) or
    an operator's decision comes too late."""
    try:
        store.transition(query_id, from_states=[from_state], to=EXPIRED, now=now,
                         message=EXPIRED_MESSAGE)  # fmt: skip
    except Conflict:
        return False
    state = store.settle(query_id, spent=False, now=now)
    if state is not None:
        audit.record(
            "budget.settled",
            {"reservation": state, "reason": EXPIRED_REASON},
            actor=actor,
            query_id=query_id,
        )
    return True


def _refuse_expired(
    store: QueryStore, audit: AuditSink, query_id: str, *, now: int, actor: str
) -> None:
    """Raise QueryExpired if the query is, or has just become, expired; expire it if pending."""
    record = store.get(query_id)
    expires_at = expires_at_of(record)
    if record.state == PENDING and expires_at <= now:
        expire(store, audit, query_id, from_state=PENDING, now=now, actor=actor)
        record = store.get(query_id)  # expired now, or decided meanwhile: refuse by its state
    if record.state == EXPIRED:
        when = dt.datetime.fromtimestamp(expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise QueryExpired(
            f"query {query_id} expired: its signed request expired at {when}, before a "
            "decision; it will not run and its reservation was returned (the analyst may "
            "submit it again)"
        )
