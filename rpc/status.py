"""The one place where govshare errors become gRPC status codes, and back.

Status messages carry the error's own one-line text, which never includes a secret-dependent
value (``VerificationFailed`` is detail-free by construction).
"""

from __future__ import annotations

import grpc

from govshare.protocols.errors import (
    Aborted,
    AlreadyExists,
    Conflict,
    GovshareError,
    MalformedInput,
    NotFound,
    PermissionDenied,
    PolicyRefused,
    Unavailable,
    VerificationFailed,
)

_TO_STATUS: tuple[tuple[type[GovshareError], grpc.StatusCode], ...] = (
    (MalformedInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (PolicyRefused, grpc.StatusCode.PERMISSION_DENIED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (VerificationFailed, grpc.StatusCode.UNAUTHENTICATED),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Aborted, grpc.StatusCode.ABORTED),
)


def status_for(error: GovshareError) -> grpc.StatusCode:
    for kind, code in _TO_STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> GovshareError:
    """The govshare error a client raises for a failed call."""
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
    return GovshareError(message)
