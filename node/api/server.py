"""The node's gRPC server: mutual TLS only, auth interceptor, health checking and reflection.

A node whose own log check found its log broken (``govshare.node.audit.selfcheck``) still listens:
it answers the Audit service (read-only) and refuses the rest, which health reports as
``NOT_SERVING``; it neither publishes checkpoints nor witnesses other nodes'.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from govshare.node.api.aggregate_service import AggregateService
from govshare.node.api.auth import AuthInterceptor
from govshare.node.api.services import AuditService, CatalogService, PeerService, QueryService
from govshare.node.audit.auditlog import SelfCheck
from govshare.node.audit.selfcheck import SERVED_WHEN_BROKEN
from govshare.node.config import DEFAULT_MAX_WORKERS, NodeConfig
from govshare.node.node import Node
from govshare.protocols.errors import Unavailable
from govshare.rpc.tls import CHANNEL_OPTIONS, server_credentials
from govshare.v1 import (
    aggregate_pb2,
    aggregate_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

T = TypeVar("T")

SERVICE_NAMES = (
    catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].full_name,
    peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
    aggregate_pb2.DESCRIPTOR.services_by_name["Aggregate"].full_name,
)


class RunningNode:
    """A started server on its own event loop thread, with its health servicer; stoppable once.

    The server is ``grpc.aio``: every RPC is a coroutine on one event loop, so a call waiting
    for a peer holds no thread. Store and log calls run on the loop's default executor
    (``max_workers`` threads), query runs on the admission gate's threads
    (``govshare.node.queries.capacity``) and the cryptography in the node's process pool.
    """

    def __init__(
        self,
        node: Node,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        server: grpc.aio.Server,
        port: int,
        health_servicer: Any,
    ) -> None:
        self.node = node
        self.loop = loop
        self.thread = thread
        self.server = server
        self.port = port
        self.health = health_servicer
        self._stopped = False

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the server's loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float) -> None:
        """Stop within about ``grace`` seconds: refuse new calls, end the queries running here
        (each fails with nothing released and its reservation returned), let other in-flight
        calls finish, then cancel what is left."""
        if self._stopped:
            return
        self._stopped = True
        self.call(self._stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        node = self.node
        reason = f"node {node.name} is stopping"
        node.gate.close(reason)
        await asyncio.to_thread(node.queries.interrupt_all, reason)
        await asyncio.to_thread(node.gate.drain, grace)
        await stopping


def create_server(
    node: Node,
    address: str,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    on_log_check: Callable[[SelfCheck], None] | None = None,
) -> RunningNode:
    """Start a node's server on ``address`` (``host:0`` picks a free port).

    If the node checked only its log's tail at start, the whole log is checked in the background
    and ``on_log_check`` gets that verdict; damage found there makes the node refuse from then on.
    """
    loop = asyncio.new_event_loop()
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"govshare-{node.name}")
    )
    thread = threading.Thread(
        target=loop.run_forever, name=f"govshare-{node.name}-loop", daemon=True
    )
    thread.start()
    try:
        server, port, health_servicer = asyncio.run_coroutine_threadsafe(
            _start(node, address), loop
        ).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise
    running = RunningNode(node, loop, thread, server, port, health_servicer)

    def refuse() -> None:
        async def not_serving() -> None:
            for name in SERVICE_NAMES:
                if name not in SERVED_WHEN_BROKEN:
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        running.call(not_serving())
        node.publisher.stop()

    def on_whole_check(verdict: SelfCheck) -> None:
        if verdict.damage is not None:
            refuse()
        if on_log_check is not None:
            on_log_check(verdict)

    if node.log_check.refusal() is not None:
        refuse()
    else:
        node.publisher.start()
        node.log_check.start_background(on_whole_check)
    return running


async def _start(node: Node, address: str) -> tuple[grpc.aio.Server, int, Any]:
    interceptor = AuthInterceptor(
        node.roster,
        audit=node.audit,
        refusal=node.log_check.refusal,
        served_when_refusing=SERVED_WHEN_BROKEN,
        executor=node.control,
    )
    server = grpc.aio.server(interceptors=[interceptor], options=list(CHANNEL_OPTIONS))
    catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogService(node), server)
    peer_pb2_grpc.add_PeerServicer_to_server(PeerService(node), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditService(node), server)
    query_pb2_grpc.add_QueryServicer_to_server(QueryService(node), server)
    aggregate_pb2_grpc.add_AggregateServicer_to_server(AggregateService(node), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_secure_port(address, server_credentials(node.identity))
    except RuntimeError as exc:
        raise Unavailable(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise Unavailable(f"cannot listen on {address}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def serve(config: NodeConfig, *, ready: threading.Event | None = None) -> None:
    """Run the node until SIGTERM or SIGINT, then stop gracefully.

    Prints the node's address, then the verdict of its log check at start (and, for a log
    checked in the background, that verdict when it comes).
    """
    node = Node.from_config(config)
    started = threading.Event()

    def on_log_check(verdict: SelfCheck) -> None:
        started.wait(timeout=10)  # after the start-up lines
        print(node.log_check.line(verdict), flush=True)

    running = create_server(
        node, config.listen, max_workers=config.max_workers, on_log_check=on_log_check
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(
            f"node {node.name} serving on {config.listen} (port {running.port}, mutual TLS)",
            flush=True,
        )
        if node.log_check.at_start is not None:
            print(node.log_check.line(node.log_check.at_start), flush=True)
        started.set()
        if ready is not None:
            ready.set()
        stop.wait()
        print(f"node {node.name} stopping", flush=True)
        running.stop(config.grace_seconds)
        node.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"node {node.name} stopped", flush=True)
