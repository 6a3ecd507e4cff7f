"""The node's side of a joint query, whatever its kind: admit, decide, run, release, prove.

The engine holds what every query kind shares; a kind (``govshare.node.queries.kinds``) adds
its plan, its access request and its protocol part. Flow for one query (nodes L and R,
analyst C):

1. ``submit``: C sends the same signed request to every node of the plan. Each node checks the
   caller is the signer, the signature (roster key), the validity window and the nonce
   (replays refused), logs the signed request, and hands it to the kind it names, which
   parses its plan and admits it (:meth:`QueryEngine.admit`): in one store transaction, the
   rate limit, the policy decision on the node's own dataset in the order of
   ``govshare.node.policy.decision`` (grant and ε ledger before any rule of the data, nothing
   read from the rows), the decision logged with its rule, and the query stored with its ε and
   one query of its grant reserved. A refusal ends the query here; a dataset that demands
   per-query approval, or an exact release, leaves it ``pending_approval`` until the operator
   decides.
2. ``run``: once every node approved, C calls ``Run`` on each, through the node's admission
   gate (``govshare.node.queries.capacity``). :meth:`QueryEngine.execute` moves the query to
   ``running`` and runs the kind's part; the kind reads its data (the floors and the tracker
   check, :meth:`QueryEngine.check_set_size` and :meth:`QueryEngine.check_exact`, refuse by
   rule and k), and exchanges its messages with the other nodes over ``Peer.Deliver``, which
   the engine routes to the kind holding the query (:meth:`QueryEngine.deliver`).
3. ``receipt``: the node's ``result.released`` entry for the query with an inclusion proof
   under a signed, witnessed checkpoint.

No protocol message leaves a node before its policy decision allowed the query. If a peer does
not deliver within the protocol timeout the node aborts: nothing is released, the failure is
logged, and C gets ABORTED. A node whose part fails tells the other participants at once (an
abort notice on ``Peer.Deliver``), so they stop waiting; the analyst's ``Cancel`` and a
stopping node end a running part the same way (:meth:`QueryEngine.interrupt`). The reservation
is spent when the node's part releases (or is refused on the data), returned when it released
nothing (``budget.settled``); after a restart, :meth:`QueryEngine.recover` settles what was
running (``budget.recovered``) and expires what can no longer run.

Audit entries carry ``request_digest`` (``govshare.model.digests``), ``participants`` and, on
release, ``result_digest`` and ``recipient``, so an auditor can line the nodes' logs up for one
query.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, TypeVar

from govshare.model.conditions import Condition
from govshare.model.digests import KEY_ITEM, ROW_ITEM, Digests, digests_for
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity, Roster
from govshare.model.risk import RISK_SUSPENDED
from govshare.model.states import (
    APPROVED,
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    REFUSED,
    RUNNING,
)
from govshare.node.api.auth import Caller
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.checkpointer import CheckpointPublisher
from govshare.node.audit.sink import AuditSink
from govshare.node.data.catalog import Catalogue, Stop
from govshare.node.observability import events
from govshare.node.observability.events import QueryEvent
from govshare.node.policy import approvals
from govshare.node.policy.decision import (
    FILTER_OVERLAP,
    RATE_LIMIT,
    AccessRequest,
    Decision,
    Obligations,
    decide,
)
from govshare.node.policy.grants import GrantStore
from govshare.node.queries.session import Chunks
from govshare.node.stores.query_store import QueryRecord, QueryStore, Usage
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

T = TypeVar("T")


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


@dataclass(frozen=True)
class Admission:
    """A signed request that passed the signature, expiry and replay checks and was logged."""

    query_id: str
    signed: bytes
    request_digest: str
    now: int


class KindHandler(Protocol):
    """What a query kind adds to the engine (``govshare.node.queries.kinds``): its plan and
    access request, decided through :meth:`QueryEngine.admit`; its protocol part, run through
    :meth:`QueryEngine.execute`; and the protocol state it keeps per query meanwhile."""

    def submit(
        self, caller: Caller, request: SignedRequest, admission: Admission
    ) -> QueryRecord: ...

    def holds(self, query_id: str) -> bool:
        """Whether this kind keeps protocol state for ``query_id``."""
        ...

    def receive(self, caller: Caller, query_id: str, phase: str, chunks: Chunks) -> int:
        """Take a peer's message for ``phase`` of a query this kind holds."""
        ...

    def abort(self, caller: Caller, query_id: str) -> None:
        """A participant's part ended: stop waiting for it."""
        ...

    def interrupt(self, query_id: str, reason: str) -> None:
        """End this node's running part (the analyst withdrew it, the node is stopping)."""
        ...

    def forget(self, query_id: str) -> None:
        """Drop the query's protocol state."""
        ...


AbortNotice = Callable[[str, str], None]
"""``notify(peer_node, query_id)``: tell a peer this node's part ended (Peer.Deliver)."""


def verified_request(caller: Caller, signed: bytes, *, now: int, what: str) -> SignedRequest:
    """``signed`` decoded and verified as ``caller``'s own (a query or an access application):
    signed by the member who sent it, under its key in the roster, within its window.

    Raises:
        MalformedInput: not a signed request.
        PermissionDenied: signed for another member than the caller.
        VerificationFailed: a bad signature or window.
    """
    try:
        request = SignedRequest.decode(signed)
    except MalformedInput as exc:
        raise MalformedInput(f"field 'signed_request': {exc}", field="signed_request") from None
    if request.analyst != caller.name:
        raise PermissionDenied(
            f"{what} is signed for {request.analyst!r} but sent by {caller.name!r}"
        )
    verify_request(request, caller.member.verify_key(), now=now)
    return request


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
        notify_abort: AbortNotice = lambda peer, query_id: None,
        clock: Callable[[], float] = time.time,
        rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
        assessed: Callable[[str, int], frozenset[str]] = lambda dataset, now: frozenset(),
        observe: Callable[[], object] = lambda: None,
        suspended: Callable[[str], str | None] = lambda analyst: None,
        frozen: Callable[[str], tuple[str, str] | None] = lambda dataset: None,
        on_event: Callable[[QueryEvent], None] = lambda event: None,
    ) -> None:
        self._identity = identity
        self._roster = roster or (lambda: identity.roster)
        self._catalogue = catalogue
        self._grants = grants
        self._store = store
        self._audit: AuditSink = audit
        self._log = audit
        self._publisher = publisher
        self._notify_abort_to = notify_abort
        self._clock = clock
        self._rate_limit = rate_limit_per_minute
        self._assessed = assessed
        # The node's risk monitor (govshare.node.policy.alerts): told after each decision and run,
        # and asked at admission whether the analyst is suspended after a HIGH alert.
        self._observe = observe
        self._suspended = suspended
        # An operator's freeze of the node or a dataset (govshare.node.policy.controls): the
        # (rule, message) that refuses every query on the dataset, at admission and at run.
        self._frozen = frozen
        # Each step of a query, for the node's logs and metrics (govshare.node.observability).
        self._on_event = on_event
        self._stopping: str | None = None
        self._handlers: dict[str, KindHandler] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._identity.name

    @property
    def digests(self) -> Digests:
        """The digests of the federation's suite (what the other nodes log too)."""
        return digests_for(self._identity.roster.crypto)

    def _event(self, name: str, query_id: str, kind: str = "", dataset: str = "",
               **fields: object) -> None:  # fmt: skip
        self._on_event(QueryEvent(name, self.name, query_id, kind, dataset, fields))

    # --- admission --------------------------------------------------------------------------

    def register(self, kinds: Iterable[QueryKind], handler: KindHandler) -> None:
        """Serve ``kinds`` with ``handler`` (e.g. the aggregate engine) after admission."""
        with self._lock:
            for kind in kinds:
                self._handlers[kind.value] = handler

    def submit(self, caller: Caller, signed: bytes) -> QueryRecord:
        """Admit a signed request and decide it by policy (see the module docstring)."""
        now = int(self._clock())
        request = verified_request(caller, signed, now=now, what="request")
        query_id = request.query_id_hex
        self._store.remember_nonce(
            caller.name, request.nonce, expires_at=request.expires_at, now=now
        )
        request_digest = self.digests.request_digest(signed)
        self._audit.record(
            "query.received",
            {"request": signed, "request_digest": request_digest, "kind": request.kind},
            actor=caller.name,
            query_id=query_id,
        )
        self._event(events.RECEIVED, query_id, request.kind, analyst=caller.name)
        with self._lock:
            handler = self._handlers.get(request.kind)
        if handler is None:
            raise MalformedInput(
                f"field 'kind': {request.kind!r} is not a query kind", field="kind"
            )
        return handler.submit(caller, request, Admission(query_id, signed, request_digest, now))

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
            freeze = self._frozen(dataset)
            if freeze is not None:
                decision = Decision(False, *freeze)
            elif suspension is not None:
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
        self._event(
            events.DECIDED, record.query_id, record.kind, dataset, allowed=decision.allowed,
            rule=decision.rule, state=record.state, epsilon=record.epsilon,
        )  # fmt: skip
        self._observe()
        return record, decision.raise_if_refused()

    # --- reservations -----------------------------------------------------------------------

    def _settle(self, record: QueryRecord, *, spent: bool, reason: str) -> None:
        """Spend or return a query's reservation, and log which (once)."""
        query_id = record.query_id
        state = self._store.settle(query_id, spent=spent, now=int(self._clock()))
        if state is not None:
            self._audit.record(
                "budget.settled",
                {"reservation": state, "reason": reason},
                actor=self.name,
                query_id=query_id,
            )
            self._event(
                events.SETTLED, query_id, record.kind, record.dataset, reservation=state,
                epsilon=record.epsilon, reason=reason,
            )  # fmt: skip

    def expire_stale(self) -> list[str]:
        """Queries whose signed request expired while pending or approved never run: mark them
        ``expired`` and return their reservations. Returns their ids."""
        now = int(self._clock())
        expired = []
        for state in (PENDING, APPROVED):
            for record in self._store.with_state(state):
                if SignedRequest.decode(record.request).expires_at > now:
                    continue
                if not approvals.expire(
                    self._store, self._audit, record.query_id, from_state=state, now=now,
                    actor=self.name,
                ):  # fmt: skip
                    continue  # approved, run or expired meanwhile
                for handler in self._kind_handlers():
                    handler.forget(record.query_id)
                self._event(events.EXPIRED, record.query_id, record.kind, record.dataset)
                expired.append(record.query_id)
        return expired

    def recover(self) -> None:
        """After a restart: settle the queries that were running when the node stopped, and
        expire those whose signed request expired meanwhile (:meth:`expire_stale`).

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
        self.expire_stale()

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
        self._event(events.CANCELLED, query_id, record.kind, record.dataset, reason=record.message)
        self._settle(record, spent=False, reason="withdrawn by the analyst before it ran")
        for handler in self._kind_handlers():
            handler.forget(query_id)
        return record

    def status(self, caller: Caller, query_id: str) -> QueryRecord:
        record = self._store.get(query_id)
        if record.analyst != caller.name:
            raise NotFound(f"no query {query_id}")  # others' queries are not discoverable
        return record

    # --- the protocol -----------------------------------------------------------------------

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
        current = self.status(caller, query_id)
        if query_id in self.expire_stale():
            raise Aborted(f"query {query_id}: the signed request expired before it ran")
        freeze = self._frozen(current.dataset)
        if freeze is not None:
            self._refuse_frozen(current, *freeze)
        record = self._store.transition(
            query_id, from_states=[APPROVED], to=RUNNING, now=int(self._clock())
        )
        self._event(events.RUNNING, query_id, record.kind, record.dataset)
        try:
            if self._stopping is not None:  # after RUNNING: interrupt_all sees it, or we do
                raise Aborted(f"{self.name}: {self._stopping}; nothing released")
            # A live dataset's reads share one snapshot of its source (govshare.node.data.live);
            # a source that cannot be reached refuses the query here, before any protocol step.
            with self._catalogue.reading(
                record.dataset, query_id=query_id, audit=self._audit, actor=self.name
            ):
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
            self._event(
                events.FAILED, query_id, record.kind, record.dataset, reason=reason,
                refused=refused,
            )  # fmt: skip
            self._settle(
                record, spent=refused,
                reason="refused on the data" if refused else "failed; nothing released",
            )  # fmt: skip
            close(query_id)
            self._abort_peers(query_id, record)
            self._observe()
            if isinstance(exc, GovshareError):
                raise
            raise Aborted(f"{self.name}: query aborted, nothing released") from exc
        self._store.transition(query_id, from_states=[RUNNING], to=DONE, now=int(self._clock()))
        self._event(events.RELEASED, query_id, record.kind, record.dataset)
        self._settle(record, spent=True, reason="released")
        close(query_id)
        self._observe()
        return result

    def _refuse_frozen(self, record: QueryRecord, rule: str, message: str) -> None:
        """Refuse an approved query on a frozen node or dataset before it runs: stored
        ``refused`` with the freeze's rule, logged, its reservation returned.

        Raises:
            PolicyRefused: always, with the freeze's rule.
        """
        try:
            self._store.transition(
                record.query_id, from_states=[APPROVED], to=REFUSED, now=int(self._clock()),
                message=message, rule=rule,
            )  # fmt: skip
        except Conflict:
            pass  # refused by the freeze itself meanwhile, or withdrawn: refuse all the same
        else:
            self._audit.record(
                "policy.decision",
                {"dataset": record.dataset, "allowed": False, "rule": rule, "message": message,
                 "was": APPROVED},
                actor=self.name, query_id=record.query_id,
            )  # fmt: skip
            self._settle(record, spent=False, reason=f"refused: {rule}")
        for handler in self._kind_handlers():
            handler.forget(record.query_id)
        raise PolicyRefused(rule, message)

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
            self._notify_abort_to(node, query_id)
        except Exception:  # best effort: the peer's protocol timeout still ends its wait
            return

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
        stop: Stop | None = None,
    ) -> None:
        """The tracker check of an exact release, then remember its filtered set.

        Refuses (rule ``filter.overlap``) when the filtered set differs from an earlier exact
        release's to the same analyst — of any query kind — by fewer than ``k`` rows, or, when
        both matched on join keys, by fewer than ``k`` distinct keys (symmetric differences, on
        this node's own data): two such releases would give away the few rows, or the one
        person, between them. The same set again is allowed: it releases nothing new.

        ``stop``: the read of the filtered rows ends when it says so (the query's part ended),
        with its error (see :data:`~govshare.node.data.catalog.Stop`); nothing is recorded.
        """
        read = self._catalogue.row_ids(dataset, where=where, stop=stop)
        rows = (str(r).encode() for r in read)
        mine = frozenset(
            [*(self.digests.item_digest(dataset, ROW_ITEM, r) for r in rows),
             *(self.digests.item_digest(dataset, KEY_ITEM, key) for key in keys)]
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

    # --- peer messages ----------------------------------------------------------------------

    def _holder(self, query_id: str) -> KindHandler:
        for handler in self._kind_handlers():
            if handler.holds(query_id):
                return handler
        raise self.not_open(query_id)

    def deliver(self, caller: Caller, query_id: str, phase: str, chunks: Chunks) -> int:
        """A peer's message for ``phase`` of ``query_id``, to the kind that holds the query.

        Raises:
            Aborted: this node holds no protocol state for the query (it is not open here).
            PermissionDenied: the caller does not take part in the query.
            MalformedInput: the kind refused the message; nothing of it was kept.
        """
        return self._holder(query_id).receive(caller, query_id, phase, chunks)

    def abort(self, caller: Caller, query_id: str) -> None:
        """A participant says the query failed on its side: stop waiting for it at once."""
        for handler in self._kind_handlers():
            if handler.holds(query_id):
                handler.abort(caller, query_id)

    def interrupt(self, query_id: str, reason: str) -> None:
        """End a running query's part here, whatever its kind: its waits raise Aborted."""
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
