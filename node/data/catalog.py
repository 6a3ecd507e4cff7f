"""The dataset catalogue: registrations and rows, in the node's SQLite file.

A dataset is registered from a CSV file with its governance metadata (DESIGN.md, "Datasets and
governance metadata"): grade, sharing type (with its legal basis for ``none``), owner and holder,
and a rule for every column. Registration and import are one SQLite transaction: the
``datasets`` row, the dataset's own table ``ds_<name>`` with every row, its indexes, and the
``dataset.added`` audit entry either all land or none does.

Import validation, per row (1-based, the header not counted; the file line is given too):

- the row has as many cells as the header;
- a ``join_key`` cell passes its key type's normaliser (:mod:`govshare.node.data.keys`) and is
  stored normalised; an empty key is refused;
- a ``group_key`` cell is one of the column's declared domain labels;
- an ``aggregate`` cell is an integer (ASCII digits with an optional sign, |v| < 2^63);
  an empty cell is refused, so sums and counts are over the same rows.

A bad row refuses the whole file with its row number and reason (:class:`MalformedInput`),
unless ``skip_invalid`` is set: then the good rows are imported and the :class:`ImportReport`
says how many were rejected and why (the first :data:`REASONS_KEPT`). Reasons never quote a
cell's value: it may be personal data, and reasons end up in logs and terminals.

Cells are stripped of surrounding blanks. Dataset and column names match
:data:`NAME_PATTERN` (lower-case SQL-safe identifiers), and are quoted anyway; every value goes
through parameter binding.

Reads for the query path (:meth:`Catalogue.keys`, :meth:`Catalogue.rows`,
:meth:`Catalogue.count`) return stored values as they are — normalised keys, raw masked
values — after the policy decision; applying a decision's obligations (masks, k, DP) is the
caller's job. They refuse ``deny`` columns outright, whatever the caller decided.
"""

from __future__ import annotations

import builtins
import csv
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

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
from govshare.node.data.masking import parse_mask
from govshare.node.policy.decision import (
    COLUMN_DENY,
    GRADE_MIN_GROUP_SIZE,
    IMPORTANT_MIN_GROUP_SIZE,
)
from govshare.node.stores.sqlite import immediate, opened
from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound, PolicyRefused

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
# Rows per executemany batch: bounded memory for million-row files.
BATCH_ROWS = 10_000
# Aggregate cells are signed 64-bit integers, SQLite's INTEGER.
MAX_ABS_AGGREGATE = 2**63 - 1
# Values an ``in`` condition may list.
MAX_IN_VALUES = 1000

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
    source_sha256         TEXT NOT NULL
);
"""


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class RejectedRow:
    row: int  # 1-based, the header not counted
    reason: str


@dataclass(frozen=True)
class ImportReport:
    dataset: str
    imported: int
    rejected: int
    first_rejections: tuple[RejectedRow, ...]
    source_sha256: str


Cell = str | int


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


def _cell_converter(rule: ColumnRule) -> Callable[[str], Cell]:
    if rule.kind is ColumnKind.JOIN_KEY:
        normalise = key_types.normaliser(rule.key_type or "")

        def join_key(cell: str) -> Cell:
            if not cell:
                raise MalformedInput("empty join key")
            return normalise(cell)

        return join_key
    if rule.kind is ColumnKind.GROUP_KEY:
        labels = frozenset(rule.domain)
        shown = ", ".join(rule.domain[:10]) + (", ..." if len(rule.domain) > 10 else "")

        def group_key(cell: str) -> Cell:
            if cell not in labels:
                raise MalformedInput(f"value outside the declared domain ({shown})")
            return cell

        return group_key
    if rule.kind is ColumnKind.AGGREGATE:

        def aggregate(cell: str) -> Cell:
            if not _INTEGER.match(cell):
                raise MalformedInput("not an integer")
            value = int(cell)
            if abs(value) > MAX_ABS_AGGREGATE:
                raise MalformedInput("integer out of the signed 64-bit range")
            return value

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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Catalogue:
    """The datasets of one node, in its SQLite database (``NodeConfig.database_path``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._open() as conn:
            conn.executescript(_SCHEMA)

    def _open(self) -> AbstractContextManager[sqlite3.Connection]:
        return opened(self.path)

    # ----------------------------------------------------------------- registration

    def add(
        self,
        csv_path: Path,
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
        now: int | None = None,
    ) -> ImportReport:
        """Register a dataset and import its CSV rows in one transaction.

        Raises:
            AlreadyExists: a dataset of that name is registered.
            MalformedInput: a bad registration (see :func:`validate_columns`; ``none`` without
                legal basis; k below the grade floor), a header that does not match the column
                rules, a bad row (without ``skip_invalid``; the message starts ``row N``), a
                file that is not UTF-8 CSV, or no valid row at all.
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
        try:
            source_sha256 = _sha256_file(csv_path)
        except FileNotFoundError:
            raise NotFound(f"no file {csv_path}") from None
        table = TABLE_PREFIX + info.name
        with self._open() as conn:
            with immediate(conn):
                if conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
                    raise AlreadyExists(f"dataset {name!r} is already registered")
                imported, rejected, reasons = self._import_rows(
                    conn, csv_path, info, table, skip_invalid=skip_invalid
                )
                if imported == 0:
                    raise MalformedInput(f"{csv_path}: no valid row to import")
                info = replace(info, row_count=imported)
                conn.execute(
                    "INSERT INTO datasets (name, table_name, grade, sharing_type, legal_basis,"
                    " owner_kind, owner_name, holder, columns, row_count, description,"
                    " created_at, min_set_size, allowed_jurisdictions, min_group_size,"
                    " require_dp, require_approval, source_sha256)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        info.name,
                        table,
                        info.grade.value,
                        info.sharing_type.value,
                        info.legal_basis,
                        info.owner.kind.value,
                        info.owner.name,
                        info.owner.holder,
                        json.dumps([_rule_to_json(r) for r in info.columns], ensure_ascii=False),
                        info.row_count,
                        info.description,
                        info.created_at,
                        info.min_set_size,
                        json.dumps(list(info.allowed_jurisdictions)),
                        info.min_group_size,
                        int(info.require_dp),
                        int(info.require_approval),
                        source_sha256,
                    ),
                )
                if audit is not None:
                    fields = dataset_to_json(info)
                    fields.update(rejected_rows=rejected, source_sha256=source_sha256)
                    audit.record("dataset.added", fields, actor=actor)
        return ImportReport(
            dataset=info.name,
            imported=imported,
            rejected=rejected,
            first_rejections=tuple(reasons),
            source_sha256=source_sha256,
        )

    @staticmethod
    def _import_rows(
        conn: sqlite3.Connection,
        csv_path: Path,
        info: DatasetInfo,
        table: str,
        *,
        skip_invalid: bool,
    ) -> tuple[int, int, builtins.list[RejectedRow]]:
        rules = {rule.name: rule for rule in info.columns}
        try:
            handle = csv_path.open(encoding="utf-8-sig", newline="")
        except FileNotFoundError:
            raise NotFound(f"no file {csv_path}") from None
        imported = rejected = 0
        reasons: builtins.list[RejectedRow] = []
        row_number = 0
        with handle:
            reader = csv.reader(handle, strict=True)
            try:
                header = [cell.strip() for cell in next(reader)]
            except StopIteration:
                raise MalformedInput(f"{csv_path}: empty file, no header row") from None
            except (csv.Error, UnicodeDecodeError) as exc:
                raise MalformedInput(f"{csv_path}: unreadable header: {exc}") from None
            if len(set(header)) != len(header):
                raise MalformedInput(f"{csv_path}: the header repeats a column name")
            unknown = [column for column in header if column not in rules]
            if unknown:
                raise MalformedInput(
                    f"{csv_path}: column(s) {', '.join(map(repr, unknown))} have no rule; "
                    "give every column a rule (deny to keep it out of every query)",
                    field="columns",
                )
            missing = [column for column in rules if column not in header]
            if missing:
                raise MalformedInput(
                    f"rules name column(s) {', '.join(map(repr, missing))} that "
                    f"{csv_path} does not have",
                    field="columns",
                )
            converters = [_cell_converter(rules[column]) for column in header]
            ordered = [rules[column] for column in header]
            column_sql = ", ".join(
                f"{_quote(rule.name)} "
                + ("INTEGER" if rule.kind is ColumnKind.AGGREGATE else "TEXT")
                + " NOT NULL"
                for rule in ordered
            )
            conn.execute(
                f"CREATE TABLE {_quote(table)} (_row INTEGER PRIMARY KEY, {column_sql}) STRICT"
            )
            insert = (
                f"INSERT INTO {_quote(table)} (_row, {', '.join(_quote(c) for c in header)})"
                f" VALUES (?, {', '.join('?' for _ in header)})"
            )
            batch: builtins.list[tuple[Cell, ...]] = []
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except (csv.Error, UnicodeDecodeError) as exc:
                    raise MalformedInput(
                        f"row {row_number + 1} (line {reader.line_num}): unreadable CSV: {exc}"
                    ) from None
                row_number += 1
                if not record:
                    continue  # a blank line
                try:
                    if len(record) != len(header):
                        raise MalformedInput(
                            f"has {len(record)} cells, the header has {len(header)}"
                        )
                    values: builtins.list[Cell] = [row_number]
                    for rule, convert, cell in zip(ordered, converters, record, strict=True):
                        try:
                            values.append(convert(cell.strip()))
                        except MalformedInput as exc:
                            raise MalformedInput(f"column {rule.name}: {exc}") from None
                except MalformedInput as exc:
                    reason = f"row {row_number} (line {reader.line_num}): {exc}"
                    if not skip_invalid:
                        raise MalformedInput(reason, field=f"row {row_number}") from None
                    rejected += 1
                    if len(reasons) < REASONS_KEPT:
                        reasons.append(RejectedRow(row_number, reason))
                    continue
                batch.append(tuple(values))
                imported += 1
                if len(batch) >= BATCH_ROWS:
                    conn.executemany(insert, batch)
                    batch.clear()
            if batch:
                conn.executemany(insert, batch)
        for rule in ordered:
            if rule.kind in (ColumnKind.JOIN_KEY, ColumnKind.GROUP_KEY):
                conn.execute(
                    f"CREATE INDEX {_quote(f'{table}__{rule.name}')}"
                    f" ON {_quote(table)} ({_quote(rule.name)})"
                )
        return imported, rejected, reasons

    def remove(self, name: str, *, actor: str, audit: AuditSink | None) -> DatasetInfo:
        """Drop a dataset's rows and registration, and record ``dataset.removed``.

        Grants on it stay in the grant table; the policy refuses any grant issued before a
        later registration under the same name (``grant.predates_dataset``).

        Raises:
            NotFound: no such dataset.
        """
        validate_identifier(name, "dataset")
        with self._open() as conn:
            with immediate(conn):
                row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise NotFound(f"no dataset {name!r}")
                info = _info_from_row(row)
                conn.execute(f"DROP TABLE {_quote(row['table_name'])}")
                conn.execute("DELETE FROM datasets WHERE name = ?", (name,))
                if audit is not None:
                    audit.record(
                        "dataset.removed",
                        {"name": name, "row_count": info.row_count},
                        actor=actor,
                    )
        return info

    # ----------------------------------------------------------------- metadata

    def list(self) -> builtins.list[DatasetInfo]:
        """Every registered dataset, by name."""
        with self._open() as conn:
            rows = conn.execute("SELECT * FROM datasets ORDER BY name").fetchall()
        return [_info_from_row(row) for row in rows]

    def get(self, name: str) -> DatasetInfo:
        """Raises: NotFound for an unknown name."""
        with self._open() as conn:
            row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no dataset {name!r}")
        return _info_from_row(row)

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
                values = [self._typed(rule, value) for value in raw]
                clauses.append(f"{_quote(rule.name)} IN ({', '.join('?' for _ in values)})")
                params.extend(values)
            else:
                if isinstance(raw, tuple):
                    raise MalformedInput(f"{condition.op!r} takes one value", field="where")
                clauses.append(f"{_quote(rule.name)} {condition.op} ?")
                params.append(self._typed(rule, raw))
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

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

    def keys(
        self, name: str, column: str, *, where: Sequence[Condition] = ()
    ) -> builtins.list[str]:
        """The distinct normalised keys of a ``join_key`` column in the filtered rows, sorted.

        Raises:
            NotFound: unknown dataset or column.
            MalformedInput: the column is not a join key, or a bad condition.
            PolicyRefused: a ``deny`` column is named (rule ``column.deny``).
        """
        with self._open() as conn:
            info, table = self._table(conn, name)
            rule = self._column(info, column)
            if rule.kind is not ColumnKind.JOIN_KEY:
                raise MalformedInput(f"column {column!r} of {name!r} is not a join key")
            clause, params = self._where(info, where)
            rows = conn.execute(
                f"SELECT DISTINCT {_quote(column)} FROM {_quote(table)}{clause}"
                f" ORDER BY {_quote(column)}",
                params,
            ).fetchall()
        return [str(row[0]) for row in rows]

    def rows(
        self, name: str, columns: Sequence[str], *, where: Sequence[Condition] = ()
    ) -> Iterator[tuple[Cell, ...]]:
        """Stream the stored values of ``columns`` for the filtered rows, in import order.

        Values are as stored (join keys normalised, aggregates as int, masked columns raw): the
        caller applies the policy decision's obligations before anything leaves the node.

        Raises: as :meth:`keys` (``columns`` may be of any kind but ``deny``).
        """
        if not columns:
            raise MalformedInput("name at least one column", field="columns")
        with self._open() as conn:
            info, table = self._table(conn, name)
            for column in columns:
                self._column(info, column)
            clause, params = self._where(info, where)
        sql = (
            f"SELECT {', '.join(_quote(c) for c in columns)} FROM {_quote(table)}"
            f"{clause} ORDER BY _row"
        )
        return self._stream(sql, params)

    def _stream(self, sql: str, params: Sequence[Cell]) -> Iterator[tuple[Cell, ...]]:
        with self._open() as conn:
            try:
                cursor = conn.execute(sql, params)
            except sqlite3.OperationalError:
                # Removed between the check and the read.
                raise NotFound("the dataset was removed while being read") from None
            for row in cursor:
                yield tuple(row)

    def row_ids(self, name: str, *, where: Sequence[Condition] = ()) -> builtins.list[int]:
        """The import positions of the filtered rows (what an exact release's tracker keeps)."""
        with self._open() as conn:
            info, table = self._table(conn, name)
            clause, params = self._where(info, where)
            rows = conn.execute(f"SELECT _row FROM {_quote(table)}{clause}", params).fetchall()
        return [int(row[0]) for row in rows]

    def count(self, name: str, *, where: Sequence[Condition] = ()) -> int:
        """The number of rows left after ``where`` (the filtered set size for the policy)."""
        with self._open() as conn:
            info, table = self._table(conn, name)
            clause, params = self._where(info, where)
            row = conn.execute(f"SELECT COUNT(*) FROM {_quote(table)}{clause}", params).fetchone()
        return int(row[0])

    def group_sums(
        self,
        name: str,
        *,
        group_by: str | None,
        sums: Sequence[tuple[str, int]],
        where: Sequence[Condition] = (),
    ) -> dict[str, tuple[int, ...]]:
        """Per group label: (row count, each SUM column clipped to ``[0, bound]`` and summed).

        Runs as one ``GROUP BY`` in SQLite (the horizontal aggregate's local step). Without
        ``group_by`` the single group is ``""``.

        Raises: as :meth:`keys`.
        """
        with self._open() as conn:
            info, table = self._table(conn, name)
            columns = [c for c, _ in sums] + ([group_by] if group_by else [])
            for column in columns:
                self._column(info, column)
            clause, params = self._where(info, where)
            figures = ["COUNT(*)"] + [
                f"SUM(MIN(MAX({_quote(c)}, 0), {int(bound)}))" for c, bound in sums
            ]
            label = _quote(group_by) if group_by else "''"
            rows = conn.execute(
                f"SELECT {label}, {', '.join(figures)} FROM {_quote(table)}{clause} GROUP BY 1",
                params,
            ).fetchall()
        return {str(row[0]): tuple(int(v or 0) for v in row[1:]) for row in rows}
