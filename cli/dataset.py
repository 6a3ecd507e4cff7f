"""``govshare dataset``: the department operator registers and manages the node's datasets.

Column rules are given one ``--column`` each, as ``NAME=KIND[:ARGS]``:

- ``id_number=join_key:resident_id`` (a key type), optionally ``...:mask=keep_last:4`` for
  record-level release of matches;
- ``district=group_key:domain=east|west|north`` (the declared labels, ``|``-separated);
- ``name=masked:keep_last:1`` (the masking rule);
- ``amount=aggregate``, ``year=plaintext``, ``notes=deny``.

Any rule may end with its import format: ``:scale=N`` (an aggregate's decimal places, stored as
integers in units of ``10**-N``: ``total_cost_yuan=aggregate:scale=2`` stores fen) and
``:null=POLICY`` (what a blank cell means: ``refuse``, ``skip-row``, ``zero`` for aggregates,
``keep`` for masked, plaintext and deny columns, whose default it is; ``refuse`` is the others').

The file is read as ``--encoding`` names (default: UTF-8, else GBK or GB18030 detected, and the
output says which), split on ``--delimiter``, its headers renamed by ``--map HEADER=NAME``
(the rules name the mapped columns). ``--check`` reports what an import would do and writes
nothing. ``dataset replace`` refreshes a dataset's rows as a new version and keeps its
registration, and so its grants.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from govshare.cli.common import console, emit_json, home_option, json_option, render_table
from govshare.cli.operator_identity import operator_for, operator_option
from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    Grade,
    OwnerKind,
    SharingType,
)
from govshare.protocols.errors import MalformedInput

# For annotations only: the façade is imported where it is called (see cli/main.py).
if TYPE_CHECKING:
    from govshare.node.operator import (
        ColumnFormat,
        DatasetRecord,
        ImportReport,
        LiveSource,
        ProgressCallback,
        SourceFormat,
    )

F = TypeVar("F", bound=Callable[..., Any])

COLUMN_HELP = (
    "NAME=KIND[:ARGS][:scale=N][:null=POLICY], once per CSV column (after --map): "
    "join_key:KEY_TYPE[:mask=RULE], group_key:domain=A|B|C, masked:RULE, aggregate, "
    "plaintext, deny. POLICY: refuse, skip-row, zero (aggregate), keep (masked, plaintext, deny)."
)
# --delimiter values: the character, or a name for the one a shell makes awkward to type.
DELIMITER_NAMES = {",": ",", ";": ";", "|": "|", "\\t": "\t", "\t": "\t", "tab": "\t"}
# Files at least this large get a progress bar (on a terminal): below it the import is quick.
PROGRESS_MIN_BYTES = 8 << 20

_FORMAT_SUFFIX = re.compile(r":(scale|null)=([^:]*)$")


def parse_column_spec(spec: str) -> tuple[ColumnRule, ColumnFormat]:
    """Parse one ``--column`` value, import format included (see the module docstring).

    Raises:
        MalformedInput: the spec does not have the form ``NAME=KIND[:ARGS]`` for its kind, or a
            bad or repeated ``scale=``/``null=``.
    """
    from govshare.node.operator import ColumnFormat, NullPolicy

    body, found = spec, {}
    while match := _FORMAT_SUFFIX.search(body):
        key, value = match.group(1), match.group(2)
        if key in found:
            raise MalformedInput(f"--column {spec!r}: {key}= is given twice", field="column")
        found[key] = value
        body = body[: match.start()]
    scale_text, null_text = found.get("scale", "0"), found.get("null")
    if not scale_text.isascii() or not scale_text.isdigit():
        raise MalformedInput(f"--column {spec!r}: scale= takes a whole number", field="column")
    try:
        null = None if null_text is None else NullPolicy(null_text)
    except ValueError:
        known = ", ".join(p.value for p in NullPolicy)
        raise MalformedInput(
            f"--column {spec!r}: unknown NULL policy {null_text!r}; known: {known}",
            field="column",
        ) from None
    return _parse_rule(spec, body), ColumnFormat(int(scale_text), null)


def parse_column(spec: str) -> ColumnRule:
    """The column rule of a ``--column`` value (its import format, if any, left out).

    Raises: as :func:`parse_column_spec`.
    """
    return parse_column_spec(spec)[0]


def parse_map(value: str) -> tuple[str, str]:
    """Parse one ``--map HEADER=NAME`` (the header may hold any character but a final ``=``).

    Raises:
        MalformedInput: no ``=``, or an empty side.
    """
    header, sep, name = value.rpartition("=")
    if not sep or not header.strip() or not name.strip():
        raise MalformedInput(f"--map {value!r}: expected HEADER=NAME", field="map")
    return header.strip(), name.strip()


def parse_delimiter(value: str) -> str:
    """Raises: MalformedInput for a delimiter not in :data:`DELIMITER_NAMES`."""
    try:
        return DELIMITER_NAMES[value]
    except KeyError:
        shown = ", ".join(repr(k) for k in DELIMITER_NAMES if k != "\t")
        raise MalformedInput(
            f"--delimiter {value!r} is not one of {shown}", field="delimiter"
        ) from None


def _parse_rule(spec: str, body: str) -> ColumnRule:
    name, sep, rest = body.partition("=")
    if not sep or not name.strip():
        raise MalformedInput(f"--column {spec!r}: expected NAME=KIND[:ARGS]", field="column")
    name = name.strip()
    kind_text, _, args = rest.partition(":")
    try:
        kind = ColumnKind(kind_text.strip())
    except ValueError:
        known = ", ".join(k.value for k in ColumnKind)
        raise MalformedInput(
            f"--column {spec!r}: unknown kind {kind_text!r}; known: {known}", field="column"
        ) from None
    if kind is ColumnKind.JOIN_KEY:
        key_type, _, extra = args.partition(":")
        mask = None
        if extra:
            if not extra.startswith("mask="):
                raise MalformedInput(
                    f"--column {spec!r}: after the key type only mask=RULE may follow",
                    field="column",
                )
            mask = extra.removeprefix("mask=")
        return ColumnRule(name, kind, key_type=key_type or None, mask=mask)
    if kind is ColumnKind.GROUP_KEY:
        if not args.startswith("domain="):
            raise MalformedInput(
                f"--column {spec!r}: a group_key needs domain=A|B|C", field="column"
            )
        labels = tuple(label for label in args.removeprefix("domain=").split("|"))
        return ColumnRule(name, kind, domain=labels)
    if kind is ColumnKind.MASKED:
        return ColumnRule(name, kind, mask=args or None)
    if args:
        raise MalformedInput(f"--column {spec!r}: {kind.value} takes no arguments", field="column")
    return ColumnRule(name, kind)


def _when(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _rule_detail(rule: ColumnRule, fmt: ColumnFormat | None = None) -> str:
    parts: list[str] = []
    if rule.key_type:
        parts.append(f"key type {rule.key_type}")
    if rule.domain:
        parts.append("domain " + "|".join(rule.domain))
    if rule.mask:
        parts.append(f"mask {rule.mask}")
    if fmt is not None and fmt.scale:
        parts.append(f"scale {fmt.scale} (stored in units of 10^-{fmt.scale})")
    if fmt is not None and fmt.null is not None:
        parts.append(f"blank: {fmt.null.value}")
    return "; ".join(parts)


def _report_json(report: ImportReport) -> dict[str, object]:
    return {
        "dataset": report.dataset,
        "imported": report.imported,
        "rejected": report.rejected,
        "skipped": report.skipped,
        "blank_cells": dict(report.blank_cells),
        "first_rejections": [{"row": r.row, "reason": r.reason} for r in report.first_rejections],
        "source_sha256": report.source_sha256,
        "encoding": report.encoding,
        "check": report.dry_run,
        "would_import": report.would_import,
        "version": report.version,
        "previous_row_count": report.previous_row_count,
    }


def _print_report(
    report: ImportReport, source: SourceFormat, done: str, live: LiveSource | None = None
) -> None:
    """``done``: what a real import did (``registered``, ``replaced``); ``live``: the live
    source a registration read (nothing was imported: rows are read at each query)."""
    counts = f"{report.imported} rows imported, {report.rejected} rejected"
    if report.skipped:
        counts += f", {report.skipped} skipped"
    if report.dry_run:
        console.print(
            f"check of dataset [bold]{report.dataset}[/] (nothing written): "
            + counts.replace("imported", "to import"),
            soft_wrap=True,
        )
    else:
        console.print(f"dataset [bold]{report.dataset}[/] {done}: {counts}", soft_wrap=True)
    how = "named" if source.encoding else "detected"
    if live is not None:
        console.print(
            f"  read live from {live.describe()} at each query; nothing copied (rows read now: "
            f"sha256 {report.source_sha256})", markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    else:
        console.print(f"  encoding {report.encoding} ({how})", highlight=False, soft_wrap=True)
    if report.previous_row_count is not None:
        console.print(
            f"  version {report.version}, replacing {report.previous_row_count} rows",
            highlight=False,
            soft_wrap=True,
        )
    if report.blank_cells:
        blanks = ", ".join(f"{column} {n}" for column, n in report.blank_cells)
        console.print(
            f"  blank cells taken by their NULL policy: {blanks}", highlight=False, soft_wrap=True
        )
    for rejection in report.first_rejections:
        console.print(
            f"  rejected {rejection.reason}", markup=False, highlight=False, soft_wrap=True
        )
    if report.rejected > len(report.first_rejections):
        console.print(
            f"  ... and {report.rejected - len(report.first_rejections)} more", soft_wrap=True
        )
    if report.dry_run and not report.would_import:
        console.print(
            "  the import would be refused: "
            + (
                f"{report.rejected} bad row(s) (--skip-invalid imports the others)"
                if report.imported
                else "no valid row"
            ),
            highlight=False,
            soft_wrap=True,
        )


@contextmanager
def _progress(csv_file: Path) -> Iterator[ProgressCallback | None]:
    """A progress bar for a large file, on a terminal only (never in pipes, logs or tests)."""
    try:
        size = csv_file.stat().st_size
    except OSError:
        size = 0
    if not console.is_terminal or size < PROGRESS_MIN_BYTES:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def advance(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        yield advance


def _source(encoding: str | None, delimiter: str | None, maps: tuple[str, ...]) -> SourceFormat:
    from govshare.node.operator import SourceFormat

    return SourceFormat(
        encoding=encoding,
        delimiter=parse_delimiter(delimiter or ","),
        header_map=tuple(parse_map(m) for m in maps),
    )


def _columns(specs: tuple[str, ...]) -> tuple[list[ColumnRule], dict[str, ColumnFormat]]:
    parsed = [parse_column_spec(spec) for spec in specs]
    return [rule for rule, _ in parsed], {rule.name: fmt for rule, fmt in parsed}


def source_options(func: F) -> F:
    """The options saying how to read the file, and ``--skip-invalid`` and ``--check``."""
    for option in reversed(
        (
            click.option(
                "--encoding",
                default=None,
                help="The file's encoding: utf-8, gbk, gb18030, gb2312, big5 [default: UTF-8, "
                "else GBK or GB18030 detected].",
            ),
            click.option(
                "--delimiter",
                default=None,
                help="The cell separator: ',' (default), ';', '|', or '\\t' (or 'tab').",
            ),
            click.option(
                "--map",
                "maps",
                multiple=True,
                metavar="HEADER=NAME",
                help="Rename a header of the file to a column name (repeatable); the column "
                "rules name the mapped columns.",
            ),
            click.option("--skip-invalid", is_flag=True, help="Import the valid rows only."),
            click.option(
                "--check",
                is_flag=True,
                help="Report what the import would do (rows, refusals, encoding); write and "
                "log nothing.",
            ),
        )
    ):
        func = option(func)
    return func


@click.group("dataset")
def group() -> None:
    """Register, refresh, list, show and remove the node's datasets (operator)."""


@group.command("add")
@home_option
@click.argument("csv_file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option(
    "--source",
    "source_location",
    default=None,
    metavar="LOCATION",
    help="Instead of CSV_FILE, a live PostgreSQL database: postgresql://user@host:port/dbname "
    "or a libpq string (service=NAME); never a password (PGPASSWORD, ~/.pgpass or a service "
    "file in the node's environment). Rows are read at each query, never copied.",
)
@click.option("--table", default=None, help="With --source: the table or view, schema.name.")
@click.option("--name", required=True, help="Dataset name: a lower-case identifier.")
@click.option("--grade", type=click.Choice([g.value for g in Grade]), required=True)
@click.option("--sharing", type=click.Choice([s.value for s in SharingType]), required=True)
@click.option("--legal-basis", default="", help="Required with --sharing none.")
@click.option("--owner-kind", type=click.Choice([k.value for k in OwnerKind]), required=True)
@click.option("--owner", required=True, help="Who owns the data.")
@click.option("--holder", default=None, help="Holding department [default: this node].")
@click.option("--column", "columns", multiple=True, required=True, help=COLUMN_HELP)
@click.option("--description", default="")
@click.option(
    "--jurisdiction",
    "jurisdictions",
    multiple=True,
    help="Jurisdiction whose members may receive results (repeatable).",
)
@click.option("--min-group-size", type=int, default=0, help="Raise k above the grade floor.")
@click.option("--min-set-size", type=int, default=0, help="Smallest filtered set for a PSI.")
@click.option("--require-dp", is_flag=True, help="DP noise on every query.")
@click.option("--require-approval", is_flag=True, help="Operator approval of every query.")
@source_options
@operator_option
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    home: Path,
    operator_identity: str | None,
    csv_file: Path | None,
    source_location: str | None,
    table: str | None,
    name: str,
    grade: str,
    sharing: str,
    legal_basis: str,
    owner_kind: str,
    owner: str,
    holder: str | None,
    columns: tuple[str, ...],
    description: str,
    jurisdictions: tuple[str, ...],
    min_group_size: int,
    min_set_size: int,
    require_dp: bool,
    require_approval: bool,
    encoding: str | None,
    delimiter: str | None,
    maps: tuple[str, ...],
    skip_invalid: bool,
    check: bool,
    as_json: bool,
) -> None:
    """Register CSV_FILE as a dataset; the whole file is imported or none of it.

    Or register a live table or view (--source, --table): its columns checked against the
    rules (--map COLUMN=NAME renames), every row read once as an import would read it, nothing
    copied; each query then reads it in a snapshot of its own.
    """
    from govshare.node.operator import parse_source

    live: LiveSource | None = None
    if csv_file is None and source_location is not None and table is not None:
        live = parse_source(source_location, table)
        origin: Path | LiveSource = live
    elif csv_file is not None and source_location is None and table is None:
        origin = csv_file
    else:
        raise click.UsageError("give CSV_FILE, or --source LOCATION with --table SCHEMA.NAME")
    operator = operator_for(home, operator_identity)
    rules, formats = _columns(columns)
    source = _source(encoding, delimiter, maps)
    with _progress(csv_file) if csv_file is not None else nullcontext(None) as progress:
        report = operator.add_dataset(
            origin,
            name=name,
            grade=Grade(grade),
            sharing_type=SharingType(sharing),
            legal_basis=legal_basis,
            owner_kind=OwnerKind(owner_kind),
            owner=owner,
            holder=holder,
            columns=rules,
            description=description,
            skip_invalid=skip_invalid,
            allowed_jurisdictions=jurisdictions,
            min_group_size=min_group_size,
            min_set_size=min_set_size,
            require_dp=require_dp,
            require_approval=require_approval,
            formats=formats,
            source=source,
            check=check,
            progress=progress,
        )
    if as_json:
        emit_json(_report_json(report))
    else:
        _print_report(report, source, "registered", live)
    if not report.would_import:
        ctx.exit(1)


@group.command("replace")
@home_option
@click.argument("name")
@click.argument("csv_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--column", "columns", multiple=True, help="Restated rules; must equal the stored.")
@click.option("--grade", type=click.Choice([g.value for g in Grade]), default=None)
@click.option("--sharing", type=click.Choice([s.value for s in SharingType]), default=None)
@click.option("--legal-basis", default=None)
@click.option("--owner-kind", type=click.Choice([k.value for k in OwnerKind]), default=None)
@click.option("--owner", default=None)
@click.option("--holder", default=None)
@click.option("--description", default=None)
@click.option("--jurisdiction", "jurisdictions", multiple=True)
@click.option("--min-group-size", type=int, default=None)
@click.option("--min-set-size", type=int, default=None)
@click.option("--require-dp", is_flag=True, default=None)
@click.option("--require-approval", is_flag=True, default=None)
@source_options
@operator_option
@json_option
@click.pass_context
def replace(
    ctx: click.Context,
    home: Path,
    operator_identity: str | None,
    name: str,
    csv_file: Path,
    columns: tuple[str, ...],
    grade: str | None,
    sharing: str | None,
    legal_basis: str | None,
    owner_kind: str | None,
    owner: str | None,
    holder: str | None,
    description: str | None,
    jurisdictions: tuple[str, ...],
    min_group_size: int | None,
    min_set_size: int | None,
    require_dp: bool | None,
    require_approval: bool | None,
    encoding: str | None,
    delimiter: str | None,
    maps: tuple[str, ...],
    skip_invalid: bool,
    check: bool,
    as_json: bool,
) -> None:
    """Refresh dataset NAME's rows from CSV_FILE as its next version.

    The registration stays (metadata, column rules and formats, registration time), and with
    it every grant on the dataset. Registration options may be restated, as in 'dataset add',
    but not changed: to change them, remove the dataset and add it again. Without --encoding,
    --delimiter or --map the file is read as the current version's was.
    """
    from govshare.node.operator import Restatement

    rules, formats = _columns(columns) if columns else (None, {})
    stated = Restatement(
        grade=None if grade is None else Grade(grade),
        sharing_type=None if sharing is None else SharingType(sharing),
        legal_basis=legal_basis,
        owner_kind=None if owner_kind is None else OwnerKind(owner_kind),
        owner=owner,
        holder=holder,
        description=description,
        allowed_jurisdictions=jurisdictions or None,
        min_group_size=min_group_size,
        min_set_size=min_set_size,
        require_dp=require_dp or None,
        require_approval=require_approval or None,
        columns=rules,
        formats=formats,
    )
    operator = operator_for(home, operator_identity)
    restated_source = encoding is not None or delimiter is not None or bool(maps)
    source = _source(encoding, delimiter, maps) if restated_source else None
    with _progress(csv_file) as progress:
        report = operator.replace_dataset(
            csv_file,
            name=name,
            stated=stated,
            source=source,
            skip_invalid=skip_invalid,
            check=check,
            progress=progress,
        )
    if as_json:
        emit_json(_report_json(report))
    else:
        shown = source if source is not None else operator.dataset_record(name).source
        _print_report(report, shown, "replaced")
    if not report.would_import:
        ctx.exit(1)


@group.command("list")
@home_option
@json_option
def list_(home: Path, as_json: bool) -> None:
    """List the node's datasets with their governance metadata."""
    from govshare.node.operator import Operator, record_to_json

    records = Operator(home).dataset_records()
    if as_json:
        emit_json([record_to_json(r) for r in records])
        return
    render_table(
        "datasets",
        ("name", "grade", "sharing", "owner", "holder", "rows", "columns", "version", "registered"),
        (
            (
                r.info.name,
                r.info.grade.value,
                r.info.sharing_type.value,
                f"{r.info.owner.name} ({r.info.owner.kind.value})",
                r.info.owner.holder,
                r.info.row_count,
                len(r.info.columns),
                r.version,
                _when(r.info.created_at)[:10],
            )
            for r in records
        ),
    )


def _show(record: DatasetRecord) -> None:
    info = record.info
    console.print(f"[bold]{info.name}[/]  {info.description}", highlight=False)
    source = record.source
    read_as = f"{record.encoding}, delimiter {source.delimiter!r}"
    if source.header_map:
        read_as += ", headers " + ", ".join(f"{h} → {n}" for h, n in source.header_map)
    facts = [
        ("grade", info.grade.value),
        ("sharing type", info.sharing_type.value),
        ("legal basis", info.legal_basis or "-"),
        ("owner", f"{info.owner.name} ({info.owner.kind.value})"),
        ("holder", info.owner.holder),
        ("rows", str(info.row_count)),
        ("registered", _when(info.created_at)),
        ("version", str(record.version)),
        ("replaced", "-" if record.replaced_at is None else _when(record.replaced_at)),
        ("source file", f"sha256 {record.source_sha256}")
        if record.live is None
        else (
            "source",
            f"{record.live.describe()} (live; rows at registration sha256 {record.source_sha256})",
        ),
        ("read as", read_as),
        ("allowed jurisdictions", ", ".join(info.allowed_jurisdictions) or "-"),
        ("min group size", str(info.min_group_size or "grade floor")),
        ("min set size", str(info.min_set_size or "grade floor")),
        ("require DP", "yes" if info.require_dp else "grade default"),
        ("require approval", "yes" if info.require_approval else "grade default"),
    ]
    render_table(None, ("", ""), facts)
    render_table(
        "columns",
        ("column", "rule", "detail"),
        ((c.name, c.kind.value, _rule_detail(c, record.formats.get(c.name))) for c in info.columns),
    )


@group.command("show")
@home_option
@click.argument("name")
@json_option
def show(home: Path, name: str, as_json: bool) -> None:
    """Show one dataset's registration, column rules and version."""
    from govshare.node.operator import Operator, record_to_json

    record = Operator(home).dataset_record(name)
    if as_json:
        emit_json(record_to_json(record))
        return
    _show(record)


@group.command("remove")
@home_option
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@operator_option
@json_option
def remove(home: Path, name: str, yes: bool, operator_identity: str | None, as_json: bool) -> None:
    """Remove a dataset and destroy its rows (grants on it stay listed, and no longer apply to a
    dataset later added under the same name; 'dataset replace' refreshes rows and keeps them).

    The rows are overwritten and the file compacted (secure_delete, VACUUM, WAL truncated), the
    rows' key is deleted, and the destruction is logged (dataset.destroyed: rows, digest, you).
    """
    operator = operator_for(home, operator_identity)
    info = operator.dataset(name)
    if not yes:
        click.confirm(f"remove dataset {name} and its {info.row_count} rows?", abort=True)
    destroyed = operator.remove_dataset(name)
    removed = destroyed.info
    if as_json:
        emit_json(
            {
                "removed": removed.name,
                "row_count": removed.row_count,
                "destroyed": destroyed.to_json(),
            }
        )
        return
    console.print(f"dataset [bold]{removed.name}[/] removed ({removed.row_count} rows)")
    how = "overwritten, key shredded" if destroyed.key_shredded else "overwritten"
    wal = "" if destroyed.wal_truncated else "; the WAL is cut at the node's next checkpoint"
    console.print(
        f"destroyed {destroyed.rows} rows ({how}; {destroyed.hash_name} "
        f"{destroyed.digest[:16]}…){wal}; logged as dataset.destroyed",
        soft_wrap=True,
    )
