"""The narrow interface the rest of the node uses to write to its audit log.

The catalogue, grant store, policy gate and query path depend on this protocol, not on the log's
storage, so they can be tested with any recorder and wired to the real log by the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class AuditSink(Protocol):
    def record(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str,
        query_id: str | None = None,
    ) -> int:
        """Append one entry durably and return its index in the log.

        ``kind`` is a dotted event name (``rpc.received``, ``policy.decision``,
        ``dataset.added``, ``grant.created``, ``protocol.step``, ``result.released``);
        ``fields`` hold str, int, bool, None, bytes, or lists/dicts of those — no floats;
        ``actor`` is the verified identity that caused the event (a member name or
        ``operator:<node>`` for local commands).
        """
        ...
