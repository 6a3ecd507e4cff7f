"""``govshare approvals``: the department operator judges, approves or denies pending queries.

Everything shown comes from the signed request the node holds. Ids may be given by a unique
prefix; tables never cut an id, and print tab-separated lines when piped.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from govshare.cli.common import console, emit_json, home_option, json_option, render_table
from govshare.cli.operator_identity import operator_for, operator_option
from govshare.model.states import PENDING

# For annotations only: the façade is imported where it is called (see cli/main.py).
if TYPE_CHECKING:
    from govshare.node.operator import QueryDetails


@click.group("approvals")
def group() -> None:
    """List, show, approve and deny queries waiting for this node's approval (operator)."""


@group.command("list")
@home_option
@json_option
def list_(home: Path, as_json: bool) -> None:
    """Queries waiting for approval at this node (those whose request has not expired)."""
    from govshare.node.operator import Operator

    waiting = Operator(home).pending()
    if as_json:
        emit_json(
            [
                {
                    "query_id": p.record.query_id,
                    "analyst": p.record.analyst,
                    "kind": p.record.kind,
                    "dataset": p.record.dataset,
                    "purpose": p.record.purpose,
                    "release": p.release,
                    "received_at": p.record.received_at,
                    "request_digest": p.request_digest,
                    "expires_at": p.expires_at,
                }
                for p in waiting
            ]
        )
        return
    if not waiting and console.is_terminal:
        console.print("no queries are waiting for approval")
        return
    render_table(
        "queries waiting for approval (govshare approvals show ID for the whole request)",
        ["query", "analyst", "kind", "release", "dataset", "purpose", "expires (UTC)"],
        (
            (
                p.record.query_id,
                p.record.analyst,
                p.record.kind,
                p.release,
                p.record.dataset,
                p.record.purpose,
                _utc(p.expires_at),
            )
            for p in waiting
        ),
        whole=["query"],
        plain_when_piped=True,
    )


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


def details_to_json(d: QueryDetails) -> dict[str, Any]:
    return {
        "query_id": d.record.query_id,
        "state": d.record.state,
        "message": d.record.message,
        "analyst": d.record.analyst,
        "kind": d.record.kind,
        "purpose": d.record.purpose,
        "dataset": d.record.dataset,
        "release": d.release,
        "epsilon": d.epsilon,
        "exact": d.exact,
        "recipient": d.recipient,
        "mask": d.mask,
        "parties": [
            {
                "node": p.node,
                "dataset": p.dataset,
                "role": p.role,
                "columns": list(p.columns),
                "filters": list(p.filters),
            }
            for p in d.parties
        ],
        "sql": d.sql,
        "issued_at": d.issued_at,
        "expires_at": d.expires_at,
        "received_at": d.record.received_at,
        "request_digest": d.request_digest,
    }


@group.command("show")
@home_option
@click.argument("query_id")
@json_option
def show(home: Path, query_id: str, as_json: bool) -> None:
    """Everything a query asks, from its signed request: analyst, purpose, every party with
    its dataset, columns and filters, the release (ε or exact), the SQL, the deadline."""
    from govshare.node.operator import Operator

    operator = Operator(home)
    d = operator.query_details(query_id)
    me = operator.identity().name
    if as_json:
        emit_json(details_to_json(d))
        return
    release = (
        "exact (no noise; every operator must approve)"
        if d.exact
        else (f"DP noise, ε {d.epsilon}" if d.epsilon is not None else "records (no statistic)")
    )
    if d.recipient is not None:
        release += f"; {d.recipient} learns which of its own keys match"
    elif d.mask is not None:
        release += f"; matching keys go to the analyst masked by {d.mask}"
    lines = [
        ("query", d.record.query_id),
        ("state", f"{d.record.state} ({d.record.message})"),
        ("analyst", d.record.analyst),
        ("purpose", d.record.purpose),
        ("kind", d.record.kind),
        ("release", release),
        ("deadline", f"{_utc(d.expires_at)} UTC (signed {_utc(d.issued_at)} UTC)"),
        ("request digest", d.request_digest),
    ]
    for label, value in lines:
        click.echo(f"{label + ':':<16}{value}")
    click.echo("parties:")
    for p in d.parties:
        here = "  (this node)" if p.node == me else ""
        click.echo(f"  {p.node}.{p.dataset} [{p.role}]{here}")
        click.echo(f"    columns: {', '.join(p.columns) or '-'}")
        click.echo(f"    filters: {' AND '.join(p.filters) or 'none'}")
    if d.sql is not None:
        click.echo("sql:")
        for line in d.sql.strip().splitlines():
            click.echo(f"  {line.strip()}")


def _decide(
    home: Path, query_id: str, identity: str | None, *, approve: bool, reason: str, as_json: bool
) -> None:
    operator = operator_for(home, identity)
    record = operator.decide(query_id, approve=approve, reason=reason)
    needed = operator.approvers(record.dataset) if approve and record.state == PENDING else None
    if as_json:
        emit_json({
            "query_id": record.query_id, "dataset": record.dataset, "state": record.state,
            "message": record.message, "approvers_needed": needed,
        })  # fmt: skip
        return
    if needed is not None:
        console.print(
            f"query {record.query_id}: your approval is recorded; dataset {record.dataset} "
            f"needs {needed} different approvers"
        )
        return
    console.print(f"query {record.query_id} {record.state}: {record.message}")


@group.command("approve")
@home_option
@click.argument("query_id")
@click.option("--reason", default="", help="Recorded in the audit log.")
@operator_option
@json_option
def approve(
    home: Path, query_id: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Approve a pending query (a unique id prefix will do). Refused, naming its state, once
    it is not pending: expired, withdrawn by the analyst (cancelled), decided, or run."""
    _decide(home, query_id, operator_identity, approve=True, reason=reason, as_json=as_json)


@group.command("deny")
@home_option
@click.argument("query_id")
@click.option("--reason", required=True, help="Told to the analyst and recorded.")
@operator_option
@json_option
def deny(
    home: Path, query_id: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Deny a pending query (a unique id prefix will do)."""
    _decide(home, query_id, operator_identity, approve=False, reason=reason, as_json=as_json)
