"""A new user's first steps through the real CLI: ``node init`` before enrolment, ``catalog
list`` with every node down, Ctrl-C, offline ``audit verify-export`` and shell completion."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FederationFixture, free_port

from govshare.cli.main import cli
from govshare.model.governance import Role
from govshare.model.identity import Federation, init_federation
from govshare.node.api.server import RunningNode
from govshare.node.node import Node
from govshare.protocols.suite import STANDARD

TIMEOUT = 120  # seconds: a bound on a broken run, never a pace the test relies on
GOVSHARE = [sys.executable, "-m", "govshare.cli"]


def govshare(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GOVSHARE, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env
    )


def enrolled(root: Path, *members: tuple[Role, str, str]) -> Federation:
    """A federation in ``root/federation`` with ``members`` (role, name, address) enrolled."""
    init_federation(root / "federation", "cityfed", suite=STANDARD)
    federation = Federation.load(root / "federation")
    for role, name, address in members:
        federation, _ = federation.enrol(
            role=role, name=name, jurisdiction="CN", address=address, out=root / name
        )
    return federation


# --- node init -------------------------------------------------------------------------------


def test_node_init_before_enrolment_writes_nothing_and_the_rerun_succeeds(
    tmp_path: Path,
) -> None:
    home = tmp_path / "homes" / "tax"
    early = govshare(
        "node", "init", "--home", str(home), "--listen", "127.0.0.1:7102", cwd=tmp_path
    )
    assert early.returncode == 1
    (line,) = early.stderr.strip().splitlines()
    assert "holds no node identity" in line and "govshare federation enrol --role node" in line
    assert not (home / "node.toml").exists()
    # Enrolled now (into the home itself): the same command succeeds.
    enrolled(tmp_path).enrol(
        role=Role.NODE, name="tax", jurisdiction="CN", address="127.0.0.1:7102", out=home
    )
    again = govshare(
        "node", "init", "--home", str(home), "--listen", "127.0.0.1:7102", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert "node tax initialised" in again.stdout and (home / "node.toml").exists()


def test_node_init_with_keys_but_no_certificate_says_to_have_the_request_signed(
    tmp_path: Path,
) -> None:
    home = tmp_path / "tax"
    keygen = govshare("node", "keygen", "--home", str(home), "--name", "tax", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    early = govshare(
        "node", "init", "--home", str(home), "--listen", "127.0.0.1:7102", cwd=tmp_path
    )
    assert early.returncode == 1
    (line,) = early.stderr.strip().splitlines()
    assert "holds keys but no certificate yet" in line and "govshare federation sign" in line
    assert not (home / "node.toml").exists()


def test_node_init_refuses_an_analyst_bundle(tmp_path: Path) -> None:
    enrolled(tmp_path, (Role.ANALYST, "alice", ""))
    result = govshare("node", "init", "--home", "alice", "--listen", "127.0.0.1:7102", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: alice is enrolled as analyst, not node"
    assert not (tmp_path / "alice" / "node.toml").exists()


# --- catalog list ----------------------------------------------------------------------------


def test_catalog_list_exits_1_naming_the_nodes_when_none_answers(tmp_path: Path) -> None:
    enrolled(
        tmp_path,
        (Role.NODE, "tax", f"127.0.0.1:{free_port()}"),  # enrolled, never started
        (Role.NODE, "civil", f"127.0.0.1:{free_port()}"),
        (Role.ANALYST, "alice", ""),
    )
    result = govshare("catalog", "list", "--identity", "alice", "--timeout", "30", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""  # no empty table
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: no node answered: ")
    assert "node tax" in line and "node civil" in line
    as_json = govshare(
        "catalog", "list", "--identity", "alice", "--timeout", "30", "--json", cwd=tmp_path
    )
    assert as_json.returncode == 1
    assert sorted(json.loads(as_json.stdout)["unreachable"]) == ["civil", "tax"]


# --- Ctrl-C ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        # Blocked in a worker thread (one per node), the main thread waiting on it.
        ("catalog", "list", "--identity", "alice", "--timeout", "600"),
        # Blocked in a gRPC call on the main thread.
        ("node", "ping", "tax", "--identity", "civil"),
    ],
    ids=["catalog-list", "node-ping"],
)
def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path: Path, command: tuple[str, ...]) -> None:
    # A "node" that accepts the connection and never answers: the command waits on it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(TIMEOUT)  # a bound on a broken run only
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        enrolled(
            tmp_path,
            (Role.NODE, "tax", address),
            (Role.NODE, "civil", f"127.0.0.1:{free_port()}"),
            (Role.ANALYST, "alice", ""),
        )
        Federation.load(tmp_path / "federation").publish_roster(tmp_path / "civil")
        process = subprocess.Popen(
            [*GOVSHARE, *command], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            connection, _ = silent.accept()  # the command has dialled and now waits
            with connection:
                process.send_signal(signal.SIGINT)
                _, err = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted"]


# --- audit verify-export ---------------------------------------------------------------------


def test_verify_export_needs_only_the_ca_certificate(
    fed: FederationFixture,
    tax_node: tuple[Node, RunningNode],
    civil_node: tuple[Node, RunningNode],
    tmp_path: Path,
) -> None:
    audra = str(fed.bundles["audra"])
    runner = CliRunner()
    pulled = runner.invoke(
        cli, ["audit", "pull", "tax", "--identity", audra, "--state", str(tmp_path / "s"),
              "--quorum", "1"],
    )  # fmt: skip
    assert pulled.exit_code == 0, pulled.output
    exported = runner.invoke(
        cli, ["audit", "export", str(tmp_path / "bundle.json"), "--identity", audra,
              "--state", str(tmp_path / "s")],
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    # Another machine: the bundle and the federation's CA certificate, no key, no identity.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "bundle.json").write_bytes((tmp_path / "bundle.json").read_bytes())
    (elsewhere / "ca.crt").write_bytes((fed.bundles["audra"] / "ca.crt").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "GOVSHARE_IDENTITY"}
    checked = govshare(
        "audit", "verify-export", "bundle.json", "--ca", "ca.crt", "--quorum", "1",
        cwd=elsewhere, env=env,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("tax: OK — ")
    # The folder holding ca.crt serves as --identity too (README's form, run where it is).
    as_identity = govshare(
        "audit", "verify-export", "bundle.json", "--quorum", "1", cwd=elsewhere, env=env
    )
    assert as_identity.returncode == 0, as_identity.stderr
    # Another federation's CA refuses the bundle's roster.
    other = tmp_path / "other"
    init_federation(other, "testfed", suite=STANDARD)
    forged = govshare(
        "audit", "verify-export", "bundle.json", "--ca", str(other / "ca.crt"), "--quorum", "1",
        cwd=elsewhere, env=env,
    )  # fmt: skip
    assert forged.returncode == 1
    assert forged.stderr.strip() == "error: roster signature does not verify"


# --- shell completion ------------------------------------------------------------------------


def test_shell_completion_completes_the_groups(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "_GOVSHARE_COMPLETE": "bash_complete",
        "COMP_WORDS": "govshare fed",
        "COMP_CWORD": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", "from govshare.cli.main import main; main()"],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plain,federation"]
