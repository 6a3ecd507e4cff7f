"""The PSI kinds: cardinality (PSI-CA) and membership, on ECDH-PSI (``protocols.ecdh_psi``).

Admission, decisions, running and settling are the engine's (``govshare.node.queries.engine``);
this module is what the PSI kinds add: their plan and access request, their protocol part and
their release. Flow for one query (two nodes L and R, analyst C), once both nodes approved:

Each node reads its filtered keys; an exact or record-level release first passes the
filtered-set floor and an exact one the tracker check (:meth:`QueryEngine.check_exact`),
refusals that name the rule and k. Each node masks its own distinct, filtered keys with a fresh
scalar — for a noised count with the shared dummy keys L sends R first and its own private
dummies (DP PSI-CA) — sends them to the peer (``Peer.Deliver``), waits for the peer's set, and
then

- cardinality: masks the peer's set again, shuffles it, and streams it to C, who counts the
  matches (C learns ``|L ∩ R|`` plus the noise, and the sizes plus their dummies);
- membership: the receiving side (the plan's recipient node, else L) sends its set in its own
  order, the other side sends its set shuffled and returns the receiver's set masked again in
  order; the receiver finds which of its keys match. With a recipient node it keeps them
  (``govshare node results``) and C learns only how many; without, it releases them to C
  through the masking rule both nodes agree on — only where the record-level rules allow it
  (``unconditional`` sharing, a membership grant).

Membership may run on the RR22 engine instead (the signed plan's ``engine``; ``--engine rr22``):
the same admission, checks and storage or release, with the intersection computed by
SecretFlow's libpsi in a driver process whose port the nodes agree here (phase ``link``); a node
without the engine configured refuses the query at submission (FAILED_PRECONDITION, naming the
setting). See ``govshare.node.queries.engines.rr22``.

Who learns what, and under which assumptions: ``govshare.protocols.ecdh_psi`` (and, for RR22,
``govshare.node.queries.engines.rr22``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from fractions import Fraction

from govshare.model.digests import Digests, digests_for
from govshare.model.governance import QueryKind, Role
from govshare.model.identity import Roster
from govshare.model.query_plan import RR22, PsiPlan, Side, parse_plan
from govshare.node.api.auth import Caller
from govshare.node.audit.sink import AuditSink
from govshare.node.data.catalog import Catalogue
from govshare.node.data.masking import apply_mask, needs_key
from govshare.node.policy.decision import AccessRequest, Decision, Obligations
from govshare.node.queries.engine import Admission, QueryEngine
from govshare.node.queries.engines.rr22 import Rr22Engine, Rr22Run, not_configured
from govshare.node.queries.session import NO_GATE, Chunks, Mailbox, Send, Waiting
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.protocols import dp, ecdh_psi
from govshare.protocols.errors import Aborted, MalformedInput, PermissionDenied, PolicyRefused
from govshare.protocols.signed_request import SignedRequest

PSI_KINDS = (QueryKind.PSI_CARDINALITY, QueryKind.PSI_MEMBERSHIP)
MASK_RULE = "column.mask"

OWN = "own"
RETURNED = "returned"
# DP PSI-CA: the left node's shared dummy keys, sent to the right node before the sets.
DUMMIES = "dummies"
# RR22: each node's link offer (port and token) for its engine's driver, one item.
LINK = "link"
# RR22: this node's driver finished (one item); each node's driver leaves only once both have.
FINISHED = "finished"
# RR22: this node's own driver's news (never a peer's message); the query's end wakes it too.
ENGINE = "engine"
# The refusal (policy.decision, then FAILED_PRECONDITION) of an engine this node does not offer.
ENGINE_RULE = "engine.rr22"
MAX_OFFER = 256  # bytes of a link offer (JSON of a port and a 32-hex-digit token)


def _no_mask_key(dataset: str, column: str) -> bytes:
    raise TypeError("this node was built without a masking secret: hash_prefix cannot release")


@dataclass
class Session:
    plan: PsiPlan
    own: Side
    peer: Side
    party: ecdh_psi.PsiParty
    obligations: Obligations
    request_digest: str
    mailbox: Mailbox = field(
        default_factory=lambda: Mailbox((OWN, RETURNED, DUMMIES, LINK, FINISHED, ENGINE))
    )

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


class PsiKind:
    """The PSI kinds' handler, registered with the engine for :data:`PSI_KINDS`."""

    def __init__(
        self,
        *,
        queries: QueryEngine,
        roster: Callable[[], Roster],
        catalogue: Catalogue,
        store: QueryStore,
        audit: AuditSink,
        send: Send,
        executor: Callable[[], Executor | None] = lambda: None,
        protocol_timeout: float,
        mask_key: Callable[[str, str], bytes] | None = None,
        waiting: Waiting = NO_GATE,
        rr22: Rr22Engine | None = None,
    ) -> None:
        self._queries = queries
        self._roster = roster
        self._catalogue = catalogue
        self._store = store
        self._audit = audit
        self._send = send
        self._executor = executor
        self._timeout = protocol_timeout
        self._mask_key = mask_key or _no_mask_key
        self._waiting = waiting
        # The RR22 engine, where the node's [engines] table configures one.
        self.rr22 = rr22
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        queries.register(PSI_KINDS, self)

    @property
    def _digests(self) -> Digests:
        """The federation's suite's digests: what the peer logs for the same messages."""
        return digests_for(self._roster().crypto)

    @property
    def name(self) -> str:
        return self._queries.name

    # --- admission --------------------------------------------------------------------------

    def submit(self, caller: Caller, request: SignedRequest, admission: Admission) -> QueryRecord:
        plan = parse_plan(request.body_json(), kind=request.kind)
        own, peer = plan.side_of(self.name)
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
        without_engine = plan.engine == RR22 and self.rr22 is None

        def check() -> Decision | None:
            if without_engine:
                return Decision(False, ENGINE_RULE, str(not_configured(self.name)))
            if membership and plan.recipient is None:
                return self._release_mask_refusal(plan, own)
            return None

        try:
            record, obligations = self._queries.admit(
                caller,
                admission,
                access=access,
                dataset=own.dataset,
                participants=plan.nodes,
                check=check,
            )
        except PolicyRefused as exc:
            if exc.rule == ENGINE_RULE:  # stored and logged as refused; a precondition
                raise not_configured(self.name) from None
            raise
        with self._lock:
            self._sessions[admission.query_id] = Session(
                plan=plan,
                own=own,
                peer=peer,
                party=ecdh_psi.PsiParty.fresh(request.query_id),
                obligations=obligations,
                request_digest=admission.request_digest,
            )
        return record

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

    # --- the protocol -----------------------------------------------------------------------

    def holds(self, query_id: str) -> bool:
        with self._lock:
            return query_id in self._sessions

    def _session(self, query_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(query_id)
        if session is None:
            raise self._queries.not_open(query_id)
        return session

    def run(self, caller: Caller, query_id: str) -> Release:
        """Run this node's part of an approved PSI; return what goes to the analyst."""
        return self._queries.execute(
            caller,
            query_id,
            lambda record: self._run(self._session(query_id), query_id, record),
            close=self.forget,
        )

    def forget(self, query_id: str) -> None:
        with self._lock:
            self._sessions.pop(query_id, None)

    def _run(self, session: Session, query_id: str, record: QueryRecord) -> Release:
        if session.plan.engine == RR22:
            return self._run_rr22(session, query_id, record)
        own, plan = session.own, session.plan
        keys = self._checked_keys(session, query_id, record)
        executor = session.mailbox.pool(self._executor(), self.name)
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
            self._released(
                session, query_id, record.analyst, self._digests.points_digest(out), len(out)
            )
            return Release(points=out)
        if not session.releasing:
            # Return the releasing side's set, masked again, in its order.
            self._send_step(session, query_id, RETURNED, again)
            self._released(
                session, query_id, session.peer.node, self._digests.points_digest(again), 0
            )
            return Release()
        returned = self._wait(session, query_id, RETURNED)
        if len(returned) != len(keys):
            raise MalformedInput("peer returned a set of the wrong size", field="points")
        positions = ecdh_psi.matching_positions(returned, again)
        return self._membership(session, query_id, record, keys, positions)

    def _checked_keys(
        self, session: Session, query_id: str, record: QueryRecord, *, import_order: bool = False
    ) -> list[bytes]:
        """This node's distinct filtered keys (sorted, or in ``import_order``), once the
        filtered-set floor and (for an exact release) the tracker check pass; each step ends
        the part if it ended meanwhile (the analyst withdrew it, the node is stopping)."""
        own, queries, mailbox = session.own, self._queries, session.mailbox
        own_keys = self._catalogue.keys(
            own.dataset, own.column, where=own.where, import_order=import_order,
            stop=lambda: mailbox.check(self.name),
        )  # fmt: skip
        mailbox.check(self.name)
        keys = [k.encode() for k in own_keys]
        queries.check_set_size(query_id, own.dataset, len(keys), session.obligations.min_set_size)
        if session.obligations.exact:
            queries.check_exact(
                query_id, record.analyst, own.dataset, own.where,
                session.obligations.min_group_size, keys=keys,
                stop=lambda: mailbox.check(self.name),
            )  # fmt: skip
            mailbox.check(self.name)
        return keys

    def _membership(
        self,
        session: Session,
        query_id: str,
        record: QueryRecord,
        keys: Sequence[bytes],
        positions: Sequence[int],
    ) -> Release:
        """The receiver's result, whichever engine found ``positions`` (of ``keys``) matching:
        kept by this node, or released to the analyst through the plan's mask."""
        own, plan = session.own, session.plan
        if plan.recipient is not None:
            # This node keeps which of its own keys matched; the analyst learns how many,
            # noised unless the release is exact.
            matched = sorted(keys[i].decode() for i in positions)
            self._store.save_matches(query_id, matched)
            self._released(
                session,
                query_id,
                self.name,
                self._digests.digest("\n".join(matched).encode()),
                len(matched),
            )
            count = len(matched)
            if plan.epsilon is not None:
                count += dp.discrete_laplace(dp.laplace_scale(epsilon=plan.epsilon, sensitivity=1))
            return Release(matched=count)
        rule = plan.mask
        if rule is None:  # parse_plan requires it for membership
            raise PolicyRefused(MASK_RULE, f"{own.column} has no masking rule")
        mask_key = self._mask_key(own.dataset, own.column) if needs_key(rule) else None
        records = sorted(
            apply_mask(rule, keys[i].decode(), key=mask_key, suite=self._roster().crypto)
            for i in positions
        )
        self._released(
            session,
            query_id,
            record.analyst,
            self._digests.digest("\n".join(records).encode()),
            len(records),
        )
        return Release(records=records)

    def _run_rr22(self, session: Session, query_id: str, record: QueryRecord) -> Release:
        """This node's part on the RR22 engine. The driver starts (and links) while the node
        reads and checks its keys; it gets them once the checks passed."""
        engine = self.rr22
        if engine is None:  # submit refused it; a node reconfigured since refuses here
            raise Aborted(str(not_configured(self.name)))
        peer = session.peer.node
        put_in: list[str] = []
        keys: list[bytes] = []

        def prepare() -> list[bytes]:
            # In import order: reproducible from the data (the engine's input digest is an
            # auditor's to re-derive) without sorting a million keys; matches are sorted kept.
            keys.extend(self._checked_keys(session, query_id, record, import_order=True))
            return keys

        def exchange(offer: bytes) -> bytes:
            return self._one_item(session, query_id, LINK, offer, "link offer")

        def finish() -> None:
            self._one_item(session, query_id, FINISHED, b"finished", "engine's end")

        def step(word: str, data: bytes, size: int) -> None:
            step_digest = self._digests.digest(data)
            if word == "input":
                put_in.append(step_digest)
            self._step(query_id, peer, "engine", f"rr22.{word}", step_digest, size)

        positions = engine.run(
            Rr22Run(
                query_id=query_id,
                prepare=prepare,
                receiver=session.releasing,
                peer=peer,
                peer_host=self._roster().member(peer).address.rsplit(":", 1)[0].strip("[]"),
                exchange=exchange,
                wake=session.mailbox.inboxes[ENGINE].done,
                ended=lambda: session.mailbox.ended,
                step=step,
                finish=finish,
                end=session.mailbox.end,
                suite=self._roster().crypto,
            )
        )
        if not session.releasing:
            self._released(
                session, query_id, peer, put_in[0] if put_in else self._digests.digest(b""), 0
            )
            return Release()
        return self._membership(session, query_id, record, keys, positions)

    def _one_item(
        self, session: Session, query_id: str, phase: str, item: bytes, what: str
    ) -> bytes:
        """Send the peer one item for ``phase`` and return the peer's, each logged."""
        peer = session.peer.node
        self._send(peer, query_id, phase, (), [item])
        self._step(query_id, peer, "sent", phase, self._digests.digest(item), 1)
        inbox = session.mailbox.wait(
            phase, node=self.name, peer=peer, what=what, timeout=self._timeout,
            waiting=self._waiting,
        )  # fmt: skip
        if len(inbox.items) != 1:
            raise MalformedInput(f"the peer's {what} is one item", field="items")
        self._step(query_id, peer, "received", phase, self._digests.digest(inbox.items[0]), 1)
        return inbox.items[0]

    def _step(
        self, query_id: str, peer: str, direction: str, phase: str, step_digest: str, size: int
    ) -> None:
        self._audit.record(
            "protocol.step",
            {"peer": peer, "direction": direction, "phase": phase, "digest": step_digest,
             "size": size},
            actor=self.name, query_id=query_id,
        )  # fmt: skip

    def _send_step(
        self, session: Session, query_id: str, phase: str, points: Sequence[bytes]
    ) -> None:
        self._send(session.peer.node, query_id, phase, points, ())
        self._step(
            query_id,
            session.peer.node,
            "sent",
            phase,
            self._digests.points_digest(points),
            len(points),
        )

    def _wait(self, session: Session, query_id: str, phase: str) -> list[bytes]:
        inbox = session.mailbox.wait(
            phase, node=self.name, peer=session.peer.node, what="set", timeout=self._timeout,
            waiting=self._waiting,
        )  # fmt: skip
        received = self._digests.points_digest(inbox.points)
        self._step(
            query_id, session.peer.node, "received", phase, received, len(inbox.points)
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

    # --- peer messages ----------------------------------------------------------------------

    def receive(self, caller: Caller, query_id: str, phase: str, chunks: Chunks) -> int:
        """Take a peer's set for ``phase``: chunks of packed points, in order, no items.

        A refused set leaves nothing behind: the peer may send it again."""
        session = self._session(query_id)
        if caller.name != session.peer.node:
            raise PermissionDenied(f"{caller.name} is not the peer of query {query_id}")
        inbox = session.mailbox.inboxes.get(phase) if phase != ENGINE else None
        if inbox is None:
            raise MalformedInput(f"field 'phase': {phase!r} is unknown", field="phase")
        first = next(chunks, None)
        if first is None:
            raise MalformedInput("empty message: no chunk", field="chunk")

        def decoded() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
            for chunk in itertools.chain([first], chunks):
                yield _one(chunk) if phase in (LINK, FINISHED) else _points(chunk)

        return inbox.fill(first[0], decoded())

    def abort(self, caller: Caller, query_id: str) -> None:
        """The peer says the query failed on its side: stop waiting for it at once."""
        session = self._session(query_id)
        if caller.name != session.peer.node:
            raise PermissionDenied(f"{caller.name} is not the peer of query {query_id}")
        session.mailbox.end(f"node {caller.name} ended the query")

    def interrupt(self, query_id: str, reason: str) -> None:
        with self._lock:
            session = self._sessions.get(query_id)
        if session is not None:
            session.mailbox.end(reason)


def _one(chunk: tuple[int, bytes, list[bytes]]) -> tuple[int, list[bytes], list[bytes]]:
    total, packed, items = chunk
    if packed or total != 1 or len(items) != 1 or len(items[0]) > MAX_OFFER:
        raise MalformedInput("an engine's message is one short item, no points", field="items")
    return total, [], items


def _points(chunk: tuple[int, bytes, list[bytes]]) -> tuple[int, list[bytes], list[bytes]]:
    total, packed, items = chunk
    if items:
        raise MalformedInput("a PSI set carries points only", field="items")
    return total, ecdh_psi.decode_points(packed), []
