"""The one place where govshare errors become gRPC statuses, and back.

A failed call carries three things: the status code, the error's own one-line text (unchanged,
what a user reads), and in its trailing metadata a ``google.rpc.Status`` (the gRPC "richer
error model", https://grpc.io/docs/guides/error/) whose ``google.rpc.ErrorInfo`` detail names
the error's kind (``reason``, UPPER_SNAKE), ``domain`` ``"govshare"`` and the error's structured
fields (``rule`` of a :class:`PolicyRefused`, ``field`` of a :class:`MalformedInput`,
``retry_after_seconds`` of a :class:`ResourceExhausted`, which also gets a
``google.rpc.RetryInfo``). A client rebuilds the error from that ErrorInfo, never by parsing the
text; from a peer that sends none (or the channel itself: a deadline, an unreachable address) it
falls back to the code and text.

Status messages and ErrorInfo carry only what the error's text already says, which never
includes a secret-dependent value (``VerificationFailed`` is detail-free by construction).

Servers::

    await context.abort(*abort_arguments(exc))                  # grpc.aio
    context.abort_with_status(abort_arguments(exc).status())    # sync: its abort() takes no
                                                                # trailing metadata
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from govshare.protocols.errors import (
    Aborted,
    AlreadyExists,
    Conflict,
    GovshareError,
    MalformedInput,
    NotFound,
    PermissionDenied,
    PolicyRefused,
    ResourceExhausted,
    Unavailable,
    VerificationFailed,
)

# ErrorInfo.domain of every govshare error: "the logical grouping to which the reason belongs"
# (google/rpc/error_details.proto); a service name is customary, one federation-wide name is ours.
DOMAIN = "govshare"

# ErrorInfo.metadata keys.
RULE = "rule"
FIELD = "field"
RETRY_AFTER_SECONDS = "retry_after_seconds"


class Reason(enum.StrEnum):
    """``ErrorInfo.reason``: what kind of error a failed call reports."""

    # One per govshare error kind.
    MALFORMED_INPUT = "MALFORMED_INPUT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    POLICY_REFUSED = "POLICY_REFUSED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    VERIFICATION_FAILED = "VERIFICATION_FAILED"
    CONFLICT = "CONFLICT"
    UNAVAILABLE = "UNAVAILABLE"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"  # a GovshareError of no more specific kind
    # The auth interceptor's own refusals (see refusal_arguments).
    NOT_A_MEMBER = "NOT_A_MEMBER"  # UNAUTHENTICATED: no roster member behind the certificate
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"  # PERMISSION_DENIED: the caller's role may not call it
    LOG_BROKEN = "LOG_BROKEN"  # FAILED_PRECONDITION: the node's log check failed; it refuses


# Most specific first: PolicyRefused is a PermissionDenied.
_KINDS: tuple[tuple[type[GovshareError], grpc.StatusCode, Reason], ...] = (
    (MalformedInput, grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED_INPUT),
    (NotFound, grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, Reason.ALREADY_EXISTS),
    (PolicyRefused, grpc.StatusCode.PERMISSION_DENIED, Reason.POLICY_REFUSED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED),
    (VerificationFailed, grpc.StatusCode.UNAUTHENTICATED, Reason.VERIFICATION_FAILED),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION, Reason.CONFLICT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, Reason.UNAVAILABLE),
    (Aborted, grpc.StatusCode.ABORTED, Reason.ABORTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RESOURCE_EXHAUSTED),
)


def _kind(error: GovshareError) -> tuple[grpc.StatusCode, Reason]:
    for kind, code, reason in _KINDS:
        if isinstance(error, kind):
            return code, reason
    return grpc.StatusCode.INTERNAL, Reason.INTERNAL


def status_for(error: GovshareError) -> grpc.StatusCode:
    """The gRPC status code of a govshare error."""
    return _kind(error)[0]


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class AbortArguments(NamedTuple):
    """What a servicer aborts a call with.

    ``await context.abort(*arguments)`` on a ``grpc.aio.ServicerContext``;
    ``context.abort_with_status(arguments.status())`` on a sync ``grpc.ServicerContext``, whose
    ``abort(code, details)`` takes no trailing metadata.
    """

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]

    def status(self) -> grpc.Status:
        """The same, as the ``grpc.Status`` that ``abort_with_status`` takes."""
        return _Status(self.code, self.details, self.trailing_metadata)


def _arguments(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str],
    *,
    retry_after: float | None = None,
) -> AbortArguments:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata))
    details: list[Message] = [info]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        detail_any = any_pb2.Any()
        detail_any.Pack(detail)
        packed.append(detail_any)
    rich = status_pb2.Status(code=code.value[0], message=message, details=packed)
    status = rpc_status.to_status(rich)
    return AbortArguments(status.code, status.details, tuple(status.trailing_metadata))


def abort_arguments(error: GovshareError) -> AbortArguments:
    """The status code, one-line message and ErrorInfo trailing metadata for ``error``."""
    code, reason = _kind(error)
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    if isinstance(error, PolicyRefused):
        metadata[RULE] = error.rule
    elif isinstance(error, MalformedInput) and error.field is not None:
        metadata[FIELD] = error.field
    elif isinstance(error, ResourceExhausted):
        retry_after = error.retry_after
        metadata[RETRY_AFTER_SECONDS] = repr(retry_after)
    return _arguments(code, str(error), reason, metadata, retry_after=retry_after)


def refusal_arguments(
    code: grpc.StatusCode,
    message: str,
    reason: Reason,
    *,
    metadata: Mapping[str, str] | None = None,
) -> AbortArguments:
    """Abort arguments for a refusal that is no govshare error (the auth interceptor's own).

    Raises:
        TypeError: ``code`` is OK (a refusal is a failure).
    """
    if code is grpc.StatusCode.OK:
        raise TypeError("a refusal cannot have status OK")
    return _arguments(code, message, reason, metadata or {})


# --- client side ----------------------------------------------------------------------------


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carries, or None (none sent, or not readable)."""
    if not isinstance(error, grpc.Call):
        return None
    try:
        rich = rpc_status.from_call(error)
    except (ValueError, DecodeError):
        # Undecodable, or its code or message disagree with the call's: trust neither.
        return None
    return rich if isinstance(rich, status_pb2.Status) else None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The govshare ErrorInfo of a failed call, or None."""
    rich = rich_status(error)
    return None if rich is None else _error_info(rich)


def _error_info(rich: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in rich.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None


def _retry_after(rich: status_pb2.Status, info: error_details_pb2.ErrorInfo) -> float | None:
    """The retry delay a ResourceExhausted carries: ErrorInfo's, else RetryInfo's."""
    try:
        seconds = float(info.metadata[RETRY_AFTER_SECONDS])
    except (KeyError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        for detail in rich.details:
            retry = error_details_pb2.RetryInfo()
            if detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
                seconds = retry.retry_delay.ToNanoseconds() / 1e9
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _from_code(code: grpc.StatusCode, message: str) -> GovshareError:
    """The govshare error a failed call stands for when it carries no ErrorInfo."""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(message)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return MalformedInput(message)
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(message)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return VerificationFailed(message)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return Conflict(message)
    if code is grpc.StatusCode.ABORTED:
        return Aborted(message)
    # RESOURCE_EXHAUSTED without a retry delay is the channel's own (a message over the size
    # limit): waiting would not help, so it is no ResourceExhausted.
    return GovshareError(message)


_PLAIN: Mapping[str, type[GovshareError]] = {
    Reason.NOT_FOUND: NotFound,
    Reason.ALREADY_EXISTS: AlreadyExists,
    Reason.PERMISSION_DENIED: PermissionDenied,
    Reason.ROLE_NOT_ALLOWED: PermissionDenied,
    Reason.VERIFICATION_FAILED: VerificationFailed,
    Reason.NOT_A_MEMBER: VerificationFailed,
    Reason.CONFLICT: Conflict,
    Reason.LOG_BROKEN: Conflict,
    Reason.UNAVAILABLE: Unavailable,
    Reason.ABORTED: Aborted,
    Reason.INTERNAL: GovshareError,
}


def error_from_call(error: grpc.RpcError, *, prefix: str = "") -> GovshareError:
    """The govshare error a client raises for a failed call.

    Rebuilt from the call's ErrorInfo (``PolicyRefused.rule``, ``MalformedInput.field``,
    ``ResourceExhausted.retry_after`` from its metadata); from the status code alone when the
    peer sent none. The message is ``prefix`` and the call's one-line status message.
    """
    if isinstance(error, grpc.Call):
        code, details = error.code(), error.details() or ""
    else:
        code, details = grpc.StatusCode.UNKNOWN, str(error)
    message = f"{prefix}{details}"
    rich = rich_status(error)
    info = None if rich is None else _error_info(rich)
    if rich is None or info is None:
        return _from_code(code, message)
    reason, metadata = info.reason, info.metadata
    if reason == Reason.POLICY_REFUSED and metadata.get(RULE):
        rule = metadata[RULE]
        said = details.removeprefix(f"refused by rule {rule}: ")
        return PolicyRefused(rule, said, text=message)
    if reason == Reason.MALFORMED_INPUT:
        return MalformedInput(message, field=metadata.get(FIELD) or None)
    if reason == Reason.RESOURCE_EXHAUSTED:
        retry_after = _retry_after(rich, info)
        if retry_after is not None:
            return ResourceExhausted(message, retry_after=retry_after)
    kind = _PLAIN.get(reason)
    return kind(message) if kind is not None else _from_code(code, message)
