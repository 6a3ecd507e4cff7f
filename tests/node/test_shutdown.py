"""A node's stop is bounded whatever its peers do, and names what it abandoned.

The peer here is a real TCP server at the peer's roster address that accepts connections and
never answers (not even the TLS handshake): every call to it waits out its deadline. A witnessing
round (with a 600 s witness deadline where the node is built in this process), a query's send
and a pool job (one that reads a FIFO nobody writes) would each hold a stop that waited for
them; the tests show the stop returns, says what it abandoned, and leaves an audit log that
verifies, with the interrupted query's end in it. A SIGTERM the kernel hands to a thread other
than the main one still stops the node, and the stop's lines never wait on stdout. Nothing
waits a fixed time: each wait is on an event, a thread or a process, under a generous timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    build_federation,
    grant,
    in_process_node,
    register,
    run_part,
    serve_node,
    stop_node,
    submit_approved,
)

from govshare.examples import synth
from govshare.model.events import log_origin
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.states import FAILED
from govshare.node.api.server import create_server
from govshare.node.audit.auditlog import AuditLog, StoredCheckpoint
from govshare.node.audit.checkpointer import CheckpointPublisher
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.node.observability.logs import say
from govshare.node.shutdown import POOL_SECONDS, lingering
from govshare.node.stores.query_store import QueryStore
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD

# Generous: the machine that runs the suite is shared and slow at times.
TIMEOUT = 120.0
# A witness deadline no stop may wait out.
NEVER = 600.0
# tgkill(2)'s number in Linux's syscall table of each architecture.
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]


class SilentPeer:
    """Listens on ``address`` and accepts connections, never sending a byte."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self._socket = socket.create_server((host, int(port)))
        self._held: list[socket.socket] = []
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            self._held.append(connection)
            self.connected.set()

    def close(self) -> None:
        self._socket.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def shutdown_fed(tmp_path: Path) -> FederationFixture:
    return build_federation(tmp_path, "stopfed")


@pytest.fixture
def civil_silent(shutdown_fed: FederationFixture) -> Iterator[SilentPeer]:
    peer = SilentPeer(shutdown_fed.federation.roster.member("civil").address)
    yield peer
    peer.close()


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """``call`` in a daemon thread, its return value landing in the list."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def verified(fed: FederationFixture, name: str) -> tuple[list[str], StoredCheckpoint | None]:
    """The kinds of ``name``'s audit log entries and its latest checkpoint, after checking the
    log whole (entries, tree, checkpoint signatures) under the node's roster key."""
    config = NodeConfig.load(fed.node_home(name))
    log = AuditLog.open(config.audit_database_path, suite=STANDARD)
    try:
        verdict = log.check_whole(
            fed.federation.roster.member(name).verify_key(),
            log_origin(fed.federation.roster.federation, name),
        )
        kinds = [e.decode().kind for e in log.entries(0, log.size)]
        checkpoint = log.latest_checkpoint()
    finally:
        log.close()
    assert verdict.damage is None, verdict
    return kinds, checkpoint


def test_the_publisher_stops_while_its_round_waits_on_a_peer_that_never_answers(
    shutdown_fed: FederationFixture, civil_silent: SilentPeer, tmp_path: Path
) -> None:
    tax = shutdown_fed.identity("tax")
    civil = shutdown_fed.federation.roster.member("civil")
    audit = AuditLog.open(tmp_path / "audit.db", suite=STANDARD)
    audit.record("test.entry", {}, actor="tax")
    publisher = CheckpointPublisher(
        tax, audit, interval=0.01, peers=lambda: [civil], witness_timeout=NEVER
    )
    publisher.start()
    try:
        assert civil_silent.connected.wait(TIMEOUT), "no witness call reached the peer"
        stopping, ended = in_thread(publisher.stop)
        stopping.join(TIMEOUT)
        assert not stopping.is_alive(), "stop() waited for a witness call due in 600 s"
        assert ended == [True]
        assert publisher.abandoned == ["witnessing of checkpoint 1 by civil"]
        kinds = [e.decode().kind for e in audit.entries(0, audit.size)]
        assert kinds == ["test.entry"], kinds
    finally:
        audit.close()


def test_a_served_node_closes_while_a_pool_job_and_a_witness_round_never_end(
    shutdown_fed: FederationFixture, civil_silent: SilentPeer, tmp_path: Path
) -> None:
    node = in_process_node(
        shutdown_fed, "tax", checkpoint_interval=0.01, witness_timeout=NEVER, workers=1
    )
    running = create_server(node, NodeConfig.load(shutdown_fed.node_home("tax")).listen)
    # A pool job that never returns: the worker reads a FIFO whose writer never writes. The
    # test's open for writing returns once the worker has opened it: the job is running.
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    job = node.executor().submit(fifo.read_bytes)
    opening, writer = in_thread(lambda: os.open(fifo, os.O_WRONLY))
    opening.join(TIMEOUT)
    assert writer, "the pool job never started"
    assert civil_silent.connected.wait(TIMEOUT), "no witness call reached the peer"

    def stop() -> list[str]:
        return running.stop(0) + node.close()

    stopping, out = in_thread(stop)
    stopping.join(TIMEOUT)
    assert not stopping.is_alive(), "the stop waited for the pool job or the witness round"
    (abandoned,) = out
    assert isinstance(abandoned, list)
    assert any(a.startswith("witnessing of checkpoint ") and a.endswith(" by civil")
               for a in abandoned), abandoned  # fmt: skip
    assert f"1 pool worker(s) still computing after {POOL_SECONDS:g} s (killed)" in abandoned
    with pytest.raises(BrokenProcessPool):
        job.result(TIMEOUT)
    (fd,) = writer
    assert isinstance(fd, int)
    os.close(fd)
    kinds, _ = verified(shutdown_fed, "tax")
    assert "witness.failed" not in kinds, kinds  # a round the stop cut is no witness's failure


def test_a_node_whose_peer_never_answers_exits_on_sigterm_with_its_log_sound(
    shutdown_fed: FederationFixture, civil_silent: SilentPeer
) -> None:
    home = shutdown_fed.node_home("tax")
    config = home / "node.toml"
    text = config.read_text()
    assert "checkpoint_interval = 10.0" in text
    config.write_text(text.replace("checkpoint_interval = 10.0", "checkpoint_interval = 0.05"))
    process = serve_node(home)
    try:
        assert civil_silent.connected.wait(TIMEOUT), "no witness call reached the peer"
    finally:
        code = stop_node(process, timeout=TIMEOUT)
    assert code == 0
    _, checkpoint = verified(shutdown_fed, "tax")
    assert checkpoint is not None  # the round's checkpoint, signed before the peer was asked


def set_options(home: Path, **options: str) -> None:
    """Set ``name = value`` lines of ``home``'s node.toml (each line must be there)."""
    config = home / "node.toml"
    lines = config.read_text().splitlines()
    for name, value in options.items():
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
        lines[at] = f"{name} = {value}"
    config.write_text("\n".join(lines) + "\n")


def test_a_node_stopped_mid_query_whose_peer_never_answers_logs_the_query_failed(
    shutdown_fed: FederationFixture, civil_silent: SilentPeer, tmp_path: Path
) -> None:
    """tax runs its part of a PSI query and sends its set to civil, which never answers: the
    stop cuts the send, and the query's end (failed, nothing released, the reservation
    returned) is in tax's log before the log closes."""
    home = shutdown_fed.node_home("tax")
    # No witnessing round: the only call to civil is the query's. A short grace: the query's
    # send outlives it whatever its length.
    set_options(home, checkpoint_interval="3600.0", grace_seconds="1.0", workers="1")
    synth.generate(tmp_path / "data", size=100, seed=5)
    node = Node.from_home(home)
    try:
        register(
            node, tmp_path / "data" / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS
        )
        grant(node, "residents", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
    finally:
        node.close()
    alice = shutdown_fed.identity("alice")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE, epsilon=PSI_EPSILON,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
    )  # fmt: skip
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    process = serve_node(home)
    try:
        query_id = submit_approved(alice, request, ["tax"])
        part = run_part(alice, "tax", query_id, timeout=TIMEOUT)
        assert civil_silent.connected.wait(TIMEOUT), "tax's part never sent to civil"
    finally:
        code = stop_node(process, timeout=TIMEOUT)
    assert code == 0
    part.thread.join(TIMEOUT)
    assert not part.thread.is_alive() and len(part.errors) == 1, part.errors
    config = NodeConfig.load(home)
    store = QueryStore(config.database_path)
    try:
        assert store.get(query_id).state == FAILED
        assert store.reservation(query_id) == "returned"
    finally:
        store.close()
    log = AuditLog.open(config.audit_database_path, suite=STANDARD)
    try:
        entries = [e.decode() for e in log.entries_for_query(query_id)]
    finally:
        log.close()
    kinds = [e.kind for e in entries]
    assert "result.released" not in kinds and "budget.recovered" not in kinds, kinds
    (failed,) = [e.fields for e in entries if e.kind == "query.failed"]
    assert failed["released"] is False, failed
    verified(shutdown_fed, "tax")


def test_the_stop_lines_never_wait_on_a_stdout_pipe_nobody_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:  # full: a plain print would block until someone reads
            os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)  # as a node's stdout is
    with os.fdopen(write_end, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        saying, _ = in_thread(lambda: say("node tax stopped"))
        saying.join(TIMEOUT)
        assert not saying.is_alive(), "say() waited on the full pipe"
    os.close(read_end)


def test_the_stop_lines_do_not_fail_when_the_reader_of_stdout_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        say("node tax stopped")  # EPIPE (a print raises BrokenPipeError): lost, the stop goes on
    finally:
        with contextlib.suppress(BrokenPipeError):
            stdout.close()  # the unwritten line is still buffered


def test_a_node_stops_when_sigterm_is_delivered_to_a_thread_other_than_its_main_one(
    shutdown_fed: FederationFixture,
) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads (tgkill picks one here, as
    the kernel did to a query thread in a gRPC call); Python runs the handler in the main
    thread only, so the node must not wait for the signal in an untimed wait."""
    process = serve_node(shutdown_fed.node_home("tax"))
    try:
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{process.pid}/task"))
        other = next(t for t in tasks if t != process.pid)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(SYS_TGKILL, process.pid, other, signal.SIGTERM) == 0
        assert process.wait(TIMEOUT) == 0
    finally:
        stop_node(process, timeout=TIMEOUT)


def test_lingering_names_the_threads_that_would_hold_the_interpreters_exit() -> None:
    """Non-daemon threads and thread-pool workers (which concurrent.futures joins at exit,
    daemon or not) are waited for and named; other daemon threads are not."""
    release = threading.Event()
    threads = [
        threading.Thread(target=release.wait, name="govshare-held", daemon=False),
        threading.Thread(target=release.wait, name="govshare-stopfed-query_0", daemon=True),
        threading.Thread(target=release.wait, name="govshare-watch", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        left = lingering(0.1)
        assert {"govshare-held", "govshare-stopfed-query_0"} <= set(left), left
        assert "govshare-watch" not in left, left
    finally:
        release.set()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), thread.name
