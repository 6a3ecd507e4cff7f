"""``govshare grant``: the department operator grants, lists and revokes use rights (使用权).

``--expires`` takes a date ``YYYY-MM-DD`` — the grant is valid through the end of that day, UTC —
or an ISO 8601 date-time with its UTC offset (``2027-12-31T18:00:00+08:00``).
"""

from __future__ import annotations

import datetime as dt
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from govshare.cli.common import console, emit_json, home_option, json_option
from govshare.cli.operator_identity import operator_for, operator_option
from govshare.model.epsilon import format_epsilon
from govshare.protocols.errors import MalformedInput

# For annotations only: the façade is imported where it is called (see cli/main.py).
if TYPE_CHECKING:
    from govshare.node.operator import Grant, GrantUsage


def parse_expiry(text: str) -> int:
    """Unix seconds at which a grant stops being valid (see the module docstring).

    Raises:
        MalformedInput: neither a date nor a date-time with an offset.
    """
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            end = dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(days=1)
            return int(end.timestamp())
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise MalformedInput(
            f"--expires {text!r}: expected YYYY-MM-DD or an ISO date-time", field="expires"
        ) from None
    if moment.tzinfo is None:
        raise MalformedInput(
            f"--expires {text!r}: a date-time needs its UTC offset, e.g. +08:00", field="expires"
        )
    return int(moment.timestamp())


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _when(seconds: int | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _status(grant: Grant, standing: tuple[str, str] | None) -> str:
    """A grant's status in a word or two: active, revoked, expired, or void (its dataset was
    removed or registered again after it: queries are refused with grant.predates_dataset)."""
    from govshare.node.operator import GRANT_EXPIRED, GRANT_REVOKED

    if standing is None:
        return "active"
    rule, why = standing
    if rule == GRANT_REVOKED:
        return f"revoked {_when(grant.revoked_at)}"
    if rule == GRANT_EXPIRED:
        return "expired"
    return "void: dataset removed" if "was removed" in why else "void: dataset re-added"


def _usage(grant: Grant, used: GrantUsage) -> dict[str, str | int]:
    """What a grant has used: queries, ε spent and reserved (the node's reservations)."""
    left = max(grant.epsilon - used.epsilon_used, Fraction(0))
    return {
        "queries_used": used.queries,
        "epsilon_spent": format_epsilon(used.epsilon_spent),
        "epsilon_reserved": format_epsilon(used.epsilon_reserved),
        "epsilon_left": format_epsilon(left),
    }


def _render(
    grants: list[Grant],
    usage: dict[str, dict[str, str | int]],
    standing: dict[str, tuple[str, str] | None],
    title: str,
) -> None:
    table = Table(title=title, header_style="bold")
    table.add_column("id", no_wrap=True)  # copied into 'grant revoke': never folded
    # The purpose is left to 'grant show': the list stays readable in 80 columns.
    for column in ("dataset", "grantee", "kinds", "ε spent/held/left", "queries", "expires"):
        table.add_column(column, overflow="fold")
    table.add_column("status", no_wrap=True)
    for g in grants:
        u = usage[g.grant_id]
        table.add_row(
            g.grant_id,
            g.dataset,
            g.grantee,
            ",".join(k.value for k in g.query_kinds),
            f"{u['epsilon_spent']}/{u['epsilon_reserved']}/{u['epsilon_left']} of "
            f"{format_epsilon(g.epsilon)}",
            f"{u['queries_used']}/{g.max_queries}",
            _when(g.expires_at)[:10],
            _status(g, standing[g.grant_id]),
        )
    console.print(table)
    console.print(
        "ε over all of one grantee's grants on a dataset never exceeds its largest grant in "
        "force: [bold]govshare grant ledger[/] shows each analyst's ledger."
    )


def _standing_json(grant: Grant, standing: tuple[str, str] | None) -> dict[str, str | None]:
    """A grant's status for --json: status (active, revoked, expired, void), and the rule and
    reason a query using it would be refused with."""
    return {
        "status": _status(grant, standing).split(" ")[0].rstrip(":"),
        "not_in_force": None if standing is None else standing[0],
        "why": None if standing is None else standing[1],
    }


@click.group("grant")
def group() -> None:
    """Grant, list and revoke use rights on the node's datasets (operator)."""


@group.command("add")
@home_option
@click.option("--dataset", required=True, help="The dataset the grant is on.")
@click.option("--grantee", required=True, help="The federation member receiving the right.")
@click.option("--purpose", required=True, help="The stated purpose of use.")
@click.option("--columns", required=True, help="Comma-separated columns the grant covers.")
@click.option(
    "--kinds",
    required=True,
    help="Comma-separated query kinds: psi_cardinality, psi_membership, "
    "intersection_aggregate, horizontal_aggregate.",
)
@click.option("--expires", required=True, help="YYYY-MM-DD (end of day, UTC) or ISO date-time.")
@click.option("--epsilon", required=True, help="DP budget ε, a decimal such as 1.0.")
@click.option("--max-queries", type=int, required=True, help="Maximum number of queries.")
@operator_option
@json_option
def add(
    home: Path,
    operator_identity: str | None,
    dataset: str,
    grantee: str,
    purpose: str,
    columns: str,
    kinds: str,
    expires: str,
    epsilon: str,
    max_queries: int,
    as_json: bool,
) -> None:
    """Sign and store a grant with this node's key, issued by you (--identity)."""
    grant = operator_for(home, operator_identity).issue_grant(
        dataset=dataset,
        grantee=grantee,
        purpose=purpose,
        columns=_split(columns),
        query_kinds=_split(kinds),
        expires_at=parse_expiry(expires),
        epsilon=epsilon,
        max_queries=max_queries,
    )
    if as_json:
        emit_json(grant.to_json())
        return
    console.print(
        f"grant [bold]{grant.grant_id}[/] to {grant.grantee} on {grant.dataset}: "
        f"{', '.join(grant.columns)}; ε {format_epsilon(grant.epsilon)}, "
        f"{grant.max_queries} queries, until {_when(grant.expires_at)}"
    )


@group.command("list")
@home_option
@click.option("--grantee", default=None, help="Only this member's grants.")
@click.option("--dataset", default=None, help="Only grants on this dataset.")
@click.option("--active", is_flag=True, help="Hide revoked grants.")
@json_option
def list_(
    home: Path, grantee: str | None, dataset: str | None, active: bool, as_json: bool
) -> None:
    """List grants with what each has used, revoked ones included unless --active."""
    from govshare.node.operator import Operator

    found = Operator(home).grants(grantee=grantee, dataset=dataset, include_revoked=not active)
    grants = [g for g, _ in found]
    usage = {g.grant_id: _usage(g, used) for g, used in found}
    standing = Operator(home).standing(grants)
    if as_json:
        emit_json([
            g.to_json() | usage[g.grant_id] | _standing_json(g, standing[g.grant_id])
            for g in grants
        ])  # fmt: skip
        return
    _render(grants, usage, standing, "grants")


@group.command("ledger")
@home_option
@click.option("--dataset", default=None, help="Only ledgers on this dataset.")
@json_option
def ledger(home: Path, dataset: str | None, as_json: bool) -> None:
    """Each analyst's ε on each dataset, over all its grants: spent, reserved, left."""
    from govshare.node.operator import Operator

    rows = Operator(home).ledgers(dataset)
    if as_json:
        emit_json([
            {"analyst": a, "dataset": d, "spent": format_epsilon(s),
             "reserved": format_epsilon(r), "left": format_epsilon(left)}
            for a, d, s, r, left in rows
        ])  # fmt: skip
        return
    table = Table(title="ε ledgers (one per analyst and dataset)", header_style="bold")
    for column in ("analyst", "dataset", "spent", "reserved", "left"):
        table.add_column(column)
    for a, d, s, r, left in rows:
        table.add_row(a, d, format_epsilon(s), format_epsilon(r), format_epsilon(left))
    console.print(table)


@group.command("show")
@home_option
@click.argument("grant_id")
@json_option
def show(home: Path, grant_id: str, as_json: bool) -> None:
    """Show one grant, with its signature."""
    from govshare.node.operator import Operator

    operator = Operator(home)
    grant, used = operator.grant(grant_id)
    usage = _usage(grant, used)
    standing = operator.standing([grant])[grant.grant_id]
    if as_json:
        emit_json(grant.to_json() | usage | _standing_json(grant, standing))
        return
    facts = [
        ("dataset", grant.dataset),
        ("grantee", grant.grantee),
        ("purpose", grant.purpose),
        ("columns", ", ".join(grant.columns)),
        ("query kinds", ", ".join(k.value for k in grant.query_kinds)),
        ("ε budget", format_epsilon(grant.epsilon)),
        (
            "ε used",
            f"spent {usage['epsilon_spent']}, reserved {usage['epsilon_reserved']}, "
            f"left {usage['epsilon_left']}",
        ),
        ("max queries", str(grant.max_queries)),
        ("queries used", str(usage["queries_used"])),
        ("created", _when(grant.created_at)),
        ("expires", _when(grant.expires_at)),
        ("issuer", grant.issuer),
        ("signature", grant.signature.hex()),
        ("status", _status(grant, standing)),
    ]
    if grant.revoked:
        facts += [("revoked by", grant.revoked_by or ""), ("reason", grant.revoke_reason or "-")]
    table = Table(title=f"grant {grant.grant_id}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for field, value in facts:
        table.add_row(field, value)
    console.print(table)


@group.command("revoke")
@home_option
@click.argument("grant_id")
@click.option("--reason", default="", help="Why the right is withdrawn.")
@operator_option
@json_option
def revoke(
    home: Path, grant_id: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Revoke a grant; it stays listed, marked revoked."""
    grant = operator_for(home, operator_identity).revoke_grant(grant_id, reason=reason)
    if as_json:
        emit_json(grant.to_json())
        return
    console.print(f"grant [bold]{grant.grant_id}[/] revoked")
