"""Signed operator acts: what a named operator (a person) asks a node to do, signed by them.

An operator is a federation member of role ``operator`` bound to one node and a set of duties
(``govshare federation enrol --role operator --name zhang-wei --node tax --duties
register,grant,approve``). Every act that changes a node — registering a dataset, issuing or
revoking a grant, approving a query, freezing the node — is signed by that person over a
canonical encoding, like the analyst's signed request (``govshare.protocols.signed_request``),
verified by the node code that performs it against the roster (the person's key, node and
duties), and kept in the node's audit log as an ``operator.act`` entry, so that the log names
who did what and the person cannot later deny it (谁主管谁负责).

Encoding: ``DOMAIN`` followed by the canonical JSON (``govshare.protocols.canonical``) of::

    {"v": 1, "operator": NAME, "node": NODE, "action": ACTION, "body": {...},
     "nonce": 32 hex digits, "issued_at": unix s, "expires_at": unix s}

and the act travels as ``{"act": <that object>, "signature": <hex Ed25519>}`` (canonical JSON).
The domain tag keeps an act's signature from verifying as a request, grant or checkpoint.

What it proves: the holder of the operator's signing key asked this node to perform exactly
this action with this body, at most once (the node keeps the nonces), before ``expires_at``.
What it does not prove: that the person read what they signed; the CLI prints the act's body.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import SigningKey, VerifyKey

DOMAIN = b"govshare/operator-act/v1\n"
ENCODING_VERSION = 1
NONCE_BYTES = 16
# An act is signed by the CLI the moment before the node performs it; a few minutes cover a
# slow import, and the window bounds how long a nonce must be remembered.
DEFAULT_LIFETIME_SECONDS = 600
MAX_LIFETIME_SECONDS = 3600
CLOCK_SKEW_SECONDS = 300
# An act body is a handful of parameters, never data.
MAX_ACT_BYTES = 64 * 1024


class Duty(StrEnum):
    """What an operator may do at their node (the roster lists each operator's duties)."""

    REGISTER = "register"  # dataset add, replace, remove, approvers; responsible person
    GRANT = "grant"  # grant add, revoke; answer access applications
    APPROVE = "approve"  # approve or deny queries waiting for approval
    CROSSBORDER = "crossborder"  # cross-border assessment records
    INCIDENT = "incident"  # node and dataset freeze, unfreeze; clear suspensions


def parse_duties(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Duties from ``register,grant`` (or a list), sorted and unique.

    Raises:
        MalformedInput: empty, or a duty that does not exist.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = sorted({p.strip() for p in parts if p.strip()})
    if not names:
        raise MalformedInput("an operator needs at least one duty", field="duties")
    known = {d.value for d in Duty}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MalformedInput(
            f"unknown duties {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            field="duties",
        )
    return tuple(names)


@dataclass(frozen=True)
class OperatorAct:
    operator: str
    node: str
    action: str
    body: Mapping[str, Any]
    nonce: bytes
    issued_at: int
    expires_at: int
    signature: bytes

    def signed_object(self) -> dict[str, Any]:
        return {
            "v": ENCODING_VERSION,
            "operator": self.operator,
            "node": self.node,
            "action": self.action,
            "body": dict(self.body),
            "nonce": self.nonce.hex(),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    def signed_bytes(self) -> bytes:
        return DOMAIN + canonical_json(self.signed_object())

    def encode(self) -> bytes:
        return canonical_json({"act": self.signed_object(), "signature": self.signature.hex()})

    @classmethod
    def decode(cls, data: bytes) -> OperatorAct:
        """Strictly parse an encoded act.

        Raises:
            MalformedInput: not an act, or not in its canonical form.
        """
        if len(data) > MAX_ACT_BYTES:
            raise MalformedInput("operator act is too large", field="act")
        try:
            envelope = json.loads(data)
            raw = envelope["act"]
            act = cls(
                operator=str(raw["operator"]),
                node=str(raw["node"]),
                action=str(raw["action"]),
                body=dict(raw["body"]),
                nonce=bytes.fromhex(raw["nonce"]),
                issued_at=int(raw["issued_at"]),
                expires_at=int(raw["expires_at"]),
                signature=bytes.fromhex(envelope["signature"]),
            )
            if raw.get("v") != ENCODING_VERSION or len(act.nonce) != NONCE_BYTES:
                raise ValueError("version or nonce")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise MalformedInput(f"not an operator act: {exc}", field="act") from None
        if act.encode() != data:
            raise MalformedInput("operator act is not in canonical form", field="act")
        return act

    def to_json(self) -> dict[str, Any]:
        return {"act": self.signed_object(), "signature": self.signature.hex()}


def sign_act(
    key: SigningKey,
    *,
    operator: str,
    node: str,
    action: str,
    body: Mapping[str, Any],
    now: int,
    lifetime: int = DEFAULT_LIFETIME_SECONDS,
    nonce: bytes | None = None,
) -> OperatorAct:
    """Sign an act; ``nonce`` defaults to fresh random bytes.

    Raises:
        TypeError: a lifetime out of range, a nonce of the wrong length, or a body that has
            no canonical JSON (a float).
    """
    if not 0 < lifetime <= MAX_LIFETIME_SECONDS:
        raise TypeError(f"lifetime must be in (0, {MAX_LIFETIME_SECONDS}] seconds")
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise TypeError("nonce must be 16 bytes")
    unsigned = OperatorAct(operator, node, action, dict(body), nonce, now, now + lifetime, b"")
    signature = key.sign(unsigned.signed_bytes())
    return OperatorAct(operator, node, action, dict(body), nonce, now, now + lifetime, signature)


def verify_act(act: OperatorAct, public_key: VerifyKey, *, now: int) -> None:
    """Check the signature and the validity window.

    Raises:
        VerificationFailed: the signature is not the key holder's over these bytes.
        MalformedInput: expired, not yet valid, or valid for longer than a node accepts.
    """
    try:
        public_key.verify(act.signature, act.signed_bytes())
    except (VerificationFailed, TypeError):
        raise VerificationFailed("operator act signature does not verify") from None
    if act.expires_at - act.issued_at > MAX_LIFETIME_SECONDS:
        raise MalformedInput("operator act lifetime exceeds one hour", field="expires_at")
    if act.issued_at > now + CLOCK_SKEW_SECONDS:
        raise MalformedInput("operator act is issued in the future", field="issued_at")
    if now >= act.expires_at:
        raise MalformedInput("operator act has expired", field="expires_at")


@dataclass(frozen=True)
class ActSigner:
    """A person's key, ready to sign acts for one node (the CLI builds it from their bundle)."""

    operator: str
    key: SigningKey

    def sign(self, *, node: str, action: str, body: Mapping[str, Any], now: int) -> OperatorAct:
        return sign_act(self.key, operator=self.operator, node=node, action=action, body=body,
                        now=now)  # fmt: skip


@dataclass(frozen=True)
class NoSigner:
    """No usable operator identity: why not (the node refuses the act and logs the refusal)."""

    reason: str
    claimed: str = ""
