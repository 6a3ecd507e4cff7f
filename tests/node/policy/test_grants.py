"""Grants: canonical encoding, Ed25519 signatures, the SQLite store, revocation (ε: tests/model)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest

from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    DatasetInfo,
    Grade,
    Owner,
    OwnerKind,
    QueryKind,
    SharingType,
)
from govshare.node.policy.grants import (
    DOMAIN_TAG,
    Grant,
    GrantStore,
    canonical_bytes,
    issue_grant,
    verify_grant,
)
from govshare.protocols.errors import MalformedInput, NotFound, VerificationFailed
from govshare.protocols.suite import STANDARD

NOW = 1_800_000_000
YEAR = 365 * 24 * 3600
DATASET = DatasetInfo(
    name="benefits",
    grade=Grade.GENERAL,
    sharing_type=SharingType.CONDITIONAL,
    owner=Owner(OwnerKind.STATE, "state", "social"),
    columns=(
        ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
        ColumnRule("amount", ColumnKind.AGGREGATE),
        ColumnRule("notes", ColumnKind.DENY),
    ),
    row_count=10,
)
KEY = STANDARD.signing_key_from_bytes(bytes(range(32)))


class Recorder:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, object], str]] = []

    def record(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str,
        query_id: str | None = None,
    ) -> int:
        self.entries.append((kind, dict(fields), actor))
        return len(self.entries) - 1


def make(**overrides: object) -> Grant:
    options: dict[str, object] = {
        "issuer": "social",
        "dataset": DATASET,
        "grantee": "alice",
        "purpose": "poverty relief evaluation",
        "columns": ["amount", "id_number"],
        "query_kinds": [QueryKind.PSI_CARDINALITY, "intersection_aggregate"],
        "expires_at": NOW + YEAR,
        "epsilon": "1.0",
        "max_queries": 100,
        "now": NOW,
        "grant_id": "00112233aabbccdd",
    }
    options.update(overrides)
    return issue_grant(KEY, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- signing


def test_issued_grant_verifies_and_is_canonical() -> None:
    grant = make()
    verify_grant(grant, KEY.public_key())
    assert grant.columns == ("amount", "id_number")
    assert grant.query_kinds == (QueryKind.INTERSECTION_AGGREGATE, QueryKind.PSI_CARDINALITY)
    encoded = canonical_bytes(grant)
    assert encoded.startswith(DOMAIN_TAG)
    assert encoded == (
        DOMAIN_TAG + b'{"columns":["amount","id_number"],"created_at":1800000000,'
        b'"dataset":"benefits","epsilon":"1","expires_at":1831536000,'
        b'"grant_id":"00112233aabbccdd","grantee":"alice","issuer":"social",'
        b'"max_queries":100,"purpose":"poverty relief evaluation",'
        b'"query_kinds":["intersection_aggregate","psi_cardinality"],"v":1}'
    )
    # Ed25519 is deterministic: the signature is a known answer for this key and grant.
    assert grant.signature == KEY.sign(encoded)


@pytest.mark.parametrize(
    "change",
    [
        {"grantee": "mallory"},
        {"purpose": "anything"},
        {"columns": ("amount", "id_number", "notes")},
        {"query_kinds": (QueryKind.PSI_MEMBERSHIP,)},
        {"expires_at": NOW + 10 * YEAR},
        {"epsilon": Fraction(10)},
        {"max_queries": 10_000},
        {"created_at": NOW + 1},
        {"dataset": "tax"},
        {"issuer": "tax"},
        {"grant_id": "ffffffffffffffff"},
    ],
)
def test_tampered_grant_fails_verification(change: dict[str, object]) -> None:
    tampered = replace(make(), **change)  # type: ignore[arg-type]
    with pytest.raises(VerificationFailed) as info:
        verify_grant(tampered, KEY.public_key())
    assert str(info.value) == ""  # detail-free


def test_wrong_key_fails_verification() -> None:
    other = STANDARD.signing_key_from_bytes(bytes(32))
    with pytest.raises(VerificationFailed):
        verify_grant(make(), other.public_key())


def test_revocation_state_is_not_signed() -> None:
    revoked = replace(make(), revoked_at=NOW + 5, revoked_by="operator:social")
    verify_grant(revoked, KEY.public_key())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"columns": ["salary"]}, "no column 'salary'"),
        ({"columns": ["notes"]}, "'deny'"),
        ({"columns": []}, "at least one column"),
        ({"query_kinds": []}, "at least one query kind"),
        ({"query_kinds": ["everything"]}, "unknown query kind"),
        ({"expires_at": NOW}, "future"),
        ({"epsilon": "-1"}, "non-negative"),
        ({"epsilon": Fraction(1, 3)}, "finite decimal"),
        ({"max_queries": 0}, "positive"),
        ({"grantee": "Alice Smith"}, "DNS label"),
        ({"purpose": "  "}, "purpose must not be empty"),
        ({"purpose": "a\nb"}, "control"),
        ({"grant_id": "xyz"}, "hex"),
    ],
)
def test_issue_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(MalformedInput, match=message):
        make(**change)


# --------------------------------------------------------------------------- store


@pytest.fixture
def store(tmp_path: Path) -> GrantStore:
    return GrantStore(tmp_path / "node.db")


def issue(store: GrantStore, audit: Recorder | None = None, **overrides: object) -> Grant:
    options: dict[str, object] = {
        "issuer": "social",
        "dataset": DATASET,
        "grantee": "alice",
        "purpose": "poverty relief evaluation",
        "columns": ["amount"],
        "query_kinds": [QueryKind.INTERSECTION_AGGREGATE],
        "expires_at": NOW + YEAR,
        "epsilon": "0.5",
        "max_queries": 10,
        "now": NOW,
    }
    options.update(overrides)
    return store.issue(KEY, actor="operator:social", audit=audit, **options)  # type: ignore[arg-type]


def test_store_round_trips_and_records(store: GrantStore) -> None:
    audit = Recorder()
    grant = issue(store, audit)
    again = GrantStore(store.path).get(grant.grant_id)
    assert again == grant
    verify_grant(again, KEY.public_key())
    assert again.epsilon == Fraction(1, 2)
    [(kind, fields, actor)] = audit.entries
    assert (kind, actor) == ("grant.created", "operator:social")
    assert fields["grant_id"] == grant.grant_id
    assert fields["epsilon"] == "0.5"
    assert fields["signature"] == grant.signature
    assert not any(isinstance(v, float) for v in fields.values())


def test_store_lists_by_grantee_and_dataset(store: GrantStore) -> None:
    a = issue(store, grant_id="000000000000000a")
    b = issue(store, grantee="bob", grant_id="000000000000000b")
    other = replace(DATASET, name="tax")
    c = issue(store, dataset=other, grant_id="000000000000000c", now=NOW + 1)
    assert [g.grant_id for g in store.list()] == [a.grant_id, b.grant_id, c.grant_id]
    assert [g.grant_id for g in store.list(grantee="alice")] == [a.grant_id, c.grant_id]
    assert [g.grant_id for g in store.list(dataset="benefits")] == [a.grant_id, b.grant_id]
    assert store.list(grantee="alice", dataset="tax") == [c]


def test_duplicate_grant_id_is_refused(store: GrantStore) -> None:
    issue(store, grant_id="0000000000000001")
    with pytest.raises(MalformedInput, match="already exists"):
        issue(store, grant_id="0000000000000001")
    assert len(store.list()) == 1


def test_revoke_keeps_the_grant_and_records(store: GrantStore) -> None:
    grant = issue(store)
    audit = Recorder()
    revoked = store.revoke(
        grant.grant_id, actor="operator:social", audit=audit, reason="purpose ended", now=NOW + 9
    )
    assert revoked.revoked and revoked.revoked_at == NOW + 9
    assert revoked.revoked_by == "operator:social"
    assert revoked.revoke_reason == "purpose ended"
    assert store.list() == [revoked]
    assert store.list(include_revoked=False) == []
    assert audit.entries == [
        (
            "grant.revoked",
            {"grant_id": grant.grant_id, "revoked_at": NOW + 9, "reason": "purpose ended"},
            "operator:social",
        )
    ]
    with pytest.raises(MalformedInput, match="already revoked"):
        store.revoke(grant.grant_id, actor="operator:social", audit=None)
    with pytest.raises(NotFound):
        store.revoke("ffffffffffffffff", actor="operator:social", audit=None)


def test_tampering_in_the_database_is_detected(store: GrantStore) -> None:
    grant = issue(store)
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE grants SET epsilon = '50' WHERE grant_id = ?", (grant.grant_id,))
    stored = store.get(grant.grant_id)
    assert stored.epsilon == 50
    with pytest.raises(VerificationFailed):
        verify_grant(stored, KEY.public_key())


def test_get_unknown_is_not_found(store: GrantStore) -> None:
    with pytest.raises(NotFound):
        store.get("0123456789abcdef")
