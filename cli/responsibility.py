"""``govshare responsibility show NODE.DATASET``: who answers for a dataset (谁主管谁负责).

The responsible person, the grant issuers, the approvers and the analysts of record, each with
what they did on the dataset and their last signed act with its log entry — read from the
node's pulled, verified log only (``govshare.client.accountability``), as the auditor does.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.markup import escape

from govshare.cli.audit import _auditor, quorum_option, state_option
from govshare.cli.common import console, emit_json, identity_option, json_option, render_table
from govshare.client.accountability import responsibility
from govshare.protocols.errors import MalformedInput


@click.group("responsibility")
def group() -> None:
    """Who answers for what, from the verified logs (auditor)."""


def _when(time_ms: int) -> str:
    return dt.datetime.fromtimestamp(time_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@group.command("show")
@identity_option
@state_option
@click.argument("dataset", metavar="NODE.DATASET")
@quorum_option
@json_option
def show(identity: Path, state: Path, dataset: str, quorum: int | None, as_json: bool) -> None:
    """The responsible person, grant issuers, approvers and analysts of record of a dataset,
    each with their last signed act and its log entry (run 'govshare audit pull' first)."""
    node, _, name = dataset.partition(".")
    if not node or not name:
        raise MalformedInput(f"{dataset!r}: give NODE.DATASET, e.g. tax.residents")
    found = responsibility(_auditor(identity, state, quorum=quorum), node, name)
    if as_json:
        emit_json(found.to_json())
        return
    render_table(
        f"responsibility for {node}.{name} (from {node}'s verified log)",
        ["person", "duty", "entries", "last signed act", "entry", "when (UTC)", "signature"],
        (
            (
                escape(p.name),
                p.duty.replace("_", " "),
                " ".join(f"#{i}" for i in p.entries[-5:]) + (" …" if len(p.entries) > 5 else ""),
                escape(p.last_act.action) if p.last_act else "-",
                f"#{p.last_act.entry}" if p.last_act else "-",
                _when(p.last_act.time_ms) if p.last_act else "-",
                ("verified" if p.last_act.verified else "DOES NOT VERIFY") if p.last_act else "-",
            )
            for p in found.people
        ),
    )
    console.print(
        "[dim]the responsible person registered the dataset; each act is the person's own "
        "signature, checked against the roster[/]"
    )
