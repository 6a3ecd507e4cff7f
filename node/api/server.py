"""The node's gRPC server: mutual TLS only, auth interceptor, health checking and reflection.

A node whose own log check found its log broken (``govshare.node.audit.selfcheck``) still listens:
it answers the Audit service (read-only) and refuses the rest, which health reports as
``NOT_SERVING``; it neither publishes checkpoints nor witnesses other nodes'.

Beside the gRPC server, outside the audit log (``govshare.node.observability``): the node's
query events go to its JSON logs, its metrics count them and every RPC, and, when the node's
config sets an address, plain HTTP serves ``/metrics`` and ``/healthz`` without a certificate.
"""

from __future__ import annotations

import asyncio
import logging
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
from govshare.node.api.services import (
    AuditService,
    CatalogService,
    PeerService,
    QueryService,
    RightsService,
)
from govshare.node.audit.auditlog import SelfCheck
from govshare.node.audit.selfcheck import SERVED_WHEN_BROKEN
from govshare.node.config import DEFAULT_MAX_WORKERS, NodeConfig
from govshare.node.node import Node
from govshare.node.observability.endpoint import ServiceEndpoint
from govshare.node.observability.logs import JsonLogs, level_of, log_query_event, say
from govshare.node.observability.metrics import NodeMetrics
from govshare.node.observability.rpc_metrics import RpcMetricsInterceptor
from govshare.node.shutdown import SERVER_MARGIN, STEP_SECONDS, joined, lingering
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
    rights_pb2,
    rights_pb2_grpc,
)

T = TypeVar("T")

_log = logging.getLogger("govshare.node")

# Seconds between two looks at whether SIGTERM or SIGINT came. Python runs a signal's handler in
# the main thread once that thread runs again; the kernel may deliver the signal to any of the
# node's threads, and then a main thread blocked in an untimed wait is never woken: the node
# went on serving after SIGTERM (seen on a node whose query thread was in a TLS handshake).
SIGNAL_POLL = 0.5

SERVICE_NAMES = (
    catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].full_name,
    peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
    aggregate_pb2.DESCRIPTOR.services_by_name["Aggregate"].full_name,
    rights_pb2.DESCRIPTOR.services_by_name["Rights"].full_name,
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
        *,
        metrics: NodeMetrics | None = None,
        endpoint: ServiceEndpoint | None = None,
        unsubscribe: tuple[Callable[[], None], ...] = (),
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.node = node
        self.loop = loop
        self.thread = thread
        self.server = server
        self.port = port
        self.health = health_servicer
        # The node's own metrics registry, and the HTTP /metrics and /healthz endpoint if any.
        self.metrics = metrics
        self.endpoint = endpoint
        self._unsubscribe = unsubscribe
        # The loop's default executor (store and log calls), shut down with the server.
        self.executor = executor
        self.stopping = False
        self._stopped = False

    def refusal(self) -> str | None:
        """Why the node does not serve now (its log is broken, it is stopping), else None."""
        if self.stopping:
            return f"node {self.node.name} is stopping"
        return self.node.log_check.refusal()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the server's loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float) -> list[str]:
        """Stop within ``grace`` + :data:`~govshare.node.shutdown.SERVER_MARGIN` +
        :data:`~govshare.node.shutdown.STEP_SECONDS` seconds: refuse new calls, end the queries
        running here (each fails with nothing released and its reservation returned), let other
        in-flight calls finish, then cancel what is left. Returns what was abandoned: a stop
        that did not complete in time, calls whose threads still run (they do not hold the
        loop: their results go nowhere)."""
        if self._stopped:
            return []
        self._stopped = True
        self.stopping = True
        abandoned: list[str] = []
        bound = grace + SERVER_MARGIN
        try:
            self.call(self._stop(grace), timeout=bound)
        except TimeoutError:
            abandoned.append(f"the server's stop (not done after {bound:g} s)")
        self.loop.call_soon_threadsafe(self.loop.stop)
        if joined({"loop": self.thread}, STEP_SECONDS):
            abandoned.append(f"the server's event loop (still running after {STEP_SECONDS:g} s)")
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.endpoint is not None:
            self.endpoint.stop()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        return abandoned

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
    metrics_address: str | None = None,
) -> RunningNode:
    """Start a node's server on ``address`` (``host:0`` picks a free port).

    If the node checked only its log's tail at start, the whole log is checked in the background
    and ``on_log_check`` gets that verdict; damage found there makes the node refuse from then on.
    The node's query events are logged and counted in its own metrics registry; with
    ``metrics_address`` (``host:port``, port 0 picks one) plain HTTP serves ``/metrics`` and
    ``/healthz`` there.

    Raises:
        Unavailable: an address cannot be bound.
    """
    metrics = NodeMetrics(load=node.gate.load, serving=lambda: node.log_check.refusal() is None)
    endpoint: ServiceEndpoint | None = None
    state: list[RunningNode] = []  # the running node, once there is one
    if metrics_address is not None:
        endpoint = ServiceEndpoint(
            metrics_address,
            metrics=metrics.exposition,
            refusal=lambda: state[0].refusal() if state else "the node is starting",
        ).start()
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix=f"govshare-{node.name}"
    )
    loop.set_default_executor(executor)
    thread = threading.Thread(
        target=loop.run_forever, name=f"govshare-{node.name}-loop", daemon=True
    )
    thread.start()
    try:
        server, port, health_servicer = asyncio.run_coroutine_threadsafe(
            _start(node, address, rpc_count=metrics.rpc), loop
        ).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        if endpoint is not None:
            endpoint.stop()
        raise
    subscriptions = (node.events.subscribe(metrics.observe), node.events.subscribe(log_query_event))
    running = RunningNode(
        node, loop, thread, server, port, health_servicer,
        metrics=metrics, endpoint=endpoint, unsubscribe=subscriptions, executor=executor,
    )  # fmt: skip
    state.append(running)

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


async def _start(
    node: Node, address: str, *, rpc_count: Callable[[str, str], None]
) -> tuple[grpc.aio.Server, int, Any]:
    interceptor = AuthInterceptor(
        node.roster,
        audit=node.audit,
        refusal=node.log_check.refusal,
        served_when_refusing=SERVED_WHEN_BROKEN,
        executor=node.control,
    )
    # The RPC counter is outermost: it counts the calls the auth interceptor refuses too.
    server = grpc.aio.server(
        interceptors=[RpcMetricsInterceptor(rpc_count), interceptor],
        options=list(CHANNEL_OPTIONS),
    )
    catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogService(node), server)
    peer_pb2_grpc.add_PeerServicer_to_server(PeerService(node), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditService(node), server)
    query_pb2_grpc.add_QueryServicer_to_server(QueryService(node), server)
    rights_pb2_grpc.add_RightsServicer_to_server(RightsService(node), server)
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


def serve(config: NodeConfig, *, ready: threading.Event | None = None) -> list[str]:
    """Run the node until SIGTERM or SIGINT, then stop gracefully, within a bounded time
    (``govshare.node.shutdown``); what had to be abandoned is printed and logged in one line.

    Returns the threads still running at the end, which would hold the interpreter's exit: the
    caller ends the process without waiting for them (the stores, audit log included, are
    closed by then).

    Prints the node's address, then the verdict of its log check at start (and, for a log
    checked in the background, that verdict when it comes). Its JSON logs
    (``[observability] log``) start after those lines, so where stdout and stderr share a pipe
    the first lines are still the human ones.
    """
    logs = JsonLogs(config.log_file, level=level_of(config.log_level)).attach()
    try:
        node = Node.from_config(config)
    except BaseException:
        logs.discard()  # the CLI prints the one-line error
        raise
    started = threading.Event()

    def on_log_check(verdict: SelfCheck) -> None:
        started.wait(timeout=10)  # after the start-up lines
        line = node.log_check.line(verdict)
        print(line, flush=True)
        _log.log(
            logging.INFO if verdict.damage is None else logging.ERROR, "%s", line,
            extra={"event": "node.log_check", "fields": {"node": node.name, "whole": True,
                                                         "ok": verdict.damage is None}},
        )  # fmt: skip

    try:
        running = create_server(
            node, config.listen, max_workers=config.max_workers, on_log_check=on_log_check,
            metrics_address=config.metrics_address,
        )  # fmt: skip
    except BaseException:
        logs.discard()
        raise
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    fields: dict[str, object] = {"node": node.name}
    try:
        print(
            f"node {node.name} serving on {config.listen} (port {running.port}, mutual TLS)",
            flush=True,
        )
        if node.log_check.at_start is not None:
            print(node.log_check.line(node.log_check.at_start), flush=True)
        started.set()
        logs.start()
        refusal = node.log_check.refusal()
        endpoint = running.endpoint
        at_start = node.log_check.at_start
        serving = {
            **fields,
            "listen": config.listen,
            "port": running.port,
            "metrics": None if endpoint is None else f"{endpoint.host}:{endpoint.port}",
            "log_check": None if at_start is None else node.log_check.line(at_start),
            "refusal": refusal,
        }
        _log.log(
            logging.INFO if refusal is None else logging.ERROR,
            "node %s serving on %s", node.name, config.listen,
            extra={"event": "node.serving", "fields": serving},
        )  # fmt: skip
        if ready is not None:
            ready.set()
        while not stop.wait(SIGNAL_POLL):
            pass  # the handler of a signal delivered to another thread runs here
        say(f"node {node.name} stopping")
        _log.info(
            "node %s stopping", node.name,
            extra={"event": "node.stopping", "fields": {**fields, "grace": config.grace_seconds}},
        )  # fmt: skip
        abandoned = running.stop(config.grace_seconds)
        abandoned += node.close()
        left = lingering()
        abandoned += [f"thread {name}" for name in left]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if abandoned:
        line = f"node {node.name} stopped without waiting for: {'; '.join(abandoned)}"
        say(line)
        _log.warning(
            "%s",
            line,
            extra={"event": "node.abandoned", "fields": {**fields, "abandoned": abandoned}},
        )
    say(f"node {node.name} stopped")
    _log.info("node %s stopped", node.name, extra={"event": "node.stopped", "fields": fields})
    logs.close()
    return left
