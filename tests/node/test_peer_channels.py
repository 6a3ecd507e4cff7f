"""A node keeps one mutual-TLS channel per peer for protocol messages (``Node.send``), and
lets it go after a send that failed, so that the next send dials afresh. Real nodes served over
mutual TLS; ``ghost`` is enrolled in the roster and never started."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_federation, served

from govshare.protocols.errors import Aborted, Unavailable

UNKNOWN_QUERY = "0" * 32


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
