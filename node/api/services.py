"""gRPC servicers: decode the request, call the node, encode the reply.

The servicers are coroutines on the node's ``grpc.aio`` event loop; they never block it.
Catalogue, audit, status and peer-control calls run on the node's control threads
(:func:`control`), submissions, cancellations and peer messages on the loop's executor threads
(``asyncio.to_thread``; both carry the verified caller), query runs through the admission gate
to its query threads (:func:`admitted`). A peer's streamed message is taken off the wire on the
loop before the engine checks it.
Errors are raised as govshare errors and mapped to statuses by the auth interceptor.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from govshare.model.epsilon import format_epsilon
from govshare.node.api.auth import current_caller
from govshare.node.node import PSI_CHUNK_POINTS, Node
from govshare.node.policy.applications import Application
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
    rights_pb2,
    rights_pb2_grpc,
)

T = TypeVar("T")

Context = grpc.aio.ServicerContext[Any, Any]

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


async def control(node: Node, function: Callable[..., T], *args: Any) -> T:
    """Run a catalogue, audit, status or peer-control call on the node's control threads, with
    the call's context (the verified caller): such calls never queue behind submissions."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(node.control, functools.partial(context.run, function, *args))


async def admitted(node: Node, context: Context, query_id: str, body: Callable[[], T]) -> T:
    """Run a query's part through the node's admission gate (``govshare.node.queries.capacity``):
    a place at once or ResourceExhausted (also when the call's deadline would pass first), then
    the body on a query thread of its own. If the caller goes away (its deadline passed, it
    hung up), the part ends: withdrawn from the queue, or ended at its next wait, nothing
    released."""
    enter = node.gate.admit(query_id, deadline=context.time_remaining())
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(node.gate.threads, enter, body)
    except asyncio.CancelledError:
        reason = "the analyst's call ended before the query did"
        node.gate.withdraw(query_id, reason)
        node.queries.interrupt(query_id, reason)
        raise


class CatalogService(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def ListDatasets(
        self, request: catalog_pb2.ListDatasetsRequest, context: Context
    ) -> catalog_pb2.ListDatasetsResponse:
        return await control(self._node, self._list)

    def _list(self) -> catalog_pb2.ListDatasetsResponse:
        node = self._node
        datasets = node.list_datasets(current_caller())
        return catalog_pb2.ListDatasetsResponse(
            datasets=[
                dataset_to_proto(
                    node.name,
                    d,
                    crossborder=node.crossborder_in_force(d.name),
                    scales=node.column_scales(d.name),
                )
                for d in datasets
            ]
        )

    async def DescribeDataset(
        self, request: catalog_pb2.DescribeDatasetRequest, context: Context
    ) -> catalog_pb2.Dataset:
        name = require_dataset_name(request.name)
        return await control(self._node, self._describe, name)

    def _describe(self, name: str) -> catalog_pb2.Dataset:
        caller = current_caller()
        dataset = self._node.describe_dataset(caller, name)
        return dataset_to_proto(
            self._node.name, dataset, crossborder=self._node.crossborder_in_force(name),
            ledger=self._node.ledger(caller.name, name), scales=self._node.column_scales(name),
        )  # fmt: skip


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def Ping(self, request: peer_pb2.PingRequest, context: Context) -> peer_pb2.PingResponse:
        identity = self._node.identity
        roster = await control(self._node, self._node.roster)
        return peer_pb2.PingResponse(
            node=identity.name, jurisdiction=identity.jurisdiction, roster_version=roster.version
        )

    async def Witness(
        self, request: peer_pb2.WitnessRequest, context: Context
    ) -> peer_pb2.WitnessResponse:
        line, held = await control(
            self._node,
            self._node.witness_checkpoint,
            current_caller(), request.note, request.old_size, list(request.consistency_proof),
        )  # fmt: skip
        return peer_pb2.WitnessResponse(cosignature=line, witness_size=held)

    async def Deliver(
        self, request_iterator: AsyncIterator[peer_pb2.PeerMessage], context: Context
    ) -> peer_pb2.PeerAck:
        """One protocol message of any query kind, taken off the wire here, then handed to the
        kind that holds the query (its checks run on an executor thread)."""
        caller, queries = current_caller(), self._node.queries
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise MalformedInput("empty stream: no message", field="query_id")
        query_id, phase = require_query_id(first.query_id), first.phase
        if first.WhichOneof("body") == "abort":
            await asyncio.to_thread(queries.abort, caller, query_id)
            return peer_pb2.PeerAck(received=0)
        chunks = [_chunk(first, query_id, phase)]
        chunks.extend([_chunk(m, query_id, phase) async for m in request_iterator])
        received = await asyncio.to_thread(queries.deliver, caller, query_id, phase, iter(chunks))
        return peer_pb2.PeerAck(received=received)


def _chunk(
    message: peer_pb2.PeerMessage, query_id: str, phase: str
) -> tuple[int, bytes, list[bytes]]:
    """One chunk of a message; every chunk of a stream names the same query and phase."""
    if (message.query_id, message.phase) != (query_id, phase):
        raise MalformedInput("one stream carries one message of one query", field="phase")
    if message.WhichOneof("body") != "chunk":
        raise MalformedInput("a message carries chunks, or one abort notice", field="chunk")
    return message.chunk.total, message.chunk.points, list(message.chunk.items)


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

    async def Submit(
        self, request: query_pb2.SubmitRequest, context: Context
    ) -> query_pb2.QueryStatus:
        if not request.signed_request:
            raise MalformedInput("field 'signed_request' is required", field="signed_request")
        queries = self._node.queries
        with self._node.intake.place():
            record = await asyncio.to_thread(
                queries.submit, current_caller(), request.signed_request
            )
        return _status(record)

    async def Status(
        self, request: query_pb2.QueryStatusRequest, context: Context
    ) -> query_pb2.QueryStatus:
        query_id = require_query_id(request.query_id)
        queries = self._node.queries
        return _status(await control(self._node, queries.status, current_caller(), query_id))

    async def Run(
        self, request: query_pb2.RunRequest, context: Context
    ) -> AsyncIterator[query_pb2.ResultChunk]:
        query_id = require_query_id(request.query_id)
        caller, psi = current_caller(), self._node.psi
        release = await admitted(self._node, context, query_id, lambda: psi.run(caller, query_id))
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

    async def Cancel(
        self, request: query_pb2.CancelRequest, context: Context
    ) -> query_pb2.QueryStatus:
        query_id = require_query_id(request.query_id)
        caller, queries = current_caller(), self._node.queries
        record = await asyncio.to_thread(queries.cancel, caller, query_id)
        # A run of it still queued for a turn leaves now, not when its turn comes.
        self._node.gate.withdraw(query_id, f"the analyst {caller.name} withdrew the query")
        return _status(record)

    async def Receipt(
        self, request: query_pb2.ReceiptRequest, context: Context
    ) -> query_pb2.ReceiptPart:
        query_id = require_query_id(request.query_id)
        index, entry, proof, checkpoint = await control(
            self._node, self._node.queries.receipt, current_caller(), query_id
        )
        return query_pb2.ReceiptPart(
            node=self._node.name, index=index, entry=entry, proof=proof, checkpoint=checkpoint
        )


class AuditService(audit_pb2_grpc.AuditServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: Context
    ) -> audit_pb2.Checkpoint:
        return audit_pb2.Checkpoint(note=await control(self._node, self._node.latest_checkpoint))

    async def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: Context
    ) -> AsyncIterator[audit_pb2.GetEntriesResponse]:
        pages = self._node.entry_pages(request.start, request.end)
        while (page := await control(self._node, next, pages, None)) is not None:
            yield audit_pb2.GetEntriesResponse(
                entries=[audit_pb2.Entry(index=e.index, data=e.data) for e in page]
            )

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: Context
    ) -> audit_pb2.Proof:
        hashes = await control(
            self._node, self._node.inclusion_proof, request.index, request.tree_size
        )
        return audit_pb2.Proof(hashes=hashes)

    async def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: Context
    ) -> audit_pb2.Proof:
        hashes = await control(
            self._node, self._node.consistency_proof, request.old_size, request.new_size
        )
        return audit_pb2.Proof(hashes=hashes)

    async def GetQueryEntries(
        self, request: audit_pb2.QueryEntriesRequest, context: Context
    ) -> audit_pb2.GetEntriesResponse:
        entries = await control(self._node, self._node.query_entries, request.query_id)
        return audit_pb2.GetEntriesResponse(
            entries=[audit_pb2.Entry(index=e.index, data=e.data) for e in entries]
        )


class RightsService(rights_pb2_grpc.RightsServicer):
    """Access applications and the rights an analyst holds (govshare.node.policy.applications)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def Apply(
        self, request: rights_pb2.ApplyRequest, context: Context
    ) -> rights_pb2.Application:
        if not request.signed_request:
            raise MalformedInput("field 'signed_request' is required", field="signed_request")
        node = self._node
        application = await asyncio.to_thread(node.apply, current_caller(), request.signed_request)
        return application_to_proto(node.name, application)

    async def Mine(
        self, request: rights_pb2.MineRequest, context: Context
    ) -> rights_pb2.MineResponse:
        node = self._node
        applications, grants = await control(node, node.rights_of, current_caller())
        return rights_pb2.MineResponse(
            applications=[application_to_proto(node.name, a) for a in applications],
            grants=[
                rights_pb2.HeldGrant(
                    grant_id=g.grant_id, node=node.name, dataset=g.dataset,
                    columns=list(g.columns), query_kinds=[k.value for k in g.query_kinds],
                    purpose=g.purpose, epsilon=format_epsilon(g.epsilon),
                    max_queries=g.max_queries, expires_at=g.expires_at, status=status,
                    granted_by=g.granted_by,
                )
                for g, status in grants
            ],
        )  # fmt: skip


def application_to_proto(node: str, a: Application) -> rights_pb2.Application:
    return rights_pb2.Application(
        request_id=a.request_id, node=node, dataset=a.dataset, columns=list(a.columns),
        query_kinds=list(a.query_kinds), purpose=a.purpose, legal_basis=a.legal_basis,
        received_at=a.received_at, deadline_at=a.deadline_at, state=a.state,
        answered_by=a.answered_by, answered_at=a.answered_at or 0, reason=a.reason,
        grant_id=a.grant_id,
    )  # fmt: skip
