"""Audit assurance against real mTLS nodes: the witness quorum, the witnesses' refusals, and the
incumbent auditor's sampled re-fetch (issue 10, items 1 and 3).

The federation here enrols four nodes and runs three of them (tax, civil, pension); archive is
enrolled and never started, so the default quorum is a majority of three witnesses (2), which
two running peers meet and one forger's peers deny. Checkpoints are signed on demand only
(``checkpoint_interval`` one hour): the tests decide when a witnessing round runs.

Each forgery runs on a fresh federation: a witness keeps its refusals in its signed log for
good (that is the point), so a federation that saw one forgery would fail the next test's
honest verdicts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

from govshare.cli.audit import refusal_line, verdict_line
from govshare.client.auditor import (
    DEFAULT_SAMPLE,
    QUORUM_WAIT,
    Auditor,
    ProblemType,
    Verdict,
    make_receipt,
    verify_receipt,
)
from govshare.model.governance import Role
from govshare.model.identity import Federation, Identity, init_federation
from govshare.node.api.server import RunningNode, create_server
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig, write_default
from govshare.node.node import Node
from govshare.protocols.auditverify import decode_entry
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import STANDARD

RUNNING = ("tax", "civil", "pension")
DOWN = ("archive",)  # enrolled, never started: a witness that is away
# A forged checkpoint never gains cosignatures, so waiting for them only delays the verdict;
# the CLI test runs the default wait.
FORGED_WAIT = 0.5
QUORUM_LINE = r"\(quorum 2 of 3 other nodes\)"


@dataclass
class Cluster:
    root: Path
    federation: Federation
    bundles: dict[str, Path]
    nodes: dict[str, tuple[Node, RunningNode]]

    def identity(self, name: str) -> Identity:
        return Identity.load(self.bundles[name])

    def node(self, name: str) -> Node:
        return self.nodes[name][0]

    def audit_db(self, name: str) -> Path:
        return NodeConfig.load(self.bundles[name]).audit_database_path

    def start(self, name: str) -> None:
        config = NodeConfig.load(self.bundles[name])
        node = Node.from_config(config)
        self.nodes[name] = (node, create_server(node, config.listen))

    def stop(self, name: str) -> None:
        node, running = self.nodes.pop(name)
        running.stop(0)
        node.close()

    def close(self) -> None:
        for name in list(self.nodes):
            self.stop(name)

    def auditor(
        self,
        state: str,
        *,
        quorum: int | None = None,
        sample: int = DEFAULT_SAMPLE,
        rng: random.Random | None = None,
        quorum_wait: float = QUORUM_WAIT,
    ) -> Auditor:
        return Auditor(
            self.identity("audra"),
            self.root / state,
            quorum=quorum,
            sample=sample,
            rng=rng,
            quorum_wait=quorum_wait,
        )


def build_cluster(root: Path, running: tuple[str, ...], down: tuple[str, ...] = ()) -> Cluster:
    """Enrol ``running`` and ``down`` nodes and an auditor; start the ``running`` nodes, each
    with a few entries witnessed by its running peers."""
    init_federation(root / "federation", "assurance", suite=STANDARD)
    federation = Federation.load(root / "federation")
    bundles: dict[str, Path] = {}
    for name in (*running, *down):
        federation, _ = federation.enrol(
            role=Role.NODE,
            name=name,
            jurisdiction="CN",
            address=f"127.0.0.1:{free_port()}",
            out=root / name,
        )
        bundles[name] = root / name
    federation, _ = federation.enrol(
        role=Role.AUDITOR, name="audra", jurisdiction="CN", out=root / "audra"
    )
    bundles["audra"] = root / "audra"
    for bundle in bundles.values():
        federation.publish_roster(bundle)
    for name in (*running, *down):
        config = write_default(bundles[name], listen=federation.roster.member(name).address)
        config.write_text(
            config.read_text().replace("checkpoint_interval = 10.0", "checkpoint_interval = 3600")
        )
    cluster = Cluster(root, federation, bundles, {})
    try:
        for name in running:
            cluster.start(name)
        for name in running:
            for n in range(40):
                cluster.node(name).audit.record("test.event", {"n": n}, actor=name)
            cluster.node(name).publisher.publish()
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = build_cluster(tmp_path_factory.mktemp("honest"), RUNNING, DOWN)
    yield cluster
    cluster.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    built = build_cluster(tmp_path, RUNNING, DOWN)
    yield built
    built.close()


def others(name: str) -> tuple[str, ...]:
    return tuple(n for n in RUNNING if n != name)


# --- an honest federation ----------------------------------------------------------------------


def test_honest_federation_is_ok_with_the_cosignature_count(honest: Cluster) -> None:
    auditor = honest.auditor("state-honest")
    first = auditor.pull_all(list(RUNNING))
    for verdict in first:
        assert verdict.ok, verdict.problems
        assert verdict.quorum == 2 and verdict.witnesses == 3
        assert sorted(verdict.cosignatures_valid) == sorted(others(verdict.node))
        assert verdict.rechecked == 0 and verdict.refusals == ()  # nothing held yet
        assert re.fullmatch(
            rf"{verdict.node}: OK — [\d,]+ entries \([\d,]+ new\), checkpoint \d+ signed, "
            rf"2/2 cosignatures valid {QUORUM_LINE}",
            verdict_line(verdict),
        ), verdict_line(verdict)
    second = auditor.pull("tax")  # an incumbent: re-fetches a sample of what it holds
    assert second.ok, second.problems
    assert second.rechecked == DEFAULT_SAMPLE
    assert verdict_line(second).endswith(f", {DEFAULT_SAMPLE} held entries re-fetched unchanged")
    verified = auditor.verify_all()
    by_node = {v.node: v for v in verified}
    assert all(by_node[n].ok for n in RUNNING), [by_node[n].problems for n in RUNNING]
    assert by_node["archive"].problems[0].kind is ProblemType.NOT_PULLED
    # The same copies against a quorum no set of running witnesses can meet.
    strict = honest.auditor("state-honest", quorum=3).verify("civil")
    assert not strict.ok and strict.problems[0].kind is ProblemType.QUORUM_MISSING
    assert strict.problems[0].message == (
        f"checkpoint {strict.checkpoint_size} has 2 of the 3 witness cosignatures it needs "
        "(quorum 3 of 3 other nodes)"
    )


def test_receipt_needs_the_quorum(honest: Cluster) -> None:
    tax = honest.node("tax")
    index = tax.audit.record("query.received", {"n": 1}, actor="alice", query_id="q-quorum")
    proven = honest.auditor("state-receipt").prove("tax", index)
    receipt = make_receipt("q-quorum", [proven.receipt_part()])
    roster = honest.federation.roster
    (part,) = verify_receipt(receipt, roster)
    assert part.quorum == 2 and sorted(part.cosignatures_valid) == ["civil", "pension"]
    with pytest.raises(VerificationFailed, match=r"has 2 of the 3 witness cosignatures it needs"):
        verify_receipt(receipt, roster, quorum=3)
    with pytest.raises(MalformedInput, match="quorum 4 is more than the 3 other nodes"):
        verify_receipt(receipt, roster, quorum=4)


def test_cli_quorum_and_json_as_a_subprocess(honest: Cluster) -> None:
    def govshare(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from govshare.cli.main import main; main()", "audit", *args,
             "--identity", str(honest.bundles["audra"]),
             "--state", str(honest.root / "state-cli")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    ok = govshare("pull", "civil", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (civil,) = json.loads(ok.stdout)["verdicts"]
    assert civil["ok"] is True and civil["quorum"] == 2 and civil["witnesses"] == 3
    assert sorted(civil["cosignatures_valid"]) == ["pension", "tax"]
    assert civil["witness_refusals"] == []
    strict = govshare("pull", "tax", "--quorum", "3")
    assert strict.returncode == 1, strict.stderr
    assert re.fullmatch(
        r"tax: FAILED — checkpoint \d+ has 2 of the 3 witness cosignatures it needs "
        r"\(quorum 3 of 3 other nodes\)\n",
        strict.stdout,
    ), strict.stdout
    impossible = govshare("verify", "--quorum", "4")
    assert impossible.returncode == 1
    assert "quorum 4 is more than the 3 other nodes that can cosign" in impossible.stderr


def test_a_federation_of_one_node_has_no_witnesses(tmp_path: Path) -> None:
    solo = build_cluster(tmp_path, ("solo",))
    try:
        verdict = solo.auditor("state").pull("solo")
        assert verdict.ok and verdict.quorum == 0 and verdict.witnesses == 0
        assert verdict.cosignatures_valid == ()
        assert verdict_line(verdict).endswith(
            "0/0 cosignatures valid (no witnesses: a federation of one node, quorum 0)"
        )
        with pytest.raises(MalformedInput, match="quorum 1 is more than the 0 other nodes"):
            solo.auditor("state", quorum=1)
    finally:
        solo.close()


# --- forgeries by an insider with the node's own signing key ----------------------------------


def rewrite_log(path: Path, *, keep: int, edit: int | None = None) -> None:
    """Replace a stopped node's log by a fresh, internally consistent one holding its first
    ``keep`` entries (entry ``edit`` with a field changed): a rewritten history that the node,
    holding its own key, will sign."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT data FROM entries ORDER BY idx LIMIT ?", (keep,)).fetchall()
    remove_database(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # private, as the node's was
    clock = [0]
    with AuditLog.open(path, clock=lambda: clock[0], suite=STANDARD) as log:
        for (data,) in rows:
            entry = decode_entry(bytes(data))
            fields = {**entry.fields, "forged": True} if entry.index == edit else entry.fields
            clock[0] = entry.time_ms
            log.record(entry.kind, fields, actor=entry.actor, query_id=entry.query_id)


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite file (the backup API reads it in one snapshot)."""
    with sqlite3.connect(source) as live, sqlite3.connect(target) as copy:
        live.backup(copy)
    live.close()
    copy.close()


def restart_forged(cluster: Cluster) -> None:
    """Start pension on its forged log and let it run one checkpoint round, as its background
    round would: it signs the forged tree and asks its peers to witness it."""
    cluster.start("pension")
    cluster.node("pension").publisher.publish()


def forged_first_pull(cluster: Cluster, rule: str) -> Verdict:
    """A first-time auditor pulls pension: FAILED for want of the quorum; after it pulls every
    node, pension's verdict also carries its witnesses' refusals, all under ``rule``."""
    auditor = cluster.auditor("first-time", quorum_wait=FORGED_WAIT)
    verdict = auditor.pull("pension")
    assert not verdict.ok, "the forged history was accepted"
    assert verdict.signed  # the insider signed it with pension's own key
    assert verdict.problems[0].kind is ProblemType.QUORUM_MISSING
    assert verdict.problems[0].message == (
        f"checkpoint {verdict.checkpoint_size} has 0 of the 2 witness cosignatures it needs "
        "(quorum 2 of 3 other nodes)"
    )
    assert verdict.entries == 0 and verdict.cosignatures_valid == ()  # nothing was kept
    everyone = {v.node: v for v in auditor.pull_all()}
    for witness in others("pension"):
        assert everyone[witness].ok, everyone[witness].problems
    pension = everyone["pension"]
    assert [p.kind for p in pension.problems] == [
        ProblemType.QUORUM_MISSING,
        ProblemType.WITNESS_REFUSED,
    ]
    assert {r.witness for r in pension.refusals} == {"civil", "tax"}
    assert {r.rule for r in pension.refusals} == {rule}
    # Each refused checkpoint verifies under pension's roster key: signed by the insider.
    assert all(r.node == "pension" and r.checkpoint_signed is True for r in pension.refusals)
    counts = {w: sum(r.witness == w for r in pension.refusals) for w in ("civil", "tax")}
    summary = (
        f"witnesses refused {len(pension.refusals)} of pension's checkpoints: "
        f"civil {counts['civil']} ({rule}), tax {counts['tax']} ({rule})"
    )
    assert pension.problems[1].message == summary
    assert refusal_line(pension) == f"pension: {summary}"
    assert pension.to_json()["witness_refusals"][0]["rule"] == rule
    return pension


def test_edit_and_re_sign_is_refused_and_lacks_the_quorum(cluster: Cluster) -> None:
    path = cluster.audit_db("pension")
    cluster.stop("pension")
    rewrite_log(path, keep=10**9, edit=3)  # every entry kept, entry 3 edited
    restart_forged(cluster)
    forged_first_pull(cluster, "witness.inconsistent")


def test_truncate_and_re_sign_is_refused_and_lacks_the_quorum(cluster: Cluster) -> None:
    path = cluster.audit_db("pension")
    cluster.stop("pension")
    rewrite_log(path, keep=10)
    restart_forged(cluster)
    forged_first_pull(cluster, "witness.rollback")


def test_deleted_database_is_refused_and_lacks_the_quorum(cluster: Cluster) -> None:
    path = cluster.audit_db("pension")
    cluster.stop("pension")
    remove_database(path)  # the node starts again with an empty log
    restart_forged(cluster)
    forged_first_pull(cluster, "witness.rollback")


def test_restored_old_copy_is_refused_and_lacks_the_quorum(cluster: Cluster) -> None:
    path = cluster.audit_db("pension")
    backup = cluster.root / "pension-backup.db"
    copy_database(path, backup)
    pension = cluster.node("pension")
    for n in range(60):
        pension.audit.record("test.later", {"n": n}, actor="pension")
    grown = pension.publisher.publish()  # the witnesses cosign the longer log
    assert "\n— civil ".encode() in grown.note and "\n— tax ".encode() in grown.note
    cluster.stop("pension")
    remove_database(path)
    shutil.copyfile(backup, path)
    path.chmod(0o600)  # restored private, as the node's file was
    restart_forged(cluster)
    forged_first_pull(cluster, "witness.rollback")


def test_cli_shows_the_refusals_of_a_forged_node(cluster: Cluster) -> None:
    path = cluster.audit_db("pension")
    cluster.stop("pension")
    rewrite_log(path, keep=10)
    restart_forged(cluster)
    result = subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()",
         "audit", "pull", "--all", "--identity", str(cluster.bundles["audra"]),
         "--state", str(cluster.root / "cli-state")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "tax",
        "civil",
        "pension",
        "pension",
        "archive",
    ]
    for line in lines[:2]:
        assert re.fullmatch(
            r"(tax|civil): OK — [\d,]+ entries \([\d,]+ new\), checkpoint \d+ signed, "
            rf"2/2 cosignatures valid {QUORUM_LINE}",
            line,
        ), line
    assert re.fullmatch(
        r"pension: FAILED — checkpoint \d+ has 0 of the 2 witness cosignatures it needs "
        r"\(quorum 2 of 3 other nodes\) \(\+1 more problem\)",
        lines[2],
    ), lines[2]
    assert re.fullmatch(
        r"pension: witnesses refused \d+ of pension's checkpoints: "
        r"civil \d+ \(witness\.rollback\), tax \d+ \(witness\.rollback\)",
        lines[3],
    ), lines[3]
    assert lines[4].startswith("archive: FAILED — unreachable")


def test_refusal_index_is_checked_by_verify(cluster: Cluster) -> None:
    path = cluster.audit_db("pension")
    cluster.stop("pension")
    remove_database(path)
    restart_forged(cluster)
    auditor = cluster.auditor("state", quorum_wait=FORGED_WAIT)
    auditor.pull_all()
    civil = auditor.verify("civil")
    assert civil.ok, civil.problems
    state = auditor.state / "civil" / "entries.db"
    db = sqlite3.connect(state, isolation_level=None)
    refused = [r[0] for r in db.execute("SELECT idx FROM refusal_entries ORDER BY idx")]
    assert refused, "civil's copy holds no refusal"
    db.execute("DROP TRIGGER refusal_entries_no_delete")
    db.execute("DELETE FROM refusal_entries WHERE idx = ?", (refused[0],))
    db.close()
    damaged = auditor.verify("civil")
    assert [p.kind for p in damaged.problems] == [ProblemType.STATE_DAMAGED]
    assert damaged.problems[0].index == refused[0]
    # A state folder written before the index existed is indexed when it is opened.
    db = sqlite3.connect(state, isolation_level=None)
    db.execute("DROP TABLE refusal_entries")
    db.close()
    assert auditor.verify("civil").ok
    db = sqlite3.connect(state)
    assert [r[0] for r in db.execute("SELECT idx FROM refusal_entries ORDER BY idx")] == refused
    db.close()


# --- the incumbent auditor's sampled re-fetch --------------------------------------------------

SEED = 20240610
SAMPLE = 8


def tamper(path: Path) -> sqlite3.Connection:
    """A raw connection to a log file with its append-only triggers dropped."""
    db = sqlite3.connect(path, isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    return db


def edit_one_byte(path: Path, index: int) -> None:
    """Change one digit of entry ``index``'s time on disk, nothing else."""
    db = tamper(path)
    (data,) = db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
    data = bytes(data)
    position = data.index(b'"time_ms":') + len(b'"time_ms":') + 1
    digit = data[position : position + 1]
    edited = data[:position] + (b"3" if digit != b"3" else b"4") + data[position + 1 :]
    assert len(edited) == len(data) and edited != data
    db.execute("UPDATE entries SET data = ? WHERE idx = ?", (edited, index))
    db.close()


def test_incumbent_sample_catches_a_byte_edited_on_disk(cluster: Cluster) -> None:
    # Two incumbents of tax: one that re-fetches nothing, one that re-fetches a seeded sample.
    blind = cluster.auditor("blind", sample=0)
    sampler = cluster.auditor("sampler", sample=SAMPLE, rng=random.Random(SEED))
    assert blind.pull("tax").ok
    first = sampler.pull("tax")
    assert first.ok and first.rechecked == 0  # nothing held yet: the rng is not drawn
    # The entries the sampler's next pull re-fetches: its rng draws
    # rng.sample(range(held), sample) once per pull.
    chosen = sorted(random.Random(SEED).sample(range(first.entries), SAMPLE))
    target = chosen[len(chosen) // 2]
    edit_one_byte(cluster.audit_db("tax"), target)  # the node keeps serving
    tax = cluster.node("tax")
    for n in range(6):
        tax.audit.record("test.after", {"n": n}, actor="tax")
    # As in the issue: the node keeps its stored subtree hashes, so its new checkpoint is
    # consistent with the old one and an incumbent that re-reads nothing says OK.
    unnoticed = blind.pull("tax")
    assert unnoticed.ok and unnoticed.fetched >= 6 and unnoticed.rechecked == 0
    verdict = sampler.pull("tax")
    assert not verdict.ok, "the edited entry went unnoticed"
    problem = verdict.problems[0]
    assert problem.kind is ProblemType.ENTRY_EDITED and problem.index == target
    assert problem.message == (
        f"entry {target}: tax now serves other bytes than the entry the auditor verified "
        "(edited, deleted or reordered after verification)"
    )
    assert verdict.fetched == 0 and verdict.entries == first.entries  # nothing new was kept
    assert sampler.verify("tax").ok  # the auditor's copy is still the verified one


def test_secrets_sample_larger_than_the_log_re_fetches_every_entry(cluster: Cluster) -> None:
    auditor = cluster.auditor("whole", sample=10_000)  # the default rng: secrets.SystemRandom
    first = auditor.pull("civil")
    assert first.ok
    edit_one_byte(cluster.audit_db("civil"), first.entries - 1)
    verdict = auditor.pull("civil")
    assert not verdict.ok
    assert verdict.problems[0].kind is ProblemType.ENTRY_EDITED
    assert verdict.problems[0].index == first.entries - 1
