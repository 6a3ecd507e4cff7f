"""A serving node's view of the signed federation roster, reloaded when its file changes.

The administrator enrols members and publishes the re-signed roster into each node's identity
bundle (``govshare federation publish``). A running node notices the new file at its next call,
checks the CA's signature, and adopts it only if its version is not older than the one it holds:
a new analyst can connect, and a re-issued certificate replaces the old one, without a restart.
A file that does not verify, or an older version (a rollback), is refused and logged; the node
keeps serving with the roster it had.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cryptography import x509

from govshare.model.identity import Roster
from govshare.node.audit.sink import AuditSink
from govshare.protocols.errors import GovshareError


class RosterFile:
    def __init__(
        self,
        path: Path,
        ca_cert_pem: bytes,
        initial: Roster,
        *,
        audit: AuditSink | None = None,
        actor: str = "",
    ) -> None:
        self._path = path
        self._ca = x509.load_pem_x509_certificate(ca_cert_pem)
        self._roster = initial
        self._audit = audit
        self._actor = actor
        self._seen = self._stamp()
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[int, int]:
        try:
            stat = os.stat(self._path)
        except OSError:
            return (0, 0)
        return (stat.st_mtime_ns, stat.st_size)

    def current(self) -> Roster:
        """The newest verified roster (one ``stat`` per call when nothing changed)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return self._roster
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                self._reload()
            return self._roster

    def _reload(self) -> None:
        try:
            candidate = Roster.verify(self._path.read_bytes(), self._ca)
        except (GovshareError, OSError) as exc:
            self._record("roster.refused", {"reason": f"does not verify: {exc}"})
            return
        if candidate.federation != self._roster.federation:
            self._record("roster.refused", {"reason": "roster of another federation"})
            return
        if candidate.version < self._roster.version:
            self._record(
                "roster.refused",
                {"reason": "rollback", "version": candidate.version,
                 "held": self._roster.version},
            )  # fmt: skip
            return
        if candidate.version > self._roster.version:
            kept = {m.name for m in candidate.members}
            removed = sorted(m.name for m in self._roster.members if m.name not in kept)
            fields: dict[str, object] = {
                "version": candidate.version, "members": len(candidate.members),
            }  # fmt: skip
            if removed:
                fields["removed"] = removed
            if candidate.note:
                fields["note"] = dict(candidate.note)
            self._record("roster.updated", fields)
        self._roster = candidate

    def _record(self, kind: str, fields: dict[str, object]) -> None:
        if self._audit is not None:
            self._audit.record(kind, fields, actor=self._actor)
