"""The department node: its identity, stores and the operations its servicers expose.

Servicers (``govshare.node.api.services``) are thin adapters over this class; everything here takes
the verified caller as an argument so it can be tested without a server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from govshare.model.crossborder import Assessment
from govshare.model.governance import DatasetInfo, Grade, Role
from govshare.model.identity import ROSTER, Identity, Member, Roster
from govshare.node import compute, shutdown
from govshare.node.api.auth import Caller
from govshare.node.audit.auditlog import AuditLog, LogBroken, LogEntry
from govshare.node.audit.checkpointer import WITNESS_TIMEOUT, CheckpointPublisher
from govshare.node.audit.selfcheck import WHOLE_AT_START_MAX, LogSelfCheck
from govshare.node.audit.witness import Witness, WitnessStore
from govshare.node.config import (
    DEFAULT_APPLICATION_DEADLINE_DAYS,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_MAX_INTAKE,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_RUNNING,
    DEFAULT_PROTOCOL_TIMEOUT,
    DEFAULT_RATE_LIMIT_PER_MINUTE,
    NodeConfig,
)
from govshare.node.data.at_rest import open_at_rest
from govshare.node.data.catalog import Catalogue
from govshare.node.data.mask_key import MaskSecret
from govshare.node.home_lock import HomeLock
from govshare.node.home_permissions import create_private, refuse_unless_private
from govshare.node.observability.events import QueryEvents
from govshare.node.policy.alerts import RiskMonitor, SuspensionStore
from govshare.node.policy.applications import Application, ApplicationStore
from govshare.node.policy.applications import parse_body as parse_application
from govshare.node.policy.applications import status_of as grant_status
from govshare.node.policy.controls import ControlStore
from govshare.node.policy.crossborder import CrossBorderStore
from govshare.node.policy.grants import Grant, GrantStore
from govshare.node.queries.capacity import Intake, RunGate
from govshare.node.queries.engine import QueryEngine, verified_request
from govshare.node.queries.engines import EngineSettings
from govshare.node.queries.engines.rr22 import Rr22Engine
from govshare.node.queries.kinds.aggregate import AggregateEngine, AggregateOptions
from govshare.node.queries.kinds.psi import PsiKind
from govshare.node.roster_file import RosterFile
from govshare.node.stores.query_store import QueryStore, ledger_view
from govshare.node.stores.retention import ResultsRetention
from govshare.protocols.errors import MalformedInput, NotFound, Unavailable
from govshare.rpc.client import NodeClient

# Points per Query.Run result chunk: 4096 x 32 bytes = 128 KiB messages.
PSI_CHUNK_POINTS = 4096

# Threads for calls that must answer promptly under load (catalogue, audit, status).
CONTROL_THREADS = 4

# Entries per GetEntries page: bounded messages whatever range an auditor asks for.
ENTRY_PAGE = 1000


def visible_to(caller: Caller, dataset: DatasetInfo) -> bool:
    """Core datasets never take part in joint queries, so analysts never see them listed."""
    return not (dataset.grade is Grade.CORE and caller.role is Role.ANALYST)


@dataclass
class Node:
    identity: Identity
    catalogue: Catalogue
    grants: GrantStore
    query_store: QueryStore
    audit: AuditLog
    witness_store: WitnessStore
    # Cross-border assessment records; from_config opens them in the node's database. A node
    # built without them opens that same file, the catalogue's (see __post_init__).
    crossborder_store: CrossBorderStore | None = None
    clock: Callable[[], float] = field(default=time.time)
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    # Seconds a peer has to answer a witness request (govshare.node.audit.checkpointer).
    witness_timeout: float = WITNESS_TIMEOUT
    protocol_timeout: float = DEFAULT_PROTOCOL_TIMEOUT
    rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE
    workers: int = 0  # processes for masking; 0 = one per CPU
    # Where that work runs: these processes, or a Ray cluster (govshare.node.compute).
    compute_settings: compute.ComputeSettings = field(default_factory=compute.ComputeSettings)
    # PSI engines beside ECDH-PSI ([engines] in node.toml; govshare.node.queries.engines).
    engine_settings: EngineSettings = field(default_factory=EngineSettings)
    # Admission control of query runs (govshare.node.queries.capacity).
    max_running: int = DEFAULT_MAX_RUNNING
    max_queued: int = DEFAULT_MAX_QUEUED
    max_intake: int = DEFAULT_MAX_INTAKE
    # Test-only switches of the aggregate engine; Node.from_config never sets them.
    aggregate_options: AggregateOptions = field(default_factory=AggregateOptions)
    # The secret that keys hash_prefix releases (see mask_key); from_config loads it from the
    # home, creating it on first use. A node built without one refuses hash_prefix releases.
    mask_secret: MaskSecret | None = field(default=None, repr=False)
    # Logs up to this many entries are checked whole before the node serves; larger ones from
    # their latest checkpoint, then whole in the background (see selfcheck).
    log_check_whole_at_start: int = WHOLE_AT_START_MAX
    # A HIGH risk alert about an analyst suspends the analyst here (govshare.node.policy.alerts).
    suspend_on_high_alert: bool = False
    # Suspended analysts; a node built without opens them in the catalogue's file.
    suspension_store: SuspensionStore | None = None
    # Working days an operator has to answer an access application (govshare.node.policy
    # .applications).
    application_deadline_days: int = DEFAULT_APPLICATION_DEADLINE_DAYS
    # The lock on the node's home (one node per home); from_config takes it, close() lets it go.
    home_lock: HomeLock | None = field(default=None, repr=False)
    # Days membership results are kept here ([retention] results_days; 0: no limit).
    results_days: int = 0
    # Each step of each query, to whoever subscribes: the server's logs and metrics
    # (govshare.node.observability).
    events: QueryEvents = field(default_factory=QueryEvents, repr=False)
    publisher: CheckpointPublisher = field(init=False)
    witness: Witness = field(init=False)
    gate: RunGate = field(init=False)
    intake: Intake = field(init=False)
    control: ThreadPoolExecutor = field(init=False)
    queries: QueryEngine = field(init=False)
    psi: PsiKind = field(init=False)
    aggregates: AggregateEngine = field(init=False)
    crossborder: CrossBorderStore = field(init=False)
    log_check: LogSelfCheck = field(init=False)
    suspensions: SuspensionStore = field(init=False)
    risk: RiskMonitor = field(init=False)
    retention: ResultsRetention = field(init=False)

    def __post_init__(self) -> None:
        self._pool: Executor | None = None
        self._pool_lock = threading.Lock()
        # One mutual-TLS channel per peer for protocol messages, kept while the roster lists
        # the peer as it is (see _peer_client).
        self._peer_clients: dict[str, NodeClient] = {}
        self._peer_lock = threading.Lock()
        self._closing = False  # set by close(): no new channel to a peer
        self.crossborder = self.crossborder_store or CrossBorderStore(self.catalogue.path)
        self.suspensions = self.suspension_store or SuspensionStore(self.catalogue.path)
        self.controls = ControlStore(self.catalogue.path)
        self.risk = RiskMonitor(
            node=self.identity.name,
            audit=self.audit,
            suspensions=self.suspensions,
            suspend_on_high_alert=self.suspend_on_high_alert,
            clock=self.clock,
        )
        self.rosters = RosterFile(
            self.identity.directory / ROSTER,
            self.identity.ca_cert_pem,
            self.identity.roster,
            audit=self.audit,
            actor=self.identity.name,
        )
        self.publisher = CheckpointPublisher(
            self.identity, self.audit, interval=self.checkpoint_interval, peers=self.peers,
            witness_timeout=self.witness_timeout,
        )  # fmt: skip
        self.witness = Witness(
            self.identity, self.witness_store, audit=self.audit, clock=self.clock
        )
        # Threads for catalogue, audit, status and peer-control calls (govshare.node.api).
        self.control = ThreadPoolExecutor(
            max_workers=CONTROL_THREADS, thread_name_prefix=f"govshare-{self.identity.name}-control"
        )
        self.intake = Intake(node=self.identity.name, limit=self.max_intake)
        self.gate = RunGate(
            node=self.identity.name, max_running=self.max_running, max_queued=self.max_queued
        )
        self.queries = QueryEngine(
            identity=self.identity,
            roster=self.roster,
            catalogue=self.catalogue,
            grants=self.grants,
            store=self.query_store,
            audit=self.audit,
            publisher=self.publisher,
            notify_abort=self.send_abort,
            clock=self.clock,
            rate_limit_per_minute=self.rate_limit_per_minute,
            assessed=self.assessed_destinations,
            observe=self.risk.poll,
            suspended=self.risk.suspension_message,
            frozen=self.frozen,
            on_event=self.events.emit,
        )
        # The query kinds (govshare.node.queries.kinds), each registered with the engine.
        self.psi = PsiKind(
            queries=self.queries,
            roster=self.roster,
            catalogue=self.catalogue,
            store=self.query_store,
            audit=self.audit,
            send=self.send,
            executor=self.executor,
            protocol_timeout=self.protocol_timeout,
            mask_key=self.mask_key,
            waiting=self.gate.waiting,
            rr22=Rr22Engine.configured(
                node=self.identity.name,
                settings=self.engine_settings,
                identity_dir=self.identity.directory,
                timeout=self.protocol_timeout,
            ),
        )
        self.aggregates = AggregateEngine(
            queries=self.queries,
            identity=self.identity,
            roster=self.roster,
            catalogue=self.catalogue,
            grants=self.grants,
            store=self.query_store,
            audit=self.audit,
            send=self.send,
            clock=self.clock,
            executor=self.executor,
            protocol_timeout=self.protocol_timeout,
            options=self.aggregate_options,
            waiting=self.gate.waiting,
        )
        # The node checks its own log before anything is appended to it; a broken log is sealed
        # and the node refuses to serve queries (see selfcheck).
        self.log_check = LogSelfCheck(
            self.audit,
            node=self.name,
            public_key=self.roster().member(self.name).verify_key(),
            origin=self.publisher.origin,
            whole_at_start_max=self.log_check_whole_at_start,
        )
        self.log_check.run_at_start()
        # Queries that were running when the node last stopped: settle their reservations; and
        # those whose signed request expired while the node was down: expire them now, not at
        # the next submission, so the operator is not left approving them.
        if self.log_check.refusal() is None:
            self.queries.recover()
        self.risk.start()
        # Membership results older than the retention go now, then hourly (stores/retention).
        self.retention = ResultsRetention(
            self.query_store, self.audit, self.results_days, self.name, clock=self.clock
        )
        if self.log_check.refusal() is None:
            self.retention.start()

    def frozen(self, dataset: str) -> tuple[str, str] | None:
        """The (rule, message) of an operator's freeze of this node or ``dataset``, or None
        (govshare.node.policy.controls; the table is shared with the operator's commands)."""
        held = self.controls.frozen(dataset)
        return None if held is None else (held.rule, held.message(self.name))

    def roster(self) -> Roster:
        """The newest signed roster published into the node's bundle (see RosterFile)."""
        return self.rosters.current()

    def peers(self) -> list[Member]:
        """The other nodes of the federation: the witnesses of this node's log."""
        return [m for m in self.roster().with_role(Role.NODE) if m.name != self.name]

    def executor(self) -> Executor:
        """The node's long-lived executor for the per-row work: its process pool (forkserver,
        safe beside gRPC; its processes end with the node, however it ends: govshare.node
        .workers) or its Ray cluster's (govshare.node.compute). Opened on first use, so a node
        starts without importing Ray; one whose cluster went away is replaced by a new one.
        """
        with self._pool_lock:
            if self._pool is not None and not compute.usable(self._pool):
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            if self._pool is None:
                self._pool = compute.open_executor(self.compute_settings, self.workers or None)
            return self._pool

    def mask_key(self, dataset: str, column: str) -> bytes:
        """The HMAC key of ``hash_prefix`` releases from ``dataset.column`` of this node.

        Raises:
            TypeError: the node was built without its masking secret.
        """
        if self.mask_secret is None:
            raise TypeError(f"node {self.name} has no masking secret; build it with from_config")
        return self.mask_secret.key(dataset, column, self.identity.roster.crypto)

    def send(
        self,
        peer: str,
        query_id: str,
        phase: str,
        points: Sequence[bytes],
        items: Sequence[bytes] = (),
    ) -> None:
        """Stream one protocol message to ``peer`` (Peer.Deliver) in bounded chunks."""
        client = self._peer_client(peer)
        try:
            client.deliver(query_id, phase, points, items)
        except BaseException as error:
            self._drop_peer_client(peer, client)
            if self._closing and isinstance(error, Exception):
                raise self._stopping(peer, phase) from error
            raise

    def send_abort(self, peer: str, query_id: str) -> None:
        """Tell ``peer`` this node's part of ``query_id`` ended (Peer.Deliver, an abort)."""
        client = self._peer_client(peer)
        try:
            client.abort(query_id)
        except BaseException as error:
            self._drop_peer_client(peer, client)
            if self._closing and isinstance(error, Exception):
                raise self._stopping(peer, "abort") from error
            raise

    def _stopping(self, peer: str, what: str) -> Unavailable:
        """What a send reports when this node's stop closed its channel under it: gRPC's own
        "Channel closed!" would name the peer, which did nothing wrong."""
        return Unavailable(f"node {self.name} is stopping; {what} not sent to {peer}")

    def _peer_client(self, peer: str) -> NodeClient:
        """The node's channel to ``peer``, made on first use and kept: a stream of batches
        reuses one connection, its TLS session and its grown HTTP/2 flow-control windows,
        rather than a handshake and a cold window for every message. A roster that lists the
        peer otherwise (address, keys, certificate fingerprint) gets a new channel, and so
        does the send after one that failed (:meth:`_drop_peer_client`): it dials afresh
        instead of waiting out gRPC's reconnection backoff. A channel let go is not closed
        here: a send of another query may still be using it, and gRPC releases it when the
        last sender lets go of it (the node's close ends every kept one).

        Raises:
            NotFound: the roster does not list ``peer``.
            Unavailable: the node is stopping.
        """
        member = self.roster().member(peer)
        with self._peer_lock:
            if self._closing:
                raise Unavailable(f"node {self.name} is stopping; nothing sent to {peer}")
            held = self._peer_clients.get(peer)
            if held is not None and held.member == member and held.identity is self.identity:
                return held
            client = NodeClient(self.identity, member, timeout=self.protocol_timeout)
            self._peer_clients[peer] = client
        return client

    def _drop_peer_client(self, peer: str, client: NodeClient) -> None:
        with self._peer_lock:
            if self._peer_clients.get(peer) is client:
                del self._peer_clients[peer]

    @classmethod
    def from_config(cls, config: NodeConfig) -> Node:
        """Build a node from its home: identity bundle, catalogue store, audit log.

        Raises:
            HomeInUse: another node holds the home (before anything in it is opened).
            HomeNotPrivate: a path under the home is open to other users (one line naming it,
                its mode and the chmod that fixes it).
            WrongDataKey: the data key is missing or not the one node.db was sealed under.
        """
        lock = HomeLock.acquire(config.home)
        try:
            return cls._from_config(config, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _from_config(cls, config: NodeConfig, lock: HomeLock) -> Node:
        refuse_unless_private(config.home)
        for store in (config.database_path, config.audit_database_path):
            create_private(store)  # before SQLite first opens it: -wal and -shm follow
        identity = Identity.load(config.identity_dir)
        at_rest = open_at_rest(config.home, config.database_path, identity.roster.crypto)
        return cls(
            identity=identity,
            catalogue=Catalogue(config.database_path, at_rest=at_rest),
            grants=GrantStore(config.database_path),
            crossborder_store=CrossBorderStore(config.database_path),
            query_store=QueryStore(config.database_path, at_rest=at_rest),
            audit=AuditLog.open(config.audit_database_path, suite=identity.roster.crypto),
            witness_store=WitnessStore(config.database_path),
            mask_secret=MaskSecret.load_or_create(config.home),
            checkpoint_interval=config.checkpoint_interval,
            protocol_timeout=config.protocol_timeout,
            rate_limit_per_minute=config.rate_limit_per_minute,
            workers=config.workers,
            compute_settings=config.compute,
            engine_settings=config.engines,
            max_running=config.max_running,
            max_queued=config.max_queued,
            max_intake=config.max_intake,
            suspend_on_high_alert=config.suspend_on_high_alert,
            application_deadline_days=config.application_deadline_days,
            home_lock=lock,
            results_days=config.results_days,
        )

    @classmethod
    def from_home(cls, home: Path) -> Node:
        return cls.from_config(NodeConfig.load(home))

    @property
    def name(self) -> str:
        return self.identity.name

    def close(self) -> list[str]:
        """Stop the node's work and close its stores, each wait bounded (govshare.node.shutdown).

        Queries still running here are interrupted; the peer channels are closed, so sends in
        flight end at once (no new channel opens: an abort notice not yet sent is left to the
        peer's protocol timeout); the background services get :data:`~shutdown.STEP_SECONDS`
        together (a witnessing round is cut off, not waited out); the process pool's running jobs
        :data:`~shutdown.POOL_SECONDS`, then their workers are killed; the query threads
        :data:`~shutdown.STEP_SECONDS` to log how they ended. Then the stores close; the audit
        log's close waits for an entry being written, never cuts one.

        Returns what was abandoned (nothing when every wait ended in time), for the caller's
        one line. A second call does nothing.
        """
        with self._peer_lock:
            if self._closing:
                return []  # closed already
            self._closing = True
            clients, self._peer_clients = list(self._peer_clients.values()), {}
        reason = f"node {self.name} is stopping"
        self.gate.close(reason)
        self.queries.interrupt_all(reason)
        for client in clients:
            client.close()
        self.gate.shutdown()
        self.control.shutdown(wait=False, cancel_futures=True)
        services: dict[str, Callable[[], object]] = {
            "the log check": self.log_check.stop,
            "the checkpoint publisher": self.publisher.stop,
            "the risk monitor": self.risk.stop,
            "the results retention": self.retention.stop,
        }
        left = shutdown.within(shutdown.STEP_SECONDS, services)
        abandoned = [f"{name} (still running after {shutdown.STEP_SECONDS:g} s)" for name in left]
        abandoned += self.publisher.abandoned
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None and (killed := shutdown.stop_pool(pool)) is not None:
            abandoned.append(killed)
        if not self.gate.drain(shutdown.STEP_SECONDS):
            abandoned.append(
                f"{self.gate.load().admitted} query run(s) still ending after "
                f"{shutdown.STEP_SECONDS:g} s"
            )
        self.query_store.close()
        self.audit.close()
        self.witness_store.close()
        self.suspensions.close()
        if self.home_lock is not None:
            self.home_lock.release()  # last: the home's stores are closed
        return abandoned

    # --- catalogue ----------------------------------------------------------------------------

    def list_datasets(self, caller: Caller) -> list[DatasetInfo]:
        return [d for d in self.catalogue.list() if visible_to(caller, d)]

    # --- access applications (govshare.node.policy.applications) ---------------------------

    def apply(self, caller: Caller, signed: bytes) -> Application:
        """Receive an analyst's signed access application.

        Raises:
            PermissionDenied: signed for another member than the caller.
            VerificationFailed, MalformedInput: a bad signature, window, nonce or body.
            NotFound: no such dataset here (core data is not discoverable).
        """
        now = int(self.clock())
        request = verified_request(caller, signed, now=now, what="application")
        asked = parse_application(request)
        dataset = self.describe_dataset(caller, asked.dataset)
        self.query_store.remember_nonce(
            caller.name, request.nonce, expires_at=request.expires_at, now=now
        )
        return ApplicationStore(self.catalogue.path).receive(
            request, signed, node=self.name, dataset=dataset,
            deadline_days=self.application_deadline_days, audit=self.audit, now=now,
        )  # fmt: skip

    def rights_of(self, caller: Caller) -> tuple[list[Application], list[tuple[Grant, str]]]:
        """The caller's applications here, and the grants it holds with their status."""
        applications = ApplicationStore(self.catalogue.path).list(applicant=caller.name)
        registered = {d.name: d for d in self.catalogue.list()}
        now = int(self.clock())
        grants = [
            (g, grant_status(g, registered.get(g.dataset), now))
            for g in self.grants.list(grantee=caller.name)
        ]
        return applications, grants

    def column_scales(self, name: str) -> dict[str, int]:
        """Decimal places of ``name``'s columns kept at a scale (a stored v reads v / 10^scale
        in the column's declared unit): what the catalogue and an aggregate's result tell."""
        formats = self.catalogue.record(name).formats
        return {column: fmt.scale for column, fmt in formats.items() if fmt.scale}

    def describe_dataset(self, caller: Caller, name: str) -> DatasetInfo:
        dataset = self.catalogue.get(name)
        if not visible_to(caller, dataset):
            # Same answer as for a dataset that does not exist: core is not discoverable.
            raise NotFound(f"no dataset {name!r} on node {self.name}")
        return dataset

    def ledger(self, analyst: str, dataset: str) -> tuple[Fraction, Fraction, Fraction]:
        """(spent, reserved, left) of ``analyst``'s ε on ``dataset`` at this node."""
        return ledger_view(
            self.query_store, self.grants.list(dataset=dataset), analyst, dataset,
            now=int(self.clock()),
        )  # fmt: skip

    def assessed_destinations(self, dataset: str, now: int) -> frozenset[str]:
        """Jurisdictions that signed cross-border assessments in force cover for ``dataset``."""
        return self.crossborder.destinations(dataset, now, self.identity.member.verify_key())

    def crossborder_in_force(self, dataset: str) -> list[Assessment]:
        """The dataset's cross-border assessments in force now, verified under the node's key."""
        return self.crossborder.in_force(
            dataset, int(self.clock()), verify_key=self.identity.signing_key.public_key()
        )

    # --- audit log ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> bytes:
        """A signed, witnessed checkpoint covering every entry so far.

        From a broken (sealed) log: the latest stored checkpoint as it is; nothing is signed.
        """
        refusal = self.audit.broken
        if refusal is not None:
            latest = self.audit.latest_checkpoint()
            if latest is None:
                raise LogBroken(f"{refusal}; it holds no checkpoint")
            return latest.note
        return self.publisher.covering(self.audit.size).note

    def entry_pages(self, start: int, end: int) -> Iterator[list[LogEntry]]:
        size = self.audit.size
        if not 0 <= start <= end <= size:
            raise MalformedInput(
                f"field 'start'/'end': range [{start}, {end}) is outside the log of {size}",
                field="start",
            )
        for page in range(start, end, ENTRY_PAGE):
            yield self.audit.entries(page, min(end, page + ENTRY_PAGE))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self.audit.inclusion_proof(index, size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return self.audit.consistency_proof(old_size, new_size)

    def query_entries(self, query_id: str) -> list[LogEntry]:
        if not query_id:
            raise MalformedInput("field 'query_id' is required", field="query_id")
        return self.audit.entries_for_query(query_id)

    def witness_checkpoint(
        self, caller: Caller, note: bytes, old_size: int, proof: Sequence[bytes]
    ) -> tuple[bytes, int]:
        if not note:
            raise MalformedInput("field 'note' is required", field="note")
        if old_size < 0:
            raise MalformedInput("field 'old_size' must not be negative", field="old_size")
        return self.witness.witness(caller.member, note, old_size, proof)
