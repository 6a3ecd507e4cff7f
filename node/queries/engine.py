"""The node's side of a joint query: admit, decide, run, release, prove.

Admission (signature, replay, rate limit, policy, approval) is shared by every query kind;
the PSI kinds run here, the aggregate kinds in ``govshare.node.queries.kinds.aggregate``.

Flow for one query (two nodes L and R, analyst C):

1. ``submit``: C sends the same signed request to L and R. Each node checks the caller is the
   signer, the signature (roster key), the validity window and the nonce (replays refused),
   logs the signed request, and admits it (:meth:`QueryEngine.admit`): in one store
   transaction, the rate limit, the policy decision on its own dataset in the order of
   ``govshare.node.policy.decision`` (grant and ε ledger before any rule of the data, nothing read
   from
   the rows), the decision logged with its rule, and the query stored with its ε and one query
   of its grant reserved. A refusal ends the query here; a dataset that demands per-query
   approval, or an exact release, leaves it ``pending_approval`` until the operator decides.
2. ``run``: once both nodes approved, C calls ``Run`` on each. Each node reads its filtered
   keys; an exact or record-level release first passes the filtered-set floor and an exact
   one the tracker check (:meth:`QueryEngine.check_exact`), refusals that name the rule and k.
   Each node masks its own distinct, filtered keys with a fresh scalar — for a noised count
   with the shared dummy keys L sends R first and its own private dummies (DP PSI-CA,
   ``govshare.protocols.ecdh_psi``) — streams them to the peer (``Peer.PsiSend``), waits for
   the peer's set, and then
   - cardinality: masks the peer's set again, shuffles it, and streams it to C, who counts
     the matches (C learns ``|L ∩ R|`` plus the noise, and the sizes plus their dummies);
   - membership: the receiving side (the plan's recipient node, else L) sends its set in its
     own order, the other side sends its set shuffled and returns the receiver's set masked
     again in order; the receiver finds which of its keys match. With a recipient node it
     keeps them (``govshare node results``) and C learns only how many; without, it releases
     them to C through the masking rule both nodes agree on — only where the record-level
     rules allow it (``unconditional`` sharing, a membership grant).
3. ``receipt``: the node's ``result.released`` entry for the query with an inclusion proof
   under a signed, witnessed checkpoint.

No protocol message leaves a node before its policy decision allowed the query. If the peer
does not deliver within the protocol timeout the node aborts: nothing is released, the failure
is logged, and C gets ABORTED. A node whose part fails tells the other participants at once
(an ``abort`` message), so they stop waiting. The reservation is spent when the node's part
releases (or is refused on the data), returned when it released nothing (``budget.settled``);
after a restart, :meth:`QueryEngine.recover` settles what was running (``budget.recovered``).

Audit entries carry ``request_digest`` (SHA-256 of the signed request), ``participants`` (the two
nodes) and, on release, ``result_digest`` and ``recipient``, so an auditor can line the nodes'
logs up for one query.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol, TypeVar

from govshare.model import digests
from govshare.model.conditions import Condition
from govshare.model.digests import (
    KEY_ITEM,
    ROW_ITEM,
    digest,
    item_digest,
    points_digest,
)
from govshare.model.governance import QueryKind, Role
from govshare.model.identity import Identity, Roster
from govshare.model.query_plan import PsiPlan, Side, parse_plan
from govshare.model.risk import RISK_SUSPENDED
from govshare.model.states import (
    APPROVED,
    CANCELLED,
    DONE,
    EXPIRED,
    FAILED,
    PENDING,
    REFUSED,
    RUNNING,
)
from govshare.node.api.auth import Caller
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.checkpointer import CheckpointPublisher
from govshare.node.audit.sink import AuditSink
from govshare.node.data.catalog import Catalogue
from govshare.node.data.masking import apply_mask, needs_key
from govshare.node.policy.decision import (
    FILTER_OVERLAP,
    RATE_LIMIT,
    AccessRequest,
    Decision,
    Obligations,
    decide,
)
from govshare.node.policy.grants import GrantStore
from govshare.node.queries.session import NO_GATE, Mailbox, Waiting
from govshare.node.stores.query_store import QueryRecord, QueryStore, Usage
from govshare.protocols import dp, ecdh_psi
from govshare.protocols.errors import (
    Aborted,
    Conflict,
    GovshareError,
    MalformedInput,
    NotFound,
    PermissionDenied,
    PolicyRefused,
)
from govshare.protocols.signed_request import SignedRequest, verify_request

# Queries one analyst may submit per minute at one node (probing defence).
DEFAULT_RATE_LIMIT_PER_MINUTE = 30
# Seconds a node waits for its peer's set before it aborts the query.
DEFAULT_PROTOCOL_TIMEOUT = 300.0
RATE_LIMIT_RULE = RATE_LIMIT
SET_SIZE_RULE = "set_size.minimum"
MASK_RULE = "column.mask"

T = TypeVar("T")

OWN = "own"
RETURNED = "returned"
# DP PSI-CA: the left node's shared dummy keys, sent to the right node before the sets.
DUMMIES = "dummies"
# A participant whose part failed tells the others at once (no points).
ABORT = "abort"


def _no_mask_key(dataset: str, column: str) -> bytes:
    raise TypeError("this node was built without a masking secret: hash_prefix cannot release")


def participants_of(request: SignedRequest) -> list[str]:
    """The nodes a signed query names (any kind), read leniently: for notices only."""
    body = request.body_json()
    if not isinstance(body, dict):
        return []
    sides = [body.get("left"), body.get("right"), body.get("values"), body.get("matcher")]
    parts = body.get("parts")
    if isinstance(parts, list):
        sides.extend(parts)
    return sorted({str(s["node"]) for s in sides if isinstance(s, dict) and "node" in s})


@dataclass
class Session:
    plan: PsiPlan
    own: Side
    peer: Side
    party: ecdh_psi.PsiParty
    obligations: Obligations
    request_digest: str
    mailbox: Mailbox = field(default_factory=lambda: Mailbox((OWN, RETURNED, DUMMIES)))

    @property
    def releasing(self) -> bool:
        """In membership, the receiving side finds which of its keys match (and releases them,
        masked, to the analyst when no node is named as recipient)."""
        return self.plan.kind is QueryKind.PSI_MEMBERSHIP and self.own.node == self.plan.receiver


@dataclass(frozen=True)
class Release:
    """What a node hands the analyst: doubly masked points, or masked matching records."""

    points: list[bytes] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    matched: int = 0  # membership kept by a receiving node: how many of its keys matched


@dataclass(frozen=True)
class Admission:
    """A signed request that passed the signature, expiry and replay checks and was logged."""

    query_id: str
    signed: bytes
    request_digest: str
    now: int


class KindHandler(Protocol):
    """Serves query kinds beyond PSI: parses its plan and decides it through
    :meth:`QueryEngine.admit` (see ``govshare.node.queries.kinds.aggregate``)."""

    def submit(
        self, caller: Caller, request: SignedRequest, admission: Admission
    ) -> QueryRecord: ...

    def abort(self, caller: Caller, query_id: str) -> None: ...

    def forget(self, query_id: str) -> None: ...

    def interrupt(self, query_id: str, reason: str) -> None: ...


PeerSender = Callable[[str, str, str, list[bytes]], None]
"""``send(peer_node, query_id, phase, points)`` streams a set to the peer over mTLS."""


class QueryEngine:
    def __init__(
        self,
        *,
        identity: Identity,
        roster: Callable[[], Roster] | None = None,
        catalogue: Catalogue,
        grants: GrantStore,
        store: QueryStore,
        audit: AuditLog,
        publisher: CheckpointPublisher,
        send: PeerSender,
        clock: Callable[[], float] = time.time,
        executor: Callable[[], Executor | None] = lambda: None,
        protocol_timeout: float = DEFAULT_PROTOCOL_TIMEOUT,
        rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
        assessed: Callable[[str, int], frozenset[str]] = lambda dataset, now: frozenset(),
        mask_key: Callable[[str, str], bytes] | None = None,
        observe: Callable[[], object] = lambda: None,
        suspended: Callable[[str], str | None] = lambda analyst: None,
        waiting: Waiting = NO_GATE,
    ) -> None:
        self._identity = identity
        self._roster = roster or (lambda: identity.roster)
        self._catalogue = catalogue
        self._grants = grants
        self._store = store
        self._audit: AuditSink = audit
        self._log = audit
        self._publisher = publisher
        self._send = send
        self._clock = clock
        self._executor = executor
        self._timeout = protocol_timeout
        self._rate_limit = rate_limit_per_minute
        self._assessed = assessed
        self._mask_key = mask_key or _no_mask_key
        # The node's risk monitor (govshare.node.policy.alerts): told after each decision and run,
        # and asked at admission whether the analyst is suspended after a HIGH alert.
        self._observe = observe
        self._suspended = suspended
        self._waiting = waiting
        self._stopping: str | None = None
        self._sessions: dict[str, Session] = {}
        self._handlers: dict[str, KindHandler] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._identity.name

    # --- admission --------------------------------------------------------------------------

    def register(self, kinds: Iterable[QueryKind], handler: KindHandler) -> None:
        """Serve ``kinds`` with ``handler`` (e.g. the aggregate engine) after admission."""
        with self._lock:
            for kind in kinds:
                self._handlers[kind.value] = handler

    def submit(self, caller: Caller, signed: bytes) -> QueryRecord:
        """Admit a signed request and decide it by policy (see the module docstring)."""
        now = int(self._clock())
        try:
            request = SignedRequest.decode(signed)
        except MalformedInput as exc:
            raise MalformedInput(f"field 'signed_request': {exc}", field="signed_request") from None
        if request.analyst != caller.name:
            raise PermissionDenied(
                f"request is signed for {request.analyst!r} but sent by {caller.name!r}"
            )
        verify_request(request, caller.member.verify_key(), now=now)
        query_id = request.query_id_hex
        self._store.remember_nonce(
            caller.name, request.nonce, expires_at=request.expires_at, now=now
        )
        request_digest = digests.request_digest(signed)
        self._audit.record(
            "query.received",
            {"request": signed, "request_digest": request_digest, "kind": request.kind},
            actor=caller.name,
            query_id=query_id,
        )
        with self._lock:
            handler = self._handlers.get(request.kind)
        if handler is not None:
            return handler.submit(caller, request, Admission(query_id, signed, request_digest, now))
        plan = parse_plan(request.body_json(), kind=request.kind)
        own, peer = plan.side_of(self.name)
        admission = Admission(query_id, signed, request_digest, now)
        membership = plan.kind is QueryKind.PSI_MEMBERSHIP
        to_analyst = membership and plan.recipient is None and own is plan.left
        recipient = self._roster().member(plan.recipient) if plan.recipient else None
        access = AccessRequest(
            requester=caller.name,
            role=caller.role,
            jurisdiction=caller.jurisdiction,
            query_kind=plan.kind,
            columns=own.accesses(release=to_analyst),
            purpose=plan.purpose,
            dp_noise=plan.epsilon is not None,
            epsilon=plan.epsilon or Fraction(0),
            recipient=plan.recipient,
            recipient_is_department=recipient is not None and recipient.role is Role.NODE,
            recipient_jurisdiction=recipient.jurisdiction if recipient is not None else None,
            exact=plan.exact,
        )
        record, obligations = self.admit(
            caller,
            admission,
            access=access,
            dataset=own.dataset,
            participants=plan.nodes,
            check=(
                (lambda: self._release_mask_refusal(plan, own))
                if membership and plan.recipient is None
                else None
            ),
        )
        with self._lock:
            self._sessions[query_id] = Session(
                plan=plan,
                own=own,
                peer=peer,
                party=ecdh_psi.PsiParty.fresh(request.query_id),
                obligations=obligations,
                request_digest=request_digest,
            )
        return record

    def admit(
        self,
        caller: Caller,
        admission: Admission,
        *,
        access: AccessRequest,
        dataset: str,
        participants: Sequence[str],
        check: Callable[[], Decision | None] | None = None,
    ) -> tuple[QueryRecord, Obligations]:
        """Decide ``access`` on this node's ``dataset`` and store the query with its reservation.

        In one store transaction (``QueryStore.admit``): the rate limit, the policy decision on
        the analyst's usage so far (reservations included), then ``check`` (a further refusal
        of the query kind's own, or None), the decision logged with its rule, and the query
        stored with its budget reserved. See ``govshare.node.policy.decision`` for the order of
        checks.

        Raises:
            PolicyRefused: the rate limit or the policy refused; the refusal is stored and logged.
        """
        now = admission.now
        self.expire_stale()
        base = QueryRecord(
            query_id=admission.query_id,
            analyst=caller.name,
            kind=access.query_kind.value,
            dataset=dataset,
            purpose=access.purpose,
            request=admission.signed,
            state=REFUSED,
            rule="",
            message="",
            grant_id="",
            epsilon=Fraction(0),
            received_at=now,
            updated_at=now,
        )
        info = self._catalogue.get(dataset)
        grants = self._grants.list(dataset=dataset)

        def decide_logged(usage: Usage) -> Decision:
            suspension = self._suspended(caller.name)
            if suspension is not None:
                decision = Decision(False, RISK_SUSPENDED, suspension)
            elif usage.recent >= self._rate_limit:
                decision = Decision(
                    False,
                    RATE_LIMIT_RULE,
                    f"{caller.name} may submit {self._rate_limit} queries a minute to {self.name}",
                )
            else:
                decision = decide(
                    access,
                    info,
                    grants,
                    now=now,
                    node_jurisdiction=self._identity.jurisdiction,
                    usage=usage.grants,
                    budget=usage.budget,
                    issuer_key=self._identity.member.verify_key(),
                    assessed=self._assessed(dataset, now),
                )
                if decision.allowed and check is not None:
                    decision = check() or decision
            self._audit.record(
                "policy.decision",
                {
                    "dataset": dataset,
                    "request_digest": admission.request_digest,
                    "participants": list(participants),
                    **decision.audit_fields(),
                },
                actor=caller.name,
                query_id=admission.query_id,
            )
            return decision

        record, decision = self._store.admit(base, since=now - 60, decide=decide_logged)
        self._observe()
        return record, decision.raise_if_refused()

    def _release_mask_refusal(self, plan: PsiPlan, own: Side) -> Decision | None:
        """Released keys go through the plan's mask, which must be this side's own rule."""
        rule = self._catalogue.get(own.dataset).column(own.column)
        own_mask = rule.mask if rule is not None else None
        if own_mask == plan.mask:
            return None
        return Decision(
            False,
            MASK_RULE,
            f"keys of {own.dataset}.{own.column} are released only as {own_mask}, not {plan.mask}",
        )

    # --- reservations -----------------------------------------------------------------------

    def _settle(self, query_id: str, *, spent: bool, reason: str) -> None:
        """Spend or return a query's reservation, and log which (once)."""
        state = self._store.settle(query_id, spent=spent, now=int(self._clock()))
        if state is not None:
            self._audit.record(
                "budget.settled",
                {"reservation": state, "reason": reason},
                actor=self.name,
                query_id=query_id,
            )

    def expire_stale(self) -> list[str]:
        """Queries whose signed request expired while pending or approved never run: mark them
        ``expired`` and return their reservations. Returns their ids."""
        now = int(self._clock())
        expired = []
        for state in (PENDING, APPROVED):
            for record in self._store.with_state(state):
                if SignedRequest.decode(record.request).expires_at > now:
                    continue
                try:
                    self._store.transition(
                        record.query_id, from_states=[state], to=EXPIRED, now=now,
                        message="the signed request expired before the query ran",
                    )  # fmt: skip
                except Conflict:
                    continue  # approved, run or expired meanwhile
                self._settle(
                    record.query_id, spent=False, reason="the request expired before it ran"
                )
                with self._lock:
                    self._sessions.pop(record.query_id, None)
                expired.append(record.query_id)
        return expired

    def recover(self) -> None:
        """After a restart: settle the queries that were running when the node stopped.

        A query whose release this node had logged is ``done`` and its reservation spent;
        any other is ``failed`` with its reservation returned, since nothing left the node
        for the analyst. Queries waiting for approval or to run keep their reservations (the
        node holds no protocol state for them any more: the analyst submits again)."""
        now = int(self._clock())
        for record in self._store.with_state(RUNNING):
            released = any(
                e.decode().kind == "result.released"
                for e in self._log.entries_for_query(record.query_id)
            )
            to, reason = (
                (DONE, "released before the node stopped")
                if released
                else (FAILED, "the node stopped mid-query; nothing released")
            )
            self._store.transition(
                record.query_id, from_states=[RUNNING], to=to, now=now, message=reason
            )
            state = self._store.settle(record.query_id, spent=released, now=now)
            self._audit.record(
                "budget.recovered",
                {"reservation": state or "settled before", "state": to, "reason": reason},
                actor=self.name,
                query_id=record.query_id,
            )

    def cancel(self, caller: Caller, query_id: str) -> QueryRecord:
        """The analyst withdraws a query; its reservation returns.

        A query not yet running is cancelled at once. A running one is ended: its part stops
        at its next wait for a peer and fails, nothing released — unless it had already
        released, which cannot be called back.

        Raises:
            NotFound: no such query of the caller's.
            Conflict: the query has ended.
        """
        current = self.status(caller, query_id)
        if current.state == RUNNING:
            self.interrupt(query_id, f"the analyst {caller.name} withdrew the query")
            return current
        record = self._store.transition(
            query_id, from_states=[PENDING, APPROVED], to=CANCELLED, now=int(self._clock()),
            message="withdrawn by the analyst before it ran",
        )  # fmt: skip
        self._audit.record(
            "query.cancelled", {"reason": record.message}, actor=caller.name, query_id=query_id
        )
        self._settle(query_id, spent=False, reason="withdrawn by the analyst before it ran")
        self._close(query_id)
        for handler in self._kind_handlers():
            handler.forget(query_id)
        return record

    def status(self, caller: Caller, query_id: str) -> QueryRecord:
        record = self._store.get(query_id)
        if record.analyst != caller.name:
            raise NotFound(f"no query {query_id}")  # others' queries are not discoverable
        return record

    # --- the protocol -----------------------------------------------------------------------

    def _session(self, query_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(query_id)
        if session is None:
            raise self.not_open(query_id)
        return session

    def not_open(self, query_id: str) -> Aborted:
        """The error for a message about a query this node holds no protocol state for."""
        try:
            record = self._store.get(query_id)
        except NotFound:
            return Aborted(f"query {query_id} is not open on {self.name}; submit it again")
        if record.state == FAILED:
            return Aborted(f"query {query_id} was aborted on {self.name}: {record.message}")
        return Aborted(
            f"query {query_id} is {record.state} on {self.name}, not open; submit it again"
        )

    def execute(
        self,
        caller: Caller,
        query_id: str,
        body: Callable[[QueryRecord], T],
        *,
        close: Callable[[str], None],
    ) -> T:
        """Run an approved query's part on this node and record how it ended.

        Moves the query to ``running``, calls ``body`` with its record, then marks it ``done``.
        Any failure marks it ``failed`` and logs ``query.failed`` (nothing released); a
        govshare error reaches the caller as it is, anything else as :class:`Aborted`. ``close``
        drops the query's protocol state either way.
        """
        self.status(caller, query_id)
        if query_id in self.expire_stale():
            raise Aborted(f"query {query_id}: the signed request expired before it ran")
        record = self._store.transition(
            query_id, from_states=[APPROVED], to=RUNNING, now=int(self._clock())
        )
        try:
            if self._stopping is not None:  # after RUNNING: interrupt_all sees it, or we do
                raise Aborted(f"{self.name}: {self._stopping}; nothing released")
            result = body(record)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, GovshareError) else f"internal error: {exc}"
            self._store.transition(
                query_id, from_states=[RUNNING], to=FAILED, now=int(self._clock()), message=reason
            )
            # A refusal on the data consumes the query like a run; any other failure released
            # nothing, so the reservation goes back.
            refused = isinstance(exc, PolicyRefused)
            self._audit.record(
                "query.failed", {"reason": reason, "released": False}, actor=self.name,
                query_id=query_id,
            )  # fmt: skip
            self._settle(
                query_id, spent=refused,
                reason="refused on the data" if refused else "failed; nothing released",
            )  # fmt: skip
            close(query_id)
            self._abort_peers(query_id, record)
            self._observe()
            if isinstance(exc, GovshareError):
                raise
            raise Aborted(f"{self.name}: query aborted, nothing released") from exc
        self._store.transition(query_id, from_states=[RUNNING], to=DONE, now=int(self._clock()))
        self._settle(query_id, spent=True, reason="released")
        close(query_id)
        self._observe()
        return result

    def _abort_peers(self, query_id: str, record: QueryRecord) -> None:
        """Tell the other nodes of a failed query at once, so they stop waiting for this one."""
        nodes = participants_of(SignedRequest.decode(record.request))
        for node in nodes:
            if node != self.name:
                threading.Thread(
                    target=self._notify_abort, args=(node, query_id), daemon=True
                ).start()

    def _notify_abort(self, node: str, query_id: str) -> None:
        try:
            self._send(node, query_id, ABORT, [])
        except Exception:  # best effort: the peer's protocol timeout still ends its wait
            return

    def run(self, caller: Caller, query_id: str) -> Release:
        """Run this node's part of an approved PSI; return what goes to the analyst."""
        return self.execute(
            caller,
            query_id,
            lambda record: self._run(self._session(query_id), query_id, record),
            close=self._close,
        )

    def check_set_size(self, query_id: str, dataset: str, size: int, minimum: int) -> None:
        """Refuse (and log) a run whose filtered set came out smaller than the policy's floor.

        The message names the rule and k, never the size: a refusal must read the same for a
        set of 0 rows and of k - 1."""
        if size >= minimum:
            return
        self._refuse_on_data(
            query_id, dataset, SET_SIZE_RULE,
            f"the filtered set of {dataset} is smaller than k = {minimum}",
        )  # fmt: skip

    def check_exact(
        self,
        query_id: str,
        analyst: str,
        dataset: str,
        where: Sequence[Condition],
        k: int,
        *,
        keys: Iterable[bytes] = (),
    ) -> None:
        """The tracker check of an exact release, then remember its filtered set.

        Refuses (rule ``filter.overlap``) when the filtered set differs from an earlier exact
        release's to the same analyst — of any query kind — by fewer than ``k`` rows, or, when
        both matched on join keys, by fewer than ``k`` distinct keys (symmetric differences, on
        this node's own data): two such releases would give away the few rows, or the one
        person, between them. The same set again is allowed: it releases nothing new.
        """
        rows = (str(r).encode() for r in self._catalogue.row_ids(dataset, where=where))
        mine = frozenset(
            [*(item_digest(dataset, ROW_ITEM, r) for r in rows),
             *(item_digest(dataset, KEY_ITEM, key) for key in keys)]
        )  # fmt: skip
        for earlier, theirs in self._store.exact_releases(analyst, dataset):
            if earlier == query_id:
                continue
            for kind in (ROW_ITEM, KEY_ITEM):
                a = {d for d in mine if d[:1] == kind}
                b = {d for d in theirs if d[:1] == kind}
                if a and b and 0 < len(a ^ b) < k:
                    self._refuse_on_data(
                        query_id, dataset, FILTER_OVERLAP,
                        f"the filtered set of {dataset} differs from an earlier exact "
                        f"release's by fewer than k = {k} "
                        + ("rows" if kind == ROW_ITEM else "keys"),
                    )  # fmt: skip
        self._store.record_exact(analyst, dataset, query_id, mine)

    def _refuse_on_data(self, query_id: str, dataset: str, rule: str, message: str) -> None:
        self._audit.record(
            "policy.decision",
            {"dataset": dataset, "allowed": False, "rule": rule, "message": message},
            actor=self.name,
            query_id=query_id,
        )
        raise PolicyRefused(rule, message)

    def _close(self, query_id: str) -> None:
        with self._lock:
            self._sessions.pop(query_id, None)

    def _run(self, session: Session, query_id: str, record: QueryRecord) -> Release:
        own, plan = session.own, session.plan
        own_keys = self._catalogue.keys(own.dataset, own.column, where=own.where)
        keys = [k.encode() for k in own_keys]
        self.check_set_size(query_id, own.dataset, len(keys), session.obligations.min_set_size)
        if session.obligations.exact:
            self.check_exact(
                query_id, record.analyst, own.dataset, own.where,
                session.obligations.min_group_size, keys=keys,
            )  # fmt: skip
        executor = self._executor()
        workers = None if executor is not None else 1
        masked_keys = keys
        if plan.kind is QueryKind.PSI_CARDINALITY and plan.epsilon is not None:
            # DP PSI-CA: shared dummies (drawn by the left node) land in the intersection,
            # private ones only in this node's set (govshare.protocols.ecdh_psi, "DP PSI-CA").
            if own is plan.left:
                shared = ecdh_psi.draw_shared_dummies(plan.epsilon)
                self._send_step(session, query_id, DUMMIES, shared)
            else:
                shared = ecdh_psi.check_shared_dummies(
                    self._wait(session, query_id, DUMMIES), epsilon=plan.epsilon
                )
            private = ecdh_psi.draw_private_dummies(plan.epsilon)
            masked_keys = ecdh_psi.pad_with_dummies(keys, shared, private)
        masked = session.party.mask_own(masked_keys, workers=workers, executor=executor)
        outgoing = (
            ecdh_psi.shuffle(masked)
            if plan.kind is QueryKind.PSI_MEMBERSHIP and not session.releasing
            else masked
        )
        self._send_step(session, query_id, OWN, outgoing)
        peer_own = self._wait(session, query_id, OWN)
        again = session.party.mask_peer(peer_own, workers=workers, executor=executor)

        if plan.kind is QueryKind.PSI_CARDINALITY:
            out = ecdh_psi.shuffle(again)
            self._released(session, query_id, record.analyst, points_digest(out), len(out))
            return Release(points=out)
        if not session.releasing:
            # Return the releasing side's set, masked again, in its order.
            self._send_step(session, query_id, RETURNED, again)
            self._released(session, query_id, session.peer.node, points_digest(again), 0)
            return Release()
        returned = self._wait(session, query_id, RETURNED)
        if len(returned) != len(keys):
            raise MalformedInput("peer returned a set of the wrong size", field="points")
        positions = ecdh_psi.matching_positions(returned, again)
        if plan.recipient is not None:
            # This node keeps which of its own keys matched; the analyst learns how many,
            # noised unless the release is exact.
            matched = sorted(keys[i].decode() for i in positions)
            self._store.save_matches(query_id, matched)
            self._released(
                session, query_id, self.name, digest("\n".join(matched).encode()), len(matched)
            )
            count = len(matched)
            if plan.epsilon is not None:
                count += dp.discrete_laplace(dp.laplace_scale(epsilon=plan.epsilon, sensitivity=1))
            return Release(matched=count)
        rule = plan.mask
        if rule is None:  # parse_plan requires it for membership
            raise PolicyRefused(MASK_RULE, f"{own.column} has no masking rule")
        mask_key = self._mask_key(own.dataset, own.column) if needs_key(rule) else None
        records = sorted(apply_mask(rule, keys[i].decode(), key=mask_key) for i in positions)
        self._released(
            session, query_id, record.analyst, digest("\n".join(records).encode()), len(records)
        )
        return Release(records=records)

    def _send_step(self, session: Session, query_id: str, phase: str, points: list[bytes]) -> None:
        self._send(session.peer.node, query_id, phase, points)
        self._audit.record(
            "protocol.step",
            {"peer": session.peer.node, "direction": "sent", "phase": phase,
             "digest": points_digest(points), "size": len(points)},
            actor=self.name, query_id=query_id,
        )  # fmt: skip

    def _wait(self, session: Session, query_id: str, phase: str) -> list[bytes]:
        inbox = session.mailbox.wait(
            phase, node=self.name, peer=session.peer.node, what="set", timeout=self._timeout,
            waiting=self._waiting,
        )  # fmt: skip
        self._audit.record(
            "protocol.step",
            {"peer": session.peer.node, "direction": "received", "phase": phase,
             "digest": points_digest(inbox.points), "size": len(inbox.points)},
            actor=self.name, query_id=query_id,
        )  # fmt: skip
        return inbox.points

    def _released(
        self, session: Session, query_id: str, recipient: str, result_digest: str, size: int
    ) -> None:
        self._audit.record(
            "result.released",
            {"recipient": recipient, "result_digest": result_digest, "size": size,
             "request_digest": session.request_digest,
             "exact": session.obligations.exact, "participants": list(session.plan.nodes)},
            actor=self.name, query_id=query_id,
        )  # fmt: skip

    def receive(self, caller: Caller, chunks: Iterator[tuple[str, str, int, bytes]]) -> int:
        """Take a peer's set: ``(query_id, phase, total, packed points)`` chunks, in order.

        A refused set leaves nothing behind: the peer may send it again."""
        first = next(chunks, None)
        if first is None:
            raise MalformedInput("empty stream: no chunk carried a query id", field="query_id")
        query_id, phase, total, _ = first
        if phase == ABORT:
            self.abort(caller, query_id)
            return 0
        session = self._session(query_id)
        if caller.name != session.peer.node:
            raise PermissionDenied(f"{caller.name} is not the peer of query {query_id}")
        inbox = session.mailbox.inboxes.get(phase)
        if inbox is None:
            raise MalformedInput(f"field 'phase': {phase!r} is unknown", field="phase")

        def decoded() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
            for chunk_query, chunk_phase, chunk_total, packed in itertools.chain([first], chunks):
                if (chunk_query, chunk_phase) != (query_id, phase):
                    raise MalformedInput("one stream carries one set", field="phase")
                yield chunk_total, ecdh_psi.decode_points(packed), []

        return inbox.fill(total, decoded())

    def abort(self, caller: Caller, query_id: str) -> None:
        """A participant says the query failed on its side: stop waiting for it at once."""
        with self._lock:
            session = self._sessions.get(query_id)
        if session is not None:
            if caller.name != session.peer.node:
                raise PermissionDenied(f"{caller.name} is not the peer of query {query_id}")
            session.mailbox.end(f"node {caller.name} ended the query")
            return
        for kind_handler in self._kind_handlers():
            kind_handler.abort(caller, query_id)

    def interrupt(self, query_id: str, reason: str) -> None:
        """End a running query's part here, whatever its kind: its waits raise Aborted."""
        with self._lock:
            session = self._sessions.get(query_id)
        if session is not None:
            session.mailbox.end(reason)
        for kind_handler in self._kind_handlers():
            kind_handler.interrupt(query_id, reason)

    def interrupt_all(self, reason: str) -> None:
        """End every running query's part, and any that starts from now (the node is stopping)."""
        self._stopping = reason
        for record in self._store.with_state(RUNNING):
            self.interrupt(record.query_id, reason)

    def _kind_handlers(self) -> list[KindHandler]:
        with self._lock:
            return list({id(h): h for h in self._handlers.values()}.values())

    # --- receipts ---------------------------------------------------------------------------

    def receipt(self, caller: Caller, query_id: str) -> tuple[int, bytes, list[bytes], bytes]:
        """(index, entry, inclusion proof, signed checkpoint) of this node's release entry."""
        self.status(caller, query_id)
        entries = [
            e
            for e in self._log.entries_for_query(query_id)
            if e.decode().kind in ("result.released", "query.failed")
        ]
        if not entries:
            raise NotFound(f"query {query_id} released nothing on {self.name}")
        entry = entries[-1]
        checkpoint = self._publisher.covering(entry.index + 1)
        proof = self._log.inclusion_proof(entry.index, checkpoint.size)
        return entry.index, entry.data, proof, checkpoint.note
