"""The Ray compute backend against a real local Ray head (2 CPUs, started and stopped here).

Same answers as the local process pool, on the protocol functions themselves and through real
nodes over mutual TLS; a head killed mid-query aborts that query with nothing released, and the
node keeps serving (its next query, once a cluster is back, runs on a new connection).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
from conftest import (
    CIVIL_COLUMNS,
    TAX_COLUMNS,
    FederationFixture,
    build_federation,
    free_port,
    grant,
    in_process_node,
    intersection_plan,
    served,
)
from conftest import register as register_csv

from govshare.client.analyst_aggregate import AggregateOutcome, run_intersection_aggregate
from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.states import FAILED
from govshare.node import compute
from govshare.node.compute.ray_cluster import RayExecutor
from govshare.node.config import NodeConfig, write_default
from govshare.node.node import Node
from govshare.node.workers import make_pool
from govshare.protocols import ecdh_psi
from govshare.protocols.errors import Aborted, MalformedInput, Unavailable

P = ParamSpec("P")
T = TypeVar("T")

RAY = str(Path(sys.executable).parent / "ray")
KEY_BITS = 1024  # small test keys; the 3072-bit path is the same code on another backend
KINDS = [QueryKind.INTERSECTION_AGGREGATE]


@dataclass
class Head:
    """A Ray head started by the test, in a process group of its own."""

    address: str
    port: int
    process: subprocess.Popen[str]

    def restart(self) -> None:
        """A new head at this address, in place of this one (killed)."""
        self.process = start_head(self.port).process

    def kill(self) -> None:
        """End the head and every process of it (GCS, raylet, workers) at once: its process
        group, then whatever else is in its session (Ray puts some workers in process groups
        of their own)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for pid in in_session(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def in_session(sid: int) -> list[int]:
    """The processes of session ``sid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
            # "pid (comm) state ppid pgrp session ...": comm may hold spaces; split after it.
            if int(stat.rpartition(")")[2].split()[3]) == sid:
                found.append(int(entry.name))
    return found


def start_head(port: int | None = None) -> Head:
    """``ray start --head --block`` with 2 CPUs on free ports, returned once it runs."""
    port = port or free_port()
    temp_dir = tempfile.mkdtemp(prefix="gsray", dir="/tmp")  # short: Ray's socket paths
    process = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
            "--disable-usage-stats", "--include-dashboard", "false", "--temp-dir", temp_dir,
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # blocks until the head runs (or ray start ends)
        seen.append(line)
        if "Ray runtime started" in line:
            break
    else:
        process.wait()
        raise AssertionError("ray start failed:\n" + "".join(seen[-20:]))
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return Head(f"127.0.0.1:{port}", port, process)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    started = start_head()
    yield started
    started.kill()


# --- the executor on the protocol functions ---------------------------------------------------


def test_ray_and_local_executors_give_identical_masked_points(head: Head) -> None:
    scalar, query_id = ecdh_psi.generate_scalar(), os.urandom(16)
    keys = [f"resident-{i}".encode() for i in range(5000)]
    ray = RayExecutor(head.address, connect_timeout=300)
    try:
        with make_pool(2) as pool:
            local_once = ecdh_psi.hash_and_mask_many(scalar, query_id, keys, executor=pool)
            local_twice = ecdh_psi.mask_many(scalar, local_once, executor=pool)
        ray_once = ecdh_psi.hash_and_mask_many(scalar, query_id, keys, executor=ray)
        ray_twice = ecdh_psi.mask_many(scalar, ray_once, executor=ray)
        assert ray_once == local_once and ray_twice == local_twice
        assert len(set(ray_twice)) == len(keys)
        # What the call raises comes back as itself, as from the local pool.
        with pytest.raises(MalformedInput, match="small order"):
            ecdh_psi.mask_many(scalar, [bytes(32)] * 3, executor=ray)
        assert ray.broken is None
    finally:
        ray.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        ray.submit(len, b"")


def test_an_address_where_no_cluster_answers_fails_calls_with_unavailable() -> None:
    ray = RayExecutor(f"127.0.0.1:{free_port()}", connect_timeout=5)
    try:
        with pytest.raises(Unavailable, match="no Ray cluster answered"):
            ray.submit(len, b"abc").result(timeout=300)
        assert ray.broken is not None and not compute.usable(ray)
        with pytest.raises(Unavailable):
            ray.submit(len, b"abc")
    finally:
        ray.shutdown()


# --- real nodes -------------------------------------------------------------------------------


class Watched(Executor):
    """A node's executor as opened, counting calls; ``on_first`` runs after the first one is
    handed over (the test's "mid-query" instant: the query runs and a task is out)."""

    def __init__(self, inner: Executor, on_first: Callable[[], None] | None) -> None:
        self.inner, self.on_first, self.calls = inner, on_first, 0

    @property
    def broken(self) -> str | None:
        return None if compute.usable(self.inner) else "inner executor broken"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future = self.inner.submit(fn, *args, **kwargs)
        self.calls += 1
        hook, self.on_first = self.on_first, None
        if hook is not None:
            hook()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait, cancel_futures=cancel_futures)


@dataclass
class Fed:
    fed: FederationFixture
    data: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    fixture = build_federation(tmp_path_factory.mktemp("rayfed"), "rayfed")
    data = tmp_path_factory.mktemp("raydata")
    # 1,000 rows: twelve districts of the join reach k = 5 (the sums test asks for three).
    manifest = synth.generate(data, size=1000, seed=11)
    nodes = {n: in_process_node(fixture, n, workers=2) for n in ("tax", "civil")}
    try:
        register_csv(nodes["tax"], data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
        register_csv(
            nodes["civil"], data / f"{synth.CIVIL}.csv", name="assistance", columns=CIVIL_COLUMNS
        )
        grant(nodes["tax"], "residents", "alice", ["id_number", "income_band", "year"], KINDS)
        grant(
            nodes["civil"], "assistance", "alice", ["id_number", "year", "district", "amount"],
            KINDS,
        )  # fmt: skip
    finally:
        for node in nodes.values():
            node.close()
    return Fed(fixture, data, manifest)


def serving(fed: Fed, settings: compute.ComputeSettings) -> AbstractContextManager[dict[str, Node]]:
    """tax and civil served over mutual TLS with one compute backend."""
    return served(fed.fed, ("tax", "civil"), workers=2, compute_settings=settings)


def ask(fed: Fed) -> AggregateOutcome:
    return run_intersection_aggregate(
        fed.fed.identity("alice"), intersection_plan(), key_bits=KEY_BITS,
        unsafe_allow_short_modulus=True, run_timeout=600,
    )  # fmt: skip


def figures(outcome: AggregateOutcome) -> dict[str, tuple[int | None, int | None]]:
    return {
        g.label: (g.count.value, None if g.suppressed else g.sums["amount"].value)
        for g in outcome.groups
    }


def plain_join(data: Path) -> dict[str, tuple[int, int]]:
    """The plan's answer in plain Python over the CSVs: civil's 2025 rows whose resident is in
    tax's file, per district, (count, sum of amount)."""
    with open(data / f"{synth.TAX}.csv", newline="", encoding="utf-8") as handle:
        residents = {row["id_number"].upper() for row in csv.DictReader(handle)}
    groups: dict[str, tuple[int, int]] = {}
    with open(data / f"{synth.CIVIL}.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["year"] == "2025" and row["id_number"].upper() in residents:
                count, total = groups.get(row["district"], (0, 0))
                groups[row["district"]] = (count + 1, total + int(row["amount"]))
    return groups


def watch(
    monkeypatch: pytest.MonkeyPatch, on_first: Callable[[], None] | None = None
) -> list[Watched]:
    """Wrap every executor the nodes open from now on; the first call anywhere runs on_first."""
    opened: list[Watched] = []
    real = compute.open_executor
    hook = [on_first]

    def open_watched(settings: compute.ComputeSettings, workers: int | None = None) -> Executor:
        watched = Watched(real(settings, workers), hook.pop() if hook else None)
        opened.append(watched)
        return watched

    monkeypatch.setattr(compute, "open_executor", open_watched)
    return opened


def test_real_nodes_on_ray_give_the_local_sums(
    head: Head, fed: Fed, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = watch(monkeypatch)
    answers = {}
    for settings in (compute.ComputeSettings(), compute.ComputeSettings("ray", head.address)):
        with serving(fed, settings):
            answers[settings.backend] = figures(ask(fed))
    assert answers["ray"] == answers["local"]
    expected = plain_join(fed.data)
    released = {label: v for label, v in answers["ray"].items() if v[1] is not None}
    assert len(released) >= 3
    for label, figure in released.items():
        assert figure == expected[label], label
    # Both runs used their backend: every node's masking and encryption went through it.
    local, ray = opened[:2], opened[2:]
    assert all(isinstance(w.inner, RayExecutor) and w.calls > 0 for w in ray), ray
    assert all(not isinstance(w.inner, RayExecutor) and w.calls > 0 for w in local)


def test_head_killed_mid_query_aborts_with_nothing_released_and_the_node_serves_on(
    head: Head, fed: Fed, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module's head is the one killed; a new one at its address then takes its place.
    opened = watch(monkeypatch, on_first=head.kill)
    with serving(fed, compute.ComputeSettings("ray", head.address)) as nodes:
        with pytest.raises((Aborted, Unavailable)) as failure:
            ask(fed)
        assert "Ray cluster" in str(failure.value) or "nothing released" in str(failure.value)
        assert head.process.poll() is not None and opened[0].calls >= 1
        reasons = []
        (query_id,) = {r.query_id for r in nodes["tax"].query_store.with_state(FAILED)}
        for name, node in nodes.items():
            assert node.query_store.get(query_id).state == FAILED, name
            entries = [e.decode() for e in node.audit.entries_for_query(query_id)]
            kinds = [e.kind for e in entries]
            assert "query.failed" in kinds and "result.released" not in kinds, (name, kinds)
            assert node.query_store.reservation(query_id) == "returned", name
            reasons += [str(e.fields["reason"]) for e in entries if e.kind == "query.failed"]
        # The node whose tasks were lost names the cluster; its peer was told to abort.
        assert any("Ray cluster" in reason for reason in reasons), reasons
        # The node serves on: a cluster back at the same address runs the next query in full.
        head.restart()
        outcome = ask(fed)
        assert sum(count or 0 for count, _ in figures(outcome).values()) > 0
        assert len(opened) > 2  # the nodes opened new executors on the new cluster


# --- configuration ----------------------------------------------------------------------------


def test_compute_section_is_parsed_and_bad_values_refused(tmp_path: Path) -> None:
    write_default(tmp_path, listen="127.0.0.1:1")
    config = tmp_path / "node.toml"
    template = config.read_text(encoding="utf-8")
    assert NodeConfig.load(tmp_path).compute == compute.ComputeSettings()  # the template's
    config.write_text(
        template.replace('backend = "local"', 'backend = "ray"')
        .replace('address = "auto"', 'address = "ray://head.tax.local:10001"')
        .replace("num_cpus = 1", "num_cpus = 2"),
        encoding="utf-8",
    )
    assert NodeConfig.load(tmp_path).compute == compute.ComputeSettings(
        "ray", "ray://head.tax.local:10001", num_cpus=2.0
    )
    for old, new, field in [
        ('backend = "local"', 'backend = "spark"', "backend"),
        ('backend = "local"', 'backend = "ray"\naddress = "head"', "address"),
        ("num_cpus = 1", "num_cpus = 0", "num_cpus"),
        ("num_cpus = 1", 'num_cpus = "one"', "num_cpus"),
    ]:
        config.write_text(template.replace(old, new, 1).replace('address = "auto"\n', ""))
        with pytest.raises(MalformedInput) as refused:
            NodeConfig.load(tmp_path)
        assert refused.value.field == field, (new, refused.value)


def test_a_node_on_the_local_backend_never_imports_ray() -> None:
    code = (
        "import sys\n"
        "from govshare.node import compute\n"
        "from govshare.node.node import Node\n"
        "from govshare.node.api import server\n"
        "pool = compute.open_executor(compute.ComputeSettings(), 1)\n"
        "assert pool.submit(sum, [1, 2]).result() == 3\n"
        "pool.shutdown()\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
