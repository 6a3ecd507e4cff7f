"""The dataset catalogue: registrations and rows, in the node's SQLite file.

A dataset is registered from a CSV file with its governance metadata (DESIGN.md, "Datasets and
governance metadata"): grade, sharing type (with its legal basis for ``none``), owner and holder,
and a rule for every column. Registration and import are one SQLite transaction: the
``datasets`` row, the dataset's own table ``ds_<name>`` with every row, its indexes, and the
``dataset.added`` audit entry either all land or none does.

The file is read as :mod:`govshare.node.data.source_file` describes: its encoding named or
detected (UTF-8, else GBK, else GB18030), its delimiter, and a header map renaming the file's
headers (``身份证号``) to the column names the rules use (``id_number``).

Import validation, per row (1-based, the header not counted; the file line is given too):

- the row has as many cells as the header;
- a blank cell follows its column's NULL policy (:mod:`govshare.node.data.column_format`):
  refused by default where values are computed on (join, group and aggregate columns), kept as
  an empty string in the others, or — as the operator declares — the row skipped or the
  aggregate taken as zero;
- a ``join_key`` cell passes its key type's normaliser (:mod:`govshare.node.data.keys`) and is
  stored normalised;
- a ``group_key`` cell is one of the column's declared domain labels;
- an ``aggregate`` cell is a decimal number with at most the column's scale of decimal places,
  stored as the signed 64-bit integer ``value * 10**scale`` (an integer at scale 0), so sums
  stay exact.

A bad row refuses the whole file with its row number and reason (:class:`MalformedInput`),
unless ``skip_invalid`` is set: then the good rows are imported and the :class:`ImportReport`
says how many were rejected and why (the first :data:`REASONS_KEPT`). Reasons never quote a
cell's value: it may be personal data, and reasons end up in logs and terminals. A *check*
(``check=True``) reads the file through the same validation and reports what an import would
do, reading the store read-only and writing nothing, to the store or to the audit log.

**Versions.** :meth:`Catalogue.replace` refreshes a dataset's rows from a new file as its next
version: the registration — name, governance metadata, column rules and formats, and its
registration time ``created_at`` — stays as it is, so the grants bound to the dataset stay
valid (the policy voids a grant issued before the dataset's registration,
``grant.predates_dataset``; a replace is not a registration, a remove and add is). The new rows
are imported into a fresh table beside the old one, in batches that each hold the write lock
briefly, so a serving node is not blocked for the length of a large import; then one
transaction points the registration at the new table, drops the old one and records
``dataset.replaced`` with both row counts and both files' SHA-256. Each read sees one version;
a read that found the old table and streams after the swap fails (its table is gone), and a
query whose reads straddle the swap may see both, as with a remove and add.

Cells are stripped of surrounding blanks. Dataset and column names match
:data:`NAME_PATTERN` (lower-case SQL-safe identifiers), and are quoted anyway; every value goes
through parameter binding.

Reads for the query path (:meth:`Catalogue.keys`, :meth:`Catalogue.rows`,
:meth:`Catalogue.count`) return stored values as they are — normalised keys, raw masked
values, aggregates in their stored unit (``10**-scale``) — after the policy decision; applying
a decision's obligations (masks, k, DP) is the caller's job. They refuse ``deny`` columns
outright, whatever the caller decided.

**Stopping a long read.** The reads that run as one long SQL statement or decryption loop
(:meth:`Catalogue.keys`, :meth:`Catalogue.count`, :meth:`Catalogue.row_ids`,
:meth:`Catalogue.group_sums`, and the stream of :meth:`Catalogue.rows`) take an optional
``stop`` check (:data:`Stop`): SQLite calls it every :data:`STOP_EVERY` steps of the statement
(its progress handler), and a sealed table's read calls it before each chunk. A check that
returns true ends the read with :class:`~govshare.protocols.errors.Aborted` naming the dataset;
one that raises ends it with its own error. So a caller — a node stopping, a query withdrawn —
ends a read of a million rows within a fraction of a second, and the catalogue goes on serving
the next one (each read has its own connection). A live source's reads
(:mod:`govshare.node.data.live`, PostgreSQL) look at it too, before each batch of rows, and
cancel the source's statement under way when it says stop.
"""

from __future__ import annotations

import builtins
import json
import operator
import re
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from govshare.model.conditions import OPERATORS, Condition
from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    DatasetInfo,
    Grade,
    Owner,
    OwnerKind,
    SharingType,
)
from govshare.model.identity import validate_jurisdiction
from govshare.node.audit.sink import AuditSink
from govshare.node.data import keys as key_types
from govshare.node.data import source_file
from govshare.node.data.at_rest import AtRest, SealedColumns, WrongDataKey, purge
from govshare.node.data.column_format import (
    ColumnFormat,
    NullPolicy,
    format_from_json,
    parse_fixed_point,
    validate_format,
)
from govshare.node.data.masking import parse_mask
from govshare.node.data.source_file import ProgressCallback, ScannedFile, SourceFormat
from govshare.node.data.sources import EMBEDDED, LiveSource, source_from_json
from govshare.node.policy.decision import (
    COLUMN_DENY,
    GRADE_MIN_GROUP_SIZE,
    IMPORTANT_MIN_GROUP_SIZE,
)
from govshare.node.stores.sqlite import connect, immediate, opened
from govshare.protocols.errors import (
    Aborted,
    AlreadyExists,
    MalformedInput,
    NotFound,
    PolicyRefused,
)
from govshare.protocols.suite import STANDARD, Suite

if TYPE_CHECKING:
    from govshare.node.data.live import LiveDataset

# Dataset and column names: lower-case identifiers that are safe as SQL names and as the
# ``node.dataset`` names of the query dialect.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TABLE_PREFIX = "ds_"
# A table this wide is a data-modelling error, not a dataset; SQLite's own limit is 2000.
MAX_COLUMNS = 256
# A group_key's domain becomes HE slots and a GROUP BY's groups; keep it a short list.
MAX_DOMAIN_LABELS = 1024
MAX_LABEL_CHARS = 100
MAX_TEXT_CHARS = 2000  # description, legal basis, owner
# How many rejection reasons an import report keeps.
REASONS_KEPT = 5
# Rows per executemany batch: bounded memory for million-row files; also the rows a replace
# writes per transaction, and between two progress reports.
BATCH_ROWS = 10_000
# Values an ``in`` condition may list.
MAX_IN_VALUES = 1000
# SQLite virtual-machine steps between two calls of a read's stop check (its progress
# handler): about a millisecond of a large read. A 1M-row ``keys`` read in the clear (about
# 2 s, 18M steps) calls it 1,800 times, at about 0.4 us a call: well under 0.1 % of the read.
STOP_EVERY = 10_000

Stop = Callable[[], object]
"""A long read's stop check: true to end the read (Aborted), or it raises its own error."""

_INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name                  TEXT PRIMARY KEY,
    table_name            TEXT NOT NULL UNIQUE,
    grade                 TEXT NOT NULL,
    sharing_type          TEXT NOT NULL,
    legal_basis           TEXT NOT NULL,
    owner_kind            TEXT NOT NULL,
    owner_name            TEXT NOT NULL,
    holder                TEXT NOT NULL,
    columns               TEXT NOT NULL,  -- JSON list of column rules
    row_count             INTEGER NOT NULL,
    description           TEXT NOT NULL,
    created_at            INTEGER NOT NULL,
    min_set_size          INTEGER NOT NULL,
    allowed_jurisdictions TEXT NOT NULL,  -- JSON list
    min_group_size        INTEGER NOT NULL,
    require_dp            INTEGER NOT NULL,
    require_approval      INTEGER NOT NULL,
    source_sha256         TEXT NOT NULL,
    version               INTEGER NOT NULL DEFAULT 1,
    replaced_at           INTEGER,
    encoding              TEXT NOT NULL DEFAULT 'utf-8',
    source_format         TEXT NOT NULL DEFAULT '{}',  -- JSON: SourceFormat.to_json()
    source_kind           TEXT NOT NULL DEFAULT 'embedded',  -- govshare.node.data.sources
    source_location       TEXT NOT NULL DEFAULT '{}'  -- JSON: a live source, never a secret
);
"""
# Made when a catalogue is first opened with a data key (a store without it seals nothing).
_SEALED_SCHEMA = """
-- Tables whose rows are sealed (govshare.node.data.at_rest): their column order and their key,
-- wrapped under the node's data key. Deleting a row here shreds its table.
CREATE TABLE IF NOT EXISTS sealed_tables (
    table_name  TEXT PRIMARY KEY,
    columns     TEXT NOT NULL,  -- JSON list, the order of the cells after _row in each row
    wrapped_key BLOB NOT NULL
);
"""
# Columns added to ``datasets`` after its first release, added to an older store when it opens.
_ADDED_COLUMNS = (
    ("version", "INTEGER NOT NULL DEFAULT 1"),
    ("replaced_at", "INTEGER"),
    ("encoding", "TEXT NOT NULL DEFAULT 'utf-8'"),
    ("source_format", "TEXT NOT NULL DEFAULT '{}'"),
    ("source_kind", "TEXT NOT NULL DEFAULT 'embedded'"),
    ("source_location", "TEXT NOT NULL DEFAULT '{}'"),
)


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class RejectedRow:
    row: int  # 1-based, the header not counted
    reason: str


@dataclass(frozen=True)
class ImportReport:
    """What an import did, or — for a check (``dry_run``) — would do.

    ``skipped`` rows were left out by a ``null=skip-row`` policy; ``blank_cells`` counts, per
    column, the blank cells a policy other than ``refuse`` took. ``would_import`` is false only
    for a check whose import would be refused (bad rows without ``skip_invalid``, or no valid
    row). A replace gives the ``version`` it made and the ``previous_row_count``.
    """

    dataset: str
    imported: int
    rejected: int
    first_rejections: tuple[RejectedRow, ...]
    source_sha256: str
    encoding: str = "utf-8"
    skipped: int = 0
    blank_cells: tuple[tuple[str, int], ...] = ()
    dry_run: bool = False
    would_import: bool = True
    version: int = 1
    previous_row_count: int | None = None


@dataclass(frozen=True)
class DatasetRecord:
    """A registration with what the catalogue keeps beside it: each column's import format,
    the current version (1 at registration, one more at each replace) and when it was
    replaced, the SHA-256 and encoding of the file it came from, and how that file was read.
    ``live``: the live source a dataset reads at each query (``None``: rows imported here);
    its ``source_sha256`` is then the digest of the rows read at registration."""

    info: DatasetInfo
    formats: Mapping[str, ColumnFormat]
    version: int
    replaced_at: int | None
    source_sha256: str
    encoding: str
    source: SourceFormat
    live: LiveSource | None = None


@dataclass(frozen=True)
class Restatement:
    """The registration as a ``dataset replace`` command restates it (``None``: not stated).

    A replace keeps the registration, so whatever is stated must equal what is registered;
    ``formats`` are read with ``columns`` (columns stated without them have default formats).
    """

    grade: Grade | None = None
    sharing_type: SharingType | None = None
    legal_basis: str | None = None
    owner_kind: OwnerKind | None = None
    owner: str | None = None
    holder: str | None = None
    description: str | None = None
    allowed_jurisdictions: Sequence[str] | None = None
    min_group_size: int | None = None
    min_set_size: int | None = None
    require_dp: bool | None = None
    require_approval: bool | None = None
    columns: Sequence[ColumnRule] | None = None
    formats: Mapping[str, ColumnFormat] = field(default_factory=dict)


Cell = str | int

# Operators of the query dialect, as Python evaluates them over decrypted rows (the same
# answers as SQLite's: text by code point, which is UTF-8's byte order; integers as integers).
_PY_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda cell, values: cell in values,
}


# --------------------------------------------------------------------------- validation


def validate_identifier(name: str, what: str) -> str:
    """Return ``name`` if it matches :data:`NAME_PATTERN`, else raise MalformedInput."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise MalformedInput(
            f"{what} {name!r} must be a lower-case identifier (a-z, 0-9, _; starting with a "
            "letter; at most 63 characters)",
            field=what,
        )
    return name


def _text(value: str, what: str, *, required: bool, multiline: bool = False) -> str:
    stripped = value.strip()
    if required and not stripped:
        raise MalformedInput(f"{what} must not be empty", field=what)
    pattern = _CONTROL_BUT_NEWLINE if multiline else _CONTROL
    if len(stripped) > MAX_TEXT_CHARS or pattern.search(stripped):
        raise MalformedInput(
            f"{what} must be at most {MAX_TEXT_CHARS} characters without control characters",
            field=what,
        )
    return stripped


def validate_columns(columns: Sequence[ColumnRule]) -> tuple[ColumnRule, ...]:
    """Check column rules and return them canonicalised (mask text, domain labels stripped).

    Raises:
        MalformedInput: a bad or repeated name; ``join_key`` without a known key type;
            ``group_key`` without a domain; ``masked`` without a valid mask; a key type,
            domain or mask on a kind that takes none.
    """
    if not columns:
        raise MalformedInput("a dataset needs at least one column rule", field="columns")
    if len(columns) > MAX_COLUMNS:
        raise MalformedInput(f"a dataset has at most {MAX_COLUMNS} columns", field="columns")
    seen: set[str] = set()
    result: list[ColumnRule] = []
    for rule in columns:
        name = validate_identifier(rule.name, "column")
        if name in seen:
            raise MalformedInput(f"column {name!r} has two rules", field="columns")
        seen.add(name)
        try:
            kind = ColumnKind(rule.kind)
        except ValueError:
            known = ", ".join(k.value for k in ColumnKind)
            raise MalformedInput(
                f"column {name!r}: unknown kind {rule.kind!r}; known: {known}", field="columns"
            ) from None
        key_type = rule.key_type
        if kind is ColumnKind.JOIN_KEY:
            if not key_type:
                raise MalformedInput(
                    f"join_key column {name!r} needs a key type "
                    f"({', '.join(key_types.key_types())})",
                    field="columns",
                )
            key_types.normaliser(key_type)
        elif key_type:
            raise MalformedInput(f"only a join_key takes a key type ({name!r})", field="columns")
        domain: tuple[str, ...] = ()
        if kind is ColumnKind.GROUP_KEY:
            domain = tuple(label.strip() for label in rule.domain)
            if not domain:
                raise MalformedInput(
                    f"group_key column {name!r} needs a declared domain", field="columns"
                )
            if len(domain) > MAX_DOMAIN_LABELS or len(set(domain)) != len(domain):
                raise MalformedInput(
                    f"group_key column {name!r}: the domain must list at most "
                    f"{MAX_DOMAIN_LABELS} distinct labels",
                    field="columns",
                )
            for label in domain:
                if not label or len(label) > MAX_LABEL_CHARS or _CONTROL.search(label):
                    raise MalformedInput(
                        f"group_key column {name!r}: domain labels are non-empty, at most "
                        f"{MAX_LABEL_CHARS} characters, without control characters",
                        field="columns",
                    )
        elif rule.domain:
            raise MalformedInput(f"only a group_key takes a domain ({name!r})", field="columns")
        mask: str | None = None
        if kind is ColumnKind.MASKED and not rule.mask:
            raise MalformedInput(f"masked column {name!r} needs a masking rule", field="columns")
        if rule.mask:
            if kind not in (ColumnKind.MASKED, ColumnKind.JOIN_KEY):
                raise MalformedInput(
                    f"only a masked or join_key column takes a masking rule ({name!r})",
                    field="columns",
                )
            mask = str(parse_mask(rule.mask))
        result.append(ColumnRule(name, kind, key_type=key_type, domain=domain, mask=mask))
    return tuple(result)


def _validate_registration(
    *,
    name: str,
    grade: Grade | str,
    sharing_type: SharingType | str,
    legal_basis: str,
    owner: Owner,
    columns: Sequence[ColumnRule],
    description: str,
    allowed_jurisdictions: Sequence[str],
    min_group_size: int,
    min_set_size: int,
    require_dp: bool,
    require_approval: bool,
    now: int,
) -> DatasetInfo:
    validate_identifier(name, "dataset")
    try:
        grade_value = Grade(grade)
        sharing = SharingType(sharing_type)
        owner_kind = OwnerKind(owner.kind)
    except ValueError as exc:
        raise MalformedInput(str(exc)) from None
    basis = _text(legal_basis, "legal_basis", required=sharing is SharingType.NONE)
    floor = GRADE_MIN_GROUP_SIZE.get(grade_value, IMPORTANT_MIN_GROUP_SIZE)
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int):
        raise TypeError("min_group_size must be an int")
    if min_group_size != 0 and min_group_size < floor:
        raise MalformedInput(
            f"min group size {min_group_size} is below the {grade_value.value} floor {floor}; "
            "an operator may only tighten",
            field="min_group_size",
        )
    if isinstance(min_set_size, bool) or not isinstance(min_set_size, int) or min_set_size < 0:
        raise MalformedInput("min set size must be a non-negative integer", field="min_set_size")
    places = tuple(sorted({validate_jurisdiction(code) for code in allowed_jurisdictions}))
    return DatasetInfo(
        name=name,
        grade=grade_value,
        sharing_type=sharing,
        owner=Owner(
            kind=owner_kind,
            name=_text(owner.name, "owner", required=True),
            holder=_text(owner.holder, "holder", required=True),
        ),
        columns=validate_columns(columns),
        row_count=0,
        legal_basis=basis,
        description=_text(description, "description", required=False, multiline=True),
        created_at=now,
        min_set_size=min_set_size,
        allowed_jurisdictions=places,
        min_group_size=min_group_size,
        require_dp=bool(require_dp),
        require_approval=bool(require_approval),
    )


def validate_formats(
    columns: Sequence[ColumnRule], formats: Mapping[str, ColumnFormat]
) -> dict[str, ColumnFormat]:
    """Every column's import format (default where ``formats`` has none), NULL policy explicit.

    Raises:
        MalformedInput: a format for a column without a rule, or one its kind does not take
            (see :func:`govshare.node.data.column_format.validate_format`).
    """
    names = {rule.name for rule in columns}
    unknown = sorted(set(formats) - names)
    if unknown:
        raise MalformedInput(
            f"a format is given for column(s) {', '.join(map(repr, unknown))} without a rule",
            field="columns",
        )
    return {
        rule.name: validate_format(rule, formats.get(rule.name, ColumnFormat())) for rule in columns
    }


def _blank_reason(rule: ColumnRule, fmt: ColumnFormat) -> str:
    if rule.kind is ColumnKind.JOIN_KEY:
        return "empty join key (null=refuse)"
    if rule.kind is ColumnKind.AGGREGATE:
        number = "an integer" if fmt.scale == 0 else "a decimal number"
        return f"not {number}: blank cell (null=refuse)"
    return "blank cell (null=refuse)"


def _cell_converter(rule: ColumnRule, fmt: ColumnFormat) -> Callable[[str], Cell]:
    """The function reading one non-blank cell of the column (blank cells follow the NULL
    policy before it is called)."""
    if rule.kind is ColumnKind.JOIN_KEY:
        return key_types.normaliser(rule.key_type or "")
    if rule.kind is ColumnKind.GROUP_KEY:
        labels = frozenset(rule.domain)
        shown = ", ".join(rule.domain[:10]) + (", ..." if len(rule.domain) > 10 else "")

        def group_key(cell: str) -> Cell:
            if cell not in labels:
                raise MalformedInput(f"value outside the declared domain ({shown})")
            return cell

        return group_key
    if rule.kind is ColumnKind.AGGREGATE:
        scale = fmt.scale

        def aggregate(cell: str) -> Cell:
            return parse_fixed_point(cell, scale)

        return aggregate
    return str


# --------------------------------------------------------------------------- the store


def _quote(identifier: str) -> str:
    # Names are validated against NAME_PATTERN before they get here; quoting is belt and braces.
    return '"' + identifier.replace('"', '""') + '"'


def _rule_to_json(rule: ColumnRule) -> dict[str, object]:
    return {
        "name": rule.name,
        "kind": rule.kind.value,
        "key_type": rule.key_type,
        "domain": list(rule.domain),
        "mask": rule.mask,
    }


def _rule_from_json(raw: dict[str, object]) -> ColumnRule:
    domain = raw.get("domain") or []
    key_type, mask = raw.get("key_type"), raw.get("mask")
    if not isinstance(domain, list) or not all(isinstance(x, str) for x in domain):
        raise ValueError("bad domain")
    return ColumnRule(
        name=str(raw["name"]),
        kind=ColumnKind(str(raw["kind"])),
        key_type=key_type if isinstance(key_type, str) else None,
        domain=tuple(domain),
        mask=mask if isinstance(mask, str) else None,
    )


def _columns_to_json(info: DatasetInfo, formats: Mapping[str, ColumnFormat]) -> str:
    """The stored ``columns``: each rule with its import format (``scale``, ``null``)."""
    return json.dumps(
        [_rule_to_json(rule) | formats[rule.name].to_json() for rule in info.columns],
        ensure_ascii=False,
    )


def dataset_to_json(info: DatasetInfo) -> dict[str, object]:
    """A JSON-ready view of a registration (for ``--json`` and audit entries)."""
    return {
        "name": info.name,
        "grade": info.grade.value,
        "sharing_type": info.sharing_type.value,
        "legal_basis": info.legal_basis,
        "owner": {
            "kind": info.owner.kind.value,
            "name": info.owner.name,
            "holder": info.owner.holder,
        },
        "columns": [_rule_to_json(rule) for rule in info.columns],
        "row_count": info.row_count,
        "description": info.description,
        "created_at": info.created_at,
        "min_set_size": info.min_set_size,
        "allowed_jurisdictions": list(info.allowed_jurisdictions),
        "min_group_size": info.min_group_size,
        "require_dp": info.require_dp,
        "require_approval": info.require_approval,
    }


def record_to_json(record: DatasetRecord) -> dict[str, object]:
    """:func:`dataset_to_json` with the version, the column formats and the source file."""
    return dataset_to_json(record.info) | {
        "version": record.version,
        "replaced_at": record.replaced_at,
        "column_formats": {name: fmt.to_json() for name, fmt in record.formats.items()},
        "source_sha256": record.source_sha256,
        "encoding": record.encoding,
        "source_format": record.source.to_json(),
        "source": {"kind": EMBEDDED}
        if record.live is None
        else {"kind": record.live.kind, "location": record.live.describe()},
    }


def _info_from_row(row: sqlite3.Row) -> DatasetInfo:
    try:
        return DatasetInfo(
            name=row["name"],
            grade=Grade(row["grade"]),
            sharing_type=SharingType(row["sharing_type"]),
            owner=Owner(OwnerKind(row["owner_kind"]), row["owner_name"], row["holder"]),
            columns=tuple(_rule_from_json(raw) for raw in json.loads(row["columns"])),
            row_count=int(row["row_count"]),
            legal_basis=row["legal_basis"],
            description=row["description"],
            created_at=int(row["created_at"]),
            min_set_size=int(row["min_set_size"]),
            allowed_jurisdictions=tuple(json.loads(row["allowed_jurisdictions"])),
            min_group_size=int(row["min_group_size"]),
            require_dp=bool(row["require_dp"]),
            require_approval=bool(row["require_approval"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedInput(f"stored dataset {row['name']!r} is corrupt: {exc}") from None


def _record_from_row(row: sqlite3.Row) -> DatasetRecord:
    """The record of a ``datasets`` row; a row of a store not yet given the columns of
    :data:`_ADDED_COLUMNS` (read read-only, so not migrated) reads as version 1."""
    info = _info_from_row(row)
    present = set(row.keys())

    def value(column: str, default: object) -> object:
        return row[column] if column in present else default

    try:
        kinds = {rule.name: rule.kind for rule in info.columns}
        formats = {
            str(raw["name"]): format_from_json(raw, kinds[str(raw["name"])])
            for raw in json.loads(row["columns"])
        }
        replaced_at = value("replaced_at", None)
        kind = str(value("source_kind", EMBEDDED))
        live = (
            None
            if kind == EMBEDDED
            else source_from_json(kind, json.loads(str(value("source_location", "{}"))))
        )
        return DatasetRecord(
            info=info,
            formats=formats,
            version=int(str(value("version", 1))),
            replaced_at=None if replaced_at is None else int(str(replaced_at)),
            source_sha256=str(row["source_sha256"]),
            encoding=str(value("encoding", "utf-8")),
            source=SourceFormat.from_json(json.loads(str(value("source_format", "{}")))),
            live=live,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedInput(f"stored dataset {row['name']!r} is corrupt: {exc}") from None


@contextmanager
def _opened_read_only(path: Path, *, shared: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection SQLite itself keeps from writing (``mode=ro``): what a check reads with.
    A store not created yet reads as an empty one (an empty database in memory). ``shared``:
    usable from another thread than this one (see :meth:`Catalogue._open_stream`)."""
    if path.exists():
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=not shared
        )
    else:
        conn = sqlite3.connect(":memory:", check_same_thread=not shared)
        conn.executescript(_SCHEMA)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def _checked(stop: Stop | None, name: str) -> None:
    """Go on, unless ``stop`` says to end the read of dataset ``name`` (or raises).

    Raises:
        Aborted: ``stop`` returned true.
    """
    if stop is not None and stop():
        raise Aborted(f"the read of dataset {name!r} was stopped")


@contextmanager
def _stoppable(conn: sqlite3.Connection, stop: Stop | None, name: str) -> Iterator[None]:
    """``stop`` as ``conn``'s progress handler while the block runs: a statement under way
    ends (``interrupted``) once it says so, and the block raises what :func:`_checked` does.
    The handler is removed after: the connection serves the next read as before."""
    if stop is None:
        yield
        return
    stopped: builtins.list[BaseException] = []

    def handler() -> int:
        try:
            _checked(stop, name)
        except Exception as exc:  # SQLite cannot carry it: kept, raised below
            stopped.append(exc)
            return 1
        return 0

    conn.set_progress_handler(handler, STOP_EVERY)
    try:
        _checked(stop, name)
        yield
    except sqlite3.OperationalError:
        if stopped:
            raise stopped[0] from None
        raise
    finally:
        conn.set_progress_handler(None, 0)


def _dataset_of(table: str) -> str:
    """The dataset whose rows ``table`` holds (``ds_<dataset>``, or ``ds_<dataset>@<tag>``)."""
    return table.split("@")[0].removeprefix(TABLE_PREFIX)


def _interrupted(exc: sqlite3.OperationalError) -> bool:
    """The statement was ended by its progress handler (see :func:`_stoppable`)."""
    return str(exc) == "interrupted"


@dataclass
class _Imported:
    """Running totals of one import (see :class:`ImportReport`)."""

    imported: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: builtins.list[RejectedRow] = field(default_factory=list)
    blanks: dict[str, int] = field(default_factory=dict)

    def report(
        self, name: str, scanned: ScannedFile, *, dry_run: bool, skip_invalid: bool, **extra: int
    ) -> ImportReport:
        return ImportReport(
            dataset=name,
            imported=self.imported,
            rejected=self.rejected,
            first_rejections=tuple(self.reasons),
            source_sha256=scanned.sha256,
            encoding=scanned.encoding,
            skipped=self.skipped,
            blank_cells=tuple(sorted(self.blanks.items())),
            dry_run=dry_run,
            would_import=self.imported > 0 and (skip_invalid or not self.rejected),
            **extra,
        )

    def audit_fields(self, scanned: ScannedFile, source: SourceFormat) -> dict[str, object]:
        return {
            "rejected_rows": self.rejected,
            "skipped_rows": self.skipped,
            "blank_cells": dict(sorted(self.blanks.items())),
            "source_sha256": scanned.sha256,
            "encoding": scanned.encoding,
            "source_format": source.to_json(),
        }


class _Rows:
    """Where imported rows go: a table being written, in one transaction (``add``) or in a
    transaction per batch (``replace``), or nowhere (a check). With ``at_rest`` the table
    holds sealed chunks, one per batch (:mod:`govshare.node.data.at_rest`), and its wrapped key
    goes into ``sealed_tables`` with it."""

    def __init__(
        self,
        conn: sqlite3.Connection | None,
        table: str,
        ordered: Sequence[ColumnRule],
        *,
        batch_commits: bool,
        at_rest: AtRest | None = None,
    ) -> None:
        self._conn, self._table, self._ordered = conn, table, ordered
        self._batch_commits = batch_commits
        self._batch: builtins.list[tuple[Cell, ...]] = []
        self._at_rest = at_rest
        self._key = b""
        self._chunks = 0
        columns = [rule.name for rule in ordered]
        self._insert = (
            f"INSERT INTO {_quote(table)} (_row, {', '.join(_quote(c) for c in columns)})"
            f" VALUES (?, {', '.join('?' for _ in columns)})"
        )
        if conn is not None and at_rest is not None:
            self._key, wrapped = at_rest.new_table_key(table)
            self._write(_create_sealed(table, columns, wrapped))
        elif conn is not None:
            column_sql = ", ".join(
                f"{_quote(rule.name)} "
                + ("INTEGER" if rule.kind is ColumnKind.AGGREGATE else "TEXT")
                + " NOT NULL"
                for rule in ordered
            )
            self._write(
                f"CREATE TABLE {_quote(table)} (_row INTEGER PRIMARY KEY, {column_sql}) STRICT"
            )

    def _write(
        self,
        sql: str | Callable[[sqlite3.Connection], None],
        rows: Sequence[tuple[Any, ...]] | None = None,
    ) -> None:
        if self._conn is None:
            return
        if self._batch_commits:
            with immediate(self._conn):
                self._run(sql, rows)
        else:
            self._run(sql, rows)

    def _run(
        self,
        sql: str | Callable[[sqlite3.Connection], None],
        rows: Sequence[tuple[Any, ...]] | None,
    ) -> None:
        if self._conn is None:  # pragma: no cover - checked by _write
            return
        if callable(sql):
            sql(self._conn)
        elif rows is None:
            self._conn.execute(sql)
        else:
            self._conn.executemany(sql, rows)

    def append(self, values: tuple[Cell, ...]) -> None:
        if self._conn is None:
            return
        self._batch.append(values)
        if len(self._batch) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._batch and self._at_rest is not None:
            sealed = self._at_rest.seal_chunk(
                self._key, self._table, self._chunks, _columns_of(self._batch)
            )
            self._write(
                f"INSERT INTO {_quote(self._table)} (chunk, rows, sealed) VALUES (?, ?, ?)",
                [(self._chunks, len(self._batch), sealed)],
            )
            self._chunks += 1
            self._batch = []
        elif self._batch:
            self._write(self._insert, self._batch)
            self._batch = []

    def finish(self) -> None:
        """Write what is left, then the indexes of the join and group columns (none over
        sealed chunks: an index would hold the values in the clear)."""
        self.flush()
        if self._at_rest is not None:
            return
        for rule in self._ordered:
            if rule.kind in (ColumnKind.JOIN_KEY, ColumnKind.GROUP_KEY):
                self._write(
                    f"CREATE INDEX {_quote(f'{self._table}__{rule.name}')}"
                    f" ON {_quote(self._table)} ({_quote(rule.name)})"
                )


def _create_sealed(
    table: str, columns: Sequence[str], wrapped: bytes
) -> Callable[[sqlite3.Connection], None]:
    """The statements that make a table of sealed chunks and record its wrapped key."""

    def create(conn: sqlite3.Connection) -> None:
        conn.execute(
            f"CREATE TABLE {_quote(table)} (chunk INTEGER PRIMARY KEY, rows INTEGER NOT NULL,"
            " sealed BLOB NOT NULL) STRICT"
        )
        conn.execute(
            "INSERT INTO sealed_tables (table_name, columns, wrapped_key) VALUES (?, ?, ?)",
            (table, json.dumps(list(columns)), wrapped),
        )

    return create


def _columns_of(rows: Sequence[Sequence[Cell]]) -> builtins.list[builtins.list[Cell]]:
    """A batch of rows ``(_row, cell, ...)`` as its columns (what a sealed chunk holds)."""
    return [builtins.list(column) for column in zip(*rows, strict=True)]


def _clip(values: Sequence[int], bound: int) -> builtins.list[int]:
    """``MIN(MAX(value, 0), bound)`` of each value, as the SQL of ``group_sums`` computes it."""
    if bound < 0:
        return [bound] * len(values)
    return [0 if v < 0 else bound if v > bound else v for v in values]


def _drop_table(conn: sqlite3.Connection, table: str) -> None:
    """Drop ``table`` if it exists, and shred it: its wrapped key goes too."""
    conn.execute(f"DROP TABLE IF EXISTS {_quote(table)}")
    if _has_table(conn, "sealed_tables"):
        conn.execute("DELETE FROM sealed_tables WHERE table_name = ?", (table,))


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return found is not None


def _changes(record: DatasetRecord, stated: Restatement) -> builtins.list[str]:
    """What ``stated`` would change of the registration ``record``, as option names.

    Raises:
        MalformedInput: ``stated`` is not a valid registration.
    """
    info = record.info

    def pick(value: object, current: object) -> object:
        return current if value is None else value

    candidate = _validate_registration(
        name=info.name,
        grade=stated.grade or info.grade,
        sharing_type=stated.sharing_type or info.sharing_type,
        legal_basis=str(pick(stated.legal_basis, info.legal_basis)),
        owner=Owner(
            stated.owner_kind or info.owner.kind,
            str(pick(stated.owner, info.owner.name)),
            str(pick(stated.holder, info.owner.holder)),
        ),
        columns=info.columns if stated.columns is None else stated.columns,
        description=str(pick(stated.description, info.description)),
        allowed_jurisdictions=(
            info.allowed_jurisdictions
            if stated.allowed_jurisdictions is None
            else stated.allowed_jurisdictions
        ),
        min_group_size=(
            info.min_group_size if stated.min_group_size is None else stated.min_group_size
        ),
        min_set_size=info.min_set_size if stated.min_set_size is None else stated.min_set_size,
        require_dp=info.require_dp if stated.require_dp is None else stated.require_dp,
        require_approval=(
            info.require_approval if stated.require_approval is None else stated.require_approval
        ),
        now=info.created_at,
    )
    changed = [
        option
        for option, new, old in (
            ("--grade", candidate.grade, info.grade),
            ("--sharing", candidate.sharing_type, info.sharing_type),
            ("--legal-basis", candidate.legal_basis, info.legal_basis),
            ("--owner-kind", candidate.owner.kind, info.owner.kind),
            ("--owner", candidate.owner.name, info.owner.name),
            ("--holder", candidate.owner.holder, info.owner.holder),
            ("--description", candidate.description, info.description),
            ("--jurisdiction", candidate.allowed_jurisdictions, info.allowed_jurisdictions),
            ("--min-group-size", candidate.min_group_size, info.min_group_size),
            ("--min-set-size", candidate.min_set_size, info.min_set_size),
            ("--require-dp", candidate.require_dp, info.require_dp),
            ("--require-approval", candidate.require_approval, info.require_approval),
        )
        if new != old
    ]
    if stated.columns is not None:
        formats = validate_formats(candidate.columns, stated.formats)
        same_rules = {r.name: r for r in candidate.columns} == {r.name: r for r in info.columns}
        if not same_rules or formats != dict(record.formats):
            changed.append("--column")
    elif stated.formats:
        raise TypeError("formats are restated with their columns")
    return changed


@dataclass(frozen=True)
class Destruction:
    """What :meth:`Catalogue.destroy` destroyed: the registration, its rows, the digest of
    what they held (the suite's hash over one JSON line ``[_row, cell, ...]`` per row, in
    import order; ``digest_of`` says ``"rows"``, or ``"sealed chunks"`` when the catalogue had no
    data key to read them), whether a wrapped key was deleted (crypto-shredding), and whether
    the WAL could be cut to zero bytes (a reader of an older snapshot keeps it until the node's
    next checkpoint)."""

    info: DatasetInfo
    rows: int
    digest: str
    digest_of: str
    hash_name: str
    key_shredded: bool
    wal_truncated: bool

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.info.name,
            "rows": self.rows,
            "digest": self.digest,
            "digest_of": self.digest_of,
            "hash": self.hash_name,
            "key_shredded": self.key_shredded,
            "secure_delete": True,
            "vacuumed": True,
            "wal_truncated": self.wal_truncated,
        }


@dataclass(frozen=True)
class _SealedTable:
    """A sealed table's column order (the cells after ``_row`` in each row) and its key."""

    columns: tuple[str, ...]
    key: bytes = field(repr=False)


@contextmanager
def _opened_overwriting(path: Path) -> Iterator[sqlite3.Connection]:
    """A writable connection whose deletes overwrite what they free (``secure_delete``)."""
    with opened(path) as conn:
        conn.execute("PRAGMA secure_delete=ON")
        yield conn


class Catalogue:
    """The datasets of one node, in its SQLite database (``NodeConfig.database_path``).

    With ``at_rest`` (the node's data key and suite) imported rows are stored sealed
    (:mod:`govshare.node.data.at_rest`), and tables an older version stored in the clear are
    sealed when the catalogue opens. Without it, rows are stored and read in the clear (stores
    of tests, and reads of metadata, which is never sealed); reading a sealed table without it
    is refused.
    """

    def __init__(self, path: Path, *, at_rest: AtRest | None = None) -> None:
        self.path = path
        self._read_only = False
        self._at_rest = at_rest
        with self._open() as conn:
            conn.executescript(_SCHEMA)
            self._migrate(conn)
            if at_rest is not None:
                conn.executescript(_SEALED_SCHEMA)
                self._seal_clear_tables(conn, at_rest)

    @classmethod
    def read_only(cls, path: Path) -> Catalogue:
        """The catalogue opened for reading only (``mode=ro``; an older store is read as it
        is, not migrated): what a check uses, so that it cannot write."""
        catalogue = cls.__new__(cls)
        catalogue.path = path
        catalogue._read_only = True
        catalogue._at_rest = None
        return catalogue

    def _seal_clear_tables(self, conn: sqlite3.Connection, at_rest: AtRest) -> None:
        """Seal the rows of datasets an older version stored in the clear, each into a new
        table in one transaction, then overwrite and reclaim the clear ones (:func:`purge`)."""
        sealed_any = False
        for name, table in conn.execute(
            "SELECT name, table_name FROM datasets WHERE source_kind = ?"
            " AND table_name NOT IN (SELECT table_name FROM sealed_tables)",
            (EMBEDDED,),
        ).fetchall():
            with immediate(conn):
                present = [row[1] for row in conn.execute(f"PRAGMA table_info({_quote(table)})")]
                if not present:
                    continue  # no such table (a live dataset, or already gone)
                columns = [c for c in present if c != "_row"]
                fresh = f"{TABLE_PREFIX}{name}@{secrets.token_hex(4)}"
                key, wrapped = at_rest.new_table_key(fresh)
                _create_sealed(fresh, columns, wrapped)(conn)
                cursor = conn.execute(
                    f"SELECT _row, {', '.join(_quote(c) for c in columns)} FROM {_quote(table)}"
                    " ORDER BY _row"
                )
                chunk = 0
                while batch := cursor.fetchmany(BATCH_ROWS):
                    conn.execute(
                        f"INSERT INTO {_quote(fresh)} (chunk, rows, sealed) VALUES (?, ?, ?)",
                        (
                            chunk,
                            len(batch),
                            at_rest.seal_chunk(key, fresh, chunk, _columns_of(batch)),
                        ),
                    )
                    chunk += 1
                conn.execute("UPDATE datasets SET table_name = ? WHERE name = ?", (fresh, name))
                _drop_table(conn, table)
            sealed_any = True
        if sealed_any:
            purge(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        def missing() -> builtins.list[tuple[str, str]]:
            present = {row[1] for row in conn.execute("PRAGMA table_info(datasets)")}
            return [(c, ddl) for c, ddl in _ADDED_COLUMNS if c not in present]

        if not missing():
            return
        with immediate(conn):
            for column, ddl in missing():  # again, under the lock: another process may have
                conn.execute(f"ALTER TABLE datasets ADD COLUMN {column} {ddl}")

    def _open(self) -> AbstractContextManager[sqlite3.Connection]:
        return _opened_read_only(self.path) if self._read_only else _opened_overwriting(self.path)

    def _open_stream(self) -> AbstractContextManager[sqlite3.Connection]:
        """The connection of one stream of rows (:meth:`rows`), which only that stream's
        generator uses, and closes once when it ends. It may end in another thread than the
        one that opened it: a reader that stops early leaves it to whoever drops it last (the
        garbage collector, in any of the node's threads), so SQLite's same-thread check is off
        for it. Safe: a generator never runs in two threads at once. A stream only reads, so
        it needs no ``secure_delete``."""
        if self._read_only:
            return _opened_read_only(self.path, shared=True)
        return closing(connect(self.path, shared=True))

    # ----------------------------------------------------------------- registration

    def add(
        self,
        csv_path: Path | LiveSource,
        *,
        name: str,
        grade: Grade | str,
        sharing_type: SharingType | str,
        legal_basis: str = "",
        owner: Owner,
        columns: Sequence[ColumnRule],
        description: str = "",
        skip_invalid: bool = False,
        actor: str,
        audit: AuditSink | None,
        allowed_jurisdictions: Sequence[str] = (),
        min_group_size: int = 0,
        min_set_size: int = 0,
        require_dp: bool = False,
        require_approval: bool = False,
        formats: Mapping[str, ColumnFormat] | None = None,
        source: SourceFormat | None = None,
        check: bool = False,
        progress: ProgressCallback | None = None,
        now: int | None = None,
    ) -> ImportReport:
        """Register a dataset and import its CSV rows in one transaction; or, for a live
        source (``csv_path`` a :class:`~govshare.node.data.sources.LiveSource`), register it
        without copying a row (see :meth:`_add_live`).

        Args:
            formats: per column, its decimal scale and NULL policy (default: scale 0, the
                kind's default policy).
            source: how to read the file: encoding (``None``: detect), delimiter, header map.
            check: only report what the import would do; write and log nothing.
            progress: called with ``(phase, bytes done, bytes in the file)`` as it reads.

        Raises:
            AlreadyExists: a dataset of that name is registered.
            MalformedInput: a bad registration (see :func:`validate_columns`,
                :func:`validate_formats`; ``none`` without legal basis; k below the grade
                floor), a header that does not match the column rules after the header map, a
                bad row (without ``skip_invalid`` or ``check``; the message starts ``row N``),
                a file no encoding decodes, or no valid row at all (without ``check``).
            NotFound: the CSV file does not exist.
        """
        info = _validate_registration(
            name=name,
            grade=grade,
            sharing_type=sharing_type,
            legal_basis=legal_basis,
            owner=owner,
            columns=columns,
            description=description,
            allowed_jurisdictions=allowed_jurisdictions,
            min_group_size=min_group_size,
            min_set_size=min_set_size,
            require_dp=require_dp,
            require_approval=require_approval,
            now=int(time.time()) if now is None else now,
        )
        column_formats = validate_formats(info.columns, formats or {})
        source = source_file.validate(source or SourceFormat())
        if check:
            with self._open() as conn:
                self._refuse_existing(conn, name)
        if not isinstance(csv_path, Path | str):
            return self._add_live(
                csv_path, info, column_formats, source, skip_invalid=skip_invalid, check=check,
                actor=actor, audit=audit,
            )  # fmt: skip
        scanned = source_file.scan(csv_path, source.encoding, progress)
        if check:
            totals = self._import_rows(
                None, csv_path, scanned, source, info, column_formats, "", keep_going=True,
                skip_invalid=skip_invalid, batch_commits=False, progress=progress,
            )  # fmt: skip
            return totals.report(name, scanned, dry_run=True, skip_invalid=skip_invalid)
        table = TABLE_PREFIX + info.name
        with self._open() as conn:
            with immediate(conn):
                self._refuse_existing(conn, name)
                totals = self._import_rows(
                    conn, csv_path, scanned, source, info, column_formats, table,
                    keep_going=skip_invalid, skip_invalid=skip_invalid, batch_commits=False,
                    progress=progress,
                )  # fmt: skip
                if totals.imported == 0:
                    raise MalformedInput(f"{csv_path}: no valid row to import")
                info = replace(info, row_count=totals.imported)
                self._insert(
                    conn, info, table, column_formats, scanned.sha256, scanned.encoding, source
                )
                if audit is not None:
                    fields = dataset_to_json(info)
                    fields.update(totals.audit_fields(scanned, source))
                    fields.update(
                        version=1,
                        column_formats={n: f.to_json() for n, f in column_formats.items()},
                    )
                    audit.record("dataset.added", fields, actor=actor)
        return totals.report(name, scanned, dry_run=False, skip_invalid=skip_invalid)

    @staticmethod
    def _insert(
        conn: sqlite3.Connection,
        info: DatasetInfo,
        table: str,
        formats: Mapping[str, ColumnFormat],
        sha256: str,
        encoding: str,
        source: SourceFormat,
        live: LiveSource | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO datasets (name, table_name, grade, sharing_type, legal_basis,"
            " owner_kind, owner_name, holder, columns, row_count, description,"
            " created_at, min_set_size, allowed_jurisdictions, min_group_size,"
            " require_dp, require_approval, source_sha256, version, replaced_at,"
            " encoding, source_format, source_kind, source_location)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, ?, ?, ?, ?)",
            (
                info.name,
                table,
                info.grade.value,
                info.sharing_type.value,
                info.legal_basis,
                info.owner.kind.value,
                info.owner.name,
                info.owner.holder,
                _columns_to_json(info, formats),
                info.row_count,
                info.description,
                info.created_at,
                info.min_set_size,
                json.dumps(list(info.allowed_jurisdictions)),
                info.min_group_size,
                int(info.require_dp),
                int(info.require_approval),
                sha256,
                encoding,
                json.dumps(source.to_json(), ensure_ascii=False),
                EMBEDDED if live is None else live.kind,
                "{}" if live is None else json.dumps(live.to_json(), ensure_ascii=False),
            ),
        )

    def _add_live(
        self,
        live_source: LiveSource,
        info: DatasetInfo,
        formats: Mapping[str, ColumnFormat],
        source: SourceFormat,
        *,
        skip_invalid: bool,
        check: bool,
        actor: str,
        audit: AuditSink | None,
    ) -> ImportReport:
        """Register a live table or view: its columns checked against the rules (after the
        ``--map``), every row read once through the rules as an import would read it (a bad
        row refuses the registration unless ``skip_invalid``), and nothing copied.

        Raises:
            Unavailable: the source cannot be reached.
            MalformedInput: the relation's columns do not match the rules; a bad row (without
                ``skip_invalid`` or ``check``); no valid row (without ``check``).
        """
        from govshare.node.data.live import LiveDataset  # it reads through this module

        record = DatasetRecord(info, formats, 1, None, "", "utf-8", source, live_source)
        reader = LiveDataset(record, live_source)
        where = live_source.describe()
        present = list(reader.columns())
        renamed = dict(source.header_map)
        mapped = [renamed.get(column, column) for column in present]
        rules = {rule.name for rule in info.columns}
        unknown = [c for c, m in zip(present, mapped, strict=True) if m not in rules]
        if unknown:
            raise MalformedInput(
                f"{where}: column(s) {', '.join(map(repr, unknown))} have no rule; give every "
                "column a rule (deny to keep it out of every query), or --map COLUMN=NAME",
                field="columns",
            )
        missing = sorted(rules - set(mapped))
        if missing:
            raise MalformedInput(
                f"rules name column(s) {', '.join(map(repr, missing))} that {where} does not have",
                field="columns",
            )
        totals = reader.validate(refuse_bad=not (skip_invalid or check))
        report = ImportReport(
            dataset=info.name,
            imported=totals.rows,
            rejected=totals.rejected,
            first_rejections=tuple(totals.reasons),
            source_sha256=totals.digest(),
            skipped=totals.skipped,
            blank_cells=tuple(sorted(totals.blanks.items())),
            dry_run=check,
            would_import=totals.rows > 0 and (skip_invalid or not totals.rejected),
        )
        if check:
            return report
        if totals.rows == 0:
            raise MalformedInput(f"{where}: no valid row")
        info = replace(info, row_count=totals.rows)
        with self._open() as conn:
            with immediate(conn):
                self._refuse_existing(conn, info.name)
                self._insert(
                    conn, info, TABLE_PREFIX + info.name, formats, report.source_sha256,
                    "utf-8", source, live_source,
                )  # fmt: skip
                if audit is not None:
                    fields = dataset_to_json(info)
                    fields.update(
                        version=1,
                        column_formats={n: f.to_json() for n, f in formats.items()},
                        source={"kind": live_source.kind, "location": where},
                        source_format=source.to_json(),
                        rejected_rows=totals.rejected,
                        skipped_rows=totals.skipped,
                        rows_sha256=report.source_sha256,
                    )
                    audit.record("dataset.added", fields, actor=actor)
        return report

    @staticmethod
    def _refuse_existing(conn: sqlite3.Connection, name: str) -> None:
        try:
            found = conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone()
        except sqlite3.OperationalError:  # a read-only look at a store without the table yet
            return
        if found:
            raise AlreadyExists(
                f"dataset {name!r} is already registered (dataset replace refreshes its rows "
                "and keeps its grants)"
            )

    def replace(
        self,
        csv_path: Path,
        *,
        name: str,
        stated: Restatement = Restatement(),
        source: SourceFormat | None = None,
        skip_invalid: bool = False,
        actor: str,
        audit: AuditSink | None,
        check: bool = False,
        progress: ProgressCallback | None = None,
        now: int | None = None,
    ) -> ImportReport:
        """Refresh a dataset's rows from ``csv_path`` as its next version (module docstring).

        The registration stays as it is, its grants with it. ``source`` defaults to how the
        current version's file was read (its header map included).

        Raises:
            NotFound: no such dataset, or no such file.
            MalformedInput: ``stated`` differs from the registration (the message names the
                options and says to remove and add instead); the file does not fit the
                registered columns; a bad row (without ``skip_invalid`` or ``check``); no valid
                row (without ``check``); or the dataset was replaced, or removed and added,
                while the file was imported.
        """
        validate_identifier(name, "dataset")
        record = self.record(name)
        if record.live is not None:
            raise MalformedInput(
                f"dataset {name!r} reads its rows live from {record.live.describe()} at each "
                "query: there is no file to replace",
                field="source",
            )
        changed = _changes(record, stated)
        if changed:
            raise MalformedInput(
                f"dataset replace keeps the registration of {name!r}; this would change "
                f"{', '.join(changed)}: to change the registration, remove the dataset and add "
                "it again (its grants then no longer apply)",
                field="registration",
            )
        source = source_file.validate(record.source if source is None else source)
        scanned = source_file.scan(csv_path, source.encoding, progress)
        version = record.version + 1
        if check:
            totals = self._import_rows(
                None, csv_path, scanned, source, record.info, record.formats, "",
                keep_going=True, skip_invalid=skip_invalid, batch_commits=False, progress=progress,
            )  # fmt: skip
            return totals.report(
                name, scanned, dry_run=True, skip_invalid=skip_invalid, version=version,
                previous_row_count=record.info.row_count,
            )  # fmt: skip
        # A fresh name, so that two replaces at once never write into one table.
        table = f"{TABLE_PREFIX}{name}@{secrets.token_hex(4)}"
        with self._open() as conn:
            try:
                # The staged rows need no fsync of their own: nothing refers to them until the
                # swap, whose commit (synchronous=FULL again) syncs the log and every frame in it.
                conn.execute("PRAGMA synchronous=NORMAL")
                totals = self._import_rows(
                    conn, csv_path, scanned, source, record.info, record.formats, table,
                    keep_going=skip_invalid, skip_invalid=skip_invalid, batch_commits=True,
                    progress=progress,
                )  # fmt: skip
                if totals.imported == 0:
                    raise MalformedInput(f"{csv_path}: no valid row to import")
                conn.execute("PRAGMA synchronous=FULL")
                with immediate(conn):
                    self._swap(
                        conn, record, table, totals, scanned, source, version=version,
                        now=int(time.time()) if now is None else now, actor=actor, audit=audit,
                    )  # fmt: skip
            except BaseException:
                try:
                    with immediate(conn):
                        _drop_table(conn, table)
                except sqlite3.Error:
                    pass  # the store is locked or read-only: remove drops it later
                raise
            # The old version's pages were zeroed as they were freed; put those over the old
            # ones in the file and cut the WAL that still holds them.
            purge(conn, vacuum=False)
        return totals.report(
            name, scanned, dry_run=False, skip_invalid=skip_invalid, version=version,
            previous_row_count=record.info.row_count,
        )  # fmt: skip

    @staticmethod
    def _swap(
        conn: sqlite3.Connection,
        record: DatasetRecord,
        table: str,
        totals: _Imported,
        scanned: ScannedFile,
        source: SourceFormat,
        *,
        version: int,
        now: int,
        actor: str,
        audit: AuditSink | None,
    ) -> None:
        """Point the registration at the imported table, drop the old one, log the replace."""
        name = record.info.name
        row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"dataset {name!r} was removed while its new rows were imported")
        current = _record_from_row(row)
        if (current.version, current.info.created_at) != (version - 1, record.info.created_at):
            raise MalformedInput(
                f"dataset {name!r} changed while its new rows were imported; replace it again"
            )
        _drop_table(conn, row["table_name"])
        conn.execute(
            "UPDATE datasets SET table_name = ?, row_count = ?, version = ?, replaced_at = ?,"
            " source_sha256 = ?, encoding = ?, source_format = ? WHERE name = ?",
            (
                table,
                totals.imported,
                version,
                now,
                scanned.sha256,
                scanned.encoding,
                json.dumps(source.to_json(), ensure_ascii=False),
                name,
            ),
        )
        if audit is not None:
            fields: dict[str, object] = {
                "name": name,
                "version": version,
                "previous_version": current.version,
                "row_count": totals.imported,
                "previous_row_count": current.info.row_count,
                "previous_source_sha256": current.source_sha256,
                "created_at": current.info.created_at,
                "replaced_at": now,
            }
            fields.update(totals.audit_fields(scanned, source))
            audit.record("dataset.replaced", fields, actor=actor)

    def _import_rows(
        self,
        conn: sqlite3.Connection | None,
        csv_path: Path,
        scanned: ScannedFile,
        source: SourceFormat,
        info: DatasetInfo,
        formats: Mapping[str, ColumnFormat],
        table: str,
        *,
        keep_going: bool,
        skip_invalid: bool,
        batch_commits: bool,
        progress: ProgressCallback | None,
    ) -> _Imported:
        """Read, check and (with ``conn``) write the rows; ``keep_going``: count bad rows
        instead of raising at the first."""
        rules = {rule.name: rule for rule in info.columns}
        totals = _Imported()
        with source_file.read(csv_path, scanned, source) as reader:
            header = reader.header
            if len(set(header)) != len(header):
                raise MalformedInput(
                    f"{csv_path}: the header repeats a column name"
                    + (" (after the header map)" if source.header_map else "")
                )
            unknown = [column for column in header if column not in rules]
            if unknown:
                hint = (
                    "; map a header to a column name with --map HEADER=NAME"
                    if any(not NAME_PATTERN.match(c) for c in unknown)
                    else ""
                )
                raise MalformedInput(
                    f"{csv_path}: column(s) {', '.join(map(repr, unknown))} have no rule; "
                    f"give every column a rule (deny to keep it out of every query){hint}",
                    field="columns",
                )
            missing = [column for column in rules if column not in header]
            if missing:
                raise MalformedInput(
                    f"rules name column(s) {', '.join(map(repr, missing))} that "
                    f"{csv_path} does not have",
                    field="columns",
                )
            ordered = [rules[column] for column in header]
            readers = [
                (rule, formats[rule.name], _cell_converter(rule, formats[rule.name]))
                for rule in ordered
            ]
            sink = _Rows(conn, table, ordered, batch_commits=batch_commits, at_rest=self._at_rest)
            width = len(header)
            for row in reader.rows():
                if not row.cells:
                    continue  # a blank line
                if progress is not None and row.number % BATCH_ROWS == 0:
                    progress("importing", reader.bytes_read, scanned.size)
                try:
                    if len(row.cells) != width:
                        raise MalformedInput(f"has {len(row.cells)} cells, the header has {width}")
                    values: builtins.list[Cell] = [row.number]
                    blanks: builtins.list[str] = []
                    skip = False
                    for (rule, fmt, convert), cell in zip(readers, row.cells, strict=True):
                        if not cell:
                            if fmt.null is NullPolicy.REFUSE:
                                raise MalformedInput(
                                    f"column {rule.name}: {_blank_reason(rule, fmt)}"
                                )
                            blanks.append(rule.name)
                            skip = skip or fmt.null is NullPolicy.SKIP_ROW
                            values.append(0 if fmt.null is NullPolicy.ZERO else "")
                            continue
                        try:
                            values.append(convert(cell))
                        except MalformedInput as exc:
                            raise MalformedInput(f"column {rule.name}: {exc}") from None
                except MalformedInput as exc:
                    reason = f"row {row.number} (line {row.line}): {exc}"
                    if not keep_going:
                        raise MalformedInput(reason, field=f"row {row.number}") from None
                    totals.rejected += 1
                    if len(totals.reasons) < REASONS_KEPT:
                        totals.reasons.append(RejectedRow(row.number, reason))
                    continue
                for column in blanks:
                    totals.blanks[column] = totals.blanks.get(column, 0) + 1
                if skip:
                    totals.skipped += 1
                    continue
                sink.append(tuple(values))
                totals.imported += 1
            sink.finish()
        if progress is not None:
            progress("importing", scanned.size, scanned.size)
        return totals

    def remove(self, name: str, *, actor: str, audit: AuditSink | None) -> DatasetInfo:
        """:meth:`destroy`, returning the registration that was removed."""
        return self.destroy(name, actor=actor, audit=audit).info

    def destroy(self, name: str, *, actor: str, audit: AuditSink | None) -> Destruction:
        """Remove a dataset's rows and registration and leave nothing of them in the files.

        In one transaction, with ``secure_delete`` (freed pages are zeroed): the dataset's
        table and any a replace of it left behind when its process died, their wrapped keys
        (crypto-shredding), the registration, and ``dataset.removed``. Then :func:`purge`
        (``VACUUM``, WAL checkpoint ``TRUNCATE``) and ``dataset.destroyed`` (rows, digest of
        what was destroyed, whether a key was shredded and the WAL cut). ``actor`` is the person
        whose signed act removes it.

        Grants on it stay in the grant table; the policy refuses any grant issued before a
        later registration under the same name (``grant.predates_dataset``).

        Raises:
            NotFound: no such dataset.
        """
        validate_identifier(name, "dataset")
        suite = STANDARD if self._at_rest is None else self._at_rest.suite
        with self._open() as conn:
            with immediate(conn):
                row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise NotFound(f"no dataset {name!r}")
                info = _info_from_row(row)
                table = str(row["table_name"])
                rows, digest, digest_of = self._digest_rows(conn, table, suite)
                shredded = self._sealed(conn, table, need_key=False) is not None
                # A live dataset has no table here.
                _drop_table(conn, table)
                staged = f"{TABLE_PREFIX}{name}@"
                for (left,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND substr(name, 1, ?) = ?",
                    (len(staged), staged),
                ).fetchall():
                    _drop_table(conn, left)
                conn.execute("DELETE FROM datasets WHERE name = ?", (name,))
                if audit is not None:
                    audit.record(
                        "dataset.removed",
                        {"name": name, "row_count": info.row_count},
                        actor=actor,
                    )
            truncated = purge(conn)
        destruction = Destruction(
            info, rows, digest, digest_of, suite.hash_name, shredded, truncated
        )
        if audit is not None:
            audit.record("dataset.destroyed", destruction.to_json(), actor=actor)
        return destruction

    def _digest_rows(
        self, conn: sqlite3.Connection, table: str, suite: Suite
    ) -> tuple[int, str, str]:
        """(rows, hex digest, what was hashed) of ``table`` (see :class:`Destruction`)."""
        hasher = suite.new_hasher()
        count = 0
        sealed = self._sealed(conn, table, need_key=False)
        if sealed is not None and self._at_rest is None:
            for (blob,) in conn.execute(f"SELECT sealed FROM {_quote(table)} ORDER BY chunk"):
                hasher.update(bytes(blob))
            found = conn.execute(f"SELECT COALESCE(SUM(rows), 0) FROM {_quote(table)}")
            return int(found.fetchone()[0]), hasher.digest().hex(), "sealed chunks"
        keyed = None if sealed is None else self._sealed(conn, table)
        if keyed is not None:
            every: Iterable[Sequence[Cell]] = self._sealed_rows(conn, table, keyed)
        elif conn.execute(f"PRAGMA table_info({_quote(table)})").fetchone() is None:
            every = ()  # a live dataset
        else:
            every = conn.execute(f"SELECT * FROM {_quote(table)} ORDER BY _row")
        for values in every:
            hasher.update(json.dumps(list(values), ensure_ascii=False).encode("utf-8") + b"\n")
            count += 1
        return count, hasher.digest().hex(), "rows"

    # ----------------------------------------------------------------- metadata

    def list(self) -> builtins.list[DatasetInfo]:
        """Every registered dataset, by name."""
        return [record.info for record in self.records()]

    def get(self, name: str) -> DatasetInfo:
        """Raises: NotFound for an unknown name."""
        return self.record(name).info

    def records(self) -> builtins.list[DatasetRecord]:
        """Every registered dataset with its formats, version and source, by name."""
        with self._open() as conn:
            rows = conn.execute("SELECT * FROM datasets ORDER BY name").fetchall()
        return [_record_from_row(row) for row in rows]

    def record(self, name: str) -> DatasetRecord:
        """Raises: NotFound for an unknown name."""
        with self._open() as conn:
            row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no dataset {name!r}")
        return _record_from_row(row)

    # ----------------------------------------------------------------- rows

    def _column(self, info: DatasetInfo, column: str) -> ColumnRule:
        rule = info.column(column)
        if rule is None:
            raise NotFound(f"dataset {info.name!r} has no column {column!r}")
        if rule.kind is ColumnKind.DENY:
            raise PolicyRefused(COLUMN_DENY, f"column {column!r} of {info.name!r} is 'deny'")
        return rule

    def _where(
        self, info: DatasetInfo, where: Sequence[Condition]
    ) -> tuple[str, builtins.list[Cell]]:
        clauses: builtins.list[str] = []
        params: builtins.list[Cell] = []
        for rule, op, value in self._conditions(info, where):
            if isinstance(value, tuple):
                clauses.append(f"{_quote(rule.name)} IN ({', '.join('?' for _ in value)})")
                params.extend(value)
            else:
                clauses.append(f"{_quote(rule.name)} {op} ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def _conditions(
        self, info: DatasetInfo, where: Sequence[Condition]
    ) -> builtins.list[tuple[ColumnRule, str, Cell | tuple[Cell, ...]]]:
        """Each condition checked, with its value typed as the column stores it."""
        checked: builtins.list[tuple[ColumnRule, str, Cell | tuple[Cell, ...]]] = []
        for condition in where:
            rule = self._column(info, condition.column)
            if condition.op not in OPERATORS:
                raise MalformedInput(
                    f"operator {condition.op!r} is not one of {', '.join(OPERATORS)}",
                    field="where",
                )
            raw = condition.value
            if condition.op == "in":
                if not isinstance(raw, tuple) or not 1 <= len(raw) <= MAX_IN_VALUES:
                    raise MalformedInput(
                        f"'in' takes a tuple of 1 to {MAX_IN_VALUES} values", field="where"
                    )
                checked.append((rule, "in", tuple(self._typed(rule, value) for value in raw)))
            else:
                if isinstance(raw, tuple):
                    raise MalformedInput(f"{condition.op!r} takes one value", field="where")
                checked.append((rule, condition.op, self._typed(rule, raw)))
        return checked

    def _sealed(
        self, conn: sqlite3.Connection, table: str, *, need_key: bool = True
    ) -> _SealedTable | None:
        """The column order and key of a sealed ``table`` (None: stored in the clear); the key
        is unwrapped unless ``need_key`` is false.

        Raises:
            WrongDataKey: sealed, and this catalogue has no data key, or another one.
        """
        if not _has_table(conn, "sealed_tables"):
            return None
        row = conn.execute(
            "SELECT columns, wrapped_key FROM sealed_tables WHERE table_name = ?", (table,)
        ).fetchone()
        if row is None:
            return None
        columns = tuple(json.loads(row["columns"]))
        if not need_key:
            return _SealedTable(columns, b"")
        if self._at_rest is None:
            raise WrongDataKey(
                f"the rows of {_dataset_of(table)!r} are sealed "
                "at rest: open the catalogue with the node's data key"
            )
        return _SealedTable(columns, self._at_rest.unwrap_table_key(table, row["wrapped_key"]))

    def _sealed_chunks(
        self, conn: sqlite3.Connection, table: str, sealed: _SealedTable, stop: Stop | None = None
    ) -> Iterator[SealedColumns]:
        """Each chunk of a sealed table as its columns: the import positions (``_row``), then
        each column's cells, in import order; ``stop`` is checked before each chunk."""
        if self._at_rest is None:  # pragma: no cover - _sealed refused already
            raise TypeError("no data key")
        try:
            cursor = conn.execute(f"SELECT chunk, sealed FROM {_quote(table)} ORDER BY chunk")
        except sqlite3.OperationalError as exc:
            if _interrupted(exc):
                raise  # stopped (see _stoppable), not removed
            raise NotFound("the dataset was removed while being read") from None
        for chunk, blob in cursor:
            _checked(stop, _dataset_of(table))
            yield self._at_rest.open_chunk(sealed.key, table, int(chunk), bytes(blob))

    def _sealed_rows(
        self, conn: sqlite3.Connection, table: str, sealed: _SealedTable
    ) -> Iterator[tuple[Cell, ...]]:
        """Every row of a sealed table, ``(_row, cell, ...)`` in import order."""
        for columns in self._sealed_chunks(conn, table, sealed):
            yield from zip(*columns, strict=True)

    def _matching_columns(
        self,
        conn: sqlite3.Connection,
        info: DatasetInfo,
        table: str,
        sealed: _SealedTable,
        where: Sequence[Condition],
        picked: Sequence[int],
        stop: Stop | None = None,
    ) -> Iterator[builtins.list[Iterable[Cell]]]:
        """Per chunk, the columns at ``picked`` (0: ``_row``) of the rows that pass ``where``,
        decrypted and filtered here a whole column at a time (only the columns read are
        decoded); ``stop`` is checked before each chunk."""
        position = {column: i + 1 for i, column in enumerate(sealed.columns)}
        tests = [
            (position[rule.name], _PY_OPERATORS[op], value)
            for rule, op, value in self._conditions(info, where)
        ]
        for columns in self._sealed_chunks(conn, table, sealed, stop):
            keep: builtins.list[bool] | None = None
            for at, test, value in tests:
                passed = [test(cell, value) for cell in columns[at]]
                keep = (
                    passed if keep is None else [a and b for a, b in zip(keep, passed, strict=True)]
                )
            if keep is None:
                yield [columns[i] for i in picked]
            else:
                yield [compress(columns[i], keep) for i in picked]

    @staticmethod
    def _typed(rule: ColumnRule, value: str | int) -> Cell:
        if isinstance(value, bool):
            raise MalformedInput("a filter value is a string or an integer", field="where")
        if rule.kind is ColumnKind.AGGREGATE:
            if isinstance(value, int):
                return value
            if _INTEGER.match(value.strip()):
                return int(value.strip())
            raise MalformedInput(f"column {rule.name!r} holds integers", field="where")
        text = str(value)
        if rule.kind is ColumnKind.JOIN_KEY:
            return key_types.normalise(rule.key_type or "", text)
        return text

    def _table(self, conn: sqlite3.Connection, name: str) -> tuple[DatasetInfo, str]:
        row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no dataset {name!r}")
        return _info_from_row(row), str(row["table_name"])

    def _live(self, conn: sqlite3.Connection, name: str) -> LiveDataset | None:
        """The reads of a live dataset (``None`` for rows imported here)."""
        row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        record = None if row is None else _record_from_row(row)
        if record is None or record.live is None:
            return None
        from govshare.node.data.live import LiveDataset  # it reads through this module

        return LiveDataset(record, record.live)

    def reading(
        self, name: str, *, query_id: str, audit: AuditSink, actor: str
    ) -> AbstractContextManager[None]:
        """The scope of one query's reads of dataset ``name`` on this node: for a live dataset,
        one snapshot of its source for every read, each read logged (``dataset.read``, see
        :mod:`govshare.node.data.live`); for rows imported here, nothing.

        Raises:
            Unavailable: the live source cannot be reached (the message names the dataset and
                the source).
        """
        try:
            record = self.record(name)
        except NotFound:
            record = None  # the query's own read says so
        if record is None or record.live is None:
            return nullcontext()
        from govshare.node.data.live import query_scope

        return query_scope(record, record.live, query_id=query_id, audit=audit, actor=actor)

    def keys(
        self,
        name: str,
        column: str,
        *,
        where: Sequence[Condition] = (),
        import_order: bool = False,
        stop: Stop | None = None,
    ) -> builtins.list[str]:
        """The distinct normalised keys of a ``join_key`` column in the filtered rows, sorted;
        with ``import_order``, each where it first appears in import order instead, as
        reproducible from the data and without the sort (seconds at a million keys). A live
        source's rows have no import order: its keys come sorted either way. ``stop``: see
        "Stopping a long read" above.

        Raises:
            NotFound: unknown dataset or column.
            MalformedInput: the column is not a join key, or a bad condition.
            PolicyRefused: a ``deny`` column is named (rule ``column.deny``).
            Aborted: ``stop`` returned true during the read (or its own error, if it raised).
        """
        with self._open() as conn:
            info, table = self._table(conn, name)
            rule = self._column(info, column)
            if rule.kind is not ColumnKind.JOIN_KEY:
                raise MalformedInput(f"column {column!r} of {name!r} is not a join key")
            clause, params = self._where(info, where)
            if (live := self._live(conn, name)) is not None:
                return live.keys(column, where, stop)
            if (sealed := self._sealed(conn, table)) is not None:
                at = sealed.columns.index(column) + 1
                cells: builtins.list[str] = []  # a join key's cells are its normalised text
                with _stoppable(conn, stop, name):
                    for (chunk,) in self._matching_columns(
                        conn, info, table, sealed, where, [at], stop
                    ):
                        cells.extend(map(str, chunk))
                # A set is a third of the cost of an ordered dict at a million keys; a join
                # key's values are mostly distinct, so the ordered pass is rarely needed.
                if len(set(cells)) != len(cells):
                    cells = builtins.list(dict.fromkeys(cells))  # each where it first appears
                return cells if import_order else sorted(cells)
            with _stoppable(conn, stop, name):
                if import_order:
                    cursor = conn.execute(
                        f"SELECT {_quote(column)} FROM {_quote(table)}{clause} ORDER BY _row",
                        params,
                    )
                    return [str(cell) for cell in dict.fromkeys(row[0] for row in cursor)]
                rows = conn.execute(
                    f"SELECT DISTINCT {_quote(column)} FROM {_quote(table)}{clause}"
                    f" ORDER BY {_quote(column)}",
                    params,
                ).fetchall()
        return [str(row[0]) for row in rows]

    def rows(
        self,
        name: str,
        columns: Sequence[str],
        *,
        where: Sequence[Condition] = (),
        stop: Stop | None = None,
    ) -> Generator[tuple[Cell, ...], None, None]:
        """Stream the stored values of ``columns`` for the filtered rows, in import order.

        Values are as stored (join keys normalised, aggregates as int, masked columns raw): the
        caller applies the policy decision's obligations before anything leaves the node.

        A reader that may stop before the end (a query that fails or ends midway) closes the
        stream when it stops (``with contextlib.closing(catalogue.rows(...)) as rows``): its
        connection, or a live source's snapshot, is released then, in the reader's thread.
        One left open is closed when it is collected, in whatever thread that happens, which
        its SQLite connection allows (:meth:`_open_stream`).

        ``stop`` is looked at while the stream reads, between the rows it yields too: a filter
        that passes few rows of a large table ends within its scan (see :meth:`keys`).

        Raises: as :meth:`keys` (``columns`` may be of any kind but ``deny``; ``stop`` too,
        while iterating).
        """
        if not columns:
            raise MalformedInput("name at least one column", field="columns")
        with self._open() as conn:
            info, table = self._table(conn, name)
            for column in columns:
                self._column(info, column)
            clause, params = self._where(info, where)
            live = self._live(conn, name)
            sealed = None if live is not None else self._sealed(conn, table)
        if live is not None:
            return live.rows(columns, where, stop)
        if sealed is not None:
            return self._stream_sealed(info, table, sealed, columns, where, stop)
        sql = (
            f"SELECT {', '.join(_quote(c) for c in columns)} FROM {_quote(table)}"
            f"{clause} ORDER BY _row"
        )
        return self._stream(name, sql, params, stop)

    def _stream_sealed(
        self,
        info: DatasetInfo,
        table: str,
        sealed: _SealedTable,
        columns: Sequence[str],
        where: Sequence[Condition],
        stop: Stop | None,
    ) -> Generator[tuple[Cell, ...], None, None]:
        picked = [sealed.columns.index(column) + 1 for column in columns]
        with self._open_stream() as conn, _stoppable(conn, stop, info.name):
            for chosen in self._matching_columns(conn, info, table, sealed, where, picked, stop):
                yield from zip(*chosen, strict=True)

    def _stream(
        self, name: str, sql: str, params: Sequence[Cell], stop: Stop | None
    ) -> Generator[tuple[Cell, ...], None, None]:
        with self._open_stream() as conn, _stoppable(conn, stop, name):
            try:
                cursor = conn.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if _interrupted(exc):
                    raise  # stopped (see _stoppable), not removed
                # Removed between the check and the read.
                raise NotFound("the dataset was removed while being read") from None
            for row in cursor:
                yield tuple(row)

    def row_ids(
        self, name: str, *, where: Sequence[Condition] = (), stop: Stop | None = None
    ) -> builtins.list[int]:
        """The import positions of the filtered rows (what an exact release's tracker keeps).

        Raises: as :meth:`keys` (``stop`` too).
        """
        with self._open() as conn:
            info, table = self._table(conn, name)
            clause, params = self._where(info, where)
            if (live := self._live(conn, name)) is not None:
                return live.row_ids(where, stop)
            sealed = self._sealed(conn, table)
            with _stoppable(conn, stop, name):
                if sealed is not None:
                    return [
                        int(row_id)
                        for (ids,) in self._matching_columns(
                            conn, info, table, sealed, where, [0], stop
                        )
                        for row_id in ids
                    ]
                rows = conn.execute(f"SELECT _row FROM {_quote(table)}{clause}", params).fetchall()
        return [int(row[0]) for row in rows]

    def count(self, name: str, *, where: Sequence[Condition] = (), stop: Stop | None = None) -> int:
        """The number of rows left after ``where`` (the filtered set size for the policy).

        Raises: as :meth:`keys` (``stop`` too).
        """
        with self._open() as conn:
            info, table = self._table(conn, name)
            clause, params = self._where(info, where)
            if (live := self._live(conn, name)) is not None:
                return live.count(where, stop)
            sealed = self._sealed(conn, table)
            with _stoppable(conn, stop, name):
                if sealed is not None:
                    if not where:  # the chunks' row counts, stored beside them
                        total = conn.execute(f"SELECT COALESCE(SUM(rows), 0) FROM {_quote(table)}")
                        return int(total.fetchone()[0])
                    return sum(
                        sum(1 for _ in ids)
                        for (ids,) in self._matching_columns(
                            conn, info, table, sealed, where, [0], stop
                        )
                    )
                row = conn.execute(
                    f"SELECT COUNT(*) FROM {_quote(table)}{clause}", params
                ).fetchone()
        return int(row[0])

    def group_sums(
        self,
        name: str,
        *,
        group_by: str | None,
        sums: Sequence[tuple[str, int]],
        where: Sequence[Condition] = (),
        stop: Stop | None = None,
    ) -> dict[str, tuple[int, ...]]:
        """Per group label: (row count, each SUM column clipped to ``[0, bound]`` and summed).

        Runs as one ``GROUP BY`` in SQLite (the horizontal aggregate's local step). Without
        ``group_by`` the single group is ``""``.

        Raises: as :meth:`keys` (``stop`` too).
        """
        with self._open() as conn:
            info, table = self._table(conn, name)
            columns = [c for c, _ in sums] + ([group_by] if group_by else [])
            for column in columns:
                self._column(info, column)
            clause, params = self._where(info, where)
            if (live := self._live(conn, name)) is not None:
                return live.group_sums(group_by, sums, where, stop)
            sealed = self._sealed(conn, table)
            with _stoppable(conn, stop, name):
                if sealed is not None:
                    return self._group_sums_sealed(
                        conn, info, table, sealed, group_by, sums, where, stop
                    )
                figures = ["COUNT(*)"] + [
                    f"SUM(MIN(MAX({_quote(c)}, 0), {int(bound)}))" for c, bound in sums
                ]
                label = _quote(group_by) if group_by else "''"
                rows = conn.execute(
                    f"SELECT {label}, {', '.join(figures)} FROM {_quote(table)}{clause} GROUP BY 1",
                    params,
                ).fetchall()
        return {str(row[0]): tuple(int(v or 0) for v in row[1:]) for row in rows}

    def _group_sums_sealed(
        self,
        conn: sqlite3.Connection,
        info: DatasetInfo,
        table: str,
        sealed: _SealedTable,
        group_by: str | None,
        sums: Sequence[tuple[str, int]],
        where: Sequence[Condition],
        stop: Stop | None,
    ) -> dict[str, tuple[int, ...]]:
        """:meth:`group_sums` over decrypted rows: what the SQL computes, in Python."""
        # Each SUM column, then the GROUP BY column; _row only to count rows without either.
        picked = [sealed.columns.index(c) + 1 for c, _ in sums]
        if group_by is not None:
            picked.append(sealed.columns.index(group_by) + 1)
        bounds = [int(bound) for _, bound in sums]
        groups: dict[str, builtins.list[int]] = {}
        for chosen in self._matching_columns(conn, info, table, sealed, where, picked or [0], stop):
            cells = [c if isinstance(c, builtins.list) else builtins.list(c) for c in chosen]
            count = len(cells[0])
            if not count:
                continue
            clipped = [
                # Aggregate cells are stored, and decoded, as int.
                _clip(cast("builtins.list[int]", column), bound)
                for column, bound in zip(cells, bounds, strict=False)
            ]
            if group_by is None:
                totals = groups.setdefault("", [0] * (1 + len(bounds)))
                totals[0] += count
                for slot, values in enumerate(clipped, start=1):
                    totals[slot] += sum(values)
                continue
            labels = cells[-1]  # group_key cells: text
            for group, rows in Counter(labels).items():
                groups.setdefault(str(group), [0] * (1 + len(bounds)))[0] += rows
            for slot, values in enumerate(clipped, start=1):
                sums_by_group: dict[Cell, int] = {}
                for group, value in zip(labels, values, strict=True):
                    sums_by_group[group] = sums_by_group.get(group, 0) + value
                for group, total in sums_by_group.items():
                    groups[str(group)][slot] += total
        return {group: tuple(totals) for group, totals in groups.items()}
