"""``govshare node``: the department operator runs a node."""

from __future__ import annotations

from pathlib import Path

import click

from govshare.cli.common import console, emit_json, home_option, identity_option, json_option
from govshare.node.client import NodeClient
from govshare.node.config import NodeConfig, write_default
from govshare.node.identity import Identity
from govshare.node.node import Node
from govshare.node.query_store import QueryStore
from govshare.node.server import serve as serve_node


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
    node = Node.from_home(home)
    console.print(f"node [bold]{node.name}[/] initialised: {path}")


@group.command("serve")
@home_option
def serve(home: Path) -> None:
    """Serve the node over mutual TLS until SIGTERM or SIGINT.

    The node first checks its own audit log and prints the verdict; from a broken log it serves
    only auditors (read-only) and names the first broken entry.
    """
    serve_node(NodeConfig.load(home))


@group.command("results")
@home_option
@click.argument("query_id")
@json_option
def results(home: Path, query_id: str, as_json: bool) -> None:
    """This node's own keys that matched a membership query it received."""
    store = QueryStore(NodeConfig.load(home).database_path)
    try:
        keys = store.matches(query_id)
    finally:
        store.close()
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
