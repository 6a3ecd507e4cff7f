"""Peer nodes witness each other's audit-log checkpoints.

Each node submits its newest signed checkpoint to every peer, with a consistency proof from
the size that peer last cosigned (C2SP tlog-witness, adapted to gRPC). The witness

1. verifies the checkpoint's signature with the submitting node's Ed25519 key from the signed
   roster (no trust on first use) under the origin ``govshare/<federation>/<node>``;
2. refuses an ``old_size`` other than the size it holds (the node learns the witness's size
   and retries), a smaller size (rollback), the same size with another root (fork), and a proof
   that does not show the new tree extends the old one (fork) — each refusal logged as
   ``witness.refused`` (actor: the submitting node; fields ``log``, ``rule``, ``reason``, the
   refused note as ``checkpoint`` and the note held as ``cosigned``), which auditors collect
   (:mod:`govshare.client.auditor`) and hold against the submitting node;
3. stores the new checkpoint as the latest it cosigned for that node, atomically (a
   compare-and-set on the old size and root), and only then returns its cosignature
   (tlog-cosignature/v1, with the witness's timestamp).

First contact follows C2SP tlog-witness: old size 0 with an empty proof is accepted
(``merkle.verify_witness_consistency``), since every tree extends the empty tree.

What a cosignature proves: at its timestamp, this witness had seen no checkpoint of the node's
log inconsistent with this one. A node that forks its log must show each witness one branch
only; an auditor who collects cosigned checkpoints from several witnesses detects the fork.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from govshare.model.events import log_origin
from govshare.model.identity import Identity, Member
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.sqlite import connect, immediate
from govshare.protocols.checkpoint import Checkpoint, cosign, open_checkpoint
from govshare.protocols.errors import Conflict, VerificationFailed
from govshare.protocols.merkle import tree_hasher

SCHEMA = """
CREATE TABLE IF NOT EXISTS witnessed (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    note BLOB NOT NULL,
    cosigned_at INTEGER NOT NULL
)
"""


@dataclass(frozen=True)
class Witnessed:
    size: int
    root: bytes
    note: bytes


class WitnessStore:
    """The last checkpoint this node cosigned for each peer log, in the node's SQLite store."""

    def __init__(self, path: Path) -> None:
        self._db = connect(path, shared=True)
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()

    def get(self, origin: str) -> Witnessed | None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, root, note FROM witnessed WHERE origin = ?", (origin,)
            ).fetchone()
        return None if row is None else Witnessed(int(row[0]), bytes(row[1]), bytes(row[2]))

    def advance(self, origin: str, old: Witnessed | None, new: Witnessed, cosigned_at: int) -> None:
        """Replace ``old`` by ``new`` atomically; a concurrent change raises Conflict."""
        with self._lock:
            with immediate(self._db):
                if old is None:
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO witnessed VALUES (?, ?, ?, ?, ?)",
                        (origin, new.size, new.root, new.note, cosigned_at),
                    )
                else:
                    cursor = self._db.execute(
                        "UPDATE witnessed SET size = ?, root = ?, note = ?, cosigned_at = ? "
                        "WHERE origin = ? AND size = ? AND root = ?",
                        (new.size, new.root, new.note, cosigned_at, origin, old.size, old.root),
                    )
                if cursor.rowcount != 1:
                    raise Conflict(f"{origin}: witness state changed concurrently; retry")

    def close(self) -> None:
        self._db.close()


class Witness:
    def __init__(
        self,
        identity: Identity,
        store: WitnessStore,
        *,
        audit: AuditSink | None,
        clock: Callable[[], float],
    ) -> None:
        self._identity = identity
        self._store = store
        self._audit = audit
        self._clock = clock

    def _refuse(
        self,
        member: Member,
        origin: str,
        rule: str,
        message: str,
        *,
        note: bytes,
        held: Witnessed | None,
    ) -> Conflict:
        """Log the refusal with its evidence and return the error to raise.

        The entry keeps the refused checkpoint (``checkpoint``) and the one this witness had
        cosigned (``cosigned``), both signed by the member: anyone can check that the member
        did sign what was refused, and a fork (two signed checkpoints of one size with
        different roots) proves itself.
        """
        if self._audit is not None:
            fields: dict[str, object] = {
                "log": origin,
                "rule": rule,
                "reason": message,
                "checkpoint": note.decode("utf-8"),
            }
            if held is not None:
                fields["cosigned"] = held.note.decode("utf-8")
            self._audit.record("witness.refused", fields, actor=member.name)
        return Conflict(f"refused by rule {rule}: {message}")

    def witness(
        self, member: Member, note: bytes, old_size: int, proof: Sequence[bytes]
    ) -> tuple[bytes, int]:
        """Check and cosign ``member``'s checkpoint; return (cosignature line, size held).

        When ``old_size`` is not the size this witness holds, nothing is cosigned: the line is
        empty and the size held is returned, so the node can send a proof from that size.

        Raises:
            VerificationFailed: not signed by the member's roster key.
            Conflict: a rollback, a fork at equal size, or a proof that does not show the new
                tree extends the one cosigned before (each logged as ``witness.refused``).
        """
        origin = log_origin(self._identity.roster.federation, member.name)
        checkpoint: Checkpoint = open_checkpoint(note, member.verify_key(), origin=origin)
        held = self._store.get(origin)
        held_size = held.size if held else 0
        merkle = tree_hasher(self._identity.roster.crypto)
        held_root = held.root if held else merkle.empty_root
        if checkpoint.size < held_size:
            raise self._refuse(
                member, origin, "witness.rollback",
                f"checkpoint of size {checkpoint.size} is older than the {held_size} "
                "this witness cosigned",
                note=note, held=held,
            )  # fmt: skip
        if held is not None and checkpoint.size == held_size and checkpoint.root != held_root:
            raise self._refuse(
                member, origin, "witness.fork",
                f"two checkpoints of size {held_size} with different roots",
                note=note, held=held,
            )  # fmt: skip
        if old_size != held_size:
            # Not an error: the submitter learns the size held and sends a proof from it.
            return b"", held_size
        try:
            merkle.verify_witness_consistency(
                held_size, checkpoint.size, list(proof), held_root, checkpoint.root
            )
        except VerificationFailed:
            raise self._refuse(
                member, origin, "witness.inconsistent",
                f"checkpoint of size {checkpoint.size} does not extend size {held_size}",
                note=note, held=held,
            ) from None  # fmt: skip
        now = int(self._clock())
        if held is None or checkpoint.size != held_size:
            self._store.advance(
                origin, held, Witnessed(checkpoint.size, checkpoint.root, note), now
            )
        signature = cosign(
            checkpoint, self._identity.signing_key, name=self._identity.name, now=now
        )
        if self._audit is not None:
            self._audit.record(
                "witness.cosigned",
                {"log": origin, "size": checkpoint.size, "root": checkpoint.root.hex()},
                actor=member.name,
            )
        return signature.line(), checkpoint.size
