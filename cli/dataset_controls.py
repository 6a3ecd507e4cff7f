"""``govshare dataset approvers``: the operator's controls over one dataset.

Kept apart from ``cli/dataset.py`` (registration and imports) and attached to its group by
``cli/main.py``. Each is a signed act of the operator named by ``--identity``
(``govshare.cli.operator_identity``).
"""

from __future__ import annotations

from pathlib import Path

import click

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
