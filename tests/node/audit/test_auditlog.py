"""The node's audit log on real SQLite files: encoding, append-only triggers, proofs against
signed checkpoints, cosignatures, tamper detection, a 100,000-entry log, and kill -9 safety."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from govshare.model.events import Event
from govshare.node.audit.auditlog import AuditLog, verify_log_file
from govshare.node.audit.sink import AuditSink
from govshare.protocols.auditverify import (
    INT_MAX,
    INT_MIN,
    AuditEntry,
    ProblemKind,
    decode_entry,
    decoded_index,
    encode_entry,
    verify_log,
)
from govshare.protocols.checkpoint import (
    Checkpoint,
    Note,
    cosign,
    open_checkpoint,
    open_cosignature,
    parse_checkpoint_unverified,
    sign_checkpoint,
)
from govshare.protocols.errors import MalformedInput, NotFound, VerificationFailed
from govshare.protocols.merkle import root_hash, verify_consistency, verify_inclusion
from govshare.protocols.suite import STANDARD

ORIGIN = "govshare.example/node-a/audit"
LOG_KEY = STANDARD.signing_key_from_bytes(hashlib.sha256(b"test log key").digest())
WITNESS_KEY = STANDARD.signing_key_from_bytes(hashlib.sha256(b"test witness").digest())
PUBLIC = LOG_KEY.public_key()


class FakeClock:
    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        self.now += 1
        return self.now


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog.open(tmp_path / "audit.db", clock=FakeClock(), suite=STANDARD) as opened:
        yield opened


# --- entry encoding ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
field_keys = st.text(max_size=12).filter(lambda k: not k.startswith("$"))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(field_keys, inner, max_size=4),
    max_leaves=12,
)
entries = st.builds(
    AuditEntry,
    index=st.integers(0, INT_MAX),
    time_ms=st.integers(0, INT_MAX),
    kind=st.from_regex(r"[a-z0-9_]{1,8}(\.[a-z0-9_]{1,8}){0,3}", fullmatch=True),
    actor=st.text(min_size=1, max_size=20),
    query_id=st.none() | st.text(min_size=1, max_size=20),
    fields=st.dictionaries(field_keys, values, max_size=6),
)


@given(entries)
def test_entry_encoding_round_trips(entry: AuditEntry) -> None:
    data = encode_entry(entry)
    assert decode_entry(data) == entry
    assert encode_entry(decode_entry(data)) == data


@given(entries, st.data())
def test_any_byte_change_decodes_canonically_or_is_malformed(
    entry: AuditEntry, data: st.DataObject
) -> None:
    raw = bytearray(encode_entry(entry))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_entry(bytes(raw))
    except MalformedInput:
        return
    assert encode_entry(decoded) == bytes(raw)  # still exactly one encoding per entry


def _outcome(check: Callable[[], object]) -> object:
    try:
        return check()
    except MalformedInput:
        return MalformedInput


@given(entries, st.data())
def test_verifier_fast_path_agrees_with_full_decode(entry: AuditEntry, data: st.DataObject) -> None:
    """decoded_index (tags checked in place) accepts exactly what decode_entry accepts."""
    raw = bytearray(encode_entry(entry))
    for _ in range(data.draw(st.integers(0, 2))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.sampled_from(b'"${}[]0=A\\'))
    full = _outcome(lambda: decode_entry(bytes(raw)))
    fast = _outcome(lambda: decoded_index(bytes(raw)))
    assert fast == (full if full is MalformedInput else full.index)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "fields",
    [
        {"s": "$5"},
        {"s": '{"$b64":"AA=="}'},
        {"d": {"$b64": "AA=="}},
        {"d": b"\x00" * 40, "e": [b"", b"\xff"]},
    ],
    ids=["dollar_value", "tag_inside_string", "tag_as_dict_refused", "bytes"],
)
def test_fast_path_edge_cases(fields: dict[str, object]) -> None:
    if "d" in fields and isinstance(fields["d"], dict):
        with pytest.raises(MalformedInput):
            encode_entry(AuditEntry(0, 0, "a.b", "x", None, fields))
        return
    data = encode_entry(AuditEntry(0, 0, "a.b", "x", None, fields))
    assert decode_entry(data).fields == fields
    assert decoded_index(data) == 0
    forged = data.replace(b"AA==", b"AB==") if b"AA==" in data else data
    assert _outcome(lambda: decoded_index(forged)) == _outcome(lambda: decode_entry(forged).index)


def _entry_json(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "actor": "member:tax",
        "fields": {"n": 1},
        "index": 3,
        "kind": "rpc.received",
        "query_id": None,
        "time_ms": 5,
        "v": 1,
    }
    value.update(overrides)
    return value


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


GOOD = _canonical(_entry_json())

MALFORMED_ENTRIES = {
    "whitespace": GOOD.replace(b",", b", ", 1),
    "keys_unsorted": GOOD.replace(b'{"actor":"member:tax",', b"{", 1)[:-1]
    + b',"actor":"member:tax"}',
    "duplicate_key": GOOD[:-1] + b',"v":1}',
    "float_field": _canonical(_entry_json(fields={"x": 1.5})),
    "float_integral": GOOD.replace(b'"n":1', b'"n":1.0'),
    "exponent": GOOD.replace(b'"n":1', b'"n":1e3'),
    "nan": GOOD.replace(b'"n":1', b'"n":NaN'),
    "int_beyond_int64": GOOD.replace(b'"n":1', f'"n":{2**63}'.encode()),
    "reserved_key": _canonical(_entry_json(fields={"$x": 1})),
    "bytes_tag_bad_base64": _canonical(_entry_json(fields={"b": {"$b64": "!!"}})),
    "bytes_tag_noncanonical": _canonical(_entry_json(fields={"b": {"$b64": "AB=="}})),
    "bytes_tag_extra_key": _canonical(_entry_json(fields={"b": {"$b64": "AA==", "y": 1}})),
    "extra_key": _canonical({**_entry_json(), "extra": 1}),
    "missing_key": _canonical({k: v for k, v in _entry_json().items() if k != "actor"}),
    "version_2": _canonical(_entry_json(v=2)),
    "version_true": _canonical(_entry_json(v=True)),
    "index_bool": _canonical(_entry_json(index=True)),
    "index_negative": _canonical(_entry_json(index=-1)),
    "index_string": _canonical(_entry_json(index="3")),
    "kind_upper_case": _canonical(_entry_json(kind="RPC.received")),
    "actor_empty": _canonical(_entry_json(actor="")),
    "fields_list": _canonical(_entry_json(fields=[1])),
    "escaped_ascii": GOOD.replace(b"member", b"\\u006dember"),
    "ascii_escaped_non_ascii": _canonical(_entry_json(actor="ä")).replace("ä".encode(), b"\\u00e4"),
    "invalid_utf8": GOOD.replace(b"member", b"m\xffmber"),
    "not_an_object": b"[]",
    "empty": b"",
    "too_deep": _canonical(_entry_json(fields={"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]})),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_ENTRIES))
def test_malformed_entries_are_refused(name: str) -> None:
    with pytest.raises(MalformedInput):
        decode_entry(MALFORMED_ENTRIES[name])


def test_good_reference_entry_decodes() -> None:
    # Guards the malformed cases above: each differs from a valid entry by the named defect.
    assert decode_entry(GOOD).index == 3


@pytest.mark.parametrize(
    "fields",
    [{"x": 0.5}, {"x": [1, 2.0]}, {"$b64": "AA=="}, {"n": 2**63}, {"x": {1, 2}}],
    ids=["float", "nested_float", "reserved", "big_int", "set"],
)
def test_unrecordable_fields_write_nothing(log: AuditLog, fields: dict[str, object]) -> None:
    with pytest.raises((MalformedInput, TypeError)):
        log.record("rpc.received", fields, actor="a")
    assert log.size == 0


# --- recording and reading --------------------------------------------------------------------


def test_record_round_trip_with_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock(1_000)
    with AuditLog.open(tmp_path / "a.db", clock=clock, suite=STANDARD) as log:
        sink: AuditSink = log
        first = sink.record(
            "rpc.received", {"digest": b"\x00\xff", "rows": 7}, actor="m1", query_id="q1"
        )
        second = sink.record("policy.decision", {"rule": "k-anon", "ok": True}, actor="m1")
        assert (first, second) == (0, 1)
        stored = log.entries(0, 2)
        assert stored[0].decode() == AuditEntry(
            0, 1_001, "rpc.received", "m1", "q1", {"digest": b"\x00\xff", "rows": 7}
        )
        assert stored[1].decode().time_ms == 1_002
        assert [e.index for e in log.entries_for_query("q1")] == [0]
        assert log.entries_for_query("nope") == []
        with pytest.raises(MalformedInput):
            log.entries(1, 3)


def test_record_many_is_one_batch_with_consecutive_indices(log: AuditLog) -> None:
    log.record("a.b", {}, actor="x")
    indices = log.record_many([Event("c.d", {"i": i}, "x", "q") for i in range(50)])
    assert indices == list(range(1, 51))
    assert len(log.entries_for_query("q")) == 50
    assert log.record_many([]) == []


def test_concurrent_records_each_get_one_index_and_a_bad_one_fails_alone(log: AuditLog) -> None:
    """Group commit: 16 threads recording at once share transactions, yet every entry lands
    once, in a contiguous log whose tree matches its entries; an entry that cannot be encoded
    is refused to its caller only."""
    threads, per_thread = 16, 25
    start = threading.Barrier(threads + 1)
    indices: list[int] = []
    refused: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            fields: dict[str, object] = {"n": n, "i": i}
            if n == 7 and i == 12:
                fields = {"bad": object()}
            try:
                index = log.record("test.concurrent", fields, actor=f"w{n}")
            except (TypeError, MalformedInput) as exc:
                with lock:
                    refused.append(exc)
            else:
                with lock:
                    indices.append(index)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    for worker in workers:
        worker.join()
    assert len(refused) == 1
    assert sorted(indices) == list(range(threads * per_thread - 1))
    entries = log.entries(0, log.size)
    assert [e.index for e in entries] == sorted(indices)
    assert {(e.decode().actor, e.decode().fields["i"]) for e in entries} == {
        (f"w{n}", i) for n in range(threads) for i in range(per_thread) if (n, i) != (7, 12)
    }
    assert log.root() == root_hash([e.leaf_hash for e in entries])


def test_file_is_wal_with_full_sync(tmp_path: Path, log: AuditLog) -> None:
    log.record("a.b", {}, actor="x")
    raw = sqlite3.connect(tmp_path / "audit.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE entries SET data = x'00' WHERE idx = 0",
        "DELETE FROM entries WHERE idx = 1",
        "DELETE FROM entries",
        "UPDATE nodes SET hash = zeroblob(32)",
        "DELETE FROM nodes",
        "UPDATE checkpoints SET size = 1",
        "DELETE FROM checkpoints",
        "UPDATE cosignatures SET witness = 'x'",
        "DELETE FROM cosignatures",
        "UPDATE meta SET value = '2'",
        "DELETE FROM meta",
    ],
)
def test_triggers_refuse_update_and_delete(tmp_path: Path, statement: str) -> None:
    path = tmp_path / "audit.db"
    with AuditLog.open(path, suite=STANDARD) as log:
        log.record_many([Event("a.b", {"i": i}, "x") for i in range(4)])
        note = log.checkpoint(LOG_KEY, ORIGIN)
        stored = log.latest_checkpoint()
        assert stored is not None
        cosig = cosign(parse_checkpoint_unverified(note)[0], WITNESS_KEY, name="w", now=9)
        log.add_cosignature(stored.id, cosig, witness_key=WITNESS_KEY.public_key(), log_key=PUBLIC)
    raw = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute(statement)
    raw.close()
    assert verify_log_file(path, public_key=PUBLIC, origin=ORIGIN).ok


# --- checkpoints and proofs -------------------------------------------------------------------


def _build(log: AuditLog, batches: list[int]) -> list[bytes]:
    notes = []
    for number, batch in enumerate(batches):
        log.record_many([Event("protocol.step", {"b": number, "i": i}, "x") for i in range(batch)])
        notes.append(log.checkpoint(LOG_KEY, ORIGIN))
    return notes


def test_proofs_verify_against_signed_checkpoints(log: AuditLog) -> None:
    notes = _build(log, [1, 2, 5, 8, 13, 21, 34])
    checkpoints = [open_checkpoint(n, PUBLIC, origin=ORIGIN) for n in notes]
    for checkpoint in checkpoints:
        for index in range(checkpoint.size):
            leaf = log.entries(index, index + 1)[0].leaf_hash
            proof = log.inclusion_proof(index, checkpoint.size)
            verify_inclusion(index, checkpoint.size, leaf, proof, checkpoint.root)
    for old in checkpoints:
        for new in checkpoints:
            if 0 < old.size < new.size:
                proof = log.consistency_proof(old.size, new.size)
                verify_consistency(old.size, new.size, proof, old.root, new.root)
    assert log.root_at(checkpoints[2].size) == checkpoints[2].root
    with pytest.raises(MalformedInput):
        log.inclusion_proof(0, log.size + 1)
    with pytest.raises(MalformedInput):
        log.inclusion_proof(log.size, log.size)
    with pytest.raises(MalformedInput):
        log.consistency_proof(5, 3)


def test_checkpoint_storage_and_reuse(log: AuditLog) -> None:
    assert log.latest_checkpoint() is None
    empty = log.checkpoint(LOG_KEY, ORIGIN, now=42)
    assert open_checkpoint(empty, PUBLIC, origin=ORIGIN).size == 0
    log.record("a.b", {}, actor="x")
    note = log.checkpoint(LOG_KEY, ORIGIN, now=43)
    assert log.checkpoint(LOG_KEY, ORIGIN, now=44) == note  # nothing new to sign
    stored = log.checkpoints()
    assert [(c.size, c.created_ms) for c in stored] == [(0, 42), (1, 43)]
    assert log.checkpoint_at(1).note == note
    with pytest.raises(NotFound):
        log.checkpoint_at(7)


def test_cosignatures_are_verified_then_served(log: AuditLog) -> None:
    log.record("a.b", {}, actor="x")
    note = log.checkpoint(LOG_KEY, ORIGIN)
    stored = log.latest_checkpoint()
    assert stored is not None
    checkpoint = open_checkpoint(note, PUBLIC, origin=ORIGIN)
    witness = WITNESS_KEY.public_key()
    forged = cosign(checkpoint, STANDARD.generate_signing_key(), name="w", now=7)
    with pytest.raises(VerificationFailed):
        log.add_cosignature(stored.id, forged, witness_key=witness, log_key=PUBLIC)
    good = cosign(checkpoint, WITNESS_KEY, name="w", now=7)
    assert log.add_cosignature(stored.id, good, witness_key=witness, log_key=PUBLIC) == 7
    with pytest.raises(MalformedInput):
        log.add_cosignature(stored.id, good, witness_key=witness, log_key=PUBLIC)
    served = log.latest_checkpoint()
    assert served is not None
    assert open_cosignature(served.note, witness, name="w") == (checkpoint, 7)
    assert open_checkpoint(served.note, PUBLIC, origin=ORIGIN) == checkpoint
    assert len(Note.parse(served.note).signatures) == 2
    with pytest.raises(NotFound):
        log.add_cosignature(999, good, witness_key=witness, log_key=PUBLIC)


def test_reopen_resumes_the_same_tree(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog.open(path, suite=STANDARD) as log:
        old_note = _build(log, [3, 10, 7])[-1]
        root, size = log.root(), log.size
    with AuditLog.open(path, suite=STANDARD) as log:
        assert (log.root(), log.size) == (root, size)
        new_note = _build(log, [11])[-1]
        old = open_checkpoint(old_note, PUBLIC, origin=ORIGIN)
        new = open_checkpoint(new_note, PUBLIC, origin=ORIGIN)
        verify_consistency(
            old.size, new.size, log.consistency_proof(old.size, new.size), old.root, new.root
        )
        assert log.verify(PUBLIC, ORIGIN).ok


def test_not_an_audit_log_is_malformed(tmp_path: Path) -> None:
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MalformedInput):
        AuditLog.open(bad, suite=STANDARD)
    with pytest.raises(MalformedInput):
        verify_log_file(bad, public_key=PUBLIC, origin=ORIGIN)


# --- tampering --------------------------------------------------------------------------------

TAMPER_SIZE = 200
TARGET = 57


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A log of 200 entries with a checkpoint every 20; returns it and its last checkpoint."""
    path = tmp_path_factory.mktemp("pristine") / "audit.db"
    with AuditLog.open(path, clock=FakeClock(), suite=STANDARD) as log:
        notes = _build(log, [20] * (TAMPER_SIZE // 20))
    return path, notes[-1]


def _tampered(pristine: tuple[Path, bytes], tmp_path: Path, *statements: str) -> Path:
    source, _ = pristine
    path = tmp_path / "tampered.db"
    shutil.copy(source, path)
    raw = sqlite3.connect(path)
    for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        raw.execute(f"DROP TRIGGER {name}")
    for statement in statements:
        raw.execute(statement)
    raw.commit()
    raw.close()
    return path


def _first_problem(path: Path, *trusted: bytes) -> tuple[ProblemKind, int | None, str]:
    report = verify_log_file(path, public_key=PUBLIC, origin=ORIGIN, trusted_checkpoints=trusted)
    assert not report.ok
    problem = report.first_problem
    assert problem is not None
    return problem.kind, problem.index, problem.message


def _row(path: Path, index: int) -> tuple[bytes, bytes]:
    raw = sqlite3.connect(path)
    data, digest = raw.execute(
        "SELECT data, leaf_hash FROM entries WHERE idx = ?", (index,)
    ).fetchone()
    raw.close()
    return bytes(data), bytes(digest)


def test_pristine_log_verifies(pristine: tuple[Path, bytes]) -> None:
    report = verify_log_file(pristine[0], public_key=PUBLIC, origin=ORIGIN)
    assert report.ok and report.size == TAMPER_SIZE
    assert report.checkpoints_verified == TAMPER_SIZE // 20


def test_edited_entry_bytes_are_named(pristine: tuple[Path, bytes], tmp_path: Path) -> None:
    data, _ = _row(pristine[0], TARGET)
    edited = data.replace(b'"actor":"x"', b'"actor":"y"')
    assert edited != data
    path = _tampered(
        pristine, tmp_path, f"UPDATE entries SET data = x'{edited.hex()}' WHERE idx = {TARGET}"
    )
    kind, index, message = _first_problem(path)
    assert (kind, index) == (ProblemKind.ENTRY_EDITED, TARGET)
    assert "edited" in message and str(TARGET) in message


def test_edit_with_recomputed_leaf_hash_is_caught_by_the_checkpoint(
    pristine: tuple[Path, bytes], tmp_path: Path
) -> None:
    data, _ = _row(pristine[0], TARGET)
    edited = data.replace(b'"actor":"x"', b'"actor":"y"')
    digest = hashlib.sha256(b"\x00" + edited).hexdigest()
    path = _tampered(
        pristine,
        tmp_path,
        f"UPDATE entries SET data = x'{edited.hex()}', leaf_hash = x'{digest}' "
        f"WHERE idx = {TARGET}",
    )
    kind, index, message = _first_problem(path)
    assert kind == ProblemKind.CHECKPOINT_MISMATCH
    assert index == 40 and "40..59" in message and "edited" in message


def test_garbled_entry_is_named(pristine: tuple[Path, bytes], tmp_path: Path) -> None:
    path = _tampered(pristine, tmp_path, f"UPDATE entries SET data = x'7b7d' WHERE idx = {TARGET}")
    kind, index, _ = _first_problem(path)
    assert (kind, index) in {
        (ProblemKind.ENTRY_MALFORMED, TARGET),
        (ProblemKind.ENTRY_EDITED, TARGET),
    }


def test_deleted_entry_is_named(pristine: tuple[Path, bytes], tmp_path: Path) -> None:
    path = _tampered(pristine, tmp_path, f"DELETE FROM entries WHERE idx = {TARGET}")
    kind, index, message = _first_problem(path)
    assert (kind, index) == (ProblemKind.ENTRY_DELETED, TARGET)
    assert "deleted" in message


def test_deleted_and_renumbered_entry_is_named(
    pristine: tuple[Path, bytes], tmp_path: Path
) -> None:
    path = _tampered(
        pristine,
        tmp_path,
        f"DELETE FROM entries WHERE idx = {TARGET}",
        f"UPDATE entries SET idx = idx - 1 WHERE idx > {TARGET}",
    )
    kind, index, message = _first_problem(path)
    assert (kind, index) == (ProblemKind.ENTRY_DELETED, TARGET)
    assert "deleted" in message and "renumbered" in message


@pytest.mark.parametrize("other", [TARGET + 1, TARGET + 30])
def test_reordered_entries_are_named(
    pristine: tuple[Path, bytes], tmp_path: Path, other: int
) -> None:
    a, b = _row(pristine[0], TARGET), _row(pristine[0], other)
    path = _tampered(
        pristine,
        tmp_path,
        f"UPDATE entries SET data = x'{b[0].hex()}', leaf_hash = x'{b[1].hex()}' "
        f"WHERE idx = {TARGET}",
        f"UPDATE entries SET data = x'{a[0].hex()}', leaf_hash = x'{a[1].hex()}' "
        f"WHERE idx = {other}",
    )
    kind, index, message = _first_problem(path)
    assert (kind, index) == (ProblemKind.ENTRY_REORDERED, TARGET)
    assert "reordered" in message and str(other) in message


def test_truncated_tail_is_named(pristine: tuple[Path, bytes], tmp_path: Path) -> None:
    path = _tampered(pristine, tmp_path, "DELETE FROM entries WHERE idx >= 150")
    kind, index, message = _first_problem(path)
    assert (kind, index) == (ProblemKind.LOG_TRUNCATED, 150)
    assert "truncated" in message


def test_truncating_checkpoints_too_needs_the_auditors_checkpoint(
    pristine: tuple[Path, bytes], tmp_path: Path
) -> None:
    """A rollback of both tables leaves a self-consistent shorter log: only a checkpoint kept
    outside the file (an auditor's or a witness's) reveals it. This pins that limit."""
    path = _tampered(
        pristine,
        tmp_path,
        "DELETE FROM entries WHERE idx >= 140",
        "DELETE FROM checkpoints WHERE size > 140",
    )
    assert verify_log_file(path, public_key=PUBLIC, origin=ORIGIN).ok
    kind, _, message = _first_problem(path, pristine[1])
    assert kind == ProblemKind.LOG_TRUNCATED and "truncated" in message


def test_forged_checkpoint_is_named(pristine: tuple[Path, bytes], tmp_path: Path) -> None:
    path = _tampered(
        pristine,
        tmp_path,
        "UPDATE checkpoints SET note = CAST(replace(CAST(note AS TEXT), char(10) || '100' || "
        "char(10), char(10) || '101' || char(10)) AS BLOB) WHERE size = 100",
    )
    kind, _, message = _first_problem(path)
    assert kind == ProblemKind.CHECKPOINT_INVALID and "forged" in message


def test_fork_between_checkpoints_is_named(pristine: tuple[Path, bytes], tmp_path: Path) -> None:
    """The node's own key signing a different root at a known size is a fork."""
    checkpoint = parse_checkpoint_unverified(pristine[1])[0]
    fork = sign_checkpoint(
        Checkpoint(ORIGIN, checkpoint.size, hashlib.sha256(b"other").digest()), LOG_KEY
    )
    report = verify_log_file(
        pristine[0], public_key=PUBLIC, origin=ORIGIN, trusted_checkpoints=[fork]
    )
    kinds = {p.kind for p in report.problems}
    assert ProblemKind.CHECKPOINT_FORK in kinds


def test_verify_log_is_pure_over_bytes(pristine: tuple[Path, bytes]) -> None:
    with AuditLog.open(pristine[0], suite=STANDARD) as log:
        rows = [(e.index, e.data, None) for e in log.iter_entries()]
        notes = [c.note for c in log.checkpoints()]
    assert verify_log(rows, notes, public_key=PUBLIC, origin=ORIGIN).ok
    swapped = [rows[1], rows[0], *rows[2:]]
    assert not verify_log(swapped, notes, public_key=PUBLIC, origin=ORIGIN).ok


# --- scale and crash safety -------------------------------------------------------------------


@pytest.mark.slow
def test_clean_log_of_100000_entries_verifies(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    with AuditLog.open(path, suite=STANDARD) as log:
        for batch in range(100):
            log.record_many(
                [
                    Event("protocol.step", {"peer": "node-b", "n": i, "d": b"\x01" * 32}, "m", "q")
                    for i in range(1000)
                ]
            )
            if batch % 10 == 9:
                log.checkpoint(LOG_KEY, ORIGIN)
        assert log.size == 100_000
    report = verify_log_file(path, public_key=PUBLIC, origin=ORIGIN)
    assert report.ok, report.first_problem
    assert report.size == 100_000 and report.checkpoints_verified == 10


CHILD = """
import hashlib, sys
from govshare.node.audit.auditlog import AuditLog
from govshare.model.events import Event
from govshare.protocols.suite import STANDARD
key = STANDARD.signing_key_from_bytes(hashlib.sha256(b"test log key").digest())
log = AuditLog.open(sys.argv[1], suite=STANDARD)
round = 0
while True:
    round += 1
    log.record("rpc.received", {"round": round, "blob": b"x" * 200}, actor="child")
    log.record_many([Event("protocol.step", {"r": round, "i": i}, "child") for i in range(50)])
    if round % 5 == 0:
        log.checkpoint(key, sys.argv[2])
    print(log.size, flush=True)
"""


@pytest.mark.parametrize("kill_after", [0.4, 0.9, 1.7])
def test_kill_9_during_appends_leaves_a_log_that_verifies(
    tmp_path: Path, kill_after: float
) -> None:
    path = tmp_path / "crash.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), ORIGIN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        first = child.stdout.readline()  # the child has committed at least once
        assert first.strip(), child.stderr.read() if child.stderr else ""
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    reported = [int(line) for line in (first + rest).split()]
    with AuditLog.open(path, suite=STANDARD) as log:
        # Every size the child reported was durable before it printed it.
        assert log.size >= reported[-1]
        report = log.verify(PUBLIC, ORIGIN)
        assert report.ok, report.first_problem
        assert report.checkpoints_verified >= 1 or reported[-1] < 255
        log.record("node.restarted", {}, actor="operator:node-a")
        assert log.verify(PUBLIC, ORIGIN).ok


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.data())
def test_random_batches_give_verifying_proofs(
    tmp_path: Path, batches: list[int], data: st.DataObject
) -> None:
    path = tmp_path / f"prop-{time.monotonic_ns()}.db"
    with AuditLog.open(path, suite=STANDARD) as log:
        notes = _build(log, batches)
        new = open_checkpoint(notes[-1], PUBLIC, origin=ORIGIN)
        old = open_checkpoint(data.draw(st.sampled_from(notes)), PUBLIC, origin=ORIGIN)
        index = data.draw(st.integers(0, new.size - 1))
        leaf = log.entries(index, index + 1)[0].leaf_hash
        verify_inclusion(index, new.size, leaf, log.inclusion_proof(index, new.size), new.root)
        if old.size < new.size:
            proof = log.consistency_proof(old.size, new.size)
            verify_consistency(old.size, new.size, proof, old.root, new.root)


def test_two_handles_on_one_file_append_in_turn(tmp_path: Path) -> None:
    """An operator command appends beside the serving node: neither handle loses or clashes."""
    path = tmp_path / "shared.db"
    node_log, operator_log = (
        AuditLog.open(path, suite=STANDARD),
        AuditLog.open(path, suite=STANDARD),
    )
    try:
        indices = []
        for n in range(6):
            writer = node_log if n % 2 == 0 else operator_log
            indices.append(writer.record("test.turn", {"n": n}, actor="a"))
        assert indices == list(range(6))
        assert node_log.size == operator_log.size == 6
        assert node_log.root() == operator_log.root()
        key = STANDARD.generate_signing_key()
        node_log.checkpoint(key, "govshare/test/a")
        result = verify_log_file(path, public_key=key.public_key(), origin="govshare/test/a")
        assert result.ok, result.first_problem
    finally:
        node_log.close()
        operator_log.close()
