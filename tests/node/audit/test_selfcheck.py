"""A node checks its own audit log at start (issue 10, item 2).

The check itself over tampered files (every kind of damage named at its first entry; the fast
page-by-page path agrees with the leaf-by-leaf one), then real nodes over mutual TLS and a real
``govshare node serve`` process: a broken log makes the node refuse queries with one line naming
the entry, while auditors still pull the evidence and nothing more is appended.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import FederationFixture, build_federation
from grpc_health.v1 import health_pb2, health_pb2_grpc

from govshare.model.events import Event, log_origin
from govshare.model.identity import Identity
from govshare.node.api.server import create_server
from govshare.node.audit import auditlog
from govshare.node.audit.auditlog import AuditLog, LogBroken, SelfCheck
from govshare.node.audit.witness import WitnessStore
from govshare.node.config import NodeConfig
from govshare.node.data.catalog import Catalogue
from govshare.node.node import Node
from govshare.node.policy.crossborder import CrossBorderStore
from govshare.node.policy.grants import GrantStore
from govshare.node.stores.query_store import QueryStore
from govshare.protocols.auditverify import ProblemKind, decode_entry, verify_log
from govshare.protocols.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from govshare.protocols.merkle import CompactRange
from govshare.protocols.suite import STANDARD, VerifyKey
from govshare.rpc.client import NodeClient
from govshare.v1 import (
    aggregate_pb2,
    aggregate_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

KEY = STANDARD.generate_signing_key()
PUBLIC = KEY.public_key()
ORIGIN = "test.govshare.example/selfcheck"
BULK = auditlog.BULK_PAGE


# --- files and tampering ----------------------------------------------------------------------


def build(path: Path, batches: list[int], *, tail: int = 0) -> None:
    """A log with a checkpoint after each batch, then ``tail`` entries after the last one."""
    with AuditLog.open(path, clock=lambda: 1_700_000_000_000, suite=STANDARD) as log:
        for count in batches:
            log.record_many([Event("test.event", {"n": i}, "tester") for i in range(count)])
            log.checkpoint(KEY, ORIGIN)
        log.record_many([Event("test.event", {"n": i}, "tester") for i in range(tail)])


def tamper(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Run SQL on the file with its append-only triggers dropped (what an insider can do)."""
    db = sqlite3.connect(path, isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("BEGIN")
    for sql, params in statements:
        db.execute(sql, params)
    db.execute("COMMIT")
    db.close()


def entry_bytes(path: Path, index: int) -> bytes:
    with closing(sqlite3.connect(path)) as db:
        (data,) = db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
    return bytes(data)


def one_byte_edited(data: bytes) -> bytes:
    """The entry with one byte changed: the first letter of its actor."""
    at = data.index(b'"actor":"') + len(b'"actor":"')
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def edit_byte(path: Path, index: int, *, with_leaf_hash: bool = False) -> None:
    edited = one_byte_edited(entry_bytes(path, index))
    if with_leaf_hash:
        digest = hashlib.sha256(b"\x00" + edited).digest()
        tamper(
            path,
            ("UPDATE entries SET data = ?, leaf_hash = ? WHERE idx = ?", (edited, digest, index)),
        )
    else:
        tamper(path, ("UPDATE entries SET data = ? WHERE idx = ?", (edited, index)))


def rewrite_consistently(path: Path, index: int) -> None:
    """Edit entry ``index`` and recompute its leaf hash and every stored subtree hash: only the
    signed checkpoints still disagree."""
    edit_byte(path, index, with_leaf_hash=True)
    with closing(sqlite3.connect(path)) as db:
        leaves = [bytes(h) for (h,) in db.execute("SELECT leaf_hash FROM entries ORDER BY idx")]
    tree = CompactRange()
    nodes = [row for leaf in leaves for row in tree.append(leaf)]
    tamper(
        path,
        ("DELETE FROM nodes", ()),
        *(("INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", row) for row in nodes),
    )


def counts(path: Path) -> tuple[int, int, int]:
    """(entries, checkpoints, cosignatures) in the file."""
    with closing(sqlite3.connect(path)) as db:
        entries, checkpoints, cosignatures = (
            int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("entries", "checkpoints", "cosignatures")
        )
    return entries, checkpoints, cosignatures


def whole(path: Path) -> SelfCheck:
    with AuditLog.open(path, suite=STANDARD) as log:
        return log.check_whole(PUBLIC, ORIGIN)


def tail(path: Path) -> SelfCheck:
    with AuditLog.open(path, suite=STANDARD) as log:
        return log.check_tail(PUBLIC, ORIGIN)


def damage_of(verdict: SelfCheck) -> tuple[str, str]:
    assert verdict.damage is not None, verdict
    return verdict.damage.where, verdict.damage.reason


# --- the check over files ---------------------------------------------------------------------

SMALL = [30, 10]  # checkpoints at 30 and 40, then a tail of 3
SMALL_TAIL = 3


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "audit.db"
    build(path, SMALL, tail=SMALL_TAIL)
    return path


@pytest.fixture
def copy(small: Path, tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    shutil.copy(small, path)
    return path


def test_intact_log_passes_whole_and_tail(small: Path) -> None:
    full, recent = whole(small), tail(small)
    assert full.ok and full.whole and (full.size, full.checkpoint) == (43, 40)
    assert full.checkpoints == 2 and full.checked_from == 0
    assert recent.ok and not recent.whole and recent.checked_from == 40
    assert recent.checkpoints == 1


def test_edited_byte_is_named_by_the_whole_check_not_the_tail(copy: Path) -> None:
    edit_byte(copy, 17)
    assert damage_of(whole(copy)) == ("entry 17", "leaf hash mismatch")
    assert tail(copy).ok  # entry 17 lies under the latest checkpoint: the tail never reads it


def test_edited_byte_in_the_tail_is_named_by_the_tail_check(copy: Path) -> None:
    edit_byte(copy, 41)
    assert damage_of(tail(copy)) == ("entry 41", "leaf hash mismatch")


def test_edit_with_its_leaf_hash_is_named_by_the_subtree_hash(copy: Path) -> None:
    edit_byte(copy, 17, with_leaf_hash=True)
    assert damage_of(whole(copy)) == (
        "entry 16",
        "stored subtree hash over entries 16..17 does not match",
    )


def test_consistent_rewrite_is_named_by_the_signed_root(copy: Path) -> None:
    rewrite_consistently(copy, 33)
    assert damage_of(whole(copy)) == (
        "entry 30",
        "entries 30..39 do not reproduce the signed checkpoint of size 40",
    )
    # The tail starts from the stored hashes at 40, which no longer give the signed root.
    assert damage_of(tail(copy)) == (
        "checkpoint of size 40",
        "the stored tree does not reproduce its signed root",
    )


def test_edited_subtree_hash_is_named(copy: Path) -> None:
    tamper(copy, ("UPDATE nodes SET hash = ? WHERE level = 2 AND idx = 3", (b"\x07" * 32,)))
    assert damage_of(whole(copy)) == (
        "entry 12",
        "stored subtree hash over entries 12..15 does not match",
    )


def test_deleted_entry_is_named(copy: Path) -> None:
    tamper(copy, ("DELETE FROM entries WHERE idx = 20", ()))
    assert damage_of(whole(copy)) == ("entry 20", "missing (deleted)")
    with AuditLog.open(copy, suite=STANDARD) as log:  # opens sealed: its tree cannot be loaded
        assert log.broken is not None and "not contiguous" in log.broken
        assert damage_of(log.check_tail(PUBLIC, ORIGIN)) == ("entry 20", "missing (deleted)")
        assert [e.index for e in log.entries(19, 22)] == [19, 21]  # evidence still readable
        with pytest.raises(LogBroken):
            log.record("test.event", {}, actor="tester")


def test_truncation_below_the_latest_checkpoint_is_named(copy: Path) -> None:
    tamper(copy, ("DELETE FROM entries WHERE idx >= 35", ()))
    where, reason = damage_of(whole(copy))
    assert where == "entry 35" and "commits to 40 (truncated)" in reason


def test_malformed_entry_in_the_tail_is_named(copy: Path) -> None:
    # Not canonical JSON, with its leaf hash and the subtree hashes above it recomputed.
    data = entry_bytes(copy, 41).replace(b'"actor":', b'"actor": ')
    tamper(copy, ("UPDATE entries SET data = ? WHERE idx = 41", (data,)))
    rewrite_consistently_from_data(copy)
    where, reason = damage_of(tail(copy))
    assert where == "entry 41" and reason.startswith("malformed")


def rewrite_consistently_from_data(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        rows = [(int(i), bytes(d)) for i, d in db.execute("SELECT idx, data FROM entries")]
    tree = CompactRange()
    nodes = []
    statements: list[tuple[str, tuple[Any, ...]]] = [("DELETE FROM nodes", ())]
    for index, data in sorted(rows):
        digest = hashlib.sha256(b"\x00" + data).digest()
        statements.append(("UPDATE entries SET leaf_hash = ? WHERE idx = ?", (digest, index)))
        nodes.extend(tree.append(digest))
    statements.extend(("INSERT INTO nodes VALUES (?, ?, ?)", row) for row in nodes)
    tamper(path, *statements)


def corrupt_signature(note: bytes) -> bytes:
    """The note with one byte of its (only) signature flipped, still well formed."""
    body, _, line = note.rstrip(b"\n").rpartition(b"\n")
    head, _, encoded = line.rpartition(b" ")
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01
    return body + b"\n" + head + b" " + base64.b64encode(bytes(raw)) + b"\n"


def test_checkpoint_with_a_broken_signature_is_named(copy: Path) -> None:
    forged = corrupt_signature(entry_note(copy, 40))
    tamper(copy, ("UPDATE checkpoints SET note = ? WHERE size = 40", (forged,)))
    where, reason = damage_of(tail(copy))
    assert where.endswith("(size 40)") and "signature does not verify" in reason


def test_checkpoint_signed_by_another_key_is_refused(copy: Path) -> None:
    with AuditLog.open(copy, suite=STANDARD) as log:
        root = log.root_at(40)
    forged = sign_checkpoint(Checkpoint(ORIGIN, 40, root), STANDARD.generate_signing_key())
    tamper(copy, ("UPDATE checkpoints SET note = ? WHERE size = 40", (forged,)))
    assert "signature does not verify" in damage_of(whole(copy))[1]


def test_checkpoint_over_another_root_is_refused(copy: Path) -> None:
    # Signed with the node's own key, but over a root the log does not have.
    forged = sign_checkpoint(Checkpoint(ORIGIN, 40, b"\x05" * 32), KEY)
    tamper(
        copy,
        ("UPDATE checkpoints SET note = ?, root = ? WHERE size = 40", (forged, b"\x05" * 32)),
    )
    assert damage_of(tail(copy)) == (
        "checkpoint of size 40",
        "the stored tree does not reproduce its signed root",
    )
    assert damage_of(whole(copy)) == (
        "entry 30",
        "entries 30..39 do not reproduce the signed checkpoint of size 40",
    )


def entry_note(path: Path, size: int) -> bytes:
    with closing(sqlite3.connect(path)) as db:
        (note,) = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
    return bytes(note)


# --- the page-by-page path agrees with the leaf-by-leaf one -----------------------------------

BIG = [5000, BULK - 5000, 3 * BULK // 2 + 7, BULK // 2 - 7, BULK]  # 8,192 ... 32,768
BIG_TAIL = 300


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "audit.db"
    build(path, BIG, tail=BIG_TAIL)
    return path


TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "byte": lambda p: edit_byte(p, 9000),
    "byte_and_leaf": lambda p: edit_byte(p, 20_001, with_leaf_hash=True),
    "level_1": lambda p: tamper(p, ("UPDATE nodes SET hash = ? WHERE level = 1 AND idx = 4500",
                                    (b"\x01" * 32,))),
    "level_13": lambda p: tamper(p, ("UPDATE nodes SET hash = ? WHERE level = 13 AND idx = 2",
                                     (b"\x01" * 32,))),
    "level_14": lambda p: tamper(p, ("UPDATE nodes SET hash = ? WHERE level = 14 AND idx = 0",
                                     (b"\x01" * 32,))),
    "missing_node": lambda p: tamper(p, ("DELETE FROM nodes WHERE level = 3 AND idx = 1500", ())),
    "deleted": lambda p: tamper(p, ("DELETE FROM entries WHERE idx = 12345", ())),
    "rewritten": lambda p: rewrite_consistently(p, 13_000),
    "rewritten_early": lambda p: rewrite_consistently(p, 100),
    "not_a_blob": lambda p: tamper(p, ("UPDATE entries SET data = 'text' WHERE idx = 17000", ())),
}  # fmt: skip


def test_big_intact_log_passes_both_paths(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bulk = auditlog._Scan._bulk
    taken: list[bool] = []

    def counted(scan: auditlog._Scan, rows: Any) -> bool:
        taken.append(bulk(scan, rows))
        return taken[-1]

    monkeypatch.setattr(auditlog._Scan, "_bulk", counted)
    fast = whole(big)
    assert taken == [True] * 4  # every whole page under the latest checkpoint went page-wise
    monkeypatch.setattr(auditlog._Scan, "_bulk", lambda self, rows: False)
    slow = whole(big)
    assert fast.ok and slow.ok and fast.size == slow.size == sum(BIG) + BIG_TAIL
    assert fast.checkpoints == slow.checkpoints == len(BIG)


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_page_path_names_what_the_leaf_path_names(
    name: str, big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.db"
    shutil.copy(big, path)
    TAMPERINGS[name](path)
    fast = whole(path)
    monkeypatch.setattr(auditlog._Scan, "_bulk", lambda self, rows: False)
    slow = whole(path)
    assert fast.damage is not None and fast.damage == slow.damage, (fast, slow)


def test_page_path_names_the_expected_entries(big: Path, tmp_path: Path) -> None:
    expected = {
        "byte": ("entry 9000", "leaf hash mismatch"),
        "level_13": ("entry 16384", "stored subtree hash over entries 16384..24575 does not "
                     "match"),
        "level_14": ("entry 0", "stored subtree hash over entries 0..16383 does not match"),
        "rewritten": ("entry 8192", "entries 8192..20486 do not reproduce the signed checkpoint "
                      "of size 20487"),
        "rewritten_early": ("entry 0", "entries 0..4999 do not reproduce the signed checkpoint "
                            "of size 5000"),
        "deleted": ("entry 12345", "missing (deleted)"),
    }  # fmt: skip
    for name, damage in expected.items():
        path = tmp_path / f"{name}.db"
        shutil.copy(big, path)
        TAMPERINGS[name](path)
        assert damage_of(whole(path)) == damage, name


def test_an_interrupted_check_says_so(big: Path) -> None:
    stop = threading.Event()
    stop.set()
    with AuditLog.open(big, suite=STANDARD) as log:
        verdict = log.check_whole(PUBLIC, ORIGIN, stop=stop)
    assert verdict.interrupted and not verdict.ok and verdict.damage is None


# --- real nodes over mutual TLS ---------------------------------------------------------------

PREFIX, MIDDLE, LATE = 30, 10, 3  # checkpoints at 30 and 40, then 3 entries


def seed_tax_log(fed: FederationFixture) -> Path:
    """Give tax's log 43 entries with checkpoints at 30 and 40; return the file."""
    node = Node.from_home(fed.node_home("tax"))
    try:
        for count in (PREFIX, MIDDLE, LATE):
            node.audit.record_many(
                [Event("test.event", {"n": n}, "operator:tax") for n in range(count)]
            )
            if count != LATE:
                node.audit.checkpoint(node.identity.signing_key, node.publisher.origin)
    finally:
        node.close()
    return NodeConfig.load(fed.node_home("tax")).audit_database_path


@pytest.fixture
def tax_fed(tmp_path: Path) -> tuple[FederationFixture, Path]:
    fed = build_federation(tmp_path)
    return fed, seed_tax_log(fed)


def tax_node(fed: FederationFixture, **options: Any) -> Node:
    """tax as from_config builds it, with Node's test-only switches in ``options``."""
    config = NodeConfig.load(fed.node_home("tax"))
    return Node(
        identity=Identity.load(config.identity_dir),
        catalogue=Catalogue(config.database_path),
        grants=GrantStore(config.database_path),
        crossborder_store=CrossBorderStore(config.database_path),
        query_store=QueryStore(config.database_path),
        audit=AuditLog.open(config.audit_database_path, suite=STANDARD),
        witness_store=WitnessStore(config.database_path),
        checkpoint_interval=3600.0,
        **options,
    )


@contextmanager
def serving(node: Node, **options: Any) -> Iterator[Node]:
    running = create_server(node, NodeConfig.load(node.identity.directory).listen, **options)
    try:
        yield node
    finally:
        running.stop(0)
        node.close()


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def channel(fed: FederationFixture, who: str) -> grpc.Channel:
    return NodeClient.to(fed.identity(who), "tax").channel


def health(fed: FederationFixture, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel(fed, "alice"))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


def refused_calls(fed: FederationFixture) -> dict[str, tuple[grpc.StatusCode, str]]:
    """One call of every query-side service, each from a member allowed to make it."""
    alice, civil = channel(fed, "alice"), channel(fed, "civil")
    return {
        "Catalog.ListDatasets": status_of(
            lambda: catalog_pb2_grpc.CatalogStub(alice).ListDatasets(
                catalog_pb2.ListDatasetsRequest(), timeout=5
            )
        ),
        "Query.Submit": status_of(
            lambda: query_pb2_grpc.QueryStub(alice).Submit(
                query_pb2.SubmitRequest(signed_request=b"x"), timeout=5
            )
        ),
        "Aggregate.Prepare": status_of(
            lambda: aggregate_pb2_grpc.AggregateStub(alice).Prepare(
                aggregate_pb2.PrepareRequest(query_id="0" * 32), timeout=5
            )
        ),
        "Peer.Ping": status_of(
            lambda: peer_pb2_grpc.PeerStub(civil).Ping(peer_pb2.PingRequest(), timeout=5)
        ),
        "Peer.Witness": status_of(
            lambda: peer_pb2_grpc.PeerStub(civil).Witness(
                peer_pb2.WitnessRequest(note=b"x"), timeout=5
            )
        ),
    }


def served_checkpoint(fed: FederationFixture) -> bytes:
    stub = audit_pb2_grpc.AuditStub(channel(fed, "audra"))
    note: bytes = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5).note
    return note


def pull(fed: FederationFixture) -> tuple[bytes, list[tuple[int, bytes]]]:
    """What an auditor pulls: the latest checkpoint and every entry it covers."""
    stub = audit_pb2_grpc.AuditStub(channel(fed, "audra"))
    note = served_checkpoint(fed)
    head = open_checkpoint(note, tax_key(fed), origin=tax_origin(fed))
    entries = [
        (e.index, e.data)
        for page in stub.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=head.size), timeout=5)
        for e in page.entries
    ]
    return note, entries


def tax_key(fed: FederationFixture) -> VerifyKey:
    """tax's log key as the roster lists it."""
    return fed.federation.roster.member("tax").verify_key()


def tax_origin(fed: FederationFixture) -> str:
    return log_origin(fed.federation.roster.federation, "tax")


REFUSAL_17 = (
    "node tax refuses to serve: its audit log is broken at entry 17 (leaf hash mismatch); "
    "auditors may still pull it"
)


def test_edited_byte_on_restart_refuses_queries_and_serves_the_evidence(
    tax_fed: tuple[FederationFixture, Path],
) -> None:
    fed, path = tax_fed
    edit_byte(path, 17)
    before = counts(path)
    with serving(Node.from_home(fed.node_home("tax"))) as node:
        assert node.log_check.at_start is not None and node.log_check.at_start.whole
        assert node.log_check.refusal() == REFUSAL_17
        for method, (code, details) in refused_calls(fed).items():
            assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, REFUSAL_17), method
        assert health(fed, "govshare.v1.Query") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(fed, "govshare.v1.Audit") == health_pb2.HealthCheckResponse.SERVING

        # The auditor pulls the evidence: the stored checkpoint (nothing new signed) and the
        # entries with the edited bytes, which its own verification then names.
        note, entries = pull(fed)
        assert open_checkpoint(note, tax_key(fed), origin=tax_origin(fed)).size == 40
        assert [i for i, _ in entries] == list(range(40))
        assert entries[17][1] == entry_bytes(path, 17) != b""
        report = verify_log(
            [(i, d, None) for i, d in entries], [note],
            public_key=tax_key(fed), origin=tax_origin(fed),
        )  # fmt: skip
        assert report.first_problem is not None
        assert report.first_problem.kind is ProblemKind.CHECKPOINT_MISMATCH
        with pytest.raises(LogBroken):
            node.audit.record("test.event", {}, actor="tax")
        assert counts(path) == before  # no rpc entries, no checkpoint, no cosignature
    assert counts(path) == before


def test_intact_log_serves_and_the_verdict_names_its_size(
    tax_fed: tuple[FederationFixture, Path],
) -> None:
    fed, path = tax_fed
    with serving(Node.from_home(fed.node_home("tax"))) as node:
        verdict = node.log_check.at_start
        assert verdict is not None and verdict.ok and verdict.whole
        assert node.log_check.line(verdict).startswith(
            "audit log verified: 43 entries, checkpoint 40, in "
        )
        assert node.log_check.refusal() is None and node.log_check.whole_checked.is_set()
        code, _ = status_of(
            lambda: catalog_pb2_grpc.CatalogStub(channel(fed, "alice")).ListDatasets(
                catalog_pb2.ListDatasetsRequest(), timeout=5
            )
        )
        assert code is grpc.StatusCode.OK
        assert counts(path)[0] > 43  # the call was logged


def test_byte_flipped_in_the_file_itself_is_named(tax_fed: tuple[FederationFixture, Path]) -> None:
    fed, path = tax_fed
    data = entry_bytes(path, 17)  # its connection closes: the WAL is folded into the file
    assert not Path(f"{path}-wal").exists()
    raw = path.read_bytes()
    assert raw.count(data) == 1
    at = raw.index(data) + data.index(b'"actor":"') + len(b'"actor":"')
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :])  # no SQL, no triggers
    assert entry_bytes(path, 17) == one_byte_edited(data)
    with serving(Node.from_home(fed.node_home("tax"))) as node:
        assert node.log_check.refusal() == REFUSAL_17
        code, details = refused_calls(fed)["Catalog.ListDatasets"]
        assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, REFUSAL_17)


@pytest.mark.parametrize("forgery", ["bad_signature", "other_key", "other_root"])
def test_latest_checkpoint_that_does_not_match_is_refused(
    forgery: str, tax_fed: tuple[FederationFixture, Path]
) -> None:
    fed, path = tax_fed
    note = entry_note(path, 40)
    with AuditLog.open(path, suite=STANDARD) as log:
        root = log.root_at(40)
    if forgery == "bad_signature":
        forged = corrupt_signature(note)
    elif forgery == "other_key":
        forged = sign_checkpoint(
            Checkpoint(tax_origin(fed), 40, root), STANDARD.generate_signing_key()
        )
    else:
        tax_key = fed.identity("tax").signing_key
        forged = sign_checkpoint(Checkpoint(tax_origin(fed), 40, b"\x05" * 32), tax_key)
        root = b"\x05" * 32
    tamper(path, ("UPDATE checkpoints SET note = ?, root = ? WHERE size = 40", (forged, root)))
    before = counts(path)
    with serving(tax_node(fed, log_check_whole_at_start=0)) as node:  # the tail check at start
        refusal = node.log_check.refusal()
        assert refusal is not None and refusal.startswith("node tax refuses to serve: ")
        if forgery == "other_root":  # located by a whole check: the entries since checkpoint 30
            assert "broken at entry 30 (entries 30..39 do not reproduce the signed checkpoint" in (
                refusal
            )
        else:
            assert "(size 40) (its signature does not verify under the node's key)" in refusal
        code, details = refused_calls(fed)["Catalog.ListDatasets"]
        assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, refusal)
        assert served_checkpoint(fed) == forged  # the evidence as stored; nothing new signed
    assert counts(path) == before


def test_background_whole_check_catches_what_the_tail_cannot(
    tax_fed: tuple[FederationFixture, Path],
) -> None:
    fed, path = tax_fed
    edit_byte(path, 17)  # under checkpoint 40: the tail check (entries 40..42) never reads it
    verdicts: list[SelfCheck] = []
    node = tax_node(fed, log_check_whole_at_start=0)
    start = node.log_check.at_start
    assert start is not None and start.ok and not start.whole and start.checked_from == 40
    assert not node.log_check.whole_checked.is_set() and node.log_check.refusal() is None
    with serving(node, on_log_check=verdicts.append):
        assert node.log_check.whole_checked.wait(timeout=60)
        assert len(verdicts) == 1 and verdicts[0].whole
        assert node.log_check.refusal() == REFUSAL_17
        assert node.log_check.line(verdicts[0]) == REFUSAL_17
        settled = counts(path)
        for method, (code, details) in refused_calls(fed).items():
            assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, REFUSAL_17), method
        assert health(fed, "govshare.v1.Catalog") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert [i for i, _ in pull(fed)[1]] == list(range(40))  # the evidence, as stored
        assert counts(path) == settled  # nothing appended once it refuses


def test_intact_large_log_checked_in_the_background_keeps_serving(
    tax_fed: tuple[FederationFixture, Path],
) -> None:
    fed, _ = tax_fed
    verdicts: list[SelfCheck] = []
    with serving(tax_node(fed, log_check_whole_at_start=0), on_log_check=verdicts.append) as node:
        assert node.log_check.whole_checked.wait(timeout=60)
        assert len(verdicts) == 1 and verdicts[0].ok and verdicts[0].size >= 43
        assert node.log_check.line(verdicts[0]).startswith("audit log verified: ")
        assert node.log_check.refusal() is None
        code, _ = refused_calls(fed)["Catalog.ListDatasets"]
        assert code is grpc.StatusCode.OK


# --- a real `govshare node serve` process -----------------------------------------------------


@contextmanager
def serve_process(home: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``govshare node serve`` with its first two lines (address, then the log verdict)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "govshare.cli", "node", "serve", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
        yield process, lines
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


VERIFIED = re.compile(r"audit log verified: (\d+) entries, checkpoint (\d+), in \d+\.\d\d s$")


def test_node_serve_prints_the_verdict_and_serves(tax_fed: tuple[FederationFixture, Path]) -> None:
    fed, _ = tax_fed
    with serve_process(fed.node_home("tax")) as (process, lines):
        assert "serving on" in lines[0], lines
        match = VERIFIED.match(lines[1])
        assert match is not None, lines
        assert (int(match[1]), int(match[2])) == (43, 40)
        code, _ = refused_calls(fed)["Catalog.ListDatasets"]
        assert code is grpc.StatusCode.OK
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_node_serve_with_an_edited_byte_names_the_entry_and_appends_nothing(
    tax_fed: tuple[FederationFixture, Path],
) -> None:
    fed, path = tax_fed
    edit_byte(path, 17)
    before = counts(path)
    with serve_process(fed.node_home("tax")) as (process, lines):
        assert "serving on" in lines[0], lines
        assert lines[1] == REFUSAL_17
        code, details = refused_calls(fed)["Query.Submit"]
        assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, REFUSAL_17)
        _, entries = pull(fed)
        assert decode_entry(entries[16][1]).index == 16 and len(entries) == 40
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert counts(path) == before
