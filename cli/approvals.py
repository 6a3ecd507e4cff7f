"""``govshare approvals``: the department operator approves or denies pending queries."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import click

from govshare.cli.common import console, emit_json, home_option, json_option, render_table
from govshare.node.operator import Operator


@click.group("approvals")
def group() -> None:
    """List, approve and deny queries waiting for this node's approval (operator)."""


@group.command("list")
@home_option
@json_option
def list_(home: Path, as_json: bool) -> None:
    """Queries waiting for approval at this node."""
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
    if not waiting:
        console.print("no queries are waiting for approval")
        return
    now = int(time.time())
    columns = ["query", "analyst", "kind", "release", "dataset", "purpose", "received (UTC)"]
    render_table(
        "queries waiting for approval",
        [*columns, "expires (UTC)"],
        (
            (
                p.record.query_id,
                p.record.analyst,
                p.record.kind,
                p.release,
                p.record.dataset,
                p.record.purpose,
                _utc(p.record.received_at),
                # An expired query can no longer be approved (approving it is refused).
                "expired" if p.expires_at <= now else _utc(p.expires_at),
            )
            for p in waiting
        ),
    )


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _decide(home: Path, query_id: str, *, approve: bool, reason: str) -> None:
    record = Operator(home).decide(query_id, approve=approve, reason=reason)
    console.print(f"query {record.query_id} {record.state}: {record.message}")


@group.command("approve")
@home_option
@click.argument("query_id")
@click.option("--reason", default="", help="Recorded in the audit log.")
def approve(home: Path, query_id: str, reason: str) -> None:
    """Approve a pending query (refused once its signed request has expired)."""
    _decide(home, query_id, approve=True, reason=reason)


@group.command("deny")
@home_option
@click.argument("query_id")
@click.option("--reason", required=True, help="Told to the analyst and recorded.")
def deny(home: Path, query_id: str, reason: str) -> None:
    """Deny a pending query."""
    _decide(home, query_id, approve=False, reason=reason)
