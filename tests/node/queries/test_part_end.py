"""A query part's long local work ends with the part (``Mailbox.check``, ``Mailbox.pool``).

The jobs here block on events the test holds, so what ended them can only be the part's end:
nothing waits on a timer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import pytest

from govshare.node.queries.kinds.aggregate import ROWS_PER_CHECK, _checked
from govshare.node.queries.session import Mailbox
from govshare.protocols.errors import Aborted

P = ParamSpec("P")
T = TypeVar("T")

WAIT = 60.0  # generous: only a broken end would reach it
REASON = "node tax is stopping"
ENDED = f"tax: {REASON}; nothing released"


def test_check_goes_on_until_the_part_ends_then_raises_its_reason() -> None:
    mailbox = Mailbox(())
    mailbox.check("tax")
    mailbox.end(REASON)
    mailbox.end("a second reason")  # the first one stands
    with pytest.raises(Aborted) as ended:
        mailbox.check("tax")
    assert str(ended.value) == ENDED


def test_the_end_wakes_a_map_and_cancels_the_jobs_not_started() -> None:
    """One worker, three jobs: the first runs and blocks, the others wait for the worker. The
    part's end wakes the map at once (the first job still running), and the two waiting jobs
    never run."""
    mailbox = Mailbox(())
    release, started = threading.Event(), threading.Event()
    ran: list[int] = []

    def job(n: int) -> int:
        started.set()
        ran.append(n)
        assert release.wait(WAIT)
        return n

    with ThreadPoolExecutor(1) as executor:
        pool = mailbox.pool(executor, "tax")
        results = pool.map(job, [1, 2, 3])
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                list(results)
            except Aborted as exc:
                errors.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert started.wait(WAIT)
        mailbox.end(REASON)
        consumer.join(WAIT)
        assert not consumer.is_alive()  # woken while job 1 still blocks
        assert [str(e) for e in errors] == [ENDED]
        release.set()
    assert ran == [1]  # jobs 2 and 3 were cancelled before they started


def test_result_returns_a_finished_job_and_submit_refuses_after_the_end() -> None:
    mailbox = Mailbox(())
    with ThreadPoolExecutor(1) as executor:
        pool = mailbox.pool(executor, "tax")
        assert pool.result(pool.submit(pow, 2, 10)) == 1024
        mailbox.end(REASON)
        with pytest.raises(Aborted, match="nothing released"):
            pool.submit(pow, 2, 10)
        pool.shutdown()  # the node's pool goes on
        assert executor.submit(pow, 3, 2).result(WAIT) == 9


def test_a_read_of_rows_ends_within_one_check_of_the_part_s_end() -> None:
    """The aggregate kinds read rows through ``_checked``: an endless read whose part ends at
    row 10,000 stops by the next check, without reading on."""
    mailbox = Mailbox(())
    read: list[int] = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            read.append(n)
            if n == 10_000:
                mailbox.end(REASON)
            yield n
            n += 1

    with pytest.raises(Aborted) as ended:
        for _ in _checked(endless(), mailbox, "tax"):
            pass
    assert str(ended.value) == ENDED
    assert 10_000 < len(read) <= 10_001 + ROWS_PER_CHECK


class Counting(ThreadPoolExecutor):
    """A thread pool that counts the jobs submitted to it."""

    jobs = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize(("chunksize", "jobs"), [(1, 10), (3, 4), (10, 1), (64, 1)])
def test_map_sends_chunksize_calls_as_one_job(chunksize: int, jobs: int) -> None:
    with Counting(2) as executor:
        pool = Mailbox(()).pool(executor, "tax")
        got = list(pool.map(pow, range(10), [2] * 10, chunksize=chunksize))
        assert got == [n * n for n in range(10)]  # in order, as the calls were given
        assert executor.jobs == jobs
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            pool.map(pow, [2], [2], chunksize=0)


def test_chunks_run_on_a_process_pool() -> None:
    """The chunk's job is a module-level function of fn and its arguments: it pickles."""
    with ProcessPoolExecutor(1) as executor:
        pool = Mailbox(()).pool(executor, "tax")
        assert list(pool.map(divmod, range(7), [3] * 7, chunksize=3)) == [
            divmod(n, 3) for n in range(7)
        ]


def test_map_times_out_from_its_call_and_cancels_what_is_left() -> None:
    """One worker, three jobs, the first blocked on an event the test holds: past the timeout
    the iterator raises TimeoutError and the two jobs waiting never run."""
    release = threading.Event()
    ran: list[int] = []

    def job(n: int) -> int:
        ran.append(n)
        assert release.wait(WAIT)
        return n

    with ThreadPoolExecutor(1) as executor:
        pool = Mailbox(()).pool(executor, "tax")
        results = pool.map(job, [1, 2, 3], timeout=0.05)
        with pytest.raises(TimeoutError):
            next(results)
        release.set()
    assert ran == [1]


def test_the_part_s_end_wakes_a_map_with_a_timeout_before_the_timeout() -> None:
    """A timeout only bounds the wait: the part's end still ends it at once, as Aborted."""
    mailbox = Mailbox(())
    release, started = threading.Event(), threading.Event()

    def job(n: int) -> int:
        started.set()
        assert release.wait(WAIT)
        return n

    with ThreadPoolExecutor(1) as executor:
        results = mailbox.pool(executor, "tax").map(job, [1, 2], timeout=10 * WAIT, chunksize=2)
        assert started.wait(WAIT)
        mailbox.end(REASON)
        with pytest.raises(Aborted) as ended:
            next(results)
        assert str(ended.value) == ENDED
        release.set()
