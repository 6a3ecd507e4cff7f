"""Per-query approval by the department operator.

A dataset graded ``important``, or one the operator marked ``require_approval``, leaves every
query that uses it ``pending_approval`` at this node. The operator lists pending queries with
the analyst, purpose and signed request digest, and approves or denies each; the decision is
recorded in the node's audit log with the operator's reason. The analyst's client, polling the
query's status, proceeds on approval and stops with the operator's message on denial.

A query whose signed request has expired cannot be decided: the operator's decision finds it
expired, marks it so, returns its reservation (as the node's own ``QueryEngine.expire_stale``
does) and is refused with :class:`QueryExpired`. The queue (:func:`pending`) holds only queries
still waiting whose request has not expired: one the analyst withdrew — after another node
refused or denied it, after the analyst's approval timeout, or on Ctrl-C — is ``cancelled``
and leaves it, and deciding it is refused naming that state (:class:`QueryNotPending`).

What the operator judges (:func:`describe`) is read from the signed request the node holds,
never from what the analyst's client says about it: every party and its dataset, the columns
each uses and how, the filters, the release (ε or exact), the SQL the plan came from when the
analyst wrote SQL (signed with the plan), and the request's deadline. Ids may be given by a
unique prefix (``QueryStore.resolve``).

Separation of duties (each refusal names its rule, is logged as ``approval.refused`` with the
person, and leaves the query waiting):

- ``duty.separation``: on ``important`` data the approver of a query must not be the person
  who issued the grant it uses (the grant's ``granted_by``): nobody both gives a right and
  approves its use.
- ``approval.distinct``: a dataset that requires several approvers
  (``govshare.node.policy.controls``) counts different persons; one person approving twice is
  refused. Until the last approval each is logged as ``approval.recorded`` (``approvals`` of
  ``required``); the last one as ``approval.granted`` with every approver.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from govshare.model.aggregate_plan import IntersectionPlan, parse_aggregate_plan
from govshare.model.conditions import Condition
from govshare.model.digests import digests_for
from govshare.model.epsilon import format_epsilon
from govshare.model.governance import ColumnAccess, QueryKind
from govshare.model.query_plan import PSI_KINDS, parse_plan
from govshare.model.states import APPROVED, DENIED, EXPIRED, PENDING
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.node.stores.sqlite import immediate, opened
from govshare.protocols.errors import Conflict, PolicyRefused
from govshare.protocols.signed_request import SignedRequest
from govshare.protocols.suite import Suite

# The words QueryEngine.expire_stale records for a query it expires; the same here, so that
# the log reads alike whichever side found the query expired.
EXPIRED_MESSAGE = "the signed request expired before the query ran"
EXPIRED_REASON = "the request expired before it ran"


DUTY_SEPARATION = "duty.separation"
APPROVAL_DISTINCT = "approval.distinct"

_VOTES = """
CREATE TABLE IF NOT EXISTS approval_votes (
    query_id TEXT NOT NULL,
    approver TEXT NOT NULL,
    at       INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    PRIMARY KEY (query_id, approver)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Duties:
    """What the separation of duties compares for one query (module docstring)."""

    important: bool = False  # the dataset is graded important
    grant_issuer: str = ""  # who issued the grant the query uses
    required: int = 1  # different approvers the dataset requires
    votes: Path | None = None  # node.db, where the approvals so far are kept


def _votes(path: Path, query_id: str) -> list[str]:
    with opened(path) as conn:
        conn.executescript(_VOTES)
        rows = conn.execute(
            "SELECT approver FROM approval_votes WHERE query_id = ? ORDER BY at, approver",
            (query_id,),
        ).fetchall()
    return [r["approver"] for r in rows]


def _vote(path: Path, query_id: str, approver: str, at: int, reason: str) -> list[str]:
    with opened(path) as conn:
        conn.executescript(_VOTES)
        with immediate(conn):
            conn.execute(
                "INSERT OR IGNORE INTO approval_votes (query_id, approver, at, reason)"
                " VALUES (?, ?, ?, ?)",
                (query_id, approver, at, reason),
            )
    return _votes(path, query_id)


class QueryExpired(Conflict):
    """The query's signed request expired before the operator's decision: it will never run."""


class QueryNotPending(Conflict):
    """The query is not waiting for a decision (decided, refused, withdrawn, run)."""


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


def pending(store: QueryStore, *, suite: Suite, now: int | None = None) -> list[PendingQuery]:
    """The queries waiting for this operator's decision whose signed request has not expired
    (an expired one can never run; the node marks it ``expired`` when it next looks).
    ``suite``: the federation's, whose hash names the requests."""
    when = int(time.time()) if now is None else now
    request_digest = digests_for(suite).request_digest
    waiting = (
        PendingQuery(r, request_digest(r.request), release_of(r), expires_at_of(r))
        for r in store.with_state(PENDING)
    )
    return [p for p in waiting if p.expires_at > when]


@dataclass(frozen=True)
class Party:
    """One node's part in a query, as the signed plan states it."""

    node: str
    dataset: str
    role: str  # "left" / "right" (PSI), "values" / "matcher", or "part" / "aggregator"
    columns: tuple[str, ...]  # "column (use)", e.g. "id_number (join)"
    filters: tuple[str, ...]  # "column op value"


@dataclass(frozen=True)
class QueryDetails:
    """What an operator judges before deciding a query: all from the signed request."""

    record: QueryRecord
    request_digest: str
    issued_at: int
    expires_at: int
    release: str  # as PendingQuery.release
    epsilon: str | None  # the ε the plan asks for, or None (exact, or records)
    exact: bool
    parties: tuple[Party, ...]
    sql: str | None  # the SQL the analyst wrote, when the plan came from SQL
    recipient: str | None  # membership: the node that learns which of its keys match
    mask: str | None  # membership released to the analyst: the masking rule of the keys


def _filter_text(condition: Condition) -> str:
    value = condition.value
    shown = (
        "(" + ", ".join(repr(v) for v in value) + ")" if isinstance(value, tuple) else repr(value)
    )
    return f"{condition.column} {condition.op} {shown}"


def _uses(accesses: tuple[ColumnAccess, ...]) -> tuple[str, ...]:
    """Each column once, with its uses: ``amount (aggregate)``, ``id_number (join, release)``."""
    by_column: dict[str, list[str]] = {}
    for access in accesses:
        uses = by_column.setdefault(access.column, [])
        if access.use.value not in uses:
            uses.append(access.use.value)
    return tuple(f"{column} ({', '.join(uses)})" for column, uses in by_column.items())


def _parties(kind: str, body: Any) -> tuple[tuple[Party, ...], str | None, str | None]:
    """(parties, recipient, mask) of a plan body. Raises MalformedInput as the plan parsers."""
    if kind in {k.value for k in PSI_KINDS}:
        plan = parse_plan(body, kind=kind)
        releases = plan.kind is QueryKind.PSI_MEMBERSHIP and plan.recipient is None
        sides = ((plan.left, "left", releases), (plan.right, "right", False))
        parties = tuple(
            Party(
                side.node,
                side.dataset,
                role,
                _uses(side.accesses(release=release)),
                tuple(_filter_text(c) for c in side.where),
            )
            for side, role, release in sides
        )
        return parties, plan.recipient, plan.mask
    aggregate = parse_aggregate_plan(body, kind=kind)
    found = []
    for node in aggregate.nodes:
        dataset, uses, where = aggregate.accesses(node)
        if isinstance(aggregate, IntersectionPlan):
            role = "values" if node == aggregate.values.node else "matcher"
        else:
            role = "aggregator" if node == aggregate.aggregator else "part"
        found.append(Party(node, dataset, role, _uses(uses), tuple(_filter_text(c) for c in where)))
    return tuple(found), None, None


def describe(record: QueryRecord, *, suite: Suite) -> QueryDetails:
    """What the query asks, read from its signed request (see the module docstring).

    Raises:
        MalformedInput: the stored request does not parse (it did when it was admitted).
    """
    request = SignedRequest.decode(record.request)
    body = request.body_json()
    parties, recipient, mask = _parties(request.kind, body)
    epsilon_raw = body.get("epsilon") if isinstance(body, dict) else None
    sql = body.get("sql") if isinstance(body, dict) else None
    return QueryDetails(
        record=record,
        request_digest=digests_for(suite).request_digest(record.request),
        issued_at=request.issued_at,
        expires_at=request.expires_at,
        release=release_of(record),
        epsilon=epsilon_raw if isinstance(epsilon_raw, str) else None,
        exact=isinstance(body, dict) and body.get("exact") is True,
        parties=parties,
        sql=sql if isinstance(sql, str) and sql.strip() else None,
        recipient=recipient,
        mask=mask,
    )


def details(store: QueryStore, query_id: str, *, suite: Suite) -> QueryDetails:
    """:func:`describe` the query ``query_id`` names (a unique prefix will do)."""
    return describe(store.get(store.resolve(query_id)), suite=suite)


def decide(
    store: QueryStore,
    audit: AuditSink,
    query_id: str,
    *,
    approve: bool,
    operator: str,
    reason: str = "",
    now: int | None = None,
    duties: Duties | None = None,
    suite: Suite,
) -> QueryRecord:
    """Approve or deny a pending query and log the decision (``request_digest`` with the
    federation ``suite``'s hash).

    ``query_id`` may be a unique prefix of the id. ``duties``: the separation of duties to
    hold (module docstring); an approval it leaves short of the required approvers keeps the
    query pending.

    Raises:
        NotFound: no such query.
        MalformedInput: ``query_id`` is a prefix of several ids (named).
        QueryExpired: the query's signed request has expired (now or before); it is marked
            ``expired`` and its reservation returned, and no decision is logged.
        QueryNotPending: the query is not pending (decided, refused, withdrawn by the
            analyst, or run); the message names its state.
        PolicyRefused: ``duty.separation`` or ``approval.distinct`` (logged).
    """
    when = int(time.time()) if now is None else now
    request_digest = digests_for(suite).request_digest
    query_id = store.resolve(query_id)
    _refuse_expired(store, audit, query_id, now=when, actor=operator)
    current = store.get(query_id)
    if current.state != PENDING:
        raise QueryNotPending(
            f"query {query_id} is {current.state} ({current.message}): only a query waiting "
            f"for approval can be {'approved' if approve else 'denied'}"
        )
    message = reason or ("approved by the operator" if approve else "denied by the operator")
    approvers: list[str] = []
    if approve and duties is not None:
        approvers = _separate(
            store, audit, current, operator, duties, when, message, request_digest
        )
        if len(approvers) < duties.required:
            audit.record(
                "approval.recorded",
                {"dataset": current.dataset, "analyst": current.analyst,
                 "request_digest": request_digest(current.request), "reason": message,
                 "approvals": len(approvers), "required": duties.required,
                 "approvers": approvers},
                actor=operator, query_id=query_id,
            )  # fmt: skip
            return current
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
            **({"approvers": approvers} if approvers else {}),
        },
        actor=operator,
        query_id=query_id,
    )
    return record


def _separate(
    store: QueryStore, audit: AuditSink, record: QueryRecord, operator: str, duties: Duties,
    now: int, message: str, request_digest: Callable[[bytes], str],
) -> list[str]:  # fmt: skip
    """Check the separation of duties for ``operator``'s approval of ``record`` and count it;
    returns every approver so far (this one included).

    Raises:
        PolicyRefused: ``duty.separation`` or ``approval.distinct`` (logged).
    """

    def refuse(rule: str, why: str) -> PolicyRefused:
        audit.record(
            "approval.refused",
            {"dataset": record.dataset, "analyst": record.analyst, "rule": rule, "reason": why,
             "request_digest": request_digest(record.request)},
            actor=operator, query_id=record.query_id,
        )  # fmt: skip
        return PolicyRefused(rule, why)

    if duties.important and duties.grant_issuer and duties.grant_issuer == operator:
        raise refuse(
            DUTY_SEPARATION,
            f"{operator} issued grant {record.grant_id} this query uses; on important data "
            "another operator must approve it",
        )
    if duties.votes is None:
        return [operator]
    if operator in _votes(duties.votes, record.query_id):
        raise refuse(
            APPROVAL_DISTINCT,
            f"{operator} already approved query {record.query_id}; dataset {record.dataset} "
            f"requires {duties.required} different approvers",
        )
    return _vote(duties.votes, record.query_id, operator, now, message)


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
