"""The node's gRPC server: mutual TLS only, auth interceptor, health checking and reflection."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from govshare.node.aggregate_service import AggregatePeerService, AggregateService
from govshare.node.auth import AuthInterceptor
from govshare.node.config import DEFAULT_MAX_WORKERS, NodeConfig
from govshare.node.node import Node
from govshare.node.services import AuditService, CatalogService, PeerService, QueryService
from govshare.node.tls import CHANNEL_OPTIONS, server_credentials
from govshare.protocols.errors import Unavailable
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

SERVICE_NAMES = (
    catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].full_name,
    peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
    aggregate_pb2.DESCRIPTOR.services_by_name["Aggregate"].full_name,
    aggregate_pb2.DESCRIPTOR.services_by_name["AggregatePeer"].full_name,
)


class RunningNode:
    """A started server with its health servicer, stoppable once."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer):
        self.server = server
        self.port = port
        self.health = health_servicer

    def stop(self, grace: float) -> None:
        """Stop taking calls, let in-flight ones finish for ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(
    node: Node, address: str, *, max_workers: int = DEFAULT_MAX_WORKERS
) -> RunningNode:
    """Start a node's server on ``address`` (``host:0`` picks a free port)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"govshare-{node.name}"),
        interceptors=[AuthInterceptor(node.roster, audit=node.audit)],
        options=list(CHANNEL_OPTIONS),
    )
    catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogService(node), server)
    peer_pb2_grpc.add_PeerServicer_to_server(PeerService(node), server)
    audit_pb2_grpc.add_AuditServicer_to_server(AuditService(node), server)
    query_pb2_grpc.add_QueryServicer_to_server(QueryService(node), server)
    aggregate_pb2_grpc.add_AggregateServicer_to_server(AggregateService(node), server)
    aggregate_pb2_grpc.add_AggregatePeerServicer_to_server(AggregatePeerService(node), server)
    health_servicer = health.HealthServicer()
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
    server.start()
    node.publisher.start()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningNode(server, port, health_servicer)


def serve(config: NodeConfig, *, ready: threading.Event | None = None) -> None:
    """Run the node until SIGTERM or SIGINT, then stop gracefully."""
    node = Node.from_config(config)
    running = create_server(node, config.listen, max_workers=config.max_workers)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(
            f"node {node.name} serving on {config.listen} (port {running.port}, mutual TLS)",
            flush=True,
        )
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
