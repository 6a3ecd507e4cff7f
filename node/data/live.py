"""Reads of a dataset that lives in a live source (:mod:`govshare.node.data.sources`).

The catalogue answers :meth:`~govshare.node.data.catalog.Catalogue.keys`, ``rows``, ``count``,
``row_ids`` and ``group_sums`` for a live dataset here, with the same meaning as for its own
tables: every value read goes through the registration's column rules and formats exactly as
a CSV cell does at import (:mod:`govshare.node.data.column_format`, join keys through their
normaliser, group labels against their domain, aggregates as fixed-point integers), so the
same data gives the same answers from either source.

**Bad rows.** A row with a bad cell in any column it reads (a join key that does not
normalise, a label outside the domain, a blank where the NULL policy refuses one) is left out
of the read and counted, as ``--skip-invalid`` does at import; a ``null=skip-row`` blank is
left out and counted apart. Reasons give the row's place in the read and the column, never a
value. ``deny`` columns are never read at all.

**Filters** are pushed down to the source where it can give exactly the catalogue's answer
(:class:`~govshare.node.data.sources.Pushdown`) and checked again here on the normalised
values; a filter on a join key is checked here only (the stored spelling is not the normalised
one).

**One snapshot per query.** :func:`query_scope` opens the source's snapshot when a query starts
to run on this node, before any protocol step, and every read of that dataset in the query's
context (the engine's thread, or a context copied from it) goes through it: both passes of a
query read the same rows. Each such read is logged as ``dataset.read`` with the query id: the
rows it read, the rows it rejected and skipped, the source's snapshot marker, and
``rows_sha256``, SHA-256 over the sorted SHA-256 digests of the rows read (each row's
normalised readable columns as :meth:`LiveDataset.canonical` text) — order-free, so the reads
of one snapshot show one digest. A read outside any query (a registration's check, an
operator's look) opens a snapshot of its own and logs nothing.

**Stopping a read.** The catalogue's reads take its ``stop`` check
(:data:`~govshare.node.data.catalog.Stop`) for a live dataset too, with the same meaning: true
ends the read with :class:`~govshare.protocols.errors.Aborted` naming the dataset, an error it
raises ends the read with that error. The reading thread looks at it before each batch of rows
the source sends (:data:`~govshare.node.data.catalog.BATCH_ROWS`); while it waits for a batch,
a watcher thread looks at it every :data:`STOP_POLL` seconds and, once it says stop, cancels
the source's statement under way (:meth:`~govshare.node.data.sources.SourceSnapshot.cancel`):
a sort or a scan that has not sent its first row yet ends on the server, not only here. The
read's cursor is closed, the watcher ended, before the read returns or raises; a cancelled
statement leaves the snapshot's transaction aborted, which a read of its own closes at once
and a query's closes when the query ends (a stop ends the query's reads anyway).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import cast

from govshare.model.conditions import Condition
from govshare.model.governance import ColumnKind, ColumnRule, DatasetInfo
from govshare.node.audit.sink import AuditSink
from govshare.node.data.catalog import (
    BATCH_ROWS,
    REASONS_KEPT,
    Catalogue,
    Cell,
    DatasetRecord,
    RejectedRow,
    Stop,
    _blank_reason,
    _cell_converter,
    _checked,
)
from govshare.node.data.column_format import ColumnFormat, NullPolicy
from govshare.node.data.sources import (
    INTEGER,
    NUMERIC,
    LiveSource,
    Pushdown,
    SourceSnapshot,
)
from govshare.protocols.errors import Conflict, MalformedInput, Unavailable

READ_EVENT = "dataset.read"
# Seconds between two looks at a read's stop check while it waits on its source for a batch
# (see :class:`_Watch`): a stop ends a statement under way within about this and the cancel's
# round trip (a few ms to a local server). A look is a call of the check, well under a
# microsecond for the node's.
STOP_POLL = 0.05


@dataclass
class ReadTotals:
    """What one read saw: rows kept (after filters), rejected and skipped, and their digest."""

    rejected: int = 0
    skipped: int = 0
    reasons: list[RejectedRow] = field(default_factory=list)
    blanks: dict[str, int] = field(default_factory=dict)
    # One SHA-256 per row kept, of its canonical text (:meth:`LiveDataset.canonical`).
    digests: list[bytes] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.digests)

    def digest(self) -> str:
        """SHA-256 over the rows' sorted digests (module docstring)."""
        return hashlib.sha256(b"".join(sorted(self.digests))).hexdigest()


@dataclass
class _Scope:
    name: str
    snapshot: SourceSnapshot
    source: LiveSource
    query_id: str
    audit: AuditSink
    actor: str


_SCOPE: ContextVar[_Scope | None] = ContextVar("govshare_live_query_scope", default=None)


@contextmanager
def query_scope(
    record: DatasetRecord, source: LiveSource, *, query_id: str, audit: AuditSink, actor: str
) -> Iterator[None]:
    """The reads of one query's run on this node share one snapshot of ``record``'s source.

    Raises:
        Unavailable: the source cannot be reached (the message names the dataset and the
            source, never a secret).
    """
    try:
        snapshot = source.open(application_name=f"govshare {actor}")
    except Unavailable as exc:
        raise Unavailable(
            f"node {actor}: dataset {record.info.name!r} cannot be read: {exc}"
        ) from None
    scope = _Scope(record.info.name, snapshot, source, query_id, audit, actor)
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)
        snapshot.close()


class LiveDataset:
    """A live dataset's reads (see the module docstring); ``source`` from its record."""

    def __init__(self, record: DatasetRecord, source: LiveSource) -> None:
        self._record, self._source = record, source
        info = record.info
        self._readable = [r for r in info.columns if r.kind is not ColumnKind.DENY]
        renamed = {name: header for header, name in record.source.header_map}
        self._source_columns = [renamed.get(r.name, r.name) for r in self._readable]
        self._positions = {rule.name: i for i, rule in enumerate(self._readable)}
        # A row's canonical text, for its digest: each value as i<decimal> (aggregates) or
        # s<text>, joined by NUL, which no PostgreSQL text holds.
        self._template = "\x00".join(
            "i%d" if r.kind is ColumnKind.AGGREGATE else "s%s" for r in self._readable
        )

    def canonical(self, row: tuple[Cell, ...]) -> str:
        """A row's canonical text (module docstring): what its digest is taken over."""
        return self._template % row

    @property
    def info(self) -> DatasetInfo:
        return self._record.info

    # ------------------------------------------------------------------ snapshots

    @contextmanager
    def _snapshot(self, what: str) -> Iterator[tuple[SourceSnapshot, Callable[[ReadTotals], None]]]:
        """The query's snapshot and a logger of the read, or a snapshot of this read's own."""
        scope = _SCOPE.get()
        if scope is not None and scope.name == self.info.name:

            def log(totals: ReadTotals) -> None:
                scope.audit.record(
                    READ_EVENT,
                    {
                        "dataset": self.info.name,
                        "source": scope.source.describe(),
                        "snapshot": scope.snapshot.marker,
                        "read": what,
                        "rows": totals.rows,
                        "rejected_rows": totals.rejected,
                        "skipped_rows": totals.skipped,
                        "first_rejections": [r.reason for r in totals.reasons],
                        "rows_sha256": totals.digest(),
                    },
                    actor=scope.actor,
                    query_id=scope.query_id,
                )

            yield scope.snapshot, log
            return
        try:
            snapshot = self._source.open(application_name="govshare catalogue")
        except Unavailable as exc:
            raise Unavailable(f"dataset {self.info.name!r} cannot be read: {exc}") from None
        try:
            yield snapshot, lambda totals: None
        finally:
            snapshot.close()

    # ------------------------------------------------------------------ the rows

    def _pushdown(
        self, snapshot: SourceSnapshot, rule: ColumnRule, op: str, values: list[Cell]
    ) -> Pushdown | None:
        fmt = self._record.formats[rule.name]
        column = self._source_columns[self._positions[rule.name]]
        if rule.kind is ColumnKind.JOIN_KEY:
            return None  # stored spellings are not the normalised keys
        if rule.kind is ColumnKind.AGGREGATE:
            if snapshot.columns().get(column) not in (INTEGER, NUMERIC):
                return None
            numbers = tuple(Decimal(int(v)).scaleb(-fmt.scale) for v in values)
            blank = Decimal(0) if fmt.null is NullPolicy.ZERO else None
            return Pushdown(column, op, numbers, True, blank)
        blank_text = "" if fmt.null is NullPolicy.KEEP else None
        return Pushdown(column, op, tuple(str(v) for v in values), False, blank_text)

    def _conditions(
        self, snapshot: SourceSnapshot, where: Sequence[Condition]
    ) -> tuple[list[Pushdown], list[Callable[[tuple[Cell, ...]], bool]]]:
        pushdown: list[Pushdown] = []
        checks: list[Callable[[tuple[Cell, ...]], bool]] = []
        for condition in where:  # validated by the catalogue first
            rule = self.info.column(condition.column)
            if rule is None:  # pragma: no cover - the catalogue refused it already
                raise MalformedInput(f"no column {condition.column!r}", field="where")
            raw = condition.value
            values = [
                Catalogue._typed(rule, v) for v in (raw if isinstance(raw, tuple) else (raw,))
            ]
            down = self._pushdown(snapshot, rule, condition.op, values)
            if down is not None:
                pushdown.append(down)
            checks.append(_check(self._positions[rule.name], condition.op, values))
        return pushdown, checks

    def _read(
        self,
        snapshot: SourceSnapshot,
        where: Sequence[Condition],
        totals: ReadTotals,
        *,
        refuse_bad: bool = False,
        stop: Stop | None = None,
    ) -> Iterator[tuple[Cell, ...]]:
        """The readable columns of every good row that passes ``where``, normalised; ``stop``
        ends the read (module docstring, "Stopping a read")."""
        watch = None if stop is None else _Watch(snapshot, stop, self.info.name)
        if watch is not None:
            watch.check()  # a read already stopped does not start
        present = snapshot.columns()
        missing = [c for c in self._source_columns if c not in present]
        if missing:
            raise Conflict(
                f"dataset {self.info.name!r}: its source {self._source.describe()} has no "
                f"column(s) {', '.join(map(repr, missing))} any more"
            )
        pushdown, checks = self._conditions(snapshot, where)
        selected = snapshot.select(self._source_columns, pushdown)
        source_rows = iter(selected)

        def fetch() -> list[Sequence[str | None]]:
            return list(itertools.islice(source_rows, BATCH_ROWS))

        try:
            if watch is None:
                yield from self._rows(fetch, totals, checks, refuse_bad)
            else:
                with watch:
                    yield from self._rows(lambda: watch.fetch(fetch), totals, checks, refuse_bad)
        finally:
            if isinstance(selected, Generator):
                selected.close()  # its cursor, now: a query's snapshot serves its next read

    def _rows(
        self,
        fetch: Callable[[], list[Sequence[str | None]]],
        totals: ReadTotals,
        checks: list[Callable[[tuple[Cell, ...]], bool]],
        refuse_bad: bool,
    ) -> Iterator[tuple[Cell, ...]]:
        """:meth:`_read`'s rows, from the source's batches of rows (``fetch``, empty at the
        end)."""
        readers = [
            (rule, fmt, _cell_converter(rule, fmt))
            for rule in self._readable
            for fmt in (self._record.formats[rule.name],)
        ]
        whole = [_column_reader(rule, convert) for rule, _, convert in readers]
        fast = [_fast_reader(convert) for _, _, convert in readers]
        template = self._template
        number, keep, sha256 = 0, totals.digests.append, hashlib.sha256
        while batch := fetch():
            rows: list[tuple[Cell, ...] | None]
            try:  # a batch whose every cell is present and good: column by column
                columns = zip(*batch, strict=True)
                read = [reader(cells) for reader, cells in zip(whole, columns, strict=True)]
                rows = list(zip(*read, strict=True))
            except _SlowPathError:
                rows = [None] * len(batch)  # a blank or a bad cell in the batch: row by row
            for raw, row in zip(batch, rows, strict=True):
                number += 1
                if row is None:
                    row = self._row(number, raw, readers, fast, totals, refuse_bad=refuse_bad)
                if row is None or (checks and not all(check(row) for check in checks)):
                    continue
                keep(sha256((template % row).encode()).digest())
                yield row

    @staticmethod
    def _row(
        number: int,
        raw: Sequence[str | None],
        readers: list[tuple[ColumnRule, ColumnFormat, Callable[[str], Cell]]],
        fast: list[Callable[[str | None], Cell]],
        totals: ReadTotals,
        *,
        refuse_bad: bool,
    ) -> tuple[Cell, ...] | None:
        """One row, or ``None`` when it is rejected or skipped (counted in ``totals``)."""
        try:  # every cell present and good: a call a cell
            return tuple([read(cell) for read, cell in zip(fast, raw, strict=True)])
        except _SlowPathError:
            pass  # a blank, or a bad cell: read it again the careful way
        values: list[Cell] = []
        blanks: list[str] = []
        skip = False
        try:
            for (rule, fmt, convert), cell in zip(readers, raw, strict=True):
                text = "" if cell is None else cell.strip()
                if not text:
                    if fmt.null is NullPolicy.REFUSE:
                        raise MalformedInput(f"column {rule.name}: {_blank_reason(rule, fmt)}")
                    blanks.append(rule.name)
                    skip = skip or fmt.null is NullPolicy.SKIP_ROW
                    values.append(0 if fmt.null is NullPolicy.ZERO else "")
                    continue
                try:
                    values.append(convert(text))
                except MalformedInput as exc:
                    raise MalformedInput(f"column {rule.name}: {exc}") from None
        except MalformedInput as exc:
            reason = f"row {number} of the read: {exc}"
            if refuse_bad:
                raise MalformedInput(reason, field=f"row {number}") from None
            totals.rejected += 1
            if len(totals.reasons) < REASONS_KEPT:
                totals.reasons.append(RejectedRow(number, reason))
            return None
        for column in blanks:
            totals.blanks[column] = totals.blanks.get(column, 0) + 1
        if skip:
            totals.skipped += 1
            return None
        return tuple(values)

    def _index(self, column: str) -> int:
        return self._positions[column]

    # ------------------------------------------------------------------ the catalogue's reads

    def validate(self, *, refuse_bad: bool) -> ReadTotals:
        """Read every row once, as a registration's check does (nothing is logged)."""
        totals = ReadTotals()
        with self._snapshot("registration") as (snapshot, _):
            for _ in self._read(snapshot, (), totals, refuse_bad=refuse_bad):
                pass
        return totals

    def columns(self) -> dict[str, str]:
        """The source relation's columns (to check a registration against)."""
        with self._snapshot("columns") as (snapshot, _):
            return dict(snapshot.columns())

    def keys(self, column: str, where: Sequence[Condition], stop: Stop | None = None) -> list[str]:
        totals, at = ReadTotals(), self._index(column)
        with self._snapshot("keys") as (snapshot, log):
            keys = {str(row[at]) for row in self._read(snapshot, where, totals, stop=stop)}
            log(totals)
        return sorted(keys)

    def rows(
        self, columns: Sequence[str], where: Sequence[Condition], stop: Stop | None = None
    ) -> Generator[tuple[Cell, ...], None, None]:
        at = [self._index(c) for c in columns]
        totals = ReadTotals()
        with self._snapshot("rows") as (snapshot, log):
            for row in self._read(snapshot, where, totals, stop=stop):
                yield tuple(row[i] for i in at)
            log(totals)

    def count(self, where: Sequence[Condition], stop: Stop | None = None) -> int:
        totals = ReadTotals()
        with self._snapshot("count") as (snapshot, log):
            for _ in self._read(snapshot, where, totals, stop=stop):
                pass
            log(totals)
        return totals.rows

    def row_ids(self, where: Sequence[Condition], stop: Stop | None = None) -> list[int]:
        """A stable id per row: a digest of its normalised values and its occurrence among
        equal rows (a live relation has no import position)."""
        totals, seen, ids = ReadTotals(), dict[str, int](), []
        with self._snapshot("row_ids") as (snapshot, log):
            for row in self._read(snapshot, where, totals, stop=stop):
                text = self.canonical(row)
                seen[text] = seen.get(text, 0) + 1
                digest = hashlib.sha256(f"{text}\x00#{seen[text]}".encode()).digest()
                ids.append(int.from_bytes(digest[:8], "big") >> 1)
            log(totals)
        return ids

    def group_sums(
        self,
        group_by: str | None,
        sums: Sequence[tuple[str, int]],
        where: Sequence[Condition],
        stop: Stop | None = None,
    ) -> dict[str, tuple[int, ...]]:
        label_at = None if group_by is None else self._index(group_by)
        sum_at = [(self._index(c), int(bound)) for c, bound in sums]
        groups: dict[str, list[int]] = {}
        totals = ReadTotals()
        with self._snapshot("group_sums") as (snapshot, log):
            for row in self._read(snapshot, where, totals, stop=stop):
                label = "" if label_at is None else str(row[label_at])
                figures = groups.setdefault(label, [0] * (1 + len(sum_at)))
                figures[0] += 1
                for j, (i, bound) in enumerate(sum_at, start=1):
                    figures[j] += min(max(int(row[i]), 0), bound)
            log(totals)
        return {label: tuple(figures) for label, figures in groups.items()}


class _Watch:
    """A live read's ``stop`` check (module docstring, "Stopping a read"), looked at by the
    reading thread before each batch and, while a fetch waits on the source, every
    :data:`STOP_POLL` seconds by a watcher thread (idle between fetches: the rows' own work is
    not interrupted). Once the check says stop (or raises), the watcher cancels the source's
    statement, and again at each look until that fetch returns: a cancel that reached the
    server between two statements is lost there. The fetch then raises the check's error
    instead of the source's."""

    def __init__(self, snapshot: SourceSnapshot, stop: Stop, name: str) -> None:
        self._snapshot, self._stop, self._name = snapshot, stop, name
        self._changed = threading.Condition()  # guards the three below; told of each change
        self._stopped: Exception | None = None  # what the watcher's look raised
        self._fetching = False
        self._done = False
        self._thread = threading.Thread(
            target=self._watch, name=f"govshare read of {name} stop", daemon=True
        )

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._done = True
            self._changed.notify_all()
        self._thread.join()  # no cancel is sent after the read: the snapshot's next statement

    def check(self) -> None:
        """Go on, unless the check said stop (to the watcher, or now).

        Raises:
            Aborted: it returned true (naming the dataset, as :func:`_checked` does); or its own
                error, if it raised.
        """
        with self._changed:
            stopped = self._stopped
        if stopped is not None:
            raise stopped
        _checked(self._stop, self._name)

    def fetch(self, fetch: Callable[[], list[Sequence[str | None]]]) -> list[Sequence[str | None]]:
        """``fetch()``, the next batch, unless the check says stop before or during it.

        Raises: as :meth:`check`; or the source's own error (:class:`Unavailable`,
            :class:`Conflict`) when it failed for another reason.
        """
        self.check()
        with self._changed:
            if self._stopped is not None:
                raise self._stopped
            self._fetching = True
            self._changed.notify_all()
        try:
            return fetch()
        except (Unavailable, Conflict):
            with self._changed:
                stopped = self._stopped
            if stopped is not None:
                raise stopped from None  # the statement failed for the watcher's cancel
            raise
        finally:
            with self._changed:
                self._fetching = False
                self._changed.notify_all()

    def _watch(self) -> None:
        while True:
            with self._changed:
                while not (self._done or self._fetching):
                    self._changed.wait()  # between fetches: nothing to look at
                if not self._done:
                    self._changed.wait(STOP_POLL)
                if self._done:
                    return
                if not self._fetching:
                    continue  # the fetch returned
                stopped = self._stopped
            if stopped is None:
                try:
                    _checked(self._stop, self._name)
                    continue
                except Exception as exc:  # the reading thread raises it
                    with self._changed:
                        self._stopped = exc
            self._snapshot.cancel()


class _SlowPathError(Exception):
    """A cell the fast path does not read: blank, or bad."""


def _column_reader(
    rule: ColumnRule, convert: Callable[[str], Cell]
) -> Callable[[tuple[str | None, ...]], list[Cell]]:
    """A whole column of a batch read at once (most of it in C), or :class:`_SlowPathError`
    for a blank or bad cell anywhere in it."""
    labels = frozenset(rule.domain) if rule.kind is ColumnKind.GROUP_KEY else None

    def read(cells: tuple[str | None, ...]) -> list[Cell]:
        if None in cells:
            raise _SlowPathError
        texts = [cell.strip() for cell in cast("tuple[str, ...]", cells)]
        if not all(texts):
            raise _SlowPathError
        if convert is str:
            return list(texts)
        if labels is not None:
            if labels.issuperset(texts):
                return list(texts)
            raise _SlowPathError
        try:
            return list(map(convert, texts))
        except MalformedInput:
            raise _SlowPathError from None

    return read


def _fast_reader(convert: Callable[[str], Cell]) -> Callable[[str | None], Cell]:
    if convert is str:  # plaintext, masked: the stripped text itself

        def text_of(cell: str | None) -> Cell:
            if cell and (text := cell.strip()):
                return text
            raise _SlowPathError

        return text_of

    def read(cell: str | None) -> Cell:
        if cell:
            text = cell.strip()
            if text:
                try:
                    return convert(text)
                except MalformedInput:
                    raise _SlowPathError from None
        raise _SlowPathError

    return read


def _check(at: int, op: str, values: list[Cell]) -> Callable[[tuple[Cell, ...]], bool]:
    """``row[at] op value``, as SQLite compares the stored value (ints as numbers, text by
    code point)."""
    if op == "in":
        allowed = set(values)
        return lambda row: row[at] in allowed
    value = values[0]
    compare: dict[str, Callable[[Cell], bool]] = {
        "=": lambda cell: cell == value,
        "!=": lambda cell: cell != value,
        "<": lambda cell: _lt(cell, value),
        "<=": lambda cell: cell == value or _lt(cell, value),
        ">": lambda cell: _lt(value, cell),
        ">=": lambda cell: cell == value or _lt(value, cell),
    }
    test = compare[op]
    return lambda row: test(row[at])


def _lt(a: Cell, b: Cell) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    return str(a) < str(b)
