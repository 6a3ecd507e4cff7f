"""``govshare grant request|requests|approve|refuse|mine``: access applications (使用权申请).

The analyst applies to a node for a right (``grant request --identity alice --node tax ...``:
a signed application sent over mutual TLS) and reads every node's answers and the grants it
holds (``grant mine``). The department operator lists the open applications with the time left
against the node's deadline (``grant requests --home H``; ``application_deadline_days`` working
days in ``node.toml``) and answers each as a signed act: ``grant approve REQ`` issues the grant
asked for, ``grant refuse REQ --reason ...`` refuses it (a reason is required). An application
left unanswered past its deadline is an ``application.overdue`` alert in ``audit check``.

Kept apart from ``cli/grant.py`` (the operator's own grants) and attached to its group by
``cli/main.py``.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from govshare.cli.common import (
    console,
    emit_json,
    err_console,
    home_option,
    identity_option,
    json_option,
    render_table,
)
from govshare.cli.grant import group, parse_expiry
from govshare.cli.operator_identity import operator_for, operator_option
from govshare.client.rights import apply_for, rights_everywhere
from govshare.model.governance import Role
from govshare.model.identity import Identity
from govshare.v1 import rights_pb2

# For annotations only: the façade is imported where it is called (see cli/main.py).
if TYPE_CHECKING:
    from govshare.node.operator import Application

# What an approval grants unless the operator says otherwise: a modest budget, a year.
DEFAULT_EPSILON = "1"
DEFAULT_MAX_QUERIES = 100
DEFAULT_VALIDITY_DAYS = 365


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _left(deadline: int, now: int) -> str:
    """Time left to answer, or how long overdue."""
    delta = deadline - now
    span = abs(delta)
    days, rest = divmod(span, 86400)
    text = f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"
    return text if delta > 0 else f"OVERDUE by {text}"


@group.command("request")
@identity_option
@click.option("--node", required=True, help="The node holding the dataset.")
@click.option("--dataset", required=True, help="The dataset (its name at that node).")
@click.option("--columns", required=True, help="Comma-separated columns asked for.")
@click.option("--kinds", required=True, help="Comma-separated query kinds asked for.")
@click.option("--purpose", required=True, help="The stated purpose of use.")
@click.option("--legal-basis", required=True, help="The legal basis of the use.")
@json_option
def request(
    identity: Path,
    node: str,
    dataset: str,
    columns: str,
    kinds: str,
    purpose: str,
    legal_basis: str,
    as_json: bool,
) -> None:
    """Apply to NODE for a right on one of its datasets (analyst); signed with your key."""
    me = Identity.load_as(identity, Role.ANALYST)
    answer = apply_for(
        me, node=node, dataset=dataset, columns=_split(columns), query_kinds=_split(kinds),
        purpose=purpose, legal_basis=legal_basis,
    )  # fmt: skip
    if as_json:
        emit_json(_application_json(answer))
        return
    console.print(
        f"application [bold]{answer.request_id}[/] sent to {node} for {dataset} "
        f"({', '.join(answer.columns)}); answer due by {_utc(answer.deadline_at)} UTC — "
        "see 'govshare grant mine'",
        soft_wrap=True,
    )


def _application_json(a: rights_pb2.Application) -> dict[str, object]:
    return {
        "request_id": a.request_id, "node": a.node, "dataset": a.dataset,
        "columns": list(a.columns), "query_kinds": list(a.query_kinds), "purpose": a.purpose,
        "legal_basis": a.legal_basis, "received_at": a.received_at,
        "deadline_at": a.deadline_at, "state": a.state, "answered_by": a.answered_by,
        "answered_at": a.answered_at or None, "reason": a.reason, "grant_id": a.grant_id,
    }  # fmt: skip


def _grant_json(g: rights_pb2.HeldGrant) -> dict[str, object]:
    return {
        "grant_id": g.grant_id, "node": g.node, "dataset": g.dataset, "columns": list(g.columns),
        "query_kinds": list(g.query_kinds), "purpose": g.purpose, "epsilon": g.epsilon,
        "max_queries": g.max_queries, "expires_at": g.expires_at, "status": g.status,
        "granted_by": g.granted_by,
    }  # fmt: skip


@group.command("mine")
@identity_option
@json_option
def mine(identity: Path, as_json: bool) -> None:
    """Your applications and the grants you hold, at every node (analyst)."""
    me = Identity.load_as(identity, Role.ANALYST)
    found = rights_everywhere(me)
    if as_json:
        emit_json(
            {
                "applications": [_application_json(a) for a in found.applications],
                "grants": [_grant_json(g) for g in found.grants],
                "unreachable": found.unreachable,
            }
        )
        return
    now = int(time.time())
    render_table(
        "your applications",
        ["request", "node.dataset", "columns", "state", "answered by", "reason / grant", "due"],
        (
            (
                a.request_id, f"{a.node}.{a.dataset}", ",".join(a.columns), a.state,
                a.answered_by, a.reason or a.grant_id,
                _left(a.deadline_at, now) if a.state == "pending" else "",
            )
            for a in found.applications
        ),
        whole=["request"],
    )  # fmt: skip
    render_table(
        "your grants",
        ["grant", "node.dataset", "columns", "kinds", "ε", "expires", "status", "granted by"],
        (
            (
                g.grant_id, f"{g.node}.{g.dataset}", ",".join(g.columns),
                ",".join(g.query_kinds), g.epsilon, _utc(g.expires_at)[:10], g.status,
                g.granted_by,
            )
            for g in found.grants
        ),
        whole=["grant"],
    )  # fmt: skip
    for node, why in sorted(found.unreachable.items()):
        err_console.print(f"[yellow]{escape(node)} did not answer:[/] {escape(why)}")


@group.command("requests")
@home_option
@click.option("--all", "show_all", is_flag=True, help="Answered applications too.")
@json_option
def requests(home: Path, show_all: bool, as_json: bool) -> None:
    """Access applications waiting for an answer at this node, with the time left (operator)."""
    from govshare.node.operator import Operator

    found = Operator(home).applications(state=None if show_all else "pending")
    now = int(time.time())
    if as_json:
        emit_json([{**a.to_json(), "overdue": a.overdue(now)} for a in found])
        return
    if not found and console.is_terminal:
        console.print("no applications are waiting for an answer")
        return
    render_table(
        "access applications (govshare grant approve|refuse REQ)",
        ["request", "analyst", "dataset", "columns", "kinds", "purpose", "legal basis",
         "state", "time left"],
        (
            (
                a.request_id, a.applicant, a.dataset, ",".join(a.columns),
                ",".join(a.query_kinds), a.purpose, a.legal_basis, a.state,
                _left(a.deadline_at, now) if a.state == "pending" else a.answered_by,
            )
            for a in found
        ),
        whole=["request"],
        plain_when_piped=True,
    )  # fmt: skip


@group.command("approve")
@home_option
@click.argument("request_id")
@click.option("--epsilon", default=DEFAULT_EPSILON, show_default=True, help="The grant's ε.")
@click.option(
    "--expires", default=None, help="YYYY-MM-DD or ISO date-time [default: a year from now]."
)
@click.option("--max-queries", type=int, default=DEFAULT_MAX_QUERIES, show_default=True)
@operator_option
@json_option
def approve(
    home: Path,
    request_id: str,
    epsilon: str,
    expires: str | None,
    max_queries: int,
    operator_identity: str | None,
    as_json: bool,
) -> None:
    """Approve an application (a unique id prefix will do): issue the grant it asked for."""
    expires_at = (
        parse_expiry(expires)
        if expires is not None
        else int(time.time()) + DEFAULT_VALIDITY_DAYS * 86400
    )
    answered, grant = operator_for(home, operator_identity).approve_application(
        request_id, epsilon=epsilon, expires_at=expires_at, max_queries=max_queries
    )
    if as_json:
        emit_json({"application": answered.to_json(), "grant": grant.to_json()})
        return
    console.print(
        f"application {answered.request_id} approved by {escape(answered.answered_by)}: grant "
        f"[bold]{grant.grant_id}[/] to {grant.grantee} on {grant.dataset} "
        f"({', '.join(grant.columns)}), until {_utc(grant.expires_at)} UTC",
        soft_wrap=True,
    )


@group.command("refuse")
@home_option
@click.argument("request_id")
@click.option("--reason", required=True, help="Why (told to the analyst; required).")
@operator_option
@json_option
def refuse(
    home: Path, request_id: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Refuse an application (a unique id prefix will do); a reason is required."""
    answered: Application = operator_for(home, operator_identity).refuse_application(
        request_id, reason=reason
    )
    if as_json:
        emit_json(answered.to_json())
        return
    console.print(
        f"application {answered.request_id} refused by {escape(answered.answered_by)}: "
        f"{escape(answered.reason)}",
        soft_wrap=True,
    )
