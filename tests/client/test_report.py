"""The periodic assessment report (govshare.client.report, ``govshare audit report``).

Real nodes answer real queries (two noised PSI-CA counts and one refused query whose purpose
carries a ``<script>``); an auditor pulls their logs; the report's figures are compared with
the nodes' own logs and ε ledgers; the page is rendered by a real headless browser (Debian's
chromium, installed by ``make test``), screenshotted and its DOM read back; a log that does not
verify is shown as such, without figures; every value from a log is escaped.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import PSI_EPSILON, PURPOSE, FederationFixture, PsiData

from govshare.client.analyst import run_psi
from govshare.client.auditor import Auditor, Problem, ProblemType, Verdict
from govshare.client.report import (
    NodeLog,
    assess,
    build_report,
    decimal_text,
    render_html,
    summary_text,
    thinned,
    write_html,
)
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.model.risk import Alert, EntryRef, Severity
from govshare.node.node import Node
from govshare.protocols.auditverify import AuditEntry, decode_entry, encode_entry
from govshare.protocols.errors import PolicyRefused
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD

CHROMIUM = Path("/usr/bin/chromium")
# The refused query's purpose: markup that must reach the page as text, never as markup.
PAYLOAD = '<script>document.title="owned"</script><img src=x onerror="alert(1)">'
NODES = ["tax", "civil"]
WIDTH, HEIGHT = 1200, 2000


@dataclass
class Assessed:
    fed: FederationFixture
    data: PsiData
    state: Path
    report: dict[str, Any]
    query_ids: list[str]


@pytest.fixture(scope="module")
def assessed(
    fed: FederationFixture, psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory
) -> Assessed:
    """Two noised PSI-CA counts and one refused query (its purpose is not the grant's: a
    script); the auditor pulls tax's and civil's logs and assesses them."""
    alice = fed.identity("alice")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )  # fmt: skip
    query_ids = [run_psi(alice, plan).query_id for _ in range(2)]
    with pytest.raises(PolicyRefused) as refused:
        run_psi(alice, replace(plan, purpose=PAYLOAD))
    assert refused.value.rule == "grant.purpose"
    state = tmp_path_factory.mktemp("report") / "state"
    # The session federation never starts ghost: one witness cosignature is all that can exist.
    auditor = Auditor(fed.identity("audra"), state, quorum=1)
    for verdict in auditor.pull_all(NODES):
        assert verdict.ok, verdict.problems
    return Assessed(fed, psi_data, state, assess(auditor, NODES), query_ids)


def node_of(a: Assessed, name: str) -> Node:
    return {"tax": a.data.tax, "civil": a.data.civil}[name]


def logged(a: Assessed, name: str) -> list[AuditEntry]:
    """The node's own log, as far as the auditor verified it."""
    size = next(n for n in a.report["nodes"] if n["node"] == name)["entries"]
    return [e.decode() for e in node_of(a, name).audit.iter_entries(0, size)]


# --- the JSON ------------------------------------------------------------------------------------


def test_counts_match_the_nodes_own_logs(assessed: Assessed) -> None:
    report = assessed.report
    assert report["summary"]["verified"] == NODES and report["summary"]["not_verified"] == []
    for name in NODES:
        node = next(n for n in report["nodes"] if n["node"] == name)
        entries = logged(assessed, name)
        assert node["verified"] and node["entries"] == len(entries) == node["entries_in_period"]
        received = [e for e in entries if e.kind == "query.received"]
        released = [e for e in entries if e.kind == "result.released"]
        refused = [
            e
            for e in entries
            if e.kind == "policy.decision" and e.fields.get("allowed") is not True
        ]
        totals = node["totals"]
        assert totals["queries"] == len(received) >= 3
        assert totals["queries_by_kind"] == dict(
            Counter(e.fields.get("kind", "unknown") for e in received)
        )
        assert sum(totals["releases"].values()) == len(released) >= 2
        assert totals["releases"]["exact"] == sum(e.fields.get("exact") is True for e in released)
        assert totals["refusals_by_rule"] == dict(
            Counter(e.fields.get("rule", "unknown") for e in refused)
        )
        assert totals["approvals"] == {
            "granted": sum(e.kind == "approval.granted" for e in entries),
            "denied": sum(e.kind == "approval.denied" for e in entries),
        }
        # The rows add up to the node's totals.
        assert sum(r["queries"] for r in node["activity"]) == totals["queries"]
        assert sum(r["refusals"] for r in node["activity"]) == totals["refusals"]
        # This test's queries: alice's row on the node's dataset holds them and the refusal.
        dataset = "residents" if name == "tax" else "assistance"
        row = next(
            r for r in node["activity"] if r["dataset"] == dataset and r["analyst"] == "alice"
        )
        ids = {e.query_id for e in received}
        assert set(assessed.query_ids) <= ids
        assert row["queries_by_kind"]["psi_cardinality"] >= 3
        assert row["releases"]["noised"] >= 2
        assert row["refusals_by_rule"]["grant.purpose"] >= 1
        assert {"purpose": PAYLOAD, "queries": 1} in row["purposes"]
        assert any(p["purpose"] == PURPOSE for p in row["purposes"])


def test_epsilon_spent_equals_the_nodes_budgets(assessed: Assessed) -> None:
    # Pulled again right before the nodes' ledgers are read: whatever ran since is in both.
    auditor = Auditor(assessed.fed.identity("audra"), assessed.state, quorum=1)
    assert all(v.ok for v in auditor.pull_all(NODES))
    report = assess(auditor, NODES)
    ledgers = {(x["node"], x["analyst"], x["dataset"]): x for x in report["epsilon_ledgers"]}
    compared = 0
    for name in NODES:
        for analyst, dataset, budget in node_of(assessed, name).query_store.ledger():
            ledger = ledgers.get((name, analyst, dataset))
            spent = ledger["spent_total"] if ledger else "0"
            reserved = ledger["reserved"] if ledger else "0"
            assert spent == decimal_text(budget.spent), (name, analyst, dataset)
            assert reserved == decimal_text(budget.reserved), (name, analyst, dataset)
            compared += 1
    assert compared >= 2
    alice = ledgers[("tax", "alice", "residents")]
    assert float(alice["spent"]) >= 2 * PSI_EPSILON
    # The step chart's points: one per spent reservation, cumulative, in time order.
    points = alice["points"]
    assert [float(v) for _, v in points] == sorted(float(v) for _, v in points)
    assert points[-1][1] == alice["spent_total"]
    assert [t for t, _ in points] == sorted(t for t, _ in points)


def test_since_counts_only_the_period_and_keeps_what_was_spent_before(
    assessed: Assessed,
) -> None:
    auditor = Auditor(assessed.fed.identity("audra"), assessed.state, quorum=1)
    later = int(time.time() * 1000) + 60_000
    report = assess(auditor, NODES, since_ms=later, now_ms=later + 60_000)
    assert report["period"]["since_ms"] == later
    assert report["totals"]["queries"] == report["totals"]["refusals"] == 0
    assert report["totals"]["epsilon"]["spent"] == "0"
    before = {
        (x["node"], x["analyst"], x["dataset"]): x for x in assessed.report["epsilon_ledgers"]
    }
    for ledger in report["epsilon_ledgers"]:
        key = (ledger["node"], ledger["analyst"], ledger["dataset"])
        assert ledger["spent_before"] == before[key]["spent_total"] and ledger["points"] == []


def tamper(state: Path, node: str, index: int) -> None:
    """Edit one entry of the auditor's copy of ``node``'s log (triggers dropped)."""
    db = sqlite3.connect(state / node / "entries.db", isolation_level=None)
    for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        db.execute(f"DROP TRIGGER {trigger}")
    (data,) = db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
    edited = encode_entry(replace(decode_entry(data), actor="mallory"))
    db.execute("UPDATE entries SET data = ? WHERE idx = ?", (edited, index))
    db.close()


def test_a_log_that_does_not_verify_is_shown_without_figures(
    assessed: Assessed, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(assessed.state, state)
    tamper(state, "civil", 3)
    report = assess(Auditor(assessed.fed.identity("audra"), state, quorum=1), [*NODES, "ghost"])
    nodes = {n["node"]: n for n in report["nodes"]}
    assert report["summary"]["verified"] == ["tax"]
    assert report["summary"]["not_verified"] == ["civil", "ghost"]
    for name in ("civil", "ghost"):
        assert not nodes[name]["verified"]
        assert nodes[name]["totals"] is None and nodes[name]["activity"] == []
    assert nodes["civil"]["verification"]["problems"][0]["index"] == 3
    assert nodes["ghost"]["verification"]["problems"][0]["kind"] == "not_pulled"
    # Nothing of civil's copy is counted: only tax's figures remain, and no ledger of civil.
    assert report["totals"] == nodes["tax"]["totals"]
    assert {x["node"] for x in report["epsilon_ledgers"]} == {"tax"}
    page = render_html(report)
    assert page.count('class="failed-row"') == 2
    assert "NOT verified, figures omitted: civil, ghost." in page
    assert "entry 3: bytes do not match" in page


# --- the fold, over a log built by hand -----------------------------------------------------------

T0 = 1_750_000_000_000  # unix ms: the built log's clock starts here
KEY = STANDARD.generate_signing_key()


class HandLog:
    """Entries as the nodes write them (fields as QueryEngine, approvals and settle record)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.entries: list[AuditEntry] = []

    def add(self, at: int, kind: str, actor: str, qid: str | None, /, **fields: object) -> None:
        entry = AuditEntry(len(self.entries), T0 + at * 1000, kind, actor, qid, fields)
        self.entries.append(entry)

    def query(self, at: int, qid: str, analyst: str, purpose: str, epsilon: str | None) -> None:
        body = {"kind": "psi_cardinality", "purpose": purpose}
        request = sign_request(
            KEY, analyst=analyst, kind="psi_cardinality", body=body, now=T0 // 1000
        ).encode()
        self.add(at, "query.received", analyst, qid, request=request, kind="psi_cardinality")
        fields: dict[str, object] = {"dataset": "residents", "allowed": epsilon is not None}
        if epsilon is None:
            fields.update(rule="grant.purpose", message="not the grant's purpose")
        else:
            fields.update(rule="allowed", epsilon=epsilon, exact=epsilon == "0")
        self.add(at, "policy.decision", analyst, qid, **fields)


def hand_log() -> HandLog:
    log = HandLog("tax")
    log.add(0, "grant.created", "operator:tax", None, grant_id="g1")
    log.query(1, "q1", "alice", "review", "0.5")  # noised release, spent
    log.add(2, "result.released", "tax", "q1", recipient="alice", exact=False)
    log.add(2, "budget.settled", "tax", "q1", reservation="spent", reason="released")
    log.query(3, "q2", "alice", "review", "0")  # exact release after approval: ε 0
    log.add(4, "approval.granted", "operator:tax", "q2", dataset="residents", analyst="alice")
    log.add(5, "result.released", "tax", "q2", recipient="alice", exact=True)
    log.add(5, "budget.settled", "tax", "q2", reservation="spent", reason="released")
    log.query(6, "q3", "alice", "review", "1")  # denied: its ε is returned, never spent
    log.add(
        7, "approval.denied", "operator:tax", "q3", dataset="residents", analyst="alice",
        reservation="returned",
    )  # fmt: skip
    log.query(8, "q4", "bob", "<b>curiosity</b>", None)  # refused at admission
    log.query(9, "q5", "alice", "review", "0.25")  # refused on the data: spent
    log.add(
        10, "policy.decision", "tax", "q5", dataset="residents", allowed=False,
        rule="filter.overlap", message="overlaps an earlier exact release",
    )  # fmt: skip
    log.add(10, "query.failed", "tax", "q5", reason="refused", released=False)
    log.add(10, "budget.settled", "tax", "q5", reservation="spent", reason="refused on the data")
    log.query(11, "q6", "alice", "review", "2")  # still running: reserved
    log.query(12, "q7", "alice", "review", "0.5")  # recovered after a restart: spent
    log.add(13, "budget.recovered", "tax", "q7", reservation="spent", state="done")
    log.add(14, "budget.settled", "tax", "q7", reservation="returned", reason="twice")  # ignored
    return log


def hand_report(since_ms: int | None) -> dict[str, Any]:
    log = hand_log()
    verified = Verdict("tax", "verify", len(log.entries), len(log.entries), True)
    broken = Verdict(
        "civil", "verify", 9, 9, True,
        problems=(Problem(ProblemType.ENTRY_EDITED, 4, "entry 4: <edited>"),),
    )  # fmt: skip
    high = Alert(
        rule="release.without_decision", severity=Severity.HIGH, node="tax",
        detail="released query q9 to <alice>", entries=(EntryRef("tax", 3),),
        time_ms=T0 + 5000, key="k", analyst="alice", dataset="residents",
    )  # fmt: skip
    return build_report(
        [NodeLog(verified, log.entries), NodeLog(broken, None)], [high],
        federation="hand", auditor="audra", since_ms=since_ms, now_ms=T0 + 20_000,
    )  # fmt: skip


def test_what_counts_where_over_a_log_built_by_hand() -> None:
    report = hand_report(None)
    tax, civil = report["nodes"]
    assert not civil["verified"] and civil["totals"] is None
    assert report["summary"] == {
        "nodes": ["tax", "civil"], "verified": ["tax"], "not_verified": ["civil"],
        "alerts": {"HIGH": 1, "MEDIUM": 0, "LOW": 0},
    }  # fmt: skip
    rows = {(r["dataset"], r["analyst"]): r for r in tax["activity"]}
    assert set(rows) == {("residents", "alice"), ("residents", "bob")}
    alice, bob = rows["residents", "alice"], rows["residents", "bob"]
    assert alice["queries"] == 6 and bob["queries"] == 1
    assert alice["releases"] == {"exact": 1, "noised": 1, "other": 0}
    assert alice["refusals_by_rule"] == {"filter.overlap": 1}
    assert bob["refusals_by_rule"] == {"grant.purpose": 1}
    assert alice["approvals"] == {"granted": 1, "denied": 1}
    assert alice["epsilon"] == {
        "spent": "1.25", "spent_before": "0", "spent_total": "1.25", "reserved": "2",
        "returned": "1",
    }  # fmt: skip
    assert alice["purposes"] == [{"purpose": "review", "queries": 6}]
    (ledger,) = report["epsilon_ledgers"]
    assert ledger["points"] == [[T0 + 2000, "0.5"], [T0 + 10_000, "0.75"], [T0 + 13_000, "1.25"]]
    assert report["totals"]["queries"] == 7 and report["totals"]["refusals"] == 2
    page = render_html(report)
    assert_inert(page)
    assert 'class="row-high"' in page and '<span class="badge sev-high">HIGH</span>' in page
    assert "released query q9 to &lt;alice&gt;" in page and "&lt;b&gt;curiosity" in page
    assert "entry 4: &lt;edited&gt;" in page and page.count('class="failed-row"') == 1


def test_since_splits_what_was_spent_before_the_period() -> None:
    report = hand_report(T0 + 9000)
    (alice,) = report["nodes"][0]["activity"]  # bob's refusal came before the period
    assert alice["analyst"] == "alice" and alice["queries"] == 3  # q5, q6, q7
    assert alice["releases"] == {"exact": 0, "noised": 0, "other": 0}
    assert alice["refusals_by_rule"] == {"filter.overlap": 1}
    assert alice["approvals"] == {"granted": 0, "denied": 0}
    assert alice["epsilon"] == {
        "spent": "0.75", "spent_before": "0.5", "spent_total": "1.25", "reserved": "2",
        "returned": "0",
    }  # fmt: skip
    assert report["epsilon_ledgers"][0]["points"] == [[T0 + 10_000, "0.75"], [T0 + 13_000, "1.25"]]
    assert report["nodes"][0]["entries_in_period"] == sum(
        e.time_ms >= T0 + 9000 for e in hand_log().entries
    )
    assert summary_text(report).startswith("Period: 2025-06-15 15:06 UTC to 2025-06-15 15:07 UTC.")


def test_a_long_ledger_is_thinned_for_its_chart_keeping_its_last_point() -> None:
    series = [(T0 + n * 7, Fraction(n, 4)) for n in range(1, 5001)]
    kept = thinned(series, 400)
    assert 300 <= len(kept) <= 400 and kept[-1] == series[-1]
    assert kept == sorted(kept) and set(kept) <= set(series)
    assert thinned(series[:10], 400) == series[:10]


# --- escaping ------------------------------------------------------------------------------------


class Tags(HTMLParser):
    """Every start tag of a page, with its attributes, and the text of each script block."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data


def parsed(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    tags.close()
    return tags


def assert_inert(page: str) -> Tags:
    """The page holds one script element, the JSON data block, and no event handler, image
    or frame: nothing any log value could have injected runs."""
    tags = parsed(page)
    scripts = [attrs for tag, attrs in tags.tags if tag == "script"]
    assert scripts == [{"type": "application/json", "id": "report-data"}]
    assert not [t for t, _ in tags.tags if t in ("img", "iframe", "object", "embed", "link")]
    assert not [(t, k) for t, attrs in tags.tags for k in attrs if k.startswith("on")]
    return tags


def poisoned(value: Any, payload: str) -> Any:
    """``value`` with the payload appended to every text a log or a roster could set (names,
    rules, kinds, purposes, details, messages), as dict keys too."""
    numeric = {"spent", "spent_before", "spent_total", "reserved", "returned", "points",
               "severity"}  # fmt: skip
    if isinstance(value, dict):
        return {
            (k if k in numeric or not isinstance(k, str) or k.isidentifier() else k + payload): (
                v if k in numeric else poisoned(v, payload)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [poisoned(v, payload) for v in value]
    if isinstance(value, str):
        return value + payload
    return value


def test_every_value_from_a_log_is_escaped(assessed: Assessed) -> None:
    page = render_html(assessed.report)
    tags = assert_inert(page)
    assert "&lt;script&gt;document.title=&quot;owned&quot;&lt;/script&gt;" in page
    # The embedded JSON is the report, and cannot close its script block.
    (data,) = tags.scripts
    assert "</" not in data and json.loads(data) == assessed.report
    # Every text field and key poisoned (analysts', datasets', nodes', rules' names too).
    report = poisoned(assessed.report, PAYLOAD)
    report["queries_by_kind_extra"] = {PAYLOAD: 1}
    for node in report["nodes"]:
        for row in node["activity"]:
            row["refusals_by_rule"][PAYLOAD] = 1
            row["queries_by_kind"][PAYLOAD] = 1
    assert report["nodes"][0]["activity"][0]["analyst"].endswith(PAYLOAD)
    evil = render_html(report)
    assert_inert(evil)
    assert evil.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") > 10


# --- the page in a real browser ------------------------------------------------------------------


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: 'make test' installs it (apt-get install chromium as root)"
        )
    return subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", *args,
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def page(assessed: Assessed, tmp_path: Path) -> Iterator[Path]:
    """The report page with ghost listed (never pulled: shown NOT verified)."""
    auditor = Auditor(assessed.fed.identity("audra"), assessed.state, quorum=1)
    path = tmp_path / "report.html"
    write_html(path, assess(auditor, [*NODES, "ghost"]))
    yield path


def test_the_page_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = chromium(
        tmp_path / "profile-shot", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
        page.as_uri(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and png_size(shot) == (WIDTH, HEIGHT)
    assert shot.stat().st_size > 40_000  # a blank 1200 x 2000 page compresses to ~10 kB
    dom = chromium(tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    tags = assert_inert(dom.stdout)
    classes = [attrs.get("class") or "" for tag, attrs in tags.tags if tag == "svg"]
    for chart in ("chart-queries", "chart-refusals", "chart-releases", "chart-epsilon"):
        assert any(chart in c for c in classes), classes
    bars = [a for t, a in tags.tags if t == "rect" and a.get("class") == "bar"]
    assert len(bars) >= 3
    assert [a for t, a in tags.tags if t == "path" and a.get("class") == "series"]
    assert '<p class="summary" id="summary">Period: the start of the logs' in dom.stdout
    assert "2 of 3 node logs verified; NOT verified, figures omitted: ghost." in dom.stdout
    assert "HIGH" in dom.stdout and "NOT VERIFIED" in dom.stdout
    # The analyst's script is text on the page, and it did not run.
    assert "&lt;script&gt;document.title" in dom.stdout
    assert "<title>Security assessment report" in dom.stdout and "owned" not in parsed_title(
        dom.stdout
    )


def parsed_title(dom: str) -> str:
    start = dom.index("<title>") + len("<title>")
    return dom[start : dom.index("</title>")]


# --- the command ---------------------------------------------------------------------------------


def govshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_audit_report_as_a_subprocess(assessed: Assessed, tmp_path: Path) -> None:
    audra = ["--state", str(assessed.state), "--identity", str(assessed.fed.bundles["audra"])]
    out = tmp_path / "report.html"
    result = govshare(
        "audit", "report", *NODES, "--quorum", "1", "--out", str(out), "--json", *audra
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    tags = parsed(out.read_text(encoding="utf-8"))
    assert json.loads(tags.scripts[0]) == printed  # the page's data is what --json prints
    assert printed["summary"] == assessed.report["summary"]
    assert printed["totals"]["queries"] >= assessed.report["totals"]["queries"]
    # Every node of the roster: ghost was never pulled, so the report says so and exits 1.
    text = govshare("audit", "report", "--all", "--quorum", "1", "--out", str(out), *audra)
    assert text.returncode == 1, text.stderr
    first, second = text.stdout.splitlines()
    assert "2 of 3 node logs verified; NOT verified, figures omitted: ghost." in first
    assert second == f"report written to {out}"
    assert "ghost" in out.read_text(encoding="utf-8")
    neither = govshare("audit", "report", *audra)
    assert neither.returncode == 2 and "--out FILE, --json, or both" in neither.stderr
    since = govshare(
        "audit", "report", *NODES, "--quorum", "1", "--since", "2999-01-01", "--json", *audra
    )
    assert since.returncode == 0, since.stderr
    assert json.loads(since.stdout)["totals"]["queries"] == 0
