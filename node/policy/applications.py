"""Access applications (使用权申请): an analyst asks a node for a right; a named operator answers.

``govshare grant request`` signs an application with the analyst's key (a signed request of
kind ``grant_application``, ``govshare.protocols.signed_request``: nonce, expiry,
non-repudiation) and sends it to the node over mutual TLS (``Rights.Apply``). The node checks
the caller is the signer, the signature, the window and the nonce, and that what is asked is
grantable (the dataset, its columns — none ``deny`` —, the query kinds, a purpose and a legal
basis), stores it with its deadline — ``application_deadline_days`` working days (Monday to
Friday, UTC) in ``node.toml`` — and logs ``application.received`` with the signed request and
the deadline.

The operator lists open applications with the time left (``grant requests``) and answers each
as a signed act: ``grant approve REQ`` issues the grant the application asked for (the node's
key signs it; ``granted_by`` is the person) and logs ``application.approved`` with the grant id;
``grant refuse REQ --reason ...`` needs a reason and logs ``application.refused``. An answered
application cannot be answered again. The analyst reads the answers, and the grants it holds,
from every node (``grant mine``, ``Rights.Mine``). An application still open past its deadline
is ``overdue``; ``audit check`` raises ``application.overdue`` from the logs alone (the
deadline is in the received entry).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from dataclasses import dataclass

from govshare.model.governance import ColumnKind, DatasetInfo, QueryKind
from govshare.node.audit.sink import AuditSink
from govshare.node.policy.decision import GRANT_EXPIRED, GRANT_REVOKED, grant_standing
from govshare.node.policy.grants import Grant
from govshare.node.stores.sqlite import Tables, immediate
from govshare.protocols.errors import Conflict, MalformedInput, NotFound
from govshare.protocols.signed_request import SignedRequest

APPLICATION_KIND = "grant_application"
PENDING = "pending"
APPROVED = "approved"
REFUSED = "refused"
MAX_TEXT_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applications (
    request_id  TEXT PRIMARY KEY,
    applicant   TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    columns     TEXT NOT NULL,   -- JSON list, sorted
    query_kinds TEXT NOT NULL,   -- JSON list, sorted
    purpose     TEXT NOT NULL,
    legal_basis TEXT NOT NULL,
    request     BLOB NOT NULL,   -- the analyst's signed request
    received_at INTEGER NOT NULL,
    deadline_at INTEGER NOT NULL,
    state       TEXT NOT NULL,
    answered_by TEXT NOT NULL DEFAULT '',
    answered_at INTEGER,
    reason      TEXT NOT NULL DEFAULT '',
    grant_id    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS applications_by_applicant ON applications (applicant);
"""


def working_days_after(start: int, days: int) -> int:
    """``start`` (unix s) plus ``days`` working days (Monday to Friday, UTC), same time of day.

    Zero days is ``start`` itself."""
    if days < 0:
        raise TypeError("days must not be negative")
    moment = dt.datetime.fromtimestamp(start, dt.UTC)
    left = days
    while left > 0:
        moment += dt.timedelta(days=1)
        if moment.weekday() < 5:
            left -= 1
    return int(moment.timestamp())


@dataclass(frozen=True)
class Application:
    request_id: str
    applicant: str
    dataset: str
    columns: tuple[str, ...]
    query_kinds: tuple[str, ...]
    purpose: str
    legal_basis: str
    received_at: int
    deadline_at: int
    state: str
    answered_by: str = ""
    answered_at: int | None = None
    reason: str = ""
    grant_id: str = ""

    def overdue(self, now: int) -> bool:
        return self.state == PENDING and now >= self.deadline_at

    def to_json(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "applicant": self.applicant,
            "dataset": self.dataset,
            "columns": list(self.columns),
            "query_kinds": list(self.query_kinds),
            "purpose": self.purpose,
            "legal_basis": self.legal_basis,
            "received_at": self.received_at,
            "deadline_at": self.deadline_at,
            "state": self.state,
            "answered_by": self.answered_by,
            "answered_at": self.answered_at,
            "reason": self.reason,
            "grant_id": self.grant_id,
        }


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MalformedInput(f"an application needs its {what}", field=what)
    text = value.strip()
    if len(text) > MAX_TEXT_CHARS or _CONTROL.search(text):
        raise MalformedInput(
            f"{what} must be at most {MAX_TEXT_CHARS} characters on one line", field=what
        )
    return text


def check_reason(reason: str) -> str:
    """A refusal's reason: required, one line.

    Raises:
        MalformedInput: empty or malformed.
    """
    if not reason.strip():
        raise MalformedInput("refusing an application needs a reason (--reason)", field="reason")
    return _text(reason, "reason")


@dataclass(frozen=True)
class Asked:
    """What an application asks, parsed from its signed body."""

    node: str
    dataset: str
    columns: tuple[str, ...]
    query_kinds: tuple[str, ...]
    purpose: str
    legal_basis: str


def parse_body(request: SignedRequest) -> Asked:
    """Raises: MalformedInput naming the field that is wrong."""
    if request.kind != APPLICATION_KIND:
        raise MalformedInput(f"not an access application ({request.kind!r})", field="kind")
    body = request.body_json()
    if not isinstance(body, dict):
        raise MalformedInput("application body must be a JSON object", field="body")
    columns, kinds = body.get("columns"), body.get("query_kinds")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise MalformedInput("an application names its columns", field="columns")
    if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
        raise MalformedInput("an application names its query kinds", field="query_kinds")
    known = {k.value for k in QueryKind}
    unknown = sorted(set(kinds) - known)
    if unknown:
        raise MalformedInput(f"unknown query kinds: {', '.join(unknown)}", field="query_kinds")
    return Asked(
        node=_text(body.get("node"), "node"),
        dataset=_text(body.get("dataset"), "dataset"),
        columns=tuple(sorted(set(columns))),
        query_kinds=tuple(sorted(set(kinds))),
        purpose=_text(body.get("purpose"), "purpose"),
        legal_basis=_text(body.get("legal_basis"), "legal_basis"),
    )


def _check_columns(asked: Asked, dataset: DatasetInfo) -> None:
    for name in asked.columns:
        rule = dataset.column(name)
        if rule is None:
            raise MalformedInput(
                f"dataset {dataset.name!r} has no column {name!r}", field="columns"
            )
        if rule.kind is ColumnKind.DENY:
            raise MalformedInput(
                f"column {name!r} of {dataset.name!r} is 'deny' and cannot be granted",
                field="columns",
            )


def _from_row(row: sqlite3.Row) -> Application:
    return Application(
        request_id=row["request_id"],
        applicant=row["applicant"],
        dataset=row["dataset"],
        columns=tuple(json.loads(row["columns"])),
        query_kinds=tuple(json.loads(row["query_kinds"])),
        purpose=row["purpose"],
        legal_basis=row["legal_basis"],
        received_at=int(row["received_at"]),
        deadline_at=int(row["deadline_at"]),
        state=row["state"],
        answered_by=row["answered_by"],
        answered_at=row["answered_at"],
        reason=row["reason"],
        grant_id=row["grant_id"],
    )


class ApplicationStore(Tables):
    """The node's ``applications`` table in ``node.db``."""

    schema = _SCHEMA

    def receive(
        self,
        request: SignedRequest,
        signed: bytes,
        *,
        node: str,
        dataset: DatasetInfo,
        deadline_days: int,
        audit: AuditSink,
        now: int,
    ) -> Application:
        """Store a verified application (the caller checked signer, signature, window and
        nonce) and log ``application.received``.

        Raises:
            MalformedInput: not an application to this node, or not grantable as asked.
        """
        asked = parse_body(request)
        if asked.node != node or asked.dataset != dataset.name:
            raise MalformedInput(f"the application is for {asked.node}.{asked.dataset}")
        _check_columns(asked, dataset)
        application = Application(
            request_id=request.query_id_hex, applicant=request.analyst, dataset=asked.dataset,
            columns=asked.columns, query_kinds=asked.query_kinds, purpose=asked.purpose,
            legal_basis=asked.legal_basis, received_at=now,
            deadline_at=working_days_after(now, deadline_days), state=PENDING,
        )  # fmt: skip
        with self._open() as conn, immediate(conn):
            try:
                conn.execute(
                    "INSERT INTO applications (request_id, applicant, dataset, columns,"
                    " query_kinds, purpose, legal_basis, request, received_at, deadline_at,"
                    " state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        application.request_id, application.applicant, application.dataset,
                        json.dumps(list(application.columns)),
                        json.dumps(list(application.query_kinds)), application.purpose,
                        application.legal_basis, signed, now, application.deadline_at, PENDING,
                    ),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"application {application.request_id} was received before"
                ) from None
            audit.record(
                "application.received",
                {"request": signed, **application.to_json()},
                actor=application.applicant,
            )
        return application

    def get(self, request_id: str) -> Application:
        """``request_id`` or a unique prefix of it.

        Raises:
            NotFound: none. MalformedInput: several (named).
        """
        prefix = request_id.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,32}", prefix):
            raise NotFound(f"no application {request_id!r}")
        with self._open() as conn:
            rows = conn.execute(
                "SELECT * FROM applications WHERE request_id LIKE ? ORDER BY request_id",
                (prefix + "%",),
            ).fetchall()
        if not rows:
            raise NotFound(f"no application {request_id!r}")
        if len(rows) > 1:
            ids = ", ".join(r["request_id"] for r in rows)
            raise MalformedInput(f"application id {request_id!r} is ambiguous: {ids}")
        return _from_row(rows[0])

    def list(self, *, applicant: str | None = None, state: str | None = None) -> list[Application]:
        clauses, params = [], []
        if applicant is not None:
            clauses.append("applicant = ?")
            params.append(applicant)
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._open() as conn:
            rows = conn.execute(
                f"SELECT * FROM applications{where} ORDER BY received_at, request_id", params
            ).fetchall()
        return [_from_row(r) for r in rows]

    def answer(
        self,
        request_id: str,
        *,
        approve: bool,
        person: str,
        reason: str,
        grant_id: str,
        audit: AuditSink,
        now: int,
    ) -> Application:
        """Record the answer to a pending application and log it.

        Raises:
            Conflict: the application was answered already (named).
        """
        held = self.get(request_id)
        state = APPROVED if approve else REFUSED
        with self._open() as conn, immediate(conn):
            done = conn.execute(
                "UPDATE applications SET state = ?, answered_by = ?, answered_at = ?,"
                " reason = ?, grant_id = ? WHERE request_id = ? AND state = ?",
                (state, person, now, reason, grant_id, held.request_id, PENDING),
            ).rowcount
            if done != 1:
                current = self.get(held.request_id)
                raise Conflict(
                    f"application {held.request_id} was {current.state} by "
                    f"{current.answered_by}; it cannot be answered again"
                )
            fields: dict[str, object] = {
                "request_id": held.request_id, "applicant": held.applicant,
                "dataset": held.dataset, "reason": reason, "deadline_at": held.deadline_at,
                "late": now > held.deadline_at,
            }  # fmt: skip
            if approve:
                fields["grant_id"] = grant_id
            audit.record(
                "application.approved" if approve else "application.refused",
                fields,
                actor=person,
            )
        return self.get(held.request_id)


def status_of(grant: Grant, dataset: DatasetInfo | None, now: int) -> str:
    """A grant's status in a word: active, revoked, expired, or void (its dataset removed or
    registered again after it)."""
    standing = grant_standing(grant, dataset, now=now)
    if standing is None:
        return "active"
    return {GRANT_REVOKED: "revoked", GRANT_EXPIRED: "expired"}.get(standing[0], "void")
