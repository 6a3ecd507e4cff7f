"""Where a dataset's rows live: the seam between the catalogue and a department's data.

Two variants, one registry line each (:data:`LIVE_SOURCES`):

- ``embedded`` (the default): the rows are imported from a CSV file into the node's own
  SQLite file, one table per dataset; :mod:`govshare.node.data.catalog` reads them itself.
- ``postgresql``: a live table or view in the department's own PostgreSQL database
  (:mod:`govshare.node.data.sources.postgresql`), read at every query and never copied.

A *live* source answers the small protocol below; everything else — column rules, join-key
normalisation, NULL policies, filters, per-query snapshots, audit entries — is the catalogue's
and :mod:`govshare.node.data.live`'s, the same for every live source. A new SQL source is one
file implementing :class:`LiveSource` and one line in :data:`LIVE_SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from govshare.protocols.errors import MalformedInput

EMBEDDED = "embedded"

# A source column's values, as the catalogue can push a comparison down to it: ``integer`` and
# ``numeric`` columns compare as exact numbers; every column compares as its text.
INTEGER, NUMERIC, TEXT, OTHER = "integer", "numeric", "text", "other"


@dataclass(frozen=True)
class Pushdown:
    """One filter for the source to apply, equivalent to the catalogue's own check on the
    values it reads (which it applies again): ``column op value(s)``.

    ``numeric``: compare the column as an exact number with the Decimal ``values`` (the
    column is ``integer`` or ``numeric``); else compare the column's text, stripped of
    surrounding white space as a CSV cell is, by code point, with the str ``values``.
    ``blank``: what a NULL (or, for text, a blank) cell compares as, ``None`` to leave such
    rows out (they are refused or skipped by the column's NULL policy anyway).
    """

    column: str
    op: str  # one of govshare.model.conditions.OPERATORS
    values: tuple[str, ...] | tuple[Decimal, ...]
    numeric: bool
    blank: str | Decimal | None


class SourceSnapshot(Protocol):
    """One consistent, read-only view of a live source, open for one query's reads."""

    @property
    def marker(self) -> str:
        """What names the snapshot in the audit log (PostgreSQL: ``pg_current_snapshot()``)."""
        ...

    def columns(self) -> Mapping[str, str]:
        """The relation's columns, in order, each with its kind (:data:`INTEGER`...)."""
        ...

    def select(
        self, columns: Sequence[str], pushdown: Sequence[Pushdown]
    ) -> Iterator[Sequence[str | None]]:
        """Each row's ``columns`` as text (``None`` for NULL) that passes ``pushdown``.

        Raises:
            Unavailable: the source cannot be reached or stopped answering.
            Conflict: the relation or a column is gone, or cannot be read.
        """
        ...

    def cancel(self) -> None:
        """Ask the source to end the statement under way (its :meth:`select` then raises);
        called from another thread while a read waits; nothing happens when none runs. Never
        raises: a source that does not answer leaves the read to end at its next batch."""
        ...

    def close(self) -> None: ...


class LiveSource(Protocol):
    """A live table or view a dataset reads at each query (stored in node.db without secrets)."""

    @property
    def kind(self) -> str: ...

    def describe(self) -> str:
        """Where the rows are, for messages and audit entries: never a secret."""
        ...

    def to_json(self) -> dict[str, object]: ...

    def open(self, *, application_name: str) -> SourceSnapshot:
        """A snapshot for one query's reads (see :class:`SourceSnapshot`).

        Raises:
            Unavailable: the source cannot be reached (the message names it, without secrets).
        """
        ...


def _postgresql(location: str, relation: str) -> LiveSource:
    from govshare.node.data.sources.postgresql import PostgresSource

    return PostgresSource.parse(location, relation)


def _postgresql_json(raw: Mapping[str, object]) -> LiveSource:
    from govshare.node.data.sources.postgresql import PostgresSource

    return PostgresSource.from_json(raw)


def _is_libpq(location: str) -> bool:
    """A PostgreSQL URI, or a libpq ``key=value`` string (``service=dept host=...``)."""
    text = location.strip().lower()
    if "://" in text:
        return text.startswith(("postgresql://", "postgres://"))
    return "=" in text


# kind -> (takes(location), parse(location, relation), from_json(stored)): one line a source.
LIVE_SOURCES: dict[
    str,
    tuple[
        Callable[[str], bool],
        Callable[[str, str], LiveSource],
        Callable[[Mapping[str, object]], LiveSource],
    ],
] = {
    "postgresql": (_is_libpq, _postgresql, _postgresql_json),
}


def parse_source(location: str, relation: str) -> LiveSource:
    """The live source ``location`` names (``postgresql://user@host/db``, ``service=NAME``),
    reading ``relation`` (``schema.table``).

    Raises:
        MalformedInput: no live source takes that location, or it is malformed or holds a
            secret (see each source).
    """
    for takes, parse, _ in LIVE_SOURCES.values():
        if takes(location):
            return parse(location, relation)
    raise MalformedInput(
        "--source takes a live database: postgresql://user@host:port/dbname or a libpq "
        "key=value string such as service=NAME",
        field="source",
    )


def source_from_json(kind: str, raw: Mapping[str, object]) -> LiveSource:
    """A stored live source. Raises: ValueError for an unknown kind or a bad stored value."""
    if kind not in LIVE_SOURCES:
        raise ValueError(f"unknown data source kind {kind!r}")
    return LIVE_SOURCES[kind][2](raw)
