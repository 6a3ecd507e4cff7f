"""Shared fixtures: a real federation on disk and real node servers over mutual TLS."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from govshare.node.config import NodeConfig, write_default
from govshare.node.governance import Role
from govshare.node.identity import Federation, Identity, init_federation
from govshare.node.node import Node
from govshare.node.server import RunningNode, create_server

REPO = Path(__file__).resolve().parents[1]


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


def build_federation(root: Path, name: str = "testfed") -> FederationFixture:
    """A federation with two nodes, two analysts (CN, HK), an auditor and an expired analyst."""
    directory = root / "federation"
    init_federation(directory, name)
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
    for bundle in bundles.values():
        federation.publish_roster(bundle)
    for role, member, _ in members:
        if role is Role.NODE:
            address = federation.roster.member(member).address
            write_default(bundles[member], listen=address)
    return FederationFixture(root, directory, federation, bundles)


@pytest.fixture(scope="session")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    return build_federation(tmp_path_factory.mktemp("fed"))


@pytest.fixture(scope="session")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> FederationFixture:
    """Another federation whose analyst is also called 'alice': its CA is not ours."""
    return build_federation(tmp_path_factory.mktemp("foreign"), "otherfed")


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
