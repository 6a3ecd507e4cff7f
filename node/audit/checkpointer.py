"""Signs the node's audit-log checkpoints and has its peers witness them.

After each batch of entries (``publish`` called by the query path or on an auditor's request)
and at an interval, the node signs a checkpoint of its log and submits it to every peer node's
``Peer.Witness`` with a consistency proof from the size that peer last cosigned. Valid
cosignatures are stored beside the checkpoint; a peer that is down or refuses is recorded in
the log and tried again next time — never fatal to the node.
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


class CheckpointPublisher:
    def __init__(
        self,
        identity: Identity,
        audit: AuditLog,
        *,
        interval: float,
        peers: Callable[[], Sequence[Member]] | None = None,
    ) -> None:
        self._identity = identity
        self._audit = audit
        self._interval = interval
        self._peers = peers or self._roster_peers
        self._held: dict[str, int] = {}  # witness name -> size it last cosigned
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            self._witness(peer, latest)
        stored = self._audit.latest_checkpoint()
        return stored if stored is not None else latest

    def _witness(self, peer: Member, checkpoint: StoredCheckpoint) -> None:
        if f"\n— {peer.name} ".encode() in checkpoint.note:
            return  # already cosigned by this peer
        try:
            with NodeClient(self._identity, peer, timeout=WITNESS_TIMEOUT) as client:
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
            log.warning("witness %s: %s", peer.name, exc)
            self._audit.record(
                "witness.failed",
                {"witness": peer.name, "size": checkpoint.size, "reason": str(exc)},
                actor=self._identity.name,
            )

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

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
