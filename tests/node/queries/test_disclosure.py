"""Disclosure control at the nodes, tested the way an attacker would try to get around it.

Every test here plays a hostile analyst: one who probes for membership, races the budget with
parallel submissions, stacks grants, signs plans a patched client would send, differences two
exact releases, asks from abroad, or crashes a node mid-query to get its ε back. Each test
asserts what the node must hold to, on real nodes over mutual TLS (and, for the crash, real
node processes killed with SIGKILL).

The nodes are this module's own (their own federation and small, hand-made datasets), so the
session fixtures' budgets and logs are untouched; each test uses datasets of its own, so one
test's ledger never shows in another's.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    FederationFixture,
    build_federation,
    psi_shift,
    serve_node,
    stop_node,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from govshare.cli.dataset import parse_column
from govshare.client.analyst import ask, run_psi
from govshare.model.aggregate_plan import (
    AGGREGATE_KINDS,
    PAILLIER,
    Figures,
    GroupSpec,
    HorizontalPlan,
    Part,
    SumSpec,
    slot_name,
)
from govshare.model.conditions import Condition
from govshare.model.governance import Owner, OwnerKind, QueryKind, Role, SharingType
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.api.server import RunningNode, create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.witness import WitnessStore
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.data.catalog import Catalogue
from govshare.node.node import Node
from govshare.node.policy import approvals
from govshare.node.policy.crossborder import CrossBorderStore
from govshare.node.policy.decision import DatasetBudget, GrantUsage
from govshare.node.policy.grants import Grant, GrantStore
from govshare.node.queries.kinds.aggregate import AggregateEngine, AggregateOptions
from govshare.node.stores.query_store import QueryStore
from govshare.protocols import dp, ecdh_psi, masks
from govshare.protocols.errors import GovshareError, PermissionDenied, PolicyRefused
from govshare.protocols.paillier import decrypt_unpack, generate_keypair
from govshare.protocols.signed_request import SignedRequest, sign_request
from govshare.protocols.suite import STANDARD
from govshare.rpc.client import NodeClient
from govshare.v1 import aggregate_pb2, query_pb2, query_pb2_grpc

# Generous deadlines: nothing below waits on time passing, only on events or states.
TIMEOUT = 60.0
KEY_BITS = 1024  # short Paillier keys: the nodes are built with unsafe_allow_short_modulus
PSI = [QueryKind.PSI_CARDINALITY]
AGGREGATES = [QueryKind.HORIZONTAL_AGGREGATE]
K = 5  # the general grade's k (policy.GENERAL_MIN_GROUP_SIZE), as the messages name it

# 40 residents; civil holds the first 30 ("members"), tax all 40.
RESIDENTS = 40
MEMBERS = 30
BANDS = ("big", "mid", "small", "tiny")
AMOUNT_BOUND = 1000
PSI_COLUMNS = ("id_number=join_key:resident_id", "serial=plaintext")
LEDGER_COLUMNS = (
    "id_number=join_key:resident_id",
    "band=group_key:domain=" + "|".join(BANDS),
    "amount=aggregate",
)


def resident(i: int) -> str:
    return resident_id.make("110101", dt.date(1960, 1, 1) + dt.timedelta(days=97 * i), i)


def serial(i: int) -> str:
    """A plaintext column that singles out one row: what an attacker filters on."""
    return f"S{i:02d}"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# Horizontal aggregate data: two same-schema parts. Groups "small" (3) and "tiny" (1) are under k.
LEDGER_ROWS: dict[str, list[tuple[str, int]]] = {
    "tax": [("big", 100 + i) for i in range(12)]
    + [("mid", 50 + i) for i in range(6)]
    + [("small", 7), ("small", 9)]
    + [("tiny", 123)],
    "civil": [("big", 200 + i) for i in range(10)]
    + [("mid", 40 + i) for i in range(5)]
    + [("small", 11)],
}


@dataclass
class Data:
    tax_people: Path  # id_number, serial: all residents
    civil_people: Path  # id_number, serial: the members only
    ledger: dict[str, Path]  # node -> id_number, band, amount


def write_data(folder: Path) -> Data:
    folder.mkdir(parents=True, exist_ok=True)
    everyone = [(resident(i), serial(i)) for i in range(RESIDENTS)]
    ledger = {}
    for offset, (node, rows) in enumerate(LEDGER_ROWS.items()):
        ledger[node] = write_csv(
            folder / f"ledger_{node}.csv",
            ("id_number", "band", "amount"),
            [(resident(100 * (offset + 1) + i), b, v) for i, (b, v) in enumerate(rows)],
        )
    return Data(
        tax_people=write_csv(folder / "tax_people.csv", ("id_number", "serial"), everyone),
        civil_people=write_csv(
            folder / "civil_people.csv", ("id_number", "serial"), everyone[:MEMBERS]
        ),
        ledger=ledger,
    )


# --------------------------------------------------------------------------- the world


def enrol_analysts(fed: FederationFixture, members: Sequence[tuple[str, str]]) -> None:
    """Enrol more analysts (name, jurisdiction) and publish the new roster to every bundle."""
    federation = fed.federation
    for name, jurisdiction in members:
        federation, _ = federation.enrol(
            role=Role.ANALYST, name=name, jurisdiction=jurisdiction, out=fed.root / name
        )
        fed.bundles[name] = fed.root / name
    for bundle in fed.bundles.values():
        federation.publish_roster(bundle)
    fed.federation = federation


def make_node(fed: FederationFixture, name: str, *, rate_limit: int = 100_000) -> Node:
    config = NodeConfig.load(fed.node_home(name))
    return Node(
        identity=Identity.load(config.identity_dir),
        catalogue=Catalogue(config.database_path),
        grants=GrantStore(config.database_path),
        crossborder_store=CrossBorderStore(config.database_path),
        query_store=QueryStore(config.database_path),
        audit=AuditLog.open(config.audit_database_path, suite=STANDARD),
        witness_store=WitnessStore(config.database_path),
        protocol_timeout=TIMEOUT,
        rate_limit_per_minute=rate_limit,
        workers=1,
        aggregate_options=AggregateOptions(unsafe_allow_short_modulus=True),
    )


@dataclass
class World:
    fed: FederationFixture
    data: Data
    nodes: dict[str, Node]

    def identity(self, name: str) -> Identity:
        return self.fed.identity(name)

    @property
    def tax(self) -> Node:
        return self.nodes["tax"]

    @property
    def civil(self) -> Node:
        return self.nodes["civil"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("disclosure")
    fed = build_federation(root, "discfed")
    # mallory: an analyst of the federation with no grant anywhere; usana: abroad (US).
    enrol_analysts(fed, [("mallory", "CN"), ("usana", "US")])
    data = write_data(root / "data")
    nodes = {name: make_node(fed, name) for name in ("tax", "civil")}
    servers: list[RunningNode] = [
        create_server(node, NodeConfig.load(fed.node_home(name)).listen)
        for name, node in nodes.items()
    ]
    yield World(fed, data, nodes)
    for server in servers:
        server.stop(0)
    for node in nodes.values():
        node.close()


def add_dataset(
    node: Node,
    name: str,
    csv_path: Path,
    columns: Sequence[str],
    *,
    owner: OwnerKind = OwnerKind.STATE,
    require_approval: bool = False,
) -> None:
    node.catalogue.add(
        csv_path,
        name=name,
        grade="general",
        sharing_type=SharingType.CONDITIONAL,
        owner=Owner(owner, "residents (in trust)" if owner is OwnerKind.INDIVIDUAL else "state",
                    node.name),
        columns=[parse_column(c) for c in columns],
        actor=f"operator:{node.name}",
        audit=node.audit,
        require_approval=require_approval,
    )  # fmt: skip


def give(
    node: Node,
    dataset: str,
    grantee: str,
    columns: Sequence[str],
    *,
    kinds: Sequence[QueryKind] = tuple(PSI),
    epsilon: Fraction = Fraction(1000),
    max_queries: int = 1000,
) -> Grant:
    return node.grants.issue(
        node.identity.signing_key,
        issuer=node.name,
        dataset=node.catalogue.get(dataset),
        grantee=grantee,
        purpose=PURPOSE,
        columns=list(columns),
        query_kinds=list(kinds),
        expires_at=int(time.time()) + 86400,
        epsilon=epsilon,
        max_queries=max_queries,
        actor=f"operator:{node.name}",
        audit=node.audit,
    )


def psi_pair(world: World, name: str, *, owner: OwnerKind = OwnerKind.STATE) -> None:
    """``name`` on both nodes: tax holds every resident, civil the members."""
    add_dataset(world.tax, name, world.data.tax_people, PSI_COLUMNS, owner=owner)
    add_dataset(world.civil, name, world.data.civil_people, PSI_COLUMNS, owner=owner)


def psi_plan(
    dataset: str,
    where: tuple[Condition, ...] = (),
    *,
    epsilon: Fraction | None = PSI_EPSILON,
    exact: bool = False,
) -> PsiPlan:
    """tax.<dataset> (unfiltered) joined with civil.<dataset> filtered by ``where``."""
    return PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", dataset, "id_number"),
        right=Side("civil", dataset, "id_number", where),
        epsilon=epsilon, exact=exact,
    )  # fmt: skip


# --------------------------------------------------------------------------- the attacker's client


def sign(identity: Identity, plan: PsiPlan | HorizontalPlan) -> SignedRequest:
    return sign_request(
        identity.signing_key, analyst=identity.name, kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip


def submit(identity: Identity, node: str, request: SignedRequest) -> str:
    """Submit to one node: its state, or PermissionDenied for a refusal."""
    with NodeClient.to(identity, node, timeout=TIMEOUT) as client:
        return client.submit(request.encode()).state


class Wire(NamedTuple):
    """A failed call as the wire carries it: its status, text and ErrorInfo (all a prober sees)."""

    code: grpc.StatusCode
    details: str
    reason: str
    metadata: tuple[tuple[str, str], ...]

    @property
    def rule(self) -> str | None:
        return dict(self.metadata).get("rule")


def raw_status(error: grpc.RpcError) -> Wire:
    """The status, text and ErrorInfo (read with grpc_status; none from the channel itself)."""
    assert isinstance(error, grpc.Call), error
    rich = rpc_status.from_call(error)
    infos = []
    for detail in rich.details if rich is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "govshare", info
            infos.append((info.reason, tuple(sorted(info.metadata.items()))))
    assert len(infos) <= 1, infos
    reason, metadata = infos[0] if infos else ("", ())
    return Wire(error.code(), error.details() or "", reason, metadata)


def raw_submit(identity: Identity, node: str, request: SignedRequest) -> Wire:
    """The gRPC status of a refused submission, as the wire carries it (no client rewording)."""
    with NodeClient.to(identity, node) as client:
        stub = query_pb2_grpc.QueryStub(client.channel)
        try:
            reply = stub.Submit(
                query_pb2.SubmitRequest(signed_request=request.encode()), timeout=TIMEOUT
            )
        except grpc.RpcError as exc:
            return raw_status(exc)
    raise AssertionError(f"{node} accepted the query: {reply.state}")


Outcome = list[query_pb2.ResultChunk] | Wire


def run_everywhere(identity: Identity, query_id: str, nodes: Sequence[str]) -> dict[str, Outcome]:
    """Run every node's part at once (as the analyst's client does); each node's output, or the
    gRPC status it failed with."""

    def one(node: str) -> Outcome:
        with NodeClient.to(identity, node) as client:
            stub = query_pb2_grpc.QueryStub(client.channel)
            try:
                return list(stub.Run(query_pb2.RunRequest(query_id=query_id), timeout=TIMEOUT))
            except grpc.RpcError as exc:
                return raw_status(exc)

    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        return dict(zip(nodes, pool.map(one, nodes), strict=True))


def psi_count(plan: PsiPlan, outputs: dict[str, Outcome]) -> int:
    """The analyst's count from both nodes' doubly masked sets."""
    points = {}
    for node in plan.nodes:
        chunks = outputs[node]
        assert isinstance(chunks, list), (node, chunks)
        points[node] = ecdh_psi.decode_points(b"".join(c.points for c in chunks), max_points=2**31)
    return ecdh_psi.count_matches(points[plan.left.node], points[plan.right.node])


def approve(node: Node, query_id: str, *, approve: bool = True) -> None:
    approvals.decide(
        node.query_store, node.audit, query_id, approve=approve,
        operator=f"operator:{node.name}", reason="reviewed", suite=STANDARD,
    )  # fmt: skip


def entries(node: Node, query_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(kind, fields) of every audit entry of ``query_id`` on ``node``."""
    out = []
    for entry in node.audit.entries_for_query(query_id):
        decoded = entry.decode()
        out.append((decoded.kind, dict(decoded.fields)))
    return out


def refusal_rules(node: Node, query_id: str) -> list[str]:
    return [
        str(f["rule"])
        for kind, f in entries(node, query_id)
        if kind == "policy.decision" and f.get("allowed") is False
    ]


def released(node: Node, query_id: str) -> bool:
    return any(kind == "result.released" for kind, _ in entries(node, query_id))


def barrage(identity: Identity, node: str, requests: Sequence[SignedRequest]) -> list[str]:
    """Submit every request at once from its own thread and connection; each state."""
    barrier = threading.Barrier(len(requests))

    def one(request: SignedRequest) -> str:
        with NodeClient.to(identity, node, timeout=TIMEOUT) as client:
            barrier.wait(timeout=TIMEOUT)
            try:
                return client.submit(request.encode()).state
            except PermissionDenied:
                return "refused"

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


# --------------------------------------------------------------------------- 1. membership oracle


def test_membership_probe_without_grant_reads_the_same_for_member_and_outsider(
    world: World,
) -> None:
    psi_pair(world, "oracle")
    mallory = world.identity("mallory")
    member, outsider = resident(3), resident(MEMBERS + 3)  # civil holds the first, not the second
    assert world.civil.catalogue.count("oracle", where=(Condition("id_number", "=", member),)) == 1
    assert (
        world.civil.catalogue.count("oracle", where=(Condition("id_number", "=", outsider),)) == 0
    )

    seen: dict[str, dict[str, Wire]] = {}
    for who, key in (("member", member), ("outsider", outsider)):
        request = sign(mallory, psi_plan("oracle", (Condition("id_number", "=", key),)))
        query_id = request.query_id_hex
        seen[who] = {}
        for node in ("tax", "civil"):
            wire = raw_submit(mallory, node, request)
            seen[who][node] = wire._replace(details=wire.details.replace(query_id, "<query>"))
            # Logged as a policy decision naming the rule; nothing was reserved or run.
            assert refusal_rules(world.nodes[node], query_id) == ["grant.missing"]
            assert world.nodes[node].query_store.reservation(query_id) is None

    assert seen["member"] == seen["outsider"]  # text and ErrorInfo alike
    for code, details, reason, metadata in seen["member"].values():
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert (reason, metadata) == ("POLICY_REFUSED", (("rule", "grant.missing"),))
        assert "'mallory' holds no grant on 'oracle'" in details
        assert not re.search(r"\d", details), details  # no count of rows, no size, no key


def test_membership_probe_with_grant_gets_no_exact_bit(world: World) -> None:
    psi_pair(world, "probe")
    alice = world.identity("alice")
    give(world.tax, "probe", "alice", ["id_number"])
    give(world.civil, "probe", "alice", ["id_number", "serial"])

    # The join key itself as a filter: refused by its column rule before any row is read,
    # word for word the same for a member and an outsider.
    on_key = [
        raw_submit(
            alice, "civil", sign(alice, psi_plan("probe", (Condition("id_number", "=", k),)))
        )
        for k in (resident(4), resident(MEMBERS + 4))
    ]
    assert on_key[0] == on_key[1]
    assert on_key[0].code is grpc.StatusCode.PERMISSION_DENIED
    assert on_key[0].rule == "column.join_key_release"
    assert not re.search(r"\d", on_key[0].details)

    # An exact count over a one-row filter (a member) and a zero-row filter (an outsider's
    # serial does not exist at civil): both approved by every operator, both refused at run
    # time by the set floor, in the same words, naming k and never the size.
    civil_errors = []
    for filter_serial in (serial(5), serial(MEMBERS + 5)):
        plan = psi_plan("probe", (Condition("serial", "=", filter_serial),), epsilon=None,
                        exact=True)  # fmt: skip
        request = sign(alice, plan)
        query_id = request.query_id_hex
        assert [submit(alice, n, request) for n in plan.nodes] == ["pending_approval"] * 2
        for node in world.nodes.values():
            approve(node, query_id)
        outputs = run_everywhere(alice, query_id, plan.nodes)
        civil_out = outputs["civil"]
        assert isinstance(civil_out, tuple), "civil ran an exact count on a set under k"
        assert isinstance(outputs["tax"], tuple), "tax released without civil's set"
        civil_errors.append(
            civil_out._replace(details=civil_out.details.replace(query_id, "<query>"))
        )
        assert refusal_rules(world.civil, query_id) == ["set_size.minimum"]
        for node in world.nodes.values():
            assert not released(node, query_id)
        # A refusal on the data consumes the query like a run: the budget says nothing either.
        assert world.civil.query_store.reservation(query_id) == "spent"
    assert civil_errors[0] == civil_errors[1]
    code, details, _, _ = civil_errors[0]
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert civil_errors[0].rule == "set_size.minimum"
    assert details == (
        f"refused by rule set_size.minimum: the filtered set of probe is smaller than k = {K}"
    )

    # A noised count over the same one-row filter runs: the analyst sees a count within the
    # DP PSI-CA bound, never a refusal that would depend on the row being there.
    outcome = run_psi(alice, psi_plan("probe", (Condition("serial", "=", serial(5)),)), poll=0.05)
    t = psi_shift()
    assert outcome.epsilon == PSI_EPSILON and outcome.interval is not None
    assert 0 <= outcome.count <= 1 + t <= 2 * t
    assert world.civil.query_store.reservation(outcome.query_id) == "spent"


# --------------------------------------------------------------------------- 2. racing the budget


def test_twenty_parallel_submissions_cannot_overdraw_epsilon_3(world: World) -> None:
    add_dataset(world.tax, "burst", world.data.tax_people, PSI_COLUMNS)
    burst = give(world.tax, "burst", "alice", ["id_number"], epsilon=Fraction(3))
    alice = world.identity("alice")
    requests = [sign(alice, psi_plan("burst", epsilon=Fraction(1))) for _ in range(20)]
    assert len({r.query_id_hex for r in requests}) == 20

    states = barrage(alice, "tax", requests)

    assert Counter(states) == {"approved": 3, "refused": 17}
    store = world.tax.query_store
    rules = Counter(store.get(r.query_id_hex).rule for r in requests)
    assert rules["allowed"] == 3
    assert set(rules) - {"allowed"} <= {"grant.budget", "budget.dataset"}, rules
    assert sum(rules.values()) - rules["allowed"] == 17
    assert store.budget("alice", "burst") == DatasetBudget(spent=Fraction(0), reserved=Fraction(3))
    assert store.usage("alice")[burst.grant_id] == GrantUsage(
        queries=3, epsilon_spent=Fraction(0), epsilon_reserved=Fraction(3)
    )


def test_sixty_parallel_submissions_meet_the_rate_limit_of_30(world: World) -> None:
    # The federation's third node, started here with the default limit of 30 a minute.
    ghost = make_node(world.fed, "ghost", rate_limit=30)
    server = create_server(ghost, NodeConfig.load(world.fed.node_home("ghost")).listen)
    try:
        add_dataset(ghost, "flood", world.data.tax_people, PSI_COLUMNS)
        give(ghost, "flood", "alice", ["id_number"])
        alice = world.identity("alice")
        plan = PsiPlan(
            kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
            left=Side("ghost", "flood", "id_number"), right=Side("tax", "people", "id_number"),
            epsilon=Fraction(1),
        )  # fmt: skip
        requests = [sign(alice, plan) for _ in range(60)]

        states = barrage(alice, "ghost", requests)

        assert Counter(states) == {"approved": 30, "refused": 30}
        rules = Counter(ghost.query_store.get(r.query_id_hex).rule for r in requests)
        assert rules == {"allowed": 30, "rate_limit": 30}
        assert ghost.query_store.budget("alice", "flood").reserved == 30
    finally:
        server.stop(0)
        ghost.close()


# --------------------------------------------------------------------------- 3. approval queue


def test_queries_waiting_for_approval_hold_their_epsilon(world: World) -> None:
    add_dataset(world.tax, "review", world.data.tax_people, PSI_COLUMNS, require_approval=True)
    add_dataset(world.civil, "review", world.data.civil_people, PSI_COLUMNS)
    give(world.tax, "review", "alice", ["id_number"], epsilon=Fraction(3))
    give(world.civil, "review", "alice", ["id_number"])
    alice = world.identity("alice")
    tax = world.tax.query_store
    cap = Fraction(3)

    def ledger() -> DatasetBudget:
        budget = tax.budget("alice", "review")
        assert budget.used <= cap, budget  # never above the grant, at any step
        return budget

    def ask_one() -> tuple[str, str]:
        request = sign(alice, psi_plan("review", epsilon=Fraction(1)))
        assert submit(alice, "civil", request) == "approved"
        try:
            return request.query_id_hex, submit(alice, "tax", request)
        except PolicyRefused as exc:
            assert exc.rule in ("grant.budget", "budget.dataset"), exc
            return request.query_id_hex, "refused"

    asked = [ask_one() for _ in range(5)]
    assert [state for _, state in asked] == ["pending_approval"] * 3 + ["refused"] * 2
    assert ledger() == DatasetBudget(spent=Fraction(0), reserved=cap)
    pending = [query_id for query_id, state in asked if state == "pending_approval"]

    # Denied: the reservation goes back, and only then does one more query fit.
    approve(world.tax, pending[0], approve=False)
    assert tax.reservation(pending[0]) == "returned"
    assert ledger() == DatasetBudget(spent=Fraction(0), reserved=Fraction(2))
    late, state = ask_one()
    assert state == "pending_approval"
    assert ask_one()[1] == "refused"
    assert ledger().reserved == cap

    for query_id in [*pending[1:], late]:
        approve(world.tax, query_id)
        outputs = run_everywhere(alice, query_id, ("tax", "civil"))
        assert all(isinstance(o, list) for o in outputs.values()), outputs
        assert released(world.tax, query_id) and tax.reservation(query_id) == "spent"
        ledger()
    assert ledger() == DatasetBudget(spent=cap, reserved=Fraction(0))
    assert ask_one()[1] == "refused"


# --------------------------------------------------------------------------- 4. stacked grants


def test_a_second_grant_does_not_double_the_budget(world: World) -> None:
    psi_pair(world, "stacked")
    first = give(world.tax, "stacked", "alice", ["id_number"], epsilon=Fraction(1))
    second = give(world.tax, "stacked", "alice", ["id_number"], epsilon=Fraction(1))
    give(world.civil, "stacked", "alice", ["id_number"])
    alice = world.identity("alice")

    spent = run_psi(alice, psi_plan("stacked", epsilon=Fraction(1)), poll=0.05)
    record = world.tax.query_store.get(spent.query_id)
    assert record.grant_id in (first.grant_id, second.grant_id)
    assert world.tax.query_store.reservation(spent.query_id) == "spent"
    unused = second if record.grant_id == first.grant_id else first
    assert world.tax.query_store.usage("alice").get(unused.grant_id) is None

    request = sign(alice, psi_plan("stacked", epsilon=Fraction(1)))
    with pytest.raises(PolicyRefused) as refused:
        submit(alice, "tax", request)
    assert refused.value.rule == "budget.dataset"
    assert refusal_rules(world.tax, request.query_id_hex) == ["budget.dataset"]
    assert world.tax.query_store.budget("alice", "stacked") == DatasetBudget(
        spent=Fraction(1), reserved=Fraction(0)
    )


# --------------------------------------------------------------------------- 5. patched client


def ledger_pair(world: World, name: str) -> None:
    for node in ("tax", "civil"):
        add_dataset(world.nodes[node], name, world.data.ledger[node], LEDGER_COLUMNS)
        give(world.nodes[node], name, "alice", ["band", "amount"], kinds=AGGREGATES)


def band_plan(
    dataset: str, public_key: bytes, *, epsilon: Fraction | None, exact: bool = False
) -> HorizontalPlan:
    return HorizontalPlan(
        QueryKind.HORIZONTAL_AGGREGATE, PURPOSE,
        parts=(Part("tax", dataset), Part("civil", dataset)),
        figures=Figures(
            GroupSpec("band", BANDS), (SumSpec("amount", AMOUNT_BOUND),), epsilon, exact
        ),
        aggregator="civil", scheme=PAILLIER, public_key=public_key,
    )  # fmt: skip


def test_patched_client_cannot_get_exact_groups(world: World) -> None:
    ledger_pair(world, "groups_exact")
    alice = world.identity("alice")
    public, _ = generate_keypair(KEY_BITS, unsafe_allow_short_modulus=True)
    # What run_aggregate_sql never signs: GROUP BY with exact figures, and with no noise at all.
    for plan, rule in (
        (band_plan("groups_exact", public.to_bytes(), epsilon=None, exact=True), "exact.group_by"),
        (band_plan("groups_exact", public.to_bytes(), epsilon=None), "release.noise"),
    ):
        request = sign(alice, plan)
        query_id = request.query_id_hex
        for name in plan.nodes:
            with pytest.raises(PolicyRefused) as refused:
                submit(alice, name, request)
            assert refused.value.rule == rule
            node = world.nodes[name]
            assert node.query_store.get(query_id).state == "refused"
            assert node.query_store.reservation(query_id) is None
            # Refused at admission: nothing was prepared, computed, sent or released.
            assert [kind for kind, _ in entries(node, query_id)] == [
                "query.received",
                "policy.decision",
            ]
            assert refusal_rules(node, query_id) == [rule]


def test_small_groups_reach_a_patched_client_only_noised(world: World) -> None:
    """The analyst's program suppresses groups under k; a patched one decrypts every slot. What
    it reads is the true figure plus the node's noise: drawn at the designated node, from the
    node's own source (seeded here), before anything is encrypted for the analyst."""
    ledger_pair(world, "groups_noised")
    alice = world.identity("alice")
    epsilon, seed = Fraction(1), 20260101
    civil = world.civil
    assert dp.designated_node(("tax", "civil")) == "civil"
    public, private = generate_keypair(KEY_BITS, unsafe_allow_short_modulus=True)
    plan = band_plan("groups_noised", public.to_bytes(), epsilon=epsilon)
    keys: list[aggregate_pb2.EphemeralKey] = []

    def prepare(clients: dict[str, NodeClient], query_id: str) -> None:
        keys.extend(clients[n].aggregate_prepare(query_id) for n in plan.nodes)

    # Test-only switch, for this query only: the designated node's noise from a seeded source.
    original = civil.aggregates
    civil.aggregates = AggregateEngine(
        queries=civil.queries, identity=civil.identity, catalogue=civil.catalogue,
        grants=civil.grants, store=civil.query_store, audit=civil.audit,
        send=civil.send, executor=civil.executor, protocol_timeout=TIMEOUT,
        options=AggregateOptions(unsafe_allow_short_modulus=True, noise_rng=random.Random(seed)),
    )  # fmt: skip
    try:
        asked = ask(
            alice, kind=plan.kind.value, body=plan.to_json(), nodes=list(plan.nodes),
            prepare=prepare, poll=0.05,
            run=lambda client, query_id: client.aggregate_run(query_id, keys=keys,
                                                              timeout=TIMEOUT),
        )  # fmt: skip
    finally:
        civil.aggregates = original
        civil.queries.register(AGGREGATE_KINDS, original)

    # The patched client: decrypt every slot, suppress nothing.
    seen: dict[str, int] = {}
    ciphertexts = list(asked.outputs["civil"].ciphertexts)
    layouts = plan.layouts(public.n_bits)
    assert len(ciphertexts) == len(layouts)
    for layout, data in zip(layouts, ciphertexts, strict=True):
        for slot, value in decrypt_unpack(
            private, public.ciphertext_from_bytes(data), layout
        ).items():
            seen[slot] = masks.from_u64_signed(value % masks.MASK_MODULUS)

    true: dict[str, int] = {}
    for rows in LEDGER_ROWS.values():
        for band, amount in rows:
            true[slot_name(band, "count")] = true.get(slot_name(band, "count"), 0) + 1
            key = slot_name(band, "sum:amount")
            true[key] = true.get(key, 0) + min(max(amount, 0), AMOUNT_BOUND)
    rng = random.Random(seed)
    scales = plan.figures.noise_scales()
    noise = {slot_name(g, f): dp.discrete_laplace(scales[f], rng) for g, f in plan.figures.cells}

    assert seen == {slot: true.get(slot, 0) + noise[slot] for slot in noise}
    small = [band for band in BANDS if true.get(slot_name(band, "count"), 0) < K]
    assert small == ["small", "tiny"]
    # What the patched client reads for the groups under k is not their true figures.
    assert any(noise[slot_name(band, f)] != 0 for band in small for f in plan.figures.names)
    assert all(scale > 0 for scale in scales.values())
    assert civil.query_store.budget("alice", "groups_noised").spent == epsilon


# --------------------------------------------------------------------------- 6. differencing


def test_two_exact_releases_one_row_apart_are_refused(world: World) -> None:
    psi_pair(world, "differ")
    give(world.tax, "differ", "alice", ["id_number"])
    give(world.civil, "differ", "alice", ["id_number", "serial"])
    alice = world.identity("alice")
    ten = tuple(serial(i) for i in range(10))  # ten members
    broad = (Condition("serial", "in", ten),)
    narrow = (Condition("serial", "in", ten), Condition("serial", "!=", serial(9)))

    def exact(where: tuple[Condition, ...]) -> tuple[str, dict[str, Outcome], PsiPlan]:
        plan = psi_plan("differ", where, epsilon=None, exact=True)
        request = sign(alice, plan)
        assert [submit(alice, n, request) for n in plan.nodes] == ["pending_approval"] * 2
        for node in world.nodes.values():
            approve(node, request.query_id_hex)
        return request.query_id_hex, run_everywhere(alice, request.query_id_hex, plan.nodes), plan

    first, outputs, plan = exact(broad)
    assert psi_count(plan, outputs) == 10
    assert all(released(node, first) for node in world.nodes.values())

    second, outputs, _ = exact(narrow)
    civil_out = outputs["civil"]
    assert isinstance(civil_out, tuple) and isinstance(outputs["tax"], tuple), outputs
    assert civil_out.code is grpc.StatusCode.PERMISSION_DENIED
    assert civil_out.rule == "filter.overlap" and f"k = {K}" in civil_out.details
    assert refusal_rules(world.civil, second) == ["filter.overlap"]
    assert world.civil.query_store.get(second).state == "failed"
    for node in world.nodes.values():
        assert not released(node, second)
        assert "query.failed" in [kind for kind, _ in entries(node, second)]

    # The same set again tells nothing new: allowed.
    third, outputs, plan = exact(broad)
    assert psi_count(plan, outputs) == 10
    assert all(released(node, third) for node in world.nodes.values())


def test_exact_releases_one_row_apart_are_refused_across_query_kinds(world: World) -> None:
    """The same differencing, switching kinds between the two releases: an exact PSI count
    over civil's filter F, then an exact horizontal COUNT over F less one row. The tracker must
    compare the two filtered sets whatever kind released them.

    Fails today: the PSI path tracks the filtered set's join keys
    (``QueryEngine._run`` -> ``check_exact(keys)``), the horizontal path its row ids
    (``AggregateEngine._run_horizontal`` -> ``catalogue.row_ids``), so two sets one row apart
    look disjoint to ``check_exact`` (symmetric difference 10 + 9) and both are released.
    """
    psi_pair(world, "mixed")
    for name, columns in (("tax", ["id_number", "serial"]), ("civil", ["id_number", "serial"])):
        give(world.nodes[name], "mixed", "alice", columns,
             kinds=[QueryKind.PSI_CARDINALITY, QueryKind.HORIZONTAL_AGGREGATE])  # fmt: skip
    alice = world.identity("alice")
    ten = tuple(serial(i) for i in range(10))

    psi = psi_plan("mixed", (Condition("serial", "in", ten),), epsilon=None, exact=True)
    request = sign(alice, psi)
    assert [submit(alice, n, request) for n in psi.nodes] == ["pending_approval"] * 2
    for node in world.nodes.values():
        approve(node, request.query_id_hex)
    assert psi_count(psi, run_everywhere(alice, request.query_id_hex, psi.nodes)) == 10

    public, _ = generate_keypair(KEY_BITS, unsafe_allow_short_modulus=True)
    plan = HorizontalPlan(
        QueryKind.HORIZONTAL_AGGREGATE, PURPOSE,
        parts=(
            Part("tax", "mixed", (Condition("serial", "in", tuple(serial(MEMBERS + i)
                                                                  for i in range(10))),)),
            Part("civil", "mixed", (Condition("serial", "in", ten),
                                    Condition("serial", "!=", serial(9)))),
        ),
        figures=Figures(None, (), None, exact=True),
        aggregator="civil", scheme=PAILLIER, public_key=public.to_bytes(),
    )  # fmt: skip
    request = sign(alice, plan)
    query_id = request.query_id_hex
    assert [submit(alice, n, request) for n in plan.nodes] == ["pending_approval"] * 2
    for node in world.nodes.values():
        approve(node, query_id)
    clients = {n: NodeClient.to(alice, n, timeout=TIMEOUT) for n in plan.nodes}
    try:
        keys = [clients[n].aggregate_prepare(query_id) for n in plan.nodes]

        def run(node: str) -> GovshareError | None:
            try:
                clients[node].aggregate_run(query_id, keys=keys, timeout=TIMEOUT)
            except GovshareError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max_workers=2) as pool:
            errors = dict(zip(plan.nodes, pool.map(run, plan.nodes), strict=True))
    finally:
        for client in clients.values():
            client.close()
    assert not released(world.civil, query_id), (
        "civil released an exact count over a filtered set one row from an earlier exact "
        "release's, because the earlier one was a PSI"
    )
    civil_error = errors["civil"]
    assert isinstance(civil_error, PolicyRefused), errors
    assert civil_error.rule == "filter.overlap"
    assert refusal_rules(world.civil, query_id) == ["filter.overlap"]


# --------------------------------------------------------------------------- 7. cross-border


def test_personal_data_goes_abroad_only_under_an_assessment_in_force(world: World) -> None:
    psi_pair(world, "persons", owner=OwnerKind.INDIVIDUAL)
    give(world.tax, "persons", "usana", ["id_number"])
    give(world.civil, "persons", "usana", ["id_number"])
    usana = world.identity("usana")
    assert usana.member.jurisdiction == "US"

    def refused_everywhere() -> None:
        request = sign(usana, psi_plan("persons"))
        for name, node in world.nodes.items():
            with pytest.raises(PolicyRefused) as refused:
                submit(usana, name, request)
            assert refused.value.rule == "crossborder.assessment"
            assert refusal_rules(node, request.query_id_hex) == ["crossborder.assessment"]

    def assess(node: Node, *, now: int, expires_at: int) -> str:
        return node.crossborder.approve(
            node.identity.signing_key, issuer=node.name,
            dataset=node.catalogue.get("persons"), destination="US",
            assessment="CAC-2026-0042", basis="PIPL art. 38(1), security assessment passed",
            expires_at=expires_at, now=now, actor=f"operator:{node.name}", audit=node.audit,
            home_jurisdiction=node.identity.jurisdiction,
        ).record_id  # fmt: skip

    refused_everywhere()  # no assessment at all

    now = int(time.time())
    for node in world.nodes.values():  # approved a day ago, expired a minute ago
        assess(node, now=now - 86400, expires_at=now - 60)
    refused_everywhere()

    in_force = {name: assess(node, now=now, expires_at=now + 86400)
                for name, node in world.nodes.items()}  # fmt: skip
    outcome = run_psi(usana, psi_plan("persons"), poll=0.05)
    assert abs(outcome.count - MEMBERS) <= psi_shift()
    assert all(released(node, outcome.query_id) for node in world.nodes.values())

    for name, node in world.nodes.items():
        node.crossborder.revoke(
            in_force[name], actor=f"operator:{node.name}", reason="assessment withdrawn",
            audit=node.audit,
        )  # fmt: skip
    refused_everywhere()


# --------------------------------------------------------------------------- 8. crash mid-query


start_process = serve_node


def stop_process(process: subprocess.Popen[str]) -> None:
    stop_node(process, timeout=TIMEOUT)


def wait_for(condition: Callable[[], bool], what: str, *, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def crash_homes(
    tmp_path: Path,
) -> Iterator[tuple[FederationFixture, dict[str, subprocess.Popen[str]]]]:
    fed = build_federation(tmp_path, "crashfed")
    data = write_data(tmp_path / "data")
    for name, csv_path in (("tax", data.tax_people), ("civil", data.civil_people)):
        config = fed.node_home(name) / "node.toml"
        # The peer never answers in this test: the node must still be waiting when killed.
        config.write_text(
            config.read_text().replace("protocol_timeout = 300.0", "protocol_timeout = 600.0")
        )
        node = Node.from_home(fed.node_home(name))
        try:
            add_dataset(node, "people", csv_path, PSI_COLUMNS)
            give(node, "people", "alice", ["id_number"], epsilon=Fraction(10))
        finally:
            node.close()
    processes: dict[str, subprocess.Popen[str]] = {}
    yield fed, processes
    for process in processes.values():
        stop_process(process)


def test_kill_9_mid_query_returns_the_reservation_exactly_once(
    crash_homes: tuple[FederationFixture, dict[str, subprocess.Popen[str]]],
) -> None:
    fed, processes = crash_homes
    for name in ("tax", "civil"):
        processes[name] = start_process(fed.node_home(name))
    alice = fed.identity("alice")
    tax_config = NodeConfig.load(fed.node_home("tax"))

    def ledger() -> DatasetBudget:
        store = QueryStore(tax_config.database_path)
        try:
            return store.budget("alice", "people")
        finally:
            store.close()

    # One query that ran to the end, so the ledger is not trivially empty.
    done = run_psi(alice, psi_plan("people", epsilon=Fraction(1)), poll=0.05)
    before = ledger()
    assert before == DatasetBudget(spent=Fraction(1), reserved=Fraction(0)), before

    plan = psi_plan("people", epsilon=Fraction(1))
    request = sign(alice, plan)
    query_id = request.query_id_hex
    assert [submit(alice, n, request) for n in plan.nodes] == ["approved", "approved"]
    assert ledger() == DatasetBudget(spent=Fraction(1), reserved=Fraction(1))

    # Only tax runs: it sends its set and waits for civil's, which never comes.
    failures: list[GovshareError] = []
    outputs: list[object] = []

    def run_tax() -> None:
        try:
            with NodeClient.to(alice, "tax") as client:
                outputs.append(client.run(query_id, timeout=TIMEOUT * 5))
        except GovshareError as exc:
            failures.append(exc)

    runner = threading.Thread(target=run_tax, daemon=True)
    runner.start()

    def running() -> bool:
        with NodeClient.to(alice, "tax") as client:
            return client.status(query_id).state == "running"

    wait_for(running, f"query {query_id} to be running on tax")
    os.kill(processes["tax"].pid, signal.SIGKILL)
    processes["tax"].wait(timeout=TIMEOUT)
    runner.join(timeout=TIMEOUT)
    assert not runner.is_alive()
    # The analyst's call ends with the node (UNAVAILABLE as gRPC reports a dead server).
    assert outputs == [] and len(failures) == 1, (outputs, failures)

    # Restart from the home: recovery finds the query running with no release. Twice, to
    # show a second recovery does not settle it again.
    for _ in range(2):
        processes["tax"] = start_process(fed.node_home("tax"))
        with NodeClient.to(alice, "tax") as client:
            status = client.status(query_id)
        assert status.state == "failed", status
        assert "nothing released" in status.message
        stop_process(processes["tax"])

    store = QueryStore(tax_config.database_path)
    log = AuditLog.open(tax_config.audit_database_path, suite=STANDARD)
    try:
        assert store.reservation(query_id) == "returned"
        assert store.reservation(done.query_id) == "spent"
        assert store.budget("alice", "people") == before
        logged = [e.decode() for e in log.entries_for_query(query_id)]
    finally:
        store.close()
        log.close()
    kinds = [e.kind for e in logged]
    assert "result.released" not in kinds
    assert kinds.count("budget.recovered") == 1 and kinds.count("budget.settled") == 0, kinds
    (recovered,) = [e for e in logged if e.kind == "budget.recovered"]
    assert recovered.fields["reservation"] == "returned"
    assert recovered.fields["state"] == "failed"
