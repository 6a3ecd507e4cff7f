"""Named people and accountability (issue 11), end to end with real ``govshare`` processes:
two node processes serving over mutual TLS, their named operators, an analyst, an auditor.

Access applications (item 3): the analyst applies, the operator sees the time left and answers;
a refusal needs a reason; the analyst reads every node's answers; an application left past its
deadline is an alert in ``audit check``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from conftest import FederationFixture, build_federation, serve_node

from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.policy.grants import GrantStore

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
    with AuditLog.open(NodeConfig.load(Path(home)).audit_database_path) as log:
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
    assert request_id in table and "4d" in table  # the time left, to the hour

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
