"""The department node: its identity, stores and the operations its servicers expose.

Servicers (``govshare.node.services``) are thin adapters over this class; everything here takes
the verified caller as an argument so it can be tested without a server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from govshare.node.auditlog import AuditLog, LogEntry
from govshare.node.auth import Caller
from govshare.node.checkpointer import CheckpointPublisher
from govshare.node.config import DEFAULT_CHECKPOINT_INTERVAL, NodeConfig
from govshare.node.governance import DatasetInfo, Grade, Role
from govshare.node.identity import Identity
from govshare.node.witness import Witness, WitnessStore
from govshare.protocols.errors import MalformedInput, NotFound

# Entries per GetEntries page: bounded messages whatever range an auditor asks for.
ENTRY_PAGE = 1000


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
    audit: AuditLog
    witness_store: WitnessStore
    clock: Callable[[], float] = field(default=time.time)
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    publisher: CheckpointPublisher = field(init=False)
    witness: Witness = field(init=False)

    def __post_init__(self) -> None:
        self.publisher = CheckpointPublisher(
            self.identity, self.audit, interval=self.checkpoint_interval
        )
        self.witness = Witness(
            self.identity, self.witness_store, audit=self.audit, clock=self.clock
        )

    @classmethod
    def from_config(cls, config: NodeConfig) -> Node:
        """Build a node from its home: identity bundle, catalogue store, audit log."""
        from govshare.node.catalog import Catalogue

        identity = Identity.load(config.identity_dir)
        return cls(
            identity=identity,
            catalogue=Catalogue(config.database_path),
            audit=AuditLog.open(config.audit_database_path),
            witness_store=WitnessStore(config.database_path),
            checkpoint_interval=config.checkpoint_interval,
        )

    @classmethod
    def from_home(cls, home: Path) -> Node:
        return cls.from_config(NodeConfig.load(home))

    @property
    def name(self) -> str:
        return self.identity.name

    def close(self) -> None:
        self.publisher.stop()
        self.audit.close()
        self.witness_store.close()

    # --- catalogue ----------------------------------------------------------------------------

    def list_datasets(self, caller: Caller) -> list[DatasetInfo]:
        return [d for d in self.catalogue.list() if visible_to(caller, d)]

    def describe_dataset(self, caller: Caller, name: str) -> DatasetInfo:
        dataset = self.catalogue.get(name)
        if not visible_to(caller, dataset):
            # Same answer as for a dataset that does not exist: core is not discoverable.
            raise NotFound(f"no dataset {name!r} on node {self.name}")
        return dataset

    # --- audit log ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> bytes:
        """A signed, witnessed checkpoint covering every entry so far."""
        latest = self.audit.latest_checkpoint()
        if latest is None or latest.size != self.audit.size:
            latest = self.publisher.publish()
        return latest.note

    def entry_pages(self, start: int, end: int) -> Iterator[list[LogEntry]]:
        size = self.audit.size
        if not 0 <= start <= end <= size:
            raise MalformedInput(
                f"field 'start'/'end': range [{start}, {end}) is outside the log of {size}",
                field="start",
            )
        for page in range(start, end, ENTRY_PAGE):
            yield self.audit.entries(page, min(end, page + ENTRY_PAGE))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self.audit.inclusion_proof(index, size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return self.audit.consistency_proof(old_size, new_size)

    def query_entries(self, query_id: str) -> list[LogEntry]:
        if not query_id:
            raise MalformedInput("field 'query_id' is required", field="query_id")
        return self.audit.entries_for_query(query_id)

    def witness_checkpoint(
        self, caller: Caller, note: bytes, old_size: int, proof: Sequence[bytes]
    ) -> tuple[bytes, int]:
        if not note:
            raise MalformedInput("field 'note' is required", field="note")
        if old_size < 0:
            raise MalformedInput("field 'old_size' must not be negative", field="old_size")
        return self.witness.witness(caller.member, note, old_size, proof)
