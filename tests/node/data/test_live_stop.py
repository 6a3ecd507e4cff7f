"""A live dataset's read (PostgreSQL) ends when its stop check says so, as a read of the node's
own tables does: between two batches of a long stream, and — a sort or a scan that has not
sent its first row yet — by cancelling the statement on the server.

A real PostgreSQL server (``conftest.postgres_server``, as ``test_source_postgresql`` has) and
a real catalogue file. Nothing waits on a clock: a
stream is stopped between the rows it yields; the slow read is stopped by a check that says
stop once the server is sleeping in the read's statement, and would wait out the whole sleep
(:data:`SLEEP`) if it were not cancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import Check, postgres_server

from govshare.examples.postgres import PgServer
from govshare.model.conditions import Condition
from govshare.model.governance import ColumnKind, ColumnRule, Owner, OwnerKind
from govshare.node.data.catalog import BATCH_ROWS, Catalogue
from govshare.node.data.live import READ_EVENT
from govshare.node.data.sources.postgresql import PostgresSource
from govshare.node.queries.session import Mailbox
from govshare.protocols.errors import Aborted

ROWS = 3 * BATCH_ROWS  # three batches of the reads' stream
SLOW_ROWS = 100  # the rows of the slow view
# Seconds the slow view sleeps before its first row: what a read that is not cancelled waits.
SLEEP = 60
BOUND = 1000  # the group sums' clip
CANCELLED = "ERROR:  canceling statement due to user request"
WATCHERS = "govshare read of"  # the name of a read's watcher thread

SETUP = f"""
CREATE TABLE big (id_number text, district text, amount bigint);
INSERT INTO big SELECT 'k' || i, (ARRAY['east', 'west'])[i % 2 + 1], i
    FROM generate_series(0, {ROWS - 1}) AS i;
CREATE TABLE delay (seconds float8 NOT NULL);
INSERT INTO delay VALUES (0);
CREATE VIEW slow AS SELECT * FROM big
    WHERE amount < {SLOW_ROWS}
    AND (SELECT count(*) FROM pg_sleep((SELECT seconds FROM delay))) = 1;
"""


NODE_STOPPING = "civil: node civil is stopping; nothing released"


def stopped(name: str) -> str:
    return f"the read of dataset {name!r} was stopped"


def node_stopping() -> Callable[[], None]:
    """What the query kinds pass as a read's check (``Mailbox.check``), to run as the node
    stops: it ends the query's part, and raises."""
    mailbox = Mailbox(())

    def stopping() -> None:
        mailbox.end("node civil is stopping")
        mailbox.check("civil")

    return stopping


@dataclass
class Pg:
    server: PgServer
    admin: psycopg.Connection[Any]  # the tests' own SQL (autocommit)
    catalogue: Catalogue

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        return self.admin.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pg]:
    with postgres_server() as server, server.admin() as admin:
        admin.execute(SETUP)
        catalogue = Catalogue(tmp_path_factory.mktemp("livestop") / "node.db")
        rules = [
            ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="text"),
            ColumnRule("district", ColumnKind.GROUP_KEY, domain=("east", "west")),
            ColumnRule("amount", ColumnKind.AGGREGATE),
        ]
        for name in ("big", "slow"):
            catalogue.add(
                PostgresSource.parse(server.location(), name), name=name,
                grade="general", sharing_type="conditional",
                owner=Owner(OwnerKind.STATE, "the state", "civil"), columns=rules,
                actor="op-civil", audit=None,
            )  # fmt: skip
        yield Pg(server, admin, catalogue)


class Entries:
    """An audit sink that keeps what it is given (a query's reads log ``dataset.read``)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def record(
        self, kind: str, fields: Mapping[str, object], *, actor: str, query_id: str | None = None
    ) -> int:
        self.kinds.append(kind)
        return len(self.kinds) - 1


def watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WATCHERS)]


def scope(pg: Pg, name: str, scoped: bool, audit: Entries) -> AbstractContextManager[None]:
    """A query's scope of ``name``'s reads (one snapshot, on one connection), or none (each
    read opens a snapshot of its own)."""
    if not scoped:
        return nullcontext()
    return pg.catalogue.reading(name, query_id="q-stop", audit=audit, actor="stop-test")


SCOPES = {"its own snapshot": False, "the query's snapshot": True}

# ------------------------------------------------------------------ a stream stopped midway


@pytest.mark.parametrize("scoped", SCOPES.values(), ids=list(SCOPES))
def test_a_stream_stopped_midway_ends_after_its_batch_and_the_next_read_is_whole(
    pg: Pg, scoped: bool
) -> None:
    whole = sorted(pg.sql("SELECT id_number, amount FROM big"))
    audit, stop = Entries(), threading.Event()
    with scope(pg, "big", scoped, audit):
        stream = pg.catalogue.rows("big", ["id_number", "amount"], stop=stop.is_set)
        got = [next(stream)]
        stop.set()  # the consumer ends the read while the first batch is under way
        with pytest.raises(Aborted) as ended:
            for row in stream:
                got.append(row)
        assert str(ended.value) == stopped("big")
        assert len(got) == BATCH_ROWS  # the batch it had, not the rest of the table
        assert watchers() == []
        # The same snapshot (in a query) or a new one serves the next read, whole.
        assert sorted(pg.catalogue.rows("big", ["id_number", "amount"], stop=Check(None))) == whole
    assert audit.kinds == ([READ_EVENT] if scoped else [])  # the stopped read logged nothing


Read = Callable[[Catalogue, Any], object]
READS: dict[str, Read] = {
    "keys": lambda c, stop: c.keys("big", "id_number", stop=stop),
    "count": lambda c, stop: c.count("big", where=(Condition("amount", ">=", 0),), stop=stop),
    "row ids": lambda c, stop: c.row_ids("big", stop=stop),
    "group sums": lambda c, stop: c.group_sums(
        "big", group_by="district", sums=[("amount", BOUND)], stop=stop
    ),
    "rows": lambda c, stop: sorted(c.rows("big", ["id_number", "district"], stop=stop)),
}


@pytest.mark.parametrize("read", READS, ids=list(READS))
def test_a_read_ends_at_the_check_that_says_stop_or_with_the_error_it_raises(
    pg: Pg, read: str
) -> None:
    """The check says stop at its third call, before the read's end (three batches): the
    reading thread calls it before the read and before each fetch, the watcher as it runs."""
    with pytest.raises(Aborted) as ended:
        READS[read](pg.catalogue, Check(3))
    assert str(ended.value) == stopped("big")
    with pytest.raises(Aborted) as ended:
        READS[read](pg.catalogue, Check(3, node_stopping()))
    assert str(ended.value) == NODE_STOPPING
    assert READS[read](pg.catalogue, Check(None)) == READS[read](pg.catalogue, None)
    assert watchers() == []


# ------------------------------------------------------------------ a slow first fetch


class Sleeping:
    """A stop check that says stop (or runs ``end``) once the server is sleeping in the read's
    statement: a backend of ``application`` active in ``pg_sleep``, whose pid it keeps."""

    def __init__(self, pg: Pg, application: str, end: Callable[[], object] | None) -> None:
        self.pg, self.application, self.end = pg, application, end
        self.pid: int | None = None

    def __call__(self) -> object:
        found = self.pg.sql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active'"
            " AND wait_event = 'PgSleep'",
            self.application,
        )
        if not found:
            return False
        self.pid = int(found[0][0])
        return True if self.end is None else self.end()


def log_offset(pg: Pg) -> int:
    return (pg.server.root / "log").stat().st_size


def log_since(pg: Pg, offset: int) -> str:
    return (pg.server.root / "log").read_bytes()[offset:].decode("utf-8", "replace")


@pytest.mark.parametrize("raises", [False, True], ids=["says stop", "raises"])
@pytest.mark.parametrize("scoped", SCOPES.values(), ids=list(SCOPES))
def test_a_slow_first_fetch_is_cancelled_on_the_server(pg: Pg, scoped: bool, raises: bool) -> None:
    audit = Entries()
    application = "govshare stop-test" if scoped else "govshare catalogue"
    sleeping = Sleeping(pg, application, node_stopping() if raises else None)
    offset = log_offset(pg)
    pg.sql("UPDATE delay SET seconds = %s RETURNING seconds", SLEEP)
    try:
        with scope(pg, "slow", scoped, audit):
            with pytest.raises(Aborted) as ended:
                pg.catalogue.count("slow", stop=sleeping)
            assert sleeping.pid is not None
            # The server ended the statement, it did not sleep on: the backend is not active.
            state = pg.sql("SELECT state FROM pg_stat_activity WHERE pid = %s", sleeping.pid)
            if scoped:  # the query's connection is open still: its transaction failed
                assert state == [("idle in transaction (aborted)",)]
            else:  # its connection closed: the backend is idle, or gone
                assert ("active",) not in state
    finally:
        pg.sql("UPDATE delay SET seconds = 0 RETURNING seconds")
    if raises:
        assert str(ended.value) == NODE_STOPPING
    else:
        assert str(ended.value) == stopped("slow")
    log = log_since(pg, offset)
    assert CANCELLED in log  # the server's own word: the statement was cancelled
    statement = log.split(CANCELLED, 1)[1].splitlines()[1]
    assert "STATEMENT:  FETCH" in statement and "govshare_read_" in statement
    assert audit.kinds == []
    assert watchers() == []
    # The source serves the next read, whole.
    assert pg.catalogue.count("slow", stop=Check(None)) == SLOW_ROWS


# ------------------------------------------------------------------ a check that never stops


def test_a_read_whose_check_never_stops_gives_the_rows_of_the_plain_sql(pg: Pg) -> None:
    never = Check(None)
    rows = sorted(pg.catalogue.rows("big", ["id_number", "district", "amount"], stop=never))
    assert rows == sorted(pg.sql("SELECT id_number, district, amount FROM big"))
    assert never.calls > ROWS // BATCH_ROWS  # looked at before each batch
    keys = pg.sql('SELECT id_number FROM big ORDER BY id_number COLLATE "C"')
    assert pg.catalogue.keys("big", "id_number", stop=Check(None)) == [k for (k,) in keys]
    where = (Condition("amount", "<", 12345),)
    assert pg.catalogue.count("big", where=where, stop=Check(None)) == 12345
    sums = pg.sql(
        "SELECT district, count(*), sum(least(greatest(amount, 0), %s)) FROM big GROUP BY 1",
        BOUND,
    )
    assert pg.catalogue.group_sums(
        "big", group_by="district", sums=[("amount", BOUND)], stop=Check(None)
    ) == {district: (int(n), int(total)) for district, n, total in sums}
    assert watchers() == []
