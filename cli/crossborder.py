"""``govshare crossborder``: the operator records cross-border assessments (数据出境安全评估).

Data of ``individual`` owners leaves the node's jurisdiction only to a destination covered by an
assessment record in force (policy rule ``crossborder.assessment``). ``--to`` takes the
destination's ISO 3166-1 alpha-2 code, as the roster writes jurisdictions; ``--expires`` takes a
date ``YYYY-MM-DD`` — the record covers the destination through the end of that day, UTC — or an
ISO 8601 date-time with its UTC offset, as for grants.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import click
from rich.table import Table

from govshare.cli.common import console, emit_json, err_console, home_option, json_option
from govshare.cli.grant import parse_expiry
from govshare.cli.operator_identity import operator_for, operator_option
from govshare.model.crossborder import Assessment, verify_assessment
from govshare.model.governance import OwnerKind
from govshare.model.identity import Identity
from govshare.protocols.errors import VerificationFailed


def when_text(seconds: int | None) -> str:
    """Unix seconds as a UTC time, ``2027-07-01 00:00:00Z`` (empty for ``None``)."""
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _status(record: Assessment, me: Identity, now: int) -> str:
    if record.revoked:
        return "revoked"
    try:
        verify_assessment(record, me.signing_key.public_key())
    except VerificationFailed:
        return "bad signature"
    if now >= record.expires_at:
        return "expired"
    if now < record.created_at:
        return "not yet in force"
    return "in force"


@click.group("crossborder")
def group() -> None:
    """Record, list and revoke cross-border assessments of datasets (operator)."""


@group.command("approve")
@home_option
@click.option("--dataset", required=True, help="The dataset the assessment covers.")
@click.option("--to", "destination", required=True, help="Destination jurisdiction, e.g. HK.")
@click.option("--assessment", required=True, help="The assessment's reference (file number).")
@click.option("--expires", required=True, help="YYYY-MM-DD (end of day, UTC) or ISO date-time.")
@click.option("--basis", required=True, help="The legal basis relied on.")
@operator_option
@json_option
def approve(
    home: Path,
    operator_identity: str | None,
    dataset: str,
    destination: str,
    assessment: str,
    expires: str,
    basis: str,
    as_json: bool,
) -> None:
    """Sign and store a cross-border assessment record with this node's key."""
    record, info = operator_for(home, operator_identity).approve_assessment(
        dataset=dataset,
        destination=destination,
        assessment=assessment,
        basis=basis,
        expires_at=parse_expiry(expires),
    )
    if info.owner.kind is not OwnerKind.INDIVIDUAL:
        err_console.print(
            f"[yellow]note:[/] {info.name} is {info.owner.kind.value} data; only individual "
            "data needs a cross-border assessment"
        )
    if as_json:
        emit_json(record.to_json())
        return
    console.print(
        f"cross-border record [bold]{record.record_id}[/]: {record.dataset} may go to "
        f"{record.destination} under {record.assessment}, until {when_text(record.expires_at)}"
    )


@group.command("list")
@home_option
@click.option("--dataset", default=None, help="Only records on this dataset.")
@json_option
def list_(home: Path, dataset: str | None, as_json: bool) -> None:
    """List cross-border records, revoked and expired ones included, with their status."""
    from govshare.node.operator import Operator

    operator = Operator(home)
    me = operator.identity()
    records = operator.assessments(dataset)
    now = int(time.time())
    if as_json:
        emit_json([{**r.to_json(), "status": _status(r, me, now)} for r in records])
        return
    table = Table(title="cross-border assessments", header_style="bold")
    table.add_column("id", no_wrap=True)  # copied into 'crossborder revoke': never folded
    # The basis is left to --json: the list stays readable in 80 columns.
    for column in ("dataset", "to", "assessment"):
        table.add_column(column, overflow="fold")
    # The last day covered (the expiry itself is exclusive): what was typed after --expires.
    table.add_column("last day", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for r in records:
        table.add_row(
            r.record_id,
            r.dataset,
            r.destination,
            r.assessment,
            when_text(r.expires_at - 1)[:10],
            _status(r, me, now),
        )
    console.print(table)


@group.command("revoke")
@home_option
@click.argument("record_id")
@click.option("--reason", required=True, help="Why the record no longer holds.")
@operator_option
@json_option
def revoke(
    home: Path, record_id: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Revoke a record; it stays listed, marked revoked, and covers nothing from now on."""
    record = operator_for(home, operator_identity).revoke_assessment(record_id, reason=reason)
    if as_json:
        emit_json(record.to_json())
        return
    console.print(
        f"cross-border record [bold]{record.record_id}[/] revoked: {record.dataset} to "
        f"{record.destination}"
    )
