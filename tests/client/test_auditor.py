"""The auditor against real nodes over mutual TLS: pull, verify, prove, reconcile, export,
receipts; and a mutation suite against a real node's log file."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import FederationFixture, PsiData, build_federation

from govshare.client.auditor import (
    AuditClient,
    Auditor,
    ProblemType,
    Verdict,
    make_receipt,
    verify_receipt,
)
from govshare.model.events import log_origin
from govshare.node.api.server import RunningNode, create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.node import Node
from govshare.protocols.auditverify import decode_entry, encode_entry
from govshare.protocols.checkpoint import Checkpoint, Note, NoteSignature, sign_checkpoint
from govshare.protocols.errors import (
    MalformedInput,
    NotFound,
    PermissionDenied,
    VerificationFailed,
)
from govshare.protocols.merkle import leaf_hash, verify_inclusion
from govshare.protocols.receipt import (
    Receipt,
    ReceiptPart,
    decode_receipt,
    encode_receipt,
)
from govshare.protocols.suite import STANDARD, SigningKey

NodeFixture = tuple[Node, RunningNode]

# The session federation (and the mutation lab's) enrols three nodes but never starts ghost:
# tax's and civil's checkpoints can carry one witness cosignature, not the default majority of
# two. These tests are about the log itself, so their auditors ask for the one that can exist;
# tests/client/test_audit_assurance.py tests the default quorum on a federation whose witnesses run.
QUORUM = 1


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- against the shared session nodes ----------------------------------------------------------


def test_pull_then_verify_a_clean_log(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    tax, _ = tax_node
    for n in range(12):
        tax.audit.record("test.event", {"n": n}, actor="tax")
    auditor = Auditor(fed.identity("audra"), tmp_path / "state", quorum=QUORUM)
    first = auditor.pull("tax")
    assert first.ok, first.problems
    assert first.signed and first.fetched == first.entries == first.checkpoint_size
    assert first.entries > 12
    assert first.cosignatures_valid == ("civil",) and first.cosignatures_invalid == ()
    second = auditor.pull("tax")  # incremental: only what arrived since
    assert second.ok, second.problems
    assert second.entries == first.entries + second.fetched
    assert 0 < second.fetched < first.entries
    verdict = auditor.verify("tax")
    assert verdict.ok and verdict.entries == second.entries == verdict.checkpoint_size
    assert (tmp_path / "state" / "tax" / "checkpoint.note").is_file()


def test_prove_an_entry_under_the_latest_checkpoint(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    tax, _ = tax_node
    index = tax.audit.record("test.proved", {"what": "prove me"}, actor="tax")
    result = Auditor(fed.identity("audra"), tmp_path / "state").prove("tax", index)
    assert result.decoded.kind == "test.proved" and result.decoded.index == index
    assert result.checkpoint.size > index and result.proof
    verify_inclusion(
        index, result.checkpoint.size, leaf_hash(result.entry), result.proof, result.checkpoint.root
    )
    with pytest.raises(MalformedInput, match="covers entries"):
        Auditor(fed.identity("audra"), tmp_path / "state").prove("tax", 10**9)


def test_unknown_or_non_node_names_are_refused(fed: FederationFixture, tmp_path: Path) -> None:
    auditor = Auditor(fed.identity("audra"), tmp_path / "state")
    with pytest.raises(NotFound):
        auditor.pull("nobody")
    with pytest.raises(MalformedInput, match="not a node"):
        auditor.verify("alice")


def test_unreachable_node_is_a_failed_verdict(fed: FederationFixture, tmp_path: Path) -> None:
    verdict = Auditor(fed.identity("audra"), tmp_path / "state").pull("ghost")
    assert not verdict.ok
    assert verdict.problems[0].kind is ProblemType.UNREACHABLE
    assert "unreachable" in verdict.problems[0].message


def test_verify_before_pull_fails(fed: FederationFixture, tmp_path: Path) -> None:
    verdict = Auditor(fed.identity("audra"), tmp_path / "state").verify("civil")
    assert not verdict.ok and verdict.problems[0].kind is ProblemType.NOT_PULLED


def test_only_auditors_audit(fed: FederationFixture, tax_node: NodeFixture) -> None:
    with pytest.raises(MalformedInput, match="not auditor"):
        Auditor(fed.identity("alice"))
    alice = fed.identity("alice")
    with AuditClient(alice, alice.roster.member("tax")) as client:
        with pytest.raises(PermissionDenied, match="node tax"):
            client.checkpoint()


def record_query(
    node: Node,
    query_id: str,
    *,
    participants: list[str],
    result: str | None = "r1",
    request: str = "request",
) -> int:
    index = node.audit.record(
        "query.received",
        {"request_digest": digest(request + query_id), "participants": participants},
        actor="alice",
        query_id=query_id,
    )
    if result is not None:
        node.audit.record(
            "result.released",
            {"recipient": "alice", "result_digest": digest(result)},
            actor=node.name,
            query_id=query_id,
        )
    return index


def test_show_query_agreement(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    tax, civil = tax_node[0], civil_node[0]
    record_query(tax, "q-agree", participants=["tax", "civil"])
    record_query(civil, "q-agree", participants=["civil", "tax"])
    view = Auditor(fed.identity("audra"), tmp_path / "state").show_query("q-agree")
    assert view.ok, view.disagreements
    by_node = {n.node: n for n in view.nodes}
    assert [e.kind for e in by_node["tax"].entries] == ["query.received", "result.released"]
    assert by_node["civil"].participants == (("civil", "tax"),)
    assert by_node["ghost"].error is not None and not by_node["ghost"].entries


def test_show_query_names_each_disagreement(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    tax, civil = tax_node[0], civil_node[0]
    record_query(tax, "q-differ", participants=["tax", "civil"], request="one")
    record_query(civil, "q-differ", participants=["tax", "civil"], request="other")
    record_query(tax, "q-absent", participants=["tax", "civil"])
    # Different releases by different nodes are normal (PSI); one node, one recipient, two
    # different results is not.
    record_query(tax, "q-twice", participants=["tax", "civil"], result="r1")
    record_query(civil, "q-twice", participants=["tax", "civil"], result="r2")
    civil.audit.record(
        "result.released",
        {"recipient": "alice", "result_digest": digest("r3")},
        actor="civil",
        query_id="q-twice",
    )
    auditor = Auditor(fed.identity("audra"), tmp_path / "state")
    differ = auditor.show_query("q-differ")
    assert not differ.ok
    assert [d for d in differ.disagreements if "differs" in d] == [
        f"request_digest differs (tax: {digest('oneq-differ')[:16]}…; "
        f"civil: {digest('otherq-differ')[:16]}…)"
    ]
    twice = auditor.show_query("q-twice")
    assert twice.disagreements == (
        "civil released different results to alice (two result_digest values)",
    )
    absent = auditor.show_query("q-absent")
    assert absent.disagreements == ("participant civil recorded nothing for this query",)
    assert auditor.show_query("q-never").disagreements == ("no node recorded query q-never",)


def test_export_verifies_offline_and_catches_a_tampered_bundle(
    fed: FederationFixture,
    foreign: FederationFixture,
    tax_node: NodeFixture,
    civil_node: NodeFixture,
    tmp_path: Path,
) -> None:
    auditor = Auditor(fed.identity("audra"), tmp_path / "state", quorum=QUORUM)
    assert auditor.pull("tax").ok and auditor.pull("civil").ok
    bundle = tmp_path / "export.json"
    assert auditor.export(bundle) == ["tax", "civil"]
    # no state, no network
    other = Auditor(fed.identity("audra"), tmp_path / "elsewhere", quorum=QUORUM)
    verdicts = other.verify_export(bundle)
    assert [v.node for v in verdicts] == ["civil", "tax"] and all(v.ok for v in verdicts)

    raw = json.loads(bundle.read_bytes())
    entries = raw["nodes"]["tax"]["entries"]
    entry = json.loads(base64.b64decode(entries[2]))
    entry["actor"] = "mallory"
    entries[2] = base64.b64encode(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode())
    entries[2] = entries[2].decode()
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(raw))
    by_node = {v.node: v for v in other.verify_export(tampered)}
    assert by_node["civil"].ok and not by_node["tax"].ok
    assert by_node["tax"].problems[0].kind is ProblemType.CHECKPOINT_MISMATCH

    raw = json.loads(bundle.read_bytes())
    raw["roster"] = base64.b64encode((foreign.directory / "roster.json").read_bytes()).decode()
    foreign_roster = tmp_path / "foreign.json"
    foreign_roster.write_text(json.dumps(raw))
    with pytest.raises(VerificationFailed):
        other.verify_export(foreign_roster)
    (tmp_path / "junk.json").write_text('{"format": "something else"}')
    with pytest.raises(MalformedInput):
        other.verify_export(tmp_path / "junk.json")


# --- receipts ----------------------------------------------------------------------------------


@pytest.fixture
def receipt(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> Receipt:
    tax, civil = tax_node[0], civil_node[0]
    for _ in range(3):  # so that every proof has at least one hash
        tax.audit.record("test.padding", {}, actor="tax")
        civil.audit.record("test.padding", {}, actor="civil")
    auditor = Auditor(fed.identity("audra"), tmp_path / "receipt-state")
    indices = {
        "tax": record_query(tax, "q-receipt", participants=["tax", "civil"]),
        "civil": record_query(civil, "q-receipt", participants=["tax", "civil"]),
    }
    proven = [auditor.prove(node, index) for node, index in indices.items()]
    return make_receipt("q-receipt", [(p.node, p.entry, p.index, p.proof, p.note) for p in proven])


def test_valid_receipt_verifies(fed: FederationFixture, receipt: Receipt) -> None:
    roster = fed.federation.roster
    parts = verify_receipt(receipt, roster, quorum=QUORUM)
    assert [(p.node, p.entry.kind) for p in parts] == [
        ("tax", "query.received"),
        ("civil", "query.received"),
    ]
    encoded = encode_receipt(receipt)
    assert decode_receipt(encoded) == receipt
    assert len(verify_receipt(encoded, roster, quorum=QUORUM)) == 2


def _with_part(receipt: Receipt, number: int, **changes: object) -> Receipt:
    parts = list(receipt.parts)
    parts[number] = replace(parts[number], **changes)  # type: ignore[arg-type]
    return Receipt(receipt.query_id, tuple(parts))


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def test_tampered_receipts_fail(fed: FederationFixture, receipt: Receipt) -> None:
    roster = fed.federation.roster
    tax = receipt.parts[0]
    entry = json.loads(tax.entry)
    entry["fields"]["request_digest"] = digest("another request")
    edited = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    assert decode_entry(edited).index == tax.index  # still a well-formed entry
    with pytest.raises(VerificationFailed, match="inclusion proof"):
        verify_receipt(_with_part(receipt, 0, entry=edited), roster)
    bad_proof = (_flip(tax.proof[0], 5), *tax.proof[1:])
    with pytest.raises(VerificationFailed, match="inclusion proof"):
        verify_receipt(_with_part(receipt, 0, proof=bad_proof), roster)
    note = Note.parse(tax.checkpoint)
    own = note.signatures[0]
    forged = replace(own, signature=_flip(own.signature, 0))
    forged_note = Note(note.text, (forged, *note.signatures[1:])).encode()
    with pytest.raises(VerificationFailed, match="not signed by tax"):
        verify_receipt(_with_part(receipt, 0, checkpoint=forged_note), roster)
    with pytest.raises(VerificationFailed, match="not signed by civil"):
        verify_receipt(_with_part(receipt, 0, node="civil"), roster)
    with pytest.raises(VerificationFailed, match="another query"):
        verify_receipt(Receipt("q-other", receipt.parts), roster)
    with pytest.raises(VerificationFailed, match="not a node"):
        verify_receipt(_with_part(receipt, 0, node="alice"), roster)


def test_receipt_parsing_is_strict(receipt: Receipt) -> None:
    good = json.loads(encode_receipt(receipt))

    def broken(change: object) -> bytes:
        value = json.loads(json.dumps(good))
        if callable(change):
            change(value)
        return json.dumps(value).encode()

    cases = [
        b"not json",
        b'{"format":"govshare-receipt/1","query_id":"q","parts":[],"format":"x"}',
        broken(lambda v: v.update(extra=1)),
        broken(lambda v: v.update(format="govshare-receipt/2")),
        broken(lambda v: v.update(parts=[])),
        broken(lambda v: v["parts"][0].update(index=True)),
        broken(lambda v: v["parts"][0].update(index=1.0)),
        broken(lambda v: v["parts"][0].update(entry="!!!")),
        broken(lambda v: v["parts"][0].update(entry="YR==")),  # non-canonical: decodes to "a"
        broken(lambda v: v["parts"][0]["proof"].append(base64.b64encode(b"short").decode())),
        broken(lambda v: v["parts"].append(v["parts"][0])),
        broken(lambda v: v["parts"][0].pop("checkpoint")),
    ]
    for case in cases:
        with pytest.raises(MalformedInput):
            decode_receipt(case)
    with pytest.raises(MalformedInput):
        make_receipt("q", [])
    with pytest.raises(TypeError):
        make_receipt("q", [("tax", b"x", 0)])  # type: ignore[list-item]
    assert isinstance(receipt.parts[0], ReceiptPart)


# --- the mutation suite: a separate federation whose log files the tests tamper with ----------


@dataclass
class Lab:
    fed: FederationFixture
    nodes: dict[str, tuple[Node, RunningNode]]
    auditor: Auditor

    def node(self, name: str) -> Node:
        return self.nodes[name][0]

    def audit_db(self, name: str) -> Path:
        return NodeConfig.load(self.fed.node_home(name)).audit_database_path

    def start(self, name: str) -> None:
        config = NodeConfig.load(self.fed.node_home(name))
        node = Node.from_config(config)
        self.nodes[name] = (node, create_server(node, config.listen))

    def stop(self, name: str) -> None:
        node, running = self.nodes.pop(name)
        running.stop(0)
        node.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    fed = build_federation(tmp_path / "lab")
    for name in ("tax", "civil"):
        config = fed.node_home(name) / "node.toml"
        # No background checkpoints: the tests decide exactly when the logs grow.
        text = config.read_text().replace(
            "checkpoint_interval = 10.0", "checkpoint_interval = 3600"
        )
        config.write_text(text)
    lab = Lab(fed, {}, Auditor(fed.identity("audra"), tmp_path / "audit-state", quorum=QUORUM))
    lab.start("tax")
    lab.start("civil")
    for n in range(20):
        lab.node("tax").audit.record("test.event", {"n": n}, actor="tax")
    yield lab
    for name in list(lab.nodes):
        lab.stop(name)


def tamper(path: Path) -> sqlite3.Connection:
    """A raw connection to a log file with its append-only triggers dropped."""
    db = sqlite3.connect(path, isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    return db


def edited_bytes(data: bytes) -> bytes:
    entry = decode_entry(data)
    return encode_entry(replace(entry, fields={**entry.fields, "n": 999}))


def rewrite_log(lab: Lab, name: str, *, keep: int, edit: int | None = None) -> None:
    """Replace a stopped node's log by a fresh, internally consistent one holding its first
    ``keep`` entries (entry ``edit`` changed): what a node rewriting its history produces."""
    path = lab.audit_db(name)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT data FROM entries ORDER BY idx LIMIT ?", (keep,)).fetchall()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    clock_value = [0]
    with AuditLog.open(path, clock=lambda: clock_value[0], suite=STANDARD) as log:
        for (data,) in rows:
            entry = decode_entry(bytes(data))
            fields = dict(entry.fields)
            if entry.index == edit:
                fields["n"] = 999
            clock_value[0] = entry.time_ms
            log.record(entry.kind, fields, actor=entry.actor, query_id=entry.query_id)


def failed(verdict: Verdict, kind: ProblemType) -> str:
    assert not verdict.ok, "the tampering went unnoticed"
    problem = verdict.problems[0]
    assert problem.kind is kind, verdict.problems
    return problem.message


def test_edited_entry_is_named(lab: Lab) -> None:
    db = tamper(lab.audit_db("tax"))
    (data,) = db.execute("SELECT data FROM entries WHERE idx = 7").fetchone()
    db.execute("UPDATE entries SET data = ? WHERE idx = 7", (edited_bytes(data),))
    verdict = lab.auditor.pull("tax")
    message = failed(verdict, ProblemType.ENTRY_EDITED)
    assert verdict.problems[0].index == 7
    assert message.startswith("entry 7: leaf hash mismatch") and "(edited)" in message
    assert lab.auditor.verify("tax").problems[0].kind is ProblemType.NOT_PULLED  # kept nothing


def test_entry_edited_after_verification_is_found_by_recheck(lab: Lab) -> None:
    assert lab.auditor.pull("tax").ok
    db = tamper(lab.audit_db("tax"))
    (data,) = db.execute("SELECT data FROM entries WHERE idx = 3").fetchone()
    db.execute("UPDATE entries SET data = ? WHERE idx = 3", (edited_bytes(data),))
    message = failed(lab.auditor.pull("tax", recheck=True), ProblemType.ENTRY_EDITED)
    assert message.startswith("entry 3: tax now serves other bytes")
    assert lab.auditor.verify("tax").ok  # the auditor's own copy is still the verified one


def test_deleted_entry_is_named(lab: Lab) -> None:
    tamper(lab.audit_db("tax")).execute("DELETE FROM entries WHERE idx = 5")
    verdict = lab.auditor.pull("tax")
    message = failed(verdict, ProblemType.ENTRY_DELETED)
    assert verdict.problems[0].index == 5 and "entries 5..5 are missing (deleted)" in message


def test_reordered_entries_are_named(lab: Lab) -> None:
    db = tamper(lab.audit_db("tax"))
    (four,) = db.execute("SELECT data FROM entries WHERE idx = 4").fetchone()
    (nine,) = db.execute("SELECT data FROM entries WHERE idx = 9").fetchone()
    db.execute("UPDATE entries SET data = ? WHERE idx = 4", (nine,))
    db.execute("UPDATE entries SET data = ? WHERE idx = 9", (four,))
    verdict = lab.auditor.pull("tax")
    message = failed(verdict, ProblemType.ENTRY_REORDERED)
    assert verdict.problems[0].index == 4
    assert message == "entry 4 is stored at position 9 and position 4 holds entry 9 (reordered)"


def test_truncated_tail_is_named(lab: Lab) -> None:
    verified = lab.auditor.pull("tax")
    assert verified.ok and verified.checkpoint_size is not None
    db = tamper(lab.audit_db("tax"))  # the node keeps serving from the truncated file
    db.execute("DELETE FROM entries WHERE idx >= 15")
    db.execute("DELETE FROM nodes WHERE (idx + 1) << level > 15")
    verdict = lab.auditor.pull("tax")
    message = failed(verdict, ProblemType.ROLLBACK)
    assert verdict.problems[0].index == 15
    assert message.startswith("rollback: tax presents a checkpoint of size 16, smaller than")
    assert message.endswith(
        f"(the two agree on entries 0..14 only): entries 15..{verified.checkpoint_size - 1} "
        "were truncated or rolled back"
    )


def test_truncated_local_copy_is_named(lab: Lab) -> None:
    verified = lab.auditor.pull("tax")
    assert verified.ok
    tamper(lab.auditor.state / "tax" / "entries.db").execute("DELETE FROM entries WHERE idx >= 9")
    verdict = lab.auditor.verify("tax")
    message = failed(verdict, ProblemType.LOG_TRUNCATED)
    assert verdict.problems[0].index == 9
    assert message == (
        f"the log has 9 entries but a signed checkpoint commits to {verified.checkpoint_size} "
        "(truncated)"
    )


def test_rollback_to_a_consistent_prefix_is_named(lab: Lab) -> None:
    verified = lab.auditor.pull("tax")
    assert verified.ok and verified.checkpoint_size is not None
    lab.stop("tax")
    rewrite_log(lab, "tax", keep=10)
    lab.start("tax")
    verdict = lab.auditor.pull("tax")
    message = failed(verdict, ProblemType.ROLLBACK)
    assert message == (
        f"rollback: tax presents a checkpoint of size 11, smaller than the checkpoint of size "
        f"{verified.checkpoint_size} the auditor verified (the two agree on entries 0..9 only): "
        f"entries 10..{verified.checkpoint_size - 1} were truncated or rolled back"
    )
    assert len(verdict.evidence) == 2 and all(p.is_file() for p in verdict.evidence)
    assert lab.auditor.verify("tax").ok  # the state still holds what was verified


def test_fork_same_size_different_root_is_named(lab: Lab) -> None:
    verified = lab.auditor.pull("tax")
    assert verified.ok and verified.checkpoint_size is not None
    size = verified.checkpoint_size
    lab.stop("tax")
    # One entry short: the auditor's own GetCheckpoint call brings it back to the same size.
    rewrite_log(lab, "tax", keep=size - 1, edit=3)
    lab.start("tax")
    message = failed(lab.auditor.pull("tax"), ProblemType.CHECKPOINT_FORK)
    assert message.startswith(f"fork: two checkpoints of size {size} signed by tax")
    assert message.endswith("the histories diverge at entry 3")


def test_fork_by_rewritten_history_is_named(lab: Lab) -> None:
    verified = lab.auditor.pull("tax")
    assert verified.ok and verified.checkpoint_size is not None
    lab.stop("tax")
    rewrite_log(lab, "tax", keep=10_000, edit=3)  # every entry kept, entry 3 rewritten
    lab.start("tax")
    message = failed(lab.auditor.pull("tax"), ProblemType.CHECKPOINT_FORK)
    assert f"does not extend the checkpoint of size {verified.checkpoint_size}" in message
    assert message.endswith("history was rewritten; the histories diverge at entry 3)")


def serve_checkpoint(lab: Lab, monkeypatch: pytest.MonkeyPatch, note: bytes) -> None:
    """Make the real tax node answer GetCheckpoint with ``note``."""
    monkeypatch.setattr(lab.node("tax"), "latest_checkpoint", lambda: note)


def tax_note(lab: Lab, key: SigningKey | None = None) -> bytes:
    tax = lab.node("tax")
    origin = log_origin(lab.fed.federation.roster.federation, "tax")
    checkpoint = Checkpoint(origin, tax.audit.size, tax.audit.root())
    return sign_checkpoint(checkpoint, key or lab.fed.identity("tax").signing_key)


def test_forged_checkpoint_signature_is_named(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    note = Note.parse(tax_note(lab))
    own = note.signatures[0]
    forged = Note(note.text, (replace(own, signature=_flip(own.signature, 10)),)).encode()
    serve_checkpoint(lab, monkeypatch, forged)
    message = failed(lab.auditor.pull("tax"), ProblemType.CHECKPOINT_FORGED)
    assert "does not verify under tax's roster key (forged)" in message


def test_checkpoint_signed_by_a_key_not_in_the_roster_is_named(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_checkpoint(lab, monkeypatch, tax_note(lab, STANDARD.generate_signing_key()))
    message = failed(lab.auditor.pull("tax"), ProblemType.CHECKPOINT_UNKNOWN_KEY)
    assert "signed by a key not in the roster" in message


def test_invalid_cosignature_is_named(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    good = lab.node("tax").latest_checkpoint()  # cosigned by civil
    note = Note.parse(good)
    lines: list[NoteSignature] = []
    for sig in note.signatures:
        lines.append(
            replace(sig, signature=_flip(sig.signature, 20)) if sig.name == "civil" else sig
        )
    serve_checkpoint(lab, monkeypatch, Note(note.text, tuple(lines)).encode())
    verdict = lab.auditor.pull("tax")
    assert failed(verdict, ProblemType.COSIGNATURE_INVALID) == (
        "cosignature by civil (does not verify) is invalid"
    )
    assert verdict.signed and verdict.cosignatures_invalid == ("civil (does not verify)",)


def test_verify_names_an_edit_of_the_auditors_own_copy(lab: Lab) -> None:
    assert lab.auditor.pull("tax").ok
    db = tamper(lab.auditor.state / "tax" / "entries.db")
    (data,) = db.execute("SELECT data FROM entries WHERE idx = 6").fetchone()
    db.execute("UPDATE entries SET data = ? WHERE idx = 6", (edited_bytes(data),))
    db.close()
    verdict = lab.auditor.verify("tax")
    message = failed(verdict, ProblemType.ENTRY_EDITED)
    assert verdict.problems[0].index == 6
    assert message == "entry 6: bytes do not match the stored leaf hash (edited)"


def test_verify_refuses_a_state_checkpoint_signed_by_another_key(lab: Lab) -> None:
    assert lab.auditor.pull("tax").ok
    path = lab.auditor.state / "tax" / "checkpoint.note"
    path.write_bytes(tax_note(lab, STANDARD.generate_signing_key()))
    failed(lab.auditor.verify("tax"), ProblemType.CHECKPOINT_UNKNOWN_KEY)


def test_show_query_matches_what_each_node_sent_with_what_its_peer_received(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path
) -> None:
    from conftest import PSI_EPSILON, PURPOSE

    from govshare.client.analyst import run_psi
    from govshare.model.governance import QueryKind
    from govshare.model.query_plan import PsiPlan, Side

    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    outcome = run_psi(fed.identity("alice"), plan)
    auditor = Auditor(fed.identity("audra"), tmp_path / "state")
    honest = auditor.show_query(outcome.query_id)
    assert honest.ok, honest.disagreements
    # A node that logs a message its peer never logged receiving is named.
    psi_data.tax.audit.record(
        "protocol.step",
        {"peer": "civil", "direction": "sent", "phase": "own", "digest": digest("x"), "size": 7},
        actor="tax",
        query_id=outcome.query_id,
    )
    forged = auditor.show_query(outcome.query_id)
    assert forged.disagreements == (
        f"tax logged sending own (7 items, {digest('x')[:16]}…) to civil, "
        "which logged no such message received",
    )
