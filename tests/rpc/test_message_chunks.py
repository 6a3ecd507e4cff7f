"""How one protocol message is cut into ``Peer.Deliver`` chunks (``rpc.client.message_chunks``):
about a MiB each, points beside their own items when they pair, and the whole message back
when the chunks are joined in order."""

from __future__ import annotations

import os

import pytest

from govshare.rpc.client import MESSAGE_CHUNK_BYTES, message_chunks
from govshare.v1 import peer_pb2


def _joined(chunks: list[peer_pb2.PeerMessage]) -> tuple[list[bytes], list[bytes], set[int]]:
    points: list[bytes] = []
    items: list[bytes] = []
    for message in chunks:
        packed = message.chunk.points
        points += [packed[i : i + 32] for i in range(0, len(packed), 32)]
        items += list(message.chunk.items)
    return points, items, {m.chunk.total for m in chunks}


def test_a_batch_of_keys_beside_few_large_ciphertexts_takes_two_chunks() -> None:
    """4,096 points and two 370 kB BFV ciphertexts: one chunk of points, one of items (cutting
    them by position made 2,048 chunks of two points)."""
    points = [os.urandom(32) for _ in range(4096)]
    items = [os.urandom(370_000) for _ in range(2)]
    chunks = list(message_chunks("q" * 32, "values:0:1", points, items))
    assert len(chunks) == 2
    assert [len(c.chunk.items) for c in chunks] == [0, 2]
    assert _joined(chunks) == (points, items, {4096})
    assert all(c.query_id == "q" * 32 and c.phase == "values:0:1" for c in chunks)


@pytest.mark.parametrize("pairs", [1, 3, 700])
def test_paired_points_and_items_stay_together_in_each_chunk(pairs: int) -> None:
    points = [os.urandom(32) for _ in range(pairs)]
    items = [os.urandom(3000) for _ in range(pairs)]  # an item per point: Paillier
    chunks = list(message_chunks("q" * 32, "values:0:1", points, items))
    assert all(len(c.chunk.points) == 32 * len(c.chunk.items) for c in chunks)
    assert all(c.ByteSize() <= MESSAGE_CHUNK_BYTES + 4096 for c in chunks)
    assert len(chunks) == -(-pairs // (MESSAGE_CHUNK_BYTES // (32 + 3000)))
    assert _joined(chunks) == (points, items, {pairs})


def test_points_alone_items_alone_and_an_empty_message() -> None:
    points = [os.urandom(32) for _ in range(70_000)]
    chunks = list(message_chunks("q" * 32, "own", points))
    assert len(chunks) == 3  # 32,768 points to a MiB chunk
    assert _joined(chunks) == (points, [], {70_000})
    items = [os.urandom(400_000) for _ in range(5)]
    chunks = list(message_chunks("q" * 32, "result", [], items))
    assert [len(c.chunk.items) for c in chunks] == [2, 2, 1]
    assert _joined(chunks) == ([], items, {5})
    (empty,) = message_chunks("q" * 32, "own", [])
    assert (empty.chunk.total, empty.chunk.points, list(empty.chunk.items)) == (0, b"", [])


def test_empty_items_beside_points_are_carried_not_divided_by() -> None:
    """Items of no bytes beside a different number of points (no pairing): one chunk of points,
    then the items, each count kept."""
    points = [os.urandom(32) for _ in range(3)]
    chunks = list(message_chunks("q" * 32, "values:0:1", points, [b"", b""]))
    assert _joined(chunks) == (points, [b"", b""], {3})
