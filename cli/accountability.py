"""``govshare audit rights``: the rights register (权利可查), from verified log entries only.

Kept apart from ``cli/audit.py`` and attached to its group by ``cli/main.py``. Each node's
pulled copy is verified first (offline); a node whose copy does not verify is named and
nothing of it is shown (``govshare.client.accountability``).
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click
from rich.markup import escape

from govshare.cli.audit import _auditor, _targets, group, quorum_option, state_option
from govshare.cli.common import (
    console,
    emit_json,
    err_console,
    identity_option,
    json_option,
    render_table,
)
from govshare.client.accountability import rights_register

# A register with a node that did not verify is incomplete: the exit code says so.
EXIT_INCOMPLETE = 1


def _day(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d")


@group.command("rights")
@identity_option
@state_option
@click.argument("node", required=False)
@click.option("--all", "all_nodes", is_flag=True, help="Every node in the roster (the default).")
@quorum_option
@json_option
def rights(
    identity: Path,
    state: Path,
    node: str | None,
    all_nodes: bool,
    quorum: int | None,
    as_json: bool,
) -> None:
    """Every dataset with its owner, grade and responsible person, and every right granted on
    it (holder, scope, ε, expiry, status, who granted it), from the verified pulled logs.

    Run 'govshare audit pull' first. Exit 1 when a node's copy is missing or does not verify.
    """
    auditor = _auditor(identity, state, quorum=quorum)
    register = rights_register(auditor, _targets(auditor, node, all_nodes, default_all=True))
    if as_json:
        emit_json(register.to_json())
    else:
        for d in register.datasets:
            gone = " [red](removed)[/]" if d.removed else ""
            console.print(
                f"[bold]{escape(d.node)}.{escape(d.name)}[/]{gone} — {escape(d.grade)}; owner "
                f"{escape(d.owner)} ({escape(d.owner_kind)}), held by {escape(d.holder)}; "
                f"responsible: [bold]{escape(d.responsible)}[/] (entry #{d.entry})",
                soft_wrap=True,
            )
            if not d.rights:
                console.print("  no right granted")
                continue
            render_table(
                None,
                ["grant", "holder", "columns", "kinds", "purpose", "ε", "queries", "expires",
                 "status", "granted by"],
                (
                    (r.grant_id, r.holder, ",".join(r.columns), ",".join(r.query_kinds),
                     r.purpose, r.epsilon, r.max_queries, _day(r.expires_at),
                     r.status + (f" by {r.revoked_by}" if r.revoked_by else ""),
                     f"{r.granted_by} (#{r.entry})")
                    for r in d.rights
                ),
                whole=["grant"],
            )  # fmt: skip
        for missing, why in sorted(register.not_verified.items()):
            err_console.print(
                f"[yellow]{escape(missing)} not in the register[/]: {escape(why)}", soft_wrap=True
            )
    if register.not_verified:
        sys.exit(EXIT_INCOMPLETE)
