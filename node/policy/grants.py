"""Use-right grants (使用权): who may use which columns of a dataset, for what, until when.

A grant names a dataset, a grantee (a federation member), a stated purpose, the columns and
query kinds it covers, an expiry, a differential-privacy budget ε and a maximum query count.
The holding node's operator signs it with the node's Ed25519 key, and the node stores it in its
SQLite database (``grants`` table) and records it to the audit log. A revoked grant stays in the
table with its revocation time, so that the history of rights stays listable (权利可查).

The ε budget is exact: it is written as a decimal string (``"1.0"``, ``"0.25"``) and held as a
:class:`fractions.Fraction`; no float ever touches the ledger.

Canonical encoding (what the signature covers)::

    b"govshare/grant/v1\\n" || JSON

where JSON is the UTF-8 encoding of an object with exactly the keys ``v`` (1), ``grant_id``,
``dataset``, ``grantee``, ``purpose``, ``columns`` (sorted, unique), ``query_kinds`` (sorted,
unique values of :class:`QueryKind`), ``expires_at``, ``created_at`` (unix seconds),
``epsilon`` (the canonical decimal string: no exponent, no trailing zeros, ``"0"`` for zero),
``max_queries`` and ``issuer``; keys sorted, no whitespace, non-ASCII characters written as
themselves. Grant text never holds control characters, so this coincides with RFC 8785 (JCS)
and another implementation can reproduce it. Revocation is local state of the holding node and
is not covered by the signature: it is recorded in the table and the audit log instead. So is
``granted_by``, the named operator whose signed act issued the grant (local state, logged as the
``grant.created`` entry's actor and field): the separation of duties compares it with the
approver of a query (``govshare.node.policy.approvals``).
"""

from __future__ import annotations

import builtins
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from fractions import Fraction

from govshare.model.epsilon import format_epsilon, parse_epsilon
from govshare.model.governance import ColumnKind, DatasetInfo, QueryKind
from govshare.model.identity import validate_name
from govshare.node.audit.sink import AuditSink
from govshare.node.stores.sqlite import Tables, immediate
from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import MalformedInput, NotFound, VerificationFailed
from govshare.protocols.suite import SigningKey, VerifyKey

DOMAIN_TAG = b"govshare/grant/v1\n"
ENCODING_VERSION = 1

# 64 random bits: unguessable enough for an identifier that is not a secret, short to type.
GRANT_ID_BYTES = 8
GRANT_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
# A stated purpose is a sentence, not a document.
MAX_PURPOSE_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    grant_id      TEXT PRIMARY KEY,
    dataset       TEXT NOT NULL,
    grantee       TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    columns       TEXT NOT NULL,   -- JSON list, sorted
    query_kinds   TEXT NOT NULL,   -- JSON list, sorted
    expires_at    INTEGER NOT NULL,
    epsilon       TEXT NOT NULL,   -- canonical decimal string, exact
    max_queries   INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    issuer        TEXT NOT NULL,
    signature     BLOB NOT NULL,
    revoked_at    INTEGER,
    revoked_by    TEXT,
    revoke_reason TEXT NOT NULL DEFAULT '',
    granted_by    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS grants_by_grantee ON grants (grantee);
CREATE INDEX IF NOT EXISTS grants_by_dataset ON grants (dataset);
"""


# --------------------------------------------------------------------------- ε, exactly


# --------------------------------------------------------------------------- the grant


@dataclass(frozen=True)
class Grant:
    """A signed use-right. ``revoked_at``/``revoked_by``/``revoke_reason`` are local state."""

    grant_id: str
    dataset: str
    grantee: str
    purpose: str
    columns: tuple[str, ...]
    query_kinds: tuple[QueryKind, ...]
    expires_at: int
    epsilon: Fraction
    max_queries: int
    created_at: int
    issuer: str
    signature: bytes
    revoked_at: int | None = None
    revoked_by: str | None = None
    revoke_reason: str = ""
    granted_by: str = ""  # the operator whose act issued it (local state, see the docstring)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def canonical_bytes(self) -> bytes:
        """The bytes the issuer's signature covers (see the module docstring)."""
        return canonical_bytes(self)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready view for ``--json`` output and audit entries (ε as its decimal text)."""
        return {
            "grant_id": self.grant_id,
            "dataset": self.dataset,
            "grantee": self.grantee,
            "purpose": self.purpose,
            "columns": list(self.columns),
            "query_kinds": [kind.value for kind in self.query_kinds],
            "expires_at": self.expires_at,
            "epsilon": format_epsilon(self.epsilon),
            "max_queries": self.max_queries,
            "created_at": self.created_at,
            "issuer": self.issuer,
            "signature": self.signature.hex(),
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
            "granted_by": self.granted_by,
        }


def canonical_bytes(grant: Grant) -> bytes:
    body = {
        "v": ENCODING_VERSION,
        "grant_id": grant.grant_id,
        "dataset": grant.dataset,
        "grantee": grant.grantee,
        "purpose": grant.purpose,
        "columns": sorted(set(grant.columns)),
        "query_kinds": sorted({kind.value for kind in grant.query_kinds}),
        "expires_at": grant.expires_at,
        "created_at": grant.created_at,
        "epsilon": format_epsilon(grant.epsilon),
        "max_queries": grant.max_queries,
        "issuer": grant.issuer,
    }
    return DOMAIN_TAG + canonical_json(body)


def verify_grant(grant: Grant, public_key: VerifyKey) -> None:
    """Check the issuer's signature over the grant's canonical encoding.

    Raises:
        VerificationFailed: the signature does not match (tampered grant or wrong key).
    """
    try:
        public_key.verify(grant.signature, canonical_bytes(grant))
    except (VerificationFailed, MalformedInput):
        raise VerificationFailed() from None


def _check_text(value: str, what: str, *, limit: int) -> str:
    stripped = value.strip()
    if not stripped:
        raise MalformedInput(f"{what} must not be empty", field=what)
    if len(stripped) > limit or _CONTROL.search(stripped):
        raise MalformedInput(
            f"{what} must be at most {limit} characters without control characters", field=what
        )
    return stripped


def issue_grant(
    signing_key: SigningKey,
    *,
    issuer: str,
    dataset: DatasetInfo,
    grantee: str,
    purpose: str,
    columns: Iterable[str],
    query_kinds: Iterable[QueryKind | str],
    expires_at: int,
    epsilon: Fraction | str,
    max_queries: int,
    now: int,
    grant_id: str | None = None,
) -> Grant:
    """Build and sign a grant on ``dataset`` (nothing is stored; see :meth:`GrantStore.issue`).

    ``grant_id`` defaults to 8 random bytes in hex; tests pass their own.

    Raises:
        MalformedInput: an unknown or ``deny`` column, no column or query kind, an expiry not
            after ``now``, a bad ε, a non-positive query count, a bad grantee name or purpose.
    """
    validate_name(grantee)
    validate_name(issuer)
    purpose = _check_text(purpose, "purpose", limit=MAX_PURPOSE_CHARS)
    wanted = sorted(set(columns))
    if not wanted:
        raise MalformedInput("a grant names at least one column", field="columns")
    for name in wanted:
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
    try:
        kinds = sorted({QueryKind(kind) for kind in query_kinds})
    except ValueError:
        known = ", ".join(kind.value for kind in QueryKind)
        raise MalformedInput(f"unknown query kind; known: {known}", field="query_kinds") from None
    if not kinds:
        raise MalformedInput("a grant names at least one query kind", field="query_kinds")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int) or expires_at <= now:
        raise MalformedInput("a grant's expiry must lie in the future", field="expires_at")
    exact = parse_epsilon(epsilon) if isinstance(epsilon, str) else Fraction(epsilon)
    format_epsilon(exact)  # refuses negative and non-terminating values
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
        raise MalformedInput("max queries must be a positive integer", field="max_queries")
    if grant_id is None:
        grant_id = secrets.token_hex(GRANT_ID_BYTES)
    elif not GRANT_ID_PATTERN.match(grant_id):
        raise MalformedInput("a grant id is 16 lower-case hex digits", field="grant_id")
    unsigned = Grant(
        grant_id=grant_id,
        dataset=dataset.name,
        grantee=grantee,
        purpose=purpose,
        columns=tuple(wanted),
        query_kinds=tuple(kinds),
        expires_at=expires_at,
        epsilon=exact,
        max_queries=max_queries,
        created_at=now,
        issuer=issuer,
        signature=b"",
    )
    return replace(unsigned, signature=signing_key.sign(canonical_bytes(unsigned)))


# --------------------------------------------------------------------------- the store


def _grant_from_row(row: sqlite3.Row) -> Grant:
    try:
        return Grant(
            grant_id=row["grant_id"],
            dataset=row["dataset"],
            grantee=row["grantee"],
            purpose=row["purpose"],
            columns=tuple(json.loads(row["columns"])),
            query_kinds=tuple(QueryKind(kind) for kind in json.loads(row["query_kinds"])),
            expires_at=int(row["expires_at"]),
            epsilon=parse_epsilon(row["epsilon"]),
            max_queries=int(row["max_queries"]),
            created_at=int(row["created_at"]),
            issuer=row["issuer"],
            signature=bytes(row["signature"]),
            revoked_at=row["revoked_at"],
            revoked_by=row["revoked_by"],
            revoke_reason=row["revoke_reason"],
            granted_by=row["granted_by"],
        )
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"stored grant {row['grant_id']!r} is corrupt: {exc}") from None


class GrantStore(Tables):
    """The grants of one node, in its SQLite database (``NodeConfig.database_path``)."""

    schema = _SCHEMA

    def _migrate(self, conn: sqlite3.Connection) -> None:
        held = {row["name"] for row in conn.execute("PRAGMA table_info(grants)")}
        if "granted_by" not in held:  # a store made before operators were named
            conn.execute("ALTER TABLE grants ADD COLUMN granted_by TEXT NOT NULL DEFAULT ''")

    def issue(
        self,
        signing_key: SigningKey,
        *,
        issuer: str,
        dataset: DatasetInfo,
        grantee: str,
        purpose: str,
        columns: Iterable[str],
        query_kinds: Iterable[QueryKind | str],
        expires_at: int,
        epsilon: Fraction | str,
        max_queries: int,
        actor: str,
        audit: AuditSink | None,
        now: int | None = None,
        grant_id: str | None = None,
        granted_by: str = "",
    ) -> Grant:
        """Sign, store and record a new grant (``grant.created``) in one transaction.

        ``granted_by`` names the operator whose act issued it (local state, not signed).

        Raises:
            MalformedInput: see :func:`issue_grant`.
        """
        grant = issue_grant(
            signing_key,
            issuer=issuer,
            dataset=dataset,
            grantee=grantee,
            purpose=purpose,
            columns=columns,
            query_kinds=query_kinds,
            expires_at=expires_at,
            epsilon=epsilon,
            max_queries=max_queries,
            now=int(time.time()) if now is None else now,
            grant_id=grant_id,
        )
        grant = replace(grant, granted_by=granted_by)
        with self._open() as conn:
            try:
                with immediate(conn):
                    conn.execute(
                        "INSERT INTO grants (grant_id, dataset, grantee, purpose, columns,"
                        " query_kinds, expires_at, epsilon, max_queries, created_at, issuer,"
                        " signature, granted_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            grant.grant_id,
                            grant.dataset,
                            grant.grantee,
                            grant.purpose,
                            json.dumps(list(grant.columns)),
                            json.dumps([kind.value for kind in grant.query_kinds]),
                            grant.expires_at,
                            format_epsilon(grant.epsilon),
                            grant.max_queries,
                            grant.created_at,
                            grant.issuer,
                            grant.signature,
                            grant.granted_by,
                        ),
                    )
                    if audit is not None:
                        fields = grant.to_json()
                        fields["signature"] = grant.signature
                        for local in ("revoked_at", "revoked_by", "revoke_reason"):
                            del fields[local]
                        audit.record("grant.created", fields, actor=actor)
            except sqlite3.IntegrityError:
                raise MalformedInput(f"grant id {grant.grant_id} already exists") from None
        return grant

    def get(self, grant_id: str) -> Grant:
        """Raises: NotFound for an unknown id."""
        with self._open() as conn:
            row = conn.execute("SELECT * FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
        if row is None:
            raise NotFound(f"no grant {grant_id!r}")
        return _grant_from_row(row)

    def list(
        self,
        *,
        grantee: str | None = None,
        dataset: str | None = None,
        include_revoked: bool = True,
    ) -> builtins.list[Grant]:
        """Grants, oldest first, optionally only one grantee's or one dataset's."""
        clauses: builtins.list[str] = []
        params: builtins.list[object] = []
        if grantee is not None:
            clauses.append("grantee = ?")
            params.append(grantee)
        if dataset is not None:
            clauses.append("dataset = ?")
            params.append(dataset)
        if not include_revoked:
            clauses.append("revoked_at IS NULL")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._open() as conn:
            rows = conn.execute(
                f"SELECT * FROM grants{where} ORDER BY created_at, grant_id", params
            ).fetchall()
        return [_grant_from_row(row) for row in rows]

    def revoke(
        self,
        grant_id: str,
        *,
        actor: str,
        audit: AuditSink | None,
        reason: str = "",
        now: int | None = None,
    ) -> Grant:
        """Mark a grant revoked (it stays listable) and record ``grant.revoked``.

        Raises:
            NotFound: unknown id.
            MalformedInput: the grant is already revoked, or the reason is malformed.
        """
        reason = reason.strip()
        if len(reason) > MAX_PURPOSE_CHARS or _CONTROL.search(reason):
            raise MalformedInput("a revocation reason is one short line", field="reason")
        when = int(time.time()) if now is None else now
        with self._open() as conn:
            with immediate(conn):
                row = conn.execute(
                    "SELECT revoked_at FROM grants WHERE grant_id = ?", (grant_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no grant {grant_id!r}")
                if row["revoked_at"] is not None:
                    raise MalformedInput(f"grant {grant_id} is already revoked")
                conn.execute(
                    "UPDATE grants SET revoked_at = ?, revoked_by = ?, revoke_reason = ?"
                    " WHERE grant_id = ?",
                    (when, actor, reason, grant_id),
                )
                if audit is not None:
                    audit.record(
                        "grant.revoked",
                        {"grant_id": grant_id, "revoked_at": when, "reason": reason},
                        actor=actor,
                    )
        return self.get(grant_id)
