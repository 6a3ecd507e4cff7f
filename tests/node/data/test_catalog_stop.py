"""A long catalogue read ends when its stop check says so (``stop``), within the statement:
a node stopping or a query withdrawn is not held by one SQL read of a large table.

Real SQLite files, in the clear and sealed at rest. Nothing here waits on a clock: the check
counts its own calls and says stop at the third; :data:`STOP_EVERY` is made small so that
SQLite calls it often within a dataset of a few thousand rows (the node's value is measured on
a million, see the constant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import Check, benefits

from govshare.model.conditions import Condition
from govshare.node.data import catalog
from govshare.node.data.catalog import BATCH_ROWS, Catalogue
from govshare.node.queries.session import Mailbox
from govshare.protocols.errors import Aborted

ROWS = 3 * BATCH_ROWS + 10  # four sealed chunks
EVERY_ROW = (Condition("amount", ">=", 0),)  # a filter every row passes: the filtered reads
STOPPED = "the read of dataset 'benefits' was stopped"

Read = Callable[[Catalogue, Any], object]
READS: dict[str, Read] = {
    "keys": lambda c, stop: c.keys("benefits", "id_number", stop=stop),
    "keys, filtered": lambda c, stop: c.keys("benefits", "id_number", where=EVERY_ROW, stop=stop),
    "keys in import order": lambda c, stop: c.keys(
        "benefits", "id_number", import_order=True, stop=stop
    ),
    "count, filtered": lambda c, stop: c.count("benefits", where=EVERY_ROW, stop=stop),
    "row ids": lambda c, stop: c.row_ids("benefits", where=EVERY_ROW, stop=stop),
    "rows, filtered": lambda c, stop: list(
        c.rows("benefits", ["id_number", "amount"], where=EVERY_ROW, stop=stop)
    ),
    # Only the last row passes: the stream's first row comes after a scan of the whole table.
    "rows, the last one": lambda c, stop: list(
        c.rows("benefits", ["id_number"], where=(Condition("amount", "=", ROWS - 1),), stop=stop)
    ),
    "group sums": lambda c, stop: c.group_sums(
        "benefits", group_by="district", sums=[("amount", 1000)], where=EVERY_ROW, stop=stop
    ),
}


@pytest.fixture(scope="module", params=["clear", "sealed"])
def catalogue(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Catalogue:
    """A dataset of ``ROWS`` rows, stored in the clear or sealed at rest: its keys' import
    order is not their sorted order (k10 before k2)."""
    return benefits(tmp_path_factory.mktemp(request.param), request.param, ROWS)


@pytest.fixture(autouse=True)
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite calls the stop check every 50 steps of a statement: many times in these reads."""
    monkeypatch.setattr(catalog, "STOP_EVERY", 50)


@pytest.mark.parametrize("read", READS, ids=list(READS))
def test_a_read_ends_at_the_check_that_says_stop_and_the_next_read_is_whole(
    catalogue: Catalogue, read: str
) -> None:
    whole = READS[read](catalogue, None)
    never = Check(None)
    assert READS[read](catalogue, never) == whole  # a check that never stops changes nothing
    assert never.calls > 3  # looked at during the read, not only before it (the first call)
    stop = Check(3)
    with pytest.raises(Aborted) as stopped:
        READS[read](catalogue, stop)
    assert str(stopped.value) == STOPPED
    assert stop.calls == 3  # the read ended at the third call: it did not read on
    # The catalogue goes on serving: the same read in full, with a check and without.
    assert READS[read](catalogue, Check(None)) == whole
    assert READS[read](catalogue, None) == whole


@pytest.mark.parametrize("read", READS, ids=list(READS))
def test_a_check_that_raises_ends_the_read_with_its_own_error(
    catalogue: Catalogue, read: str
) -> None:
    """What the query kinds pass: ``Mailbox.check``, ended (the node stopping) mid-read."""
    mailbox = Mailbox(())

    def stopping() -> None:
        mailbox.end("node civil is stopping")
        mailbox.check("civil")

    with pytest.raises(Aborted) as stopped:
        READS[read](catalogue, Check(2, stopping))
    assert str(stopped.value) == "civil: node civil is stopping; nothing released"
    with pytest.raises(Aborted, match="node civil is stopping"):  # ended: the next one too
        READS[read](catalogue, lambda: mailbox.check("civil"))
    assert READS[read](catalogue, None) == READS[read](catalogue, Check(None))  # others go on


def test_a_read_already_stopped_does_not_start(catalogue: Catalogue) -> None:
    stop = Check(1)
    with pytest.raises(Aborted, match=STOPPED):
        catalogue.keys("benefits", "id_number", stop=stop)
    assert stop.calls == 1
