"""Peer witnessing over real mTLS nodes: cosign, refuse rollback and fork, record refusals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import FederationFixture, build_federation

from govshare.model.events import log_origin
from govshare.node.api.server import RunningNode, create_server
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.protocols.checkpoint import Checkpoint, open_cosignature, sign_checkpoint
from govshare.protocols.errors import Conflict, PermissionDenied, VerificationFailed
from govshare.protocols.suite import STANDARD, SigningKey
from govshare.rpc.client import NodeClient

NodeFixture = tuple[Node, RunningNode]


# This module's own federation: the refusals its tests provoke stay in these witnesses' logs
# for good (an auditor fails a node its witnesses refused), so they must not reach the session
# federation that other modules audit.
@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    return build_federation(tmp_path_factory.mktemp("witnessfed"))


def _serve(fed: FederationFixture, name: str) -> Iterator[NodeFixture]:
    config = NodeConfig.load(fed.node_home(name))
    node = Node.from_config(config)
    running = create_server(node, config.listen)
    yield node, running
    running.stop(0)
    node.close()


@pytest.fixture(scope="module")
def tax_node(fed: FederationFixture) -> Iterator[NodeFixture]:
    yield from _serve(fed, "tax")


@pytest.fixture(scope="module")
def civil_node(fed: FederationFixture) -> Iterator[NodeFixture]:
    yield from _serve(fed, "civil")


def tax_checkpoint(
    fed: FederationFixture, size: int, root: bytes, key: SigningKey | None = None
) -> bytes:
    origin = log_origin(fed.federation.roster.federation, "tax")
    signer = key or fed.identity("tax").signing_key
    return sign_checkpoint(Checkpoint(origin, size, root), signer)


def civil_refusals(civil: Node, rule: str) -> int:
    entries = civil.audit.entries(0, civil.audit.size)
    return sum(
        1 for e in entries if e.decode().kind == "witness.refused" and rule in e.data.decode()
    )


def test_publish_collects_a_valid_cosignature(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture
) -> None:
    tax, _ = tax_node
    index = tax.audit.record("test.event", {"n": 1}, actor="tax")
    stored = tax.publisher.publish()
    civil_key = fed.federation.roster.member("civil").verify_key()
    checkpoint, when = open_cosignature(stored.note, civil_key, name="civil")
    assert checkpoint.size == stored.size > index
    assert when > 0
    # The ghost peer is down: recorded, not fatal.
    kinds = [e.decode().kind for e in tax.audit.entries(0, tax.audit.size)]
    assert "witness.failed" in kinds


def test_later_checkpoint_is_cosigned_with_a_consistency_proof(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture
) -> None:
    tax, _ = tax_node
    first = tax.publisher.publish()
    for n in range(5):
        tax.audit.record("test.event", {"n": n}, actor="tax")
    second = tax.publisher.publish()
    assert second.size > first.size
    civil_key = fed.federation.roster.member("civil").verify_key()
    assert open_cosignature(second.note, civil_key, name="civil")[0].size == second.size


def test_rollback_is_refused_and_logged(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture
) -> None:
    tax, _ = tax_node
    civil, _ = civil_node
    tax.audit.record("test.event", {"n": 99}, actor="tax")
    held = tax.publisher.publish().size
    older = tax.audit.root_at(held - 1)
    before = civil_refusals(civil, "witness.rollback")
    with NodeClient.to(fed.identity("tax"), "civil") as client:
        with pytest.raises(Conflict, match=r"witness\.rollback"):
            client.witness(tax_checkpoint(fed, held - 1, older), held, [])
    assert civil_refusals(civil, "witness.rollback") == before + 1


def test_fork_at_equal_size_is_refused_and_logged(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture
) -> None:
    tax, _ = tax_node
    civil, _ = civil_node
    held = tax.publisher.publish().size
    before = civil_refusals(civil, "witness.fork")
    with NodeClient.to(fed.identity("tax"), "civil") as client:
        with pytest.raises(Conflict, match=r"witness\.fork"):
            client.witness(tax_checkpoint(fed, held, b"\x11" * 32), held, [])
    assert civil_refusals(civil, "witness.fork") == before + 1


def test_fork_by_inconsistent_extension_is_refused(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture
) -> None:
    tax, _ = tax_node
    held = tax.publisher.publish().size
    with NodeClient.to(fed.identity("tax"), "civil") as client:
        with pytest.raises(Conflict, match=r"witness\.inconsistent"):
            client.witness(tax_checkpoint(fed, held + 3, b"\x22" * 32), held, [b"\x33" * 32])


def test_checkpoint_signed_by_a_key_not_in_the_roster_is_refused(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture
) -> None:
    rogue = STANDARD.generate_signing_key()
    with NodeClient.to(fed.identity("tax"), "civil") as client:
        with pytest.raises(VerificationFailed):
            client.witness(tax_checkpoint(fed, 1, b"\x44" * 32, rogue), 0, [])


def test_analyst_may_not_ask_for_a_cosignature(
    fed: FederationFixture, civil_node: NodeFixture
) -> None:
    with NodeClient.to(fed.identity("alice"), "civil") as client:
        with pytest.raises(PermissionDenied):
            client.witness(b"x", 0, [])
