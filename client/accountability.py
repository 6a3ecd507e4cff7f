"""Who holds which right, and who answers for what (权利可查, 谁主管谁负责): read from the logs.

The auditor's view of accountability is built from verified log entries only: each node's
pulled copy is verified first (:meth:`govshare.client.auditor.Auditor.verify`, offline, as
``audit report`` does) and only the entries the verification covered are read; a node whose
copy does not verify is listed as such, and nothing of it is read.

- :func:`fold_register` (pure) folds one node's entries into its **rights register**: every
  dataset it registered (owner, owner kind, grade, the responsible person — the named operator
  whose signed act registered it, 数据安全负责人) and every right granted on it (holder, scope,
  ε, expiry, status, who granted it). Status is ``active``, ``revoked`` (a ``grant.revoked``
  entry), ``expired`` (by ``now``) or ``void`` (its dataset was removed, or registered again,
  after the grant).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from govshare.client.auditor import Auditor, LocalLog
from govshare.model.risk import read_entry
from govshare.protocols.auditverify import AuditEntry


@dataclass
class RightRecord:
    """One grant as the log tells it."""

    node: str
    grant_id: str
    dataset: str
    holder: str
    purpose: str
    columns: list[str]
    query_kinds: list[str]
    epsilon: str
    max_queries: int
    expires_at: int
    granted_by: str
    entry: int  # index of its grant.created entry
    status: str = "active"
    revoked_by: str = ""
    revoked_entry: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "grant_id": self.grant_id, "dataset": self.dataset,
            "holder": self.holder, "purpose": self.purpose, "columns": self.columns,
            "query_kinds": self.query_kinds, "epsilon": self.epsilon,
            "max_queries": self.max_queries, "expires_at": self.expires_at,
            "granted_by": self.granted_by, "entry": self.entry, "status": self.status,
            "revoked_by": self.revoked_by, "revoked_entry": self.revoked_entry,
            "reason": self.reason,
        }  # fmt: skip


@dataclass
class DatasetRecord:
    """One dataset as the log tells it, with the rights granted on it."""

    node: str
    name: str
    grade: str
    owner: str
    owner_kind: str
    holder: str
    responsible: str  # the person whose signed act registered it
    entry: int  # its (latest) dataset.added entry
    removed: bool = False
    rights: list[RightRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "dataset": self.name, "grade": self.grade, "owner": self.owner,
            "owner_kind": self.owner_kind, "holder": self.holder,
            "responsible": self.responsible, "entry": self.entry, "removed": self.removed,
            "rights": [r.to_json() for r in self.rights],
        }  # fmt: skip


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _texts(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def fold_register(node: str, entries: Iterable[AuditEntry], *, now: int) -> list[DatasetRecord]:
    """One node's datasets and the rights on them, from its verified entries in log order.

    A dataset removed and not registered again is kept (``removed``) with its rights, which
    are then ``void``: the register shows what was granted, not only what is in force."""
    datasets: dict[str, DatasetRecord] = {}
    rights: dict[str, RightRecord] = {}
    added_at: dict[str, int] = {}  # dataset -> index of its latest dataset.added
    removed_at: dict[str, int] = {}
    for entry in entries:
        fields = entry.fields
        if entry.kind == "dataset.added":
            name = _text(fields.get("name"))
            raw_owner = fields.get("owner")
            owner: dict[str, object] = raw_owner if isinstance(raw_owner, dict) else {}
            held = datasets.get(name)
            record = DatasetRecord(
                node=node, name=name, grade=_text(fields.get("grade")),
                owner=_text(owner.get("name")), owner_kind=_text(owner.get("kind")),
                holder=_text(owner.get("holder")), responsible=entry.actor, entry=entry.index,
                rights=held.rights if held is not None else [],
            )  # fmt: skip
            datasets[name] = record
            added_at[name] = entry.index
            removed_at.pop(name, None)
        elif entry.kind == "dataset.removed":
            name = _text(fields.get("name"))
            removed_at[name] = entry.index
            if name in datasets:
                datasets[name].removed = True
        elif entry.kind == "grant.created":
            right = RightRecord(
                node=node, grant_id=_text(fields.get("grant_id")),
                dataset=_text(fields.get("dataset")), holder=_text(fields.get("grantee")),
                purpose=_text(fields.get("purpose")), columns=_texts(fields.get("columns")),
                query_kinds=_texts(fields.get("query_kinds")),
                epsilon=_text(fields.get("epsilon")),
                max_queries=_int(fields.get("max_queries")),
                expires_at=_int(fields.get("expires_at")),
                granted_by=_text(fields.get("granted_by")) or entry.actor, entry=entry.index,
            )  # fmt: skip
            rights[right.grant_id] = right
            if right.dataset in datasets:
                datasets[right.dataset].rights.append(right)
        elif entry.kind == "grant.revoked":
            revoked = rights.get(_text(fields.get("grant_id")))
            if revoked is not None and revoked.revoked_entry is None:
                revoked.revoked_by, revoked.revoked_entry = entry.actor, entry.index
                revoked.reason = _text(fields.get("reason"))
    for right in rights.values():
        if right.revoked_entry is not None:
            right.status = "revoked"
        elif now >= right.expires_at:
            right.status = "expired"
        elif right.dataset in removed_at or added_at.get(right.dataset, -1) > right.entry:
            right.status = "void"
    return sorted(datasets.values(), key=lambda d: d.name)


@dataclass
class Register:
    """The federation's rights register: every verified node's datasets and rights, and the
    nodes whose copies did not verify (or were never pulled)."""

    datasets: list[DatasetRecord]
    verified: list[str]
    not_verified: dict[str, str]  # node -> why

    def to_json(self) -> dict[str, Any]:
        return {
            "datasets": [d.to_json() for d in self.datasets],
            "verified": self.verified,
            "not_verified": self.not_verified,
        }


def verified_entries(store: LocalLog, size: int) -> Iterator[AuditEntry]:
    """The first ``size`` entries of a verified copy (what the verification covered)."""
    for index, data, _ in store.iter_entries():
        if index >= size:
            return
        yield read_entry(data)


def rights_register(auditor: Auditor, nodes: Sequence[str], *, now: int | None = None) -> Register:
    """Verify each of ``nodes``' pulled copies and fold those that verified.

    Raises:
        NotFound: a node is not in the roster.
    """
    when = int(time.time()) if now is None else now
    datasets: list[DatasetRecord] = []
    verified: list[str] = []
    failed: dict[str, str] = {}
    with ExitStack() as stack:
        for verdict in auditor.verify_all(nodes):
            store = LocalLog.existing(auditor.state / verdict.node) if verdict.ok else None
            if store is None:
                problem = verdict.first_problem
                failed[verdict.node] = problem.message if problem is not None else "not pulled"
                continue
            stack.enter_context(store)
            datasets.extend(
                fold_register(verdict.node, verified_entries(store, verdict.entries), now=when)
            )
            verified.append(verdict.node)
    return Register(datasets, verified, failed)
