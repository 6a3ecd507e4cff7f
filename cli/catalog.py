"""``govshare catalog``: the analyst discovers the federation's datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from govshare.cli.common import console, emit_json, err_console, identity_option, json_option
from govshare.cli.crossborder import when_text
from govshare.model.epsilon import format_epsilon
from govshare.model.governance import ColumnRule, DatasetInfo, OwnerKind
from govshare.model.identity import Identity
from govshare.protocols.errors import Unavailable
from govshare.rpc.client import NodeCatalogue, NodeClient, federation_catalog


def _rule_text(rule: ColumnRule) -> str:
    detail = rule.key_type or rule.mask or ("|".join(rule.domain) if rule.domain else "")
    if rule.domain and len(rule.domain) > 3:
        detail = f"{len(rule.domain)} labels"
    return f"{rule.name} {rule.kind.value}" + (f" ({detail})" if detail else "")


def dataset_json(node: str, info: DatasetInfo) -> dict[str, Any]:
    return {
        "node": node,
        "name": info.name,
        "grade": info.grade.value,
        "sharing_type": info.sharing_type.value,
        "legal_basis": info.legal_basis,
        "owner": {
            "kind": info.owner.kind.value,
            "name": info.owner.name,
            "holder": info.owner.holder,
        },
        "row_count": info.row_count,
        "description": info.description,
        "columns": [
            {
                "name": c.name,
                "kind": c.kind.value,
                "key_type": c.key_type,
                "domain": list(c.domain),
                "mask": c.mask,
            }
            for c in info.columns
        ],
        "requires_approval": info.require_approval,
        "allowed_jurisdictions": list(info.allowed_jurisdictions),
    }


@click.group("catalog")
def group() -> None:
    """Discover datasets across the federation (analyst)."""


@group.command("list")
@identity_option
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait per node.")
@json_option
def list_(identity: Path, timeout: float, as_json: bool) -> None:
    """List every node's datasets: metadata and column rules, never rows.

    Exits 1 when no node answers; a node that does not answer while others do is named in a
    warning line on stderr.
    """
    me = Identity.load(identity)
    answers = federation_catalog(me, timeout=timeout)
    failed = [a for a in answers if a.error]
    if as_json:
        emit_json(
            {
                "datasets": [dataset_json(a.node, d) for a in answers for d in a.datasets],
                "unreachable": {a.node: a.error for a in failed},
            }
        )
    if answers and len(failed) == len(answers):
        raise Unavailable(f"no node answered: {_failures(failed)}")
    if as_json:
        return
    from rich.table import Table

    table = Table(title=f"federation {me.roster.federation} — catalogue", header_style="bold")
    for column in ("node", "dataset", "grade", "sharing", "owner", "rows", "columns and rules"):
        table.add_column(column, no_wrap=column in ("columns and rules", "rows", "dataset"))
    for answer in answers:
        for d in answer.datasets:
            table.add_row(
                answer.node,
                d.name,
                d.grade.value,
                d.sharing_type.value,
                f"{d.owner.name} ({d.owner.kind.value})",
                f"{d.row_count:,}",
                "\n".join(_rule_text(c) for c in d.columns),
            )
    console.print(table)
    if failed:
        err_console.print(
            f"[yellow]warning:[/] {len(failed)} of {len(answers)} nodes did not answer: "
            f"{escape(_failures(failed))}",
            soft_wrap=True,
        )


def _failures(failed: list[NodeCatalogue]) -> str:
    return "; ".join(
        a.error if a.error and a.node in a.error else f"{a.node}: {a.error}" for a in failed
    )


@group.command("show")
@identity_option
@click.argument("dataset", metavar="NODE.DATASET")
@json_option
def show(identity: Path, dataset: str, as_json: bool) -> None:
    """Show one dataset's metadata, column rules and cross-border assessments in force."""
    node, _, name = dataset.partition(".")
    if not name:
        raise click.BadParameter("expected NODE.DATASET, e.g. tax.residents", param_hint="DATASET")
    me = Identity.load(identity)
    with NodeClient.to(me, node) as client:
        entry = client.catalog_entry(name)
    info = entry.info
    if as_json:
        payload = dataset_json(node, info)
        payload["crossborder"] = [
            {"destination": r.destination, "assessment": r.assessment, "expires_at": r.expires_at}
            for r in entry.crossborder
        ]
        if entry.ledger is not None:
            spent, reserved, left = (format_epsilon(v) for v in entry.ledger)
            payload["epsilon"] = {"spent": spent, "reserved": reserved, "left": left}
        for column in payload["columns"]:
            column["scale"] = entry.scales.get(column["name"], 0)
        emit_json(payload)
        return
    console.print(
        f"[bold]{node}.{info.name}[/] — grade {info.grade.value}, sharing {info.sharing_type.value}"
        + (f" ({info.legal_basis})" if info.legal_basis else "")
    )
    console.print(f"owner {info.owner.kind.value}: {info.owner.name}; held by {info.owner.holder}")
    console.print(f"{info.row_count:,} rows. {info.description}")
    for column in info.columns:
        places = entry.scales.get(column.name)
        unit = (
            f", kept to {places} decimal places (its sums and --sum-bound in its declared unit)"
            if places
            else ""
        )
        console.print(f"  {_rule_text(column)}{unit}")
    if entry.ledger is not None:
        spent, reserved, left = (format_epsilon(v) for v in entry.ledger)
        console.print(
            f"your ε here, over all your grants: spent {spent}, reserved {reserved} "
            f"(waiting for approval or running), left {left}"
        )
    if entry.crossborder:
        console.print("cross-border assessments in force:")
        for record in entry.crossborder:
            console.print(
                f"  to {record.destination}: {record.assessment}, "
                f"until {when_text(record.expires_at)}"
            )
    elif info.owner.kind is OwnerKind.INDIVIDUAL:
        home = me.roster.member(node).jurisdiction
        console.print(f"no cross-border assessment in force: results stay in {home}")
