"""``--identity`` for the operator's commands: the named person who signs an act.

Every command that changes a node (``dataset add|replace|remove|approvers|freeze|unfreeze``,
``grant add|revoke|approve|refuse``, ``approvals approve|deny``, ``crossborder approve|revoke``,
``node freeze|unfreeze``, ``node alerts clear``) is signed by the operator's key from their
identity bundle (``govshare federation enrol --role operator ... --out DIR``). ``--identity``
takes that folder, or a name looked up as ``HOME/operators/NAME``; without it,
``$GOVSHARE_OPERATOR``. Without a usable operator bundle the command still reaches the node's
façade, which refuses the act and logs the refusal (``operator.identity``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from govshare.model.governance import Role
from govshare.model.identity import Identity
from govshare.model.operator_act import ActSigner, NoSigner
from govshare.protocols.errors import GovshareError

# For annotations only: the façade is imported where it is called (see cli/main.py).
if TYPE_CHECKING:
    from govshare.node.operator import Operator

F = TypeVar("F", bound=Callable[..., Any])

OPERATOR_ENV = "GOVSHARE_OPERATOR"
OPERATORS_FOLDER = "operators"


def operator_option(func: F) -> F:
    """``--identity``: the operator's bundle folder or name (default ``$GOVSHARE_OPERATOR``)."""
    return click.option(
        "--identity",
        "operator_identity",
        default=lambda: os.environ.get(OPERATOR_ENV) or None,
        show_default=f"${OPERATOR_ENV}",
        help="Your operator identity bundle (a folder, or NAME for HOME/operators/NAME): "
        "the act is signed by you and logged with your name.",
    )(func)


def signer_for(home: Path, identity: str | None) -> ActSigner | NoSigner:
    """The person's signer from their bundle, or why there is none."""
    if not identity:
        return NoSigner(f"no --identity given and ${OPERATOR_ENV} is not set")
    folder = Path(identity)
    if not folder.is_dir() and (home / OPERATORS_FOLDER / identity).is_dir():
        folder = home / OPERATORS_FOLDER / identity
    claimed = folder.name
    try:
        me = Identity.load_as(folder, Role.OPERATOR)
    except GovshareError as exc:
        return NoSigner(str(exc), claimed=claimed)
    return ActSigner(me.name, me.signing_key)


def operator_for(home: Path, identity: str | None) -> Operator:
    """The node's façade, opened for the person ``identity`` names."""
    from govshare.node.operator import Operator

    return Operator(home, signer=signer_for(home, identity))
