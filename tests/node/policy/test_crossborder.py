"""Cross-border assessment records: the signed store, the audit log, the CLI, the catalogue."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import pytest
from conftest import FederationFixture, build_federation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from govshare.cli.crossborder import when_text
from govshare.model.crossborder import (
    DOMAIN_TAG,
    Assessment,
    CrossBorderRecord,
    canonical_bytes,
    verify_assessment,
)
from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    DatasetInfo,
    Grade,
    Owner,
    OwnerKind,
    SharingType,
)
from govshare.model.identity import Identity
from govshare.node.api.server import create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.audit.sink import AuditSink
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.node import Node
from govshare.node.policy.crossborder import CrossBorderStore, approve_assessment
from govshare.protocols.errors import Conflict, MalformedInput, NotFound, VerificationFailed
from govshare.protocols.suite import STANDARD
from govshare.rpc.client import NodeClient
from govshare.rpc.convert import catalog_entry_from_proto, dataset_to_proto
from govshare.v1 import catalog_pb2, catalog_pb2_grpc

NOW = 1_800_000_000
YEAR = 365 * 24 * 3600
KEY = STANDARD.signing_key_from_bytes(bytes(range(32)))
OTHER_KEY = STANDARD.signing_key_from_bytes(bytes(range(1, 33)))
PEOPLE = DatasetInfo(
    name="people",
    grade=Grade.GENERAL,
    sharing_type=SharingType.CONDITIONAL,
    owner=Owner(OwnerKind.INDIVIDUAL, "residents (in trust)", "social"),
    columns=(ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),),
    row_count=10,
)
ACTOR = "operator:social"


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


@pytest.fixture
def store(tmp_path: Path) -> CrossBorderStore:
    return CrossBorderStore(tmp_path / "node.db")


def approve(
    store: CrossBorderStore, audit: AuditSink | None = None, /, **overrides: object
) -> Assessment:
    options: dict[str, object] = {
        "issuer": "social",
        "dataset": PEOPLE,
        "destination": "HK",
        "assessment": "CAC-2026-0042",
        "basis": "PIPL art. 38(1); CAC security assessment passed",
        "expires_at": NOW + YEAR,
        "now": NOW,
        "home_jurisdiction": "CN",
    }
    options.update(overrides)
    return store.approve(KEY, actor=ACTOR, audit=audit, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the record


def test_canonical_bytes_are_tagged_sorted_json_and_signed() -> None:
    record = approve_assessment(
        KEY, issuer="social", dataset=PEOPLE, destination="HK", assessment="CAC-1",
        basis="art. 38", expires_at=NOW + 10, now=NOW, record_id="00000000000000ab",
    )  # fmt: skip
    assert canonical_bytes(record) == DOMAIN_TAG + (
        b'{"assessment":"CAC-1","basis":"art. 38","created_at":1800000000,"dataset":"people",'
        b'"destination":"HK","expires_at":1800000010,"issuer":"social",'
        b'"record_id":"00000000000000ab","v":1}'
    )
    verify_assessment(record, KEY.public_key())
    with pytest.raises(VerificationFailed):
        verify_assessment(record, OTHER_KEY.public_key())
    # Revocation is local state: it does not touch what the signature covers.
    verify_assessment(replace(record, revoked_at=NOW + 1, revoked_by=ACTOR), KEY.public_key())
    for field, value in (("destination", "SG"), ("expires_at", NOW + 11), ("dataset", "x")):
        with pytest.raises(VerificationFailed):
            verify_assessment(replace(record, **{field: value}), KEY.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["HKG", "H", "h1", "", "C N", "香港", "12"])
def test_bad_destination_is_refused_naming_the_field(store: CrossBorderStore, bad: str) -> None:
    with pytest.raises(MalformedInput) as refused:
        approve(store, destination=bad)
    assert refused.value.field == "destination"
    assert store.list() == []


def test_destination_is_normalised_to_upper_case(store: CrossBorderStore) -> None:
    assert approve(store, destination=" hk ").destination == "HK"


def test_own_jurisdiction_is_refused(store: CrossBorderStore) -> None:
    with pytest.raises(MalformedInput, match="own jurisdiction") as refused:
        approve(store, destination="CN", home_jurisdiction="CN")
    assert refused.value.field == "destination"
    # Without the node's jurisdiction the store cannot tell, and accepts any code.
    assert approve(store, destination="CN", home_jurisdiction=None).destination == "CN"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"assessment": "  "}, "assessment"),
        ({"assessment": "x" * 201}, "assessment"),
        ({"basis": ""}, "basis"),
        ({"basis": "line\nbreak"}, "basis"),
        ({"expires_at": NOW}, "expires_at"),
        ({"expires_at": True}, "expires_at"),
        ({"record_id": "XYZ"}, "record_id"),
    ],
)
def test_malformed_records_name_their_field(
    store: CrossBorderStore, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(MalformedInput) as refused:
        approve(store, **overrides)
    assert refused.value.field == field


def test_any_owner_kind_is_accepted() -> None:
    state = replace(PEOPLE, owner=Owner(OwnerKind.STATE, "state", "social"))
    record = approve_assessment(
        KEY, issuer="social", dataset=state, destination="SG", assessment="A-1", basis="b",
        expires_at=NOW + 1, now=NOW,
    )  # fmt: skip
    assert record.dataset == "people"


# --------------------------------------------------------------------------- the store


def test_approve_round_trips_and_records(store: CrossBorderStore) -> None:
    audit = Recorder()
    record = approve(store, audit)
    again = CrossBorderStore(store.path).get(record.record_id)
    assert again == record
    verify_assessment(again, KEY.public_key())
    [(kind, fields, actor)] = audit.entries
    assert (kind, actor) == ("crossborder.approved", ACTOR)
    assert fields["record_id"] == record.record_id
    assert fields["destination"] == "HK"
    assert fields["owner_kind"] == "individual"
    assert fields["signature"] == record.signature
    assert "revoked_at" not in fields
    with pytest.raises(NotFound):
        store.get("ffffffffffffffff")


def test_duplicate_record_id_is_refused(store: CrossBorderStore) -> None:
    approve(store, record_id="0000000000000001")
    with pytest.raises(MalformedInput, match="already exists"):
        approve(store, record_id="0000000000000001", destination="SG")
    assert len(store.list()) == 1


def test_list_by_dataset_oldest_first(store: CrossBorderStore) -> None:
    a = approve(store, record_id="000000000000000a")
    other = replace(PEOPLE, name="households")
    b = approve(store, dataset=other, record_id="000000000000000b", now=NOW + 1)
    c = approve(store, destination="SG", record_id="000000000000000c", now=NOW + 2)
    assert store.list() == [a, b, c]
    assert store.list("people") == [a, c]
    assert store.list(dataset="households") == [b]
    assert store.list("nothing") == []


def test_in_force_and_destinations_follow_expiry(store: CrossBorderStore) -> None:
    # Same approval time: ordered by record id.
    hk = approve(store, expires_at=NOW + 100, record_id="0000000000000001")
    sg = approve(store, destination="SG", expires_at=NOW + 200, record_id="0000000000000002")
    assert store.in_force("people", NOW) == [hk, sg]
    assert store.destinations("people", NOW + 99) == frozenset({"HK", "SG"})
    assert store.in_force("people", NOW + 100) == [sg]  # the expiry itself is out
    assert store.destinations("people", NOW + 100, KEY.public_key()) == frozenset({"SG"})
    assert store.destinations("people", NOW + 200) == frozenset()
    assert store.destinations("people", NOW - 1) == frozenset()  # not yet approved
    assert store.destinations("households", NOW) == frozenset()


def test_revoked_is_excluded_and_recorded(store: CrossBorderStore) -> None:
    record = approve(store)
    audit = Recorder()
    revoked = store.revoke(
        record.record_id, actor=ACTOR, reason="assessment withdrawn", audit=audit, now=NOW + 9
    )
    assert (revoked.revoked_at, revoked.revoked_by) == (NOW + 9, ACTOR)
    assert revoked.revoke_reason == "assessment withdrawn"
    assert store.list() == [revoked]  # stays listed
    assert store.in_force("people", NOW + 10) == []
    # Revocation takes effect whatever time is asked about.
    assert store.destinations("people", NOW + 1) == frozenset()
    assert audit.entries == [
        (
            "crossborder.revoked",
            {
                "record_id": record.record_id,
                "dataset": "people",
                "destination": "HK",
                "revoked_at": NOW + 9,
                "reason": "assessment withdrawn",
            },
            ACTOR,
        )
    ]


def test_revoking_twice_is_a_conflict(store: CrossBorderStore) -> None:
    record = approve(store)
    store.revoke(record.record_id, actor=ACTOR, reason="withdrawn", audit=None, now=NOW + 1)
    audit = Recorder()
    with pytest.raises(Conflict, match="already revoked"):
        store.revoke(record.record_id, actor=ACTOR, reason="again", audit=audit)
    assert audit.entries == []
    assert store.get(record.record_id).revoke_reason == "withdrawn"


def test_revoke_refuses_unknown_ids_and_empty_reasons(store: CrossBorderStore) -> None:
    record = approve(store)
    with pytest.raises(NotFound):
        store.revoke("ffffffffffffffff", actor=ACTOR, reason="x", audit=None)
    with pytest.raises(MalformedInput) as refused:
        store.revoke(record.record_id, actor=ACTOR, reason=" ", audit=None)
    assert refused.value.field == "reason"
    assert not store.get(record.record_id).revoked


def test_tampered_record_covers_nothing_under_the_key(store: CrossBorderStore) -> None:
    record = approve(store)
    approve(store, destination="SG")
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "UPDATE crossborder SET destination = 'US' WHERE record_id = ?", (record.record_id,)
        )
    # Without the key the edited row looks in force; with the node's key it is left out.
    assert store.destinations("people", NOW) == frozenset({"US", "SG"})
    assert store.destinations("people", NOW, KEY.public_key()) == frozenset({"SG"})
    assert [r.destination for r in store.in_force("people", NOW, verify_key=KEY.public_key())] == [
        "SG"
    ]
    # A record signed by another key does not verify under this node's.
    assert store.destinations("people", NOW, OTHER_KEY.public_key()) == frozenset()


def test_approve_and_revoke_are_in_the_real_audit_log(tmp_path: Path) -> None:
    store = CrossBorderStore(tmp_path / "node.db")
    with AuditLog.open(tmp_path / "audit.db", suite=STANDARD) as log:
        record = approve(store, log)
        store.revoke(record.record_id, actor=ACTOR, reason="ended", audit=log, now=NOW + 5)
        entries = [e.decode() for e in log.iter_entries()]
    assert [(e.kind, e.actor) for e in entries] == [
        ("crossborder.approved", ACTOR),
        ("crossborder.revoked", ACTOR),
    ]
    assert entries[0].fields["signature"] == record.signature
    assert entries[1].fields["record_id"] == record.record_id


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    destination=st.from_regex(r"\A[A-Z]{2}\Z"),
    assessment=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1
    ).filter(lambda t: t.strip() == t and 0 < len(t) <= 200),
    expires_in=st.integers(min_value=1, max_value=10 * YEAR),
)
def test_storage_round_trip(destination: str, assessment: str, expires_in: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = CrossBorderStore(Path(tmp) / "node.db")
        record = approve(
            store,
            destination=destination,
            assessment=assessment,
            expires_at=NOW + expires_in,
            home_jurisdiction=None,
        )
        assert store.get(record.record_id) == record
        verify_assessment(store.get(record.record_id), KEY.public_key())
        assert store.destinations("people", NOW, KEY.public_key()) == frozenset({destination})


def test_catalogue_conversion_shows_destination_reference_and_expiry(
    store: CrossBorderStore,
) -> None:
    record = approve(store)
    message = dataset_to_proto("social", PEOPLE, crossborder=[record])
    assert [(r.destination, r.assessment, r.expires_at) for r in message.crossborder] == [
        ("HK", "CAC-2026-0042", NOW + YEAR)
    ]
    entry = catalog_entry_from_proto(message)
    assert entry.info == PEOPLE
    assert entry.crossborder == (CrossBorderRecord("HK", "CAC-2026-0042", NOW + YEAR),)
    assert record.public_record() == entry.crossborder[0]
    # Neither the basis nor the signature goes on the wire.
    assert b"PIPL" not in message.SerializeToString()
    assert record.signature not in message.SerializeToString()
    message.crossborder[0].destination = "Hong Kong"
    with pytest.raises(MalformedInput):
        catalog_entry_from_proto(message)


# --------------------------------------------------------------------------- a real federation


@dataclass
class Running:
    fed: FederationFixture
    node: Node
    home: Path
    port: int


def write_csv(path: Path) -> Path:
    ids = [resident_id.make("310101", date(1970 + i, 1 + i, 1 + i), i) for i in range(6)]
    path.write_text("id_number,amount\n" + "".join(f"{i},{n}\n" for n, i in enumerate(ids)))
    return path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A federation of its own ('cbfed') with the 'tax' node serving 'people' (individual)."""
    root = tmp_path_factory.mktemp("crossborder")
    fed = build_federation(root, "cbfed")
    home = fed.node_home("tax")
    config = NodeConfig.load(home)
    node = Node.from_config(config)
    csv = write_csv(root / "people.csv")
    for name, kind in (("people", OwnerKind.INDIVIDUAL), ("stats", OwnerKind.STATE)):
        node.catalogue.add(
            csv,
            name=name,
            grade=Grade.GENERAL,
            sharing_type=SharingType.CONDITIONAL,
            owner=Owner(kind, "residents (in trust)", "tax"),
            columns=[
                ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
                ColumnRule("amount", ColumnKind.AGGREGATE),
            ],
            actor="operator:tax",
            audit=node.audit,
        )
    server = create_server(node, config.listen)
    # The CLI's acts are tax's named operator's ($GOVSHARE_OPERATOR, read by the subprocesses).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GOVSHARE_OPERATOR", fed.operator("tax"))
        yield Running(fed, node, home, server.port)
    server.stop(0)
    node.close()


def govshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok_json(*args: str) -> object:
    result = govshare(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_approve_list_revoke_as_subprocess(running: Running) -> None:
    home = str(running.home)
    record = ok_json(
        "crossborder", "approve", "--home", home, "--dataset", "people", "--to", "HK",
        "--assessment", "CAC-2026-0042", "--expires", "2099-06-30",
        "--basis", "PIPL art. 38(1): security assessment passed",
    )  # fmt: skip
    assert isinstance(record, dict)
    assert (record["dataset"], record["destination"], record["issuer"]) == ("people", "HK", "tax")
    assert record["expires_at"] == int(dt.datetime(2099, 7, 1, tzinfo=dt.UTC).timestamp())
    record_id = record["record_id"]

    # The node that serves sees it at once, signed with its roster key.
    node_key = Identity.load(running.home).roster.member("tax").verify_key()
    stored = running.node.crossborder.get(record_id)
    verify_assessment(stored, node_key)
    assert "HK" in running.node.crossborder.destinations("people", int(time.time()), node_key)

    listed = ok_json("crossborder", "list", "--home", home, "--dataset", "people")
    assert isinstance(listed, list)
    mine = [r for r in listed if r["record_id"] == record_id]
    assert [r["status"] for r in mine] == ["in force"]
    assert ok_json("crossborder", "list", "--home", home, "--dataset", "stats") == []

    table = govshare("crossborder", "list", "--home", home)
    assert table.returncode == 0 and record_id in table.stdout and "in force" in table.stdout

    revoked = ok_json(
        "crossborder", "revoke", record_id, "--home", home, "--reason", "assessment withdrawn"
    )
    assert isinstance(revoked, dict) and revoked["revoked_at"] is not None
    assert revoked["revoke_reason"] == "assessment withdrawn"
    listed = ok_json("crossborder", "list", "--home", home, "--dataset", "people")
    assert isinstance(listed, list)
    assert next(r["status"] for r in listed if r["record_id"] == record_id) == "revoked"

    again = govshare("crossborder", "revoke", record_id, "--home", home, "--reason", "x")
    assert again.returncode == 1
    when = when_text(revoked["revoked_at"])
    assert again.stderr.splitlines() == [
        f"error: cross-border record {record_id} was already revoked at {when}"
    ]

    with AuditLog.open(NodeConfig.load(running.home).audit_database_path, suite=STANDARD) as log:
        entries = [e.decode() for e in log.iter_entries()]
    ours = [
        (e.kind, e.actor)
        for e in entries
        if e.kind.startswith("crossborder.") and e.fields["record_id"] == record_id
    ]
    assert ours == [
        ("crossborder.approved", "op-tax"),
        ("crossborder.revoked", "op-tax"),
    ]


def test_cli_errors_are_one_line(running: Running) -> None:
    home = str(running.home)
    base = ["crossborder", "approve", "--home", home, "--dataset", "people",
            "--assessment", "A-1", "--expires", "2099-01-01", "--basis", "b"]  # fmt: skip
    bad = govshare(*base, "--to", "HKG")
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "error: destination 'HKG' must be an ISO 3166-1 alpha-2 code such as HK or SG"
    ]
    home_too = govshare(*base, "--to", "CN")  # tax is in CN
    assert home_too.returncode == 1 and "own jurisdiction" in home_too.stderr
    unknown = govshare("crossborder", "revoke", "ffffffffffffffff", "--home", home, "--reason", "x")
    assert unknown.stderr.splitlines() == ["error: no cross-border record 'ffffffffffffffff'"]
    # Refusals leave no record behind.
    assert [r.destination for r in running.node.crossborder.list("people")].count("CN") == 0


def test_cli_notes_that_only_individual_data_needs_a_record(running: Running) -> None:
    result = govshare(
        "crossborder", "approve", "--home", str(running.home), "--dataset", "stats", "--to", "SG",
        "--assessment", "A-2", "--expires", "2099-01-01", "--basis", "voluntary",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "only individual data needs" in " ".join(result.stderr.split())
    assert "stats may go to SG under A-2, until 2099-01-02 00:00:00Z" in " ".join(
        result.stdout.split()
    )


def test_catalog_show_lists_the_records_in_force(running: Running) -> None:
    node = running.node
    now = int(time.time())
    key = node.identity.signing_key
    common = {"issuer": "tax", "dataset": node.catalogue.get("people"), "basis": "PIPL art. 38"}
    shown = node.crossborder.approve(
        key, destination="MO", assessment="CAC-MO-7", expires_at=now + YEAR, actor="operator:tax",
        audit=node.audit, **common,  # type: ignore[arg-type]
    )  # fmt: skip
    node.crossborder.approve(  # expired an hour ago
        key, destination="SG", assessment="CAC-SG-OLD", expires_at=now - 3600, now=now - YEAR,
        actor="operator:tax", audit=node.audit, **common,  # type: ignore[arg-type]
    )  # fmt: skip
    gone = node.crossborder.approve(
        key, destination="GB", assessment="CAC-GB-1", expires_at=now + YEAR, actor="operator:tax",
        audit=node.audit, **common,  # type: ignore[arg-type]
    )  # fmt: skip
    node.crossborder.revoke(gone.record_id, actor="operator:tax", reason="ended", audit=node.audit)
    forged = node.crossborder.approve(
        key, destination="US", assessment="CAC-US-1", expires_at=now + YEAR, actor="operator:tax",
        audit=node.audit, **common,  # type: ignore[arg-type]
    )  # fmt: skip
    with sqlite3.connect(node.crossborder.path) as conn:
        conn.execute(
            "UPDATE crossborder SET expires_at = expires_at + 1 WHERE record_id = ?",
            (forged.record_id,),
        )

    identity = str(running.fed.bundles["alice"])
    result = ok_json("catalog", "show", "tax.people", "--identity", identity)
    assert isinstance(result, dict)
    assert result["owner"]["kind"] == "individual"
    assert {"destination": "MO", "assessment": "CAC-MO-7", "expires_at": shown.expires_at} in (
        result["crossborder"]
    )
    destinations = {r["destination"] for r in result["crossborder"]}
    assert not destinations & {"SG", "GB", "US"}  # expired, revoked, tampered

    table = govshare("catalog", "show", "tax.people", "--identity", identity)
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "cross-border assessments in force:" in text
    assert "to MO: CAC-MO-7, until" in text and "CAC-SG-OLD" not in text

    # Only individual data says where it stays when nothing covers it.
    stats = govshare("catalog", "show", "tax.stats", "--identity", identity)
    assert stats.returncode == 0 and "results stay" not in stats.stdout

    # The client's typed view, and ListDatasets over the raw stub.
    with NodeClient.to(running.fed.identity("alice"), "tax") as client:
        entry = client.catalog_entry("people")
        assert CrossBorderRecord("MO", "CAC-MO-7", shown.expires_at) in entry.crossborder
        assert entry.info == client.describe_dataset("people")
        listing = catalog_pb2_grpc.CatalogStub(client.channel).ListDatasets(
            catalog_pb2.ListDatasetsRequest(), timeout=10
        )
    people = next(d for d in listing.datasets if d.name == "people")
    assert "MO" in {r.destination for r in people.crossborder}
    assert not {r.destination for r in people.crossborder} & {"SG", "GB", "US"}


def test_catalog_show_says_where_uncovered_individual_data_stays(
    running: Running, tmp_path: Path
) -> None:
    node = running.node
    node.catalogue.add(
        write_csv(tmp_path / "p.csv"),
        name="patients",
        grade=Grade.GENERAL,
        sharing_type=SharingType.CONDITIONAL,
        owner=Owner(OwnerKind.INDIVIDUAL, "patients (in trust)", "tax"),
        columns=[
            ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
            ColumnRule("amount", ColumnKind.AGGREGATE),
        ],
        actor="operator:tax",
        audit=node.audit,
    )
    identity = str(running.fed.bundles["alice"])
    result = govshare("catalog", "show", "tax.patients", "--identity", identity)
    assert result.returncode == 0, result.stderr
    assert "no cross-border assessment in force: results stay in CN" in " ".join(
        result.stdout.split()
    )
    assert ok_json("catalog", "show", "tax.patients", "--identity", identity)["crossborder"] == []  # type: ignore[index]
