"""``govshare audit``: CliRunner against real mTLS nodes, and one real subprocess."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from click.testing import CliRunner, Result
from conftest import FederationFixture

from govshare.cli.main import cli
from govshare.client.auditor import Auditor, make_receipt
from govshare.node.api.server import RunningNode
from govshare.node.node import Node
from govshare.protocols.auditverify import decode_entry, encode_entry
from govshare.protocols.receipt import encode_receipt

NodeFixture = tuple[Node, RunningNode]
OK_LINE = re.compile(
    r"^(tax|civil): OK — [\d,]+ entries( \([\d,]+ new\))?, checkpoint \d+ signed, "
    r"1/1 cosignatures valid \(quorum 1 of 2 other nodes\)$"
)
# The session federation never starts ghost, so a checkpoint can carry one witness cosignature
# of the default majority of two: the commands that check the quorum ask for that one
# (tests/client/test_audit_assurance.py runs the default quorum where every witness runs).
QUORUM_COMMANDS = {"pull", "verify", "verify-export", "verify-receipt"}


def audit(fed: FederationFixture, state: Path | None, *args: str) -> Result:
    """Run ``govshare audit ARGS`` as audra (``state`` None: a command without --state)."""
    where = [] if state is None else ["--state", str(state)]
    quorum = ["--quorum", "1"] if args[0] in QUORUM_COMMANDS else []
    return CliRunner().invoke(
        cli,
        ["audit", *args, "--identity", str(fed.bundles["audra"]), *where, *quorum],
        catch_exceptions=False,
    )


def tamper_local_entry(state: Path, node: str, index: int) -> None:
    db = sqlite3.connect(state / node / "entries.db", isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    (data,) = db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
    entry = decode_entry(data)
    edited = encode_entry(replace(entry, actor="mallory"))
    db.execute("UPDATE entries SET data = ? WHERE idx = ?", (edited, index))
    db.close()


def test_pull_and_verify_print_one_ok_line(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    pulled = audit(fed, tmp_path, "pull", "tax")
    assert pulled.exit_code == 0, pulled.output
    assert OK_LINE.match(pulled.output.strip()), pulled.output
    assert " new)" in pulled.output
    verified = audit(fed, tmp_path, "verify", "tax")
    assert verified.exit_code == 0
    assert OK_LINE.match(verified.output.strip()) and "new" not in verified.output
    as_json = json.loads(audit(fed, tmp_path, "verify", "tax", "--json").output)
    assert as_json["ok"] is True and as_json["verdicts"][0]["node"] == "tax"
    assert as_json["verdicts"][0]["cosignatures_valid"] == ["civil"]


def test_failing_verify_exits_1_with_one_line_per_node(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    assert audit(fed, tmp_path, "pull", "tax").exit_code == 0
    assert audit(fed, tmp_path, "pull", "civil").exit_code == 0
    tamper_local_entry(tmp_path, "tax", 2)
    result = audit(fed, tmp_path, "verify", "--all")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 3
    assert lines[0] == (
        "tax: FAILED — entry 2: bytes do not match the stored leaf hash (edited) (+1 more problem)"
    )
    assert OK_LINE.match(lines[1]) and lines[1].startswith("civil: OK")
    assert lines[2] == "ghost: FAILED — nothing pulled yet; run 'govshare audit pull ghost'"
    as_json = json.loads(audit(fed, tmp_path, "verify", "--all", "--json").output)
    assert as_json["ok"] is False
    assert as_json["verdicts"][0]["problems"][0] == {
        "kind": "entry_edited",
        "index": 2,
        "message": "entry 2: bytes do not match the stored leaf hash (edited)",
    }


def test_failing_verify_as_a_subprocess(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    assert audit(fed, tmp_path, "pull", "tax").exit_code == 0
    tamper_local_entry(tmp_path, "tax", 4)
    result = subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()",
         "audit", "verify", "tax", "--state", str(tmp_path), "--quorum", "1",
         "--identity", str(fed.bundles["audra"])],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "tax: FAILED — entry 4: bytes do not match the stored leaf hash (edited) (+1 more problem)"
    ]
    assert result.stderr == ""


def test_pull_all_reports_the_unreachable_node(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    result = audit(fed, tmp_path, "pull", "--all")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tax", "civil", "ghost"]
    assert OK_LINE.match(lines[0]) and OK_LINE.match(lines[1])
    assert lines[2].startswith("ghost: FAILED — unreachable: node ghost")


def test_pull_needs_a_node_or_all(fed: FederationFixture, tmp_path: Path) -> None:
    result = audit(fed, tmp_path, "pull")
    assert result.exit_code == 2 and "give NODE or --all" in result.output
    both = audit(fed, tmp_path, "pull", "tax", "--all")
    assert both.exit_code == 2 and "not both" in both.output


def test_prove_prints_the_verified_entry(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    index = tax_node[0].audit.record("test.cli.proved", {"n": 1}, actor="tax")
    table = audit(fed, tmp_path, "prove", "tax", str(index))
    assert table.exit_code == 0
    assert "test.cli.proved" in table.output
    assert f"tax: entry {index} inclusion proof verified" in table.output
    as_json = json.loads(audit(fed, tmp_path, "prove", "tax", str(index), "--json").output)
    assert as_json["entry"]["kind"] == "test.cli.proved" and as_json["verified"] is True
    assert as_json["checkpoint"]["size"] > index and as_json["proof"]


def record(node: Node, query_id: str, result: str, request: str = "") -> int:
    index = node.audit.record(
        "query.received",
        {"request_digest": hashlib.sha256((request + query_id).encode()).hexdigest(),
         "participants": ["tax", "civil"]},
        actor="alice",
        query_id=query_id,
    )  # fmt: skip
    node.audit.record(
        "result.released",
        {"recipient": "alice", "result_digest": hashlib.sha256(result.encode()).hexdigest()},
        actor=node.name,
        query_id=query_id,
    )
    return index


def test_show_query_agreement_and_disagreement(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    tax, civil = tax_node[0], civil_node[0]
    record(tax, "cli-agree", "same")
    record(civil, "cli-agree", "same")
    agree = audit(fed, tmp_path, "show", "--query", "cli-agree")
    assert agree.exit_code == 0 and "query cli-agree: nodes agree" in agree.output
    record(tax, "cli-differ", "same", request="one")
    record(civil, "cli-differ", "same", request="other")
    differ = audit(fed, tmp_path, "show", "--query", "cli-differ")
    assert differ.exit_code == 1
    assert "query cli-differ: DISAGREE — request_digest differs" in differ.output
    as_json = json.loads(audit(fed, tmp_path, "show", "--query", "cli-differ", "--json").output)
    assert as_json["agree"] is False
    by_node = {n["node"]: n for n in as_json["nodes"]}
    assert [e["kind"] for e in by_node["civil"]["entries"]] == ["query.received", "result.released"]


def test_export_and_verify_export(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    assert audit(fed, tmp_path / "a", "pull", "tax").exit_code == 0
    bundle = tmp_path / "bundle.json"
    exported = audit(fed, tmp_path / "a", "export", str(bundle))
    assert exported.exit_code == 0 and "exported 1 node log(s)" in exported.output
    checked = audit(fed, tmp_path / "b", "verify-export", str(bundle))
    assert checked.exit_code == 0 and OK_LINE.match(checked.output.strip())
    raw = json.loads(bundle.read_text())
    raw["nodes"]["tax"]["entries"] = raw["nodes"]["tax"]["entries"][:3]
    bundle.write_text(json.dumps(raw))
    truncated = audit(fed, tmp_path / "b", "verify-export", str(bundle))
    assert truncated.exit_code == 1
    assert truncated.output.startswith("tax: FAILED — the log has 3 entries but a signed")


def test_verify_receipt(
    fed: FederationFixture, tax_node: NodeFixture, civil_node: NodeFixture, tmp_path: Path
) -> None:
    auditor = Auditor(fed.identity("audra"), tmp_path / "state")
    index = record(tax_node[0], "cli-receipt", "r")
    proven = auditor.prove("tax", index)
    receipt = make_receipt("cli-receipt", [("tax", proven.entry, index, proven.proof, proven.note)])
    path = tmp_path / "receipt.json"
    path.write_bytes(encode_receipt(receipt))
    ok = audit(fed, None, "verify-receipt", str(path))
    assert ok.exit_code == 0
    assert f"receipt for query cli-receipt: OK — tax entry {index}" in ok.output
    wrong_node = make_receipt(
        "cli-receipt", [("civil", proven.entry, index, proven.proof, proven.note)]
    )
    path.write_bytes(encode_receipt(wrong_node))
    bad = audit(fed, None, "verify-receipt", str(path))
    assert bad.exit_code == 1
    assert bad.output.startswith(f"receipt {path}: FAILED — receipt part 0 (civil, entry {index})")
