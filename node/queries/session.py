"""The protocol state every query kind keeps while it runs: the messages expected from peers.

A :class:`Mailbox` holds one :class:`Inbox` per message the node's part expects. A peer's
message arrives as ordered chunks (``govshare.node.api.services`` takes them off the wire) and is
complete when every announced item is in; a message refused midway leaves its inbox empty, so
the sender may send it again. The node's part :meth:`~Mailbox.wait` s for each message with the
protocol timeout, giving its computing turn back meanwhile (``govshare.node.queries.capacity``).

A query ends early — a participant's part failed, the analyst withdrew it, the node is stopping
— through :meth:`Mailbox.end`: every wait wakes at once and raises
:class:`~govshare.protocols.errors.Aborted` with the reason; nothing is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from govshare.protocols.errors import Aborted, MalformedInput

Waiting = Callable[[], AbstractContextManager[None]]
"""Entered while a query's thread waits for a peer (a turn given back; see ``capacity``)."""

NO_GATE: Waiting = nullcontext

Chunks = Iterator[tuple[int, bytes, list[bytes]]]
"""One peer message as it came off the wire: ``(total, packed points, items)`` chunks."""

Send = Callable[[str, str, str, Sequence[bytes], Sequence[bytes]], None]
"""``send(peer_node, query_id, phase, points, items)``: one message to a peer (Peer.Deliver)."""


@dataclass
class Inbox:
    """One message arriving from a peer, chunk by chunk: points and/or opaque items."""

    total: int = -1
    points: list[bytes] = field(default_factory=list)
    items: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def fill(self, total: int, chunks: Iterable[tuple[int, list[bytes], list[bytes]]]) -> int:
        """Take a message's chunks ``(total, points, items)`` in order; returns items taken.

        The first chunk's total is announced as ``total``. A refusal (a repeated message, a
        changed or exceeded total, a short stream) leaves the inbox as it was before: the
        sender may send the message again.

        Raises:
            MalformedInput: the message is malformed; nothing of it was kept.
        """
        if self.done.is_set() or self.total != -1:
            raise MalformedInput("this message was already sent", field="phase")
        if total < 0:
            raise MalformedInput("field 'total' must not be negative", field="total")
        self.total = total
        received = 0
        try:
            for chunk_total, points, items in chunks:
                if chunk_total != total:
                    raise MalformedInput("field 'total' changed between chunks", field="total")
                received += max(len(points), len(items))
                if received > total:
                    raise MalformedInput("more items than the announced total", field="points")
                self.points.extend(points)
                self.items.extend(items)
            if received != total:
                raise MalformedInput(
                    f"stream ended after {received} of {total} items", field="points"
                )
        except BaseException:
            self.total = -1
            self.points.clear()
            self.items.clear()
            raise
        self.done.set()
        return received


class Mailbox:
    """The inboxes of one query's part at this node, and how the part ends early."""

    def __init__(self, phases: Iterable[str]) -> None:
        self.inboxes: dict[str, Inbox] = {phase: Inbox() for phase in phases}
        self.ended: str | None = None

    def end(self, reason: str) -> None:
        """End the query's part: every wait wakes and raises Aborted with ``reason``."""
        if self.ended is None:
            self.ended = reason
        for inbox in self.inboxes.values():
            inbox.done.set()

    def wait(
        self,
        phase: str,
        *,
        node: str,
        peer: str,
        what: str,
        timeout: float,
        waiting: Waiting = NO_GATE,
    ) -> Inbox:
        """The complete message ``phase`` from ``peer``.

        Raises:
            Aborted: the peer did not send it within ``timeout``, or the query ended early.
        """
        inbox = self.inboxes[phase]
        with waiting():
            arrived = inbox.done.wait(timeout)
        if self.ended is not None:
            raise Aborted(f"{node}: {self.ended}; nothing released")
        if not arrived:
            raise Aborted(
                f"{node}: node {peer} did not send its {what} within {timeout:g} s; "
                "query aborted, nothing released"
            )
        return inbox
