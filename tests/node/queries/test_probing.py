"""Defences against probing: the per-analyst rate limit and the minimum filtered set size.

The floor on the filtered set is a data-dependent check: it runs only after admission and
approval, applies to exact and record-level releases (a noised count covers small sets itself),
and its refusal names the rule and k, never the size."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PSI_EPSILON, PURPOSE, TAX_COLUMNS, build_federation, grant, register

from govshare.examples import synth
from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.api.server import create_server
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.node.policy import approvals
from govshare.protocols.errors import PolicyRefused
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD
from govshare.rpc.client import NodeClient

LIMIT = 3


@pytest.fixture
def strict_tax(tmp_path: Path) -> Iterator[tuple[Node, Identity]]:
    fed = build_federation(tmp_path)
    config = dataclasses.replace(NodeConfig.load(fed.node_home("tax")), rate_limit_per_minute=LIMIT)
    node = Node.from_config(config)
    synth.generate(tmp_path / "data", size=200, seed=2)
    register(node, tmp_path / "data" / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
    grant(node, "residents", "alice", ["id_number", "district"], [QueryKind.PSI_CARDINALITY])
    running = create_server(node, config.listen)
    yield node, fed.identity("alice")
    running.stop(0)
    node.close()


def signed(alice: Identity, where: tuple[Condition, ...] = (), *, exact: bool = False) -> str:
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number", where),
        right=Side("civil", "assistance", "id_number"),
        epsilon=None if exact else PSI_EPSILON, exact=exact,
    )  # fmt: skip
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with NodeClient.to(alice, "tax") as client:
        client.submit(request.encode())
    return request.query_id_hex


def submit(alice: Identity, where: tuple[Condition, ...] = ()) -> str:
    query_id = signed(alice, where)
    with NodeClient.to(alice, "tax") as client:
        return client.status(query_id).state


def refusals(node: Node, rule: str) -> int:
    return sum(
        1
        for e in node.audit.entries(0, node.audit.size)
        if e.decode().kind in ("policy.decision", "rpc.failed") and rule in e.data.decode()
    )


def test_rate_limit_refuses_and_logs(strict_tax: tuple[Node, Identity]) -> None:
    node, alice = strict_tax
    assert [submit(alice) for _ in range(LIMIT)] == ["approved"] * LIMIT
    with pytest.raises(PolicyRefused) as refused:
        submit(alice)
    assert refused.value.rule == "rate_limit"
    assert refusals(node, "rate_limit") >= 1


def test_small_filtered_set_is_refused_by_rule(strict_tax: tuple[Node, Identity]) -> None:
    node, alice = strict_tax
    # One district of 200 residents leaves fewer rows than the general grade's k.
    counts = {d: node.catalogue.count("residents", where=(Condition("district", "=", d),))
              for d in synth.DISTRICTS}  # fmt: skip
    small = min(counts, key=lambda d: counts[d])
    assert counts[small] < 5
    where = (Condition("district", "=", small),)
    # A noised count is admitted: nothing at admission reads the rows.
    assert submit(alice, where) == "approved"
    # An exact count waits for approval; then, before any message leaves tax, the floor refuses.
    query_id = signed(alice, where, exact=True)
    approvals.decide(
        node.query_store, node.audit, query_id, approve=True, operator="op", suite=STANDARD
    )
    with NodeClient.to(alice, "tax") as client:
        with pytest.raises(PolicyRefused) as refused:
            client.run(query_id, timeout=30)
        assert client.status(query_id).state == "failed"
    assert refused.value.rule == "set_size.minimum"
    message = str(refused.value)
    assert "k = 5" in message
    assert str(counts[small]) not in message.replace("k = 5", "")
    assert node.query_store.reservation(query_id) == "spent"  # a refusal on the data counts
    kinds = [e.decode().kind for e in node.audit.entries_for_query(query_id)]
    assert "protocol.step" not in kinds and "result.released" not in kinds
    assert refusals(node, "set_size.minimum") >= 1
