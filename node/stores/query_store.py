"""A node's persistent record of joint queries: state, replay nonces, grant usage, approvals.

Lives in the node's SQLite store beside the catalogue. The operator's ``govshare approvals``
commands change a query's state here while the node serves; the node reads it back when the
analyst asks for the query's status.

States: ``pending_approval`` → ``approved`` | ``denied`` | ``expired`` | ``cancelled``;
``approved`` → ``running`` → ``done`` | ``failed``, or ``expired`` when the signed request's
validity ended before it ran, or ``cancelled`` when the analyst withdrew it first; a policy
refusal is stored as ``refused`` with its rule.

**Reservations** (the budget ledger). :meth:`QueryStore.admit` counts the analyst's recent
queries, hands the usage so far to the policy decision, and — in the same ``BEGIN IMMEDIATE``
transaction — stores the query and reserves its ε and one query of its grant. Concurrent
submissions, in threads or in other processes sharing the file, are therefore decided one after
another on what the earlier ones reserved. A reservation is held while the query waits for
approval, becomes ``spent`` when the node's part ends in a release (or a data-dependent refusal,
which consumes the query like a run), and is ``returned`` only when the node knows it released
nothing: a denial, an expiry before the run, a failure before the release, or a restart that
finds no release in the log. The ledger per (analyst, dataset) and the usage per grant are sums
over the reservations that are not returned.

**Membership results** a receiving node keeps (its own keys that matched) are sealed under the
node's data key when the store has one (:mod:`govshare.node.data.at_rest`), one seal per query,
with the time they were saved; :meth:`QueryStore.expire_results` deletes those older than the
node's retention (``[retention] results_days``), overwriting them (``secure_delete``) and
cutting the WAL. A store opened without a key keeps them in the clear (``query_matches``),
as before issue 12.

**Exact releases** keep, per (analyst, dataset), digests of the filtered set each one released
from (:meth:`QueryStore.record_exact`), for the tracker check of ``govshare.node.queries.engine``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from itertools import groupby
from pathlib import Path

from govshare.model.digests import ITEM_DIGEST_BYTES
from govshare.model.epsilon import format_epsilon, parse_epsilon
from govshare.model.states import (
    APPROVED,
    PENDING,
    REFUSED,
    RESERVED,
    RETURNED,
    SPENT,
)
from govshare.node.data.at_rest import AtRest, WrongDataKey
from govshare.node.policy.decision import DatasetBudget, Decision, GrantUsage, dataset_epsilon_cap
from govshare.node.policy.grants import Grant
from govshare.node.stores.sqlite import connect, immediate
from govshare.protocols.errors import AlreadyExists, Conflict, MalformedInput, NotFound

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
CREATE TABLE IF NOT EXISTS sealed_matches (
    query_id TEXT PRIMARY KEY,
    saved_at INTEGER NOT NULL,
    keys INTEGER NOT NULL,      -- how many (the count the analyst learned anyway)
    sealed BLOB NOT NULL        -- at_rest.seal_results: the sorted keys
);
CREATE TABLE IF NOT EXISTS reservations (
    query_id TEXT PRIMARY KEY,
    analyst TEXT NOT NULL,
    dataset TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    epsilon TEXT NOT NULL,      -- exact decimal text
    state TEXT NOT NULL,        -- reserved | spent | returned
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_ledger ON reservations (analyst, dataset);
CREATE INDEX IF NOT EXISTS reservations_by_grant ON reservations (grant_id);
CREATE TABLE IF NOT EXISTS exact_releases (
    analyst TEXT NOT NULL,
    dataset TEXT NOT NULL,
    query_id TEXT NOT NULL,
    items BLOB NOT NULL,        -- sorted 16-byte digests of the filtered set's items
    PRIMARY KEY (analyst, dataset, query_id)
);
"""


# Candidates an ambiguous id prefix names in its refusal (the rest are counted as "...").
MAX_CANDIDATES_SHOWN = 8


def unique_id(candidates: Sequence[str], prefix: str, *, what: str) -> str:
    """The one of ``candidates`` (the ids starting with ``prefix``), or why there is not one.

    Raises:
        NotFound: no candidate.
        MalformedInput: several; the message names up to :data:`MAX_CANDIDATES_SHOWN`.
    """
    if not candidates:
        raise NotFound(f"no {what} {prefix}")
    if len(candidates) > 1:
        named = ", ".join(candidates[:MAX_CANDIDATES_SHOWN])
        more = ", ..." if len(candidates) > MAX_CANDIDATES_SHOWN else ""
        raise MalformedInput(
            f"{what} id prefix {prefix!r} is ambiguous: it matches {named}{more}; "
            "give more characters",
            field="query_id",
        )
    return candidates[0]


def ledger_view(
    store: QueryStore, grants: Sequence[Grant], analyst: str, dataset: str, *, now: int
) -> tuple[Fraction, Fraction, Fraction]:
    """(spent, reserved, left) of ``analyst``'s ε on ``dataset``: left is the largest grant in
    force (``policy.dataset_epsilon_cap``) less what is spent and reserved, never below 0."""
    budget = store.budget(analyst, dataset)
    cap = dataset_epsilon_cap(grants, requester=analyst, dataset=dataset, now=now)
    return budget.spent, budget.reserved, max(cap - budget.used, Fraction(0))


@dataclass(frozen=True)
class Usage:
    """What an analyst has used at this node when a new query arrives."""

    recent: int  # queries submitted in the rate-limit window
    grants: Mapping[str, GrantUsage]
    budget: DatasetBudget  # the ledger on the query's dataset


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
    def __init__(self, path: Path, *, at_rest: AtRest | None = None) -> None:
        self._db = connect(path, shared=True)
        self._db.execute("PRAGMA secure_delete=ON")  # deleted results are overwritten
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._at_rest = at_rest

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def remember_nonce(self, analyst: str, nonce: bytes, *, expires_at: int, now: int) -> None:
        """Record a request nonce; a nonce seen before (and not yet expired) is a replay.

        Raises:
            AlreadyExists: the nonce was seen before.
        """
        with self._lock:
            try:
                with immediate(self._db):
                    self._db.execute("DELETE FROM request_nonces WHERE expires_at < ?", (now,))
                    self._db.execute(
                        "INSERT INTO request_nonces VALUES (?, ?, ?)", (analyst, nonce, expires_at)
                    )
            except sqlite3.IntegrityError:
                raise AlreadyExists("replayed request: this nonce was already received") from None

    def create(self, record: QueryRecord) -> None:
        with self._lock:
            self._insert(record)

    def _insert(self, record: QueryRecord) -> None:
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

    def resolve(self, prefix: str) -> str:
        """The one query id that starts with ``prefix`` (a whole id is its own prefix), so that
        an operator may type the first characters of an id.

        Raises:
            NotFound: no query id starts with ``prefix``.
            MalformedInput: several do (the message names them).
        """
        wanted = prefix.strip().lower()
        if not wanted or not all(c in "0123456789abcdef" for c in wanted):
            raise NotFound(f"no query {prefix}")
        with self._lock:
            rows = self._db.execute(
                "SELECT query_id FROM queries WHERE substr(query_id, 1, ?) = ? "
                "ORDER BY query_id LIMIT ?",
                (len(wanted), wanted, MAX_CANDIDATES_SHOWN + 1),
            ).fetchall()
        return unique_id([str(row[0]) for row in rows], prefix, what="query")

    def transition(
        self,
        query_id: str,
        *,
        from_states: Sequence[str],
        to: str,
        now: int,
        message: str | None = None,
        rule: str | None = None,
    ) -> QueryRecord:
        """Move a query from one of ``from_states`` to ``to`` atomically (``rule``: the rule
        that refused it, for a move to ``refused``).

        Raises:
            NotFound: no such query.
            Conflict: the query is in another state (the message names it).
        """
        with self._lock:
            with immediate(self._db):
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
                if rule is not None:
                    self._db.execute(
                        "UPDATE queries SET rule = ? WHERE query_id = ?", (rule, query_id)
                    )
        return self.get(query_id)

    def save_matches(self, query_id: str, keys: Sequence[str], *, now: int | None = None) -> None:
        """Keep the node's own keys that matched a membership query sent to this node (sealed,
        with ``now`` as the time they were saved, when the store has a data key)."""
        saved_at = int(time.time()) if now is None else now
        with self._lock:
            with immediate(self._db):
                if self._at_rest is None:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO query_matches VALUES (?, ?)",
                        ((query_id, key) for key in keys),
                    )
                    return
                # Sorted first (one pass when the caller sorted them, as membership does),
                # then each once, by neighbours: a set first would make the sort start from
                # scratch, and hashes every key.
                ordered = [key for key, _ in groupby(sorted(keys))]
                self._db.execute(
                    "INSERT OR IGNORE INTO sealed_matches VALUES (?, ?, ?, ?)",
                    (
                        query_id,
                        saved_at,
                        len(ordered),
                        self._at_rest.seal_results(query_id, ordered),
                    ),
                )

    def matches(self, query_id: str) -> list[str]:
        """This node's keys that matched ``query_id`` (NotFound if it received none).

        Raises:
            WrongDataKey: the results are sealed and the store has no data key or another one.
        """
        self.get(query_id)
        with self._lock:
            sealed = self._db.execute(
                "SELECT sealed FROM sealed_matches WHERE query_id = ?", (query_id,)
            ).fetchone()
            rows = self._db.execute(
                "SELECT key FROM query_matches WHERE query_id = ? ORDER BY key", (query_id,)
            ).fetchall()
        if sealed is not None:
            if self._at_rest is None:
                raise WrongDataKey(
                    f"the results of query {query_id} are sealed at rest: open the store with "
                    "the node's data key"
                )
            return self._at_rest.open_results(query_id, bytes(sealed[0]))
        return [str(row[0]) for row in rows]

    def expire_results(self, *, saved_before: int) -> tuple[list[tuple[str, int]], bool]:
        """Delete the membership results saved before ``saved_before`` (unix s; results kept in
        the clear by an older version count from their query's last update), overwritten.

        Returns ((query id, keys) of each deleted result, whether the WAL was cut to zero
        bytes: a reader of an older snapshot keeps it until the next checkpoint).
        """
        with self._lock:
            with immediate(self._db):
                sealed = self._db.execute(
                    "SELECT query_id, keys FROM sealed_matches WHERE saved_at < ?",
                    (saved_before,),
                ).fetchall()
                clear = self._db.execute(
                    "SELECT m.query_id, COUNT(*) FROM query_matches m"
                    " LEFT JOIN queries q ON q.query_id = m.query_id"
                    " WHERE COALESCE(q.updated_at, 0) < ? GROUP BY m.query_id",
                    (saved_before,),
                ).fetchall()
                self._db.execute("DELETE FROM sealed_matches WHERE saved_at < ?", (saved_before,))
                self._db.executemany(
                    "DELETE FROM query_matches WHERE query_id = ?",
                    [(row[0],) for row in clear],
                )
            deleted = sorted((str(r[0]), int(r[1])) for r in [*sealed, *clear])
            truncated = True
            if deleted:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                truncated = not busy
        return deleted, truncated

    def with_state(self, state: str) -> list[QueryRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM queries WHERE state = ? ORDER BY received_at", (state,)
            ).fetchall()
        return [_record(row) for row in rows]

    def count_since(self, analyst: str, since: int) -> int:
        """Queries ``analyst`` submitted since ``since`` (unix s), for the rate limit."""
        with self._lock:
            return self._count_since(analyst, since)

    def _count_since(self, analyst: str, since: int) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM queries WHERE analyst = ? AND received_at >= ?",
            (analyst, since),
        ).fetchone()
        return int(row[0])

    # --- reservations ----------------------------------------------------------------------

    def admit(
        self,
        base: QueryRecord,
        *,
        since: int,
        decide: Callable[[Usage], Decision],
    ) -> tuple[QueryRecord, Decision]:
        """Decide and store a query, reserving its budget, in one transaction.

        ``decide`` gets the analyst's :class:`Usage` (recent submissions, per-grant usage and
        the ledger on ``base.dataset``, reservations included) and returns the decision. An
        allowed query is stored ``approved`` or ``pending_approval`` with a reservation of its
        ε and one query of its grant; a refused one is stored ``refused`` with its rule.

        Raises:
            AlreadyExists: the query id was submitted before.
        """
        with self._lock:
            with immediate(self._db):
                usage = Usage(
                    recent=self._count_since(base.analyst, since),
                    grants=self._grant_usage(base.analyst),
                    budget=self._budget(base.analyst, base.dataset),
                )
                decision = decide(usage)
                ob = decision.obligations
                if decision.allowed and ob is not None:
                    state = PENDING if ob.requires_approval else APPROVED
                    record = replace(
                        base,
                        state=state,
                        rule="allowed",
                        message="waiting for the operator's approval"
                        if state == PENDING
                        else "allowed",
                        grant_id=ob.grant_id,
                        epsilon=ob.epsilon,
                    )
                else:
                    record = replace(
                        base, state=REFUSED, rule=decision.rule, message=decision.message
                    )
                self._insert(record)
                if record.state != REFUSED:
                    self._db.execute(
                        "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            record.query_id,
                            record.analyst,
                            record.dataset,
                            record.grant_id,
                            format_epsilon(record.epsilon),
                            RESERVED,
                            record.received_at,
                        ),
                    )
        return record, decision

    def settle(self, query_id: str, *, spent: bool, now: int) -> str | None:
        """Turn a query's reservation into ``spent`` or ``returned``.

        Returns the reservation's new state, or ``None`` when it had none or was already settled
        (settling twice never counts twice).
        """
        to = SPENT if spent else RETURNED
        with self._lock:
            cursor = self._db.execute(
                "UPDATE reservations SET state = ?, updated_at = ? "
                "WHERE query_id = ? AND state = ?",
                (to, now, query_id, RESERVED),
            )
        return to if cursor.rowcount == 1 else None

    def reservation(self, query_id: str) -> str | None:
        """The state of a query's reservation (``reserved``, ``spent``, ``returned``) or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM reservations WHERE query_id = ?", (query_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def usage(self, analyst: str) -> Mapping[str, GrantUsage]:
        """Per grant of ``analyst``: queries and ε used (reservations included)."""
        with self._lock:
            return self._grant_usage(analyst)

    def budget(self, analyst: str, dataset: str) -> DatasetBudget:
        """The ε ledger of ``analyst`` on ``dataset``."""
        with self._lock:
            return self._budget(analyst, dataset)

    def _grant_usage(self, analyst: str) -> dict[str, GrantUsage]:
        rows = self._db.execute(
            "SELECT grant_id, epsilon, state FROM reservations WHERE analyst = ? AND state != ?",
            (analyst, RETURNED),
        ).fetchall()
        totals: dict[str, list[Fraction | int]] = {}
        for row in rows:
            entry = totals.setdefault(row["grant_id"], [0, Fraction(0), Fraction(0)])
            entry[0] = int(entry[0]) + 1
            slot = 1 if row["state"] == SPENT else 2
            entry[slot] = Fraction(entry[slot]) + parse_epsilon(row["epsilon"])
        return {
            grant_id: GrantUsage(int(q), Fraction(spent), Fraction(reserved))
            for grant_id, (q, spent, reserved) in totals.items()
        }

    def _budget(self, analyst: str, dataset: str) -> DatasetBudget:
        rows = self._db.execute(
            "SELECT epsilon, state FROM reservations "
            "WHERE analyst = ? AND dataset = ? AND state != ?",
            (analyst, dataset, RETURNED),
        ).fetchall()
        spent = sum((parse_epsilon(r["epsilon"]) for r in rows if r["state"] == SPENT), Fraction(0))
        held = sum(
            (parse_epsilon(r["epsilon"]) for r in rows if r["state"] == RESERVED), Fraction(0)
        )
        return DatasetBudget(spent, held)

    def ledger(self, dataset: str | None = None) -> list[tuple[str, str, DatasetBudget]]:
        """(analyst, dataset, budget) for every ledger on this node (optionally one dataset)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT analyst, dataset FROM reservations"
                + (" WHERE dataset = ?" if dataset is not None else "")
                + " ORDER BY analyst, dataset",
                (dataset,) if dataset is not None else (),
            ).fetchall()
            return [
                (row["analyst"], row["dataset"], self._budget(row["analyst"], row["dataset"]))
                for row in rows
            ]

    # --- exact releases ----------------------------------------------------------------------

    def exact_releases(self, analyst: str, dataset: str) -> list[tuple[str, frozenset[bytes]]]:
        """(query id, item digests) of every earlier exact release to ``analyst`` from
        ``dataset``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT query_id, items FROM exact_releases WHERE analyst = ? AND dataset = ?",
                (analyst, dataset),
            ).fetchall()
        width = ITEM_DIGEST_BYTES
        return [
            (
                str(row["query_id"]),
                frozenset(
                    bytes(row["items"][i : i + width]) for i in range(0, len(row["items"]), width)
                ),
            )
            for row in rows
        ]

    def record_exact(
        self, analyst: str, dataset: str, query_id: str, items: Iterable[bytes]
    ) -> None:
        """Keep the digests of the filtered set an exact release was computed from."""
        blob = b"".join(sorted(set(items)))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO exact_releases VALUES (?, ?, ?, ?)",
                (analyst, dataset, query_id, blob),
            )
