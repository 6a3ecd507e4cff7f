"""``govshare node``: the department operator runs a node."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import click
from rich.markup import escape

from govshare.cli.common import (
    console,
    emit_json,
    grouped_fingerprint,
    home_option,
    identity_option,
    json_option,
    render_table,
    suite_option,
)
from govshare.cli.node_key import key as key_group
from govshare.cli.operator_identity import operator_for, operator_option
from govshare.model.identity import Identity, create_request, install_roster
from govshare.node.config import CONFIG_NAME, NodeConfig
from govshare.protocols.suite import suite_by_name
from govshare.rpc.client import NodeClient

# The node's façade and server are imported in the commands that use them (see cli/main.py).


@click.group("node")
def group() -> None:
    """Initialise and run a department node (operator)."""


group.add_command(key_group)  # node key split|recover (cli/node_key.py)


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
@json_option
def init(home: Path, listen: str, identity: str, as_json: bool) -> None:
    """Write node.toml with documented defaults and create the node's stores.

    The node must be enrolled first (its identity bundle in the home): otherwise nothing is
    written, and the error says how to enrol.
    """
    from govshare.node.operator import initialise

    name, path = initialise(home, listen=listen, identity=identity)
    if as_json:
        emit_json({"node": name, "config": str(path), "listen": listen})
        return
    console.print(f"node [bold]{name}[/] initialised: {path}")


@group.command("keygen")
@home_option
@click.option("--name", required=True, help="The node's member name (one DNS label).")
@suite_option(
    "The federation's crypto suite (its administrator says which); the signing key is made for it."
)
@json_option
def keygen(home: Path, name: str, suite: str, as_json: bool) -> None:
    """Make the node's private keys in its home and a certificate request for the administrator.

    Writes tls.key and signing.key (0600; they never leave the home) and NAME.csr, the request
    to hand to the federation administrator ('govshare federation sign'). Read the request
    fingerprint to the administrator over another channel. Copy the tls.crt, ca.crt and
    roster.json the administrator returns into the home, then run 'govshare node init'.
    """
    request, path = create_request(home, name, suite_by_name(suite))
    if as_json:
        emit_json({
            "request": str(path), "fingerprint": request.fingerprint, "name": name, "suite": suite,
        })  # fmt: skip
        return
    console.print(f"keys for [bold]{name}[/] written to {home} (tls.key, signing.key; 0600)")
    console.print(f"certificate request: {path}")
    console.print(f"request fingerprint {grouped_fingerprint(request.fingerprint)}", soft_wrap=True)
    console.print(
        f"hand {path} to the federation administrator: govshare federation sign {path.name} "
        "--role node --jurisdiction CODE --address HOST:PORT --out DIR",
        soft_wrap=True,
    )


@group.command("serve")
@home_option
def serve(home: Path) -> None:
    """Serve the node over mutual TLS until SIGTERM or SIGINT.

    The node first checks its own audit log and prints the verdict; from a broken log it serves
    only auditors (read-only) and names the first broken entry. One node per home: while a node
    serves a home, another refuses at once, naming the process that holds the home's lock.
    """
    from govshare.node.api.server import serve as serve_node

    if serve_node(NodeConfig.load(home)):
        # Threads still running after the bounded stop (named in the node's last lines) would
        # hold the interpreter's exit; its stores and audit log are closed, so end without them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _identity_dir(home: Path) -> Path:
    """The node's identity bundle: as its node.toml says, or the home before ``node init``."""
    if (home / CONFIG_NAME).exists():
        return NodeConfig.load(home).identity_dir
    return home


@group.group("roster")
def roster() -> None:
    """The signed federation roster this node holds."""


@roster.command("install")
@home_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@json_option
def roster_install(home: Path, file: Path, as_json: bool) -> None:
    """Install a signed roster (from 'govshare federation roster --out FILE').

    Refused unless the federation CA in the node's bundle signed it, it is not older than the
    roster held, and it lists this node's certificate. A serving node adopts it at its next call.
    """
    held, installed = install_roster(_identity_dir(home), file.read_bytes())
    if as_json:
        emit_json(
            {
                "federation": installed.federation,
                "version": installed.version,
                "previous_version": held.version if held else None,
                "members": len(installed.members),
            }
        )
        return
    if held is None:
        before = ""
    elif held.version == installed.version:
        before = " (already held)"
    else:
        before = f" (was version {held.version})"
    console.print(
        f"roster version {installed.version} of {installed.federation} installed{before}; "
        f"{len(installed.members)} members"
    )


@roster.command("show")
@home_option
@json_option
def roster_show(home: Path, as_json: bool) -> None:
    """Show the roster this node holds."""
    current = Identity.load(_identity_dir(home)).roster
    if as_json:
        emit_json(current.to_json())
        return
    render_table(
        f"federation {current.federation} — roster version {current.version}",
        ["name", "role", "jurisdiction", "address"],
        ((m.name, m.role.value, m.jurisdiction, m.address) for m in current.members),
    )


@group.command("results")
@home_option
@click.argument("query_id")
@json_option
def results(home: Path, query_id: str, as_json: bool) -> None:
    """This node's own keys that matched a membership query it received."""
    from govshare.node.operator import Operator

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
    from govshare.node.operator import Operator

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
@operator_option
@json_option
@click.pass_context
def clear(
    ctx: click.Context,
    home: Path | None,
    analyst: str,
    reason: str,
    operator_identity: str | None,
    as_json: bool,
) -> None:
    """Lift an analyst's suspension at this node; logged as risk.cleared by the operator."""
    held, operator = operator_for(
        home or ctx.obj["alerts_home"], operator_identity
    ).clear_suspension(analyst, reason=reason)
    if as_json:
        emit_json({"cleared": held.to_json(), "by": operator, "reason": reason.strip()})
        return
    console.print(
        f"{escape(analyst)} may query this node again (suspended since {_utc(held.since)} "
        f"by {escape(held.rule)}); logged as risk.cleared by {operator}"
    )


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@group.command("freeze")
@home_option
@click.option("--reason", required=True, help="Why (logged with your name).")
@operator_option
@json_option
def freeze(home: Path, reason: str, operator_identity: str | None, as_json: bool) -> None:
    """Stop every query at this node at once (rule node.frozen): new ones are refused, those
    waiting for approval or to run are refused now, until 'node unfreeze'. A signed act of
    duty incident, logged with your name and the reason; audit check reports it."""
    held, stopped = operator_for(home, operator_identity).freeze(None, reason=reason)
    if as_json:
        emit_json({**held.to_json(), "stopped": stopped})
        return
    console.print(
        f"node frozen by {escape(held.frozen_by)}: {escape(held.reason)}; {len(stopped)} "
        f"waiting quer{'y' if len(stopped) == 1 else 'ies'} refused"
    )


@group.command("unfreeze")
@home_option
@click.option("--reason", required=True, help="Why queries may run again (logged).")
@operator_option
@json_option
def unfreeze(home: Path, reason: str, operator_identity: str | None, as_json: bool) -> None:
    """Let queries be admitted at this node again."""
    held = operator_for(home, operator_identity).unfreeze(None, reason=reason)
    if as_json:
        emit_json({"unfrozen": "node", "was": held.to_json(), "reason": reason.strip()})
        return
    console.print(f"node unfrozen (frozen by {escape(held.frozen_by)} since {_utc(held.since)})")


@group.command("freezes")
@home_option
@json_option
def freezes(home: Path, as_json: bool) -> None:
    """The freezes in force at this node: the node's own, and each dataset's."""
    from govshare.node.operator import Operator

    held = Operator(home).freezes()
    if as_json:
        emit_json([f.to_json() for f in held])
        return
    if not held:
        console.print("nothing is frozen")
        return
    render_table(
        "freezes in force",
        ["scope", "rule", "by", "since (UTC)", "reason"],
        (
            (f.to_json()["scope"], f.rule, escape(f.frozen_by), _utc(f.since), escape(f.reason))
            for f in held
        ),
    )
