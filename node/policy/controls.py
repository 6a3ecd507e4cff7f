"""The operator's controls over their node and datasets: approvers required, and freezes.

- **Two approvers.** A dataset may require more than one operator's approval of each query
  (``govshare dataset approvers NAME 2``): the query stays ``pending_approval`` until that many
  different persons approved it (``govshare.node.policy.approvals``).
- **Freezes (incident controls).** ``govshare node freeze --reason ...`` stops every query at
  once: admission refuses new ones, a query waiting for approval or to run is refused on the
  spot (its reservation returned), an approval or a run of one is refused, all with rule
  ``node.frozen``, until ``node unfreeze``. ``govshare dataset freeze NAME`` does the same for
  the queries on one dataset (rule ``dataset.frozen``). Each freeze and unfreeze is a signed
  operator act, logged (``node.frozen``, ``node.unfrozen``, ``dataset.frozen``,
  ``dataset.unfrozen``) with the person and the reason, and seen by ``audit check``.

Both live in ``node.db`` (tables ``dataset_controls`` and ``freezes``), which the serving node
and the operator's commands share: a freeze made from another process holds at the node's next
admission, approval or run.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

from govshare.model.states import APPROVED, PENDING, REFUSED
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.query_store import QueryStore
from govshare.node.stores.sqlite import Tables, immediate
from govshare.protocols.errors import Conflict, MalformedInput

NODE_FROZEN = "node.frozen"
DATASET_FROZEN = "dataset.frozen"
# The scope of a node-wide freeze in the freezes table (a dataset name never starts with '*').
WHOLE_NODE = "*"
# A second approver is the point; more than a handful is a committee no query would pass.
MAX_APPROVERS = 5
MAX_REASON_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dataset_controls (
    dataset   TEXT PRIMARY KEY,
    approvers INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS freezes (
    scope     TEXT PRIMARY KEY,   -- '*' for the whole node, else a dataset name
    reason    TEXT NOT NULL,
    frozen_by TEXT NOT NULL,
    since     INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Freeze:
    scope: str  # WHOLE_NODE or a dataset
    reason: str
    frozen_by: str
    since: int

    @property
    def rule(self) -> str:
        return NODE_FROZEN if self.scope == WHOLE_NODE else DATASET_FROZEN

    def message(self, node: str) -> str:
        where = f"node {node}" if self.scope == WHOLE_NODE else f"dataset {self.scope} at {node}"
        return f"{where} is frozen by {self.frozen_by}: {self.reason}"

    def to_json(self) -> dict[str, object]:
        return {
            "scope": "node" if self.scope == WHOLE_NODE else self.scope,
            "rule": self.rule,
            "reason": self.reason,
            "frozen_by": self.frozen_by,
            "since": self.since,
        }


def check_reason(reason: str) -> str:
    """Raises: MalformedInput for an empty or overlong reason (a freeze always says why)."""
    text = reason.strip()
    if not text or len(text) > MAX_REASON_CHARS or _CONTROL.search(text):
        raise MalformedInput(
            f"a reason is required: one line of at most {MAX_REASON_CHARS} characters",
            field="reason",
        )
    return text


class ControlStore(Tables):
    """The node's ``dataset_controls`` and ``freezes`` tables (see the module docstring)."""

    schema = _SCHEMA

    # --- approvers ---------------------------------------------------------------------------

    def approvers(self, dataset: str) -> int:
        with self._open() as conn:
            row = conn.execute(
                "SELECT approvers FROM dataset_controls WHERE dataset = ?", (dataset,)
            ).fetchone()
        return 1 if row is None else int(row["approvers"])

    def set_approvers(self, dataset: str, count: int, *, actor: str, audit: AuditSink) -> None:
        """Require ``count`` different approvers of each query on ``dataset`` (logged).

        Raises:
            MalformedInput: a count outside 1..MAX_APPROVERS.
        """
        if isinstance(count, bool) or not 1 <= count <= MAX_APPROVERS:
            raise MalformedInput(f"approvers must be 1 to {MAX_APPROVERS}", field="approvers")
        with self._open() as conn, immediate(conn):
            conn.execute(
                "INSERT INTO dataset_controls (dataset, approvers) VALUES (?, ?) "
                "ON CONFLICT (dataset) DO UPDATE SET approvers = excluded.approvers",
                (dataset, count),
            )
            audit.record("dataset.approvers", {"dataset": dataset, "approvers": count}, actor=actor)

    # --- freezes -----------------------------------------------------------------------------

    def freezes(self) -> list[Freeze]:
        with self._open() as conn:
            rows = conn.execute("SELECT * FROM freezes ORDER BY since, scope").fetchall()
        return [Freeze(r["scope"], r["reason"], r["frozen_by"], int(r["since"])) for r in rows]

    def frozen(self, dataset: str) -> Freeze | None:
        """The freeze that stops queries on ``dataset`` (the node's first), or None."""
        with self._open() as conn:
            rows = conn.execute(
                "SELECT * FROM freezes WHERE scope IN (?, ?) ORDER BY scope = ? DESC",
                (WHOLE_NODE, dataset, WHOLE_NODE),
            ).fetchall()
        if not rows:
            return None
        r = rows[0]
        return Freeze(r["scope"], r["reason"], r["frozen_by"], int(r["since"]))

    def freeze(
        self,
        scope: str,
        *,
        reason: str,
        actor: str,
        audit: AuditSink,
        queries: QueryStore,
        node: str,
        now: int,
    ) -> tuple[Freeze, list[str]]:
        """Freeze the node (``scope`` WHOLE_NODE) or one dataset, and refuse at once every
        query waiting on it for approval or to run (their reservations returned; each logged
        as a ``policy.decision`` refusal with the freeze's rule). Returns the freeze and the
        ids of the queries it stopped.

        Raises:
            MalformedInput: no reason.
            Conflict: already frozen.
        """
        reason = check_reason(reason)
        held = Freeze(scope, reason, actor, now)
        with self._open() as conn, immediate(conn):
            try:
                conn.execute(
                    "INSERT INTO freezes (scope, reason, frozen_by, since) VALUES (?, ?, ?, ?)",
                    (scope, reason, actor, now),
                )
            except sqlite3.IntegrityError:
                what = "the node" if scope == WHOLE_NODE else f"dataset {scope}"
                raise Conflict(f"{what} is already frozen") from None
            kind = "node.frozen" if scope == WHOLE_NODE else "dataset.frozen"
            fields: dict[str, object] = {"reason": reason}
            if scope != WHOLE_NODE:
                fields["dataset"] = scope
            audit.record(kind, fields, actor=actor)
        return held, self.stop_waiting(held, queries=queries, audit=audit, node=node, now=now)

    def stop_waiting(
        self, held: Freeze, *, queries: QueryStore, audit: AuditSink, node: str, now: int
    ) -> list[str]:
        """Refuse the queries a freeze covers that wait for approval or to run."""
        stopped = []
        message = held.message(node)
        for state in (PENDING, APPROVED):
            for record in queries.with_state(state):
                if held.scope != WHOLE_NODE and record.dataset != held.scope:
                    continue
                try:
                    queries.transition(
                        record.query_id, from_states=[state], to=REFUSED, now=now,
                        message=message, rule=held.rule,
                    )  # fmt: skip
                except Conflict:
                    continue  # decided, run or withdrawn meanwhile
                audit.record(
                    "policy.decision",
                    {"dataset": record.dataset, "allowed": False, "rule": held.rule,
                     "message": message, "was": state},
                    actor=held.frozen_by,
                    query_id=record.query_id,
                )  # fmt: skip
                returned = queries.settle(record.query_id, spent=False, now=now)
                if returned is not None:
                    audit.record(
                        "budget.settled",
                        {"reservation": returned, "reason": f"refused: {held.rule}"},
                        actor=node,
                        query_id=record.query_id,
                    )
                stopped.append(record.query_id)
        return stopped

    def unfreeze(self, scope: str, *, reason: str, actor: str, audit: AuditSink) -> Freeze:
        """Lift a freeze (logged with the person and the reason).

        Raises:
            MalformedInput: no reason.
            Conflict: not frozen.
        """
        reason = check_reason(reason)
        with self._open() as conn, immediate(conn):
            row = conn.execute("SELECT * FROM freezes WHERE scope = ?", (scope,)).fetchone()
            if row is None:
                what = "the node" if scope == WHOLE_NODE else f"dataset {scope}"
                raise Conflict(f"{what} is not frozen")
            conn.execute("DELETE FROM freezes WHERE scope = ?", (scope,))
            kind = "node.unfrozen" if scope == WHOLE_NODE else "dataset.unfrozen"
            fields: dict[str, object] = {"reason": reason, "frozen_by": row["frozen_by"],
                                         "since": int(row["since"])}  # fmt: skip
            if scope != WHOLE_NODE:
                fields["dataset"] = scope
            audit.record(kind, fields, actor=actor)
        return Freeze(scope, row["reason"], row["frozen_by"], int(row["since"]))
