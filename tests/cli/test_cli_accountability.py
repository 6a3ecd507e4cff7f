"""Named people and accountability (issue 11), end to end with real ``govshare`` processes:
two node processes serving over mutual TLS, their named operators, an analyst, an auditor.

Access applications (item 3): the analyst applies, the operator sees the time left and answers;
a refusal needs a reason; the analyst reads every node's answers; an application left past its
deadline is an alert in ``audit check``. The rights register (item 4) from the verified logs
matches the nodes' own grant stores, and leaves out a copy edited after its pull. The
responsibility list (item 5) names each person with their last signed act. Incident controls
(item 6): a freeze stops every query, one waiting for approval included, each freeze is logged
with the person and reason and reported by ``audit check``; a suspended member is refused by
every node once the roster is handed out.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from conftest import FederationFixture, build_federation, serve_node

from govshare.model.governance import QueryKind
from govshare.model.operator_act import OperatorAct, verify_act
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.policy.grants import GrantStore
from govshare.protocols.auditverify import decode_entry, encode_entry
from govshare.protocols.errors import GovshareError, PolicyRefused
from govshare.protocols.signed_request import sign_request
from govshare.protocols.suite import STANDARD
from govshare.rpc.client import NodeClient

IDS = [resident_id.make("320102", date(1955 + i, 1 + i % 12, 1 + i % 28), i) for i in range(40)]
PURPOSE = "housing subsidy review"
BASIS = "Regulation on Government Information Sharing, art. 12"


@dataclass
class Running:
    fed: FederationFixture
    root: Path

    def home(self, node: str) -> str:
        return str(self.fed.node_home(node))


def govshare(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GOVSHARE_OPERATOR"}
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip


def ok(*args: str) -> str:
    result = govshare(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def ok_json(*args: str) -> object:
    return json.loads(ok(*args, "--json"))


def entries(home: str) -> list[tuple[str, str, dict[str, object]]]:
    with AuditLog.open(NodeConfig.load(Path(home)).audit_database_path, suite=STANDARD) as log:
        return [(e.kind, e.actor, dict(e.fields)) for e in (x.decode() for x in log.iter_entries())]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """tax (5 working days to answer) and civil (0: overdue at once) serving, each with a
    dataset 'people' registered by its named operator."""
    root = tmp_path_factory.mktemp("accountability")
    fed = build_federation(root, "accfed")
    csv = root / "people.csv"
    csv.write_text(
        "id_number,amount,notes\n" + "".join(f"{k},{i},n{i}\n" for i, k in enumerate(IDS))
    )
    for node, days in (("tax", 5), ("civil", 0)):
        config = fed.node_home(node) / "node.toml"
        config.write_text(
            config.read_text()
            .replace("application_deadline_days = 5", f"application_deadline_days = {days}")
            .replace("checkpoint_interval = 10.0", "checkpoint_interval = 1.0")
        )
        ok(
            "dataset", "add", str(csv), "--home", str(fed.node_home(node)), "--name", "people",
            "--grade", "general", "--sharing", "conditional", "--owner-kind", "individual",
            "--owner", "residents (in trust)", "--column", "id_number=join_key:resident_id",
            "--column", "amount=aggregate", "--column", "notes=deny",
            "--identity", fed.operator(node),
        )  # fmt: skip
    processes = [serve_node(fed.node_home(node)) for node in ("tax", "civil")]
    try:
        yield Running(fed, root)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


def apply(running: Running, node: str, *extra: str, columns: str = "id_number,amount") -> object:
    return ok_json(
        "grant", "request", "--identity", str(running.fed.bundles["alice"]), "--node", node,
        "--dataset", "people", "--columns", columns, "--kinds", "psi_cardinality",
        "--purpose", PURPOSE, "--legal-basis", BASIS, *extra,
    )  # fmt: skip


def mine(running: Running) -> dict[str, Any]:
    found = ok_json("grant", "mine", "--identity", str(running.fed.bundles["alice"]))
    assert isinstance(found, dict)
    return found


# ------------------------------------------------------------------ item 3: access applications


def test_an_application_is_answered_by_a_named_operator(running: Running) -> None:
    asked = apply(running, "tax")
    assert isinstance(asked, dict)
    assert (asked["state"], asked["node"], asked["columns"]) == (
        "pending",
        "tax",
        ["amount", "id_number"],
    )
    # Five working days: at least five calendar days, at most nine.
    assert 5 * 86400 <= asked["deadline_at"] - asked["received_at"] <= 9 * 86400
    request_id = str(asked["request_id"])

    listed = ok_json("grant", "requests", "--home", running.home("tax"))
    assert isinstance(listed, list)
    [waiting] = [a for a in listed if a["request_id"] == request_id]
    assert (waiting["applicant"], waiting["overdue"], waiting["legal_basis"]) == (
        "alice",
        False,
        BASIS,
    )
    table = ok("grant", "requests", "--home", running.home("tax"))
    # The time left, to the hour: whole days less the seconds since it was received (or
    # whole days, listed within the same second), whatever the weekday the test runs on.
    days = (asked["deadline_at"] - asked["received_at"]) // 86400
    assert request_id in table
    assert f"{days - 1}d 23h" in table or f"{days}d 0h" in table, table

    approved = ok_json(
        "grant", "approve", request_id[:10], "--home", running.home("tax"), "--epsilon", "2",
        "--expires", "2099-12-31", "--identity", running.fed.operator("tax"),
    )  # fmt: skip
    assert isinstance(approved, dict)
    grant = approved["grant"]
    assert (grant["grantee"], grant["granted_by"], grant["epsilon"]) == ("alice", "op-tax", "2")
    assert grant["columns"] == ["amount", "id_number"] and grant["purpose"] == PURPOSE
    stored = GrantStore(NodeConfig.load(Path(running.home("tax"))).database_path)
    assert stored.get(grant["grant_id"]).granted_by == "op-tax"

    again = govshare(
        "grant", "approve", request_id, "--home", running.home("tax"),
        "--identity", running.fed.operator("tax"),
    )  # fmt: skip
    assert again.returncode == 1 and "approved by op-tax" in again.stderr

    found = mine(running)
    [answer] = [a for a in found["applications"] if a["request_id"] == request_id]
    assert (answer["state"], answer["answered_by"], answer["grant_id"]) == (
        "approved",
        "op-tax",
        grant["grant_id"],
    )
    assert [g["grant_id"] for g in found["grants"] if g["node"] == "tax"] == [grant["grant_id"]]
    assert found["unreachable"] == {"ghost": found["unreachable"]["ghost"]}  # never started

    kinds = [(k, a) for k, a, _ in entries(running.home("tax")) if k.startswith("application.")]
    assert kinds[-2:] == [("application.received", "alice"), ("application.approved", "op-tax")]


def test_a_refusal_needs_a_reason(running: Running) -> None:
    asked = apply(running, "civil")
    assert isinstance(asked, dict)
    request_id = str(asked["request_id"])
    home = running.home("civil")
    operator = running.fed.operator("civil")
    missing = govshare("grant", "refuse", request_id, "--home", home, "--identity", operator)
    assert missing.returncode == 2 and "--reason" in missing.stderr
    blank = govshare(
        "grant", "refuse", request_id, "--home", home, "--reason", "  ", "--identity", operator
    )
    assert blank.returncode == 1 and "needs a reason" in blank.stderr
    assert [a["state"] for a in mine(running)["applications"]
            if a["request_id"] == request_id] == ["pending"]  # fmt: skip

    refused = ok_json(
        "grant", "refuse", request_id, "--home", home, "--reason",
        "the legal basis does not cover individual data", "--identity", operator,
    )  # fmt: skip
    assert isinstance(refused, dict)
    assert (refused["state"], refused["answered_by"]) == ("refused", "op-civil")
    [answer] = [a for a in mine(running)["applications"] if a["request_id"] == request_id]
    assert answer["reason"] == "the legal basis does not cover individual data"


def test_an_application_for_a_deny_column_or_signed_by_another_is_refused(
    running: Running,
) -> None:
    denied = govshare(
        "grant", "request", "--identity", str(running.fed.bundles["alice"]), "--node", "tax",
        "--dataset", "people", "--columns", "notes", "--kinds", "psi_cardinality",
        "--purpose", PURPOSE, "--legal-basis", BASIS,
    )  # fmt: skip
    assert denied.returncode == 1 and "'deny'" in denied.stderr
    # An operator is no analyst: only analysts may apply.
    operator = govshare(
        "grant", "request", "--identity", running.fed.operator("tax"), "--node", "tax",
        "--dataset", "people", "--columns", "amount", "--kinds", "psi_cardinality",
        "--purpose", PURPOSE, "--legal-basis", BASIS,
    )  # fmt: skip
    assert operator.returncode == 1 and "not analyst" in operator.stderr


def test_an_unanswered_application_past_its_deadline_is_an_alert(
    running: Running, tmp_path: Path
) -> None:
    asked = apply(running, "civil", columns="amount")
    assert isinstance(asked, dict)
    request_id = str(asked["request_id"])
    listed = ok_json("grant", "requests", "--home", running.home("civil"))
    assert isinstance(listed, list)
    assert [a["overdue"] for a in listed if a["request_id"] == request_id] == [True]
    audra = str(running.fed.bundles["audra"])
    ok("audit", "pull", "civil", "--identity", audra, "--state", str(tmp_path), "--quorum", "1")
    checked = govshare(
        "audit", "check", "civil", "--identity", audra, "--state", str(tmp_path), "--json"
    )
    alerts = json.loads(checked.stdout)
    overdue = [a for a in alerts if a["rule"] == "application.overdue"]
    assert any(request_id in a["detail"] and a["analyst"] == "alice" for a in overdue), alerts


# ------------------------------------------------------------------ item 4: the rights register


def pull(running: Running, state: Path) -> str:
    audra = str(running.fed.bundles["audra"])
    for node in ("tax", "civil"):
        ok("audit", "pull", node, "--identity", audra, "--state", str(state), "--quorum", "1")
    return audra


def test_the_rights_register_from_the_logs_matches_the_grant_stores(
    running: Running, tmp_path: Path
) -> None:
    # A grant issued directly and one revoked, besides those applications produced.
    issued = ok_json(
        "grant", "add", "--home", running.home("civil"), "--dataset", "people", "--grantee",
        "hkana", "--purpose", PURPOSE, "--columns", "id_number", "--kinds", "psi_cardinality",
        "--expires", "2099-01-01", "--epsilon", "0.5", "--max-queries", "3",
        "--identity", running.fed.operator("civil"),
    )  # fmt: skip
    assert isinstance(issued, dict)
    ok(
        "grant", "revoke", str(issued["grant_id"]), "--home", running.home("civil"), "--reason",
        "project ended", "--identity", running.fed.operator("civil"),
    )  # fmt: skip
    audra = pull(running, tmp_path)
    result = govshare("audit", "rights", "--all", "--identity", audra, "--state", str(tmp_path),
                      "--quorum", "1", "--json")  # fmt: skip
    assert result.returncode == 1  # ghost was never pulled: the register says it is incomplete
    register = json.loads(result.stdout)
    assert register["verified"] == ["tax", "civil"] and list(register["not_verified"]) == ["ghost"]
    for node in ("tax", "civil"):
        [people] = [
            d for d in register["datasets"] if (d["node"], d["dataset"]) == (node, "people")
        ]
        assert (people["grade"], people["owner_kind"], people["responsible"]) == (
            "general",
            "individual",
            f"op-{node}",
        )
        stored = GrantStore(NodeConfig.load(Path(running.home(node))).database_path).list()
        assert stored, node
        from_log = {r["grant_id"]: r for r in people["rights"]}
        assert set(from_log) == {g.grant_id for g in stored}
        for g in stored:
            r = from_log[g.grant_id]
            assert (r["holder"], r["columns"], r["granted_by"], r["expires_at"]) == (
                g.grantee,
                list(g.columns),
                g.granted_by,
                g.expires_at,
            )
            assert r["status"] == ("revoked" if g.revoked else "active")
            assert r["epsilon"] == ok_json("grant", "show", g.grant_id, "--home",
                                           running.home(node))["epsilon"]  # type: ignore[index]  # fmt: skip
    [revoked] = [
        r for d in register["datasets"] for r in d["rights"] if r["grant_id"] == issued["grant_id"]
    ]
    assert (revoked["status"], revoked["revoked_by"], revoked["granted_by"]) == (
        "revoked",
        "op-civil",
        "op-civil",
    )
    table = govshare(
        "audit", "rights", "tax", "--identity", audra, "--state", str(tmp_path), "--quorum", "1"
    )
    assert table.returncode == 0 and "responsible: op-tax" in " ".join(table.stdout.split())


def test_a_copy_edited_after_its_pull_is_left_out_of_the_register(
    running: Running, tmp_path: Path
) -> None:
    audra = pull(running, tmp_path)
    # An insider with the auditor's disk rewrites who holds a right in tax's pulled copy.
    db = sqlite3.connect(tmp_path / "tax" / "entries.db", isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    rows = db.execute("SELECT idx, data FROM entries").fetchall()
    [(index, data)] = [(i, d) for i, d in rows if decode_entry(d).kind == "grant.created"][:1]
    entry = decode_entry(data)
    forged = encode_entry(replace(entry, fields={**entry.fields, "grantee": "mallory"}))
    db.execute("UPDATE entries SET data = ? WHERE idx = ?", (forged, index))
    db.close()
    result = govshare("audit", "rights", "tax", "--identity", audra, "--state", str(tmp_path),
                      "--quorum", "1", "--json")  # fmt: skip
    assert result.returncode == 1
    register = json.loads(result.stdout)
    assert register["datasets"] == [] and list(register["not_verified"]) == ["tax"]
    assert "mallory" not in result.stdout


# ------------------------------------------------------------------ item 5: responsibility


def test_the_responsibility_list_names_each_person_with_their_last_signed_act(
    running: Running, tmp_path: Path
) -> None:
    audra = pull(running, tmp_path)
    shown = ok_json(
        "responsibility", "show", "civil.people", "--identity", audra, "--state", str(tmp_path),
        "--quorum", "1",
    )  # fmt: skip
    assert isinstance(shown, dict)
    people = {(p["name"], p["duty"]): p for p in shown["people"]}
    assert {"responsible", "grant_issuer", "analyst"} <= {duty for _, duty in people}
    assert ("op-civil", "responsible") in people and ("alice", "analyst") in people
    # Each person's last signed act is their latest act in civil's own log, and verifies.
    log = entries(running.home("civil"))
    pulled = len(log)  # the pull covered at most this many
    for (name, _duty), person in people.items():
        act = person["last_signed_act"]
        assert act is not None and act["signature_verified"] is True, (name, act)
        kinds = {"op-civil": "operator.act", "alice": "application.received"}
        if name in kinds:
            mine = [i for i, (k, a, _) in enumerate(log[:pulled]) if k == kinds[name] and a == name]
            assert act["entry"] <= mine[-1] and log[act["entry"]][:2] == (kinds[name], name)
    unknown = govshare(
        "responsibility", "show", "civil.nothing", "--identity", audra, "--state",
        str(tmp_path), "--quorum", "1",
    )  # fmt: skip
    assert unknown.returncode == 1 and "never registered" in unknown.stderr
    table = govshare(
        "responsibility", "show", "civil.people", "--identity", audra, "--state",
        str(tmp_path), "--quorum", "1",
    )  # fmt: skip
    assert table.returncode == 0 and "verified" in table.stdout and "op-civil" in table.stdout


# ------------------------------------------------------------------ item 6: incident controls


def submit(running: Running, dataset: str) -> str:
    """A PSI on tax's ``dataset`` submitted to tax alone, as alice; returns its id (raises
    PolicyRefused when tax refuses it)."""
    alice = running.fed.identity("alice")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("civil", "people", "id_number"), right=Side("tax", dataset, "id_number"),
        epsilon=Fraction(2),
    )  # fmt: skip
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with NodeClient.to(alice, "tax") as client:
        client.submit(request.encode())
    return request.query_id_hex


def status(running: Running, query_id: str) -> tuple[str, str]:
    with NodeClient.to(running.fed.identity("alice"), "tax") as client:
        reply = client.status(query_id)
    return reply.state, reply.rule


def test_a_freeze_stops_every_query_including_one_waiting_for_approval(
    running: Running, tmp_path: Path
) -> None:
    home, operator = running.home("tax"), running.fed.operator("tax")
    ok(
        "dataset", "add", str(running.root / "people.csv"), "--home", home, "--name", "gated",
        "--grade", "general", "--sharing", "conditional", "--owner-kind", "state", "--owner",
        "state", "--column", "id_number=join_key:resident_id", "--column", "amount=aggregate",
        "--column", "notes=deny", "--require-approval", "--identity", operator,
    )  # fmt: skip
    ok(
        "grant", "add", "--home", home, "--dataset", "gated", "--grantee", "alice", "--purpose",
        PURPOSE, "--columns", "id_number", "--kinds", "psi_cardinality", "--expires",
        "2099-01-01", "--epsilon", "100", "--max-queries", "100", "--identity", operator,
    )  # fmt: skip
    waiting = submit(running, "gated")
    assert status(running, waiting)[0] == "pending_approval"

    unnamed = govshare("node", "freeze", "--home", home, "--reason", "x")
    assert unnamed.returncode == 1 and "operator.identity" in unnamed.stderr
    frozen = ok_json("node", "freeze", "--home", home, "--reason", "suspected leak",
                     "--identity", operator)  # fmt: skip
    assert isinstance(frozen, dict)
    assert (frozen["rule"], frozen["frozen_by"], frozen["stopped"]) == (
        "node.frozen",
        "op-tax",
        [waiting],
    )
    assert status(running, waiting) == ("refused", "node.frozen")
    approve = govshare("approvals", "approve", waiting, "--home", home, "--identity", operator)
    assert approve.returncode == 1 and "is refused" in approve.stderr
    with pytest.raises(PolicyRefused) as refused:
        submit(running, "gated")
    assert refused.value.rule == "node.frozen"
    with pytest.raises(PolicyRefused) as other:
        submit(running, "people")  # every dataset of the node
    assert other.value.rule == "node.frozen"
    listed = ok_json("node", "freezes", "--home", home)
    assert isinstance(listed, list) and [f["scope"] for f in listed] == ["node"]

    ok("node", "unfreeze", "--home", home, "--reason", "leak ruled out", "--identity", operator)
    again = submit(running, "gated")
    assert status(running, again)[0] == "pending_approval"

    # One dataset frozen: its queries stop, the node's others go on.
    ok("dataset", "freeze", "gated", "--home", home, "--reason", "column mislabelled",
       "--identity", operator)  # fmt: skip
    assert status(running, again) == ("refused", "dataset.frozen")
    with pytest.raises(PolicyRefused) as one:
        submit(running, "gated")
    assert one.value.rule == "dataset.frozen"
    ok("dataset", "unfreeze", "gated", "--home", home, "--reason", "fixed", "--identity", operator)

    logged = [(k, a, f) for k, a, f in entries(home) if k.endswith("frozen")]
    assert [(k, a, f["reason"]) for k, a, f in logged] == [
        ("node.frozen", "op-tax", "suspected leak"),
        ("node.unfrozen", "op-tax", "leak ruled out"),
        ("dataset.frozen", "op-tax", "column mislabelled"),
        ("dataset.unfrozen", "op-tax", "fixed"),
    ]
    audra = pull(running, tmp_path)
    checked = govshare("audit", "check", "tax", "--identity", audra, "--state", str(tmp_path),
                       "--json")  # fmt: skip
    incidents = [a for a in json.loads(checked.stdout) if a["rule"] == "incident.frozen"]
    assert sorted(a["detail"] for a in incidents) == [
        "op-tax froze dataset gated: column mislabelled",
        "op-tax froze the node: suspected leak",
    ]
    refused_acts = [a for a in json.loads(checked.stdout) if a["rule"] == "operator.refused"]
    assert any("node.freeze" in a["detail"] for a in refused_acts)
    # The auditor's reconciliation of the stopped query names who stopped it.
    # (It exits 1: the query reached tax only, so the nodes' views of it differ.)
    shown = json.loads(
        govshare("audit", "show", "--query", waiting, "--identity", audra, "--state",
                 str(tmp_path), "--json").stdout
    )  # fmt: skip
    [tax] = [n for n in shown["nodes"] if n["node"] == "tax"]
    assert {"kind": "policy.decision", "actor": "op-tax"} in [
        {"kind": e["kind"], "actor": e["actor"]} for e in tax["entries"]
    ]


def test_every_operator_act_names_its_person(running: Running) -> None:
    """No entry of either node is an anonymous operator's: each act's entries name a person,
    followed by the act that person signed."""
    for node in ("tax", "civil"):
        log = entries(running.home(node))
        roster = running.fed.identity("audra").roster
        acts = [(i, a, f) for i, (k, a, f) in enumerate(log) if k == "operator.act"]
        assert len(acts) >= 3, node
        previous = -1
        for index, actor, fields in acts:
            act = OperatorAct.decode(fields["act"])  # type: ignore[arg-type]
            assert (act.operator, act.node) == (actor, node)
            member = roster.member(actor)
            assert member.role.value == "operator" and member.node == node
            verify_act(act, member.verify_key(), now=act.issued_at)
            # What the act did, logged just before it since the previous act, names them.
            assert actor in {a for _, a, _ in log[previous + 1 : index]}, (node, index)
            previous = index
        assert not [a for _, a, _ in log if a.startswith("operator:") and a != "operator:unknown"]


def test_a_suspended_member_is_refused_by_every_node_at_once(
    running: Running, tmp_path: Path
) -> None:
    """Last in the module: hkana leaves the federation."""
    hkana = running.fed.identity("hkana")  # loaded while still a member
    with NodeClient.to(hkana, "tax") as client:
        assert client.list_datasets()
    suspended = ok_json(
        "federation", "suspend", "hkana", "--dir", str(running.fed.directory), "--reason",
        "credentials found on a shared drive", "--by", "admin-zhao", "--publish",
    )  # fmt: skip
    assert isinstance(suspended, dict)
    published = set(suspended["published"])
    for node in ("tax", "civil"):
        assert str(running.fed.node_home(node).resolve()) in published
    for node in ("tax", "civil"):
        with NodeClient.to(hkana, node) as client, pytest.raises(GovshareError):
            client.list_datasets()
    updated = [f for k, _, f in entries(running.home("tax")) if k == "roster.updated"]
    assert updated[-1]["removed"] == ["hkana"]
    assert updated[-1]["note"] == {
        "kind": "suspend", "member": "hkana", "reason": "credentials found on a shared drive",
        "by": "admin-zhao",
    }  # fmt: skip
    audra = pull(running, tmp_path)
    checked = govshare("audit", "check", "tax", "--identity", audra, "--state", str(tmp_path),
                       "--json")  # fmt: skip
    details = [a["detail"] for a in json.loads(checked.stdout) if a["rule"] == "member.suspended"]
    assert details == [
        "hkana suspended by admin-zhao: credentials found on a shared drive (roster version "
        f"{suspended['roster_version']})"
    ]
