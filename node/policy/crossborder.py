"""Cross-border assessment records (数据出境安全评估): where a dataset's data may be sent abroad.

Data whose owner kind is ``individual`` (personal data a department holds in trust) stays in
the holder node's jurisdiction unless a cross-border assessment covers the destination — PIPL
(个人信息保护法) art. 38 and 40, and the CAC's Measures for the Security Assessment of Outbound
Data Transfers (数据出境安全评估办法, 2022). An :class:`Assessment` records that such an assessment
was passed: the dataset, the destination jurisdiction (ISO 3166-1 alpha-2, the form the roster
uses), the assessment's reference (the authority's file number), the basis the operator relies
on, and an expiry (assessments are valid for a limited period, three years under the Measures).

The holding node's operator signs the record with the node's Ed25519 key; the node stores it in
its SQLite database (``crossborder`` table, the file that holds grants) and records approval and
revocation to the audit log. The policy (``govshare.node.policy.decision``, rule
``crossborder.assessment``) reads :meth:`CrossBorderStore.destinations`: the set of destination
jurisdictions covered at a time. Only ``individual`` data needs a record; a record on other data
is accepted (an operator may document a transfer it undertook voluntarily) and has no effect on
the policy. A record whose destination is the node's own jurisdiction is refused when the
caller names that jurisdiction (``home_jurisdiction``): data that stays home needs no
assessment, and such a record would only confuse the history.

Canonical encoding (what the signature covers)::

    b"govshare/crossborder/v1\\n" || JSON

where JSON is the UTF-8 encoding of an object with exactly the keys ``v`` (1), ``record_id``,
``dataset``, ``destination``, ``assessment``, ``basis``, ``expires_at``, ``created_at`` (unix
seconds) and ``issuer``; keys sorted, no whitespace, non-ASCII characters written as themselves
(:func:`govshare.protocols.canonical.canonical_json`; record text holds no control characters,
so this coincides with RFC 8785). Revocation is local state of the holding node, as for grants:
it is recorded in the table and the audit log, not signed.

Trust model: the record is as trustworthy as the node's key and its operator. A record edited in
the database no longer verifies, and :meth:`CrossBorderStore.in_force` and
:meth:`CrossBorderStore.destinations` drop it when given the node's public key. Deleting a row
is not detected here; the audit log's ``crossborder.approved`` entries are the durable history.
"""

from __future__ import annotations

import builtins
import datetime as dt
import re
import secrets
import sqlite3
import time
from dataclasses import replace

from govshare.model.crossborder import (
    Assessment,
    canonical_bytes,
    validate_destination,
    verify_assessment,
)
from govshare.model.governance import DatasetInfo
from govshare.model.identity import validate_name
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.sqlite import Tables, immediate
from govshare.protocols.errors import Conflict, MalformedInput, NotFound, VerificationFailed
from govshare.protocols.suite import SigningKey, VerifyKey

# 64 random bits, as for grant ids: unguessable enough for a non-secret identifier, short to type.
RECORD_ID_BYTES = 8
RECORD_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
# An assessment reference is a file number (e.g. "CAC-2026-0042"), not a document.
MAX_ASSESSMENT_CHARS = 200
# The basis is a sentence or two citing the legal ground, like a grant's purpose.
MAX_BASIS_CHARS = 500
# A revocation reason is one short line.
MAX_REASON_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS crossborder (
    record_id     TEXT PRIMARY KEY,
    dataset       TEXT NOT NULL,
    destination   TEXT NOT NULL,   -- ISO 3166-1 alpha-2
    assessment    TEXT NOT NULL,
    basis         TEXT NOT NULL,
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    issuer        TEXT NOT NULL,
    signature     BLOB NOT NULL,
    revoked_at    INTEGER,
    revoked_by    TEXT,
    revoke_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS crossborder_by_dataset ON crossborder (dataset);
"""


# --------------------------------------------------------------------------- the record


def _check_text(value: str, what: str, *, limit: int) -> str:
    stripped = value.strip()
    if not stripped:
        raise MalformedInput(f"{what} must not be empty", field=what)
    if len(stripped) > limit or _CONTROL.search(stripped):
        raise MalformedInput(
            f"{what} must be at most {limit} characters without control characters", field=what
        )
    return stripped


def approve_assessment(
    signing_key: SigningKey,
    *,
    issuer: str,
    dataset: DatasetInfo,
    destination: str,
    assessment: str,
    basis: str,
    expires_at: int,
    now: int,
    home_jurisdiction: str | None = None,
    record_id: str | None = None,
) -> Assessment:
    """Build and sign a record (nothing is stored; see :meth:`CrossBorderStore.approve`).

    ``record_id`` defaults to 8 random bytes in hex; tests pass their own.

    Raises:
        MalformedInput: a destination that is not an alpha-2 code or equals
            ``home_jurisdiction``, an empty or overlong reference or basis, an expiry not after
            ``now``, a bad issuer name or record id (the field is named).
    """
    validate_name(issuer)
    where = validate_destination(destination)
    if home_jurisdiction is not None and where == home_jurisdiction:
        raise MalformedInput(
            f"destination {where} is this node's own jurisdiction: data that stays needs no "
            "cross-border assessment",
            field="destination",
        )
    reference = _check_text(assessment, "assessment", limit=MAX_ASSESSMENT_CHARS)
    basis = _check_text(basis, "basis", limit=MAX_BASIS_CHARS)
    if isinstance(expires_at, bool) or not isinstance(expires_at, int) or expires_at <= now:
        raise MalformedInput("an assessment's expiry must lie in the future", field="expires_at")
    if record_id is None:
        record_id = secrets.token_hex(RECORD_ID_BYTES)
    elif not RECORD_ID_PATTERN.match(record_id):
        raise MalformedInput("a record id is 16 lower-case hex digits", field="record_id")
    unsigned = Assessment(
        record_id=record_id,
        dataset=dataset.name,
        destination=where,
        assessment=reference,
        basis=basis,
        expires_at=expires_at,
        created_at=now,
        issuer=issuer,
        signature=b"",
    )
    return replace(unsigned, signature=signing_key.sign(canonical_bytes(unsigned)))


# --------------------------------------------------------------------------- the store


def _record_from_row(row: sqlite3.Row) -> Assessment:
    try:
        return Assessment(
            record_id=row["record_id"],
            dataset=row["dataset"],
            destination=row["destination"],
            assessment=row["assessment"],
            basis=row["basis"],
            expires_at=int(row["expires_at"]),
            created_at=int(row["created_at"]),
            issuer=row["issuer"],
            signature=bytes(row["signature"]),
            revoked_at=row["revoked_at"],
            revoked_by=row["revoked_by"],
            revoke_reason=row["revoke_reason"],
        )
    except (ValueError, TypeError) as exc:
        raise MalformedInput(
            f"stored cross-border record {row['record_id']!r} is corrupt: {exc}"
        ) from None


class CrossBorderStore(Tables):
    """The cross-border assessment records of one node, in its SQLite database."""

    schema = _SCHEMA

    def approve(
        self,
        signing_key: SigningKey,
        *,
        issuer: str,
        dataset: DatasetInfo,
        destination: str,
        assessment: str,
        basis: str,
        expires_at: int,
        actor: str,
        audit: AuditSink | None,
        now: int | None = None,
        home_jurisdiction: str | None = None,
        record_id: str | None = None,
    ) -> Assessment:
        """Sign, store and record (``crossborder.approved``) a record in one transaction.

        Any dataset is accepted, but only ``individual`` data needs a record (module docstring).

        Raises:
            MalformedInput: see :func:`approve_assessment`; a record id already stored.
        """
        record = approve_assessment(
            signing_key,
            issuer=issuer,
            dataset=dataset,
            destination=destination,
            assessment=assessment,
            basis=basis,
            expires_at=expires_at,
            now=int(time.time()) if now is None else now,
            home_jurisdiction=home_jurisdiction,
            record_id=record_id,
        )
        with self._open() as conn:
            try:
                with immediate(conn):
                    conn.execute(
                        "INSERT INTO crossborder (record_id, dataset, destination, assessment,"
                        " basis, expires_at, created_at, issuer, signature)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            record.record_id,
                            record.dataset,
                            record.destination,
                            record.assessment,
                            record.basis,
                            record.expires_at,
                            record.created_at,
                            record.issuer,
                            record.signature,
                        ),
                    )
                    if audit is not None:
                        fields = record.to_json()
                        fields["signature"] = record.signature
                        fields["owner_kind"] = dataset.owner.kind.value
                        for local in ("revoked_at", "revoked_by", "revoke_reason"):
                            del fields[local]
                        audit.record("crossborder.approved", fields, actor=actor)
            except sqlite3.IntegrityError:
                raise MalformedInput(
                    f"cross-border record {record.record_id} already exists", field="record_id"
                ) from None
        return record

    def get(self, record_id: str) -> Assessment:
        """Raises: NotFound for an unknown id."""
        with self._open() as conn:
            row = conn.execute(
                "SELECT * FROM crossborder WHERE record_id = ?", (record_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no cross-border record {record_id!r}")
        return _record_from_row(row)

    def list(self, dataset: str | None = None) -> builtins.list[Assessment]:
        """Every record (revoked and expired ones included), oldest first, or one dataset's."""
        where, params = ("", ()) if dataset is None else (" WHERE dataset = ?", (dataset,))
        with self._open() as conn:
            rows = conn.execute(
                f"SELECT * FROM crossborder{where} ORDER BY created_at, record_id", params
            ).fetchall()
        return [_record_from_row(row) for row in rows]

    def in_force(
        self,
        dataset: str,
        now: int,
        *,
        verify_key: VerifyKey | None = None,
    ) -> builtins.list[Assessment]:
        """The dataset's records in force at ``now`` (unrevoked, approved, unexpired), oldest first.

        With ``verify_key`` (the node's own public key) a record whose signature does not verify
        is left out, as if it did not exist: a row edited in the database covers nothing.
        """
        records = [r for r in self.list(dataset) if r.in_force_at(now)]
        if verify_key is None:
            return records
        kept: builtins.list[Assessment] = []
        for record in records:
            try:
                verify_assessment(record, verify_key)
            except VerificationFailed:
                continue
            kept.append(record)
        return kept

    def destinations(
        self,
        dataset: str,
        now: int,
        verify_key: VerifyKey | None = None,
    ) -> frozenset[str]:
        """The destination jurisdictions the dataset's records in force cover at ``now``.

        This is what the policy reads (rule ``crossborder.assessment``); pass the node's public
        key so that a tampered record covers nothing.
        """
        return frozenset(r.destination for r in self.in_force(dataset, now, verify_key=verify_key))

    def revoke(
        self,
        record_id: str,
        *,
        actor: str,
        reason: str,
        audit: AuditSink | None,
        now: int | None = None,
    ) -> Assessment:
        """Mark a record revoked (it stays listed) and record ``crossborder.revoked``.

        Raises:
            NotFound: unknown id.
            Conflict: the record is already revoked.
            MalformedInput: an empty or malformed reason (field ``reason``).
        """
        reason = _check_text(reason, "reason", limit=MAX_REASON_CHARS)
        when = int(time.time()) if now is None else now
        with self._open() as conn:
            with immediate(conn):
                row = conn.execute(
                    "SELECT dataset, destination, revoked_at FROM crossborder WHERE record_id = ?",
                    (record_id,),
                ).fetchone()
                if row is None:
                    raise NotFound(f"no cross-border record {record_id!r}")
                if row["revoked_at"] is not None:
                    when_revoked = dt.datetime.fromtimestamp(row["revoked_at"], dt.UTC)
                    raise Conflict(
                        f"cross-border record {record_id} was already revoked at "
                        f"{when_revoked:%Y-%m-%d %H:%M:%S}Z"
                    )
                conn.execute(
                    "UPDATE crossborder SET revoked_at = ?, revoked_by = ?, revoke_reason = ?"
                    " WHERE record_id = ?",
                    (when, actor, reason, record_id),
                )
                if audit is not None:
                    audit.record(
                        "crossborder.revoked",
                        {
                            "record_id": record_id,
                            "dataset": row["dataset"],
                            "destination": row["destination"],
                            "revoked_at": when,
                            "reason": reason,
                        },
                        actor=actor,
                    )
        return self.get(record_id)
