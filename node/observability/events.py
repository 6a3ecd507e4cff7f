"""The events of a query's life at one node, and the fan-out that hands them to subscribers.

The query engine (``govshare.node.queries.engine``) emits one :class:`QueryEvent` at each step
(``received``, ``decided``, ``running``, ``released`` / ``failed``, ``settled``, ``cancelled``,
``expired``); the node's logs and metrics subscribe. A subscriber never fails a query: its
errors are swallowed (and reported on the ``govshare.node`` logger).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_log = logging.getLogger("govshare.node")
# Until a node's logs are set up (govshare.node.observability.logs), govshare's lines go nowhere,
# never to Python's last-resort handler on stderr, which tools and tests read.
logging.getLogger("govshare").addHandler(logging.NullHandler())

# The event names, in the order a query meets them.
RECEIVED = "received"
DECIDED = "decided"
RUNNING = "running"
RELEASED = "released"
FAILED = "failed"
SETTLED = "settled"
CANCELLED = "cancelled"
EXPIRED = "expired"


@dataclass(frozen=True)
class QueryEvent:
    """One step of one query at one node.

    ``fields`` holds what the step adds (the rule of a decision, the reason of a failure, the
    reservation's state at settlement, the ε settled); never a row, a key or a secret.
    """

    name: str
    node: str
    query_id: str
    kind: str = ""
    dataset: str = ""
    fields: Mapping[str, object] = field(default_factory=dict)


Subscriber = Callable[[QueryEvent], None]


class QueryEvents:
    """Subscribers of a node's query events; :meth:`emit` calls each in turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns the function that removes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def emit(self, event: QueryEvent) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # logs and metrics must never fail a query
                _log.exception("query event subscriber failed on %s", event.name)
