"""The department node: its identity, stores and the operations its servicers expose.

Servicers (``govshare.node.services``) are thin adapters over this class; everything here takes
the verified caller as an argument so it can be tested without a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from govshare.node.audit_sink import AuditSink
from govshare.node.auth import Caller
from govshare.node.config import NodeConfig
from govshare.node.governance import DatasetInfo, Grade, Role
from govshare.node.identity import Identity
from govshare.protocols.errors import NotFound


class DatasetSource(Protocol):
    def list(self) -> list[DatasetInfo]: ...

    def get(self, name: str) -> DatasetInfo: ...


def visible_to(caller: Caller, dataset: DatasetInfo) -> bool:
    """Core datasets never take part in joint queries, so analysts never see them listed."""
    return not (dataset.grade is Grade.CORE and caller.role is Role.ANALYST)


@dataclass
class Node:
    identity: Identity
    catalogue: DatasetSource
    audit: AuditSink | None = None
    clock: Callable[[], float] = field(default=time.time)

    @classmethod
    def from_config(cls, config: NodeConfig) -> Node:
        """Build a node from its home: identity bundle, catalogue store, audit log."""
        from govshare.node.catalog import Catalogue

        identity = Identity.load(config.identity_dir)
        return cls(identity=identity, catalogue=Catalogue(config.database_path))

    @classmethod
    def from_home(cls, home: Path) -> Node:
        return cls.from_config(NodeConfig.load(home))

    @property
    def name(self) -> str:
        return self.identity.name

    def list_datasets(self, caller: Caller) -> list[DatasetInfo]:
        return [d for d in self.catalogue.list() if visible_to(caller, d)]

    def describe_dataset(self, caller: Caller, name: str) -> DatasetInfo:
        dataset = self.catalogue.get(name)
        if not visible_to(caller, dataset):
            # Same answer as for a dataset that does not exist: core is not discoverable.
            raise NotFound(f"no dataset {name!r} on node {self.name}")
        return dataset
