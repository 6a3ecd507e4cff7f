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

import asyncio
import contextvars
import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from govshare.model.governance import Role
from govshare.model.identity import CertIdentity, Member, Roster
from govshare.node.audit.sink import AuditSink
from govshare.protocols.errors import (
    Conflict,
    GovshareError,
    MalformedInput,
    NotFound,
    PermissionDenied,
    VerificationFailed,
)
from govshare.rpc.status import abort_arguments

ANY_MEMBER = frozenset(Role)

# Which roles may call which service (full service names).
SERVICE_ROLES: Mapping[str, frozenset[Role]] = {
    "govshare.v1.Catalog": frozenset({Role.ANALYST, Role.NODE}),
    "govshare.v1.Peer": frozenset({Role.NODE}),
    "govshare.v1.Audit": frozenset({Role.AUDITOR}),
    "govshare.v1.Query": frozenset({Role.ANALYST}),
    "govshare.v1.Aggregate": frozenset({Role.ANALYST}),
    "govshare.v1.Rights": frozenset({Role.ANALYST}),
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
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; its type stubs are.
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """The ``grpc.aio`` server's one interceptor: who calls, may they, and errors as statuses.

    Audit entries are written on the loop's executor threads, never on the event loop."""

    def __init__(
        self,
        roster: Callable[[], Roster],
        *,
        audit: AuditSink | None = None,
        service_roles: Mapping[str, frozenset[Role]] = SERVICE_ROLES,
        refusal: Callable[[], str | None] = lambda: None,
        served_when_refusing: frozenset[str] = frozenset(),
        executor: Executor | None = None,
    ) -> None:
        """``refusal`` returns the node's one-line refusal while it refuses to serve (its log is
        broken), else None; ``served_when_refusing`` are the services it still answers then."""
        self._roster = roster
        self._audit = audit
        self._service_roles = service_roles
        self._refusal = refusal
        self._served_when_refusing = served_when_refusing
        self._executor = executor  # where call records are written (None: the loop's default)

    async def _record(self, kind: str, fields: Mapping[str, object], actor: str) -> None:
        # A refusing node's log is sealed: nothing more is appended to it.
        audit = self._audit
        if audit is not None and self._refusal() is None:
            loop = asyncio.get_running_loop()
            record = functools.partial(audit.record, kind, fields, actor=actor)
            await loop.run_in_executor(self._executor, record)

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, request: Any
    ) -> Caller:
        try:
            caller = authenticate(context.auth_context(), self._roster())
        except GovshareError as exc:
            await self._record("rpc.refused", {"method": method, "reason": str(exc)}, "unknown")
            await context.abort(
                *abort_arguments(VerificationFailed(f"not a federation member: {exc}"))
            )
            raise  # unreachable: abort raises
        service = _service_of(method)
        allowed = self._service_roles.get(service, frozenset())
        if caller.role not in allowed:
            message = f"role {caller.role.value} may not call {method}"
            await self._record("rpc.refused", {"method": method, "reason": message}, caller.name)
            await context.abort(*abort_arguments(PermissionDenied(message)))
        refusal = self._refusal()
        if refusal is not None and service not in self._served_when_refusing:
            await context.abort(*abort_arguments(Conflict(refusal)))
        await self._record(
            "rpc.received", {"method": method, "request": _digest(request)}, caller.name
        )
        return caller

    async def _fail(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        caller: Caller,
        exc: Exception,
    ) -> None:
        if isinstance(exc, GovshareError):
            arguments = abort_arguments(exc)
            await self._record(
                "rpc.failed",
                {"method": method, "code": arguments[0].name, "reason": str(exc)},
                caller.name,
            )
            await context.abort(*arguments)
        raise exc

    async def intercept_service(  # type: ignore[override]  # None: no such method
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
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
        """Wrap a call with one response: admit, run as the caller, map errors.

        Each call is a task of its own, so the caller set here is seen by that call only
        (and by the threads it hands work to with ``asyncio.to_thread``, which copies it)."""

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller = await self._admit(context, method, request if single else None)
            _CALLER.set(caller)
            try:
                return await behaviour(request, context)
            except Exception as exc:
                await self._fail(context, method, caller, exc)

        return call

    def _streaming(self, method: str, behaviour: Any, single: bool) -> Any:
        """Wrap a call with streamed responses; the caller is set while the stream runs."""

        async def call(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            caller = await self._admit(context, method, request if single else None)
            _CALLER.set(caller)
            try:
                async for response in behaviour(request, context):
                    yield response
            except Exception as exc:
                await self._fail(context, method, caller, exc)

        return call
