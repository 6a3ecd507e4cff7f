"""``govshare dataset approvers|freeze|unfreeze``: the operator's controls over one dataset.

Kept apart from ``cli/dataset.py`` (registration and imports) and attached to its group by
``cli/main.py``. Each is a signed act of the operator named by ``--identity``
(``govshare.cli.operator_identity``).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from govshare.cli.common import console, emit_json, home_option, json_option
from govshare.cli.dataset import group
from govshare.cli.operator_identity import operator_for, operator_option


@group.command("approvers")
@home_option
@click.argument("name")
@click.argument("count", type=int)
@operator_option
@json_option
def approvers(
    home: Path, name: str, count: int, operator_identity: str | None, as_json: bool
) -> None:
    """Require COUNT different operators to approve each query on dataset NAME that waits for
    approval (1 to 5; on important data none of them may be the grant's issuer)."""
    operator_for(home, operator_identity).set_approvers(name, count)
    if as_json:
        emit_json({"dataset": name, "approvers": count})
        return
    console.print(f"dataset [bold]{name}[/]: {count} different approver(s) per query")


@group.command("freeze")
@home_option
@click.argument("name")
@click.option("--reason", required=True, help="Why (logged with your name).")
@operator_option
@json_option
def freeze(
    home: Path, name: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Stop every query on dataset NAME at once (rule dataset.frozen), those waiting for
    approval or to run included, until 'dataset unfreeze'."""
    held, stopped = operator_for(home, operator_identity).freeze(name, reason=reason)
    if as_json:
        emit_json({**held.to_json(), "stopped": stopped})
        return
    console.print(
        f"dataset [bold]{escape(name)}[/] frozen by {escape(held.frozen_by)}: "
        f"{escape(held.reason)}; {len(stopped)} waiting quer{'y' if len(stopped) == 1 else 'ies'}"
        " refused"
    )


@group.command("unfreeze")
@home_option
@click.argument("name")
@click.option("--reason", required=True, help="Why the dataset may be queried again (logged).")
@operator_option
@json_option
def unfreeze(
    home: Path, name: str, reason: str, operator_identity: str | None, as_json: bool
) -> None:
    """Let queries on dataset NAME be admitted again."""
    held = operator_for(home, operator_identity).unfreeze(name, reason=reason)
    if as_json:
        emit_json({"unfrozen": name, "was": held.to_json(), "reason": reason.strip()})
        return
    console.print(f"dataset [bold]{escape(name)}[/] unfrozen (frozen by {escape(held.frozen_by)})")
