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
- :func:`fold_responsibility` (pure) lists who answers for one dataset: the responsible person,
  the grant issuers, the approvers and the analysts of record, each with the entries they
  acted in and their last signed act in the log (an operator's ``operator.act``, an analyst's
  signed request or application), its signature checked against the roster's key.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from govshare.client.auditor import Auditor, LocalLog
from govshare.model.identity import Roster
from govshare.model.operator_act import OperatorAct
from govshare.model.risk import read_entry
from govshare.protocols.auditverify import BYTES_TAG, AuditEntry
from govshare.protocols.errors import GovshareError, MalformedInput, NotFound, VerificationFailed
from govshare.protocols.signed_request import SignedRequest


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


# --- the responsibility list -------------------------------------------------------------------


@dataclass
class SignedAct:
    """A person's last signed act in a node's log: an operator's act (``operator.act``) or an
    analyst's signed request or application, with whether its signature verifies under the
    roster's key for that person."""

    entry: int
    time_ms: int
    kind: str  # the entry kind: operator.act, query.received, application.received
    action: str  # the act's action, or the request's kind
    verified: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": self.entry, "time_ms": self.time_ms, "kind": self.kind,
            "action": self.action, "signature_verified": self.verified,
        }  # fmt: skip


@dataclass
class Person:
    name: str
    duty: str  # responsible | grant_issuer | approver | analyst
    entries: list[int] = field(default_factory=list)  # what they did on the dataset
    last_act: SignedAct | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "duty": self.duty,
            "entries": self.entries,
            "last_signed_act": None if self.last_act is None else self.last_act.to_json(),
        }


@dataclass
class Responsibility:
    node: str
    dataset: str
    people: list[Person]

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "dataset": self.dataset,
            "people": [p.to_json() for p in self.people],
        }


def _verify_signed(entry: AuditEntry, roster: Roster) -> SignedAct | None:
    """The signed act an entry carries, checked against the roster; None if it carries none."""
    fields = entry.fields
    try:
        if entry.kind == "operator.act":
            raw = fields.get("act")
            act = OperatorAct.decode(raw if isinstance(raw, bytes) else _untag(raw))
            key = roster.member(act.operator).verify_key()
            ok = act.operator == entry.actor
            try:
                key.verify(act.signature, act.signed_bytes())
            except VerificationFailed:
                ok = False
            return SignedAct(entry.index, entry.time_ms, entry.kind, act.action, ok)
        if entry.kind in ("query.received", "application.received"):
            raw = fields.get("request")
            request = SignedRequest.decode(raw if isinstance(raw, bytes) else _untag(raw))
            key = roster.member(request.analyst).verify_key()
            ok = request.analyst == entry.actor
            try:
                key.verify(request.signature, request.signed_bytes())
            except VerificationFailed:
                ok = False
            return SignedAct(entry.index, entry.time_ms, entry.kind, request.kind, ok)
    except GovshareError:
        return SignedAct(entry.index, entry.time_ms, entry.kind, "", False)
    return None


def _untag(value: object) -> bytes:
    """Bytes a verified entry holds in their tagged JSON form (``{"$bytes": base64}``)."""
    if isinstance(value, dict) and isinstance(value.get(BYTES_TAG), str):
        try:
            return base64.b64decode(value[BYTES_TAG], validate=True)
        except (ValueError, binascii.Error):
            pass
    raise MalformedInput("entry holds no signed bytes", field="act")


def fold_responsibility(
    node: str, dataset: str, entries: Iterable[AuditEntry], roster: Roster
) -> Responsibility:
    """Who answers for ``dataset`` at ``node``, from its verified entries in log order: the
    responsible person (registered it), the grant issuers, the approvers and the analysts of
    record, each with the entries they acted in on the dataset and their last signed act in
    the log (any act of theirs at this node), its signature checked against the roster."""
    people: dict[tuple[str, str], Person] = {}
    last: dict[str, SignedAct] = {}
    grants: set[str] = set()

    def record(name: str, duty: str, index: int) -> None:
        people.setdefault((name, duty), Person(name, duty)).entries.append(index)

    for entry in entries:
        fields = entry.fields
        signed = _verify_signed(entry, roster)
        if signed is not None:
            last[entry.actor] = signed
        if entry.kind == "dataset.added" and fields.get("name") == dataset:
            people.pop(next((k for k in people if k[1] == "responsible"), ("", "")), None)
            record(entry.actor, "responsible", entry.index)
        elif entry.kind == "grant.created" and fields.get("dataset") == dataset:
            grants.add(str(fields.get("grant_id")))
            record(str(fields.get("granted_by") or entry.actor), "grant_issuer", entry.index)
        elif entry.kind == "grant.revoked" and fields.get("grant_id") in grants:
            record(entry.actor, "grant_issuer", entry.index)
        elif entry.kind.startswith("approval.") and fields.get("dataset") == dataset:
            record(entry.actor, "approver", entry.index)
        elif (
            entry.kind == "policy.decision"
            and fields.get("dataset") == dataset
            and entry.actor != node
            and "was" not in fields  # a freeze's refusal of a waiting query, not the analyst's
        ):
            record(entry.actor, "analyst", entry.index)
        elif entry.kind == "application.received" and fields.get("dataset") == dataset:
            record(entry.actor, "analyst", entry.index)
    order = {"responsible": 0, "grant_issuer": 1, "approver": 2, "analyst": 3}
    found = sorted(people.values(), key=lambda p: (order[p.duty], p.name))
    for person in found:
        person.last_act = last.get(person.name)
    return Responsibility(node, dataset, found)


def responsibility(auditor: Auditor, node: str, dataset: str) -> Responsibility:
    """:func:`fold_responsibility` over ``node``'s pulled copy, verified first.

    Raises:
        NotFound: ``node`` is not in the roster, or the dataset was never registered there.
        VerificationFailed: the copy is missing or does not verify (nothing of it is read).
    """
    [verdict] = auditor.verify_all([node])
    store = LocalLog.existing(auditor.state / node) if verdict.ok else None
    if store is None:
        problem = verdict.first_problem
        raise VerificationFailed(
            f"{node}'s pulled log does not verify: "
            f"{problem.message if problem is not None else 'not pulled'}"
        )
    with store:
        found = fold_responsibility(
            node, dataset, verified_entries(store, verdict.entries), auditor.roster
        )
    if not any(p.duty == "responsible" for p in found.people):
        raise NotFound(f"{node}'s verified log never registered a dataset {dataset!r}")
    return found
