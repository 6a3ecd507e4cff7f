"""One query's entries across the nodes' logs: the fields every participant must agree on.

By convention every node records, for a query it took part in, the digest of the signed request
(``request_digest``), the sorted ``participants``, the ``result_digest`` of what it released
to each recipient, and a ``protocol.step`` for every message it sent to or received from a peer
node (phase, digest, size). Reconciliation compares those fields across the nodes' verified logs:
the auditor does it for ``audit show``, the risk rules for missing hand-offs. Pure functions
over decoded entries: no network, no storage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from govshare.protocols.auditverify import (
    AuditEntry,
)


@dataclass(frozen=True)
class NodeQueryEntries:
    """One node's entries for a query, and the convention's fields found in them."""

    node: str
    entries: tuple[AuditEntry, ...] = ()
    error: str | None = None
    request_digest: tuple[str, ...] = ()
    participants: tuple[tuple[str, ...], ...] = ()
    result_digest: tuple[str, ...] = ()
    result_conflicts: tuple[str, ...] = ()  # recipients given two different results


@dataclass(frozen=True)
class QueryReconciliation:
    query_id: str
    nodes: tuple[NodeQueryEntries, ...]
    disagreements: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.disagreements


AGREED_FIELDS = ("request_digest", "participants")  # identical at every participant


def _digest_value(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str):
        return value.lower()
    return None


def _participants_value(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value))
    return None


def _collect_fields(node: str, entries: Sequence[AuditEntry]) -> NodeQueryEntries:
    request: list[str] = []
    participants: list[tuple[str, ...]] = []
    results: dict[str, list[str]] = {}  # recipient -> result digests released to it
    for entry in entries:
        fields = entry.fields
        if "request_digest" in fields:
            found = _digest_value(fields["request_digest"])
            request.append(found if found is not None else repr(fields["request_digest"]))
        if "participants" in fields:
            listed = _participants_value(fields["participants"])
            participants.append(listed if listed is not None else ("<not a list of names>",))
        if "result_digest" in fields:
            found = _digest_value(fields["result_digest"])
            recipient = fields.get("recipient")
            results.setdefault(recipient if isinstance(recipient, str) else "", []).append(
                found if found is not None else repr(fields["result_digest"])
            )
    return NodeQueryEntries(
        node=node,
        entries=tuple(entries),
        request_digest=tuple(dict.fromkeys(request)),
        participants=tuple(dict.fromkeys(participants)),
        result_digest=tuple(dict.fromkeys(d for ds in results.values() for d in ds)),
        result_conflicts=tuple(
            recipient for recipient, digests in results.items() if len(set(digests)) > 1
        ),
    )


def _reconcile(query_id: str, views: Sequence[NodeQueryEntries]) -> list[str]:
    involved = [v for v in views if v.entries]
    issues: list[str] = []
    if not involved:
        return [f"no node recorded query {query_id}"]
    for v in involved:
        if not v.request_digest:
            issues.append(f"{v.node} recorded no request_digest")
        if not v.participants:
            issues.append(f"{v.node} recorded no participants")
    for name in AGREED_FIELDS:
        values: dict[object, list[str]] = {}
        for v in involved:
            own = getattr(v, name)
            if len(own) > 1:
                issues.append(f"{v.node} recorded {len(own)} different {name} values")
            for value in own:
                values.setdefault(value, []).append(v.node)
        if len(values) > 1:
            shown = "; ".join(
                f"{'/'.join(nodes)}: {_short(value)}" for value, nodes in values.items()
            )
            issues.append(f"{name} differs ({shown})")
    for v in involved:
        for recipient in v.result_conflicts:
            issues.append(
                f"{v.node} released different results to {recipient or 'an unnamed recipient'} "
                "(two result_digest values)"
            )
    listed = {name for v in involved for names in v.participants for name in names}
    by_node = {v.node: v for v in views}
    for name in sorted(listed):
        view = by_node.get(name)
        if view is None:
            issues.append(f"participant {name} is not a node of the roster")
        elif view.error is not None:
            issues.append(f"participant {name} could not be asked: {view.error}")
        elif not view.entries:
            issues.append(f"participant {name} recorded nothing for this query")
    if listed:
        for v in involved:
            if v.node not in listed:
                issues.append(f"{v.node} recorded the query but is not a listed participant")
    return issues + _handoffs(involved)


_Handoff = tuple[str, str, str, str, int]  # sender, receiver, phase, digest, size


def _handoffs(involved: Sequence[NodeQueryEntries]) -> list[str]:
    """Every message a node logged as sent to a peer node, that peer logged as received, with
    the same phase, digest and size — and the other way round. Messages to or from members that
    are not nodes of the query (the analyst) have no second log to compare with."""
    nodes = {v.node for v in involved}
    sent: Counter[_Handoff] = Counter()
    received: Counter[_Handoff] = Counter()
    for view in involved:
        for entry in view.entries:
            fields = entry.fields
            peer, direction = fields.get("peer"), fields.get("direction")
            if entry.kind != "protocol.step" or not isinstance(peer, str) or peer not in nodes:
                continue
            phase = str(fields.get("phase", "")).split(":")[0]
            digest, size = str(fields.get("digest", "")), fields.get("size")
            size = size if isinstance(size, int) else -1
            if direction == "sent":
                sent[(view.node, peer, phase, digest, size)] += 1
            elif direction == "received":
                received[(peer, view.node, phase, digest, size)] += 1
    issues = [
        f"{src} logged sending {phase} ({size} items, {_short(digest)}) to {dst}, "
        "which logged no such message received"
        for (src, dst, phase, digest, size) in (sent - received)
    ]
    issues += [
        f"{dst} logged receiving {phase} ({size} items, {_short(digest)}) from {src}, "
        "which logged no such message sent"
        for (src, dst, phase, digest, size) in (received - sent)
    ]
    return issues


def _short(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    text = str(value)
    return text if len(text) <= 16 else text[:16] + "…"
