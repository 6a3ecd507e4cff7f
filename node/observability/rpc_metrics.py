"""Counting every RPC by method and status code: a ``grpc.aio`` server interceptor.

It is the server's outermost interceptor, so it sees the calls the auth interceptor
(``govshare.node.api.auth``) refuses as well as those it admits, with the code each ended with.
It reads no request and writes nothing to the audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not generic; its type stubs are.
    _Interceptor = grpc.aio.ServerInterceptor

Count = Callable[[str, str], None]
"""``count(method, code)``: one RPC of ``method`` ended with status ``code`` (e.g. ``OK``)."""


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    if error is not None:
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


class RpcMetricsInterceptor(_Interceptor):
    """Calls ``count(method, code)`` once per RPC, however it ends."""

    def __init__(self, count: Count) -> None:
        self._count = count

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
        kinds: tuple[tuple[Any, Any, bool], ...] = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True),
        )
        for behaviour, make, streams in kinds:
            if behaviour is not None:
                wrap = self._streaming if streams else self._unary
                return make(  # type: ignore[no-any-return]
                    wrap(method, behaviour),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        return handler

    def _unary(self, method: str, behaviour: Any) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            error: BaseException | None = None
            try:
                result = behaviour(request, context)
                return await result if asyncio.iscoroutine(result) else result
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._count(method, _code(context, error))

        return call

    def _streaming(self, method: str, behaviour: Any) -> Any:
        async def call(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            error: BaseException | None = None
            try:
                responses = behaviour(request, context)
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:
                    for response in responses:
                        yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._count(method, _code(context, error))

        return call
