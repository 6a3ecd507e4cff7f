"""The protocol state every query kind keeps while it runs: the messages expected from peers.

A :class:`Mailbox` holds one :class:`Inbox` per message the node's part expects. A peer's
message arrives as ordered chunks (``govshare.node.api.services`` takes them off the wire) and is
complete when every announced item is in; a message refused midway leaves its inbox empty, so
the sender may send it again. The node's part :meth:`~Mailbox.wait` s for each message with the
protocol timeout, giving its computing turn back meanwhile (``govshare.node.queries.capacity``).

A query ends early — a participant's part failed, the analyst withdrew it, the node is stopping
— through :meth:`Mailbox.end`: every wait wakes at once and raises
:class:`~govshare.protocols.errors.Aborted` with the reason; nothing is released. The part's
long local steps end too, within one batch: its loops over rows call :meth:`Mailbox.check`
between batches, and its work on the process pool goes through :meth:`Mailbox.pool`, whose
jobs not yet started are cancelled at the end and whose waits wake at once (a job already
running finishes: one chunk or batch). So a stopping node is not held by a query that is
reading, normalising or masking a million keys.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, overload

from govshare.protocols.errors import Aborted, MalformedInput

P = ParamSpec("P")
T = TypeVar("T")

Waiting = Callable[[], AbstractContextManager[None]]
"""Entered while a query's thread waits for a peer (a turn given back; see ``capacity``)."""

NO_GATE: Waiting = nullcontext

Chunks = Iterator[tuple[int, bytes, list[bytes]]]
"""One peer message as it came off the wire: ``(total, packed points, items)`` chunks."""

Send = Callable[[str, str, str, Sequence[bytes], Sequence[bytes]], None]
"""``send(peer_node, query_id, phase, points, items)``: one message to a peer (Peer.Deliver)."""


@dataclass
class Inbox:
    """One message arriving from a peer, chunk by chunk: points and/or opaque items."""

    total: int = -1
    points: list[bytes] = field(default_factory=list)
    items: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def fill(self, total: int, chunks: Iterable[tuple[int, list[bytes], list[bytes]]]) -> int:
        """Take a message's chunks ``(total, points, items)`` in order; returns items taken.

        The first chunk's total is announced as ``total``. A refusal (a repeated message, a
        changed or exceeded total, a short stream) leaves the inbox as it was before: the
        sender may send the message again.

        Raises:
            MalformedInput: the message is malformed; nothing of it was kept.
        """
        if self.done.is_set() or self.total != -1:
            raise MalformedInput("this message was already sent", field="phase")
        if total < 0:
            raise MalformedInput("field 'total' must not be negative", field="total")
        self.total = total
        received = 0
        try:
            for chunk_total, points, items in chunks:
                if chunk_total != total:
                    raise MalformedInput("field 'total' changed between chunks", field="total")
                received += max(len(points), len(items))
                if received > total:
                    raise MalformedInput("more items than the announced total", field="points")
                self.points.extend(points)
                self.items.extend(items)
            if received != total:
                raise MalformedInput(
                    f"stream ended after {received} of {total} items", field="points"
                )
        except BaseException:
            self.total = -1
            self.points.clear()
            self.items.clear()
            raise
        self.done.set()
        return received


class Mailbox:
    """The inboxes of one query's part at this node, and how the part ends early."""

    def __init__(self, phases: Iterable[str]) -> None:
        self.inboxes: dict[str, Inbox] = {phase: Inbox() for phase in phases}
        self.ended: str | None = None
        # Done once the part ended: wakes a wait on pool jobs (concurrent.futures.wait).
        self._ending: Future[str] = Future()
        self._lock = threading.Lock()

    def end(self, reason: str) -> None:
        """End the query's part: every wait wakes and raises Aborted with ``reason``, and so
        does the next :meth:`check` or wait on the part's pool."""
        with self._lock:
            first = self.ended is None
            if first:
                self.ended = reason
        for inbox in self.inboxes.values():
            inbox.done.set()
        if first:
            self._ending.set_result(reason)  # runs the pools' cancellations

    def check(self, node: str) -> None:
        """Between two batches of long local work: go on, unless the part ended.

        Raises:
            Aborted: the query's part ended (as a wait would).
        """
        if self.ended is not None:
            raise Aborted(f"{node}: {self.ended}; nothing released")

    @overload
    def pool(self, executor: Executor, node: str) -> EndingPool: ...

    @overload
    def pool(self, executor: None, node: str) -> None: ...

    def pool(self, executor: Executor | None, node: str) -> EndingPool | None:
        """``executor`` (the node's process pool) for this part's jobs: see :class:`EndingPool`;
        None when the node has no pool (its parts work inline)."""
        return None if executor is None else EndingPool(executor, self, node)

    def wait(
        self,
        phase: str,
        *,
        node: str,
        peer: str,
        what: str,
        timeout: float,
        waiting: Waiting = NO_GATE,
    ) -> Inbox:
        """The complete message ``phase`` from ``peer``.

        Raises:
            Aborted: the peer did not send it within ``timeout``, or the query ended early.
        """
        inbox = self.inboxes[phase]
        with waiting():
            arrived = inbox.done.wait(timeout)
        if self.ended is not None:
            raise Aborted(f"{node}: {self.ended}; nothing released")
        if not arrived:
            raise Aborted(
                f"{node}: node {peer} did not send its {what} within {timeout:g} s; "
                "query aborted, nothing released"
            )
        return inbox


class EndingPool(Executor):
    """The node's pool as one query's part uses it: ended with the part.

    When the part ends (:meth:`Mailbox.end`), every job submitted here that has not started is
    cancelled, and :meth:`result` and :meth:`map` stop waiting and raise
    :class:`~govshare.protocols.errors.Aborted`; a job already running in a worker finishes
    (one chunk of work) and its result is dropped. Shutting this down leaves the node's pool
    alone.
    """

    def __init__(self, executor: Executor, mailbox: Mailbox, node: str) -> None:
        self._executor = executor
        self._mailbox = mailbox
        self._node = node
        self._jobs: list[Future[Any]] = []
        self._lock = threading.Lock()
        mailbox._ending.add_done_callback(lambda _: self._cancel())

    def _cancel(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.cancel()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Submit a job, unless the part ended.

        Raises:
            Aborted: the part ended.
        """
        self._mailbox.check(self._node)
        job = self._executor.submit(fn, *args, **kwargs)
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.done()]
            self._jobs.append(job)
        if self._mailbox.ended is not None:  # ended meanwhile: its cancellation ran before
            job.cancel()
            self._mailbox.check(self._node)
        return job

    def result(self, job: Future[T], timeout: float | None = None) -> T:
        """``job``'s result, once it is done or the part ended, whichever comes first; with
        ``timeout``, after at most that many seconds.

        Raises:
            Aborted: the part ended first.
            TimeoutError: ``job`` was not done within ``timeout`` seconds.
        """
        either: list[Future[Any]] = [job, self._mailbox._ending]
        wait(either, timeout=timeout, return_when=FIRST_COMPLETED)
        self._mailbox.check(self._node)
        return job.result(timeout=0)  # done, unless the timeout passed first

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Results in order, as :meth:`Executor.map`; every job is submitted at once.

        ``timeout``: seconds from this call after which a result not yet done is no longer
        waited for (the iterator raises TimeoutError; the jobs left are cancelled). ``chunksize``:
        calls that go to the pool as one job, as :meth:`ProcessPoolExecutor.map
        <concurrent.futures.ProcessPoolExecutor.map>` chops them (fewer, larger jobs: less
        pickling and fewer round trips; a job running when the part ends finishes its chunk).

        Raises:
            ValueError: ``chunksize`` below 1.

        Raises (while iterating):
            Aborted: the part ended; the jobs left are cancelled.
            TimeoutError: a result was not done ``timeout`` seconds after this call.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        jobs: list[Future[Any]]
        if chunksize == 1:
            jobs = [self.submit(fn, *args) for args in calls]
        else:
            chunks = iter(lambda: list(itertools.islice(calls, chunksize)), [])
            jobs = [self.submit(_calls, fn, chunk) for chunk in chunks]

        def results() -> Iterator[T]:
            try:
                for job in jobs:
                    left = None if deadline is None else deadline - time.monotonic()
                    if chunksize == 1:
                        yield self.result(job, left)
                    else:
                        yield from self.result(job, left)
            finally:
                for job in jobs:
                    job.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The node's pool outlives the query: only this part's jobs are cancelled."""
        if cancel_futures:
            self._cancel()


def _calls(fn: Callable[..., T], chunk: Sequence[tuple[Any, ...]]) -> list[T]:
    """``fn`` over one chunk of :meth:`EndingPool.map`'s arguments, in a worker: one job."""
    return [fn(*args) for args in chunk]
