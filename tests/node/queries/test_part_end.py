"""A query part's long local work ends with the part (``Mailbox.check``, ``Mailbox.pool``).

The jobs here block on events the test holds, so what ended them can only be the part's end:
nothing waits on a timer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from govshare.node.queries.kinds.aggregate import ROWS_PER_CHECK, _checked
from govshare.node.queries.session import Mailbox
from govshare.protocols.errors import Aborted

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
