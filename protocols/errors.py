"""govshare's one error hierarchy.

Every layer raises these; the gRPC layer maps them to status codes in one place
(``govshare.rpc.status``) and the CLI turns them into a one-line message and exit code 1.

- ``TypeError`` (builtin) stays for API misuse by a programmer.
- :class:`MalformedInput` for bad encodings, files and requests. Parsers turn ``ValueError``,
  ``struct.error``, ``binascii.Error`` and protobuf ``DecodeError`` into it.
- :class:`VerificationFailed` for failed cryptographic checks. Detail-free on purpose, like
  pyca/cryptography's ``InvalidSignature``: callers must not learn *why* a MAC or signature failed.
- :class:`PolicyRefused` names the governance rule that refused. It is a kind of
  :class:`PermissionDenied`, so a caller that only cares that it was refused catches that.
- :class:`ResourceExhausted` says the receiver is too busy now and when to try again.
"""

from __future__ import annotations

import math


class GovshareError(Exception):
    """Base of every error govshare raises on purpose."""


class MalformedInput(GovshareError):
    """An encoding, file, message or argument is not well formed.

    ``field`` names what was wrong (a message field, a CSV row, a config key) when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class VerificationFailed(GovshareError):
    """A signature, proof, MAC or consistency check failed."""


class NotFound(GovshareError):
    """A named dataset, member, grant, entry or query does not exist."""


class AlreadyExists(GovshareError):
    """Creating something that already exists (a dataset name, a member name)."""


class PermissionDenied(GovshareError):
    """The caller's role or identity may not perform this operation."""


class PolicyRefused(PermissionDenied):
    """The governance policy refused a request; ``rule`` names the rule that refused.

    ``text`` replaces the default one-line text ``refused by rule {rule}: {message}``: a client
    relaying a node's refusal keeps the node's words and says which node refused.
    """

    def __init__(self, rule: str, message: str, *, text: str | None = None) -> None:
        super().__init__(f"refused by rule {rule}: {message}" if text is None else text)
        self.rule = rule
        self.reason = message


class Conflict(GovshareError):
    """The request disagrees with state the receiver holds (a witness's last cosigned size,
    a rolled-back or forked log); the message says what the receiver holds."""


class Unavailable(GovshareError):
    """A peer could not be reached or vanished mid-protocol."""


class Aborted(GovshareError):
    """A multi-party protocol run was abandoned; nothing was released."""


class ResourceExhausted(GovshareError):
    """The receiver is too busy to take the request now; try again after ``retry_after`` seconds.

    Raises:
        TypeError: ``retry_after`` is negative, infinite or not a number.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        if not (isinstance(retry_after, int | float) and math.isfinite(retry_after)):
            raise TypeError(f"retry_after must be a finite number of seconds, not {retry_after!r}")
        if retry_after < 0:
            raise TypeError(f"retry_after must not be negative, not {retry_after!r}")
        self.retry_after = float(retry_after)
