"""Enrolment through the real CLI: keys made at the department (``node keygen`` → CSR →
``federation sign``), a member's keys re-issued (``enrol --reissue``), and the signed roster
handed to a node on another machine (``federation roster --out`` → ``node roster install``),
all against a real ``node serve`` process over mutual TLS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

from govshare.model.governance import Role
from govshare.model.identity import Federation, Identity, init_federation
from govshare.protocols.suite import STANDARD

TIMEOUT = 120  # seconds: a bound on a broken run, never a pace the test relies on


def govshare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def roster_json(root: Path) -> dict[str, object]:
    shown: dict[str, object] = json.loads(
        ok(govshare("federation", "roster", "--json", cwd=root)).stdout
    )
    return shown


@dataclass
class KeygenNode:
    """A node whose keys were made in its home, served by ``govshare node serve``."""

    root: Path
    home: Path
    public: Path  # what the administrator handed back
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def keygen_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeygenNode]:
    root = tmp_path_factory.mktemp("enrolment")
    home, public = root / "homes" / "tax", root / "tax-public"
    address = f"127.0.0.1:{free_port()}"
    init_federation(root / "federation", "cityfed", suite=STANDARD)
    # The department makes its keys; the administrator sees only the request.
    ok(govshare("node", "keygen", "--home", str(home), "--name", "tax", cwd=root))
    ok(govshare(
        "federation", "sign", str(home / "tax.csr"), "--role", "node", "--jurisdiction", "CN",
        "--address", address, "--out", str(public), cwd=root,
    ))  # fmt: skip
    for name in ("tls.crt", "ca.crt", "roster.json"):
        shutil.copy(public / name, home / name)
    ok(govshare("node", "init", "--home", str(home), "--listen", address, cwd=root))
    # Enrolled after the node: a ghost node that never runs, and two analysts.
    federation = Federation.load(root / "federation")
    federation, _ = federation.enrol(
        role=Role.NODE, name="ghost", jurisdiction="CN",
        address=f"127.0.0.1:{free_port()}", out=root / "ghost",
    )  # fmt: skip
    for analyst in ("alice", "bob"):
        federation, _ = federation.enrol(
            role=Role.ANALYST, name=analyst, jurisdiction="CN", out=root / analyst
        )
    # The node learns of them from a roster file handed over, not from the CA's folder.
    ok(govshare("federation", "roster", "--out", str(root / "roster.json"), cwd=root))
    ok(govshare(
        "node", "roster", "install", str(root / "roster.json"), "--home", str(home), cwd=root
    ))  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "govshare.cli", "node", "serve", "--home", str(home)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = process.stdout.readline()  # blocks until the node serves (or dies)
        assert "serving on" in line, line
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield KeygenNode(root, home, public, process)
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)


def test_keygen_sign_and_a_node_serving_that_identity_answers_an_analyst(
    keygen_node: KeygenNode,
) -> None:
    home, public = keygen_node.home, keygen_node.public
    # The private keys never left the home: the administrator's output is public only.
    assert sorted(p.name for p in public.iterdir()) == ["ca.crt", "roster.json", "tls.crt"]
    request = (home / "tax.csr").read_text()
    assert "PRIVATE KEY" not in request and "CERTIFICATE REQUEST" in request
    identity = Identity.load(home)  # certificate, keys, CA and roster all agree
    assert (identity.name, identity.role, identity.jurisdiction) == ("tax", Role.NODE, "CN")
    listed = identity.roster.member("tax")
    assert listed.signing_key == identity.member.signing_key
    # An analyst's catalogue call reaches the node over mutual TLS (ghost never runs: a
    # warning line, exit 0).
    shown = govshare(
        "catalog", "list", "--identity", str(keygen_node.root / "alice"), "--json",
        cwd=keygen_node.root,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)
    assert answer["datasets"] == [] and list(answer["unreachable"]) == ["ghost"]
    table = govshare(
        "catalog", "list", "--identity", str(keygen_node.root / "alice"), cwd=keygen_node.root
    )
    assert table.returncode == 0, table.stderr
    (warning,) = table.stderr.strip().splitlines()
    assert warning.startswith("warning: 1 of 2 nodes did not answer: ") and "ghost" in warning


def test_reissue_bumps_the_roster_and_the_node_refuses_the_old_certificate(
    keygen_node: KeygenNode,
) -> None:
    root, home = keygen_node.root, keygen_node.home
    before = roster_json(root)
    old_bob = next(m for m in before["members"] if m["name"] == "bob")  # type: ignore[attr-defined]
    assert govshare("catalog", "list", "--identity", "bob", "--json", cwd=root).returncode == 0

    reissued = govshare(
        "federation", "enrol", "--reissue", "--name", "bob", "--out", "bob-2", cwd=root
    )
    assert reissued.returncode == 0, reissued.stderr
    after = roster_json(root)
    assert after["version"] == before["version"] + 1  # type: ignore[operator]
    assert f"roster version {after['version']}" in reissued.stdout
    new_bob = next(m for m in after["members"] if m["name"] == "bob")  # type: ignore[attr-defined]
    # Same member, new keys: role and jurisdiction kept, certificate and signing key replaced.
    assert (new_bob["role"], new_bob["jurisdiction"]) == ("analyst", "CN")
    assert new_bob["tls_fingerprint"] != old_bob["tls_fingerprint"]
    assert new_bob["signing_key"] != old_bob["signing_key"]
    assert (root / "bob" / "tls.key").read_bytes() != (root / "bob-2" / "tls.key").read_bytes()

    ok(govshare("federation", "roster", "--out", "roster-2.json", cwd=root))
    installed = govshare(
        "node", "roster", "install", "roster-2.json", "--home", str(home), cwd=root
    )
    assert installed.returncode == 0, installed.stderr
    assert f"roster version {after['version']}" in installed.stdout

    refused = govshare("catalog", "list", "--identity", "bob", cwd=root)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: no node answered: ")
    assert "certificate of 'bob' is not the one the roster lists" in line
    accepted = govshare("catalog", "list", "--identity", "bob-2", "--json", cwd=root)
    assert accepted.returncode == 0, accepted.stderr
    # alice, untouched by bob's re-issue, is still accepted.
    assert govshare("catalog", "list", "--identity", "alice", "--json", cwd=root).returncode == 0


def test_reissue_of_a_member_never_enrolled_is_refused(tmp_path: Path) -> None:
    init_federation(tmp_path / "federation", "cityfed", suite=STANDARD)
    result = govshare(
        "federation", "enrol", "--reissue", "--name", "carol", "--out", "c", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: 'carol' is not enrolled in 'cityfed'"]
    assert not (tmp_path / "c" / "tls.key").exists()


def test_roster_install_refuses_a_roster_the_ca_did_not_sign_or_an_older_one(
    tmp_path: Path,
) -> None:
    init_federation(tmp_path / "federation", "cityfed", suite=STANDARD)
    federation, _ = Federation.load(tmp_path / "federation").enrol(
        role=Role.NODE, name="tax", jurisdiction="CN", address="127.0.0.1:7102",
        out=tmp_path / "tax",
    )  # fmt: skip
    federation.export_roster(tmp_path / "v2.json")
    federation, _ = federation.enrol(
        role=Role.ANALYST, name="alice", jurisdiction="CN", out=tmp_path / "alice"
    )
    federation.export_roster(tmp_path / "v3.json")
    # Another federation of the same name: its CA is not the one in tax's bundle.
    init_federation(tmp_path / "impostor", "cityfed", suite=STANDARD)
    Federation.load(tmp_path / "impostor").export_roster(tmp_path / "forged.json")
    held = (tmp_path / "tax" / "roster.json").read_bytes()

    forged = govshare("node", "roster", "install", "forged.json", "--home", "tax", cwd=tmp_path)
    assert forged.returncode == 1
    assert forged.stderr.strip().splitlines() == ["error: roster signature does not verify"]
    assert (tmp_path / "tax" / "roster.json").read_bytes() == held

    newer = govshare(
        "node", "roster", "install", "v3.json", "--home", "tax", "--json", cwd=tmp_path
    )
    assert newer.returncode == 0, newer.stderr
    assert json.loads(newer.stdout)["version"] == 3
    assert json.loads(newer.stdout)["previous_version"] == 2

    older = govshare("node", "roster", "install", "v2.json", "--home", "tax", cwd=tmp_path)
    assert older.returncode == 1
    (line,) = older.stderr.strip().splitlines()
    assert "roster version 2 is older than version 3" in line and "rollback" in line
    assert Identity.load(tmp_path / "tax").roster.version == 3


def test_sign_refuses_what_is_not_a_request(tmp_path: Path) -> None:
    # (A request whose proofs do not verify: tests/model/test_identity.py.)
    init_federation(tmp_path / "federation", "cityfed", suite=STANDARD)
    (tmp_path / "junk.csr").write_text("not a request\n")
    junk = govshare(
        "federation", "sign", "junk.csr", "--role", "node", "--jurisdiction", "CN",
        "--address", "127.0.0.1:7102", "--out", "out", cwd=tmp_path,
    )  # fmt: skip
    assert junk.returncode == 1
    assert junk.stderr.strip() == "error: not a PEM certificate signing request"
    assert roster_json(tmp_path)["version"] == 1  # nothing enrolled
    assert not (tmp_path / "out").exists()


def test_an_sm_federation_refuses_a_request_of_the_standard_suite(tmp_path: Path) -> None:
    """The administrator makes an SM federation; a department that made standard-suite keys is
    refused at signing, with the command that makes the right ones; those are accepted and the
    department's bundle loads with an SM2 signing key."""
    shown = json.loads(
        ok(govshare("federation", "init", "--name", "smfed", "--suite", "sm", "--json",
                    cwd=tmp_path)).stdout
    )  # fmt: skip
    assert shown["suite"] == "sm" and roster_json(tmp_path)["suite"] == "sm"
    ok(govshare("node", "keygen", "--home", "wrong", "--name", "tax", cwd=tmp_path))
    refused = govshare(
        "federation", "sign", "wrong/tax.csr", "--role", "node", "--jurisdiction", "CN",
        "--address", f"127.0.0.1:{free_port()}", "--out", "wrong-public", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "'standard' suite but federation 'smfed' runs on 'sm'" in refused.stderr
    assert "node keygen --suite sm" in refused.stderr
    assert not (tmp_path / "wrong-public" / "tls.crt").exists()
    ok(govshare("node", "keygen", "--home", "homes/tax", "--name", "tax", "--suite", "sm",
                cwd=tmp_path))  # fmt: skip
    ok(govshare(
        "federation", "sign", "homes/tax/tax.csr", "--role", "node", "--jurisdiction", "CN",
        "--address", f"127.0.0.1:{free_port()}", "--out", "public", cwd=tmp_path,
    ))  # fmt: skip
    for name in ("tls.crt", "ca.crt", "roster.json"):
        shutil.copy(tmp_path / "public" / name, tmp_path / "homes" / "tax" / name)
    identity = Identity.load(tmp_path / "homes" / "tax")
    assert identity.signing_key.suite == "sm" and identity.roster.suite == "sm"
