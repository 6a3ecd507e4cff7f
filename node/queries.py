"""The node's side of a joint query: admit, decide, run, release, prove.

Admission (signature, replay, rate limit, policy, approval) is shared by every query kind;
the PSI kinds run here, the aggregate kinds in ``govshare.node.aggregates``.

Flow for one query (two nodes L and R, analyst C):

1. ``submit``: C sends the same signed request to L and R. Each node checks the caller is the
   signer, the signature (roster key), the validity window and the nonce (replays refused),
   logs the signed request, applies the rate limit, and decides by policy on its own dataset
   — grants, grade floors, sharing type, jurisdiction, filtered set size — logging the
   decision and its rule. A refusal ends the query here; a dataset that demands per-query
   approval leaves it ``pending_approval`` until the operator approves or denies it.
2. ``run``: once both nodes approved, C calls ``Run`` on each. Each node masks its own
   distinct, filtered keys with a fresh scalar, streams them to the peer (``Peer.PsiSend``),
   waits for the peer's set, and then
   - cardinality: masks the peer's set again, shuffles it, and streams it to C, who counts
     the matches (``govshare.protocols.ecdh_psi``: C learns ``|L ∩ R|`` and the set sizes);
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
is logged, and C gets ABORTED.

Audit entries carry ``request_digest`` (SHA-256 of the signed request), ``participants`` (the two
nodes) and, on release, ``result_digest`` and ``recipient``, so an auditor can line the nodes'
logs up for one query.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Protocol, TypeVar

from govshare.node.audit_sink import AuditSink
from govshare.node.auditlog import AuditLog
from govshare.node.auth import Caller
from govshare.node.catalog import Catalogue
from govshare.node.checkpointer import CheckpointPublisher
from govshare.node.governance import QueryKind, Role
from govshare.node.grants import GrantStore
from govshare.node.identity import Identity, Roster
from govshare.node.masking import apply_mask
from govshare.node.policy import AccessRequest, Obligations, decide
from govshare.node.query_plan import PsiPlan, Side, parse_plan
from govshare.node.query_store import (
    APPROVED,
    DONE,
    FAILED,
    PENDING,
    REFUSED,
    RUNNING,
    QueryRecord,
    QueryStore,
)
from govshare.protocols import ecdh_psi
from govshare.protocols.errors import (
    Aborted,
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
RATE_LIMIT_RULE = "rate_limit"
SET_SIZE_RULE = "set_size.minimum"
MASK_RULE = "column.mask"

T = TypeVar("T")

OWN = "own"
RETURNED = "returned"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def points_digest(points: Iterable[bytes]) -> str:
    hasher = hashlib.sha256()
    for point in points:
        hasher.update(point)
    return hasher.hexdigest()


@dataclass
class _Inbox:
    """A set arriving from the peer, chunk by chunk."""

    total: int = -1
    points: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Session:
    plan: PsiPlan
    own: Side
    peer: Side
    party: ecdh_psi.PsiParty
    obligations: Obligations
    request_digest: str
    inboxes: dict[str, _Inbox] = field(default_factory=lambda: {OWN: _Inbox(), RETURNED: _Inbox()})
    lock: threading.Lock = field(default_factory=threading.Lock)

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
    :meth:`QueryEngine.admit` (see ``govshare.node.aggregates``)."""

    def submit(
        self, caller: Caller, request: SignedRequest, admission: Admission
    ) -> QueryRecord: ...


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
        request_digest = digest(signed)
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
        record, obligations = self.admit(
            caller,
            admission,
            kind=plan.kind,
            dataset=own.dataset,
            purpose=plan.purpose,
            decide=lambda: self._decide(caller, plan, own, now, query_id, request_digest),
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
        kind: QueryKind,
        dataset: str,
        purpose: str,
        decide: Callable[[], Obligations],
    ) -> tuple[QueryRecord, Obligations]:
        """Rate limit, policy decision (``decide`` logs it) and the stored query record.

        Raises:
            PolicyRefused: the rate limit or the policy refused; the refusal is stored.
        """
        now = admission.now
        base = QueryRecord(
            query_id=admission.query_id,
            analyst=caller.name,
            kind=kind.value,
            dataset=dataset,
            purpose=purpose,
            request=admission.signed,
            state=REFUSED,
            rule="",
            message="",
            grant_id="",
            epsilon=Fraction(0),
            received_at=now,
            updated_at=now,
        )
        try:
            if self._store.count_since(caller.name, now - 60) >= self._rate_limit:
                raise PolicyRefused(
                    RATE_LIMIT_RULE,
                    f"{caller.name} may submit {self._rate_limit} queries a minute to {self.name}",
                )
            obligations = decide()
        except PolicyRefused as refusal:
            self._store.create(
                replace(base, rule=refusal.rule, message=refusal.reason, state=REFUSED)
            )
            raise
        state = PENDING if obligations.requires_approval else APPROVED
        record = replace(
            base,
            state=state,
            rule="allowed",
            message="waiting for the operator's approval" if state == PENDING else "allowed",
            grant_id=obligations.grant_id,
            epsilon=obligations.epsilon,
        )
        self._store.create(record)
        return record, obligations

    def decide_access(
        self,
        caller: Caller,
        access: AccessRequest,
        *,
        dataset: str,
        participants: Sequence[str],
        admission: Admission,
    ) -> Obligations:
        """Decide ``access`` on this node's ``dataset``, log the decision, raise on refusal."""
        decision = decide(
            access,
            self._catalogue.get(dataset),
            self._grants.list(dataset=dataset),
            now=admission.now,
            node_jurisdiction=self._identity.jurisdiction,
            usage=self._store.usage(),
            issuer_key=self._identity.member.verify_key(),
        )
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
        return decision.raise_if_refused()

    def _decide(
        self,
        caller: Caller,
        plan: PsiPlan,
        own: Side,
        now: int,
        query_id: str,
        request_digest: str,
    ) -> Obligations:
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
            dp_noise=False,
            recipient=plan.recipient,
            filtered_set_size=self._catalogue.count(own.dataset, where=own.where),
            recipient_is_department=recipient is not None and recipient.role is Role.NODE,
            recipient_jurisdiction=recipient.jurisdiction if recipient is not None else None,
        )
        obligations = self.decide_access(
            caller,
            access,
            dataset=own.dataset,
            participants=plan.nodes,
            admission=Admission(query_id, b"", request_digest, now),
        )
        if membership and plan.recipient is None:
            self._check_release_mask(caller, plan, own, query_id, request_digest)
        return obligations

    def _check_release_mask(
        self, caller: Caller, plan: PsiPlan, own: Side, query_id: str, request_digest: str
    ) -> None:
        """Released keys go through the plan's mask, which must be this side's own rule."""
        rule = self._catalogue.get(own.dataset).column(own.column)
        own_mask = rule.mask if rule is not None else None
        if own_mask == plan.mask:
            return
        message = (
            f"keys of {own.dataset}.{own.column} are released only as {own_mask}, not {plan.mask}"
        )
        self._audit.record(
            "policy.decision",
            {"dataset": own.dataset, "allowed": False, "rule": MASK_RULE, "message": message,
             "request_digest": request_digest},
            actor=caller.name, query_id=query_id,
        )  # fmt: skip
        raise PolicyRefused(MASK_RULE, message)

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
        record = self._store.transition(
            query_id, from_states=[APPROVED], to=RUNNING, now=int(self._clock())
        )
        try:
            result = body(record)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, GovshareError) else f"internal error: {exc}"
            self._store.transition(
                query_id, from_states=[RUNNING], to=FAILED, now=int(self._clock()), message=reason
            )
            self._audit.record(
                "query.failed", {"reason": reason, "released": False}, actor=self.name,
                query_id=query_id,
            )  # fmt: skip
            close(query_id)
            if isinstance(exc, GovshareError):
                raise
            raise Aborted(f"{self.name}: query aborted, nothing released") from exc
        self._store.transition(query_id, from_states=[RUNNING], to=DONE, now=int(self._clock()))
        close(query_id)
        return result

    def run(self, caller: Caller, query_id: str) -> Release:
        """Run this node's part of an approved PSI; return what goes to the analyst."""
        return self.execute(
            caller,
            query_id,
            lambda record: self._run(self._session(query_id), query_id, record),
            close=self._close,
        )

    def check_set_size(self, query_id: str, dataset: str, size: int, minimum: int) -> None:
        """Refuse (and log) a run whose filtered set came out smaller than the policy's floor."""
        if size >= minimum:
            return
        self._audit.record(
            "policy.decision",
            {"dataset": dataset, "allowed": False, "rule": SET_SIZE_RULE},
            actor=self.name,
            query_id=query_id,
        )
        raise PolicyRefused(
            SET_SIZE_RULE, f"the filtered set of {dataset} has fewer than {minimum} rows"
        )

    def _close(self, query_id: str) -> None:
        with self._lock:
            self._sessions.pop(query_id, None)

    def _run(self, session: Session, query_id: str, record: QueryRecord) -> Release:
        own = session.own
        keys = [k.encode() for k in self._catalogue.keys(own.dataset, own.column, where=own.where)]
        self.check_set_size(query_id, own.dataset, len(keys), session.obligations.min_set_size)
        self._store.charge(record.grant_id, record.epsilon)
        executor = self._executor()
        workers = None if executor is not None else 1
        masked = session.party.mask_own(keys, workers=workers, executor=executor)
        outgoing = (
            ecdh_psi.shuffle(masked)
            if session.plan.kind is QueryKind.PSI_MEMBERSHIP and not session.releasing
            else masked
        )
        self._send_step(session, query_id, OWN, outgoing)
        peer_own = self._wait(session, query_id, OWN)
        again = session.party.mask_peer(peer_own, workers=workers, executor=executor)

        if session.plan.kind is QueryKind.PSI_CARDINALITY:
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
        if session.plan.recipient is not None:
            # This node keeps which of its own keys matched; the analyst learns how many.
            matched = sorted(keys[i].decode() for i in positions)
            self._store.save_matches(query_id, matched)
            self._released(
                session, query_id, self.name, digest("\n".join(matched).encode()), len(matched)
            )
            return Release(matched=len(matched))
        rule = session.plan.mask
        if rule is None:  # parse_plan requires it for membership
            raise PolicyRefused(MASK_RULE, f"{own.column} has no masking rule")
        records = sorted(apply_mask(rule, keys[i].decode()) for i in positions)
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
        inbox = session.inboxes[phase]
        if not inbox.done.wait(self._timeout):
            raise Aborted(
                f"{self.name}: node {session.peer.node} did not send its set within "
                f"{self._timeout:g} s; query aborted, nothing released"
            )
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
             "request_digest": session.request_digest, "participants": list(session.plan.nodes)},
            actor=self.name, query_id=query_id,
        )  # fmt: skip

    def receive(self, caller: Caller, chunks: Iterator[tuple[str, str, int, bytes]]) -> int:
        """Take a peer's set: ``(query_id, phase, total, packed points)`` chunks."""
        received = 0
        inbox: _Inbox | None = None
        for query_id, phase, total, packed in chunks:
            if inbox is None:
                session = self._session(query_id)
                if caller.name != session.peer.node:
                    raise PermissionDenied(f"{caller.name} is not the peer of query {query_id}")
                if phase not in session.inboxes:
                    raise MalformedInput(f"field 'phase': {phase!r} is unknown", field="phase")
                inbox = session.inboxes[phase]
                if inbox.done.is_set() or inbox.total != -1:
                    raise MalformedInput(
                        f"set {phase!r} of query {query_id} was already sent", field="phase"
                    )
                if total < 0:
                    raise MalformedInput("field 'total' must not be negative", field="total")
                inbox.total = total
            elif total != inbox.total:
                raise MalformedInput("field 'total' changed between chunks", field="total")
            points = ecdh_psi.decode_points(packed)
            received += len(points)
            if received > inbox.total:
                raise MalformedInput("more points than the announced total", field="points")
            inbox.points.extend(points)
        if inbox is None:
            raise MalformedInput("empty stream: no chunk carried a query id", field="query_id")
        if received != inbox.total:
            raise MalformedInput(
                f"stream ended after {received} of {inbox.total} points", field="points"
            )
        inbox.done.set()
        return received

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
        checkpoint = self._log.latest_checkpoint()
        if checkpoint is None or checkpoint.size <= entry.index:
            checkpoint = self._publisher.publish()
        proof = self._log.inclusion_proof(entry.index, checkpoint.size)
        return entry.index, entry.data, proof, checkpoint.note
