"""The node's check of a signed operator act (``govshare.model.operator_act``), before it acts.

:func:`authorise` is called by the node code that performs an operator's act
(``govshare.node.operator``), with the action and the parameters it is about to perform. It
accepts the act only if all of these hold, in this order, and otherwise refuses it naming the
rule, logs the refusal (``operator.refused``, with the act when there is one) and raises
:class:`PolicyRefused`:

``operator.identity``
    there is an act at all (the CLI found a valid operator bundle); it is for this node and says
    exactly the action and parameters performed; its signer is a roster member of role
    ``operator`` bound to this node; the signature verifies under the roster's key; it is within
    its validity window; its nonce was never used here (a replayed act is refused).
``operator.duty``
    the roster lists the duty the action needs among the person's duties.

An accepted act is performed with the person as the actor of its entries, then logged as
``operator.act`` (the whole signed act, its action and the person), right after them. The
node's key still signs the log's checkpoints: the log says who acted, the node vouches for it.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from govshare.model.governance import Role
from govshare.model.identity import Roster
from govshare.model.operator_act import NoSigner, OperatorAct, verify_act
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.sqlite import immediate, opened
from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import (
    GovshareError,
    NotFound,
    PolicyRefused,
)

OPERATOR_IDENTITY = "operator.identity"
OPERATOR_DUTY = "operator.duty"
OPERATOR_ACT = "operator.act"
OPERATOR_REFUSED = "operator.refused"
# The actor of a refusal when nobody could be named.
UNKNOWN_OPERATOR = "operator:unknown"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operator_nonces (
    operator   TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (operator, nonce)
) WITHOUT ROWID;
"""


class Signer(Protocol):
    """Whatever signs an act for the node (the CLI's :class:`ActSigner` from a person's
    bundle)."""

    def sign(self, *, node: str, action: str, body: Mapping[str, Any], now: int) -> OperatorAct: ...


def act_digest(act: OperatorAct) -> str:
    return hashlib.sha256(act.encode()).hexdigest()


class _RefusalError(Exception):
    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def _remember(path: Path, act: OperatorAct, now: int) -> None:
    with opened(path) as conn:
        conn.executescript(_SCHEMA)
        with immediate(conn):
            conn.execute("DELETE FROM operator_nonces WHERE expires_at < ?", (now,))
            try:
                conn.execute(
                    "INSERT INTO operator_nonces (operator, nonce, expires_at) VALUES (?, ?, ?)",
                    (act.operator, act.nonce, act.expires_at),
                )
            except sqlite3.IntegrityError:
                raise _RefusalError(
                    OPERATOR_IDENTITY, "this act was used before (replay)"
                ) from None


def _check(
    act: OperatorAct, *, node: str, action: str, body: Mapping[str, Any], duty: str,
    roster: Roster, now: int,
) -> None:  # fmt: skip
    if act.node != node:
        raise _RefusalError(OPERATOR_IDENTITY, f"the act is for node {act.node!r}, not {node!r}")
    if act.action != action or canonical_json(dict(act.body)) != canonical_json(dict(body)):
        raise _RefusalError(OPERATOR_IDENTITY, f"the act does not sign this {action}")
    try:
        member = roster.member(act.operator)
    except NotFound:
        raise _RefusalError(OPERATOR_IDENTITY, f"{act.operator!r} is not in the roster") from None
    if member.role is not Role.OPERATOR or member.node != node:
        raise _RefusalError(OPERATOR_IDENTITY, f"{act.operator!r} is not an operator of {node}")
    try:
        verify_act(act, member.verify_key(), now=now)
    except GovshareError as exc:
        raise _RefusalError(OPERATOR_IDENTITY, f"{act.operator}'s act: {exc}") from None
    if duty not in member.duties:
        raise _RefusalError(
            OPERATOR_DUTY,
            f"{act.operator} has no duty {duty!r} at {node} (duties: {', '.join(member.duties)})",
        )


@dataclass(frozen=True)
class VerifiedAct:
    """An act that passed :func:`authorise`; :meth:`record` logs it once it was performed."""

    act: OperatorAct
    duty: str

    @property
    def operator(self) -> str:
        return self.act.operator

    def record(self, audit: AuditSink) -> int:
        """Log the act (``operator.act``), after the entries of what it did."""
        return audit.record(
            OPERATOR_ACT,
            {
                "action": self.act.action,
                "operator": self.act.operator,
                "duty": self.duty,
                "act": self.act.encode(),
                "act_digest": act_digest(self.act),
            },
            actor=self.act.operator,
        )


def authorise(
    signer: Signer | NoSigner | None,
    *,
    node: str,
    action: str,
    duty: str,
    body: Mapping[str, Any],
    roster: Roster,
    audit: AuditSink,
    nonces: Path,
    now: int,
) -> VerifiedAct:
    """Have ``signer`` sign the act and check it (module docstring), before anything is done.

    The caller performs the act with the person as actor, then calls
    :meth:`VerifiedAct.record`: an act that failed on its own terms (a bad row in an import)
    leaves only the failure's trace, as before operators were named.

    Raises:
        PolicyRefused: rule ``operator.identity`` or ``operator.duty``; the refusal is logged.
    """
    act: OperatorAct | None = None
    claimed = ""
    try:
        if signer is None or isinstance(signer, NoSigner):
            reason = signer.reason if signer is not None else "no operator identity given"
            claimed = signer.claimed if signer is not None else ""
            raise _RefusalError(OPERATOR_IDENTITY, f"no valid operator identity: {reason}")
        act = signer.sign(node=node, action=action, body=body, now=now)
        claimed = act.operator
        _check(act, node=node, action=action, body=body, duty=duty, roster=roster, now=now)
        _remember(nonces, act, now)
    except _RefusalError as refusal:
        fields: dict[str, object] = {
            "action": action,
            "rule": refusal.rule,
            "reason": refusal.message,
            "claimed": claimed,
        }
        if act is not None:
            fields["act"] = act.encode()
            fields["act_digest"] = act_digest(act)
        # Nobody was verified: the claimed name is a field, never the actor.
        audit.record(OPERATOR_REFUSED, fields, actor=UNKNOWN_OPERATOR)
        raise PolicyRefused(refusal.rule, refusal.message) from None
    return VerifiedAct(act, duty)
