"""Audit-log vocabulary both sides share: the log's origin line and the event a node records.

A node writes events to its log (``govshare.node.audit.auditlog``); auditors and analysts name a
node's log by its origin when they verify checkpoints and receipts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def log_origin(federation: str, node: str) -> str:
    """The checkpoint origin line of ``node``'s audit log."""
    return f"govshare/{federation}/{node}"


@dataclass(frozen=True)
class Event:
    """One event for :meth:`AuditLog.record_many`, the arguments of :meth:`AuditLog.record`."""

    kind: str
    fields: Mapping[str, object]
    actor: str
    query_id: str | None = None
