"""Authentication and role checks for every RPC, in one server interceptor.

The caller's identity comes from the TLS-verified client certificate (``x509_pem_cert`` in the
call's auth context), never from a request field. The certificate must be the one the signed
roster lists for that member; its role decides which services it may call. Methods not listed
in the access table are refused (default deny).

The interceptor also turns govshare errors raised by servicers into gRPC status codes
(``govshare.rpc.status``) and records every call — accepted, refused or failed — in the
node's audit log when one is attached.

A node whose own log check found it broken (``govshare.node.audit.selfcheck``) answers every call
outside ``SERVED_WHEN_BROKEN`` with ``FAILED_PRECONDITION`` and its one-line refusal, after
authenticating the caller, and records nothing: its log is sealed.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from govshare.model.governance import Role
from govshare.model.identity import CertIdentity, Member, Roster
from govshare.node.audit.sink import AuditSink
from govshare.protocols.errors import GovshareError, MalformedInput, NotFound
from govshare.rpc.status import status_for

ANY_MEMBER = frozenset(Role)

# Which roles may call which service (full service names).
SERVICE_ROLES: Mapping[str, frozenset[Role]] = {
    "govshare.v1.Catalog": frozenset({Role.ANALYST, Role.NODE}),
    "govshare.v1.Peer": frozenset({Role.NODE}),
    "govshare.v1.Audit": frozenset({Role.AUDITOR}),
    "govshare.v1.Query": frozenset({Role.ANALYST}),
    "govshare.v1.Aggregate": frozenset({Role.ANALYST}),
    "govshare.v1.AggregatePeer": frozenset({Role.NODE}),
    "grpc.health.v1.Health": ANY_MEMBER,
    "grpc.reflection.v1alpha.ServerReflection": ANY_MEMBER,
    "grpc.reflection.v1.ServerReflection": ANY_MEMBER,
}


@dataclass(frozen=True)
class Caller:
    """A verified caller: the roster member behind the client certificate."""

    member: Member

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def role(self) -> Role:
        return self.member.role

    @property
    def jurisdiction(self) -> str:
        return self.member.jurisdiction


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("govshare_caller")


def current_caller() -> Caller:
    """The verified caller of the RPC being served (set by :class:`AuthInterceptor`)."""
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError("current_caller() outside an authenticated RPC") from None


def authenticate(auth_context: Mapping[str, Any], roster: Roster) -> Caller:
    """Map a call's TLS auth context to a roster member.

    Raises:
        MalformedInput: no client certificate in the context.
        NotFound: the certificate's holder is not (or no longer) the roster's member.
    """
    certs = auth_context.get("x509_pem_cert") or []
    if not certs:
        raise MalformedInput("no client certificate")
    who = CertIdentity.from_pem(certs[0])
    member = roster.member(who.name)
    if member.tls_fingerprint != who.fingerprint or member.role is not who.role:
        raise NotFound(f"certificate of {who.name!r} is not the one the roster lists")
    return member_caller(member)


def member_caller(member: Member) -> Caller:
    return Caller(member)


def _service_of(method: str) -> str:
    # "/govshare.v1.Catalog/ListDatasets" -> "govshare.v1.Catalog"
    return method.lstrip("/").split("/", 1)[0]


def _digest(message: Any) -> str:
    serialize = getattr(message, "SerializeToString", None)
    if serialize is None:
        return ""
    return hashlib.sha256(serialize(deterministic=True)).hexdigest()


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; its type stubs are.
    _Interceptor = grpc.ServerInterceptor


class AuthInterceptor(_Interceptor):
    def __init__(
        self,
        roster: Callable[[], Roster],
        *,
        audit: AuditSink | None = None,
        service_roles: Mapping[str, frozenset[Role]] = SERVICE_ROLES,
        refusal: Callable[[], str | None] = lambda: None,
        served_when_refusing: frozenset[str] = frozenset(),
    ) -> None:
        """``refusal`` returns the node's one-line refusal while it refuses to serve (its log is
        broken), else None; ``served_when_refusing`` are the services it still answers then."""
        self._roster = roster
        self._audit = audit
        self._service_roles = service_roles
        self._refusal = refusal
        self._served_when_refusing = served_when_refusing

    def _record(self, kind: str, fields: Mapping[str, object], actor: str) -> None:
        # A refusing node's log is sealed: nothing more is appended to it.
        if self._audit is not None and self._refusal() is None:
            self._audit.record(kind, fields, actor=actor)

    def _admit(self, context: grpc.ServicerContext, method: str, request: Any) -> Caller:
        try:
            caller = authenticate(context.auth_context(), self._roster())
        except GovshareError as exc:
            self._record("rpc.refused", {"method": method, "reason": str(exc)}, "unknown")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"not a federation member: {exc}")
            raise  # unreachable: abort raises
        service = _service_of(method)
        allowed = self._service_roles.get(service, frozenset())
        if caller.role not in allowed:
            message = f"role {caller.role.value} may not call {method}"
            self._record("rpc.refused", {"method": method, "reason": message}, caller.name)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        refusal = self._refusal()
        if refusal is not None and service not in self._served_when_refusing:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        self._record("rpc.received", {"method": method, "request": _digest(request)}, caller.name)
        return caller

    def _fail(
        self, context: grpc.ServicerContext, method: str, caller: Caller, exc: Exception
    ) -> None:
        if isinstance(exc, GovshareError):
            code = status_for(exc)
            self._record(
                "rpc.failed", {"method": method, "code": code.name, "reason": str(exc)}, caller.name
            )
            context.abort(code, str(exc))
        raise exc

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        # (behaviour, handler factory, response streams, request is one message to digest)
        kinds: tuple[tuple[Any, Any, bool, bool], ...] = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False, True),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True, True),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False, False),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True, False),
        )
        for behaviour, make, streams, single in kinds:
            if behaviour is not None:
                wrap = self._streaming if streams else self._unary
                return make(  # type: ignore[no-any-return]
                    wrap(method, behaviour, single),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        return handler

    def _unary(self, method: str, behaviour: Any, single: bool) -> Any:
        """Wrap a call with one response: admit, run as the caller, map errors."""

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            caller = self._admit(context, method, request if single else None)
            token = _CALLER.set(caller)
            try:
                return behaviour(request, context)
            except Exception as exc:
                self._fail(context, method, caller, exc)
            finally:
                _CALLER.reset(token)

        return call

    def _streaming(self, method: str, behaviour: Any, single: bool) -> Any:
        """Wrap a call with streamed responses; the caller is set while the stream runs."""

        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = self._admit(context, method, request if single else None)
            token = _CALLER.set(caller)
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                self._fail(context, method, caller, exc)
            finally:
                _CALLER.reset(token)

        return call
