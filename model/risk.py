"""Risk monitoring and warning (风险监测预警): named, graded rules over verified audit logs.

An auditor runs every rule over the logs it pulled and verified (``govshare audit check``); a
node runs the rules that need only its own log as it writes (:mod:`govshare.node.policy.alerts`),
and
records what they find as ``risk.alert`` entries. Both use the same code:

- :class:`LogFacts` folds one node's entries, in log order, into the little the rules need: per
  query its analyst, decision, approval and releases; the grants and their revocations; the
  registered datasets' grades; each analyst's ε ledger per dataset; sliding windows of
  refusals, rate-limit hits and filter sets. Each entry costs O(1) (the differencing check
  compares with at most :attr:`Thresholds.differencing_history` earlier queries), and queries
  are forgotten once their reservation is settled, so a node can keep it for its lifetime.
- A *log rule* is a pure function ``(entry, facts) -> alerts`` called after ``facts`` took in
  ``entry``; a *federation rule* is a pure function over every node's facts once all logs were
  read. :data:`RULES` lists them, each with its name, severities and the docstring that says
  what it catches.
- :class:`Checker` feeds entries to the facts and the rules and keeps one alert per key: a
  rule raises the same key again while a pattern goes on (a refusal burst, a differencing
  series), and the alert grows its entries instead of repeating. A node records an alert the
  first time its key appears; an auditor reports it once, with every entry it covers.

Time is read from the entries (``time_ms``), never from a clock, so a check of the same logs
always gives the same alerts. Thresholds are named in :class:`Thresholds` with their reasons.

What the rules cannot see: entries after the newest checkpoint the auditor holds; hand-offs to a
node whose log the auditor has not pulled; a query a node never logged at all, when no other node
logged a message to it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from typing import Any

from govshare.model.reconcile import _collect_fields, _handoffs
from govshare.protocols.auditverify import BYTES_TAG, AuditEntry
from govshare.protocols.errors import GovshareError, MalformedInput
from govshare.protocols.signed_request import SignedRequest

__all__ = [
    "RISK_SUSPENDED",
    "RULES",
    "Alert",
    "Checker",
    "EntryRef",
    "LogFacts",
    "Rule",
    "Scope",
    "Severity",
    "Thresholds",
    "check",
]

# The refusal rule of a query whose analyst is suspended at a node after a HIGH alert.
RISK_SUSPENDED = "risk.suspended"
RISK_ALERT = "risk.alert"
RISK_CLEARED = "risk.cleared"

# Request bodies whose filters a log's facts remember (an analyst repeating a query).
BODY_CACHE = 1024

# Refusals that are consequences of other rules, not attempts on the data: they have rules of
# their own (rate limit) or follow an alert (suspension), and counting them as probing would
# make one alert feed the next.
_NOT_PROBING = frozenset({"rate_limit", RISK_SUSPENDED, "node.frozen", "dataset.frozen"})
FILTER_OVERLAP = (
    "filter.overlap"  # govshare.node.policy.decision.FILTER_OVERLAP, the tracker's refusal
)
_RANGE_UP = frozenset({">", ">="})
_RANGE_DOWN = frozenset({"<", "<="})
_TERMINAL = frozenset({"budget.settled", "budget.recovered", "query.failed", "result.released"})
# The entries that speak of a query before it ends (the others only read what is known of it).
_OPENING = frozenset(
    {"query.received", "policy.decision", "approval.granted", "approval.denied", "result.released"}
)


class Severity(StrEnum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Severity.LOW: 0, Severity.MEDIUM: 1, Severity.HIGH: 2}


class Scope(StrEnum):
    LOG = "log"  # needs one node's log: a node runs it on its own
    FEDERATION = "federation"  # compares several nodes' logs: only the auditor runs it


@dataclass(frozen=True)
class Thresholds:
    """The numbers the rules compare with, and why each has its value."""

    # An honest analyst corrects a refused query (a column outside the grant, a wrong purpose)
    # in one to three tries; five refusals within ten minutes is a script trying variations.
    refusal_burst: int = 5
    refusal_window_ms: int = 10 * 60_000
    # Three times the burst in one run of refusals: the probing went on after the warning.
    # HIGH, so a node set to suspend on HIGH alerts stops the analyst here.
    refusal_sustained: int = 15
    # The rate limit counts a minute; a client that keeps sending after ten refusals within
    # the same ten minutes is not backing off.
    rate_limit_repeated: int = 10
    rate_limit_window_ms: int = 10 * 60_000
    # A budget four fifths spent leaves the operator time to decide before queries are refused.
    budget_fraction: Fraction = Fraction(4, 5)
    # Differencing needs no hurry: one working day of one analyst's queries on one dataset,
    # compared with at most the last 256 of them (bounded work per query at the node).
    differencing_window_ms: int = 24 * 3600_000
    differencing_history: int = 256
    # A revocation is logged inside the grant store's transaction, a moment before it commits;
    # an admission that read the grant just before may be logged just after. One second.
    revocation_slack_ms: int = 1_000
    # A hand-off is judged only once the peer's log reaches this far past it (or the peer
    # logged the end of the query): the default protocol timeout, the longest a node waits.
    handoff_grace_ms: int = 300_000


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True, order=True)
class EntryRef:
    """Entry ``index`` of ``node``'s log."""

    node: str
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "index": self.index}


@dataclass(frozen=True)
class Alert:
    """One finding of one rule.

    ``key`` identifies the pattern (the same key is the same alert, however often a rule raises
    it); ``node`` is the node the alert is about; ``entries`` the log entries that show it;
    ``time_ms`` the time of the newest of them.
    """

    rule: str
    severity: Severity
    node: str
    detail: str
    entries: tuple[EntryRef, ...]
    time_ms: int
    key: str
    analyst: str | None = None
    dataset: str | None = None
    query_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The alert as JSON (a stable shape: ``audit check --json`` and ``audit report``)."""
        return {
            "rule": self.rule,
            "severity": self.severity.value,
            "node": self.node,
            "detail": self.detail,
            "entries": [e.to_json() for e in self.entries],
            "time_ms": self.time_ms,
            "key": self.key,
            "analyst": self.analyst,
            "dataset": self.dataset,
            "query_id": self.query_id,
        }


# --- what one log says -------------------------------------------------------------------------

Condition = tuple[str, str, object]  # column, op, value (a tuple for "in")


@dataclass
class QueryFacts:
    """What one node's log says about one query so far."""

    analyst: str | None = None
    dataset: str | None = None
    received: int | None = None  # index of query.received
    conditions: dict[str, frozenset[Condition]] = field(default_factory=dict)  # by dataset
    decision: int | None = None  # index of the allowed decision
    refused: bool = False
    requires_approval: bool = False
    exact: bool = False
    grant_id: str | None = None
    epsilon: Fraction = Fraction(0)
    approved: int | None = None
    denied: bool = False


@dataclass
class GrantFacts:
    grant_id: str
    dataset: str
    grantee: str
    epsilon: Fraction
    expires_at: int  # unix seconds
    created: int  # index
    revoked: int | None = None  # index of grant.revoked
    revoked_ms: int | None = None


@dataclass
class Episode:
    """A sliding window of events of one kind for one key, and the run they form.

    A run starts when ``threshold`` events fall within the window and goes on while events keep
    arriving within the window of the previous one; ``start`` is the index of its first entry
    (the alert's key), ``count`` its events so far.
    """

    recent: deque[tuple[int, int]] = field(default_factory=deque)  # (time_ms, index)
    start: int | None = None
    count: int = 0
    last_ms: int = 0
    fresh: bool = False  # the last push started the run

    def push(self, time_ms: int, index: int, *, window_ms: int, threshold: int) -> None:
        if self.start is not None and time_ms - self.last_ms > window_ms:
            self.start, self.count = None, 0
        while self.recent and self.recent[0][0] <= time_ms - window_ms:
            self.recent.popleft()
        self.recent.append((time_ms, index))
        self.last_ms = time_ms
        self.fresh = False
        if self.start is not None:
            self.count += 1
        elif len(self.recent) >= threshold:
            self.start, self.count = self.recent[0][1], len(self.recent)
            self.fresh = True

    def new_indices(self) -> list[int]:
        """The entries the last push adds to the run's alert: the window that started it, or
        the one event (an alert grows by one entry an event, never by the whole window)."""
        return [index for _, index in self.recent] if self.fresh else [self.recent[-1][1]]


@dataclass
class Earlier:
    """An earlier query of one analyst on one dataset, for the differencing check."""

    time_ms: int
    index: int
    query_id: str
    conditions: frozenset[Condition]


@dataclass(frozen=True, slots=True)
class Step:
    """A protocol step kept for the hand-off rule: what the reconciliation compares, compact
    (an auditor may hold millions)."""

    index: int
    time_ms: int
    peer: str
    direction: str
    phase: str
    digest: str
    size: int

    @classmethod
    def of(cls, entry: AuditEntry) -> Step:
        f = entry.fields
        size = f.get("size")
        return cls(
            entry.index, entry.time_ms, str(f.get("peer")), str(f.get("direction")),
            str(f.get("phase", "")), str(f.get("digest", "")),
            size if isinstance(size, int) else -1,
        )  # fmt: skip

    def entry(self, node: str, query_id: str) -> AuditEntry:
        """The step as the entry the reconciliation reads."""
        fields = {"peer": self.peer, "direction": self.direction, "phase": self.phase,
                  "digest": self.digest, "size": self.size}  # fmt: skip
        return AuditEntry(self.index, self.time_ms, "protocol.step", node, query_id, fields)


class LogFacts:
    """One node's log, folded entry by entry into what the rules read (module docstring).

    ``add`` must see the entries in log order. ``keep_steps`` also keeps every protocol step
    to a node in ``peers``, for the hand-off rule (the auditor's batch check).
    """

    def __init__(
        self,
        node: str,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        *,
        keep_steps: bool = False,
        peers: Collection[str] = (),
    ) -> None:
        self.node = node
        self.thresholds = thresholds
        self.keep_steps = keep_steps
        self.peers = frozenset(peers)
        self.queries: dict[str, QueryFacts] = {}
        self.grants: dict[str, GrantFacts] = {}
        self.grants_of: dict[tuple[str, str], list[str]] = {}  # (grantee, dataset) -> ids
        self.datasets: dict[str, tuple[str, bool]] = {}  # name -> (grade, require_approval)
        self.ledgers: dict[tuple[str, str], Fraction] = {}  # (analyst, dataset) -> ε used
        self.refusals: dict[str, Episode] = {}
        self.rate_hits: dict[str, Episode] = {}
        self.differencing: dict[tuple[str, str], Episode] = {}
        # (analyst, dataset) -> the distinct filter sets asked, least recently asked first.
        self.history: dict[tuple[str, str], OrderedDict[frozenset[Condition], Earlier]] = {}
        self._bodies: OrderedDict[bytes, dict[str, frozenset[Condition]]] = OrderedDict()
        self.raised: set[str] = set()  # keys of the risk.alert entries this log holds
        # Access applications still open: request id -> (deadline ms, received index,
        # applicant, dataset); and, for the entry just folded, an answer that came late.
        self.applications: dict[str, tuple[int, int, str, str]] = {}
        self.late_answer: tuple[str, int, int, str, str] | None = None
        self.last_ms = 0
        self.size = 0
        # The hand-off rule's material (keep_steps only).
        self.steps: dict[str, list[Step]] = {}
        self.ended: dict[str, int] = {}  # query -> time of its last terminal entry
        self.failed: set[str] = set()
        # Set by add() for the rules to read: the query just folded and, for an admission,
        # the earlier query one filter condition apart (differencing), if any.
        self.current: QueryFacts | None = None
        self.admission = False
        self.apart: Earlier | None = None

    # --- folding ------------------------------------------------------------------------------

    def add(self, entry: AuditEntry) -> None:
        """Take in the next entry of the log."""
        self.size = entry.index + 1
        self.last_ms = max(self.last_ms, entry.time_ms)
        self.current, self.admission, self.apart = None, False, None
        self.late_answer = None
        fields = entry.fields
        kind = entry.kind
        qid = entry.query_id
        query = None
        if qid is not None:
            query = self.queries.get(qid)
            if query is None and kind in _OPENING:
                query = self.queries[qid] = QueryFacts()
        self.current = query
        if self.keep_steps and qid is not None:
            if kind == "protocol.step" and fields.get("peer") in self.peers:
                self.steps.setdefault(qid, []).append(Step.of(entry))
            elif kind in _TERMINAL:
                self.ended[qid] = entry.time_ms
            if kind == "query.failed":
                self.failed.add(qid)
        if kind == "query.received" and query is not None:
            query.analyst = entry.actor
            query.received = entry.index
            request = fields.get("request")
            if isinstance(request, bytes):
                query.conditions = self._conditions(request)
        elif kind == "policy.decision" and query is not None and qid is not None:
            self._decision(entry, qid, query)
        elif kind in ("approval.granted", "approval.denied") and query is not None:
            if kind == "approval.granted":
                query.approved = entry.index
            else:
                query.denied = True
                self._returned(query, fields.get("reservation"))
                self.queries.pop(str(qid), None)  # a denied query never runs
        elif kind in ("budget.settled", "budget.recovered") and qid is not None:
            if query is not None:
                self._returned(query, fields.get("reservation"))
            self.queries.pop(qid, None)  # nothing about the query comes after its settlement
        elif kind == "grant.created":
            self._grant(entry)
        elif kind == "grant.revoked":
            grant = self.grants.get(str(fields.get("grant_id")))
            if grant is not None and grant.revoked is None:
                grant.revoked, grant.revoked_ms = entry.index, entry.time_ms
        elif kind == "dataset.added":
            self.datasets[str(fields.get("name"))] = (
                str(fields.get("grade")),
                fields.get("require_approval") is True,
            )
        elif kind == "dataset.removed":
            self.datasets.pop(str(fields.get("name")), None)
        elif kind == RISK_ALERT:
            self.raised.add(str(fields.get("key")))
        elif kind == "application.received":
            deadline = fields.get("deadline_at")
            if isinstance(deadline, int):
                self.applications[str(fields.get("request_id"))] = (
                    deadline * 1000, entry.index, entry.actor, str(fields.get("dataset")),
                )  # fmt: skip
        elif kind in ("application.approved", "application.refused"):
            held = self.applications.pop(str(fields.get("request_id")), None)
            if held is not None and entry.time_ms > held[0]:
                self.late_answer = (str(fields.get("request_id")), *held)

    def _decision(self, entry: AuditEntry, qid: str, query: QueryFacts) -> None:
        fields = entry.fields
        t = self.thresholds
        dataset = fields.get("dataset")
        if isinstance(dataset, str):
            query.dataset = dataset
        # The admission's decision is logged with the analyst as actor; a refusal on the data,
        # at run time, with the node itself.
        self.admission = entry.actor != self.node and query.decision is None and not query.refused
        if self.admission:
            query.analyst = entry.actor
        analyst = query.analyst or entry.actor
        rule = str(fields.get("rule", ""))
        if fields.get("allowed") is True:
            query.decision = entry.index
            query.requires_approval = fields.get("requires_approval") is True
            query.exact = fields.get("exact") is True
            grant = fields.get("grant_id")
            query.grant_id = grant if isinstance(grant, str) and grant else None
            query.epsilon = _epsilon(fields.get("epsilon"))
            if query.dataset is not None and query.epsilon:
                ledger = (analyst, query.dataset)
                self.ledgers[ledger] = self.ledgers.get(ledger, Fraction(0)) + query.epsilon
        else:
            query.refused = True
            if rule == "rate_limit":
                self.rate_hits.setdefault(analyst, Episode()).push(
                    entry.time_ms, entry.index, window_ms=t.rate_limit_window_ms, threshold=1
                )
            elif rule not in _NOT_PROBING:
                self.refusals.setdefault(analyst, Episode()).push(
                    entry.time_ms,
                    entry.index,
                    window_ms=t.refusal_window_ms,
                    threshold=t.refusal_burst,
                )
        if self.admission and rule not in _NOT_PROBING and query.dataset is not None:
            self.apart = self._compare(entry, qid, analyst, query.dataset, query)
        if self.apart is not None or rule == FILTER_OVERLAP:
            if query.dataset is not None:
                self.differencing.setdefault((analyst, query.dataset), Episode()).push(
                    entry.time_ms, entry.index, window_ms=t.differencing_window_ms, threshold=1
                )
        if self.admission and query.refused:
            self.queries.pop(qid, None)  # refused at admission: nothing more comes of it

    def _compare(
        self, entry: AuditEntry, qid: str, analyst: str, dataset: str, query: QueryFacts
    ) -> Earlier | None:
        """Remember this query's filters on ``dataset``; return an earlier query of the same
        analyst on it, within the window, whose filters differ by one condition."""
        mine = query.conditions.get(dataset)
        if mine is None:
            return None
        t = self.thresholds
        history = self.history.setdefault((analyst, dataset), OrderedDict())
        while history:
            oldest = next(iter(history.values()))
            if oldest.time_ms > entry.time_ms - t.differencing_window_ms:
                break
            history.popitem(last=False)
        # Most recent first; the same filters asked again are not compared (nothing new).
        found = next(
            (e for c, e in reversed(history.items()) if c != mine and one_condition_apart(mine, c)),
            None,
        )
        history[mine] = Earlier(entry.time_ms, query.received or entry.index, qid, mine)
        history.move_to_end(mine)
        if len(history) > t.differencing_history:
            history.popitem(last=False)
        return found

    def _conditions(self, request: bytes) -> dict[str, frozenset[Condition]]:
        """The request's filters on this node's datasets; an analyst who repeats a query signs
        the same body again, so the last bodies are kept (bounded)."""
        try:
            body = SignedRequest.decode(request).body
        except GovshareError:
            return {}
        found = self._bodies.get(body)
        if found is None:
            found = conditions_of(body, self.node)
            self._bodies[body] = found
            if len(self._bodies) > BODY_CACHE:
                self._bodies.popitem(last=False)
        return found

    def _returned(self, query: QueryFacts, reservation: object) -> None:
        if reservation != "returned" or not query.epsilon or query.dataset is None:
            return
        ledger = (query.analyst or "", query.dataset)
        if ledger in self.ledgers:
            self.ledgers[ledger] -= query.epsilon

    def _grant(self, entry: AuditEntry) -> None:
        fields = entry.fields
        grant_id, dataset, grantee = (
            fields.get("grant_id"),
            fields.get("dataset"),
            fields.get("grantee"),
        )
        expires = fields.get("expires_at")
        if not (isinstance(grant_id, str) and isinstance(dataset, str)):
            return
        if not (isinstance(grantee, str) and isinstance(expires, int)):
            return
        self.grants[grant_id] = GrantFacts(
            grant_id, dataset, grantee, _epsilon(fields.get("epsilon")), expires, entry.index
        )
        self.grants_of.setdefault((grantee, dataset), []).append(grant_id)

    # --- reading ------------------------------------------------------------------------------

    def cap(self, analyst: str, dataset: str, time_ms: int) -> Fraction:
        """The ε budget of ``analyst`` on ``dataset`` at ``time_ms``: the largest ε of a grant
        in force (as ``govshare.node.policy.decision.dataset_epsilon_cap``)."""
        caps = [
            g.epsilon
            for g in (self.grants[i] for i in self.grants_of.get((analyst, dataset), ()))
            if g.revoked is None and g.expires_at * 1000 > time_ms
        ]
        return max(caps, default=Fraction(0))

    def needs_approval(self, query: QueryFacts) -> str | None:
        """Why ``query`` needed an operator's approval before it ran, or None."""
        grade, flagged = self.datasets.get(query.dataset or "", ("", False))
        if grade == "important":
            return f"{query.dataset} is important data"
        if flagged:
            return f"{query.dataset} requires approval of every query"
        if query.exact:
            return "an exact release"
        if query.requires_approval:
            return "its decision required approval"
        return None


def _epsilon(value: object) -> Fraction:
    if not isinstance(value, str):
        return Fraction(0)
    try:
        return Fraction(value)
    except (ValueError, ZeroDivisionError):
        return Fraction(0)


def conditions_of(body: bytes, node: str) -> dict[str, frozenset[Condition]]:
    """The filter conditions a signed request's ``body`` sets on each of ``node``'s datasets
    (any query kind: a plan's sides are its ``left``, ``right``, ``values``, ``matcher`` and
    ``parts``, each an object with ``node``, ``dataset`` and ``where``)."""
    try:
        plan = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    out: dict[str, frozenset[Condition]] = {}
    for side in _sides(plan):
        if side.get("node") != node or not isinstance(side.get("dataset"), str):
            continue
        where = side.get("where")
        conditions: set[Condition] = set()
        for item in where if isinstance(where, list) else []:
            if isinstance(item, list) and len(item) == 3:
                column, op, value = item
                conditions.add(
                    (str(column), str(op), tuple(value) if isinstance(value, list) else value)
                )
        out[side["dataset"]] = frozenset(conditions)
    return out


def _sides(plan: object) -> Iterator[dict[str, Any]]:
    if not isinstance(plan, dict):
        return
    parts = plan.get("parts")
    sides = [plan.get(k) for k in ("left", "right", "values", "matcher")]
    for side in [*sides, *(parts if isinstance(parts, list) else [])]:
        if isinstance(side, dict) and "node" in side and "dataset" in side:
            yield side


def one_condition_apart(a: frozenset[Condition], b: frozenset[Condition]) -> bool:
    """Whether two filter sets select nested sets of rows that differ by one condition: one
    condition added, a range bound moved, an ``in`` list grown, or a ``!=`` value changed.
    Two ``=`` values on one column select disjoint sets: comparing districts is not
    differencing."""
    only_a, only_b = a - b, b - a
    if len(only_a) + len(only_b) == 1:
        return True
    if len(only_a) != 1 or len(only_b) != 1:
        return False
    (col_a, op_a, val_a), (col_b, op_b, val_b) = next(iter(only_a)), next(iter(only_b))
    if col_a != col_b:
        return False
    if {op_a, op_b} <= _RANGE_UP or {op_a, op_b} <= _RANGE_DOWN:
        return True
    if op_a == op_b == "!=":
        return True
    if op_a == op_b == "in" and isinstance(val_a, tuple) and isinstance(val_b, tuple):
        return set(val_a) < set(val_b) or set(val_b) < set(val_a)
    return False


def read_entry(data: bytes) -> AuditEntry:
    """Decode entry bytes that were verified already (an auditor's pulled copy, a node's own
    log): one JSON parse, without :func:`govshare.protocols.auditverify.decode_entry`'s
    canonical-form checks, which were made when the bytes were pulled or written and cost
    several times as much. Bytes fields stay tagged, except a ``query.received``'s
    ``request``.

    Raises:
        MalformedInput: not an audit entry.
    """
    try:
        value = json.loads(data)
        fields = value["fields"]
        entry = AuditEntry(
            index=value["index"],
            time_ms=value["time_ms"],
            kind=value["kind"],
            actor=value["actor"],
            query_id=value["query_id"],
            fields=fields,
        )
        request = fields.get("request") if entry.kind == "query.received" else None
        if isinstance(request, dict):
            fields["request"] = base64.b64decode(request[BYTES_TAG], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise MalformedInput(f"not an audit entry: {exc}", field="entry") from None
    if not (isinstance(entry.index, int) and isinstance(entry.time_ms, int)):
        raise MalformedInput("not an audit entry: index and time must be integers", field="entry")
    if not (isinstance(entry.kind, str) and isinstance(entry.actor, str)):
        raise MalformedInput("not an audit entry: kind and actor must be text", field="entry")
    return entry


# --- the rules ---------------------------------------------------------------------------------

EntryCheck = Callable[[AuditEntry, LogFacts], Iterable[Alert]]
LogsCheck = Callable[[Mapping[str, LogFacts]], Iterable[Alert]]


@dataclass(frozen=True)
class Rule:
    """A named rule: ``severities`` it raises, its ``scope``, and its check."""

    name: str
    severities: tuple[Severity, ...]
    scope: Scope
    on_entry: EntryCheck | None = None
    on_logs: LogsCheck | None = None

    @property
    def description(self) -> str:
        """What the rule catches: the first paragraph of its check's docstring."""
        check = self.on_entry or self.on_logs
        doc = (check.__doc__ if check is not None else None) or ""
        return " ".join(doc.strip().split("\n\n")[0].split())


RULES: dict[str, Rule] = {}


def _entry_rule(name: str, *severities: Severity) -> Callable[[EntryCheck], EntryCheck]:
    def register(check: EntryCheck) -> EntryCheck:
        RULES[name] = Rule(name, severities, Scope.LOG, on_entry=check)
        return check

    return register


def _logs_rule(name: str, *severities: Severity) -> Callable[[LogsCheck], LogsCheck]:
    def register(check: LogsCheck) -> LogsCheck:
        RULES[name] = Rule(name, severities, Scope.FEDERATION, on_logs=check)
        return check

    return register


def _alert(
    rule: str,
    severity: Severity,
    facts: LogFacts,
    entry: AuditEntry,
    key: str,
    detail: str,
    indices: Iterable[int],
    *,
    query: QueryFacts | None = None,
    analyst: str | None = None,
    dataset: str | None = None,
    node: str | None = None,
) -> Alert:
    return Alert(
        rule=rule,
        severity=severity,
        node=node or facts.node,
        detail=detail,
        entries=tuple(EntryRef(facts.node, i) for i in sorted(set(indices))),
        time_ms=entry.time_ms,
        key=f"{rule}/{node or facts.node}/{key}",
        analyst=analyst if analyst is not None else (query.analyst if query else None),
        dataset=dataset if dataset is not None else (query.dataset if query else None),
        query_id=entry.query_id if query is not None else None,
    )


@_entry_rule("release.without_decision", Severity.HIGH)
def release_without_decision(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """A node released a result for a query its log holds no allowed policy decision for.

    Every release must follow the decision that allowed it, in the same log."""
    query = facts.current
    if entry.kind != "result.released" or query is None or query.decision is not None:
        return
    yield _alert(
        "release.without_decision", Severity.HIGH, facts, entry, str(entry.query_id),
        f"released query {entry.query_id} to {entry.fields.get('recipient')} but logged no "
        "allowed policy decision for it",
        [i for i in (query.received, entry.index) if i is not None], query=query,
    )  # fmt: skip


@_entry_rule("approval.missing", Severity.HIGH)
def approval_missing(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """A query that needed the operator's approval (important data, a dataset that asks for
    it, an exact release) was released without a preceding approval.granted; or an allowed
    decision on important data did not require approval.

    Catches a policy or a query path that skipped the approval step."""
    query = facts.current
    if query is None:
        return
    if entry.kind == "result.released" and query.decision is not None:
        why = facts.needs_approval(query)
        if why is not None and query.approved is None:
            state = "after the operator denied it" if query.denied else "with no approval logged"
            yield _alert(
                "approval.missing", Severity.HIGH, facts, entry, str(entry.query_id),
                f"released query {entry.query_id} ({why}) {state}",
                [query.decision, entry.index], query=query,
            )  # fmt: skip
    elif entry.kind == "policy.decision" and entry.fields.get("allowed") is True:
        grade, flagged = facts.datasets.get(query.dataset or "", ("", False))
        if (grade == "important" or flagged) and not query.requires_approval:
            yield _alert(
                "approval.missing", Severity.HIGH, facts, entry, f"{entry.query_id}/decision",
                f"allowed query {entry.query_id} on {query.dataset} ({grade or 'flagged'}) "
                "without requiring approval",
                [entry.index], query=query,
            )  # fmt: skip


@_entry_rule("grant.used_after_end", Severity.HIGH)
def grant_used_after_end(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """A query was allowed, or released, under a grant after the grant's revocation or expiry
    (both read from the grant entries of the same log).

    A revocation counts from its entry plus :attr:`Thresholds.revocation_slack_ms`; an expiry
    from the second after ``expires_at``."""
    query = facts.current
    allowed = entry.kind == "policy.decision" and entry.fields.get("allowed") is True
    if query is None or query.grant_id is None or not (allowed or entry.kind == "result.released"):
        return
    grant = facts.grants.get(query.grant_id)
    if grant is None:
        return  # a grant this log never recorded: nothing to compare with
    use = "allowed" if allowed else "released"
    ended: tuple[str, list[int]] | None = None
    if (
        grant.revoked is not None
        and grant.revoked_ms is not None
        and entry.index > grant.revoked
        and entry.time_ms > grant.revoked_ms + facts.thresholds.revocation_slack_ms
    ):
        ended = ("its revocation", [grant.revoked])
    elif entry.time_ms >= (grant.expires_at + 1) * 1000:
        ended = ("its expiry", [grant.created])
    if ended is not None:
        yield _alert(
            "grant.used_after_end", Severity.HIGH, facts, entry, f"{entry.query_id}/{use}",
            f"{use} query {entry.query_id} under grant {grant.grant_id} after {ended[0]}",
            [*ended[1], entry.index], query=query,
        )  # fmt: skip


@_entry_rule("probing.refusal_burst", Severity.MEDIUM, Severity.HIGH)
def refusal_burst(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """One analyst collected many policy refusals at one node in a short time, probing
    grants, columns or data: MEDIUM at 5 within 10 minutes, HIGH when the run reaches 15.

    Thresholds: :attr:`Thresholds.refusal_burst`, :attr:`Thresholds.refusal_window_ms`,
    :attr:`Thresholds.refusal_sustained`. Rate-limit refusals and refusals of a suspended
    analyst do not count (they have rules of their own)."""
    if entry.kind != "policy.decision" or entry.fields.get("allowed") is not False:
        return
    query = facts.current
    analyst = (query.analyst if query else None) or entry.actor
    run = facts.refusals.get(analyst)
    if run is None or run.start is None or run.recent[-1][1] != entry.index:
        return
    t = facts.thresholds
    minutes = t.refusal_window_ms // 60_000
    yield _alert(
        "probing.refusal_burst", Severity.MEDIUM, facts, entry, f"{analyst}/{run.start}",
        f"{analyst}: {run.count} refusals in a run (≥ {t.refusal_burst} within {minutes} min)",
        run.new_indices(), analyst=analyst,
    )  # fmt: skip
    if run.count >= t.refusal_sustained:
        yield _alert(
            "probing.refusal_burst", Severity.HIGH, facts, entry,
            f"{analyst}/{run.start}/sustained",
            f"{analyst}: probing went on after the warning — {run.count} refusals in one run "
            f"(≥ {t.refusal_sustained})",
            run.new_indices(), analyst=analyst,
        )  # fmt: skip


@_entry_rule("rate_limit.hit", Severity.LOW, Severity.MEDIUM)
def rate_limit_hit(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """An analyst hit the node's rate limit (LOW); MEDIUM when the analyst kept sending and
    was refused 10 times in one run.

    Thresholds: :attr:`Thresholds.rate_limit_repeated`, :attr:`Thresholds.rate_limit_window_ms`.
    """
    if entry.kind != "policy.decision" or entry.fields.get("rule") != "rate_limit":
        return
    analyst = entry.actor
    run = facts.rate_hits.get(analyst)
    if run is None or run.start is None:
        return
    t = facts.thresholds
    yield _alert(
        "rate_limit.hit", Severity.LOW, facts, entry, f"{analyst}/{run.start}",
        f"{analyst} hit the rate limit ({run.count} refusals in a run)",
        run.new_indices(), analyst=analyst,
    )  # fmt: skip
    if run.count >= t.rate_limit_repeated:
        yield _alert(
            "rate_limit.hit", Severity.MEDIUM, facts, entry, f"{analyst}/{run.start}/repeated",
            f"{analyst} kept sending at the rate limit: {run.count} refusals in one run "
            f"(≥ {t.rate_limit_repeated})",
            run.new_indices(), analyst=analyst,
        )  # fmt: skip


@_entry_rule("budget.mostly_spent", Severity.MEDIUM)
def budget_mostly_spent(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """An analyst has used 80 % of the ε budget on a dataset at one node: the allowed
    decisions' ε (reserved or spent) less the reservations returned, against the largest ε of
    the analyst's grants in force on it (from the grant entries).

    Threshold: :attr:`Thresholds.budget_fraction`."""
    query = facts.current
    if (
        entry.kind != "policy.decision"
        or entry.fields.get("allowed") is not True
        or query is None
        or query.dataset is None
        or not query.epsilon
    ):
        return
    analyst = query.analyst or entry.actor
    used = facts.ledgers.get((analyst, query.dataset), Fraction(0))
    cap = facts.cap(analyst, query.dataset, entry.time_ms)
    if cap <= 0 or used < facts.thresholds.budget_fraction * cap:
        return
    yield _alert(
        "budget.mostly_spent", Severity.MEDIUM, facts, entry,
        f"{analyst}/{query.dataset}/{cap}",
        f"{analyst} has used ε {_decimal(used)} of {_decimal(cap)} "
        f"({float(used / cap):.0%}) on {query.dataset}",
        [entry.index], query=query, analyst=analyst,
    )  # fmt: skip


@_entry_rule("release.exact", Severity.LOW)
def exact_release(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """An exact (noise-free) result was released (informational: approved by the operators
    and checked by the tracker, but the releases without noise are the ones to review)."""
    if entry.kind != "result.released" or entry.fields.get("exact") is not True:
        return
    query = facts.current
    yield _alert(
        "release.exact", Severity.LOW, facts, entry, str(entry.query_id),
        f"exact release of query {entry.query_id} to {entry.fields.get('recipient')}",
        [entry.index], query=query,
    )  # fmt: skip


@_entry_rule("differencing.filters", Severity.MEDIUM)
def differencing(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """One analyst asked queries on one dataset within a day whose filters differ by one
    condition (nested sets of rows, whose difference may be a few rows), or the node's tracker
    refused an exact release as overlapping an earlier one (filter.overlap).

    Window: :attr:`Thresholds.differencing_window_ms`; see :func:`one_condition_apart`."""
    if entry.kind != "policy.decision":
        return
    query = facts.current
    if query is None or query.dataset is None:
        return
    overlap = entry.fields.get("rule") == FILTER_OVERLAP
    if facts.apart is None and not overlap:
        return
    analyst = query.analyst or entry.actor
    run = facts.differencing.get((analyst, query.dataset))
    if run is None or run.start is None:
        return
    if facts.apart is not None:
        what = (
            f"query {entry.query_id}'s filters on {query.dataset} differ by one condition "
            f"from query {facts.apart.query_id}'s"
        )
        indices = [facts.apart.index, query.received or entry.index, entry.index]
    else:
        what = f"the tracker refused query {entry.query_id} as overlapping an earlier release"
        indices = [entry.index]
    yield _alert(
        "differencing.filters", Severity.MEDIUM, facts, entry,
        f"{analyst}/{query.dataset}/{run.start}",
        f"{analyst}: {what} ({run.count} in a run)", indices, query=query, analyst=analyst,
    )  # fmt: skip


@_entry_rule("witness.refused", Severity.HIGH)
def witness_refused(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """A witness refused a node's checkpoint (a rollback, a fork, a tree that does not extend
    the one it cosigned): the alert is about the node whose checkpoint was refused, from the
    witness's log."""
    if entry.kind != "witness.refused":
        return
    refused = entry.actor
    yield _alert(
        "witness.refused", Severity.HIGH, facts, entry, facts.node,
        f"witness {facts.node} refused {refused}'s checkpoint ({entry.fields.get('rule')}: "
        f"{entry.fields.get('reason')})",
        [entry.index], node=refused,
    )  # fmt: skip


@_entry_rule("application.overdue", Severity.MEDIUM)
def application_overdue(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """An analyst's access application was still unanswered past its deadline (the working
    days of the node's ``application_deadline_days``, written in the received entry), seen from
    the first entry logged after the deadline, or from a late answer.

    权利可查: a department must answer an application for a use right within its deadline."""
    late = facts.late_answer
    if late is not None:
        request_id, deadline_ms, received, applicant, dataset = late
        yield _alert(
            "application.overdue", Severity.MEDIUM, facts, entry, request_id,
            f"{applicant}'s application {request_id} on {dataset} was answered after its "
            "deadline",
            [received, entry.index], analyst=applicant, dataset=dataset,
        )  # fmt: skip
    if not facts.applications:
        return
    for request_id, (deadline_ms, received, applicant, dataset) in facts.applications.items():
        if entry.time_ms > deadline_ms:
            yield _alert(
                "application.overdue", Severity.MEDIUM, facts, entry, request_id,
                f"{applicant}'s application {request_id} on {dataset} is unanswered past its "
                "deadline",
                [received], analyst=applicant, dataset=dataset,
            )  # fmt: skip


@_entry_rule("incident.frozen", Severity.MEDIUM)
def incident_frozen(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """An operator froze the node or one of its datasets (an incident control: every query
    on it refused until unfrozen), with the person and the reason."""
    if entry.kind not in ("node.frozen", "dataset.frozen"):
        return
    dataset = entry.fields.get("dataset")
    what = f"dataset {dataset}" if isinstance(dataset, str) else "the node"
    yield _alert(
        "incident.frozen", Severity.MEDIUM, facts, entry, f"{entry.index}",
        f"{entry.actor} froze {what}: {entry.fields.get('reason')}",
        [entry.index], dataset=dataset if isinstance(dataset, str) else None,
    )  # fmt: skip


@_entry_rule("member.suspended", Severity.MEDIUM)
def member_suspended(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """A node adopted a roster that suspends a member (``govshare federation suspend``), with
    the administrator's reason, signed with the roster; or one that drops members without
    saying why."""
    if entry.kind != "roster.updated":
        return
    note = entry.fields.get("note")
    removed = entry.fields.get("removed")
    if isinstance(note, dict) and note.get("kind") == "suspend":
        member = str(note.get("member"))
        yield _alert(
            "member.suspended", Severity.MEDIUM, facts, entry, f"{member}/{entry.index}",
            f"{member} suspended by {note.get('by')}: {note.get('reason')} (roster version "
            f"{entry.fields.get('version')})",
            [entry.index], analyst=member,
        )  # fmt: skip
    elif isinstance(removed, list) and removed:
        yield _alert(
            "member.suspended", Severity.MEDIUM, facts, entry, f"{entry.index}",
            f"roster version {entry.fields.get('version')} removed "
            f"{', '.join(str(r) for r in removed)} (no reason given)",
            [entry.index],
        )  # fmt: skip


@_entry_rule("operator.refused", Severity.MEDIUM)
def operator_refused(entry: AuditEntry, facts: LogFacts) -> Iterator[Alert]:
    """An operator act was refused: no valid operator identity (none, a key the roster does
    not list, another node's operator, a replayed or altered act) or a missing duty.

    Someone tried to change the node without being a named operator with that duty."""
    if entry.kind != "operator.refused":
        return
    yield _alert(
        "operator.refused", Severity.MEDIUM, facts, entry, f"{entry.index}",
        f"{entry.fields.get('action')} refused ({entry.fields.get('rule')}): "
        f"{entry.fields.get('reason')} (claimed: {entry.fields.get('claimed') or 'nobody'})",
        [entry.index],
    )  # fmt: skip


@_logs_rule("handoff.missing", Severity.HIGH)
def handoff_missing(logs: Mapping[str, LogFacts]) -> Iterator[Alert]:
    """A message one node logged as sent to (or received from) a peer node that the peer's
    log does not show received (or sent), with the same phase, digest and size.

    The comparison is :meth:`govshare.client.auditor.Auditor.show_query`'s. A query is judged
    only when both logs reach past it (the peer logged the query's end, or entries
    :attr:`Thresholds.handoff_grace_ms` later), and not when a node logged it failed: a failed
    query legitimately stops mid-protocol."""
    queries = sorted({q for facts in logs.values() for q in facts.steps})
    for qid in queries:
        if any(qid in facts.failed for facts in logs.values()):
            continue
        steps = {
            node: [step.entry(node, qid) for step in facts.steps.get(qid, ())]
            for node, facts in logs.items()
        }
        involved = {n for n, s in steps.items() if s} | {
            str(e.fields.get("peer")) for s in steps.values() for e in s
        }
        latest = max(e.time_ms for s in steps.values() for e in s)
        if not all(
            qid in logs[n].ended or logs[n].last_ms >= latest + logs[n].thresholds.handoff_grace_ms
            for n in involved
            if n in logs
        ):
            continue
        views = [_collect_fields(n, steps[n]) for n in sorted(involved) if n in logs]
        for issue in _handoffs(views):
            logged_by = issue.split(" ", 1)[0]
            entries = steps.get(logged_by, [])
            yield Alert(
                rule="handoff.missing",
                severity=Severity.HIGH,
                node=logged_by if logged_by in logs else ",".join(sorted(involved)),
                detail=f"query {qid}: {issue}",
                entries=tuple(EntryRef(logged_by, e.index) for e in entries),
                time_ms=latest,
                key=f"handoff.missing/{qid}/{issue}",
                query_id=qid,
            )


def _decimal(value: Fraction) -> str:
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text or "0"


# --- running the rules -------------------------------------------------------------------------


class Checker:
    """Feeds entries to each node's :class:`LogFacts` and to the rules; keeps one alert per key.

    ``rules`` (names) selects rules (default: all); ``scope`` only the rules of that scope (a
    node runs ``Scope.LOG``); ``nodes`` are the logs that will be fed (the hand-off rule keeps
    the steps between them). Without ``keep_entries`` (a node, for its lifetime) only the
    alerts' keys are kept, not the entries each alert grows while a pattern goes on.
    """

    def __init__(
        self,
        *,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        rules: Collection[str] | None = None,
        scope: Scope | None = None,
        nodes: Collection[str] = (),
        keep_entries: bool = True,
    ) -> None:
        unknown = set(rules or ()) - RULES.keys()
        if unknown:
            raise TypeError(f"unknown risk rules: {', '.join(sorted(unknown))}")
        self.thresholds = thresholds
        self.rules = [
            r
            for r in RULES.values()
            if (rules is None or r.name in rules) and (scope is None or r.scope is scope)
        ]
        self._federation = any(r.scope is Scope.FEDERATION for r in self.rules)
        self._nodes = frozenset(nodes)
        self._keep_entries = keep_entries
        self.facts: dict[str, LogFacts] = {}
        self._latest: dict[str, Alert] = {}  # key -> the alert as last raised
        self._entries: dict[str, set[EntryRef]] = {}  # key -> every entry it was raised with

    def facts_of(self, node: str) -> LogFacts:
        facts = self.facts.get(node)
        if facts is None:
            facts = LogFacts(
                node, self.thresholds, keep_steps=self._federation, peers=self._nodes - {node}
            )
            self.facts[node] = facts
        return facts

    def feed(self, node: str, entry: AuditEntry) -> list[Alert]:
        """Take in ``node``'s next entry; return the alerts whose key is new."""
        facts = self.facts_of(node)
        facts.add(entry)
        new: list[Alert] = []
        for rule in self.rules:
            if rule.on_entry is None:
                continue
            for alert in rule.on_entry(entry, facts):
                if self._keep(alert):
                    new.append(alert)
        return new

    def _keep(self, alert: Alert) -> bool:
        new = alert.key not in self._latest
        if self._keep_entries:
            self._entries.setdefault(alert.key, set()).update(alert.entries)
            self._latest[alert.key] = alert
        elif new:
            self._latest[alert.key] = replace(alert, entries=())
        return new

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, each with every entry it was raised with, most severe first,
        then by time."""
        found = [
            replace(a, entries=tuple(sorted(self._entries.get(k, a.entries))))
            for k, a in self._latest.items()
        ]
        return sorted(found, key=lambda a: (-a.severity.rank, a.time_ms, a.node, a.key))

    def finish(self) -> list[Alert]:
        """Run the federation rules over every log fed; return every alert, most severe
        first, then by time."""
        for rule in self.rules:
            if rule.on_logs is not None:
                for alert in rule.on_logs(self.facts):
                    self._keep(alert)
        return self.alerts


def check(
    entries_by_node: Mapping[str, Iterable[AuditEntry]],
    *,
    since_ms: int | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    rules: Collection[str] | None = None,
) -> list[Alert]:
    """Every rule over every node's entries (each in log order, from its first entry).

    The whole logs are read (a budget or a revocation goes back to the grant); ``since_ms``
    (unix ms) keeps only the alerts whose newest entry is at or after it. Alerts come most
    severe first, then by time.

    Raises:
        TypeError: ``rules`` names a rule that does not exist.
    """
    checker = Checker(thresholds=thresholds, rules=rules, nodes=entries_by_node.keys())
    for node, entries in entries_by_node.items():
        for entry in entries:
            if entry.kind != RISK_ALERT:  # the nodes' own findings: the auditor re-derives them
                checker.feed(node, entry)
    alerts = checker.finish()
    if since_ms is not None:
        alerts = [a for a in alerts if a.time_ms >= since_ms]
    return alerts


def alerts_json(alerts: Sequence[Alert]) -> list[dict[str, Any]]:
    return [a.to_json() for a in alerts]


def dumps(alerts: Sequence[Alert]) -> str:
    return json.dumps(alerts_json(alerts), sort_keys=True)
