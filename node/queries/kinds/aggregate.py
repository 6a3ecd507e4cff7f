"""The node's side of joint aggregates under homomorphic encryption (DESIGN.md protocols 2-4).

Admission is every kind's (``govshare.node.queries.engine``): the analyst's signed plan
(``govshare.model.aggregate_plan``) arrives by ``Query.Submit``; the query engine checks the
signature, validity window and nonce, logs it, and hands it to :meth:`AggregateEngine.submit`,
which parses the plan and decides it by policy on this node's dataset (column uses, grants,
grade floors, ε budget) through :meth:`QueryEngine.admit`. Status and receipts are
``Query.Status`` / ``Query.Receipt``. The ε of the query and one query of its grant are
reserved at admission (``QueryStore.admit``), spent when the node's part releases, returned
when it released nothing. An exact aggregate (``"exact": true``, no GROUP BY) waits for every
operator's approval and passes the tracker check on the filtered set before anything is
computed (``QueryEngine.check_exact``).

**Intersection aggregate** (protocol 2; the shape of Private Join and Compute, the analyst holds
the Paillier key). The value holder V and the matcher M each draw a fresh X25519 scalar.

1. M masks its distinct filtered keys once and sends them to V (``matcher_keys``).
2. V combines its filtered rows per join key (at most ``MAX_ROWS_PER_KEY``), packs each key's
   one-hot (group x figure) values into plaintexts (``IntersectionPlan.layouts``) and shuffles
   the keys. V masks M's keys again and returns them shuffled (``matcher_again``).
3. V then **streams** the shuffled (masked key, ciphertexts) pairs to M in batches
   (``values:<i>:<n>``, batch ``i`` of ``n``): each pool job masks one batch's keys once and
   encrypts their values, so M's first batch never waits for all keys; the pool works up to
   ``stream_window`` batches ahead while the batch before them is on the wire, and no more
   than that window is ever encrypted and not yet taken by M (:class:`StreamStats` counts it).
   M keeps a queue of at most the same window; a full queue holds V's ``Peer.Deliver`` until M
   has summed a batch, which is the back-pressure. M masks each batch's keys again, keeps the
   pairs whose doubly masked key is among its own and multiplies their ciphertexts into one
   running sum per plaintext; the batch is then dropped. Neither side ever holds the list of
   all ciphertexts. After the last batch M adds its encrypted DP noise (M is the designated
   noise node), re-randomises, and releases the result ciphertexts to the analyst.

Deadlines follow progress: every wait (a whole message, or the next batch of the stream) has
the protocol timeout on its own, and every send its own RPC deadline, so a long run that keeps
moving never needs the timeout raised; a peer that falls silent mid-stream for longer than the
timeout aborts the query. One ``protocol.step`` is logged per direction for the whole stream:
its digest chains the batches' message digests (SHA-256 over each batch's
``message_digest``, in order), its size the number of pairs.

Under the plan's ``scheme`` ``bfv-simd`` (``govshare.protocols.bfv_simd``) the same rounds carry
BFV ciphertexts instead: a batch holds whole ciphertexts of ``N / block`` keys (one per CRT
plaintext modulus; about ``simd_stream_batch_keys`` keys a batch), M multiplies each by the
selection mask of its matched positions and keeps one running sum per modulus; after the
stream it folds the slots under the analyst's Galois
keys, adds its DP noise to every block, re-randomises and floods the noise. The analyst's
public and Galois keys come with ``Aggregate.Run`` and must hash to the plan's ``public_key``;
M loads every ciphertext into contexts it builds itself, so keys or ciphertexts for other
parameters are refused as they arrive.

That is the shape with M's groups. Every other ``bfv-simd`` plan (``plan.sums_at_values``)
keeps V's values at V: V's batches carry its masked keys alone (``simd_stream_batch_keys``
keys, no ciphertexts; M refuses a batch that carries any), M encrypts its selection bits in
V's shuffled order as each ciphertext's worth is known and sends them as one ``selection``
message after the stream (V refuses, chunk by chunk, a ciphertext that does not load as a
fresh one under the query's parameters, and the query when the count is wrong); V multiplies
them by its values, folds, adds the DP noise (V is then the noise node), re-randomises,
floods and releases the result to the analyst (``plan.releasing``). M's ``result.released``
names V as the recipient of its selection.

**Groups on the matcher's side** (``group_by.side`` ``matcher``, at most
``MAX_MATCHER_GROUPS``): V packs each key's figures without groups; M reads (key, label) rows,
refuses a key carrying two labels of the domain, and masks every key under its common scalar
and each group's keys once more under a fresh scalar of the group's, sending all 2|M| points
as one shuffled set (V masks them all again). For each batch M masks V's points again under
the common scalar, which tells the matches as without groups, and only the matched points
under each group's scalar in turn until one lands in its set: that is the position's group. M
keeps one running sum per group (Paillier: per group and plaintext; bfv-simd: per group and
modulus, each multiplied by the selection AND group mask) and releases them group by group,
each with its own DP noise. The price: M's keys masked twice on each side, and up to one more
masking per group for each *matched* key at M.

Leakage (semi-honest): M learns |V's keys| and |M ∩ V| (which of V's shuffled, masked pairs
match, not whose); V learns |M's keys|; the analyst learns the noisy figures. Neither node
decrypts anything. With M's groups, M also learns in which of its groups each matched position
falls, i.e. |M_g ∩ V| per group g — what G queries with a WHERE on M's group column would tell
it — and still not which of its keys matched (both of its sets come back shuffled); V learns
|M's keys in the groups| (half the points) and nothing of their groups (two points per key,
under scalars V cannot tell apart or link under DDH).

**Horizontal aggregate** (protocol 3). Each node draws an ephemeral X25519 key and signs it
(``Aggregate.Prepare``); the analyst hands every node all signed keys with ``Aggregate.Run``.
Each node checks every signature against the roster, computes its partial vector (count and
clipped sums per group) with one ``GROUP BY`` in its store, adds its noise share (the node
``dp.designated_node`` picks adds the whole noise, the others zeros), adds its pairwise masks
modulo 2^64, encrypts under the analyst's key (Paillier or BFV, as the plan says) and sends it
to the aggregator node, which adds all contributions and releases the sum to the analyst. The
masks cancel in the sum. Leakage: the aggregator learns the number of contributions and the
vector length; nothing else leaves a node unencrypted.

A node that does not deliver a message (or the next batch of a stream) within the protocol
timeout aborts the query: nothing is released, ``query.failed`` is logged, the analyst gets ABORTED.

Test-only switches (:class:`AggregateOptions`) — short Paillier keys, noise off, a seeded noise
source — are constructor arguments that only tests pass; no configuration file or request can
reach them.
"""

from __future__ import annotations

import array
import collections
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import closing
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Final, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from govshare.model.aggregate_plan import (
    AGGREGATE_KINDS,
    BFV,
    BFV_SIMD,
    MAX_ROWS_PER_KEY,
    PAILLIER,
    AggregatePlan,
    HorizontalPlan,
    IntersectionPlan,
    parse_aggregate_plan,
    slot_name,
)
from govshare.model.conditions import Condition
from govshare.model.digests import Digests, digests_for
from govshare.model.identity import Identity, Roster
from govshare.model.states import APPROVED
from govshare.node.api.auth import Caller
from govshare.node.audit.sink import AuditSink
from govshare.node.data.catalog import Catalogue, Stop
from govshare.node.policy.decision import AccessRequest, Obligations, dataset_epsilon_cap
from govshare.node.policy.grants import GrantStore
from govshare.node.queries.engine import Admission, QueryEngine
from govshare.node.queries.session import (
    NO_GATE,
    Chunks,
    EndingPool,
    Inbox,
    Mailbox,
    Send,
    Waiting,
)
from govshare.node.stores.query_store import QueryRecord, QueryStore
from govshare.protocols import bfv_simd, dp, ecdh_psi, masks
from govshare.protocols.bfv import BfvPublicContext
from govshare.protocols.errors import (
    Aborted,
    MalformedInput,
    PermissionDenied,
)
from govshare.protocols.paillier import DjnPublicKey, PackingLayout
from govshare.protocols.signed_request import SignedRequest

T = TypeVar("T")

MATCHER_KEYS: Final = "matcher_keys"
MATCHER_AGAIN: Final = "matcher_again"
VALUES: Final = "values"
SELECTION: Final = "selection"
CONTRIBUTION: Final = "contribution"
# Rows per encryption task sent to the process pool.
ENCRYPT_BATCH: Final = 2048
# Rows read between two looks at whether the query's part ended (the analyst withdrew it, the
# node is stopping): a stopping node waits for at most this many rows of a read.
ROWS_PER_CHECK: Final = 4096
# Fixed-base window of the encryption workers' tables for large inputs: at 3072 bits, 11 bits
# takes about 230 MiB and 2.7 s to build per worker (10 bits: 120 MiB, 1.5 s) and encrypts
# about 12% faster, which pays for the build from about 7,000 encryptions per worker on.
WIDE_WINDOW_BITS: Final = 11
WIDE_WINDOW_MIN_ROWS: Final = 32_768
# Join keys per streamed batch of the value holder's pairs: at 3072 bits about 0.75 MiB of
# ciphertexts a batch (one or two Peer.Deliver chunks), and 1.4 s of one worker's encryption.
STREAM_BATCH_KEYS: Final = 1024
# The same under bfv-simd, rounded to whole ciphertexts of keys: 4,096 keys are 16 BFV
# ciphertexts per modulus with the groups on the value holder's side (about 12 MiB at 2
# moduli) and 0.2 s of one worker's X25519. A quarter of the batches of 1,024 keys: a 200k run
# took 38.8 s instead of 44.8 s, the difference being per-batch work (pool jobs, RPCs, wakeups).
SIMD_STREAM_BATCH_KEYS: Final = 4096
# Positions (one ciphertext per modulus each) per batch of the matcher's selection under sums at
# the value holder, and per pool job of the value holder's products: 16 are 12 MiB at 2 moduli
# (4,096 keys a position: 64k keys) and 0.3 s of one worker at 16 groups; each job returns its
# partial sums (16 groups x 2 moduli: 12 MiB), so fewer, larger batches would cost less to
# merge but hold more of the selection at the value holder at once.
SELECTION_BATCH_POSITIONS: Final = 16
# Batches encrypted ahead and not yet taken by the matcher (and the matcher's queue length):
# one per pool worker busy encrypting plus one on the wire, with a spare, on 2 cores.
STREAM_WINDOW: Final = 4


@dataclass(frozen=True)
class AggregateOptions:
    """Switches for tests only; production nodes use the defaults (no config reads these).

    ``unsafe_allow_short_modulus`` accepts Paillier keys below 2048 bits;
    ``unsafe_without_noise`` adds zero noise (exact results) while the plan still asks for DP;
    ``noise_rng`` replaces the OS random source of the noise (seeded coverage tests).
    """

    unsafe_allow_short_modulus: bool = False
    unsafe_without_noise: bool = False
    noise_rng: random.Random | None = None
    stream_batch_keys: int = STREAM_BATCH_KEYS
    simd_stream_batch_keys: int = SIMD_STREAM_BATCH_KEYS
    stream_window: int = STREAM_WINDOW


@dataclass
class StreamStats:
    """What one streamed message did at this node (kept for the last few queries).

    ``batches`` sent or taken; ``peak_in_flight`` the most batches at once that were encrypted
    (or being encrypted) and not yet acknowledged by the matcher (value holder), or queued and
    not yet summed (matcher); ``window`` the bound both must keep.
    """

    window: int
    batches: int = 0
    peak_in_flight: int = 0


_STATS_KEPT: Final = 64


class _BatchStream:
    """A bounded queue of a peer's batches, in order: the matcher's of the value holder's
    ``values`` batches, or the value holder's of the matcher's ``selection`` batches.

    ``put`` (the Peer.Deliver thread) blocks while ``window`` batches wait; ``take`` (the
    query's thread) blocks until the next batch is in. Each wait has its own timeout.
    """

    def __init__(self, window: int, what: str = VALUES) -> None:
        self.window = window
        self.what = what
        self.stats = StreamStats(window)
        self._queue: collections.deque[tuple[list[bytes], list[Any], bytes]] = collections.deque()
        self._cond = threading.Condition()
        self._next_put = 0
        self._next_take = 0
        self._count = -1
        self.ended: str | None = None

    def end(self, reason: str) -> None:
        with self._cond:
            if self.ended is None:
                self.ended = reason
            self._queue.clear()
            self._cond.notify_all()

    def put(
        self,
        index: int,
        count: int,
        points: list[bytes],
        items: list[Any],
        batch_digest: bytes,
        timeout: float,
    ) -> None:
        with self._cond:
            if self.ended is not None:
                raise Aborted(f"the query ended: {self.ended}")
            if count < 1 or (self._count != -1 and count != self._count):
                raise MalformedInput("the batch count changed or is not positive", field="phase")
            if index != self._next_put or index >= count:
                raise MalformedInput(
                    f"batch {index} arrived, batch {self._next_put} was expected", field="phase"
                )
            if not self._cond.wait_for(
                lambda: self.ended is not None or len(self._queue) < self.window, timeout
            ):
                raise Aborted(f"the receiving node took no batch within {timeout:g} s")
            if self.ended is not None:
                raise Aborted(f"the query ended: {self.ended}")
            self._count = count
            self._queue.append((points, items, batch_digest))
            self._next_put += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self._queue))
            self._cond.notify_all()

    def take(
        self, *, node: str, peer: str, timeout: float, waiting: Waiting
    ) -> tuple[list[bytes], list[Any], bytes] | None:
        """The next batch ``(points, items, digest)``, or None after the last one.

        Raises:
            Aborted: the batch did not come within ``timeout``, or the query ended early.
        """
        with self._cond:
            if self._count != -1 and self._next_take >= self._count:
                return None
            with waiting():
                arrived = self._cond.wait_for(
                    lambda: self.ended is not None or bool(self._queue), timeout
                )
            if self.ended is not None:
                raise Aborted(f"{node}: {self.ended}; nothing released")
            if not arrived:
                raise Aborted(
                    f"{node}: node {peer} did not send {self.what} batch {self._next_take} within "
                    f"{timeout:g} s; query aborted, nothing released"
                )
            batch = self._queue.popleft()
            self._next_take += 1
            self.stats.batches = self._next_take
            self._cond.notify_all()
            return batch

    def drain(
        self, chain: Any, *, node: str, peer: str, timeout: Callable[[], float], waiting: Waiting
    ) -> Iterator[tuple[list[bytes], list[Any]]]:
        """Every batch ``(points, items)`` in order (:meth:`take`, each wait ``timeout()`` as it
        is then), each one's digest chained into ``chain`` (a hasher) as it is taken."""
        while True:
            batch = self.take(node=node, peer=peer, timeout=timeout(), waiting=waiting)
            if batch is None:
                return
            points, items, batch_digest = batch
            chain.update(batch_digest)
            yield points, items


@dataclass
class _Session:
    plan: AggregatePlan
    obligations: Obligations
    request_digest: str
    query_id: bytes
    dataset: str
    mailbox: Mailbox = field(default_factory=lambda: Mailbox(()))
    stream: _BatchStream | None = None
    simd: bfv_simd.SimdPublic | None = None
    ephemeral: X25519PrivateKey | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SignedKey:
    node: str
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class AggregateRelease:
    ciphertexts: list[bytes]
    min_group_size: int
    grant_id: str
    epsilon_spent: Fraction
    epsilon_remaining: Fraction
    # Decimal places of this node's summed columns kept at a scale (the analyst reads each SUM
    # in its declared unit).
    column_scales: dict[str, int] = field(default_factory=dict)


# Worker-process cache: one parsed key (and its fixed-base table) per key encoding and window.
_WORKER_KEYS: dict[tuple[bytes, int | None], DjnPublicKey] = {}


def _encrypt_task(
    key_bytes: bytes, unsafe: bool, window_bits: int | None, plaintexts: Sequence[int]
) -> bytes:
    """Encrypt ``plaintexts`` to concatenated ciphertext encodings (in a pool worker)."""
    key = _WORKER_KEYS.get((key_bytes, window_bits))
    if key is None:
        _WORKER_KEYS.clear()  # one query's key at a time: the table is large
        key = DjnPublicKey.from_bytes(
            key_bytes, window_bits=window_bits, unsafe_allow_short_modulus=unsafe
        )
        _WORKER_KEYS[(key_bytes, window_bits)] = key
        key.precompute()
    return key.encrypt_to_bytes(plaintexts)


class AggregateEngine:
    def __init__(
        self,
        *,
        queries: QueryEngine,
        identity: Identity,
        roster: Callable[[], Roster] | None = None,
        catalogue: Catalogue,
        grants: GrantStore,
        store: QueryStore,
        audit: AuditSink,
        send: Send,
        clock: Callable[[], float] = time.time,
        executor: Callable[[], Executor | None] = lambda: None,
        protocol_timeout: float = 300.0,
        options: AggregateOptions | None = None,
        waiting: Waiting = NO_GATE,
    ) -> None:
        self._queries = queries
        self._identity = identity
        self._roster = roster or (lambda: identity.roster)
        self._catalogue = catalogue
        self._grants = grants
        self._store = store
        self._audit = audit
        self._send = send
        self._clock = clock
        self._executor = executor
        self._timeout = protocol_timeout
        self._options = options or AggregateOptions()
        self._waiting = waiting
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.streams: dict[str, StreamStats] = {}
        """Per query id, what its stream did here (the last few queries; read by tests)."""
        queries.register(AGGREGATE_KINDS, self)

    @property
    def name(self) -> str:
        return self._identity.name

    @property
    def _digests(self) -> Digests:
        """The federation's suite's digests: what the peers log for the same messages."""
        return digests_for(self._roster().crypto)

    @property
    def protocol_timeout(self) -> float:
        """Seconds any one wait may take: for a whole message, or for the stream's next batch.

        Read at the start of each wait, so a change applies to the waits that follow it.
        """
        return self._timeout

    @protocol_timeout.setter
    def protocol_timeout(self, seconds: float) -> None:
        self._timeout = seconds

    def _paillier_key(self, data: bytes) -> DjnPublicKey:
        return DjnPublicKey.from_bytes(
            data, unsafe_allow_short_modulus=self._options.unsafe_allow_short_modulus
        )

    # --- admission (called by QueryEngine.submit) ----------------------------------------------

    def submit(self, caller: Caller, request: SignedRequest, admission: Admission) -> QueryRecord:
        plan = parse_aggregate_plan(request.body_json(), kind=request.kind)
        dataset, uses, _ = plan.accesses(self.name)
        if plan.scheme == PAILLIER:
            key = self._paillier_key(plan.public_key)  # refuse a bad key before anything runs
            plan.layouts(key.n_bits)
        elif isinstance(plan, IntersectionPlan):
            plan.simd_shape()  # refuse a plan beyond the scheme's bounds before anything runs
        epsilon = plan.figures.epsilon
        access = AccessRequest(
            requester=caller.name,
            role=caller.role,
            jurisdiction=caller.jurisdiction,
            query_kind=plan.kind,
            columns=uses,
            purpose=plan.purpose,
            dp_noise=epsilon is not None,
            epsilon=epsilon or Fraction(0),
            exact=plan.figures.exact,
            group_by=plan.figures.group_by is not None,
        )
        record, obligations = self._queries.admit(
            caller, admission, access=access, dataset=dataset, participants=plan.nodes
        )
        session = _Session(plan, obligations, admission.request_digest, request.query_id, dataset)
        if isinstance(plan, IntersectionPlan):
            phases = [MATCHER_KEYS] if self.name == plan.values.node else [MATCHER_AGAIN]
            if self.name != plan.values.node:
                session.stream = _BatchStream(self._options.stream_window)
            elif plan.sums_at_values:
                session.stream = _BatchStream(self._options.stream_window, SELECTION)
        else:
            phases = (
                [f"{CONTRIBUTION}:{n}" for n in plan.nodes if n != self.name]
                if self.name == plan.aggregator
                else []
            )
        session.mailbox = Mailbox(phases)
        with self._lock:
            self._sessions[admission.query_id] = session
        return record

    def _session(self, query_id: str) -> _Session:
        with self._lock:
            session = self._sessions.get(query_id)
        if session is None:
            raise self._queries.not_open(query_id)
        return session

    # --- horizontal: ephemeral keys ------------------------------------------------------------

    def prepare(self, caller: Caller, query_id: str) -> SignedKey:
        """Draw and sign this node's ephemeral masking key for an approved horizontal query."""
        record = self._queries.status(caller, query_id)
        if record.state != APPROVED:
            raise Aborted(f"query {query_id} is {record.state} on {self.name}, not approved")
        session = self._session(query_id)
        if not isinstance(session.plan, HorizontalPlan):
            raise MalformedInput("only a horizontal aggregate uses masking keys", field="query_id")
        with session.lock:
            if session.ephemeral is None:
                session.ephemeral = masks.generate_ephemeral()
            public = masks.public_bytes(session.ephemeral)
        signature = masks.sign_ephemeral(
            self._identity.signing_key, query_id=session.query_id, node=self.name, public_key=public
        )
        self._step(
            session, query_id, caller.name, "sent", "ephemeral_key", self._digests.digest(public), 1
        )
        return SignedKey(self.name, public, signature)

    # --- the protocol ---------------------------------------------------------------------------

    def run(
        self,
        caller: Caller,
        query_id: str,
        *,
        keys: Sequence[SignedKey] = (),
        public_context: bytes = b"",
    ) -> AggregateRelease:
        """Run this node's part of an approved aggregate; return what goes to the analyst."""

        def body(record: QueryRecord) -> AggregateRelease:
            session = self._session(query_id)
            plan = session.plan
            if isinstance(plan, IntersectionPlan):
                if self.name == plan.values.node:
                    out = self._run_values(session, query_id, record.analyst, plan, public_context)
                else:
                    out = self._run_matcher(session, query_id, record.analyst, plan, public_context)
            else:
                out = self._run_horizontal(
                    session, query_id, record.analyst, plan, keys, public_context
                )
            return AggregateRelease(
                out,
                session.obligations.min_group_size,
                record.grant_id,
                record.epsilon,
                self._remaining(record),
                self._sum_scales(plan),
            )

        return self._queries.execute(caller, query_id, body, close=self._close)

    def _sum_scales(self, plan: AggregatePlan) -> dict[str, int]:
        """Decimal places of the SUM columns this node holds, where kept at a scale."""
        if isinstance(plan, IntersectionPlan):
            datasets = [plan.values.dataset] if self.name == plan.values.node else []
        else:
            datasets = [p.dataset for p in plan.parts if p.node == self.name]
        summed = {s.column for s in plan.figures.sums}
        scales: dict[str, int] = {}
        for dataset in datasets:
            formats = self._catalogue.record(dataset).formats
            scales.update(
                (c, f.scale) for c, f in formats.items() if c in summed and f.scale
            )  # fmt: skip
        return scales

    def _remaining(self, record: QueryRecord) -> Fraction:
        """ε left to the analyst on the dataset: under the grant's cap and the ledger's."""
        grant = self._grants.get(record.grant_id)
        used = self._store.usage(record.analyst).get(record.grant_id)
        grants = self._grants.list(dataset=record.dataset)
        cap = dataset_epsilon_cap(
            grants, requester=record.analyst, dataset=record.dataset, now=int(self._clock())
        )
        left = min(
            grant.epsilon - (used.epsilon_used if used else Fraction(0)),
            cap - self._store.budget(record.analyst, record.dataset).used,
        )
        return max(left, Fraction(0))

    def _close(self, query_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(query_id, None)
        if session is not None:  # wakes a wait left by a failure, and frees its queues
            _end(session, "the query's part ended")

    def _keep_stats(self, query_id: str, stats: StreamStats) -> None:
        with self._lock:
            self.streams[query_id] = stats
            while len(self.streams) > _STATS_KEPT:
                del self.streams[next(iter(self.streams))]

    def forget(self, query_id: str) -> None:
        """Drop a withdrawn query's protocol state."""
        self._close(query_id)

    def abort(self, caller: Caller, query_id: str) -> None:
        """Another participant's part failed: stop waiting for messages at once."""
        with self._lock:
            session = self._sessions.get(query_id)
        if session is None:
            return
        if caller.name not in session.plan.nodes or caller.name == self.name:
            raise PermissionDenied(f"{caller.name} does not take part in query {query_id}")
        _end(session, f"node {caller.name} ended the query")

    def interrupt(self, query_id: str, reason: str) -> None:
        """End a running query's part here: its waits raise Aborted with ``reason``."""
        with self._lock:
            session = self._sessions.get(query_id)
        if session is not None:
            _end(session, reason)

    # -- intersection: value holder

    def _run_values(
        self,
        session: _Session,
        query_id: str,
        analyst: str,
        plan: IntersectionPlan,
        public_context: bytes,
    ) -> list[bytes]:
        side, figures = plan.values, plan.figures
        simd = plan.scheme == BFV_SIMD
        key = None if simd else self._paillier_key(plan.public_key)
        layouts = () if key is None else plan.layouts(key.n_bits)
        if simd:
            shape = plan.simd_shape()
            _check_bundle(plan, public_context, self._digests)
            if plan.sums_at_values:  # before M's keys are answered: its selection follows
                session.simd = bfv_simd.SimdPublic.from_bundle(shape, public_context)
        group = None if plan.groups_on_matcher else figures.group_by  # M's groups: M sums them
        columns = [
            side.column,
            *([group.column] if group else []),
            *(s.column for s in figures.sums),
        ]
        domain = group.domain if group else ("",)
        table = _KeyValues(len(domain), len(figures.names))
        executor = session.mailbox.pool(self._executor(), self.name)
        stop = _stop(session.mailbox, self.name)
        # Let the pool's workers build their fixed-base tables while the rows are read.
        window = (
            None
            if key is None
            else self._warm_encryptors(
                key,
                len(layouts) * self._catalogue.count(side.dataset, where=side.where, stop=stop),
                executor,
            )
        )
        # A fresh scalar for this query: the pool's jobs mask each batch's keys with it.
        scalar = ecdh_psi.generate_scalar()
        party = ecdh_psi.PsiParty(session.query_id, scalar)
        # V's answer to M's keys needs V's scalar, not its rows: it is taken beside the read
        # (this thread reads, the pool masks), so that the stream starts once the rows are read.
        answer = _beside(
            f"govshare-{self.name}-answer",
            lambda: self._answer_keys(session, query_id, plan, party, executor),
        )
        numbers = {label: i for i, label in enumerate(domain)}
        bounds = [s.bound for s in figures.sums]
        # Closed however the read ends (a refusal below, the query's end): see _checked.
        with closing(
            self._catalogue.rows(side.dataset, columns, where=side.where, stop=stop)
        ) as rows:
            for chunk in _chunks(_checked(rows, session.mailbox, self.name), ROWS_PER_CHECK):
                cut: list[Sequence[Any]] = list(zip(*chunk, strict=True))
                groups: Sequence[int] = [0] * len(chunk)
                if group:  # labels outside the groups asked for go, like a WHERE on the label
                    found = [numbers.get(str(label)) for label in cut[1]]
                    kept = [i for i, g in enumerate(found) if g is not None]
                    if len(kept) < len(chunk):
                        cut = [[column[i] for i in kept] for column in cut]
                    groups = [g for g in found if g is not None]
                sums = [list(map(int, column)) for column in cut[2 if group else 1 :]]
                values = _figures(len(groups), sums, bounds)
                if not table.add_rows(list(map(str, cut[0])), groups, values):
                    raise MalformedInput(
                        f"more than {MAX_ROWS_PER_KEY} rows of {side.dataset} share one join key",
                        field="values",
                    )
        self._check_data(
            session, query_id, side.where, (k.encode() for k in table.keys), len(table.keys)
        )
        # Shuffle once; from here on everything is in the shuffled order M sees.
        order = table.shuffle()
        own_keys = [table.keys[k].encode() for k in order]
        by_place = table.by_place(order)
        del table
        names = [slot_name(g, f) for g, f in plan.value_cells]

        plaintexts: Callable[[int, int], Any]
        if simd:  # under M's groups: the figures of each key, summed

            def plaintexts(start: int, stop: int) -> Any:
                return by_place.cells(start, stop)

        else:

            def plaintexts(start: int, stop: int) -> Any:
                return [
                    tuple(layout.pack_named({s: v for s, v in cells.items() if s in layout.names})
                          for layout in layouts)
                    for cells in (
                        {n: v for n, v in zip(names, row, strict=True) if v}
                        for row in by_place.cells(start, stop).tolist()
                    )
                ]  # fmt: skip

        count = len(own_keys)
        batch = self._options.stream_batch_keys
        if simd:
            batch, per = self._options.simd_stream_batch_keys, shape.keys_per_ciphertext
            if not plan.sums_at_values:  # points alone otherwise: M gathers its selection
                batch = max(per, batch // per * per)  # whole ciphertexts of keys
        starts = range(0, max(count, 1), batch)  # one batch, if empty
        encryption: Callable[[int], tuple[Callable[..., Any], tuple[Any, ...]]]
        if plan.sums_at_values:

            def encryption(i: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
                return _no_values, ()  # the values stay here: M's selection comes to them

        elif simd:
            # The public keys alone go with each job: the Galois keys are most of the bundle.
            public_keys = bfv_simd.encryption_bundle(public_context, shape.moduli)

            def encryption(i: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
                return _simd_encrypt_task, (
                    plan.public_key,
                    public_keys,
                    shape,
                    plaintexts(i, i + batch),
                )

        elif key is not None:
            key_bytes, unsafe = key.to_bytes(), self._options.unsafe_allow_short_modulus

            def encryption(i: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
                flat = [p for row in plaintexts(i, i + batch) for p in row]
                return _encrypt_task, (key_bytes, unsafe, window, flat)

        else:  # pragma: no cover - a Paillier plan has its key
            raise TypeError("a Paillier plan without its key")
        # Each job masks its batch's keys and encrypts their values: the first batch is ready
        # after one job, not after all keys are masked (each of M's waits has its own timeout).
        jobs = (
            (_values_task, (scalar, session.query_id, own_keys[i : i + batch], *encryption(i)))
            for i in starts
        )
        stats = StreamStats(self._options.stream_window)
        self._keep_stats(query_id, stats)
        # M's keys are answered before the stream's first batch is made: M reads none before.
        answer.result()
        pending = self._encrypt_ahead(jobs, stats, executor)
        width = 0 if key is None else key.ciphertext_bytes * len(layouts)
        chain = self._digests.suite.new_hasher()
        for index, (packed, encrypted) in enumerate(pending):
            points = ecdh_psi.decode_points(packed) if packed else []
            if simd:
                items = list(encrypted)
            else:
                items = [encrypted[i * width : (i + 1) * width] for i in range(len(points))]
            self._send(
                plan.matcher.node, query_id, f"{VALUES}:{index}:{len(starts)}", points, items
            )
            stats.batches = index + 1
            chain.update(bytes.fromhex(self._digests.message_digest(points, items)))
        self._step(
            session, query_id, plan.matcher.node, "sent", VALUES, chain.digest().hex(), count
        )
        if not plan.sums_at_values:
            self._released(session, query_id, plan.matcher.node, chain.digest().hex(), count)
            return []
        del pending, own_keys
        out = self._sum_values(session, query_id, plan, public_context, by_place)
        return self._release(session, query_id, analyst, out)

    def _answer_keys(
        self,
        session: _Session,
        query_id: str,
        plan: IntersectionPlan,
        party: ecdh_psi.PsiParty,
        executor: EndingPool | None,
    ) -> None:
        """V's answer to M's masked keys: each masked again under V's scalar, shuffled."""
        theirs = self._wait(session, query_id, plan.matcher.node, MATCHER_KEYS)
        workers = None if executor is not None else 1
        again = ecdh_psi.shuffle(party.mask_peer(theirs.points, workers=workers, executor=executor))
        del theirs
        self._send_step(session, query_id, plan.matcher.node, MATCHER_AGAIN, again, [])

    def _sum_values(
        self,
        session: _Session,
        query_id: str,
        plan: IntersectionPlan,
        public_context: bytes,
        by_place: _ByPlace,
    ) -> list[bytes]:
        """Sums at the value holder: M's encrypted selection bits times V's values, per group of
        cells, folded, noised, re-randomised and flooded (``bfv_simd.SimdSum``; V adds the DP
        noise). ``by_place``: V's rows by their keys' places in the order M saw. M's selection
        comes in batches (``_BatchStream``: at most its window queued); each is one pool job, one
        job a core in flight, each returning its partial sums.

        Raises:
            MalformedInput: M's selection has the wrong number of ciphertexts (the ciphertexts
                themselves were checked as they arrived).
        """
        simd, stream = session.simd, session.stream
        if simd is None or stream is None:  # pragma: no cover - _run_values loads the keys
            raise TypeError("sums at the value holder without the analyst's keys")
        shape = simd.shape
        count, moduli, per = by_place.keys, shape.moduli, shape.keys_per_ciphertext
        expected = shape.ciphertexts_for(count)
        executor = session.mailbox.pool(self._executor(), self.name)
        public_keys = bfv_simd.encryption_bundle(public_context, moduli)
        cores = os.cpu_count() or 1
        total = simd.accumulator()
        window: collections.deque[Any] = collections.deque()  # a job a core in flight
        chain = self._digests.suite.new_hasher()
        taken = 0
        for _, items in stream.drain(
            chain, node=self.name, peer=plan.matcher.node, timeout=lambda: self._timeout,
            waiting=self._waiting,
        ):  # fmt: skip
            first, taken = taken, taken + len(items) // moduli
            if taken > expected:
                raise MalformedInput(
                    f"the matcher's selection has more than {expected * moduli} ciphertexts "
                    f"for {count} keys",
                    field="items",
                )
            args = (
                plan.public_key, public_keys, shape, first * per, items,
                by_place.between(first * per, taken * per),
            )  # fmt: skip
            if executor is None:
                total.merge(*_simd_values_task(*args))
                continue
            if len(window) >= cores:
                total.merge(*executor.result(window.popleft()))
            window.append(executor.submit(_simd_values_task, *args))
        while window and executor is not None:
            total.merge(*executor.result(window.popleft()))
        if taken != expected:
            raise MalformedInput(
                f"the matcher's selection has {taken * moduli} ciphertexts for {count} keys; "
                f"{expected * moduli} expected",
                field="items",
            )
        self._step(
            session, query_id, plan.matcher.node, "received", SELECTION, chain.digest().hex(),
            taken * moduli,
        )  # fmt: skip
        scales = plan.figures.noise_scales()
        noise = [self._noise(scales[f]) if scales else 0 for _, f in plan.value_cells]
        return total.result(noise + [0] * (shape.cells * shape.groups - len(noise)))

    def _encrypt_ahead(
        self,
        jobs: Iterator[tuple[Callable[..., Any], tuple[Any, ...]]],
        stats: StreamStats,
        executor: EndingPool | None,
    ) -> Iterator[Any]:
        """Each batch's ciphertexts, encrypted on the pool up to ``stats.window`` batches ahead.

        A batch counts as in flight from its submission until the consumer asks for the next
        one (by then it has been sent and acknowledged); the first window is submitted at once.
        The part's end cancels the batches not started and wakes the wait for the next one.
        """
        if executor is None:

            def inline() -> Iterator[Any]:
                for task, args in jobs:
                    stats.peak_in_flight = max(stats.peak_in_flight, 1)
                    yield task(*args)

            return inline()
        queue: collections.deque[Any] = collections.deque()

        def submit() -> bool:
            job = next(jobs, None)
            if job is None:
                return False
            queue.append(executor.submit(job[0], *job[1]))
            stats.peak_in_flight = max(stats.peak_in_flight, len(queue))
            return True

        while len(queue) < stats.window and submit():
            pass

        def results() -> Iterator[Any]:
            try:
                while queue:
                    encrypted = executor.result(queue[0])
                    yield encrypted
                    queue.popleft()  # sent and acknowledged: its place goes to the next batch
                    submit()
            finally:
                for future in queue:
                    future.cancel()

        return results()

    def _warm_encryptors(
        self, key: DjnPublicKey, expected: int, executor: EndingPool | None
    ) -> int | None:
        """Start the table builds in the pool for about ``expected`` encryptions; the window.
        (The part's end cancels the builds not started.)"""
        window = WIDE_WINDOW_BITS if expected >= WIDE_WINDOW_MIN_ROWS else None
        if executor is not None and expected > ENCRYPT_BATCH:
            key_bytes, unsafe = key.to_bytes(), self._options.unsafe_allow_short_modulus
            for _ in range(os.cpu_count() or 1):  # a worker that has the table returns at once
                executor.submit(_encrypt_task, key_bytes, unsafe, window, [])
        return window

    # -- intersection: matcher

    def _run_matcher(
        self,
        session: _Session,
        query_id: str,
        analyst: str,
        plan: IntersectionPlan,
        public_context: bytes,
    ) -> list[bytes]:
        side = plan.matcher
        simd = None
        if plan.scheme == BFV_SIMD:
            _check_bundle(plan, public_context, self._digests)
            simd = bfv_simd.SimdPublic.from_bundle(plan.simd_shape(), public_context)
            session.simd = simd  # before M's keys go out: V's batches come after them
        # Every key under one fresh scalar; with M's groups, each group's keys once more under a
        # fresh scalar of the group's.
        grouped = self._matcher_keys(session, plan)
        keys = [k for group in grouped for k in group]
        self._check_data(session, query_id, side.where, keys, len(keys))
        party = ecdh_psi.PsiParty.fresh(session.query_id)
        parties = (
            [ecdh_psi.PsiParty.fresh(session.query_id) for _ in grouped]
            if plan.groups_on_matcher
            else []
        )
        executor = session.mailbox.pool(self._executor(), self.name)
        workers = None if executor is not None else 1
        masked = party.mask_own(keys, workers=workers, executor=executor)
        for group_party, group in zip(parties, grouped if parties else [], strict=True):
            masked += group_party.mask_own(group, workers=workers, executor=executor)
        masked = ecdh_psi.shuffle(masked)  # one set, in an order that says nothing of the groups
        self._send_step(session, query_id, plan.values.node, MATCHER_KEYS, masked, [])
        del masked, grouped
        again = self._wait(session, query_id, plan.values.node, MATCHER_AGAIN)
        if len(again.points) != len(keys) * (1 + bool(parties)):
            raise MalformedInput(
                "the value holder returned a set of the wrong size", field="points"
            )
        own = set(again.points)
        if len(own) != len(again.points):
            raise MalformedInput("the returned set repeats a point", field="points")
        again.points.clear()
        stream = session.stream
        if stream is None:  # pragma: no cover - submit makes one for every matcher
            raise Aborted(f"{self.name}: query {query_id} has no value stream")
        chain = self._digests.suite.new_hasher()
        pairs = 0

        def matched(points: list[bytes]) -> list[int]:
            """Per point of V's, its group of M's if it matched (0 without M's groups), else
            ``UNSELECTED``."""
            doubled = party.mask_peer(points, workers=workers, executor=executor)
            found = [0 if p in own else bfv_simd.UNSELECTED for p in doubled]
            if parties:
                # A matched position's group: the one whose scalar lands it in M's set.
                left = [i for i, g in enumerate(found) if g == 0]
                found = [bfv_simd.UNSELECTED] * len(points)
                for g, group_party in enumerate(parties):
                    if not left:
                        break
                    doubled = group_party.mask_peer(
                        [points[i] for i in left], workers=workers, executor=executor
                    )
                    for i, point in zip(left, doubled, strict=True):
                        if point in own:
                            found[i] = g
                    left = [i for i in left if found[i] == bfv_simd.UNSELECTED]
            return found

        def batches() -> Iterator[tuple[list[int], list[Any]]]:
            nonlocal pairs
            for points, items in stream.drain(
                chain, node=self.name, peer=plan.values.node, timeout=lambda: self._timeout,
                waiting=self._waiting,
            ):  # fmt: skip
                pairs += len(points)
                yield matched(points), items

        if simd is None:
            out = self._sum_paillier(plan, batches())
        elif plan.sums_at_values:
            out = self._selection(simd, batches())
        else:
            out = self._sum_simd(plan, simd, batches())
        self._keep_stats(query_id, stream.stats)
        self._step(
            session, query_id, plan.values.node, "received", VALUES, chain.digest().hex(), pairs
        )
        if simd is not None and plan.sums_at_values:  # to V, which releases the sums
            digest = self._send_selection(session, query_id, plan, simd.shape.moduli, out)
            self._released(session, query_id, plan.values.node, digest, len(out))
            return []
        return self._release(session, query_id, analyst, out)

    def _matcher_keys(self, session: _Session, plan: IntersectionPlan) -> list[list[bytes]]:
        """M's distinct filtered keys: one list, or one per group of M's (in domain order).

        Raises:
            MalformedInput: with M's groups, a key whose rows carry two labels of the domain
                (the groups must not share a key: one row of V's would count in both).
        """
        side, group = plan.matcher, plan.figures.group_by
        if group is None or not plan.groups_on_matcher:
            keys = self._catalogue.keys(
                side.dataset, side.column, where=side.where, stop=_stop(session.mailbox, self.name)
            )
            session.mailbox.check(self.name)
            return [[k.encode() for k in keys]]
        index = {label: i for i, label in enumerate(group.domain)}
        labels: dict[str, int] = {}
        columns = [side.column, group.column]
        stop = _stop(session.mailbox, self.name)
        shared = MalformedInput(
            f"a join key of {side.dataset} has rows in two groups of {group.column}: the "
            "groups must not share a key",
            field="group_by",
        )
        with closing(
            self._catalogue.rows(side.dataset, columns, where=side.where, stop=stop)
        ) as rows:
            for chunk in _chunks(_checked(rows, session.mailbox, self.name), ROWS_PER_CHECK):
                # Labels outside the groups asked for go, like a WHERE on the label.
                pairs = [
                    (str(key), g)
                    for key, label in chunk
                    if (g := index.get(str(label))) is not None
                ]
                kept = dict(pairs)
                if len(kept) < len(pairs) and any(kept[k] != g for k, g in pairs):
                    raise shared  # a key of the chunk in two groups
                if any(labels[k] != kept[k] for k in labels.keys() & kept.keys()):
                    raise shared
                labels.update(kept)
        out: list[list[bytes]] = [[] for _ in group.domain]
        for key, g in labels.items():
            out[g].append(key.encode())
        return out

    def _sum_paillier(
        self, plan: IntersectionPlan, batches: Iterator[tuple[list[int], list[Any]]]
    ) -> list[bytes]:
        key = self._paillier_key(plan.public_key)
        layouts = plan.layouts(key.n_bits)
        width = key.ciphertext_bytes
        # Per group of M's (one without them), one running sum per plaintext, starting from
        # M's encrypted noise share.
        sums = [
            [key.encrypt(self._noise_plaintext(plan, layout)) for layout in layouts]
            for _ in plan.matcher_groups
        ]
        max_rows = min(layout.max_rows for layout in layouts)
        matched = 0
        for selected, items in batches:
            hits = [(i, g) for i, g in enumerate(selected) if g != bfv_simd.UNSELECTED]
            matched += len(hits)
            if matched > max_rows:
                raise MalformedInput(
                    f"more than {max_rows} matched rows: the slots could overflow", field="items"
                )
            for g, group_sums in enumerate(sums):
                for j in range(len(layouts)):
                    terms = [
                        key.ciphertext_from_bytes(items[i][j * width : (j + 1) * width])
                        for i, hit in hits
                        if hit == g
                    ]
                    if terms:
                        group_sums[j] = key.sum_ciphertexts([group_sums[j], *terms])
        return [
            key.ciphertext_to_bytes(key.rerandomize(total))
            for group_sums in sums
            for total in group_sums
        ]

    def _send_selection(
        self,
        session: _Session,
        query_id: str,
        plan: IntersectionPlan,
        moduli: int,
        ciphertexts: list[bytes],
    ) -> str:
        """Send M's selection to V in batches ``selection:<i>:<n>`` of
        :data:`SELECTION_BATCH_POSITIONS` positions (V sums each as it arrives); one step logged
        for the whole, its digest chaining the batches' (as for the values stream)."""
        size = SELECTION_BATCH_POSITIONS * moduli
        count = -(-len(ciphertexts) // size)
        chain = self._digests.suite.new_hasher()
        for index in range(count):
            batch = ciphertexts[index * size : (index + 1) * size]
            self._send(plan.values.node, query_id, f"{SELECTION}:{index}:{count}", [], batch)
            chain.update(bytes.fromhex(self._digests.message_digest([], batch)))
        digest = chain.digest().hex()
        self._step(session, query_id, plan.values.node, "sent", SELECTION, digest, len(ciphertexts))
        return digest

    def _selection(
        self, simd: bfv_simd.SimdPublic, batches: Iterator[tuple[list[int], list[Any]]]
    ) -> list[bytes]:
        """Sums at the value holder: M's selection bits in V's shuffled order, encrypted as
        each ciphertext's worth of keys is known (per ciphertext of keys, one per modulus)."""
        per = simd.shape.keys_per_ciphertext
        pending: list[bool] = []
        out: list[bytes] = []
        for selected, _ in batches:
            pending += [g != bfv_simd.UNSELECTED for g in selected]
            while len(pending) >= per:
                out += simd.encrypt_selection(pending[:per])
                del pending[:per]
        if pending or not out:
            out += simd.encrypt_selection(pending)
        return out

    def _sum_simd(
        self,
        plan: IntersectionPlan,
        simd: bfv_simd.SimdPublic,
        batches: Iterator[tuple[list[int], list[Any]]],
    ) -> list[bytes]:
        shape = simd.shape
        per, moduli = shape.keys_per_ciphertext, shape.moduli
        total = simd.accumulator()
        for selected, loaded in batches:
            for position in range(len(loaded) // moduli):
                total.add(
                    loaded[position * moduli : (position + 1) * moduli],
                    selected[position * per : (position + 1) * per],
                )
        scales = plan.figures.noise_scales()
        # Per group of M's, its cells (figures.cells is group-major either way).
        noise = [self._noise(scales[f]) if scales else 0 for _, f in plan.figures.cells]
        return total.result(noise)

    def _noise(self, scale: Fraction) -> int:
        if self._options.unsafe_without_noise:
            return 0
        return dp.discrete_laplace(scale, self._options.noise_rng)

    def _noise_plaintext(self, plan: IntersectionPlan, layout: PackingLayout) -> int:
        scales = plan.figures.noise_scales()
        if not scales:
            return 0
        return layout.pack_noise(
            [self._noise(scales[s.name.split("@", 1)[0]]) for s in layout.slots]
        )

    # -- horizontal

    def _run_horizontal(
        self,
        session: _Session,
        query_id: str,
        analyst: str,
        plan: HorizontalPlan,
        keys: Sequence[SignedKey],
        public_context: bytes,
    ) -> list[bytes]:
        if session.ephemeral is None:
            raise Aborted(f"{self.name}: no masking key was prepared for query {query_id}")
        by_node = {k.node: k for k in keys}
        if len(by_node) != len(keys) or set(by_node) != set(plan.nodes):
            raise MalformedInput("one signed key per participant is required", field="keys")
        roster = self._roster()
        for signed in keys:
            masks.verify_ephemeral(
                roster.member(signed.node).verify_key(),
                query_id=session.query_id,
                node=signed.node,
                public_key=signed.public_key,
                signature=signed.signature,
            )
        if by_node[self.name].public_key != masks.public_bytes(session.ephemeral):
            raise MalformedInput("the key listed for this node is not its own", field="keys")
        part, figures = plan.part(self.name), plan.figures
        group = figures.group_by
        partial = self._catalogue.group_sums(
            part.dataset,
            group_by=group.column if group else None,
            sums=[(s.column, s.bound) for s in figures.sums],
            where=part.where,
            stop=_stop(session.mailbox, self.name),
        )
        session.mailbox.check(self.name)
        self._check_data(session, query_id, part.where, (), sum(v[0] for v in partial.values()))
        zeros = (0,) * len(figures.names)
        values = [v for g in figures.groups for v in partial.get(g, zeros)]
        scales = figures.noise_scales()
        if scales and self.name == plan.designated:
            values = [
                v + self._noise(scales[f]) for v, (_, f) in zip(values, figures.cells, strict=True)
            ]
        peers = {n: k.public_key for n, k in by_node.items() if n != self.name}
        mask = masks.node_mask(
            session.ephemeral, query_id=session.query_id, own=self.name, peers=peers,
            length=len(values), suite=self._roster().crypto,
        )  # fmt: skip
        words = masks.mask_vector(values, mask)
        if plan.scheme == BFV:
            if self._digests.key_fingerprint(public_context) != plan.public_key:
                raise MalformedInput(
                    "the BFV context is not the one the signed plan names", field="public_context"
                )
            context = BfvPublicContext.from_bytes(public_context)
            mine = context.encrypt(words)
        else:
            key = self._paillier_key(plan.public_key)
            layouts = plan.layouts(key.n_bits)
            start, mine = 0, []
            for layout in layouts:
                chunk = words[start : start + len(layout.slots)]
                start += len(layout.slots)
                mine.append(key.ciphertext_to_bytes(key.encrypt(layout.pack(chunk))))
        if self.name != plan.aggregator:
            self._send_step(session, query_id, plan.aggregator, CONTRIBUTION, [], mine)
            self._released(
                session, query_id, plan.aggregator, self._digests.digest(b"".join(mine)), len(mine)
            )
            return []
        contributions = [mine]
        for node in plan.nodes:
            if node != self.name:
                inbox = self._wait(session, query_id, node, f"{CONTRIBUTION}:{node}")
                contributions.append(inbox.items)
        if plan.scheme == BFV:
            out = context.sum(contributions)
        else:
            out = []
            for j in range(len(layouts)):
                terms = [key.ciphertext_from_bytes(c[j]) for c in contributions]
                out.append(key.ciphertext_to_bytes(key.rerandomize(key.sum_ciphertexts(terms))))
        return self._release(session, query_id, analyst, out)

    # --- shared steps ----------------------------------------------------------------------------

    def _check_data(
        self,
        session: _Session,
        query_id: str,
        where: Sequence[Condition],
        keys: Iterable[bytes],
        size: int,
    ) -> None:
        """The checks that read data, after admission: the filtered set's floor, and the
        tracker check of an exact release over the filtered rows (and join ``keys``)."""
        ob = session.obligations
        self._queries.check_set_size(query_id, session.dataset, size, ob.min_set_size)
        if ob.exact:
            self._queries.check_exact(
                query_id, self._analyst(query_id), session.dataset, where, ob.min_group_size,
                keys=keys, stop=_stop(session.mailbox, self.name),
            )  # fmt: skip

    def _analyst(self, query_id: str) -> str:
        return self._store.get(query_id).analyst

    def _step(
        self, session: _Session, query_id: str, peer: str, direction: str, phase: str,
        message_digest: str, size: int,
    ) -> None:  # fmt: skip
        self._audit.record(
            "protocol.step",
            {"peer": peer, "direction": direction, "phase": phase, "digest": message_digest,
             "size": size},
            actor=self.name, query_id=query_id,
        )  # fmt: skip

    def _send_step(
        self, session: _Session, query_id: str, peer: str, phase: str,
        points: list[bytes], items: list[bytes],
    ) -> None:  # fmt: skip
        self._send(peer, query_id, phase, points, items)
        self._step(
            session, query_id, peer, "sent", phase,
            self._digests.message_digest(points, items), len(points) or len(items),
        )  # fmt: skip

    def _wait(self, session: _Session, query_id: str, peer: str, phase: str) -> Inbox:
        inbox = session.mailbox.wait(
            phase, node=self.name, peer=peer, what=phase.split(":")[0], timeout=self._timeout,
            waiting=self._waiting,
        )  # fmt: skip
        self._step(
            session, query_id, peer, "received", phase.split(":")[0],
            self._digests.message_digest(inbox.points, inbox.items),
            len(inbox.points) or len(inbox.items),
        )  # fmt: skip
        return inbox

    def _release(
        self, session: _Session, query_id: str, analyst: str, out: list[bytes]
    ) -> list[bytes]:
        """Log ``out``, the ciphertexts this node releases to ``analyst``, and return them."""
        self._released(session, query_id, analyst, self._digests.digest(b"".join(out)), len(out))
        return out

    def _released(
        self, session: _Session, query_id: str, recipient: str, result_digest: str, size: int
    ) -> None:
        self._audit.record(
            "result.released",
            {"recipient": recipient, "result_digest": result_digest, "size": size,
             "request_digest": session.request_digest,
             "exact": session.obligations.exact,
             "participants": list(session.plan.nodes)},
            actor=self.name, query_id=query_id,
        )  # fmt: skip

    # --- peer messages --------------------------------------------------------------------------

    def holds(self, query_id: str) -> bool:
        with self._lock:
            return query_id in self._sessions

    def receive(self, caller: Caller, query_id: str, phase: str, chunks: Chunks) -> int:
        """Take a peer's message for ``phase``: ``(total, packed points, items)`` chunks.

        A refused message leaves nothing behind: the sender may send it again.

        Raises:
            PermissionDenied: the caller is not the peer this phase comes from.
            MalformedInput: unknown phase, a repeated message, wrong sizes or a ciphertext that
                is not one under the analyst's key.
        """
        session = self._session(query_id)
        if phase.startswith((f"{VALUES}:", f"{SELECTION}:")):
            return self._receive_batch(session, caller, phase, chunks)
        inbox, check = self._inbox_for(session, caller, phase)
        first = next(chunks, None)
        if first is None:
            raise MalformedInput("empty message: no chunk", field="chunk")

        def decoded() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
            for chunk_total, packed, items in itertools.chain([first], chunks):
                points = ecdh_psi.decode_points(packed) if packed else []
                if phase == VALUES and len(points) != len(items):
                    raise MalformedInput(
                        "one ciphertext entry per point is required", field="items"
                    )
                check(items)
                yield chunk_total, points, items

        return inbox.fill(first[0], decoded())

    def _receive_batch(self, session: _Session, caller: Caller, phase: str, chunks: Chunks) -> int:
        """One batch ``values:<index>:<count>`` of the value holder's stream (or, under sums at
        the value holder, ``selection:<index>:<count>`` of the matcher's), queued in order.

        Blocks while the receiving node's queue is full (the stream's back-pressure).
        """
        plan, stream = session.plan, session.stream
        what = phase.split(":")[0]
        if not isinstance(plan, IntersectionPlan) or stream is None or stream.what != what:
            raise MalformedInput(f"field 'phase': {phase!r} is not expected here", field="phase")
        sender = plan.matcher.node if what == SELECTION else plan.values.node
        if caller.name != sender or caller.name == self.name:
            raise PermissionDenied(f"{caller.name} does not take part in this query")
        try:
            index, count = (int(part) for part in phase.split(":")[1:])
        except ValueError:
            raise MalformedInput(
                f"a batch phase is {what}:<index>:<count>", field="phase"
            ) from None
        if what == SELECTION:
            return self._receive_selection(session, stream, index, count, chunks)
        simd = session.simd
        key = None
        if plan.scheme == BFV_SIMD:
            if simd is None:
                raise MalformedInput("values before the matcher's keys", field="phase")
        else:
            key = self._paillier_key(plan.public_key)
            parts = len(plan.layouts(key.n_bits))
        points: list[bytes] = []
        items: list[bytes] = []
        total = -1
        for chunk_total, packed, chunk_items in chunks:
            if total not in (-1, chunk_total):
                raise MalformedInput("field 'total' changed between chunks", field="total")
            total = chunk_total
            chunk_points = ecdh_psi.decode_points(packed) if packed else []
            if key is not None:
                if len(chunk_points) != len(chunk_items):
                    raise MalformedInput(
                        "one ciphertext entry per point is required", field="items"
                    )
                key.check_ciphertexts(chunk_items, parts=parts)
            points.extend(chunk_points)
            items.extend(chunk_items)
        loaded: list[Any] = items
        if plan.sums_at_values:
            if items:
                raise MalformedInput(
                    "the value holder's batches carry no ciphertexts under this plan (its "
                    "sums stay with it)",
                    field="items",
                )
        elif simd is not None:
            shape = simd.shape
            if len(items) != shape.ciphertexts_for(len(points)) * shape.moduli:
                raise MalformedInput(
                    "one ciphertext per modulus per block of keys is required", field="items"
                )
            loaded = [simd.load_ciphertext(i % shape.moduli, c) for i, c in enumerate(items)]
        if total < 0 or max(len(points), len(items)) != total:
            raise MalformedInput(
                f"a batch of {len(points)} pairs announced {total}", field="points"
            )
        batch_digest = bytes.fromhex(self._digests.message_digest(points, items))
        stream.put(index, count, points, loaded, batch_digest, self._timeout)
        return total

    def _receive_selection(
        self, session: _Session, stream: _BatchStream, index: int, count: int, chunks: Chunks
    ) -> int:
        """One batch of M's selection at V: whole positions of ciphertexts, one per modulus in
        turn, each loading as a fresh ciphertext under its modulus (a batch starts a position,
        so item ``j`` of the batch, across its chunks, is under modulus ``j % moduli``)."""
        simd = session.simd
        if simd is None:
            raise MalformedInput("a selection before the value holder's keys", field="phase")
        items: list[bytes] = []
        total = -1
        for chunk_total, packed, chunk_items in chunks:
            if total not in (-1, chunk_total):
                raise MalformedInput("field 'total' changed between chunks", field="total")
            total = chunk_total
            if packed:
                raise MalformedInput("a selection batch carries no points", field="points")
            for item in chunk_items:
                simd.load_ciphertext(len(items) % simd.shape.moduli, item)
                items.append(item)
        if total < 0 or len(items) != total:
            raise MalformedInput(
                f"a batch of {len(items)} ciphertexts announced {total}", field="items"
            )
        if not items or len(items) % simd.shape.moduli:
            raise MalformedInput(
                "a selection batch holds whole positions: one ciphertext per modulus",
                field="items",
            )
        batch_digest = bytes.fromhex(self._digests.message_digest([], items))
        stream.put(index, count, [], items, batch_digest, self._timeout)
        return total

    def _inbox_for(
        self, session: _Session, caller: Caller, phase: str
    ) -> tuple[Inbox, Callable[[list[bytes]], None]]:
        plan = session.plan
        if isinstance(plan, IntersectionPlan):
            peer = plan.matcher.node if self.name == plan.values.node else plan.values.node
            key_name = phase
        else:
            peer = caller.name if caller.name in plan.nodes else ""
            key_name = f"{phase}:{caller.name}"
        if caller.name != peer or caller.name == self.name:
            raise PermissionDenied(f"{caller.name} does not take part in this query")
        inbox = session.mailbox.inboxes.get(key_name)
        if inbox is None:
            raise MalformedInput(f"field 'phase': {phase!r} is not expected here", field="phase")
        if phase == MATCHER_KEYS or phase == MATCHER_AGAIN:
            return inbox, _no_items
        if isinstance(plan, HorizontalPlan) and plan.scheme == BFV:
            return inbox, _accept_any  # framing and stream checked when summed
        key = self._paillier_key(plan.public_key)
        parts = len(plan.layouts(key.n_bits)) if isinstance(plan, IntersectionPlan) else 1

        def check(items: list[bytes]) -> None:
            key.check_ciphertexts(items, parts=parts)

        return inbox, check


def _check_bundle(plan: IntersectionPlan, public_context: bytes, digests: Digests) -> None:
    if digests.key_fingerprint(public_context) != plan.public_key:
        raise MalformedInput(
            "the BFV keys are not the ones the signed plan names", field="public_context"
        )


# Worker-process cache of the bfv-simd public keys: one query's at a time.
_WORKER_SIMD: dict[bytes, bfv_simd.SimdPublic] = {}


def _values_task(
    scalar: bytes,
    query_id: bytes,
    keys: Sequence[bytes],
    encrypt: Callable[..., Any],
    encrypt_args: tuple[Any, ...],
) -> tuple[bytes, Any]:
    """One batch of the value holder's stream (in a pool worker): its keys masked once (packed
    points) and what ``encrypt(*encrypt_args)`` makes of their values."""
    packed = ecdh_psi.hash_and_mask_chunk(scalar, query_id, keys) if keys else b""
    return packed, encrypt(*encrypt_args)


def _no_values() -> list[bytes]:
    """A batch's values under sums at the value holder: none leave it."""
    return []


def _worker_simd(
    fingerprint: bytes, bundle: bytes, shape: bfv_simd.SimdShape
) -> bfv_simd.SimdPublic:
    """The query's public keys in a pool worker, loaded once. ``bundle``: the public keys of the
    analyst's bundle (``bfv_simd.encryption_bundle``); ``fingerprint``: the whole bundle's, as
    the signed plan names it (checked against the bundle before any job), the cache key."""
    public = _WORKER_SIMD.get(fingerprint)
    if public is None:
        _WORKER_SIMD.clear()
        public = bfv_simd.SimdPublic.from_bundle(shape, bundle, galois=False)
        _WORKER_SIMD[fingerprint] = public
    return public


def _simd_values_task(
    fingerprint: bytes,
    bundle: bytes,
    shape: bfv_simd.SimdShape,
    first: int,
    items: Sequence[bytes],
    rows: _ByPlace,
) -> tuple[int, list[bytes]]:
    """Sums at the value holder, in a pool worker: the selection ciphertexts ``items`` (one per
    modulus for each ``keys_per_ciphertext`` keys from shuffled place ``first`` on) times V's
    values, as partial sums (``SimdSum.partial``). ``rows``: V's rows of those keys
    (:meth:`_ByPlace.between`)."""
    public = _worker_simd(fingerprint, bundle, shape)
    total = public.accumulator()
    per, moduli = shape.keys_per_ciphertext, shape.moduli
    for k in range(len(items) // moduli):
        start = first + k * per
        cells = rows.cells(start, start + per)
        total.add_values(items[k * moduli : (k + 1) * moduli], bfv_simd.value_slots(shape, cells))
    return total.partial()


def _simd_encrypt_task(
    fingerprint: bytes, bundle: bytes, shape: bfv_simd.SimdShape, rows: Sequence[Sequence[int]]
) -> list[bytes]:
    """Encrypt one batch of keys' cell values (in a pool worker): per ciphertext of keys, one
    ciphertext per plaintext modulus (``bundle``, ``fingerprint``: :func:`_worker_simd`)."""
    public = _worker_simd(fingerprint, bundle, shape)
    per = shape.keys_per_ciphertext
    out: list[bytes] = []
    for start in range(0, max(len(rows), 1), per):
        out.extend(public.encrypt_keys(rows[start : start + per]))
    return out


class _KeyValues:
    """The value holder's filtered rows, in flat arrays: per row its key's first-seen number,
    its group and its figure values (6 + 8 x figures bytes); per key its row count. Beside
    them the keys' own strings, until they are encoded in the shuffled order."""

    def __init__(self, groups: int, figures: int) -> None:
        self.figures = figures
        self.width = groups * figures
        self.keys: list[str] = []
        self._number: dict[str, int] = {}
        self._rows = bytearray()  # per key: its rows (at most MAX_ROWS_PER_KEY)
        self._key = array.array("i")  # per row
        self._group = array.array("H")  # per row
        self._values = array.array("q")  # per row: its figures

    def add_rows(self, keys: Sequence[str], groups: Sequence[int], values: Any) -> bool:
        """Add rows: their keys, groups and figures (an array of ``len(keys)`` rows of
        ``figures`` values). False when a key would have more than ``MAX_ROWS_PER_KEY`` rows
        (the rows are not added; the table is then for the bin)."""
        number = self._number
        new = [k for k in dict.fromkeys(keys) if k not in number]
        number.update(zip(new, range(len(self.keys), len(self.keys) + len(new)), strict=True))
        self.keys.extend(new)
        numbers = np.fromiter(map(number.__getitem__, keys), dtype=np.int64, count=len(keys))
        self._rows.extend(bytes(len(new)))
        # The chunk's keys alone: their counts so far, plus the chunk's rows of each.
        touched, added = np.unique(numbers, return_counts=True)
        rows = np.frombuffer(self._rows, dtype=np.uint8)  # a view: released below
        counts = rows[touched].astype(np.int64) + added
        if len(counts) and int(counts.max()) > MAX_ROWS_PER_KEY:
            return False
        rows[touched] = counts
        del rows
        self._key.frombytes(numbers.astype(np.int32).tobytes())
        self._group.frombytes(np.asarray(groups, dtype=np.uint16).tobytes())
        self._values.frombytes(np.ascontiguousarray(values, dtype=np.int64).tobytes())
        return True

    def shuffle(self) -> array.array[int]:
        """A fresh random order of the key numbers."""
        return array.array("i", ecdh_psi.random_permutation(len(self.keys)))

    def by_place(self, order: array.array[int]) -> _ByPlace:
        """Every row by its key's place in ``order``."""
        where = np.empty(len(order), dtype=np.int64)
        where[np.frombuffer(order, dtype=np.int32)] = np.arange(len(order), dtype=np.int64)
        places = where[np.frombuffer(self._key, dtype=np.int32)]
        sort = np.argsort(places, kind="stable")
        groups = np.frombuffer(self._group, dtype=np.uint16)
        values = np.frombuffer(self._values, dtype=np.int64).reshape(-1, self.figures)
        return _ByPlace(
            places[sort], groups[sort], values[sort], self.figures, self.width, len(order)
        )


@dataclass(frozen=True)
class _ByPlace:
    """The value holder's rows sorted by their key's place in the shuffled order M sees: per
    row its place, group and figures; ``keys`` places in all."""

    places: Any
    groups: Any
    values: Any
    figures: int
    width: int
    keys: int

    def between(self, start: int, stop: int) -> _ByPlace:
        """The rows of the keys at places ``start`` to ``stop`` (for a pool job)."""
        lo, hi = (int(i) for i in np.searchsorted(self.places, [start, stop]))
        return replace(
            self, places=self.places[lo:hi], groups=self.groups[lo:hi], values=self.values[lo:hi]
        )

    def cells(self, start: int, stop: int) -> Any:
        """The cells of the keys at places ``start`` to ``stop`` (up to ``keys``): per key its
        rows' figures summed, group-major; an array of one row a key."""
        lo, hi = (int(i) for i in np.searchsorted(self.places, [start, stop]))
        out = np.zeros((max(0, min(stop, self.keys) - start), self.width), dtype=np.int64)
        columns = self.groups[lo:hi].astype(np.int64)[:, None] * self.figures
        columns = columns + np.arange(self.figures)
        np.add.at(out, (self.places[lo:hi, None] - start, columns), self.values[lo:hi])
        return out


def _figures(rows: int, sums: Sequence[Sequence[int]], bounds: Sequence[int]) -> Any:
    """The figures of ``rows`` rows, (1, clipped sums...) each, from their SUM columns
    (``sums``, a list a column) and the columns' bounds: an array of one row a row."""
    out = [np.ones(rows, dtype=np.int64)]
    for column, bound in zip(sums, bounds, strict=True):
        try:
            values = np.asarray(column, dtype=np.int64)
        except OverflowError:  # beyond 64 bits: clipped one by one, then they fit
            values = np.asarray([min(max(v, 0), bound) for v in column], dtype=np.int64)
        out.append(np.clip(values, 0, bound))
    return np.stack(out, axis=1)


def _chunks(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    """``rows`` in lists of up to ``size``."""
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _checked(rows: Iterable[T], mailbox: Mailbox, node: str) -> Iterator[T]:
    """``rows`` as they are read, ending the read every :data:`ROWS_PER_CHECK` rows if the
    query's part ended meanwhile (:meth:`Mailbox.check`).

    A read that ends early leaves ``rows`` unfinished: the caller closes it
    (``contextlib.closing``), so that a catalogue stream's connection is closed in the query's
    thread when the read stops, not by the garbage collector later, in any thread."""
    for n, row in enumerate(rows):
        if n % ROWS_PER_CHECK == 0:
            mailbox.check(node)
        yield row
    mailbox.check(node)


def _stop(mailbox: Mailbox, node: str) -> Stop:
    """The stop check of one of the part's catalogue reads (a key read, a count, a GROUP BY,
    the tracker check's read): the read ends, as :meth:`Mailbox.check` does, once the part
    ended — within one SQLite progress step or sealed chunk, not after the whole read."""
    return lambda: mailbox.check(node)


def _beside(name: str, work: Callable[[], T]) -> Future[T]:
    """Run ``work`` on a thread of its own, beside the caller's; its outcome as a future.

    The part's end (:func:`_end`, which :meth:`AggregateEngine._close` calls however the part
    ends) wakes any wait of ``work`` on the part's mailbox or pool, so the thread ends with it.
    """
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:  # the caller's result() raises it
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _end(session: _Session, reason: str) -> None:
    session.mailbox.end(reason)
    if session.stream is not None:
        session.stream.end(reason)


def _accept_any(items: list[bytes]) -> None:
    return None


def _no_items(items: list[bytes]) -> None:
    if items:
        raise MalformedInput("this phase carries points only", field="items")
