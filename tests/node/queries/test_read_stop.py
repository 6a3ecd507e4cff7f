"""A query's part ends within its key read — one SQL statement — when the node stops or the
analyst withdraws the query: the read does not run to its end first.

Two in-process nodes over mutual TLS, real SQLite files. Tax's key read is held inside its SQL
statement (at the first call of SQLite's progress handler, ``Catalogue``'s ``stop``) until the
test has ended the query, so what ends the read can only be the end, not the read finishing:
nothing waits on a clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CIVIL_COLUMNS,
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    assert_ended_cleanly,
    build_federation,
    grant,
    register,
    run_part,
    served,
    submit_approved,
)

from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.data import catalog
from govshare.node.data.catalog import Catalogue
from govshare.node.node import Node
from govshare.protocols.errors import Aborted
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient

WAIT = 120.0  # generous: only a read that did not end would reach it
ROWS = 300
PLAN = PsiPlan(
    kind=QueryKind.PSI_CARDINALITY,
    purpose=PURPOSE,
    left=Side("tax", "residents", "id_number"),
    right=Side("civil", "assistance", "id_number"),
    epsilon=PSI_EPSILON,
)


class HeldRead:
    """Tax's key read, held inside its SQL statement until the test lets it go on: its stop
    check is wrapped, and its second call (SQLite's progress handler, the statement running;
    the first is before it) waits for ``go``."""

    def __init__(self, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reading, self.go = threading.Event(), threading.Event()
        self.calls = 0
        self.stopped: list[BaseException] = []
        keys = node.catalogue.keys

        def held_keys(*args: Any, stop: catalog.Stop | None = None, **options: Any) -> list[str]:
            assert stop is not None, "the query kind passes its stop check"

            def held() -> object:
                self.calls += 1
                if self.calls == 2:
                    self.reading.set()
                    assert self.go.wait(WAIT)
                return stop()

            try:
                return keys(*args, stop=held, **options)
            except Aborted as exc:
                self.stopped.append(exc)
                raise

        monkeypatch.setattr(node.catalogue, "keys", held_keys)


@pytest.fixture
def federation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FederationFixture, dict[str, Node]]]:
    """tax and civil served in this process, their datasets registered and granted to alice;
    SQLite calls a read's stop check every 50 steps (a 300-row read calls it many times)."""
    monkeypatch.setattr(catalog, "STOP_EVERY", 50)
    fed = build_federation(tmp_path, "readstopfed")
    data = tmp_path / "data"
    synth.generate(data, size=ROWS, seed=5)
    with served(fed, ("tax", "civil")) as running:
        register(running["tax"], data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
        register(
            running["civil"], data / f"{synth.CIVIL}.csv", name="assistance", columns=CIVIL_COLUMNS
        )
        grant(running["tax"], "residents", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
        grant(running["civil"], "assistance", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
        yield fed, running


@pytest.mark.parametrize("end", ["node stopping", "query withdrawn"])
def test_a_query_ends_within_its_key_read(
    federation: tuple[FederationFixture, dict[str, Node]],
    monkeypatch: pytest.MonkeyPatch,
    end: str,
) -> None:
    fed, nodes = federation
    tax, alice = nodes["tax"], fed.identity("alice")
    read = HeldRead(tax, monkeypatch)
    request = sign_request(
        alice.signing_key, analyst="alice", kind=PLAN.kind.value, body=PLAN.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    query_id = submit_approved(alice, request)
    part = run_part(alice, "tax", query_id, timeout=WAIT)
    assert read.reading.wait(WAIT)  # tax's key read is inside its SQL statement
    if end == "node stopping":
        reason = "node tax is stopping"
        tax.queries.interrupt_all(reason)  # what the server's stop does (SIGTERM)
    else:
        reason = "the analyst alice withdrew the query"
        with NodeClient.to(alice, "tax") as client:
            client.cancel(query_id)
    read.go.set()
    part.thread.join(WAIT)
    assert not part.thread.is_alive()

    ended = f"tax: {reason}; nothing released"
    # The read itself ended, at the check after the end: it did not read on to its end.
    assert [str(e) for e in read.stopped] == [ended]
    assert read.calls == 2
    entries = assert_ended_cleanly(
        tax, query_id, reason, errors=part.errors, message=ended, reservation="returned"
    )
    # Tax's keys never left: at most the shared dummies went to civil.
    steps = [str(e.fields["phase"]) for e in entries if e.kind == "protocol.step"]
    assert steps in ([], ["dummies"]), steps
    # The catalogue goes on serving the read in full, with a stop check and without.
    whole = Catalogue.keys(tax.catalogue, "residents", "id_number")
    assert len(whole) > ROWS // 2
    assert Catalogue.keys(tax.catalogue, "residents", "id_number", stop=lambda: False) == whole
