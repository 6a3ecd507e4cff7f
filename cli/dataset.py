"""``govshare dataset``: the department operator registers and manages the node's datasets.

Column rules are given one ``--column`` each, as ``NAME=KIND[:ARGS]``:

- ``id_number=join_key:resident_id`` (a key type), optionally ``...:mask=keep_last:4`` for
  record-level release of matches;
- ``district=group_key:domain=east|west|north`` (the declared labels, ``|``-separated);
- ``name=masked:keep_last:1`` (the masking rule);
- ``amount=aggregate``, ``year=plaintext``, ``notes=deny``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from govshare.cli.common import console, emit_json, home_option, json_option, render_table
from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    DatasetInfo,
    Grade,
    OwnerKind,
    SharingType,
)
from govshare.node.operator import ImportReport, Operator, dataset_to_json
from govshare.protocols.errors import MalformedInput

COLUMN_HELP = (
    "NAME=KIND[:ARGS], once per CSV column: join_key:KEY_TYPE[:mask=RULE], "
    "group_key:domain=A|B|C, masked:RULE, aggregate, plaintext, deny."
)


def parse_column(spec: str) -> ColumnRule:
    """Parse one ``--column`` value (see the module docstring).

    Raises:
        MalformedInput: the spec does not have the form ``NAME=KIND[:ARGS]`` for its kind.
    """
    name, sep, rest = spec.partition("=")
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


def _rule_detail(rule: ColumnRule) -> str:
    parts: list[str] = []
    if rule.key_type:
        parts.append(f"key type {rule.key_type}")
    if rule.domain:
        parts.append("domain " + "|".join(rule.domain))
    if rule.mask:
        parts.append(f"mask {rule.mask}")
    return "; ".join(parts)


def _report_json(report: ImportReport) -> dict[str, object]:
    return {
        "dataset": report.dataset,
        "imported": report.imported,
        "rejected": report.rejected,
        "first_rejections": [{"row": r.row, "reason": r.reason} for r in report.first_rejections],
        "source_sha256": report.source_sha256,
    }


@click.group("dataset")
def group() -> None:
    """Register, list, show and remove the node's datasets (operator)."""


@group.command("add")
@home_option
@click.argument("csv_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Dataset name: a lower-case identifier.")
@click.option("--grade", type=click.Choice([g.value for g in Grade]), required=True)
@click.option("--sharing", type=click.Choice([s.value for s in SharingType]), required=True)
@click.option("--legal-basis", default="", help="Required with --sharing none.")
@click.option("--owner-kind", type=click.Choice([k.value for k in OwnerKind]), required=True)
@click.option("--owner", required=True, help="Who owns the data.")
@click.option("--holder", default=None, help="Holding department [default: this node].")
@click.option("--column", "columns", multiple=True, required=True, help=COLUMN_HELP)
@click.option("--description", default="")
@click.option("--skip-invalid", is_flag=True, help="Import the valid rows, report the others.")
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
@json_option
def add(
    home: Path,
    csv_file: Path,
    name: str,
    grade: str,
    sharing: str,
    legal_basis: str,
    owner_kind: str,
    owner: str,
    holder: str | None,
    columns: tuple[str, ...],
    description: str,
    skip_invalid: bool,
    jurisdictions: tuple[str, ...],
    min_group_size: int,
    min_set_size: int,
    require_dp: bool,
    require_approval: bool,
    as_json: bool,
) -> None:
    """Register CSV_FILE as a dataset; the whole file is imported or none of it."""
    operator = Operator(home)
    rules = [parse_column(spec) for spec in columns]
    report = operator.add_dataset(
        csv_file,
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
    )
    if as_json:
        emit_json(_report_json(report))
        return
    console.print(
        f"dataset [bold]{report.dataset}[/] registered: {report.imported} rows imported, "
        f"{report.rejected} rejected"
    )
    for rejection in report.first_rejections:
        console.print(f"  rejected {rejection.reason}", markup=False, highlight=False)
    if report.rejected > len(report.first_rejections):
        console.print(f"  ... and {report.rejected - len(report.first_rejections)} more")


@group.command("list")
@home_option
@json_option
def list_(home: Path, as_json: bool) -> None:
    """List the node's datasets with their governance metadata."""
    datasets = Operator(home).datasets()
    if as_json:
        emit_json([dataset_to_json(d) for d in datasets])
        return
    render_table(
        "datasets",
        ("name", "grade", "sharing", "owner", "holder", "rows", "columns", "registered"),
        (
            (
                d.name,
                d.grade.value,
                d.sharing_type.value,
                f"{d.owner.name} ({d.owner.kind.value})",
                d.owner.holder,
                d.row_count,
                len(d.columns),
                _when(d.created_at)[:10],
            )
            for d in datasets
        ),
    )


def _show(info: DatasetInfo) -> None:
    console.print(f"[bold]{info.name}[/]  {info.description}", highlight=False)
    facts = [
        ("grade", info.grade.value),
        ("sharing type", info.sharing_type.value),
        ("legal basis", info.legal_basis or "-"),
        ("owner", f"{info.owner.name} ({info.owner.kind.value})"),
        ("holder", info.owner.holder),
        ("rows", str(info.row_count)),
        ("registered", _when(info.created_at)),
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
        ((c.name, c.kind.value, _rule_detail(c)) for c in info.columns),
    )


@group.command("show")
@home_option
@click.argument("name")
@json_option
def show(home: Path, name: str, as_json: bool) -> None:
    """Show one dataset's registration and column rules."""
    info = Operator(home).dataset(name)
    if as_json:
        emit_json(dataset_to_json(info))
        return
    _show(info)


@group.command("remove")
@home_option
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def remove(home: Path, name: str, yes: bool, as_json: bool) -> None:
    """Remove a dataset and its rows (grants on it stay listed)."""
    operator = Operator(home)
    info = operator.dataset(name)
    if not yes:
        click.confirm(f"remove dataset {name} and its {info.row_count} rows?", abort=True)
    removed = operator.remove_dataset(name)
    if as_json:
        emit_json({"removed": removed.name, "row_count": removed.row_count})
        return
    console.print(f"dataset [bold]{removed.name}[/] removed ({removed.row_count} rows)")
