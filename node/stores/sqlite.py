"""Connections to a node's SQLite store (``node.db``: datasets, grants, queries, witness state).

Every connection runs in autocommit mode, so each write opens its own explicit transaction
(``BEGIN IMMEDIATE``), with WAL journaling and ``synchronous=FULL``: a write that returned is
on disk, and readers never block the writer. Several processes may share the file (the serving
node and the operator's commands); ``timeout`` waits for the write lock instead of failing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import ClassVar

from govshare.node.home_permissions import create_private

# Seconds a write waits for another process's write lock before failing.
LOCK_TIMEOUT = 30.0


def connect(path: Path, *, shared: bool = False) -> sqlite3.Connection:
    """A configured connection; ``shared`` lets several threads use it (callers then lock). A
    database file made here is private (0600), as a node's home requires."""
    create_private(path)
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=LOCK_TIMEOUT, check_same_thread=not shared
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``): committed when the block ends, rolled back
    when it raises (the exception goes on)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for one operation, closed afterwards."""
    conn = connect(path)
    try:
        yield conn
    finally:
        conn.close()


class Tables:
    """Tables of the node's store that one class owns: created when it is opened (its
    ``schema`` says ``IF NOT EXISTS``), each operation on a connection of its own."""

    schema: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._open() as conn:
            conn.executescript(self.schema)
            self._migrate(conn)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring tables an earlier version made up to date (nothing to do by default)."""

    def _open(self) -> AbstractContextManager[sqlite3.Connection]:
        return opened(self.path)
