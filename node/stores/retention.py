"""Retention of the membership results a receiving node keeps (issue 12, item 5).

A node that receives a membership query keeps which of its own keys matched
(:meth:`QueryStore.save_matches <govshare.node.stores.query_store.QueryStore.save_matches>`), so
that its department can act on them (``govshare node results``). They are personal data with a
purpose, not an archive: ``[retention] results_days = N`` in ``node.toml`` deletes each result N
days after it was saved, overwritten (``secure_delete``, WAL truncated), and logs the deletion
(``results.expired``: the queries, how many keys, the retention). 0 keeps them until removed by
hand.

:class:`ResultsRetention` runs one pass when the node starts and then one every
:data:`PASS_INTERVAL` seconds in a background thread; a pass takes ``now`` so that tests move
the clock instead of waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from govshare.node.audit.sink import AuditSink
from govshare.node.stores.query_store import QueryStore

__all__ = ["DAY", "PASS_INTERVAL", "ResultsRetention"]

log = logging.getLogger(__name__)

DAY: Final = 86_400
# Seconds between two passes: results outlive their retention by at most this much.
PASS_INTERVAL: Final = 3600.0


@dataclass
class ResultsRetention:
    """Deletes membership results older than ``days`` (0: never) and logs it as ``actor``."""

    store: QueryStore
    audit: AuditSink
    days: int
    actor: str
    clock: Callable[[], float] = time.time
    interval: float = PASS_INTERVAL
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def run(self, *, now: float | None = None) -> list[tuple[str, int]]:
        """One pass: delete what is older than the retention at ``now`` (default: the clock),
        log it, and return (query id, keys) of each result deleted."""
        if self.days <= 0:
            return []
        at = self.clock() if now is None else now
        deleted, truncated = self.store.expire_results(saved_before=int(at) - self.days * DAY)
        if deleted:
            self.audit.record(
                "results.expired",
                {
                    "queries": [query_id for query_id, _ in deleted],
                    "keys": sum(keys for _, keys in deleted),
                    "results_days": self.days,
                    "secure_delete": True,
                    "wal_truncated": truncated,
                },
                actor=self.actor,
            )
        return deleted

    def start(self) -> None:
        """A pass now, then one every ``interval`` seconds until :meth:`stop`."""
        self.run()
        if self.days <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._loop, name=f"govshare-{self.actor}-retention", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run()
            except Exception:  # a store locked too long: the next pass tries again
                log.warning(
                    "results retention pass failed; retrying in %ss", self.interval, exc_info=True
                )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
