"""A live table or view in a department's PostgreSQL database, read with psycopg 3.

Registered with ``govshare dataset add --source postgresql://user@host/db --table
schema.relation`` (or a libpq ``key=value`` string, e.g. ``service=dept``): node.db keeps that
location and the relation, never a row and never a secret.

**Credentials** come from libpq alone — ``PGPASSWORD``, a password file (``~/.pgpass``,
``PGPASSFILE``) or a service file (``~/.pg_service.conf``, ``PGSERVICEFILE``, ``PGSERVICE``) in
the node's environment. A location that holds a password (``user:secret@host``,
``password=...``, ``sslpassword=...``) is refused at registration, so a secret can reach
neither node.db, nor the roster, nor the audit log, nor an error message: messages and audit
entries name the source by the location as registered.

**One snapshot per query.** :meth:`PostgresSource.open` starts a ``REPEATABLE READ READ ONLY``
transaction and takes its snapshot at once (``SELECT pg_current_snapshot()``, whose text names
it in the audit log): every read of the query — a count and then the rows, the keys and then
an exact release's tracker check — sees the rows committed before the query started to run,
whatever is inserted, updated or deleted meanwhile. The transaction only reads, and ends with
the query.

**Statements.** Identifiers are quoted with :mod:`psycopg.sql`; every value is a bound
parameter. Each column is read as its text (``col::text``, what ``COPY ... CSV`` would write),
so the catalogue validates and normalises it exactly as it does a CSV cell. Filters are pushed
down only where SQL gives the very answer the catalogue's own check gives (it checks again):
text compared after ``btrim`` of Python's white space, for equality anywhere and for order
only in a UTF-8 database (``COLLATE "C"``: byte order, there code-point order); numbers
compared exactly as ``numeric``. Rows stream through a server-side cursor, :data:`FETCH_ROWS`
at a time; a read that is stopped cancels its statement (:meth:`PostgresSnapshot.cancel`).
PostgreSQL 13 or later (``pg_current_snapshot``).

**Failures.** A server that cannot be reached, or stops answering, raises
:class:`Unavailable`; a relation or column that is gone, or a privilege that is missing,
raises :class:`Conflict`; both name the source, never a secret.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from govshare.node.data.sources import INTEGER, NUMERIC, OTHER, TEXT, Pushdown
from govshare.protocols.errors import Conflict, MalformedInput, Unavailable

KIND = "postgresql"
# Connection parameters that carry a secret: refused in a stored location.
SECRET_PARAMETERS = ("password", "sslpassword")
# Seconds to wait for the server before a query is refused (libpq waits forever by default);
# a location may set its own connect_timeout.
CONNECT_TIMEOUT = 10
# Rows per round trip of the server-side cursor: bounded memory, few round trips.
FETCH_ROWS = 10_000
# Seconds a cancel request may take to reach the server (it is sent on a connection of its
# own) before the read gives up asking.
CANCEL_TIMEOUT = 5.0
# Python's str.strip() white space (what a CSV cell is stripped of), for btrim(): every
# character whose str.isspace() is true (a test checks the list against Python's own).
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
    "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Type OIDs by how a filter compares them (pg_type): int2, int4, int8; numeric; text, varchar,
# bpchar, name.
_KINDS = {21: INTEGER, 23: INTEGER, 20: INTEGER, 1700: NUMERIC, 25: TEXT, 1043: TEXT, 1042: TEXT}
_RELATION_PART = re.compile(r"^[^\x00-\x1f\x7f.]{1,63}$")
_SQL_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class PostgresSource:
    """A PostgreSQL relation: the libpq location (no secret) and ``schema.relation``."""

    location: str
    schema: str
    relation: str

    @property
    def kind(self) -> str:
        return KIND

    @classmethod
    def parse(cls, location: str, relation: str) -> PostgresSource:
        """Check a location and relation as an operator gives them.

        Raises:
            MalformedInput: not a libpq URI or ``key=value`` string; a location holding a
                password (the message says where a node takes it from); a relation that is not
                ``name`` or ``schema.name``.
        """
        location = location.strip()
        try:
            parameters = conninfo_to_dict(location)
        except psycopg.Error:
            # libpq's parse error may quote part of the string, which may hold a secret.
            raise MalformedInput(
                "--source is not a PostgreSQL URI (postgresql://user@host:port/dbname) or "
                "libpq key=value string (e.g. service=NAME)",
                field="source",
            ) from None
        secrets = [p for p in SECRET_PARAMETERS if parameters.get(p)]
        if secrets:
            raise MalformedInput(
                f"--source holds a {secrets[0]}: a node never stores one (node.db, the roster "
                "and the audit log name the source); remove it and give the node's process the "
                "password through PGPASSWORD, a password file (~/.pgpass or PGPASSFILE) or a "
                "service file (~/.pg_service.conf or PGSERVICEFILE, with --source service=NAME)",
                field="source",
            )
        parts = relation.strip().split(".")
        if len(parts) == 1:
            parts = ["public", *parts]
        if len(parts) != 2 or not all(_RELATION_PART.match(p) for p in parts):
            raise MalformedInput(
                f"--table {relation!r}: name a table or view as schema.name (or name, in "
                "schema public)",
                field="table",
            )
        return cls(location, parts[0], parts[1])

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> PostgresSource:
        """Raises: ValueError for a stored value of the wrong shape."""
        location, schema, relation = raw.get("location"), raw.get("schema"), raw.get("relation")
        if not all(isinstance(v, str) and v for v in (location, schema, relation)):
            raise ValueError("a PostgreSQL source has a location, a schema and a relation")
        return cls(str(location), str(schema), str(relation))

    def to_json(self) -> dict[str, object]:
        return {"location": self.location, "schema": self.schema, "relation": self.relation}

    def describe(self) -> str:
        return f"{self.location} table {self.schema}.{self.relation}"

    def _unavailable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"source {self.describe()} is unavailable: {_first_line(exc)}")

    def open(self, *, application_name: str) -> PostgresSnapshot:
        """A ``REPEATABLE READ READ ONLY`` transaction with its snapshot taken (module
        docstring).

        Raises:
            Unavailable: the server cannot be reached, or refuses the connection.
        """
        extra: dict[str, str | int | None] = {"application_name": application_name[:63]}
        if "connect_timeout" not in conninfo_to_dict(self.location):
            extra["connect_timeout"] = CONNECT_TIMEOUT
        try:
            conn = psycopg.connect(make_conninfo(self.location, **extra))
        except psycopg.Error as exc:
            raise self._unavailable(exc) from None
        try:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            row = conn.execute(
                "SELECT pg_current_snapshot()::text, current_setting('server_encoding')"
            ).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise self._unavailable(exc) from None
        marker, encoding = (str(row[0]), str(row[1])) if row else ("", "")
        return PostgresSnapshot(self, conn, marker, utf8=encoding.upper() in ("UTF8", "UTF-8"))


class PostgresSnapshot:
    """One query's read-only transaction on a :class:`PostgresSource`."""

    def __init__(self, source: PostgresSource, conn: psycopg.Connection[tuple[object, ...]],
                 marker: str, *, utf8: bool) -> None:  # fmt: skip
        self._source, self._conn, self._marker = source, conn, marker
        # Byte order is code-point order only in UTF-8: elsewhere text is compared here only
        # for equality (the catalogue orders it itself).
        self._utf8 = utf8
        self._relation = sql.Identifier(source.schema, source.relation)
        self._columns: dict[str, str] | None = None
        self._cursors = itertools.count()

    @property
    def marker(self) -> str:
        return self._marker

    def _failure(self, exc: psycopg.Error) -> Exception:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return self._source._unavailable(exc)
        return Conflict(f"source {self._source.describe()} cannot be read: {_first_line(exc)}")

    def columns(self) -> dict[str, str]:
        if self._columns is None:
            try:
                cursor = self._conn.execute(
                    sql.SQL("SELECT * FROM {} LIMIT 0").format(self._relation)
                )
            except psycopg.Error as exc:
                raise self._failure(exc) from None
            self._columns = {
                column.name: _KINDS.get(column.type_code, OTHER)
                for column in cursor.description or ()
            }
        return dict(self._columns)

    def _condition(self, filter_: Pushdown) -> tuple[sql.Composable, list[object]]:
        column = sql.Identifier(filter_.column)
        params: list[object] = []
        if filter_.numeric:
            value: sql.Composable = column
            if filter_.blank is not None:
                value = sql.SQL("coalesce({}, %s::numeric)").format(column)
                params.append(filter_.blank)
            cast = sql.SQL("numeric")
        else:
            value = sql.SQL("btrim({}::text, %s)").format(column)
            params.append(WHITESPACE)
            if filter_.blank is not None:
                value = sql.SQL("coalesce({}, %s)").format(value)
                params.append(filter_.blank)
            value = sql.SQL('({} COLLATE "C")').format(value)
            cast = sql.SQL("text")
        if filter_.op == "in":
            params.append(list(filter_.values))
            return sql.SQL("{} = ANY(%s::{}[])").format(value, cast), params
        params.append(filter_.values[0])
        operator = sql.SQL(_SQL_OPS[filter_.op])
        return sql.SQL("{} {} %s::{}").format(value, operator, cast), params

    def select(
        self, columns: Sequence[str], pushdown: Sequence[Pushdown]
    ) -> Iterator[Sequence[str | None]]:
        fields = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
        query = sql.SQL("SELECT {} FROM {}").format(fields, self._relation)
        params: list[object] = []
        pushdown = [f for f in pushdown if f.numeric or self._utf8 or f.op in ("=", "!=", "in")]
        if pushdown:
            clauses = []
            for filter_ in pushdown:
                clause, values = self._condition(filter_)
                clauses.append(clause)
                params.extend(values)
            query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(clauses))
        try:
            with self._conn.cursor(name=f"govshare_read_{next(self._cursors)}") as cursor:
                cursor.execute(query, params)
                while batch := cursor.fetchmany(FETCH_ROWS):
                    # Every column is cast to text: each value is a str or None.
                    yield from cast("list[tuple[str | None, ...]]", batch)
        except psycopg.Error as exc:
            raise self._failure(exc) from None

    def cancel(self) -> None:
        """Ask the server to end the statement under way on this snapshot's connection (from
        any thread; libpq's cancel request, encrypted as the connection is where libpq 17
        allows): the statement fails with ``query_canceled`` and the transaction is aborted."""
        try:
            self._conn.cancel_safe(timeout=CANCEL_TIMEOUT)
        except psycopg.Error:
            pass  # the server went away or did not answer: the read ends at its next batch

    def close(self) -> None:
        try:
            if not self._conn.closed:
                self._conn.rollback()  # it only read
        except psycopg.Error:
            pass  # the server went away: nothing to end
        finally:
            self._conn.close()
