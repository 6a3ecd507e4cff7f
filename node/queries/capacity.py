"""Admission control for query runs: a few computing, a bounded queue, a clear refusal beyond.

A node runs the protocol part of at most ``max_running`` queries at once; up to ``max_queued``
more are admitted and wait for a turn; a run beyond those is refused at once with
``RESOURCE_EXHAUSTED`` and a retry hint (:class:`~govshare.protocols.errors.ResourceExhausted`),
never left hanging.

"Running" means *computing*: a query holds one of the ``max_running`` turns while it reads its
data, masks, encrypts or sums, and gives its turn back while it waits for a peer's message
(:meth:`RunGate.waiting`). That is what keeps two busy nodes from stalling each other: if a
waiting query kept its turn, node A's turns could all be held by queries waiting for parts that
sit in node B's queue behind queries waiting for A — each node waiting on the other until the
protocol timeout. Peer messages themselves never need a turn (the server takes them on its
event loop, ``govshare.node.api.server``), so every admitted query's peer can always deliver.

Each admitted query runs its protocol part on a thread of its own (a pool of
``max_running + max_queued`` threads); the CPU-heavy work inside goes to the node's process
pool, so the threads only wait — on a turn, a peer, or a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from govshare.protocols.errors import Aborted, ResourceExhausted

# The node's own log says how loaded it was; a refusal says only "at capacity" and when to
# come back: how many runs another department's analysts have at this node is theirs.
logger = logging.getLogger(__name__)

T = TypeVar("T")

# Finished runs whose pace estimates waits and the retry hint.
_RECENT_RUNS = 32
# The retry hint's bounds, in seconds.
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 120.0


@dataclass(frozen=True)
class Load:
    """A snapshot of the gate: queries computing, admitted and waiting, and the limits."""

    computing: int
    admitted: int
    max_running: int
    max_queued: int

    @property
    def queued(self) -> int:
        """Admitted queries not computing: waiting for a turn or for a peer."""
        return self.admitted - self.computing


class RunGate:
    """Turns and queue places for query runs (see the module docstring)."""

    def __init__(
        self,
        *,
        node: str,
        max_running: int,
        max_queued: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self._node = node
        self._max_running = max_running
        self._max_queued = max_queued
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._admitted = 0
        self._computing = 0
        # Runs admitted per query id, and why a query's queued run must leave (withdrawn).
        self._places: Counter[str] = Counter()
        self._withdrawn: dict[str, str] = {}
        self._closed: str | None = None
        self._finished: deque[float] = deque(maxlen=_RECENT_RUNS)
        self._holding = threading.local()
        self._threads = ThreadPoolExecutor(
            max_workers=max_running + max_queued, thread_name_prefix=f"govshare-{node}-query"
        )

    def load(self) -> Load:
        with self._lock:
            return Load(self._computing, self._admitted, self._max_running, self._max_queued)

    def admit(
        self, query_id: str, *, deadline: float | None = None
    ) -> Callable[[Callable[[], T]], T]:
        """A place for one run of ``query_id``, or :class:`ResourceExhausted` at once when none
        is left — or when, at the rate runs have been finishing here, this one would end only
        after ``deadline`` (seconds the caller still waits; None: no deadline): a run that
        cannot finish in time is refused now rather than left to hold a place in vain.

        Returns ``enter``: call it (on the query's own thread) with the run's body; it waits
        for a turn, runs the body holding it, and gives the place back however the body ends.
        A run withdrawn while it waits for a turn (:meth:`withdraw`) leaves at once with
        :class:`~govshare.protocols.errors.Aborted`.
        """
        with self._lock:
            load = (
                f"{self._computing} running, {self._admitted - self._computing} queued "
                f"(limits {self._max_running} and {self._max_queued})"
            )
            rate = self._rate()
            if self._admitted >= self._max_running + self._max_queued:
                retry_after = _bounded(1 / rate if rate else MIN_RETRY_AFTER)
                logger.info("node %s refused query %s: at capacity, %s", self._node, query_id, load)
                raise ResourceExhausted(
                    f"at capacity; retry in {retry_after:.0f} s", retry_after=retry_after
                )
            expected = (self._admitted + 1) / rate if rate else None
            if deadline is not None and expected is not None and expected > deadline:
                retry_after = _bounded(expected - deadline)
                logger.info(
                    "node %s refused query %s: %s; at %.2f runs a second it would end in about "
                    "%.0f s, after its deadline in %.0f s",
                    self._node, query_id, load, rate, expected, deadline,
                )  # fmt: skip
                raise ResourceExhausted(
                    f"at capacity: a run now would end after the call's deadline in "
                    f"{deadline:.0f} s; retry in {retry_after:.0f} s",
                    retry_after=retry_after,
                )
            self._admitted += 1
            self._places[query_id] += 1
        entered = threading.Event()

        def enter(body: Callable[[], T]) -> T:
            if entered.is_set():
                raise TypeError("a place is entered once")
            entered.set()
            self._holding.query_id = query_id
            try:
                with self._turn():
                    return body()
            finally:
                with self._lock:
                    self._admitted -= 1
                    self._places[query_id] -= 1
                    if self._places[query_id] <= 0:
                        del self._places[query_id]
                        self._withdrawn.pop(query_id, None)
                    self._finished.append(self._clock())
                    self._changed.notify_all()

        return enter

    @property
    def threads(self) -> ThreadPoolExecutor:
        """The query threads: one per place, so an admitted query never waits for a thread."""
        return self._threads

    def withdraw(self, query_id: str, reason: str) -> None:
        """A query's runs still waiting for a turn leave at once with ``reason`` (the analyst
        withdrew it): they must not hold a place until their turn comes only to find it
        cancelled."""
        with self._lock:
            if query_id in self._places:
                self._withdrawn[query_id] = reason
                self._changed.notify_all()

    def close(self, reason: str) -> None:
        """Every run still waiting for a turn leaves with ``reason`` (the node is stopping)."""
        with self._lock:
            self._closed = reason
            self._changed.notify_all()

    def _take_turn(self) -> None:
        query_id = self._holding.query_id
        with self._lock:

            def ready() -> bool:
                return (
                    self._computing < self._max_running
                    or query_id in self._withdrawn
                    or self._closed is not None
                )

            self._changed.wait_for(ready)
            reason = self._withdrawn.get(query_id) or self._closed
            if reason is not None:
                raise Aborted(f"{self._node}: {reason}; nothing released")
            self._computing += 1
        self._holding.turn = True

    def _give_turn(self) -> None:
        self._holding.turn = False
        with self._lock:
            self._computing -= 1
            self._changed.notify_all()

    @contextmanager
    def _turn(self) -> Iterator[None]:
        self._take_turn()
        try:
            yield
        finally:
            if self._is_holding():
                self._give_turn()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Give this thread's turn back while it waits for a peer; take one again after."""
        if not self._is_holding():
            yield
            return
        self._give_turn()
        try:
            yield
        finally:
            self._take_turn()

    def _is_holding(self) -> bool:
        return bool(getattr(self._holding, "turn", False))

    def _rate(self) -> float | None:
        """Runs finished per second over the recent ones, up to now (a stall lowers it); None
        before any has finished."""
        if not self._finished:
            return None
        span = self._clock() - self._finished[0]
        return len(self._finished) / span if span > 0 else None

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no run is admitted; whether none is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._admitted == 0, timeout)

    def shutdown(self) -> None:
        self.close("the node stopped")
        self._threads.shutdown(wait=False, cancel_futures=True)


def _bounded(retry_after: float) -> float:
    return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, retry_after))


class Intake:
    """A bound on submissions being taken at once (signature, replay, policy, reservation:
    store and log writes, one after another at the node's database). Beyond it a submission is
    refused at once with ``RESOURCE_EXHAUSTED`` rather than left to wait past its deadline.

    Used from the event loop only (no lock needed)."""

    def __init__(self, *, node: str, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._node = node
        self._limit = limit
        self._taking = 0

    @property
    def taking(self) -> int:
        return self._taking

    @contextmanager
    def place(self) -> Iterator[None]:
        if self._taking >= self._limit:
            logger.info("node %s refused a submission: taking %d already", self._node, self._taking)
            raise ResourceExhausted(
                f"busy taking submissions; retry in {MIN_RETRY_AFTER:.0f} s",
                retry_after=MIN_RETRY_AFTER,
            )
        self._taking += 1
        try:
            yield
        finally:
            self._taking -= 1
