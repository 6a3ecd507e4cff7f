"""Signs the node's audit-log checkpoints and has its peers witness them.

After each batch of entries (``publish`` called by the query path or on an auditor's request)
and at an interval, the node signs a checkpoint of its log and submits it to every peer node's
``Peer.Witness`` with a consistency proof from the size that peer last cosigned. Valid
cosignatures are stored beside the checkpoint; a peer that is down or refuses is recorded in
the log and tried again next time — never fatal to the node.

A round never holds up the node's stop: :meth:`CheckpointPublisher.stop` closes the channels of
the witness calls in flight, which end at once, asks no further peer, and waits for the thread
a bounded time. The checkpoint stays stored with the cosignatures it had; nothing is logged as
a witness's failure, since no witness failed, and the peers not asked are named in
:attr:`~CheckpointPublisher.abandoned` for the node's one line at its stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from govshare.model.events import log_origin
from govshare.model.governance import Role
from govshare.model.identity import Identity, Member
from govshare.node.audit.auditlog import AuditLog, StoredCheckpoint
from govshare.protocols.checkpoint import NoteSignature
from govshare.protocols.errors import GovshareError
from govshare.rpc.client import NodeClient

log = logging.getLogger(__name__)

# Seconds a peer has to answer a witness request.
WITNESS_TIMEOUT = 5.0
# Seconds stop() waits for the publishing thread once its calls are closed: a store write at most.
STOP_SECONDS = 2.0


class CheckpointPublisher:
    def __init__(
        self,
        identity: Identity,
        audit: AuditLog,
        *,
        interval: float,
        peers: Callable[[], Sequence[Member]] | None = None,
        witness_timeout: float = WITNESS_TIMEOUT,
    ) -> None:
        self._identity = identity
        self._audit = audit
        self._interval = interval
        self._witness_timeout = witness_timeout
        self._peers = peers or self._roster_peers
        self._held: dict[str, int] = {}  # witness name -> size it last cosigned
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Channels of the witness calls in flight, closed by stop().
        self._calls: set[NodeClient] = set()
        self._calls_lock = threading.Lock()
        # "witnessing of checkpoint N by <peer>" for each peer a stop left unasked or cut off.
        self.abandoned: list[str] = []

    @property
    def origin(self) -> str:
        return log_origin(self._identity.roster.federation, self._identity.name)

    def _roster_peers(self) -> list[Member]:
        return [
            m for m in self._identity.roster.with_role(Role.NODE) if m.name != self._identity.name
        ]

    def covering(self, size: int) -> StoredCheckpoint:
        """A checkpoint of at least ``size`` entries whose witnessing round has ended.

        The background publisher stores a checkpoint before its peers cosign it; handing that
        one out (in a receipt, to an auditor) would show fewer cosignatures than it will have.
        This waits for a round in progress, and signs and witnesses a new checkpoint when the
        latest does not cover ``size`` entries.
        """
        with self._lock:
            latest = self._audit.latest_checkpoint()
            # Never one beyond the log itself (a truncated log gets a fresh, smaller checkpoint
            # that the witnesses and auditors then refuse as a rollback).
            if latest is not None and size <= latest.size <= self._audit.size:
                return latest
            return self._publish()

    def publish(self) -> StoredCheckpoint:
        """Sign a checkpoint of the current log and collect the peers' cosignatures."""
        with self._lock:
            return self._publish()

    def _publish(self) -> StoredCheckpoint:
        self._audit.checkpoint(self._identity.signing_key, self.origin)
        latest = self._audit.latest_checkpoint()
        if latest is None:  # checkpoint() always stores one
            raise RuntimeError("checkpoint was not stored")
        for peer in self._peers():
            self._witness(peer, latest)  # after a stop: only noted as abandoned
        stored = self._audit.latest_checkpoint()
        return stored if stored is not None else latest

    def _witness(self, peer: Member, checkpoint: StoredCheckpoint) -> None:
        if f"\n— {peer.name} ".encode() in checkpoint.note:
            return  # already cosigned by this peer
        client = self._call(peer)
        if client is None:
            self._abandon(peer, checkpoint)
            return
        try:
            with client:
                for _ in range(2):  # a second try when the peer holds another size
                    old = self._held.get(peer.name, 0)
                    proof = (
                        self._audit.consistency_proof(old, checkpoint.size)
                        if 0 < old < checkpoint.size
                        else []
                    )
                    reply = client.witness(checkpoint.note, old, proof)
                    self._held[peer.name] = reply.witness_size
                    if reply.cosignature:
                        line = reply.cosignature.decode().rstrip("\n")
                        signature = NoteSignature.parse_line(line)
                        self._audit.add_cosignature(
                            checkpoint.id,
                            signature,
                            witness_key=peer.verify_key(),
                            log_key=self._identity.member.verify_key(),
                        )
                        return
        except GovshareError as exc:
            if self._stop.is_set():  # the stop closed the channel: the peer did not fail
                self._abandon(peer, checkpoint)
                return
            log.warning("witness %s: %s", peer.name, exc)
            self._audit.record(
                "witness.failed",
                {"witness": peer.name, "size": checkpoint.size, "reason": str(exc)},
                actor=self._identity.name,
            )
        finally:
            with self._calls_lock:
                self._calls.discard(client)

    def _call(self, peer: Member) -> NodeClient | None:
        """A channel to ``peer`` for one witness call, that stop() can close; None once stopped."""
        with self._calls_lock:
            if self._stop.is_set():
                return None
            client = NodeClient(self._identity, peer, timeout=self._witness_timeout)
            self._calls.add(client)
            return client

    def _abandon(self, peer: Member, checkpoint: StoredCheckpoint) -> None:
        self.abandoned.append(f"witnessing of checkpoint {checkpoint.size} by {peer.name}")

    def _run(self) -> None:
        last_size = -1
        while not self._stop.wait(self._interval):
            try:
                if self._audit.size != last_size:
                    last_size = self.publish().size
            except GovshareError as exc:  # keep serving; the next round retries
                log.warning("checkpoint round failed: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="govshare-checkpoints", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """End the background rounds and any round in flight, also one a query asked for:
        close the channels of the calls in flight (they end at once), ask no further peer, and
        wait up to ``timeout`` seconds for the thread. Whether it ended."""
        with self._calls_lock:
            self._stop.set()
            calls = list(self._calls)
        for client in calls:
            client.close()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
