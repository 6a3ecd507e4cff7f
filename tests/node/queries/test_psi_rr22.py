"""Membership on the RR22 engine: real node servers over mutual TLS, the driver under the engine's
own interpreter (``make secretflow`` builds .venv/secretflow), its link under the federation's
certificates.

Both engines give the same membership on the same data; a node without the engine refuses with
FAILED_PRECONDITION; a link certificate from another federation is refused; a peer's driver
killed mid-protocol aborts both nodes. After each run no driver and no temporary file is left.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PSI_EPSILON,
    PURPOSE,
    REPO,
    FederationFixture,
    assert_ended_cleanly,
    build_federation,
    grant,
    register,
)

from govshare.client.analyst import run_psi
from govshare.model.governance import QueryKind
from govshare.model.query_plan import ECDH, RR22, PsiPlan, Side
from govshare.model.states import DONE, FAILED, REFUSED
from govshare.node.api.server import RunningNode, create_server
from govshare.node.config import NodeConfig
from govshare.node.data import resident_id
from govshare.node.node import Node
from govshare.node.queries.engines.rr22 import (
    DRIVER,
    KEY_DOMAIN,
    LinkOffer,
    LinkTls,
    cells,
    hashed_keys,
    input_file,
    matched_positions,
)
from govshare.node.queries.kinds.psi import ENGINE_RULE
from govshare.protocols.errors import Conflict, GovshareError, MalformedInput
from govshare.protocols.suite import STANDARD

ENGINE_PYTHON = REPO / ".venv" / "secretflow" / "bin" / "python"
# Generous: a run here takes seconds; a failure mode that hangs fails the test, not the suite.
PROTOCOL_TIMEOUT = 120
WAIT = 120.0


@dataclass
class Nodes:
    fed: FederationFixture
    tax: Node
    civil: Node
    ghost: Node  # serves, without the rr22 engine
    foreign: FederationFixture


def _serve(home: Path) -> tuple[Node, RunningNode]:
    config = NodeConfig.load(home)
    node = Node.from_config(config)
    return node, create_server(node, config.listen)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    if not ENGINE_PYTHON.exists():
        pytest.fail(f"{ENGINE_PYTHON} is missing: run 'make secretflow' (make pytest does)")
    fed = build_federation(tmp_path_factory.mktemp("rr22"), "rr22fed")
    foreign = build_federation(tmp_path_factory.mktemp("rr22foreign"), "otherfed")
    for name in ("tax", "civil", "ghost"):
        config = fed.node_home(name) / "node.toml"
        text = config.read_text()
        text = text.replace("protocol_timeout = 300.0", f"protocol_timeout = {PROTOCOL_TIMEOUT}")
        if name != "ghost":
            assert 'rr22_python = ""' in text
            text = text.replace('rr22_python = ""', f'rr22_python = "{ENGINE_PYTHON}"')
        config.write_text(text)
    served = {name: _serve(fed.node_home(name)) for name in ("tax", "civil", "ghost")}
    assert served["tax"][0].psi.rr22 is not None and served["ghost"][0].psi.rr22 is None
    yield Nodes(fed, served["tax"][0], served["civil"][0], served["ghost"][0], foreign)
    for node, running in served.values():
        running.stop(0)
        node.close()


def resident(rng: random.Random, sequence: int) -> str:
    birth = date(1950 + rng.randrange(60), 1 + rng.randrange(12), 1 + rng.randrange(28))
    return resident_id.make("110101", birth, sequence)


def write_keys(path: Path, keys: list[str]) -> Path:
    path.write_text("id_number\n" + "".join(k + "\n" for k in keys), encoding="utf-8")
    return path


def datasets(
    nodes: Nodes, tmp: Path, name: str, left: list[str], right: list[str], *, node: str = "civil"
) -> tuple[str, str]:
    """``left`` as tax's dataset, ``right`` as ``node``'s, both granted to alice for membership;
    rows that are not resident ids are left out on import, as an operator would with
    --skip-invalid."""
    peer = getattr(nodes, node)
    for holder, keys, dataset in ((nodes.tax, left, f"{name}_t"), (peer, right, f"{name}_p")):
        register(
            holder, write_keys(tmp / f"{dataset}.csv", keys), name=dataset,
            columns=("id_number=join_key:resident_id",), skip_invalid=True,
        )  # fmt: skip
        grant(holder, dataset, "alice", ["id_number"], [QueryKind.PSI_MEMBERSHIP])
    return f"{name}_t", f"{name}_p"


def plan(names: tuple[str, str], engine: str, *, peer: str = "civil") -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP, purpose=PURPOSE,
        left=Side("tax", names[0], "id_number"), right=Side(peer, names[1], "id_number"),
        recipient="tax", epsilon=PSI_EPSILON, engine=engine,
    )  # fmt: skip


def kept(nodes: Nodes, names: tuple[str, str], engine: str) -> list[str]:
    outcome = run_psi(nodes.fed.identity("alice"), plan(names, engine))
    assert nodes.tax.query_store.get(outcome.query_id).state == DONE
    assert nodes.civil.query_store.get(outcome.query_id).state == DONE
    return nodes.tax.query_store.matches(outcome.query_id)


def leftovers() -> tuple[list[str], list[int]]:
    """The engine's temporary folders and driver processes still there."""
    folders = sorted(str(p) for p in Path(tempfile.gettempdir()).glob("govshare-rr22-*"))
    return folders, drivers()


def drivers(node: str = "") -> list[int]:
    """Live driver processes (of ``node``'s runs, when named): their job files name the node."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            state != "Z"
            and str(DRIVER).encode() in argv
            and f"govshare-rr22-{node}".encode() in (b" ".join(argv))
        ):
            found.append(int(entry.name))
    return found


def test_rr22_and_ecdh_keep_the_same_matches(nodes: Nodes, tmp_path: Path) -> None:
    rng = random.Random(2026)
    pool = [resident(rng, i) for i in range(600)]
    rng.shuffle(pool)
    # Random sets with a random overlap, then the edges: nothing in common, every row in
    # common, and duplicates (also as a lower-case check letter) and bad keys, which the import
    # leaves out for both engines alike.
    left, right = pool[:260], pool[180:420]
    with_x = next(k for k in pool[420:] if k.endswith("X"))
    bad = ["110101199001011234", "not-an-id", "11010119900101123"]  # checksum, shape, length
    cases = {
        "random": (left, right),
        "disjoint": (pool[:200], pool[200:400]),
        "all": (pool[:150], list(reversed(pool[:150]))),
        "dupes": (
            [*left[:120], *left[:30], with_x, with_x.lower(), *bad],
            [*left[60:200], *left[60:90], with_x.lower(), *bad],
        ),
    }
    for case, (a, b) in cases.items():
        names = datasets(nodes, tmp_path, case, a, b)
        expected = sorted({k.upper() for k in a if resident_id.is_valid(k)}
                          & {k.upper() for k in b if resident_id.is_valid(k)})  # fmt: skip
        by_rr22, by_ecdh = kept(nodes, names, RR22), kept(nodes, names, ECDH)
        assert by_rr22 == by_ecdh == expected, case
    assert len(expected) == 61 and with_x in expected  # dupes: left[60:120] and with_x
    assert leftovers() == ([], [])


def rederived_cell(prefix: bytes, key: str) -> bytes:
    """A key's cell in the driver's input, as an auditor derives it: SHA-256 of the prefix and
    the key, 12 bytes, in base64."""
    return base64.b64encode(hashlib.sha256(prefix + key.encode()).digest()[:12])


def test_rr22_steps_are_logged_and_reconcile(nodes: Nodes, tmp_path: Path) -> None:
    rng = random.Random(7)
    pool = [resident(rng, i) for i in range(100)]
    names = datasets(nodes, tmp_path, "logged", pool[:70], pool[40:])
    outcome = run_psi(nodes.fed.identity("alice"), plan(names, RR22))
    steps = {}
    for node, imported in ((nodes.tax, pool[:70]), (nodes.civil, pool[40:])):
        entries = [e.decode() for e in node.audit.entries_for_query(outcome.query_id)]
        steps[node.name] = [
            (e.fields["direction"], e.fields["phase"], e.fields["size"])
            for e in entries
            if e.kind == "protocol.step"
        ]
        # An auditor with the node's data re-derives its input's digest: its keys in import
        # order, each hashed with the query id, 96 bits in base64 a line.
        prefix = KEY_DOMAIN + outcome.query_id.encode() + b"\x00"
        cell = functools.partial(rederived_cell, prefix)
        data = b"key\n" + b"".join(cell(key) + b"\n" for key in dict.fromkeys(imported))
        [logged] = [e.fields["digest"] for e in entries if e.fields.get("phase") == "rr22.input"]
        assert logged == hashlib.sha256(data).hexdigest()
        # The receiver's output: the matched keys' hashes, in its input's order (civil: none).
        kept = [k for k in dict.fromkeys(imported) if k in pool[40:70]] if node is nodes.tax else []
        done = b"\n".join(cell(k) for k in kept)
        [logged] = [e.fields["digest"] for e in entries if e.fields.get("phase") == "rr22.done"]
        assert logged == hashlib.sha256(done).hexdigest()
        released = [e.fields for e in entries if e.kind == "result.released"]
        assert [r["recipient"] for r in released] == ["tax"]
    # tax receives (30 matched of its 70 keys); civil sends its 60 and learns nothing. Each node
    # writes its input while it offers its link and its driver links: the input's step comes
    # anywhere among the link's, which come in their order.
    link = [("sent", "link", 1), ("received", "link", 1), ("engine", "rr22.linked", 0)]
    for name, size, matched in (("tax", 70, 30), ("civil", 60, 0)):
        start, middle, end = steps[name][:1], steps[name][1:5], steps[name][5:]
        assert start == [("engine", "rr22.started", 0)]
        assert [step for step in middle if step in link] == link
        assert sorted(middle) == sorted([*link, ("engine", "rr22.input", size)])
        assert end == [("sent", "finished", 1), ("received", "finished", 1),
                       ("engine", "rr22.done", matched)]  # fmt: skip
    assert len(nodes.tax.query_store.matches(outcome.query_id)) == 30


def test_a_node_without_the_engine_refuses_with_a_precondition(
    nodes: Nodes, tmp_path: Path
) -> None:
    rng = random.Random(5)
    pool = [resident(rng, i) for i in range(60)]
    names = datasets(nodes, tmp_path, "noengine", pool[:40], pool[20:], node="ghost")
    with pytest.raises(Conflict, match=r"node ghost does not offer the rr22 engine.*rr22_python"):
        run_psi(nodes.fed.identity("alice"), plan(names, RR22, peer="ghost"))
    refused = [r for r in nodes.ghost.query_store.with_state(REFUSED) if r.dataset == names[1]]
    assert [r.rule for r in refused] == [ENGINE_RULE]
    decisions = [
        e.decode().fields
        for e in nodes.ghost.audit.entries_for_query(refused[0].query_id)
        if e.decode().kind == "policy.decision"
    ]
    assert [(d["allowed"], d["rule"]) for d in decisions] == [(False, ENGINE_RULE)]
    # The same node serves the query on ECDH-PSI.
    outcome = run_psi(nodes.fed.identity("alice"), plan(names, ECDH, peer="ghost"))
    assert len(nodes.tax.query_store.matches(outcome.query_id)) == 20


def test_rr22_is_for_membership_only() -> None:
    cardinality = {
        "kind": "psi_cardinality", "purpose": PURPOSE, "epsilon": "1", "engine": "rr22",
        "left": {"node": "tax", "dataset": "a", "column": "id_number", "where": []},
        "right": {"node": "civil", "dataset": "b", "column": "id_number", "where": []},
    }  # fmt: skip
    from govshare.model.query_plan import parse_plan

    with pytest.raises(MalformedInput, match="rr22 serves membership only"):
        parse_plan(cardinality, kind="psi_cardinality")
    with pytest.raises(MalformedInput, match="'engine': 'kkrt' is not one of ecdh, rr22"):
        parse_plan({**cardinality, "engine": "kkrt"}, kind="psi_cardinality")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "the link offer is not JSON"),
        (b'{"port": 0, "token": "' + b"a" * 32 + b'"}', "port is not a TCP port"),
        (b'{"port": 65536, "token": "' + b"a" * 32 + b'"}', "port is not a TCP port"),
        (b'{"port": true, "token": "' + b"a" * 32 + b'"}', "port is not a TCP port"),
        (b'{"port": 4000, "token": "' + b"g" * 32 + b'"}', "token is not 32 hex digits"),
        (b'{"port": 4000, "token": "abc"}', "token is not 32 hex digits"),
        (b"[4000]", "port is not a TCP port"),
    ],
)
def test_a_malformed_link_offer_is_refused_naming_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedInput, match=message):
        LinkOffer.decode(raw)
    offer = LinkOffer(4000, "a" * 32)
    assert LinkOffer.decode(offer.encode()) == offer


def test_the_receivers_output_maps_back_to_its_keys_and_nothing_else() -> None:
    keys = [f"1101011990010{i:05d}".encode() for i in range(50)]
    hashed = hashed_keys("q-1", keys, STANDARD)
    key_cells = cells(hashed)
    lines = input_file(key_cells).splitlines()
    assert lines[0] == b"key" and len(lines) == 51 and len(set(lines)) == 51
    # Each cell is the base64 of its key's 12 hash bytes, whatever the base64 digits are.
    assert [base64.b64decode(cell, validate=True) for cell in lines[1:]] == [
        hashed[i * 12 : i * 12 + 12] for i in range(50)
    ]
    output = [b'"' + lines[1 + i] + b'"' for i in (41, 3, 17)] + [lines[1]]  # any order, quotes
    assert matched_positions(key_cells, output) == [0, 3, 17, 41]
    assert matched_positions(key_cells, []) == []
    assert matched_positions(b"", []) == []
    # A hash of another query's keys (or no hash at all) is not one this node handed over.
    stranger = input_file(cells(hashed_keys("q-2", keys[:1], STANDARD))).splitlines()[1]
    assert matched_positions(key_cells, [lines[4], stranger]) is None
    assert matched_positions(key_cells, [lines[4], b"not base64"]) is None
    assert matched_positions(key_cells, [lines[4][:-1]]) is None  # a cell cut short


def failed_query(node: Node, dataset: str) -> str:
    records = [r for r in node.query_store.with_state(FAILED) if r.dataset == dataset]
    assert len(records) == 1, records
    return records[0].query_id


def assert_nothing_released(nodes: Nodes, names: tuple[str, str], reason: str) -> None:
    for node, dataset in ((nodes.tax, names[0]), (nodes.civil, names[1])):
        query_id = failed_query(node, dataset)
        # tax's reason only: civil's differs by test (the killed driver's test checks it).
        assert_ended_cleanly(node, query_id, reason if node is nodes.tax else None)
        if node is nodes.tax:
            assert nodes.tax.query_store.matches(query_id) == []
    assert leftovers() == ([], [])


def test_a_link_certificate_of_another_federation_is_refused(
    nodes: Nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """civil's driver presents a certificate named civil, issued by another federation's CA
    (and checks tax's against that CA): each side refuses the other in the handshake."""
    rng = random.Random(11)
    pool = [resident(rng, i) for i in range(80)]
    names = datasets(nodes, tmp_path, "wrongcert", pool[:50], pool[25:])
    engine = nodes.civil.psi.rr22
    assert engine is not None
    monkeypatch.setattr(engine, "tls", LinkTls.of_identity(nodes.foreign.node_home("civil")))
    with pytest.raises(GovshareError, match="refused in the TLS handshake"):
        run_psi(nodes.fed.identity("alice"), plan(names, RR22))
    assert_nothing_released(nodes, names, "TLS handshake")


def test_a_driver_without_the_peer_nodes_token_is_refused_on_the_link(
    nodes: Nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """civil's driver presents a token other than the one civil sent tax over gRPC, as a party
    that holds a federation certificate but is not civil's own driver would: tax's driver
    refuses it on the link, and neither node releases anything."""
    rng = random.Random(19)
    pool = [resident(rng, i) for i in range(80)]
    names = datasets(nodes, tmp_path, "token", pool[:50], pool[25:])
    engine = nodes.civil.psi.rr22
    assert engine is not None
    honest = engine.job

    def forged(*args: Any) -> dict[str, Any]:
        return {**honest(*args), "token": secrets.token_hex(16)}

    monkeypatch.setattr(engine, "job", forged)
    with pytest.raises(GovshareError):
        run_psi(nodes.fed.identity("alice"), plan(names, RR22))
    assert_nothing_released(nodes, names, "did not present the token its node sent")


def test_a_peer_driver_killed_mid_protocol_aborts_both_nodes(nodes: Nodes, tmp_path: Path) -> None:
    rng = random.Random(13)
    pool = [resident(rng, i) for i in range(80)]
    names = datasets(nodes, tmp_path, "killed", pool[:50], pool[25:])
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            run_psi(nodes.fed.identity("alice"), plan(names, RR22))
        except BaseException as exc:  # the outcome the test checks
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not (started := drivers("civil")) and thread.is_alive():
        assert time.monotonic() < deadline, "civil's driver never started"
        time.sleep(0.02)
    assert started, errors
    os.kill(started[0], signal.SIGKILL)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], GovshareError), errors
    # tax stops on civil's abort notice, on civil refusing tax's next message (its link offer)
    # for the query civil aborted, or on the analyst's program withdrawing the query once
    # civil's failure reached it: whichever comes first.
    assert_nothing_released(
        nodes, names,
        "node civil ended the query|was aborted on civil: civil: the rr22 engine failed"
        "|alice withdrew the query",
    )  # fmt: skip
    civil_failed = [
        e.decode().fields["reason"]
        for e in nodes.civil.audit.entries_for_query(failed_query(nodes.civil, names[1]))
        if e.decode().kind == "query.failed"
    ]
    assert "the rr22 engine failed with node tax" in civil_failed[0]


def test_cli_asks_membership_on_rr22(nodes: Nodes, tmp_path: Path) -> None:
    rng = random.Random(17)
    pool = [resident(rng, i) for i in range(60)]
    names = datasets(nodes, tmp_path, "cli", pool[:40], pool[10:])
    base = [
        sys.executable, "-m", "govshare.cli", "query", "psi",
        "--identity", str(nodes.fed.bundles["alice"]),
        "--left", f"tax.{names[0]}.id_number", "--right", f"civil.{names[1]}.id_number",
        "--purpose", PURPOSE, "--engine", "rr22", "--results", str(tmp_path / "results"),
    ]  # fmt: skip
    asked = subprocess.run(
        [*base, "--reveal", "members", "--to", "tax", "--epsilon", "2", "--json"],
        capture_output=True, text=True, timeout=WAIT, cwd=tmp_path,  # its receipt lands here
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    done = [r for r in nodes.tax.query_store.with_state(DONE) if r.dataset == names[0]]
    assert len(done) == 1 and len(nodes.tax.query_store.matches(done[0].query_id)) == 30
    refused = subprocess.run(
        [*base, "--reveal", "count"], capture_output=True, text=True, timeout=WAIT, cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "rr22 serves --reveal members only" in refused.stderr
