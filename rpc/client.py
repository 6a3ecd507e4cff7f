"""Clients of a node's services, used by analysts, auditors and peer nodes.

Every call goes over a mutual-TLS channel to the address the roster lists, with a deadline;
a failed call becomes a govshare error whose message names the node, rebuilt from the status's
ErrorInfo (``govshare.rpc.status``): a node's refusal arrives as ``PolicyRefused`` with its rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc

from govshare.model.crossborder import CatalogEntry
from govshare.model.governance import DatasetInfo, Role
from govshare.model.identity import Identity, Member
from govshare.protocols.errors import GovshareError
from govshare.rpc.convert import catalog_entry_from_proto, dataset_from_proto
from govshare.rpc.status import error_from_call
from govshare.rpc.tls import secure_channel
from govshare.v1 import (
    aggregate_pb2,
    aggregate_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    rights_pb2,
    rights_pb2_grpc,
)

# Seconds a catalogue or control call may take before the node counts as unreachable.
DEFAULT_TIMEOUT = 10.0
# Bytes of points and ciphertexts per Peer.Deliver chunk (under the message limit).
MESSAGE_CHUNK_BYTES = 1 << 20

T = TypeVar("T")


class NodeClient:
    """A connection from ``identity`` to the node ``member``."""

    def __init__(self, identity: Identity, member: Member, *, timeout: float = DEFAULT_TIMEOUT):
        self.identity = identity
        self.member = member
        self.timeout = timeout
        self.channel = secure_channel(identity, member)
        self._catalog = catalog_pb2_grpc.CatalogStub(self.channel)
        self._peer = peer_pb2_grpc.PeerStub(self.channel)
        self._query = query_pb2_grpc.QueryStub(self.channel)
        self._aggregate = aggregate_pb2_grpc.AggregateStub(self.channel)
        self._rights = rights_pb2_grpc.RightsStub(self.channel)

    @classmethod
    def to(cls, identity: Identity, node: str, *, timeout: float = DEFAULT_TIMEOUT) -> NodeClient:
        return cls(identity, identity.roster.member(node), timeout=timeout)

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Callable[[], T]) -> T:
        """Run one stub call, turning a gRPC failure into a govshare error naming the node."""
        try:
            return method()
        except grpc.RpcError as exc:
            raise error_from_call(exc, prefix=f"node {self.member.name}: ") from None

    def list_datasets(self) -> list[DatasetInfo]:
        reply = self.call(
            lambda: self._catalog.ListDatasets(
                catalog_pb2.ListDatasetsRequest(), timeout=self.timeout
            )
        )
        return [dataset_from_proto(d) for d in reply.datasets]

    def describe_dataset(self, name: str) -> DatasetInfo:
        reply = self.call(
            lambda: self._catalog.DescribeDataset(
                catalog_pb2.DescribeDatasetRequest(name=name), timeout=self.timeout
            )
        )
        return dataset_from_proto(reply)

    def catalog_entry(self, name: str) -> CatalogEntry:
        """The dataset's metadata with the cross-border assessments in force at the node."""
        reply = self.call(
            lambda: self._catalog.DescribeDataset(
                catalog_pb2.DescribeDatasetRequest(name=name), timeout=self.timeout
            )
        )
        return catalog_entry_from_proto(reply)

    def ping(self) -> peer_pb2.PingResponse:
        return self.call(
            lambda: self._peer.Ping(
                peer_pb2.PingRequest(roster_version=self.identity.roster.version),
                timeout=self.timeout,
            )
        )

    def witness(self, note: bytes, old_size: int, proof: list[bytes]) -> peer_pb2.WitnessResponse:
        return self.call(
            lambda: self._peer.Witness(
                peer_pb2.WitnessRequest(note=note, old_size=old_size, consistency_proof=proof),
                timeout=self.timeout,
            )
        )

    def deliver(
        self, query_id: str, phase: str, points: Sequence[bytes], items: Sequence[bytes] = ()
    ) -> int:
        """Stream one protocol message (points and/or items) to the node; return its count."""
        chunks = message_chunks(query_id, phase, points, items)
        reply = self.call(lambda: self._peer.Deliver(chunks, timeout=self.timeout))
        return reply.received

    def abort(self, query_id: str) -> None:
        """Tell the node this node's part of ``query_id`` ended: it stops waiting for it."""
        notice = peer_pb2.PeerMessage(query_id=query_id, abort=peer_pb2.Abort())
        self.call(lambda: self._peer.Deliver(iter([notice]), timeout=self.timeout))

    def aggregate_prepare(self, query_id: str) -> aggregate_pb2.EphemeralKey:
        return self.call(
            lambda: self._aggregate.Prepare(
                aggregate_pb2.PrepareRequest(query_id=query_id), timeout=self.timeout
            )
        )

    def aggregate_run(
        self,
        query_id: str,
        *,
        keys: list[aggregate_pb2.EphemeralKey] | None = None,
        public_context: bytes = b"",
        timeout: float,
    ) -> aggregate_pb2.AggregateResult:
        request = aggregate_pb2.AggregateRunRequest(
            query_id=query_id, keys=keys or [], public_context=public_context
        )
        return self.call(lambda: self._aggregate.Run(request, timeout=timeout))

    # --- analyst: joint queries -------------------------------------------------------------

    def submit(self, signed_request: bytes) -> query_pb2.QueryStatus:
        return self.call(
            lambda: self._query.Submit(
                query_pb2.SubmitRequest(signed_request=signed_request), timeout=self.timeout
            )
        )

    def status(self, query_id: str) -> query_pb2.QueryStatus:
        return self.call(
            lambda: self._query.Status(
                query_pb2.QueryStatusRequest(query_id=query_id), timeout=self.timeout
            )
        )

    def run(self, query_id: str, *, timeout: float) -> list[query_pb2.ResultChunk]:
        """Run this node's part of an approved query and collect its whole output."""
        return self.call(
            lambda: list(self._query.Run(query_pb2.RunRequest(query_id=query_id), timeout=timeout))
        )

    def cancel(self, query_id: str) -> query_pb2.QueryStatus:
        return self.call(
            lambda: self._query.Cancel(
                query_pb2.CancelRequest(query_id=query_id), timeout=self.timeout
            )
        )

    # --- analyst: use rights ----------------------------------------------------------------

    def apply(self, signed_request: bytes) -> rights_pb2.Application:
        """Send a signed access application (govshare.node.policy.applications)."""
        return self.call(
            lambda: self._rights.Apply(
                rights_pb2.ApplyRequest(signed_request=signed_request), timeout=self.timeout
            )
        )

    def mine(self) -> rights_pb2.MineResponse:
        """The caller's applications at this node and the grants it holds there."""
        return self.call(lambda: self._rights.Mine(rights_pb2.MineRequest(), timeout=self.timeout))

    def receipt(self, query_id: str) -> query_pb2.ReceiptPart:
        return self.call(
            lambda: self._query.Receipt(
                query_pb2.ReceiptRequest(query_id=query_id), timeout=self.timeout
            )
        )


@dataclass(frozen=True)
class NodeCatalogue:
    """One node's answer to a catalogue request: its datasets, or why it could not answer."""

    node: str
    datasets: tuple[DatasetInfo, ...] = ()
    error: str | None = None


def federation_catalog(
    identity: Identity, *, timeout: float = DEFAULT_TIMEOUT
) -> list[NodeCatalogue]:
    """Ask every node in the roster for its catalogue, in parallel.

    An unreachable or failing node is reported in its entry, never fatal to the others.
    """
    nodes = identity.roster.with_role(Role.NODE)

    def ask(member: Member) -> NodeCatalogue:
        try:
            with NodeClient(identity, member, timeout=timeout) as client:
                return NodeCatalogue(member.name, tuple(client.list_datasets()))
        except GovshareError as exc:
            return NodeCatalogue(member.name, error=str(exc))

    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as pool:
        return list(pool.map(ask, nodes))


def message_chunks(
    query_id: str, phase: str, points: Sequence[bytes], items: Sequence[bytes] = ()
) -> Iterator[peer_pb2.PeerMessage]:
    """One protocol message as ``Peer.Deliver`` chunks of about :data:`MESSAGE_CHUNK_BYTES`.

    When there are as many items as points (an item per point: a Paillier pair), each chunk
    carries points with their own items; otherwise (points alone, items alone, or a batch of
    keys beside the few BFV ciphertexts that hold their values) the points go first, then the
    items, each in runs that fill a chunk. (Pairing them by position there put two points in a
    chunk beside items of hundreds of kB: 2,048 chunks for a batch of 4,096 keys, about 0.3 s
    of CPU on each side, where two chunks take 5 ms.) Every chunk names the message's total
    count, ``max(len(points), len(items))``; an empty message is one empty chunk.
    """
    total = max(len(points), len(items))
    widest = max((len(i) for i in items), default=0)

    def chunk(chunk_points: Sequence[bytes], chunk_items: Sequence[bytes]) -> peer_pb2.PeerMessage:
        body = peer_pb2.Chunk(total=total, points=b"".join(chunk_points), items=list(chunk_items))
        return peer_pb2.PeerMessage(query_id=query_id, phase=phase, chunk=body)

    if not points or not items or len(points) == len(items):
        per = max(1, MESSAGE_CHUNK_BYTES // max((32 if points else 0) + widest, 1))
        for start in range(0, max(total, 1), per):
            yield chunk(points[start : start + per], items[start : start + per])
        return
    per = MESSAGE_CHUNK_BYTES // 32
    for start in range(0, len(points), per):
        yield chunk(points[start : start + per], ())
    per = max(1, MESSAGE_CHUNK_BYTES // max(widest, 1))
    for start in range(0, len(items), per):
        yield chunk((), items[start : start + per])
