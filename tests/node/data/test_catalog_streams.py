"""A stream of rows (``Catalogue.rows``) abandoned by its reader closes cleanly wherever it is
closed: a query that fails or ends midway leaves its stream to whoever drops it last, and the
garbage collector may do that in any thread of the node. Real SQLite files, in the clear and
sealed at rest; the drop happens in a thread of the test's own."""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import benefits

from govshare.node.data.catalog import BATCH_ROWS, Catalogue

WAIT = 60.0  # generous: only a hung thread would reach it
ROWS = BATCH_ROWS + 10  # more than one sealed chunk: the stream is mid-read when dropped


@pytest.fixture(scope="module", params=["clear", "sealed"])
def catalogue(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Catalogue:
    """A dataset of ``ROWS`` rows, stored in the clear or sealed at rest."""
    return benefits(tmp_path_factory.mktemp(request.param), request.param, ROWS)


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What Python reports as 'Exception ignored in ...' (a generator's failed clean-up among
    them) while the test runs, instead of printing it."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def drop_in_another_thread(box: list[Iterator[Any]]) -> None:
    """Drop the last reference to the stream in ``box`` from a new thread, as a collection in
    another of the node's threads would."""
    thread = threading.Thread(target=box.clear)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_a_stream_abandoned_midway_and_dropped_in_another_thread_closes_cleanly(
    catalogue: Catalogue, unraisable: list[Any]
) -> None:
    stream = catalogue.rows("benefits", ["id_number", "amount"])
    assert len(next(stream)) == 2  # the stream's connection is open, the read under way
    assert inspect.getgeneratorstate(stream) == inspect.GEN_SUSPENDED
    box: list[Iterator[Any]] = [stream]
    del stream
    drop_in_another_thread(box)
    assert [(u.exc_type, str(u.exc_value), repr(u.object)) for u in unraisable] == []
    # The catalogue goes on serving reads in this thread.
    assert sum(1 for _ in catalogue.rows("benefits", ["amount"])) == ROWS


def test_a_stream_closed_in_another_thread_closes_cleanly(
    catalogue: Catalogue, unraisable: list[Any]
) -> None:
    """A reader may also close the stream itself from another thread (one that took over the
    query's clean-up): the close succeeds there."""
    stream = catalogue.rows("benefits", ["district"])
    next(stream)
    raised: list[BaseException] = []

    def close() -> None:
        try:
            stream.close()
        except BaseException as exc:  # reported by the assertion below
            raised.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert raised == []
    assert inspect.getgeneratorstate(stream) == inspect.GEN_CLOSED
    assert [(u.exc_type, str(u.exc_value), repr(u.object)) for u in unraisable] == []
