"""gRPC servicers: decode the request, call the node, encode the reply.

Errors are raised as govshare errors and mapped to status codes by the auth interceptor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc

from govshare.node.api.auth import current_caller
from govshare.node.node import PSI_CHUNK_POINTS, Node
from govshare.node.stores.query_store import QueryRecord
from govshare.protocols.errors import MalformedInput
from govshare.rpc.convert import dataset_to_proto
from govshare.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
QUERY_ID = re.compile(r"^[0-9a-f]{32}$")


def require_query_id(value: str) -> str:
    if not QUERY_ID.match(value):
        raise MalformedInput("field 'query_id' must be 32 hex digits", field="query_id")
    return value


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
        node = self._node
        datasets = node.list_datasets(current_caller())
        return catalog_pb2.ListDatasetsResponse(
            datasets=[
                dataset_to_proto(node.name, d, crossborder=node.crossborder_in_force(d.name))
                for d in datasets
            ]
        )

    def DescribeDataset(
        self, request: catalog_pb2.DescribeDatasetRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.Dataset:
        name = require_dataset_name(request.name)
        caller = current_caller()
        dataset = self._node.describe_dataset(caller, name)
        return dataset_to_proto(
            self._node.name, dataset, crossborder=self._node.crossborder_in_force(name),
            ledger=self._node.ledger(caller.name, name),
        )  # fmt: skip


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
            roster_version=self._node.roster().version,
        )

    def Witness(
        self, request: peer_pb2.WitnessRequest, context: grpc.ServicerContext
    ) -> peer_pb2.WitnessResponse:
        line, held = self._node.witness_checkpoint(
            current_caller(), request.note, request.old_size, list(request.consistency_proof)
        )
        return peer_pb2.WitnessResponse(cosignature=line, witness_size=held)

    def PsiSend(
        self, request_iterator: Iterator[peer_pb2.PsiChunk], context: grpc.ServicerContext
    ) -> peer_pb2.PsiAck:
        chunks = (
            (require_query_id(c.query_id), c.phase, c.total, c.points) for c in request_iterator
        )
        return peer_pb2.PsiAck(received=self._node.queries.receive(current_caller(), chunks))


def _status(record: QueryRecord) -> query_pb2.QueryStatus:
    return query_pb2.QueryStatus(
        query_id=record.query_id,
        state=record.state,
        rule=record.rule,
        message=record.message,
        dataset=record.dataset,
    )


class QueryService(query_pb2_grpc.QueryServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    def Submit(
        self, request: query_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> query_pb2.QueryStatus:
        if not request.signed_request:
            raise MalformedInput("field 'signed_request' is required", field="signed_request")
        return _status(self._node.queries.submit(current_caller(), request.signed_request))

    def Status(
        self, request: query_pb2.QueryStatusRequest, context: grpc.ServicerContext
    ) -> query_pb2.QueryStatus:
        query_id = require_query_id(request.query_id)
        return _status(self._node.queries.status(current_caller(), query_id))

    def Run(
        self, request: query_pb2.RunRequest, context: grpc.ServicerContext
    ) -> Iterator[query_pb2.ResultChunk]:
        query_id = require_query_id(request.query_id)
        release = self._node.queries.run(current_caller(), query_id)
        total = len(release.points)
        if release.records:
            for start in range(0, len(release.records), PSI_CHUNK_POINTS):
                yield query_pb2.ResultChunk(
                    records=release.records[start : start + PSI_CHUNK_POINTS],
                    total=len(release.records),
                )
            return
        for start in range(0, max(total, 1), PSI_CHUNK_POINTS):
            yield query_pb2.ResultChunk(
                points=b"".join(release.points[start : start + PSI_CHUNK_POINTS]),
                total=total,
                matched=release.matched,
            )

    def Cancel(
        self, request: query_pb2.CancelRequest, context: grpc.ServicerContext
    ) -> query_pb2.QueryStatus:
        query_id = require_query_id(request.query_id)
        return _status(self._node.queries.cancel(current_caller(), query_id))

    def Receipt(
        self, request: query_pb2.ReceiptRequest, context: grpc.ServicerContext
    ) -> query_pb2.ReceiptPart:
        query_id = require_query_id(request.query_id)
        index, entry, proof, checkpoint = self._node.queries.receipt(current_caller(), query_id)
        return query_pb2.ReceiptPart(
            node=self._node.name, index=index, entry=entry, proof=proof, checkpoint=checkpoint
        )


class AuditService(audit_pb2_grpc.AuditServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> audit_pb2.Checkpoint:
        return audit_pb2.Checkpoint(note=self._node.latest_checkpoint())

    def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext
    ) -> Iterator[audit_pb2.GetEntriesResponse]:
        for page in self._node.entry_pages(request.start, request.end):
            yield audit_pb2.GetEntriesResponse(
                entries=[audit_pb2.Entry(index=e.index, data=e.data) for e in page]
            )

    def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.Proof:
        return audit_pb2.Proof(hashes=self._node.inclusion_proof(request.index, request.tree_size))

    def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.Proof:
        return audit_pb2.Proof(
            hashes=self._node.consistency_proof(request.old_size, request.new_size)
        )

    def GetQueryEntries(
        self, request: audit_pb2.QueryEntriesRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetEntriesResponse:
        entries = self._node.query_entries(request.query_id)
        return audit_pb2.GetEntriesResponse(
            entries=[audit_pb2.Entry(index=e.index, data=e.data) for e in entries]
        )
