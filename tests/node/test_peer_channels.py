"""A node keeps one mutual-TLS channel per peer for protocol messages (``Node.send``), and
lets it go after a send that failed, so that the next send dials afresh. Real nodes served over
mutual TLS; ``ghost`` is enrolled in the roster and never started."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_federation, in_process_node, served

from govshare.protocols.errors import Aborted, Unavailable
from govshare.rpc import client as rpc_client

UNKNOWN_QUERY = "0" * 32
# Generous: a wait on another thread, never a measure of speed.
TIMEOUT = 120.0


def test_sends_to_a_peer_share_one_channel_until_one_fails(tmp_path: Path) -> None:
    fed = build_federation(tmp_path)
    with served(fed, ["tax", "civil"]) as nodes:
        tax = nodes["tax"]
        kept = tax._peer_client("civil")
        assert tax._peer_client("civil") is kept
        assert tax._peer_client("civil").member == tax.roster().member("civil")
        # civil answers over the kept channel: it holds no such query, and says so.
        with pytest.raises(Aborted, match="civil"):
            tax.send("civil", UNKNOWN_QUERY, "matcher_keys", [b"\x01" * 32])
        after = tax._peer_client("civil")
        assert after is not kept  # the failed send let the channel go
        assert tax._peer_client("civil") is after  # and the new one is kept in turn
        # A peer that does not answer: the send fails as unreachable, the next dials afresh.
        ghost = tax._peer_client("ghost")
        with pytest.raises(Unavailable, match="ghost"):
            tax.send_abort("ghost", UNKNOWN_QUERY)
        assert tax._peer_client("ghost") is not ghost
        # The peer's own channel is untouched by the other peer's failure.
        assert tax._peer_client("civil") is after


def test_a_send_cut_by_its_own_nodes_stop_says_the_node_is_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tax streams a message to civil; tax stops while the stream is on the wire and closes its
    channels under it. gRPC then cancels the call ("Channel closed!"), which the send used to
    report as civil's failure; the sender now hears that tax is stopping, and so does a send
    (or an abort) after the stop."""
    fed = build_federation(tmp_path)
    on_the_wire, stopped = threading.Event(), threading.Event()
    chunks = rpc_client.message_chunks

    def held_chunks(*args: Any) -> Iterator[Any]:
        stream = chunks(*args)
        yield next(stream)  # the call is open at civil
        on_the_wire.set()
        assert stopped.wait(TIMEOUT)
        yield from stream

    monkeypatch.setattr(rpc_client, "message_chunks", held_chunks)
    # civil serves; tax only sends (a node with no server of its own stops by its close alone).
    with served(fed, ["civil"]):
        tax = in_process_node(fed, "tax")
        failures: list[BaseException] = []

        def send() -> None:
            try:
                tax.send("civil", UNKNOWN_QUERY, "values:0:1", [b"\x01" * 32] * 2000)
            except BaseException as error:
                failures.append(error)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert on_the_wire.wait(TIMEOUT)
        finally:
            tax.close()  # the stop, with the stream on the wire (and however the wait ended)
            stopped.set()
            sender.join(TIMEOUT)
        assert not sender.is_alive()
        assert [(type(f), str(f)) for f in failures] == [
            (Unavailable, "node tax is stopping; values:0:1 not sent to civil")
        ]
        with pytest.raises(Unavailable, match=r"^node tax is stopping; nothing sent to civil$"):
            tax.send_abort("civil", UNKNOWN_QUERY)
