"""Operating a node: metrics scraped during a real query, a health check that needs no
certificate and writes nothing to the audit log, and a JSON log line per query event.

Real in-process nodes over mutual TLS with their metrics endpoints on port 0, and one real
``govshare node serve`` process. Nothing waits a fixed time: every wait polls a condition under
a generous deadline.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    CIVIL_COLUMNS,
    PSI_EPSILON,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    build_federation,
    free_port,
    grant,
    register,
)
from prometheus_client.parser import text_string_to_metric_families

from govshare.client.analyst import PsiOutcome, run_psi
from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.api.server import RunningNode, create_server
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.node.observability.endpoint import ServiceEndpoint
from govshare.node.observability.logs import JsonLogs, pipe_has_room
from govshare.protocols.errors import MalformedInput, PermissionDenied, PolicyRefused
from govshare.rpc.client import NodeClient

TIMEOUT = 120.0
KIND = QueryKind.PSI_CARDINALITY.value


def wait_for(condition: Callable[[], bool], what: str, *, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Served:
    node: Node
    running: RunningNode

    @property
    def http(self) -> str:
        assert self.running.endpoint is not None
        return f"http://127.0.0.1:{self.running.endpoint.port}"


@pytest.fixture(scope="module")
def two(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FederationFixture, dict[str, Served]]]:
    """tax (one turn: max_running 1) and civil, each with its metrics endpoint on port 0."""
    root = tmp_path_factory.mktemp("observed")
    fed = build_federation(root, "obsfed")
    served: dict[str, Served] = {}
    try:
        for name in ("tax", "civil"):
            config = NodeConfig.load(fed.node_home(name))
            if name == "tax":
                config = dataclasses.replace(config, max_running=1)
            node = Node.from_config(config)
            running = create_server(node, config.listen, metrics_address="127.0.0.1:0")
            served[name] = Served(node, running)
        data = root / "data"
        synth.generate(data, size=120, seed=11)
        tax, civil = served["tax"].node, served["civil"].node
        register(tax, data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
        register(civil, data / f"{synth.CIVIL}.csv", name="assistance", columns=CIVIL_COLUMNS)
        kinds = [QueryKind.PSI_CARDINALITY]
        grant(tax, "residents", "alice", ["id_number", "income_band", "year"], kinds)
        grant(civil, "assistance", "alice", ["id_number", "year"], kinds)
        yield fed, served
    finally:
        for s in served.values():
            s.running.stop(0)
            s.node.close()


def plan(purpose: str = PURPOSE) -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_CARDINALITY,
        purpose=purpose,
        left=Side("tax", "residents", "id_number"),
        right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's /metrics, by (name, sorted labels)."""
    code, text = get(served.http + "/metrics")
    assert code == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_scraped_during_a_query_show_its_queue_then_its_outcome(
    two: tuple[FederationFixture, dict[str, Served]],
) -> None:
    fed, served = two
    tax = served["tax"]
    before = {name: scrape(s) for name, s in served.items()}
    # Hold tax's only turn, so the query's run there waits in the queue while we scrape.
    hold = threading.Event()
    enter = tax.node.gate.admit("held-by-the-test")
    holder = threading.Thread(target=enter, args=(lambda: hold.wait(TIMEOUT),), daemon=True)
    holder.start()
    outcomes: list[PsiOutcome | BaseException] = []

    def ask() -> None:
        try:
            outcomes.append(run_psi(fed.identity("alice"), plan()))
        except BaseException as exc:
            outcomes.append(exc)

    query = threading.Thread(target=ask, daemon=True)
    try:
        wait_for(lambda: tax.node.gate.load().computing == 1, "the test to hold tax's turn")
        query.start()
        wait_for(
            lambda: value(scrape(tax), "govshare_query_runs_queued") >= 1,
            "the query's run to queue at tax",
        )
        during = scrape(tax)
        assert value(during, "govshare_query_runs_computing") == 1
        assert value(during, "govshare_query_runs_limit", limit="running") == 1
        assert value(during, "govshare_queries_received_total", kind=KIND) == (
            value(before["tax"], "govshare_queries_received_total", kind=KIND) + 1
        )
        assert value(during, "govshare_queries_total", kind=KIND, outcome="released") == (
            value(before["tax"], "govshare_queries_total", kind=KIND, outcome="released")
        )
    finally:
        hold.set()
        holder.join(TIMEOUT)
        query.join(TIMEOUT)
    assert len(outcomes) == 1 and isinstance(outcomes[0], PsiOutcome), outcomes
    for name, s in served.items():
        after = scrape(s)
        released = ("govshare_queries_total", {"kind": KIND, "outcome": "released"})
        assert value(after, released[0], **released[1]) == (
            value(before[name], released[0], **released[1]) + 1
        ), name
        runs = "govshare_query_run_seconds_count"
        assert value(after, runs, kind=KIND) == value(before[name], runs, kind=KIND) + 1
        assert value(after, "govshare_query_runs_queued") == 0
        assert value(after, "govshare_query_runs_computing") == 0
        dataset = "residents" if name == "tax" else "assistance"
        spent = value(after, "govshare_epsilon_spent_total", dataset=dataset)
        assert spent == value(before[name], "govshare_epsilon_spent_total", dataset=dataset) + 2
        assert value(after, "govshare_rpcs_total", method="govshare.v1.Query/Run", code="OK") >= 1
        assert value(after, "govshare_serving") == 1


def test_a_refusal_and_a_forbidden_call_are_counted_by_outcome_and_code(
    two: tuple[FederationFixture, dict[str, Served]],
) -> None:
    fed, served = two
    tax = served["tax"]
    before = scrape(tax)
    with pytest.raises(PolicyRefused):
        run_psi(fed.identity("alice"), plan(purpose="curiosity"))
    with NodeClient.to(fed.identity("audra"), "tax") as client:  # auditors may not list
        with pytest.raises(PermissionDenied):
            client.list_datasets()
    after = scrape(tax)
    assert value(after, "govshare_queries_total", kind=KIND, outcome="refused") == (
        value(before, "govshare_queries_total", kind=KIND, outcome="refused") + 1
    )
    method = "govshare.v1.Catalog/ListDatasets"
    denied = value(before, "govshare_rpcs_total", method=method, code="PERMISSION_DENIED")
    # The server counts an RPC once its status is sent, so the client may see the refusal
    # first: wait (generously) for the count, then check it moved by exactly one.
    deadline = time.monotonic() + 60
    while (
        value(after, "govshare_rpcs_total", method=method, code="PERMISSION_DENIED") == denied
        and time.monotonic() < deadline
    ):
        threading.Event().wait(0.05)
        after = scrape(tax)
    assert value(after, "govshare_rpcs_total", method=method, code="PERMISSION_DENIED") == (
        denied + 1
    )


def test_each_node_counts_in_its_own_registry(
    two: tuple[FederationFixture, dict[str, Served]],
) -> None:
    _, served = two
    tax, civil = served["tax"].running.metrics, served["civil"].running.metrics
    assert tax is not None and civil is not None and tax.registry is not civil.registry
    limits = value(scrape(served["civil"]), "govshare_query_runs_limit", limit="running")
    assert limits == served["civil"].node.max_running != 1


def test_healthz_needs_no_certificate_and_writes_nothing_to_the_audit_log(
    two: tuple[FederationFixture, dict[str, Served]],
) -> None:
    _, served = two
    tax = served["tax"]
    size = tax.node.audit.size
    for _ in range(3):
        assert get(tax.http + "/healthz") == (200, "serving\n")
    assert get(tax.http + "/nothing")[0] == 404
    assert tax.node.audit.size == size


def test_healthz_answers_503_with_the_reason_while_the_node_refuses() -> None:
    reasons: list[str | None] = [None]
    endpoint = ServiceEndpoint(
        "127.0.0.1:0", metrics=lambda: b"", refusal=lambda: reasons[0]
    ).start()
    try:
        url = f"http://127.0.0.1:{endpoint.port}/healthz"
        assert get(url) == (200, "serving\n")
        broken = "node tax refuses to serve: its audit log is broken at entry 17"
        reasons[0] = broken
        assert get(url) == (503, broken + "\n")
    finally:
        endpoint.stop()


def test_a_json_log_line_for_each_query_event(
    two: tuple[FederationFixture, dict[str, Served]], tmp_path: Path
) -> None:
    fed, _ = two
    path = tmp_path / "node.log"
    logs = JsonLogs(path).attach()
    logs.start()
    try:
        outcome = run_psi(fed.identity("alice"), plan())
    finally:
        logs.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    mine = [line for line in lines if line.get("query_id") == outcome.query_id]
    for node in ("tax", "civil"):
        events = [line["event"] for line in mine if line["node"] == node]
        assert events == [
            "query.received",
            "query.decided",
            "query.running",
            "query.released",
            "query.settled",
        ], (node, events)
        decided = next(
            line for line in mine if line["node"] == node and line["event"] == "query.decided"
        )
        assert decided["allowed"] is True and decided["rule"] and decided["kind"] == KIND
        settled = next(
            line for line in mine if line["node"] == node and line["event"] == "query.settled"
        )
        assert (settled["reservation"], settled["epsilon"]) == ("spent", "2")
    assert all({"ts", "level", "event", "message"} <= set(line) for line in lines)


def test_a_failed_query_is_logged_at_warning_with_its_reason(
    two: tuple[FederationFixture, dict[str, Served]], tmp_path: Path
) -> None:
    fed, _ = two
    path = tmp_path / "node.log"
    logs = JsonLogs(path).attach()
    logs.start()
    try:
        with pytest.raises(PolicyRefused):
            run_psi(fed.identity("alice"), plan(purpose="curiosity"))
    finally:
        logs.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    refused = [line for line in lines if line["event"] == "query.decided"]
    assert refused and all(line["allowed"] is False and line["rule"] for line in refused)
    assert all(line["query_id"] == refused[0]["query_id"] for line in refused)


def test_a_stalled_log_destination_drops_lines_and_never_blocks(tmp_path: Path) -> None:
    read, write = os.pipe()  # nobody reads: the pipe fills
    os.set_blocking(read, False)
    logs = JsonLogs(Path(f"/dev/fd/{write}"), capacity=10)
    try:
        logs.emit(make_record("first"))
        for i in range(100):  # the writer is not started: the queue holds 10, drops the rest
            logs.emit(make_record(f"line {i}"))
        assert logs.dropped == 91
        logs.start()
        wait_for(lambda: _readable(read), "the writer to write")
    finally:
        logs.close(timeout=1)
        os.close(read)
        os.close(write)
    # the first line written says how many were dropped


def test_a_pipe_nobody_reads_is_never_filled_past_half(tmp_path: Path) -> None:
    """The node's stdout lines after start-up ("node tax stopping") must still fit where stdout
    and stderr share a pipe that the parent stopped reading."""
    read, write = os.pipe()
    logs = JsonLogs(Path(f"/dev/fd/{write}"), capacity=100_000)
    try:
        logs.start()
        for i in range(2000):  # about 200 KB of lines: three pipes' worth
            logs.emit(make_record(f"line {i} " + "x" * 50))
        wait_for(lambda: logs._lines.empty(), "the writer to take every line")
        assert logs.dropped > 0
        assert pipe_has_room(write, 0)
        unread = len(os.read(read, 1 << 20))
        assert 0 < unread <= fcntl.fcntl(write, fcntl.F_GETPIPE_SZ) // 2
    finally:
        logs.close(timeout=1)
        os.close(read)
        os.close(write)


def _readable(fd: int) -> bool:
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return False
    first = json.loads(data.decode().splitlines()[0])
    assert first["event"] == "log.dropped" and first["dropped"] == 91, first
    return True


def make_record(message: str) -> logging.LogRecord:
    return logging.LogRecord("govshare.node", logging.INFO, __file__, 0, message, (), None)


# --- the config -------------------------------------------------------------------------------


def test_observability_settings_and_the_environment_override(tmp_path: Path) -> None:
    fed = build_federation(tmp_path)
    home = fed.node_home("tax")
    config = NodeConfig.load(home, environ={})
    assert (config.log_file, config.log_level, config.metrics_address) == (None, "info", None)
    text = (home / "node.toml").read_text()
    (home / "node.toml").write_text(
        text.replace('log = "stderr"', 'log = "node.log"')
        .replace('log_level = "info"', 'log_level = "warning"')
        .replace('metrics = ""', 'metrics = "127.0.0.1:9102"')
    )
    config = NodeConfig.load(home, environ={})
    assert (config.log_file, config.log_level, config.metrics_address) == (
        home / "node.log", "warning", "127.0.0.1:9102",
    )  # fmt: skip
    assert NodeConfig.load(home, environ={"GOVSHARE_METRICS": ""}).metrics_address is None
    moved = NodeConfig.load(home, environ={"GOVSHARE_METRICS": "0.0.0.0:9200"})
    assert moved.metrics_address == "0.0.0.0:9200"
    (home / "node.toml").write_text(text.replace('log_level = "info"', 'log_level = "loud"'))
    with pytest.raises(MalformedInput, match="log_level"):
        NodeConfig.load(home, environ={})


# --- a real `govshare node serve` ---------------------------------------------------------------


def test_node_serve_keeps_its_human_lines_first_and_logs_json_on_stderr(tmp_path: Path) -> None:
    fed = build_federation(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "govshare.cli", "node", "serve",
         "--home", str(fed.node_home("tax"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "GOVSHARE_METRICS": f"127.0.0.1:{port}"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert "serving on" in process.stdout.readline()
        assert process.stdout.readline().startswith("audit log verified: ")
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "serving\n")
        code, text = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and "govshare_query_runs_queued 0.0" in text
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert stdout.splitlines() == ["node tax stopping", "node tax stopped"]
    lines = [json.loads(line) for line in stderr.splitlines()]
    events = [line["event"] for line in lines]
    assert events == ["node.serving", "node.stopping", "node.stopped"], lines
    assert lines[0]["metrics"] == f"127.0.0.1:{port}" and lines[0]["refusal"] is None
