"""Admission control: many analysts at once, a bounded queue, RESOURCE_EXHAUSTED beyond it.

The gate's own rules first (no server), then a node limited to one running and one queued
query (in-process servers, so the test can watch the gate), then a hundred concurrent queries
through two real node processes.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    assert_ended_cleanly,
    build_federation,
    grant,
    psi_shift,
    register,
    run_part,
    serve_node,
    submit_approved,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from govshare.client.analyst import run_psi
from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.api.server import RunningNode, create_server
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.node.queries.capacity import MIN_RETRY_AFTER, Intake, RunGate
from govshare.protocols.errors import Aborted, GovshareError, ResourceExhausted
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient
from govshare.v1 import query_pb2, query_pb2_grpc

WAIT = 120.0  # generous: a condition polled, never a duration assumed
# The deadline of the analysts' calls other than the run (submit, status, cancel, receipt, the
# catalogue), instead of the client's 10 s, in every test here: on a loaded machine a node busy
# with a hundred runs takes its submissions seconds apart, and these tests are about what a node
# admits and answers, not how fast. Where a test says a node answers "meanwhile", a condition
# checked after the answer says so (the runs still held their places), never its deadline.
CALL_TIMEOUT = 600.0

CIVIL_COLUMNS = (
    "id_number=join_key:resident_id",
    "district=group_key:domain={districts}",
    "year=plaintext",
    "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
    "amount=aggregate",
)


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT:g} s: {what}")
        time.sleep(0.05)


# --- the gate ------------------------------------------------------------------------------


def test_runs_beyond_the_running_and_queued_places_are_refused_at_once() -> None:
    gate = RunGate(node="tax", max_running=1, max_queued=2)
    try:
        places = [gate.admit(f"q{n}") for n in range(3)]
        with pytest.raises(ResourceExhausted) as refused:
            gate.admit("q3")
        assert refused.value.retry_after >= MIN_RETRY_AFTER
        # Said to the analyst: at capacity and when to come back, not how loaded the node is
        # (others' queries); the node's own log has the load.
        assert str(refused.value) == f"at capacity; retry in {refused.value.retry_after:.0f} s"
        assert gate.load().admitted == 3
        assert places[0](lambda: "ran") == "ran"  # a finished run gives its place back
        assert gate.load().admitted == 2
        gate.admit("q4")
        with pytest.raises(ResourceExhausted):
            gate.admit("q5")
    finally:
        gate.shutdown()


def test_a_run_that_would_end_after_its_deadline_is_refused_now() -> None:
    """At the pace runs finish here, a queued run that could only end after its caller's
    deadline is refused at once, with a hint of when it would fit — not left to hold a place."""
    now = [0.0]
    gate = RunGate(node="tax", max_running=1, max_queued=20, clock=lambda: now[0])
    try:
        for n in range(4):  # four runs, one finishing every 10 s: 4 runs over 30 s
            enter = gate.admit(f"done{n}")
            now[0] += 10
            enter(lambda: None)
        held = [gate.admit(f"held{n}", deadline=1000) for n in range(8)]
        assert gate.load().admitted == 8
        # The ninth would end in about 9 / (4 / 30) = 67.5 s.
        with pytest.raises(ResourceExhausted) as refused:
            gate.admit("late", deadline=60)
        assert "a run now would end after the call's deadline in 60 s" in str(refused.value)
        assert refused.value.retry_after == pytest.approx(7.5)
        gate.admit("in time", deadline=70)
        gate.admit("no deadline")
        assert gate.load().admitted == len(held) + 2
    finally:
        gate.shutdown()


def test_a_run_waiting_for_its_peer_gives_its_turn_back() -> None:
    """One turn, two runs: the second computes while the first waits for its peer. A gate
    whose waiting runs kept their turns would leave the second waiting here for ever."""
    gate = RunGate(node="tax", max_running=1, max_queued=1)
    first, second = gate.admit("first"), gate.admit("second")
    peer_sent, waiting = threading.Event(), threading.Event()
    outcomes: list[str] = []

    def waits_for_its_peer() -> str:
        with gate.waiting():
            waiting.set()
            assert peer_sent.wait(WAIT)
        return "first"

    runner = threading.Thread(target=lambda: outcomes.append(first(waits_for_its_peer)))
    runner.start()
    try:
        assert waiting.wait(WAIT)
        computed = threading.Event()

        def computes() -> str:
            computed.set()
            return "second"

        other = threading.Thread(target=lambda: outcomes.append(second(computes)))
        other.start()
        assert computed.wait(WAIT), "the waiting run kept its turn"
        assert gate.load().computing <= 1
        other.join(WAIT)
    finally:
        peer_sent.set()
        runner.join(WAIT)
        gate.shutdown()
    assert sorted(outcomes) == ["first", "second"]
    assert gate.drain(WAIT) and gate.load().admitted == 0


def test_a_withdrawn_run_leaves_the_queue_at_once() -> None:
    """The analyst withdraws a query whose run waits for a turn: it leaves now (Aborted, the
    reason named), not when a turn frees; the other queries keep their places."""
    gate = RunGate(node="tax", max_running=1, max_queued=2)
    holder, queued, other = gate.admit("holder"), gate.admit("queued"), gate.admit("other")
    holding, release = threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    def hold() -> str:
        holding.set()
        assert release.wait(WAIT)
        return "held"

    def run(name: str, enter: Callable[[Callable[[], str]], str], body: Callable[[], str]) -> None:
        try:
            outcomes[name] = enter(body)
        except Aborted as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=("holder", holder, hold))]
    threads[0].start()
    assert holding.wait(WAIT)
    for name, enter in (("queued", queued), ("other", other)):
        threads.append(threading.Thread(target=run, args=(name, enter, lambda: "ran")))
        threads[-1].start()
    try:
        gate.withdraw("queued", "the analyst alice withdrew the query")
        threads[1].join(WAIT)
        assert isinstance(outcomes.get("queued"), Aborted), outcomes
        assert "alice withdrew the query" in str(outcomes["queued"])
        assert "holder" not in outcomes and "other" not in outcomes  # the turn is still held
        assert gate.load().admitted == 2
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)
        gate.shutdown()
    assert outcomes["holder"] == "held" and outcomes["other"] == "ran"


# --- one node with one running and one queued place ------------------------------------------


def _setup_data(
    fed: FederationFixture, root: Path, *, rate_limit: int, tax_rows: int | None = None
) -> int:
    """Register both datasets, granted to alice; the true size of their intersection (of 300
    rows each; with ``tax_rows``, tax's dataset has that many rows, drawn apart)."""
    data = root / "data"
    manifest = synth.generate(data, size=300, seed=5)
    tax_csv = data / f"{synth.TAX}.csv"
    if tax_rows is not None:
        synth.generate(root / "tax-data", size=tax_rows, seed=6)
        tax_csv = root / "tax-data" / f"{synth.TAX}.csv"
    for name in ("tax", "civil"):
        path = fed.node_home(name) / "node.toml"
        path.write_text(
            path.read_text().replace(
                "rate_limit_per_minute = 30", f"rate_limit_per_minute = {rate_limit}"
            )
        )
        node = Node.from_home(fed.node_home(name))
        try:
            if name == "tax":
                register(node, tax_csv, name="residents", columns=TAX_COLUMNS)
                grant(node, "residents", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
            else:
                csv = data / f"{synth.CIVIL}.csv"
                register(node, csv, name="assistance", columns=CIVIL_COLUMNS)
                grant(node, "assistance", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
        finally:
            node.close()
    return int(manifest["intersections"]["tax.residents & civil.assistance"])


PLAN = PsiPlan(
    kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
    left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
    epsilon=PSI_EPSILON,
)  # fmt: skip


def _submitted(alice: Identity) -> str:
    request = sign_request(
        alice.signing_key, analyst="alice", kind=PLAN.kind.value, body=PLAN.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    return submit_approved(alice, request, timeout=CALL_TIMEOUT)


class Busy:
    def __init__(self, fed: FederationFixture, nodes: dict[str, tuple[Node, RunningNode]]):
        self.fed = fed
        self.nodes = nodes

    @property
    def tax(self) -> Node:
        return self.nodes["tax"][0]


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Busy]:
    root = tmp_path_factory.mktemp("capacity")
    fed = build_federation(root, "busyfed")
    _setup_data(fed, root, rate_limit=1000)
    path = fed.node_home("tax") / "node.toml"
    path.write_text(
        path.read_text()
        .replace("max_running = 4", "max_running = 1")
        .replace("max_queued = 124", "max_queued = 1")
    )
    nodes = {}
    for name in ("tax", "civil"):
        config = NodeConfig.load(fed.node_home(name))
        node = Node.from_config(config)
        nodes[name] = (node, create_server(node, config.listen))
    yield Busy(fed, nodes)
    for node, running in nodes.values():
        running.stop(0)
        node.close()


def test_a_run_beyond_the_queue_is_resource_exhausted_then_admitted_on_retry(busy: Busy) -> None:
    alice = busy.fed.identity("alice")
    assert busy.tax.gate.load().max_running == 1 and busy.tax.gate.load().max_queued == 1
    first, second, third = (_submitted(alice) for _ in range(3))
    errors: dict[str, BaseException] = {}

    def run_at_tax(query_id: str) -> None:
        # Only tax is asked to run: its part waits for civil's set, holding its place.
        try:
            with NodeClient.to(alice, "tax") as client:
                client.run(query_id, timeout=WAIT)
        except GovshareError as exc:
            errors[query_id] = exc

    runners = [threading.Thread(target=run_at_tax, args=(q,)) for q in (first, second)]
    for runner in runners:
        runner.start()
    eventually(lambda: busy.tax.gate.load().admitted == 2, "both runs admitted at tax")
    # One turn, yet both run: each gives its turn back while it waits for civil.
    eventually(lambda: _states(alice, first, second) == {"running"}, "both running at tax")

    # The attacker's view too: the raw status and its ErrorInfo, not only the client's error.
    with NodeClient.to(alice, "tax", timeout=CALL_TIMEOUT) as client:
        with pytest.raises(ResourceExhausted) as refused:
            client.run(third, timeout=WAIT)
        assert refused.value.retry_after >= MIN_RETRY_AFTER
        assert str(refused.value).startswith("node tax: at capacity; retry in ")
        assert client.status(third).state == "approved"  # refused at the door: not consumed
        # The node still answers everything else at once: while both runs hold their places
        # (a catalogue starved by them would answer only once their deadlines freed them).
        assert [d.name for d in client.list_datasets()] == ["residents"]
        assert busy.tax.gate.load().admitted == 2
        assert _states(alice, first, second) == {"running"}

    # The analyst withdraws the first: it stops waiting, fails, nothing released.
    with NodeClient.to(alice, "tax", timeout=CALL_TIMEOUT) as client:
        client.cancel(first)
    runners[0].join(WAIT)
    assert isinstance(errors.get(first), Aborted), errors
    assert "withdrew" in str(errors[first])
    eventually(lambda: busy.tax.gate.load().admitted == 1, "the withdrawn run's place freed")

    # Retry: the third now runs at both nodes and answers.
    outputs: dict[str, object] = {}

    def run_at(node: str) -> None:
        with NodeClient.to(alice, node) as client:
            outputs[node] = client.run(third, timeout=WAIT)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(run_at, n) for n in ("tax", "civil")]:
            future.result(timeout=WAIT)
    assert set(outputs) == {"tax", "civil"}
    with NodeClient.to(alice, "tax", timeout=CALL_TIMEOUT) as client:
        assert client.status(third).state == "done"
        assert client.status(first).state == "failed"
        client.cancel(second)
    runners[1].join(WAIT)
    kinds = [e.decode().kind for e in busy.tax.audit.entries_for_query(first)]
    assert "query.failed" in kinds and "result.released" not in kinds
    assert "budget.settled" in kinds


def test_resource_exhausted_travels_as_a_status_with_its_retry_hint(busy: Busy) -> None:
    """What a patched client sees on the wire: the status code, not only our client's error."""
    alice = busy.fed.identity("alice")
    held = [_submitted(alice) for _ in range(2)]
    extra = _submitted(alice)
    runners = [
        threading.Thread(target=lambda q=q: _quietly_run(alice, q), daemon=True) for q in held
    ]
    for runner in runners:
        runner.start()
    eventually(lambda: busy.tax.gate.load().admitted == 2, "both runs admitted at tax")
    with NodeClient.to(alice, "tax", timeout=CALL_TIMEOUT) as client:
        stub = query_pb2_grpc.QueryStub(client.channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Run(query_pb2.RunRequest(query_id=extra), timeout=WAIT))
        call = refused.value
        assert isinstance(call, grpc.Call)
        assert call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(call)
        assert status is not None
        infos, retries = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
        assert {"google.rpc.ErrorInfo", "google.rpc.RetryInfo"} <= kinds
        for detail in status.details:
            if detail.Is(infos.DESCRIPTOR):
                detail.Unpack(infos)
            if detail.Is(retries.DESCRIPTOR):
                detail.Unpack(retries)
        assert infos.reason == "RESOURCE_EXHAUSTED" and infos.domain == "govshare"
        assert float(infos.metadata["retry_after_seconds"]) >= MIN_RETRY_AFTER
        assert retries.retry_delay.seconds >= MIN_RETRY_AFTER
        for query_id in held:
            client.cancel(query_id)
    for runner in runners:
        runner.join(WAIT)
    eventually(lambda: busy.tax.gate.load().admitted == 0, "every place freed")


def _states(alice: Identity, *query_ids: str) -> set[str]:
    with NodeClient.to(alice, "tax", timeout=CALL_TIMEOUT) as client:
        return {client.status(q).state for q in query_ids}


def _quietly_run(alice: Identity, query_id: str) -> None:
    try:
        with NodeClient.to(alice, "tax") as client:
            client.run(query_id, timeout=WAIT)
    except GovshareError:
        return


# --- a hundred analysts' queries through real node processes ---------------------------------


_start = serve_node


def test_a_hundred_concurrent_queries_all_answer_and_the_catalogue_answers_meanwhile(
    tmp_path: Path,
) -> None:
    fed = build_federation(tmp_path, "loadfed")
    true = _setup_data(fed, tmp_path, rate_limit=10_000)
    processes = {name: _start(fed.node_home(name)) for name in ("tax", "civil")}
    alice = fed.identity("alice")
    done = threading.Semaphore(0)
    finished: list[int] = []
    lock = threading.Lock()

    def one() -> int:
        outcome = run_psi(alice, PLAN, run_timeout=600, call_timeout=CALL_TIMEOUT)
        with lock:
            finished.append(outcome.count)
        done.release()
        return outcome.count

    try:
        with ThreadPoolExecutor(100) as pool:
            futures = [pool.submit(one) for _ in range(100)]
            assert done.acquire(timeout=600), "no query answered"
            # The load is under way: the catalogue answers now, not after it.
            # Whether it answers during the load is what 'answered_by_then' tells, not its
            # deadline: a catalogue starved by the runs would answer after most of them.
            with NodeClient.to(alice, "tax", timeout=CALL_TIMEOUT) as client:
                listed = [d.name for d in client.list_datasets()]
            with lock:
                answered_by_then = len(finished)
            counts = [f.result(timeout=900) for f in futures]
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            assert process.wait(timeout=60) == 0
    assert listed == ["residents"]
    assert answered_by_then < 90, answered_by_then
    assert len(counts) == 100
    t = psi_shift()
    assert all(abs(count - true) <= t for count in counts), (true, counts)


def _stopped_mid_run(fed: FederationFixture) -> list[str]:
    """Run a PSI at tax alone (civil never runs its part) and send tax SIGTERM once the query
    runs there. Checks that tax exits 0, the analyst gets Aborted naming the stop, and the
    query failed at tax with nothing released and its reservation returned, all logged;
    returns the phases of the protocol steps tax logged for it."""
    alice = fed.identity("alice")
    processes = {name: _start(fed.node_home(name)) for name in ("tax", "civil")}
    try:
        query_id = _submitted(alice)
        part = run_part(alice, "tax", query_id, timeout=WAIT)
        eventually(lambda: _states(alice, query_id) == {"running"}, "running at tax")
        processes["tax"].send_signal(signal.SIGTERM)
        assert processes["tax"].wait(timeout=2 * WAIT) == 0
        part.thread.join(WAIT)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=WAIT)
    tax = Node.from_home(fed.node_home("tax"))
    try:
        entries = assert_ended_cleanly(
            tax, query_id, "tax is stopping", errors=part.errors,
            message="tax: node tax is stopping; nothing released", reservation="returned",
        )  # fmt: skip
    finally:
        tax.close()
    return [str(e.fields["phase"]) for e in entries if e.kind == "protocol.step"]


def test_sigterm_ends_a_query_waiting_for_its_peer_within_the_grace(tmp_path: Path) -> None:
    """A stopping node does not wait out the protocol timeout (300 s here): the query it was
    running fails with nothing released, its reservation comes back, and the node exits 0."""
    fed = build_federation(tmp_path, "stopfed")
    _setup_data(fed, tmp_path, rate_limit=1000)
    _stopped_mid_run(fed)


# Rows of tax's dataset in the set-up test: reading and masking them takes tax seconds of CPU
# (8 s for 100,000 keys on this 2-core machine under load), far longer than the test takes to
# send SIGTERM once the query runs.
SETUP_ROWS = 200_000


def test_sigterm_ends_a_query_in_its_set_up_within_the_grace(tmp_path: Path) -> None:
    """SIGTERM while tax is in its set-up, reading and masking its 200,000 keys before its set
    goes to civil: the set-up ends at its next batch (the masking on tax's process pool is
    cancelled), the node exits 0, and the query fails there with nothing released (its set
    never sent), its reservation returned, all of it in the audit log."""
    fed = build_federation(tmp_path, "setupfed")
    _setup_data(fed, tmp_path, rate_limit=1000, tax_rows=SETUP_ROWS)
    # A grace no loaded test machine runs out of, so that the call is never cancelled by it:
    # the query must end by itself, in its set-up (the log shows its masked set never sent).
    config = fed.node_home("tax") / "node.toml"
    config.write_text(
        re.sub(r"(?m)^grace_seconds = .*$", f"grace_seconds = {WAIT:g}", config.read_text())
    )
    # Ended in its set-up: at most the shared dummies went to civil, never tax's masked set.
    assert _stopped_mid_run(fed) in ([], ["dummies"])


def test_submissions_beyond_the_intake_are_refused_at_once() -> None:
    intake = Intake(node="tax", limit=2)
    with intake.place(), intake.place():
        assert intake.taking == 2
        with pytest.raises(ResourceExhausted) as refused:
            with intake.place():
                raise AssertionError("a third submission was taken")
        assert str(refused.value) == "busy taking submissions; retry in 1 s"
        assert refused.value.retry_after >= MIN_RETRY_AFTER
    assert intake.taking == 0
    with intake.place():
        assert intake.taking == 1
