"""A node that stops and restarts cleanly: one node per home, no process outliving its node, and
no approval of a query whose signed request has expired.

Real node processes (``govshare node serve``), killed with SIGKILL or stopped with SIGTERM; their
process trees read from ``/proc``. Nothing here waits a fixed time: every wait polls a condition
under a generous deadline.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    build_federation,
    grant,
    register,
    run_part,
    serve_node,
    submit_approved,
)

from govshare.client.analyst import run_psi
from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.states import EXPIRED, PENDING
from govshare.node.api.server import create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.witness import WitnessStore
from govshare.node.config import NodeConfig
from govshare.node.data.catalog import Catalogue
from govshare.node.home_lock import LOCK_NAME, HomeInUse, holder
from govshare.node.node import Node
from govshare.node.policy import approvals
from govshare.node.policy.crossborder import CrossBorderStore
from govshare.node.policy.grants import GrantStore
from govshare.node.stores.query_store import QueryStore
from govshare.protocols.signed_request import SignedRequest, sign_request
from govshare.protocols.suite import STANDARD
from govshare.rpc.client import NodeClient

# Generous: the machine that runs the suite is shared and slow at times.
TIMEOUT = 120.0
WORKERS = 2  # the nodes' pool size here: a forkserver and two workers per node

CIVIL_COLUMNS = (
    "id_number=join_key:resident_id",
    "district=group_key:domain={districts}",
    "year=plaintext",
    "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
    "amount=aggregate",
)


# --- processes --------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, *, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


serve = serve_node


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=TIMEOUT)


def govshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; (pid, start time) names it even if the pid is reused."""

    pid: int
    ppid: int
    start: int
    state: str
    cmdline: str


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime(22nd field) ...": comm may hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return Proc(pid, int(fields[1]), int(fields[19]), fields[0], cmdline.strip())


def descendants(root: int) -> list[Proc]:
    """Every process below ``root`` in the process tree now."""
    table = [p for p in map(read_proc, _pids()) if p is not None]
    found: list[Proc] = []
    parents = {root}
    while True:
        more = [p for p in table if p.ppid in parents and p not in found]
        if not more:
            return found
        found += more
        parents = {p.pid for p in more}


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def still_running(processes: list[Proc]) -> list[Proc]:
    """Those of ``processes`` that still run (a zombie waiting to be reaped does not)."""
    left = []
    for p in processes:
        now = read_proc(p.pid)
        if now is not None and now.start == p.start and now.state not in ("Z", "X"):
            left.append(now)
    return left


def ended(processes: list[Proc]) -> Callable[[], bool]:
    return lambda: not still_running(processes)


def pool_of(node: subprocess.Popen[str]) -> tuple[list[Proc], list[Proc]]:
    """The node's forkservers and the workers below them."""
    tree = descendants(node.pid)
    servers = [p for p in tree if p.ppid == node.pid and "multiprocessing.forkserver" in p.cmdline]
    workers = [p for p in tree if p.ppid in {s.pid for s in servers}]
    return servers, workers


# --- a federation of two node processes ------------------------------------------------------


def set_option(home: Path, key: str, value: str) -> None:
    config = home / "node.toml"
    text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", config.read_text())
    assert count == 1, key
    config.write_text(text)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[FederationFixture, dict[str, subprocess.Popen[str]]]]:
    """tax.residents and civil.assistance, granted to alice; the node processes are the test's to
    start (in ``processes``) and are stopped after it."""
    fed = build_federation(tmp_path, "lifecyclefed")
    synth.generate(tmp_path / "data", size=300, seed=5)
    for name, dataset, csv, columns in (
        ("tax", "residents", f"{synth.TAX}.csv", TAX_COLUMNS),
        ("civil", "assistance", f"{synth.CIVIL}.csv", CIVIL_COLUMNS),
    ):
        home = fed.node_home(name)
        set_option(home, "workers", str(WORKERS))
        # The peer never answers in the kill test: the node must still be waiting when killed.
        set_option(home, "protocol_timeout", "600.0")
        node = Node.from_home(home)
        try:
            register(node, tmp_path / "data" / csv, name=dataset, columns=columns)
            grant(node, dataset, "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
        finally:
            node.close()
    processes: dict[str, subprocess.Popen[str]] = {}
    yield fed, processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)


def psi_plan() -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip


def signed(alice: Identity, plan: PsiPlan) -> SignedRequest:
    return sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip


# --- one node per home ------------------------------------------------------------------------


def test_a_second_node_on_a_home_is_refused_at_once_and_the_first_still_serves(
    pair: tuple[FederationFixture, dict[str, subprocess.Popen[str]]],
) -> None:
    fed, processes = pair
    home = fed.node_home("tax")
    processes["tax"] = first = serve(home)
    assert holder(home) == first.pid

    second = govshare("node", "serve", "--home", str(home))
    assert second.returncode == 1, (second.stdout, second.stderr)
    assert "serving on" not in second.stdout
    message = second.stderr.strip()
    assert "\n" not in message, message  # the CLI's one line
    assert message.startswith("error: node home ")
    assert str(home) in message and str(home / LOCK_NAME) in message
    assert f"pid {first.pid} holds its lock" in message

    # The first node still answers, and still holds the home.
    assert first.poll() is None
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        assert [d.name for d in client.list_datasets()] == ["residents"]
    assert holder(home) == first.pid

    # Stopped, it lets the home go: the next node starts on it.
    assert stop(first) == 0
    assert holder(home) is None
    processes["tax"] = serve(home)


def test_the_lock_binds_nodes_in_one_process_and_close_lets_it_go(tmp_path: Path) -> None:
    fed = build_federation(tmp_path)
    home = fed.node_home("civil")
    node = Node.from_home(home)
    try:
        with pytest.raises(HomeInUse, match=r"holds its lock .*node\.lock"):
            Node.from_home(home)
    finally:
        node.close()
    node.close()  # twice is harmless
    again = Node.from_home(home)
    again.close()
    assert holder(home) is None


# --- no process outlives its node -------------------------------------------------------------


def test_kill_9_mid_query_leaves_no_process_and_the_home_restarts(
    pair: tuple[FederationFixture, dict[str, subprocess.Popen[str]]],
) -> None:
    """The ledger side of this crash (the reservation returned exactly once, the audit entries)
    is test_disclosure's test_kill_9_mid_query_returns_the_reservation_exactly_once; this one
    is about the processes and the home's lock."""
    fed, processes = pair
    for name in ("tax", "civil"):
        processes[name] = serve(fed.node_home(name))
    alice = fed.identity("alice")
    request = signed(alice, psi_plan())
    query_id = submit_approved(alice, request)

    # Only tax runs: it masks its set in its pool, sends it and waits for civil's, which never
    # comes.
    part = run_part(alice, "tax", query_id, timeout=TIMEOUT * 5)
    runner, failures = part.thread, part.errors

    def pool_busy() -> bool:
        with NodeClient.to(alice, "tax") as client:
            running = client.status(query_id).state == "running"
        servers, workers = pool_of(processes["tax"])
        return running and len(servers) == 1 and len(workers) >= 1

    wait_for(pool_busy, "tax to run the query with its pool")
    tree = descendants(processes["tax"].pid)
    servers, workers = pool_of(processes["tax"])
    assert len(servers) == 1 and 1 <= len(workers) <= WORKERS, tree

    processes["tax"].kill()
    processes["tax"].wait(timeout=TIMEOUT)
    # The forkserver, its workers and the resource tracker all end with the node.
    wait_for(ended(tree), f"the killed node's processes {tree} to end")
    runner.join(timeout=TIMEOUT)
    assert not runner.is_alive() and len(failures) == 1, failures

    # The kernel let the dead node's lock go: a node starts on the home at once, and finds the
    # query it was running failed, with nothing released.
    assert holder(fed.node_home("tax")) is None
    processes["tax"] = serve(fed.node_home("tax"))
    with NodeClient.to(alice, "tax") as client:
        status = client.status(query_id)
    assert status.state == "failed" and "nothing released" in status.message, status
    assert stop(processes["tax"]) == 0
    log = AuditLog.open(NodeConfig.load(fed.node_home("tax")).audit_database_path, suite=STANDARD)
    try:
        kinds = [e.decode().kind for e in log.entries_for_query(query_id)]
    finally:
        log.close()
    assert kinds.count("budget.recovered") == 1 and "result.released" not in kinds, kinds


def test_a_stopped_node_leaves_no_process(
    pair: tuple[FederationFixture, dict[str, subprocess.Popen[str]]],
) -> None:
    fed, processes = pair
    for name in ("tax", "civil"):
        processes[name] = serve(fed.node_home(name))
    outcome = run_psi(fed.identity("alice"), psi_plan(), poll=0.05)
    assert outcome.count >= 0
    # The pool outlives the query (it is the node's), so both nodes have one now.
    trees = {}
    for name in ("tax", "civil"):
        servers, workers = pool_of(processes[name])
        assert len(servers) == 1 and len(workers) >= 1, name
        trees[name] = descendants(processes[name].pid)
    for name in ("tax", "civil"):
        assert stop(processes[name]) == 0
        wait_for(ended(trees[name]), f"{name}'s processes to end")
        assert holder(fed.node_home(name)) is None


# --- expired queries are not approved ---------------------------------------------------------


def gated_civil(tmp_path: Path) -> FederationFixture:
    """civil with a dataset every query of which waits for the operator's approval."""
    fed = build_federation(tmp_path)
    synth.generate(tmp_path / "data", size=100, seed=7)
    node = Node.from_home(fed.node_home("civil"))
    try:
        register(node, tmp_path / "data" / f"{synth.CIVIL}.csv", name="assistance",
                 columns=CIVIL_COLUMNS, require_approval=True)  # fmt: skip
        grant(node, "assistance", "alice", ["id_number"], [QueryKind.PSI_CARDINALITY])
    finally:
        node.close()
    return fed


def submit_pending(fed: FederationFixture, count: int) -> list[SignedRequest]:
    """``count`` queries submitted to civil, each left pending its operator's approval."""
    alice = fed.identity("alice")
    config = NodeConfig.load(fed.node_home("civil"))
    node = Node.from_config(config)
    running = create_server(node, config.listen)
    try:
        requests = [signed(alice, psi_plan()) for _ in range(count)]
        for request in requests:
            with NodeClient.to(alice, "civil") as client:
                assert client.submit(request.encode()).state == PENDING
    finally:
        running.stop(0)
        node.close()
    return requests


def civil_at(fed: FederationFixture, now: float) -> Node:
    """civil as from_config builds it, but with its clock at ``now``."""
    config = NodeConfig.load(fed.node_home("civil"))
    return Node(
        identity=Identity.load(config.identity_dir),
        catalogue=Catalogue(config.database_path),
        grants=GrantStore(config.database_path),
        crossborder_store=CrossBorderStore(config.database_path),
        query_store=QueryStore(config.database_path),
        audit=AuditLog.open(config.audit_database_path, suite=STANDARD),
        witness_store=WitnessStore(config.database_path),
        clock=lambda: now,
    )


def settled_kinds(node: Node, query_id: str) -> list[str]:
    return [e.decode().kind for e in node.audit.entries_for_query(query_id)]


def test_an_expired_query_cannot_be_approved(tmp_path: Path) -> None:
    fed = gated_civil(tmp_path)
    late, on_time = submit_pending(fed, 2)
    deadline = late.expires_at
    node = civil_at(fed, time.time())
    try:
        # At its deadline the request has expired: the operator's approval is refused, the
        # query marked expired and its reservation returned; no approval is logged.
        with pytest.raises(approvals.QueryExpired, match=rf"query {late.query_id_hex} expired"):
            approvals.decide(
                node.query_store, node.audit, late.query_id_hex, approve=True,
                operator="operator:civil", now=deadline, suite=STANDARD,
            )  # fmt: skip
        record = node.query_store.get(late.query_id_hex)
        assert record.state == EXPIRED
        assert node.query_store.reservation(late.query_id_hex) == "returned"
        kinds = settled_kinds(node, late.query_id_hex)
        assert "budget.settled" in kinds and "approval.granted" not in kinds, kinds
        # Denying it is refused alike: it is no longer the operator's to decide.
        with pytest.raises(approvals.QueryExpired):
            approvals.decide(
                node.query_store, node.audit, late.query_id_hex, approve=False,
                operator="operator:civil", reason="too late", now=deadline, suite=STANDARD,
            )  # fmt: skip
        # A second before its deadline, a query is approved as ever.
        approved = approvals.decide(
            node.query_store, node.audit, on_time.query_id_hex, approve=True,
            operator="operator:civil", now=on_time.expires_at - 1, suite=STANDARD,
        )  # fmt: skip
        assert approved.state == "approved"
    finally:
        node.close()

    # The operator's command says so, in one line, from another process.
    refused = govshare(
        "approvals", "approve", late.query_id_hex, "--home", str(fed.node_home("civil")),
        "--identity", fed.operator("civil"),
    )  # fmt: skip
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    message = refused.stderr.strip()
    assert "\n" not in message and f"query {late.query_id_hex} expired" in message, message
    assert "will not run" in message


def test_a_node_expires_stale_queries_when_it_starts(tmp_path: Path) -> None:
    fed = gated_civil(tmp_path)
    (request,) = submit_pending(fed, 1)
    query_id = request.query_id_hex
    listed = govshare("approvals", "list", "--home", str(fed.node_home("civil")), "--json")
    assert listed.returncode == 0, listed.stderr
    assert f'"expires_at": {request.expires_at}' in listed.stdout
    # The node starts after the request's deadline (its clock says so): the query is expired
    # before anything else happens, not left for the operator to approve.
    node = civil_at(fed, request.expires_at + 1)
    try:
        assert node.query_store.get(query_id).state == EXPIRED
        assert node.query_store.reservation(query_id) == "returned"
        assert approvals.pending(node.query_store, suite=STANDARD) == []
        assert "budget.settled" in settled_kinds(node, query_id)
    finally:
        node.close()
    refused = govshare(
        "approvals", "approve", query_id, "--home", str(fed.node_home("civil")),
        "--identity", fed.operator("civil"),
    )  # fmt: skip
    assert refused.returncode == 1 and f"query {query_id} expired" in refused.stderr
