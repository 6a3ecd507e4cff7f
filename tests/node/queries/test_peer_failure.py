"""A peer killed mid-protocol: the analyst gets a clear error in time, nothing is released,
and both nodes' logs still verify. Real node processes, killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    build_federation,
    grant,
    register,
    serve_node,
)

from govshare.examples import synth
from govshare.model.events import log_origin
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.audit.auditlog import verify_log_file
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.protocols.errors import Aborted, GovshareError, Unavailable
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient

PROTOCOL_TIMEOUT = 3.0


start = serve_node


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Path, dict[str, subprocess.Popen[str]]]]:
    fed = build_federation(tmp_path)
    data = tmp_path / "data"
    synth.generate(data, size=300, seed=5)
    for name in ("tax", "civil"):
        config = fed.node_home(name) / "node.toml"
        config.write_text(
            config.read_text().replace(
                "protocol_timeout = 300.0", f"protocol_timeout = {PROTOCOL_TIMEOUT}"
            )
        )
        node = Node.from_home(fed.node_home(name))
        csv = data / (f"{synth.TAX}.csv" if name == "tax" else f"{synth.CIVIL}.csv")
        columns = TAX_COLUMNS if name == "tax" else (
            "id_number=join_key:resident_id", "district=group_key:domain={districts}",
            "year=plaintext",
            "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
            "amount=aggregate",
        )  # fmt: skip
        dataset = "residents" if name == "tax" else "assistance"
        register(node, csv, name=dataset, columns=columns)
        grant(node, dataset, "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
        node.close()
    processes = {name: start(fed.node_home(name)) for name in ("tax", "civil")}
    yield fed.root, processes
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)


def test_peer_killed_mid_protocol(two_nodes: tuple[Path, dict[str, subprocess.Popen[str]]]) -> None:
    root, processes = two_nodes
    alice = Identity.load(root / "alice")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    for node in ("tax", "civil"):
        with NodeClient.to(alice, node) as client:
            assert client.submit(request.encode()).state == "approved"

    # tax sends its set to civil and waits for civil's; civil dies before answering.
    failure: list[BaseException] = []
    output: list[object] = []

    def run_tax() -> None:
        try:
            with NodeClient.to(alice, "tax") as client:
                output.append(client.run(request.query_id_hex, timeout=30))
        except GovshareError as exc:
            failure.append(exc)

    runner = threading.Thread(target=run_tax)
    runner.start()
    # Kill civil once tax's part runs (a state polled, not a duration guessed).
    deadline = time.monotonic() + 120
    with NodeClient.to(alice, "tax") as client:
        while client.status(request.query_id_hex).state != "running":
            assert time.monotonic() < deadline, "tax never started its part"
            time.sleep(0.05)
    os.kill(processes["civil"].pid, signal.SIGKILL)
    processes["civil"].wait()
    # tax gives up after its protocol timeout (3 s), not the client's 30 s deadline.
    runner.join(timeout=120)
    assert not runner.is_alive()

    assert output == []  # no partial result
    assert len(failure) == 1 and isinstance(failure[0], Aborted | Unavailable), failure
    assert "nothing released" in str(failure[0]) or isinstance(failure[0], Unavailable)
    # The other node still serves.
    with NodeClient.to(alice, "tax") as client:
        assert client.status(request.query_id_hex).state == "failed"

    processes["tax"].send_signal(signal.SIGTERM)
    assert processes["tax"].wait(timeout=15) == 0
    roster = alice.roster
    for node in ("tax", "civil"):
        home = root / node
        result = verify_log_file(
            NodeConfig.load(home).audit_database_path,
            public_key=roster.member(node).verify_key(),
            origin=log_origin(roster.federation, node),
        )
        assert result.ok, (node, result.first_problem)
    tax_log = Node.from_home(root / "tax")
    try:
        kinds = [e.decode().kind for e in tax_log.audit.entries_for_query(request.query_id_hex)]
    finally:
        tax_log.close()
    assert "query.failed" in kinds and "result.released" not in kinds
