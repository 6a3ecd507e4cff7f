"""``govshare node``: the department operator runs a node."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.markup import escape

from govshare.cli.common import (
    console,
    emit_json,
    home_option,
    identity_option,
    json_option,
    render_table,
)
from govshare.model.identity import Identity
from govshare.node.api.server import serve as serve_node
from govshare.node.config import NodeConfig, write_default
from govshare.node.operator import Operator, initialise
from govshare.rpc.client import NodeClient


@click.group("node")
def group() -> None:
    """Initialise and run a department node (operator)."""


@group.command("init")
@home_option
@click.option("--listen", required=True, help="HOST:PORT the node listens on.")
@click.option(
    "--identity",
    "identity",
    default=".",
    show_default=True,
    help="The node's identity bundle, relative to the home.",
)
def init(home: Path, listen: str, identity: str) -> None:
    """Write node.toml with documented defaults and create the node's stores."""
    path = write_default(home, listen=listen, identity=identity)
    name = initialise(home)
    console.print(f"node [bold]{name}[/] initialised: {path}")


@group.command("serve")
@home_option
def serve(home: Path) -> None:
    """Serve the node over mutual TLS until SIGTERM or SIGINT.

    The node first checks its own audit log and prints the verdict; from a broken log it serves
    only auditors (read-only) and names the first broken entry. One node per home: while a node
    serves a home, another refuses at once, naming the process that holds the home's lock.
    """
    serve_node(NodeConfig.load(home))


@group.command("results")
@home_option
@click.argument("query_id")
@json_option
def results(home: Path, query_id: str, as_json: bool) -> None:
    """This node's own keys that matched a membership query it received."""
    keys = Operator(home).matches(query_id)
    if as_json:
        emit_json({"query_id": query_id, "matched": keys})
        return
    console.print(f"{len(keys):,} of this node's keys matched query {query_id}")
    for key in keys:
        console.print(f"  {key}")


@group.command("ping")
@identity_option
@click.argument("node")
@json_option
def ping(identity: Path, node: str, as_json: bool) -> None:
    """Check that NODE answers over mutual TLS (node role only)."""
    me = Identity.load(identity)
    with NodeClient.to(me, node) as client:
        reply = client.ping()
    if as_json:
        emit_json(
            {
                "node": reply.node,
                "jurisdiction": reply.jurisdiction,
                "roster_version": reply.roster_version,
            }
        )
        return
    console.print(
        f"{reply.node} ({reply.jurisdiction}) answers; roster version {reply.roster_version}"
    )


@group.group("alerts", invoke_without_command=True)
@home_option
@json_option
@click.pass_context
def alerts(ctx: click.Context, home: Path, as_json: bool) -> None:
    """This node's risk alerts (risk.alert entries) and the analysts suspended here."""
    ctx.ensure_object(dict)
    ctx.obj["alerts_home"] = home
    if ctx.invoked_subcommand is not None:
        return
    operator = Operator(home)
    found, suspended = operator.alerts()
    if as_json:
        emit_json(
            {"alerts": [a.to_json() for a in found], "suspended": [s.to_json() for s in suspended]}
        )
        return
    if found:
        render_table(
            f"risk alerts at {operator.home}",
            ("time (UTC)", "severity", "rule", "analyst", "entries", "detail", "suspended"),
            (
                (
                    _utc(a.time_ms // 1000),
                    a.severity,
                    escape(a.rule),
                    escape(a.analyst or ""),
                    " ".join(f"#{i}" for i in a.entries[:6]) + (" …" if len(a.entries) > 6 else ""),
                    escape(a.detail),
                    "yes" if a.suspended else "",
                )
                for a in found
            ),
        )
    else:
        console.print("no risk alerts in this node's log")
    for s in suspended:
        console.print(
            f"[bold red]suspended[/]: {escape(s.analyst)} since {_utc(s.since)} "
            f"({escape(s.rule)}); clear with 'govshare node alerts clear --analyst {s.analyst} "
            "--reason ...'"
        )


@alerts.command("clear")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The node's home folder (default: the one given to 'alerts', $GOVSHARE_HOME or .).",
)
@click.option("--analyst", required=True, help="The suspended analyst.")
@click.option("--reason", required=True, help="Why the suspension is lifted (logged).")
@json_option
@click.pass_context
def clear(ctx: click.Context, home: Path | None, analyst: str, reason: str, as_json: bool) -> None:
    """Lift an analyst's suspension at this node; logged as risk.cleared by the operator."""
    held, operator = Operator(home or ctx.obj["alerts_home"]).clear_suspension(
        analyst, reason=reason
    )
    if as_json:
        emit_json({"cleared": held.to_json(), "by": operator, "reason": reason.strip()})
        return
    console.print(
        f"{escape(analyst)} may query this node again (suspended since {_utc(held.since)} "
        f"by {escape(held.rule)}); logged as risk.cleared by {operator}"
    )


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
