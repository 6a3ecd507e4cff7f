"""A serving node adopts a newly published roster without a restart, and refuses rollbacks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FederationFixture, build_federation

from govshare.model.governance import Role
from govshare.model.identity import ROSTER, Identity
from govshare.node.api.server import create_server
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.protocols.errors import NotFound, VerificationFailed
from govshare.rpc.client import NodeClient


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[FederationFixture, Node]]:
    fed = build_federation(tmp_path)
    config = NodeConfig.load(fed.node_home("tax"))
    node = Node.from_config(config)
    running = create_server(node, config.listen)
    yield fed, node
    running.stop(0)
    node.close()


def kinds(node: Node) -> list[str]:
    return [e.decode().kind for e in node.audit.entries(0, node.audit.size)]


def test_new_member_is_admitted_once_the_roster_is_published(
    serving: tuple[FederationFixture, Node],
) -> None:
    fed, node = serving
    federation, _ = fed.federation.enrol(
        role=Role.ANALYST, name="bob", jurisdiction="CN", out=fed.root / "bob"
    )
    bob = Identity.load(fed.root / "bob")
    with NodeClient.to(bob, "tax") as client, pytest.raises(VerificationFailed, match="bob"):
        client.list_datasets()  # the node still holds the old roster
    old_roster = (fed.node_home("tax") / ROSTER).read_bytes()
    federation.publish_roster(fed.node_home("tax"))
    with NodeClient.to(bob, "tax") as client:
        assert client.list_datasets() == []
    assert node.roster().version == federation.roster.version
    assert "roster.updated" in kinds(node)

    # A rollback to the older roster is refused and logged; bob stays admitted.
    (fed.node_home("tax") / ROSTER).write_bytes(old_roster)
    with NodeClient.to(bob, "tax") as client:
        assert client.list_datasets() == []
    assert node.roster().version == federation.roster.version
    refused = [
        e.decode().fields for e in node.audit.entries(0, node.audit.size)
        if e.decode().kind == "roster.refused"
    ]  # fmt: skip
    assert refused and refused[-1]["reason"] == "rollback"


def test_a_tampered_roster_file_is_refused(serving: tuple[FederationFixture, Node]) -> None:
    fed, node = serving
    path = fed.node_home("tax") / ROSTER
    held = node.roster().version
    path.write_bytes(path.read_bytes().replace(b'"CN"', b'"HK"', 1))
    with NodeClient.to(fed.identity("civil"), "tax") as client:
        assert client.ping().roster_version == held
    assert "roster.refused" in kinds(node)


def test_reissued_member_loses_its_old_certificate(
    serving: tuple[FederationFixture, Node],
) -> None:
    fed, _ = serving
    old = fed.identity("alice")
    federation, _ = fed.federation.enrol(
        role=Role.ANALYST, name="alice", jurisdiction="CN", out=fed.root / "alice-2",
        reissue=True,
    )  # fmt: skip
    federation.publish_roster(fed.node_home("tax"))
    with NodeClient.to(old, "tax") as client, pytest.raises(VerificationFailed, match="alice"):
        client.list_datasets()
    with NodeClient.to(Identity.load(fed.root / "alice-2"), "tax") as client:
        assert client.list_datasets() == []


def test_revoked_member_is_refused(serving: tuple[FederationFixture, Node]) -> None:
    fed, node = serving
    auditor = fed.identity("audra")
    federation = fed.federation.revoke("hkana")
    federation.publish_roster(fed.node_home("tax"))
    with NodeClient.to(fed.identity("hkana"), "tax") as client:
        with pytest.raises(VerificationFailed, match="hkana"):
            client.list_datasets()
    assert "hkana" not in {m.name for m in node.roster().members}
    assert auditor.name in {m.name for m in node.roster().members}
    with pytest.raises(NotFound):
        federation.revoke("hkana")


def test_a_roster_that_changes_the_suite_is_refused(
    serving: tuple[FederationFixture, Node],
) -> None:
    """Even the administrator's CA key cannot move a federation to another suite: the CA
    certificate says which suite its rosters are on, and the serving node logs the refusal."""
    fed, node = serving
    held = node.roster()
    # No members, so that no member key of the old suite is what refuses it.
    moved = replace(fed.federation.roster, version=held.version + 1, suite="sm", members=())
    (fed.node_home("tax") / ROSTER).write_bytes(moved.sign(fed.federation.ca_key))
    with NodeClient.to(fed.identity("civil"), "tax") as client:
        assert client.ping().roster_version == held.version
    refused = [
        e.decode().fields for e in node.audit.entries(0, node.audit.size)
        if e.decode().kind == "roster.refused"
    ]  # fmt: skip
    assert refused and "signs rosters on 'standard'" in str(refused[-1]["reason"])
    assert node.roster().suite == "standard"
