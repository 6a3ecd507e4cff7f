"""Shared fixtures: a real federation on disk and real node servers over mutual TLS."""

from __future__ import annotations

import collections
import datetime as dt
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from govshare.examples import synth
from govshare.model.aggregate_plan import Figures, GroupSpec, IntersectionPlan, SumSpec
from govshare.model.conditions import Condition
from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    Grade,
    Owner,
    OwnerKind,
    QueryKind,
    Role,
    SharingType,
)
from govshare.model.identity import Federation, Identity, init_federation
from govshare.model.operator_act import Duty
from govshare.model.query_plan import Side
from govshare.model.states import FAILED
from govshare.node.api.server import RunningNode, create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.witness import WitnessStore
from govshare.node.config import NodeConfig, write_default
from govshare.node.data.at_rest import open_at_rest
from govshare.node.data.catalog import Catalogue
from govshare.node.data.mask_key import MaskSecret
from govshare.node.node import Node
from govshare.node.policy.grants import GrantStore
from govshare.node.queries.kinds.aggregate import AggregateOptions
from govshare.node.stores.query_store import QueryStore
from govshare.protocols import dp
from govshare.protocols.auditverify import AuditEntry
from govshare.protocols.errors import Aborted, GovshareError
from govshare.protocols.signed_request import SignedRequest
from govshare.protocols.suite import STANDARD, Suite
from govshare.rpc.client import DEFAULT_TIMEOUT, NodeClient

if TYPE_CHECKING:
    from govshare.examples.postgres import PgServer

REPO = Path(__file__).resolve().parents[1]

# No test depends on timing: the machine that runs the suite is shared and slow at times, so
# Hypothesis never fails an example for taking long (its default deadline is 200 ms). Loaded
# here, before any test module builds its own @settings, which inherit it.
settings.register_profile("govshare", deadline=None)
settings.load_profile("govshare")


# The last lines each node process started by serve_node printed, by pid (for stop_node).
_SERVED_OUTPUT: dict[int, tuple[collections.deque[str], threading.Thread]] = {}


def serve_node(home: Path) -> subprocess.Popen[str]:
    """``govshare node serve`` on ``home`` as a real process, returned once it serves. Python's
    faulthandler is on in it, so that :func:`stop_node` can have it print its threads."""
    process = subprocess.Popen(
        [sys.executable, "-m", "govshare.cli", "node", "serve", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the node serves (or dies)
    assert "serving on" in line, line
    # Keep reading, so that a node printing more never blocks on a full pipe; keep the tail.
    tail: collections.deque[str] = collections.deque(maxlen=400)
    reader = threading.Thread(target=tail.extend, args=(process.stdout,), daemon=True)
    _SERVED_OUTPUT[process.pid] = (tail, reader)
    reader.start()
    return process


def stop_node(process: subprocess.Popen[str], *, timeout: float = 60.0) -> int:
    """SIGTERM a node :func:`serve_node` started and return its exit code. A node still
    running after ``timeout`` seconds gets SIGABRT, which makes faulthandler print every
    thread's stack, and the test fails with the node's last lines."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait(timeout=60.0)
        tail, reader = _SERVED_OUTPUT.get(process.pid, (None, None))
        if reader is not None:
            reader.join(60.0)  # it ends at the pipe's end, once it took the dump
        lines = "".join(tail or ())
        raise AssertionError(
            f"the node did not stop within {timeout:g} s of SIGTERM; its last lines:\n{lines}"
        ) from None


def wait_for_next_second(second: int) -> None:
    """Return once the wall clock reads a later whole second than ``second`` (a condition
    polled: for rules that compare whole seconds)."""
    while int(time.time()) <= second:
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class FederationFixture:
    root: Path
    directory: Path
    federation: Federation
    bundles: dict[str, Path]

    def identity(self, name: str) -> Identity:
        return Identity.load(self.bundles[name])

    def node_home(self, name: str) -> Path:
        return self.bundles[name]

    def operator(self, node: str) -> str:
        """The bundle of ``node``'s named operator (every duty), for ``--identity``."""
        return str(self.bundles[f"op-{node}"])


def build_federation(
    root: Path, name: str = "testfed", suite: Suite = STANDARD
) -> FederationFixture:
    """A federation with two nodes, two analysts (CN, HK), an auditor and an expired analyst."""
    directory = root / "federation"
    init_federation(directory, name, suite=suite)
    federation = Federation.load(directory)
    bundles: dict[str, Path] = {}
    members = [
        (Role.NODE, "tax", "CN"),
        (Role.NODE, "civil", "CN"),
        (Role.NODE, "ghost", "CN"),  # enrolled, never started: an unreachable peer
        (Role.ANALYST, "alice", "CN"),
        (Role.ANALYST, "hkana", "HK"),
        (Role.AUDITOR, "audra", "CN"),
    ]
    for role, member, jurisdiction in members:
        address = f"127.0.0.1:{free_port()}" if role is Role.NODE else ""
        federation, _ = federation.enrol(
            role=role,
            name=member,
            jurisdiction=jurisdiction,
            address=address,
            out=root / member,
        )
        bundles[member] = root / member
    # Expired two years ago: the TLS handshake must refuse it.
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=730)
    federation, _ = federation.enrol(
        role=Role.ANALYST, name="expired", jurisdiction="CN", out=root / "expired", now=long_ago
    )
    bundles["expired"] = root / "expired"
    # A named operator of each served node, with every duty (govshare.model.operator_act).
    for node in ("tax", "civil"):
        federation, _ = federation.enrol(
            role=Role.OPERATOR, name=f"op-{node}", jurisdiction="CN", out=root / f"op-{node}",
            node=node, duties=tuple(d.value for d in Duty),
        )  # fmt: skip
        bundles[f"op-{node}"] = root / f"op-{node}"
    for bundle in bundles.values():
        federation.publish_roster(bundle)
    for role, member, _ in members:
        if role is Role.NODE:
            address = federation.roster.member(member).address
            write_default(bundles[member], listen=address)
            # The whole suite asks many queries within a minute; the rate limit has its own test.
            config = bundles[member] / "node.toml"
            config.write_text(
                config.read_text().replace(
                    "rate_limit_per_minute = 30", "rate_limit_per_minute = 100000"
                )
            )
    return FederationFixture(root, directory, federation, bundles)


@pytest.fixture(scope="session")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    return build_federation(tmp_path_factory.mktemp("fed"))


@pytest.fixture(scope="session")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    """Another federation whose analyst is also called 'alice': its CA is not ours."""
    return build_federation(tmp_path_factory.mktemp("foreign"), "otherfed")


# Test-only switches of the aggregate engine: exact figures (no DP noise), short moduli allowed.
EXACT = AggregateOptions(unsafe_allow_short_modulus=True, unsafe_without_noise=True)


def in_process_node(fed: FederationFixture, name: str, **options: Any) -> Node:
    """Node ``name`` of ``fed`` built in this process on its home's stores (identity, catalogue,
    grants, queries, witness, masking secret, and the audit log on the roster's suite), for tests
    that set a node's test-only switches. ``options`` are further :class:`Node` fields; unless
    given: a 600 s protocol timeout, one worker and :data:`EXACT` aggregates."""
    config = NodeConfig.load(fed.node_home(name))
    identity = Identity.load(config.identity_dir)
    fields: dict[str, Any] = {
        "protocol_timeout": 600.0, "workers": 1, "aggregate_options": EXACT,
        "mask_secret": MaskSecret.load_or_create(config.home),
    } | options  # fmt: skip
    return Node(
        identity=identity,
        catalogue=Catalogue(config.database_path),
        grants=GrantStore(config.database_path),
        query_store=QueryStore(config.database_path),
        audit=AuditLog.open(config.audit_database_path, suite=identity.roster.crypto),
        witness_store=WitnessStore(config.database_path),
        **fields,
    )


@contextmanager
def served(
    fed: FederationFixture, names: Iterable[str], **options: Any
) -> Iterator[dict[str, Node]]:
    """:func:`in_process_node` for each of ``names`` (with ``options``), each served over mutual
    TLS at its roster address; the servers are stopped and the nodes closed on leaving."""
    nodes: dict[str, Node] = {}
    servers: list[RunningNode] = []
    try:
        for name in names:
            nodes[name] = in_process_node(fed, name, **options)
            servers.append(create_server(nodes[name], NodeConfig.load(fed.node_home(name)).listen))
        yield nodes
    finally:
        for server in servers:
            server.stop(0)
        for node in nodes.values():
            node.close()


@pytest.fixture(scope="session")
def tax_node(fed: FederationFixture) -> Iterator[tuple[Node, RunningNode]]:
    config = NodeConfig.load(fed.node_home("tax"))
    node = Node.from_config(config)
    running = create_server(node, config.listen)
    yield node, running
    running.stop(0)
    node.close()


@pytest.fixture(scope="session")
def civil_node(fed: FederationFixture) -> Iterator[tuple[Node, RunningNode]]:
    config = NodeConfig.load(fed.node_home("civil"))
    node = Node.from_config(config)
    running = create_server(node, config.listen)
    yield node, running
    running.stop(0)
    node.close()


PURPOSE = "assistance eligibility review"
# The session grants' ε: room for every test's queries (budgets have tests of their own).
GRANT_EPSILON = Fraction(1000)
# The ε of the tests' noised PSI counts: shift t = 11, so a count is within 11 of the truth.
PSI_EPSILON = Fraction(2)


# Above every synthetic assistance amount (at most 12 x 2,093): no sum is clipped.
AMOUNT_BOUND = 30_000
BY_DISTRICT = GroupSpec("district", synth.DISTRICTS)


def intersection_plan(
    values: str = "assistance",
    matcher: str = "residents",
    *,
    matcher_where: tuple[Condition, ...] = (),
    group: GroupSpec = BY_DISTRICT,
    epsilon: Fraction | None = Fraction(1),
) -> IntersectionPlan:
    """The node tests' intersection aggregate: the 2025 amounts of civil's ``values`` dataset
    summed per ``group`` (district) over the residents tax's ``matcher`` dataset also holds
    (those ``matcher_where`` selects); ε ``epsilon`` (None: exact)."""
    return IntersectionPlan(
        QueryKind.INTERSECTION_AGGREGATE,
        PURPOSE,
        values=Side("civil", values, "id_number", (Condition("year", "=", 2025),)),
        matcher=Side("tax", matcher, "id_number", matcher_where),
        figures=Figures(group, (SumSpec("amount", AMOUNT_BOUND),), epsilon),
        public_key=b"",
    )


def psi_shift(epsilon: Fraction = PSI_EPSILON) -> int:
    """The DP PSI-CA shift t: an estimate is within t of the true count, a set size within 2t."""
    return dp.truncation_shift(epsilon)


TAX_COLUMNS = (
    "id_number=join_key:resident_id",
    "district=group_key:domain={districts}",
    "year=plaintext",
    "income_band=group_key:domain=low|middle|high",
    "annual_income=aggregate",
)

CIVIL_COLUMNS = (
    "id_number=join_key:resident_id",
    "district=group_key:domain={districts}",
    "year=plaintext",
    "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
    "amount=aggregate",
)


@dataclass
class PsiData:
    manifest: dict[str, Any]
    tax: Node
    civil: Node


def _rules(specs: tuple[str, ...]) -> list[ColumnRule]:
    from govshare.cli.dataset import parse_column

    districts = "|".join(synth.DISTRICTS)
    return [parse_column(spec.format(districts=districts)) for spec in specs]


def register(
    node: Node,
    csv: Path,
    *,
    name: str,
    columns: tuple[str, ...],
    grade: Grade = Grade.GENERAL,
    sharing: SharingType = SharingType.CONDITIONAL,
    require_approval: bool = False,
    legal_basis: str = "",
    skip_invalid: bool = False,
) -> None:
    node.catalogue.add(
        csv,
        name=name,
        grade=grade,
        sharing_type=sharing,
        legal_basis=legal_basis,
        skip_invalid=skip_invalid,
        owner=Owner(OwnerKind.STATE, "state", node.name),
        columns=_rules(columns),
        actor=f"operator:{node.name}",
        audit=node.audit,
        require_approval=require_approval,
    )


def grant(
    node: Node, dataset: str, grantee: str, columns: list[str], kinds: list[QueryKind]
) -> None:
    node.grants.issue(
        node.identity.signing_key,
        issuer=node.name,
        dataset=node.catalogue.get(dataset),
        grantee=grantee,
        purpose=PURPOSE,
        columns=columns,
        query_kinds=kinds,
        expires_at=int(time.time()) + 86400,
        epsilon=GRANT_EPSILON,
        max_queries=1000,
        actor=f"operator:{node.name}",
        audit=node.audit,
    )


@pytest.fixture(scope="session")
def psi_data(
    tmp_path_factory: pytest.TempPathFactory,
    tax_node: tuple[Node, RunningNode],
    civil_node: tuple[Node, RunningNode],
) -> PsiData:
    """tax.residents and civil.assistance registered on the session nodes, granted to alice."""
    data = tmp_path_factory.mktemp("synth")
    manifest = synth.generate(data, size=400, seed=3)
    tax, civil = tax_node[0], civil_node[0]
    register(tax, data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
    register(
        civil,
        data / f"{synth.CIVIL}.csv",
        name="assistance",
        columns=CIVIL_COLUMNS,
    )
    kinds = [QueryKind.PSI_CARDINALITY]
    grant(tax, "residents", "alice", ["id_number", "income_band", "year"], kinds)
    grant(civil, "assistance", "alice", ["id_number", "year"], kinds)
    return PsiData(manifest, tax, civil)


def benefits(root: Path, storage: str, rows: int) -> Catalogue:
    """A catalogue in ``root`` with dataset ``benefits`` of ``rows`` rows — ``id_number`` (a
    text join key ``k<i>``), ``district`` (east, west) and ``amount`` (``i``) — stored in the
    clear or sealed at rest (``storage``: ``"clear"`` or ``"sealed"``)."""
    at_rest = open_at_rest(root, root / "node.db", STANDARD) if storage == "sealed" else None
    catalogue = Catalogue(root / "node.db", at_rest=at_rest)
    csv = root / "rows.csv"
    lines = [f"k{i},{('east', 'west')[i % 2]},{i}" for i in range(rows)]
    csv.write_text("\n".join(["id_number,district,amount", *lines]) + "\n", encoding="utf-8")
    rules = [
        ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="text"),
        ColumnRule("district", ColumnKind.GROUP_KEY, domain=("east", "west")),
        ColumnRule("amount", ColumnKind.AGGREGATE),
    ]
    catalogue.add(
        csv, name="benefits", grade="general", sharing_type="conditional",
        owner=Owner(OwnerKind.STATE, "the state", "civil"), columns=rules, actor="op-civil",
        audit=None,
    )  # fmt: skip
    return catalogue


class Check:
    """A catalogue read's stop check that counts its calls and says stop (or runs ``end``) at
    call ``at`` (``None``: never)."""

    def __init__(self, at: int | None, end: Callable[[], object] | None = None) -> None:
        self.at, self.end, self.calls = at, end, 0

    def __call__(self) -> object:
        self.calls += 1
        if self.calls != self.at:
            return False
        return True if self.end is None else self.end()


@contextmanager
def postgres_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server (:mod:`govshare.examples.postgres`) with the department's
    database, for the block; the node's credential where a department keeps it, a libpq
    password file (``PGPASSFILE``, set for the block)."""
    from govshare.examples.postgres import PgServer  # psycopg, for these tests only

    server = PgServer(free_port(), secrets.token_hex(16))
    server.init()
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PGPASSFILE", str(server.passfile))
            env.delenv("PGPASSWORD", raising=False)
            server.create_database()
            yield server
    finally:
        server.stop()
        server.remove()


def submit_approved(
    identity: Identity,
    request: SignedRequest,
    nodes: Iterable[str] = ("tax", "civil"),
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Submit ``request`` to each of ``nodes`` as the analyst's client does; each must approve
    it at once. Returns the query id."""
    for node in nodes:
        with NodeClient.to(identity, node, timeout=timeout) as client:
            assert client.submit(request.encode()).state == "approved"
    return request.query_id_hex


@dataclass
class PartRun:
    """One node's part of a query, run by the analyst's client in a thread: what it raised
    lands in ``errors``."""

    thread: threading.Thread
    errors: list[GovshareError]


def run_part(identity: Identity, node: str, query_id: str, *, timeout: float) -> PartRun:
    """Start ``node``'s part of ``query_id`` in a thread (the run waits up to ``timeout``)."""
    errors: list[GovshareError] = []

    def run() -> None:
        try:
            with NodeClient.to(identity, node) as client:
                client.run(query_id, timeout=timeout)
        except GovshareError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return PartRun(thread, errors)


def assert_ended_cleanly(
    node: Node,
    query_id: str,
    reason: str | None,
    *,
    errors: Sequence[BaseException] | None = None,
    message: str | None = None,
    reservation: str | None = None,
) -> list[AuditEntry]:
    """Assert that ``query_id`` ended at ``node`` with nothing released: its record is failed,
    and its audit log has no ``result.released`` and one ``query.failed`` that says nothing
    was released, its reason found by ``reason`` (a regular expression; None: not checked).
    Checked too where given: ``errors``, what the analyst's part raised, is one
    :class:`Aborted` found by ``reason`` and saying "nothing released"; the record's one-line
    message is ``message``; the ``budget.settled`` entries' reservations are ``[reservation]``
    (``"returned"``: the budget reserved came back). Returns the query's entries in ``node``'s
    audit log, for the caller's further checks."""
    if errors is not None:
        assert len(errors) == 1 and isinstance(errors[0], Aborted), errors
        assert reason is None or re.search(reason, str(errors[0])), errors[0]
        assert "nothing released" in str(errors[0]), errors[0]
    record = node.query_store.get(query_id)
    assert record.state == FAILED, record
    if message is not None:
        assert record.message == message, record.message
    entries = [e.decode() for e in node.audit.entries_for_query(query_id)]
    assert "result.released" not in [e.kind for e in entries]
    failed = [e.fields for e in entries if e.kind == "query.failed"]
    assert len(failed) == 1 and failed[0]["released"] is False, failed
    assert reason is None or re.search(reason, failed[0]["reason"]), failed[0]["reason"]
    if reservation is not None:
        settled = [e.fields["reservation"] for e in entries if e.kind == "budget.settled"]
        assert settled == [reservation], settled
    return entries
