"""The administrator's CLI as a real subprocess, and through click's CliRunner."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from govshare.cli.main import cli


def govshare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_init_enrol_roster_as_subprocess(tmp_path: Path) -> None:
    assert govshare("federation", "init", "--name", "demo", cwd=tmp_path).returncode == 0
    enrolled = govshare(
        "federation", "enrol", "--role", "node", "--name", "tax", "--jurisdiction", "CN",
        "--address", "127.0.0.1:7101", "--out", "tax", cwd=tmp_path,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert "roster version 2" in enrolled.stdout
    for private in ("tax/tls.key", "tax/signing.key", "federation/ca.key"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600, private
        key_body = (tmp_path / private).read_text().splitlines()[1]
        assert key_body not in enrolled.stdout + enrolled.stderr
    shown = govshare("federation", "roster", "--json", cwd=tmp_path)
    roster = json.loads(shown.stdout)
    assert [(m["name"], m["role"], m["address"]) for m in roster["members"]] == [
        ("tax", "node", "127.0.0.1:7101")
    ]
    assert roster["version"] == 2


def test_the_administrators_commands_answer_in_json(tmp_path: Path) -> None:
    """Every command that prints data takes --json: one JSON document on stdout, nothing else."""

    def answer(*args: str) -> dict[str, object]:
        ran = govshare(*args, "--json", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        return dict(json.loads(ran.stdout))

    created = answer("federation", "init", "--name", "demo")
    assert (created["federation"], created["roster_version"]) == ("demo", 1)
    assert str(created["ca_valid_until"]) > "2026"
    enrolled = answer(
        "federation", "enrol", "--role", "node", "--name", "tax", "--jurisdiction", "CN",
        "--address", "127.0.0.1:7101", "--out", "tax",
    )  # fmt: skip
    member = enrolled["member"]
    assert isinstance(member, dict)
    assert (member["name"], member["role"], enrolled["roster_version"]) == ("tax", "node", 2)
    assert enrolled["reissued"] is False and enrolled["out"] == "tax"
    published = answer("federation", "publish", "tax")
    assert published == {"roster_version": 2, "published": ["tax"]}
    initialised = answer("node", "init", "--home", "tax", "--listen", "127.0.0.1:7101")
    assert initialised["node"] == "tax" and str(initialised["config"]).endswith("node.toml")
    revoked = answer("federation", "revoke", "tax")
    assert revoked == {"revoked": "tax", "roster_version": 3}


def test_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = govshare(
        "federation", "enrol", "--role", "analyst", "--name", "alice",
        "--jurisdiction", "CN", "--out", "alice", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "govshare federation init" in lines[0]  # says what to do


def test_verbose_shows_the_trace(tmp_path: Path) -> None:
    result = govshare(
        "--verbose", "federation", "enrol", "--role", "analyst", "--name", "alice",
        "--jurisdiction", "CN", "--out", "alice", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_bad_jurisdiction_and_duplicate_name_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(cli, ["federation", "init", "--name", "demo"]).exit_code == 0
    bad = runner.invoke(
        cli,
        ["federation", "enrol", "--role", "analyst", "--name", "bob",
         "--jurisdiction", "China", "--out", "bob"],
    )  # fmt: skip
    assert bad.exit_code != 0
    assert "ISO 3166-1" in str(bad.exception)
    args = ["federation", "enrol", "--role", "analyst", "--name", "bob",
            "--jurisdiction", "CN", "--out"]  # fmt: skip
    assert runner.invoke(cli, [*args, "bob"]).exit_code == 0
    again = runner.invoke(cli, [*args, "bob2"])
    assert "already enrolled" in str(again.exception)
    node_without_address = runner.invoke(
        cli,
        ["federation", "enrol", "--role", "node", "--name", "tax",
         "--jurisdiction", "CN", "--out", "tax"],
    )  # fmt: skip
    assert "--address" in str(node_without_address.exception)


def test_an_operator_is_enrolled_for_one_node_with_duties(tmp_path: Path) -> None:
    assert govshare("federation", "init", "--name", "demo", cwd=tmp_path).returncode == 0
    node = govshare(
        "federation", "enrol", "--role", "node", "--name", "tax", "--jurisdiction", "CN",
        "--address", "127.0.0.1:7101", "--out", "tax", cwd=tmp_path,
    )  # fmt: skip
    assert node.returncode == 0, node.stderr
    base = ("federation", "enrol", "--role", "operator", "--jurisdiction", "CN")
    for extra, why in (
        (("--name", "li-na", "--out", "li-na", "--duties", "grant"), "needs --node"),
        (("--name", "li-na", "--out", "li-na", "--node", "tax"), "at least one duty"),
        (("--name", "li-na", "--out", "li-na", "--node", "civil", "--duties", "grant"),
         "not a node of the roster"),
        (("--name", "li-na", "--out", "li-na", "--node", "tax", "--duties", "grant,root"),
         "unknown duties root"),
    ):  # fmt: skip
        refused = govshare(*base, *extra, cwd=tmp_path)
        assert refused.returncode == 1 and why in refused.stderr, (extra, refused.stderr)
    analyst = govshare(
        "federation", "enrol", "--role", "analyst", "--name", "alice", "--jurisdiction", "CN",
        "--out", "alice", "--node", "tax", cwd=tmp_path,
    )  # fmt: skip
    assert analyst.returncode == 1 and "for operators" in analyst.stderr
    enrolled = govshare(
        *base, "--name", "zhang-wei", "--node", "tax", "--duties", "register,grant,approve",
        "--out", "zhang-wei", cwd=tmp_path,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert "operator zhang-wei for node tax (approve, grant, register)" in " ".join(
        enrolled.stdout.split()
    )
    # A department's own keys, signed by the administrator: the same binding.
    keygen = govshare("node", "keygen", "--home", "wang", "--name", "wang-fang", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    signed = govshare(
        "federation", "sign", "wang/wang-fang.csr", "--role", "operator", "--jurisdiction", "CN",
        "--node", "tax", "--duties", "incident", "--out", "wang-public", cwd=tmp_path,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    roster = json.loads(govshare("federation", "roster", "--json", cwd=tmp_path).stdout)
    operators = {m["name"]: (m["node"], m["duties"]) for m in roster["members"] if "node" in m}
    assert operators == {
        "zhang-wei": ("tax", ["approve", "grant", "register"]),
        "wang-fang": ("tax", ["incident"]),
    }
    # Other members' entries carry no operator fields: their signed bytes are unchanged.
    assert [m for m in roster["members"] if m["role"] != "operator" and "duties" in m] == []
