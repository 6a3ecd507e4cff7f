"""gRPC servicers: decode the request, call the node, encode the reply.

Errors are raised as govshare errors and mapped to status codes by the auth interceptor.
"""

from __future__ import annotations

import re

import grpc

from govshare.node.auth import current_caller
from govshare.node.convert import dataset_to_proto
from govshare.node.node import Node
from govshare.protocols.errors import MalformedInput
from govshare.v1 import catalog_pb2, catalog_pb2_grpc, peer_pb2, peer_pb2_grpc

DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def require_dataset_name(value: str, field: str = "name") -> str:
    if not value:
        raise MalformedInput(f"field {field!r} is required", field=field)
    if not DATASET_NAME.match(value):
        raise MalformedInput(
            f"field {field!r}: {value[:64]!r} is not a dataset name (a-z, 0-9, '_')", field=field
        )
    return value


class CatalogService(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    def ListDatasets(
        self, request: catalog_pb2.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.ListDatasetsResponse:
        datasets = self._node.list_datasets(current_caller())
        return catalog_pb2.ListDatasetsResponse(
            datasets=[dataset_to_proto(self._node.name, d) for d in datasets]
        )

    def DescribeDataset(
        self, request: catalog_pb2.DescribeDatasetRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.Dataset:
        name = require_dataset_name(request.name)
        return dataset_to_proto(
            self._node.name, self._node.describe_dataset(current_caller(), name)
        )


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    def Ping(
        self, request: peer_pb2.PingRequest, context: grpc.ServicerContext
    ) -> peer_pb2.PingResponse:
        identity = self._node.identity
        return peer_pb2.PingResponse(
            node=identity.name,
            jurisdiction=identity.jurisdiction,
            roster_version=identity.roster.version,
        )
