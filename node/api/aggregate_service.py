"""gRPC servicers of joint aggregates: decode, call the node's aggregate engine, encode.

``Aggregate`` is the analyst's service (role mapping in ``govshare.node.api.auth``); the nodes'
messages travel on ``Peer.Deliver`` like every query kind's. Errors are govshare errors, mapped
to status codes by the auth interceptor.
"""

from __future__ import annotations

import asyncio

from govshare.model.epsilon import format_epsilon
from govshare.node.api.auth import current_caller
from govshare.node.api.services import Context, admitted, require_query_id
from govshare.node.node import Node
from govshare.node.queries.kinds.aggregate import SignedKey
from govshare.v1 import aggregate_pb2, aggregate_pb2_grpc


class AggregateService(aggregate_pb2_grpc.AggregateServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def Prepare(
        self, request: aggregate_pb2.PrepareRequest, context: Context
    ) -> aggregate_pb2.EphemeralKey:
        query_id = require_query_id(request.query_id)
        key = await asyncio.to_thread(self._node.aggregates.prepare, current_caller(), query_id)
        return aggregate_pb2.EphemeralKey(
            node=key.node, public_key=key.public_key, signature=key.signature
        )

    async def Run(
        self, request: aggregate_pb2.AggregateRunRequest, context: Context
    ) -> aggregate_pb2.AggregateResult:
        query_id = require_query_id(request.query_id)
        keys = [SignedKey(k.node, k.public_key, k.signature) for k in request.keys]
        caller, aggregates = current_caller(), self._node.aggregates
        release = await admitted(
            self._node,
            context,
            query_id,
            lambda: aggregates.run(
                caller, query_id, keys=keys, public_context=request.public_context
            ),
        )
        return aggregate_pb2.AggregateResult(
            ciphertexts=release.ciphertexts,
            min_group_size=release.min_group_size,
            grant_id=release.grant_id,
            epsilon_spent=format_epsilon(release.epsilon_spent),
            epsilon_remaining=format_epsilon(release.epsilon_remaining),
            column_scales=release.column_scales,
        )
