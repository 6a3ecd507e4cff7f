"""A node's persistent record of joint queries: state, replay nonces, grant usage, approvals.

Lives in the node's SQLite store beside the catalogue. The operator's ``govshare approvals``
commands change a query's state here while the node serves; the node reads it back when the
analyst asks for the query's status.

States: ``pending_approval`` → ``approved`` | ``denied``; ``approved`` → ``running`` → ``done``
| ``failed``; a policy refusal is stored as ``refused`` with its rule.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from govshare.node.grants import format_epsilon, parse_epsilon
from govshare.node.policy import GrantUsage
from govshare.node.store import connect
from govshare.protocols.errors import AlreadyExists, Conflict, NotFound

PENDING = "pending_approval"
APPROVED = "approved"
DENIED = "denied"
REFUSED = "refused"
RUNNING = "running"
DONE = "done"
FAILED = "failed"

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    query_id TEXT PRIMARY KEY,
    analyst TEXT NOT NULL,
    kind TEXT NOT NULL,
    dataset TEXT NOT NULL,
    purpose TEXT NOT NULL,
    request BLOB NOT NULL,
    state TEXT NOT NULL,
    rule TEXT NOT NULL,
    message TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    epsilon TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queries_by_analyst ON queries (analyst, received_at);
CREATE TABLE IF NOT EXISTS request_nonces (
    analyst TEXT NOT NULL,
    nonce BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (analyst, nonce)
);
CREATE TABLE IF NOT EXISTS query_matches (
    query_id TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (query_id, key)
);
CREATE TABLE IF NOT EXISTS grant_usage (
    grant_id TEXT PRIMARY KEY,
    queries INTEGER NOT NULL,
    epsilon TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class QueryRecord:
    query_id: str
    analyst: str
    kind: str
    dataset: str
    purpose: str
    request: bytes
    state: str
    rule: str
    message: str
    grant_id: str
    epsilon: Fraction
    received_at: int
    updated_at: int


def _record(row: sqlite3.Row) -> QueryRecord:
    return QueryRecord(
        query_id=row["query_id"],
        analyst=row["analyst"],
        kind=row["kind"],
        dataset=row["dataset"],
        purpose=row["purpose"],
        request=bytes(row["request"]),
        state=row["state"],
        rule=row["rule"],
        message=row["message"],
        grant_id=row["grant_id"],
        epsilon=parse_epsilon(row["epsilon"]),
        received_at=int(row["received_at"]),
        updated_at=int(row["updated_at"]),
    )


class QueryStore:
    def __init__(self, path: Path) -> None:
        self._db = connect(path, shared=True)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def remember_nonce(self, analyst: str, nonce: bytes, *, expires_at: int, now: int) -> None:
        """Record a request nonce; a nonce seen before (and not yet expired) is a replay.

        Raises:
            AlreadyExists: the nonce was seen before.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM request_nonces WHERE expires_at < ?", (now,))
                self._db.execute(
                    "INSERT INTO request_nonces VALUES (?, ?, ?)", (analyst, nonce, expires_at)
                )
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise AlreadyExists("replayed request: this nonce was already received") from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def create(self, record: QueryRecord) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.query_id,
                        record.analyst,
                        record.kind,
                        record.dataset,
                        record.purpose,
                        record.request,
                        record.state,
                        record.rule,
                        record.message,
                        record.grant_id,
                        format_epsilon(record.epsilon),
                        record.received_at,
                        record.updated_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"query {record.query_id} was already submitted") from None

    def get(self, query_id: str) -> QueryRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM queries WHERE query_id = ?", (query_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no query {query_id}")
        return _record(row)

    def transition(
        self,
        query_id: str,
        *,
        from_states: Sequence[str],
        to: str,
        now: int,
        message: str | None = None,
    ) -> QueryRecord:
        """Move a query from one of ``from_states`` to ``to`` atomically.

        Raises:
            NotFound: no such query.
            Conflict: the query is in another state (the message names it).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT state FROM queries WHERE query_id = ?", (query_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no query {query_id}")
                if row["state"] not in from_states:
                    raise Conflict(
                        f"query {query_id} is {row['state']}, not {' or '.join(from_states)}"
                    )
                if message is None:
                    self._db.execute(
                        "UPDATE queries SET state = ?, updated_at = ? WHERE query_id = ?",
                        (to, now, query_id),
                    )
                else:
                    self._db.execute(
                        "UPDATE queries SET state = ?, message = ?, updated_at = ? "
                        "WHERE query_id = ?",
                        (to, message, now, query_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(query_id)

    def save_matches(self, query_id: str, keys: Sequence[str]) -> None:
        """Keep the node's own keys that matched a membership query sent to this node."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO query_matches VALUES (?, ?)",
                    ((query_id, key) for key in keys),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def matches(self, query_id: str) -> list[str]:
        """This node's keys that matched ``query_id`` (NotFound if it received none)."""
        self.get(query_id)
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM query_matches WHERE query_id = ? ORDER BY key", (query_id,)
            ).fetchall()
        return [str(row[0]) for row in rows]

    def with_state(self, state: str) -> list[QueryRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM queries WHERE state = ? ORDER BY received_at", (state,)
            ).fetchall()
        return [_record(row) for row in rows]

    def count_since(self, analyst: str, since: int) -> int:
        """Queries ``analyst`` submitted since ``since`` (unix s), for the rate limit."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM queries WHERE analyst = ? AND received_at >= ?",
                (analyst, since),
            ).fetchone()
        return int(row[0])

    def usage(self) -> Mapping[str, GrantUsage]:
        with self._lock:
            rows = self._db.execute("SELECT grant_id, queries, epsilon FROM grant_usage").fetchall()
        return {
            row["grant_id"]: GrantUsage(int(row["queries"]), parse_epsilon(row["epsilon"]))
            for row in rows
        }

    def charge(self, grant_id: str, epsilon: Fraction) -> GrantUsage:
        """Count one query (and its ε) against a grant; return the usage after it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT queries, epsilon FROM grant_usage WHERE grant_id = ?", (grant_id,)
                ).fetchone()
                queries = (int(row["queries"]) if row else 0) + 1
                spent = (parse_epsilon(row["epsilon"]) if row else Fraction(0)) + epsilon
                self._db.execute(
                    "INSERT OR REPLACE INTO grant_usage VALUES (?, ?, ?)",
                    (grant_id, queries, format_epsilon(spent)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return GrantUsage(queries, spent)
