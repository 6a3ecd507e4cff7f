"""C2SP signed-note / tlog-checkpoint / tlog-cosignature: vectors, interop, round trips, fuzz."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.protocols.checkpoint import (
    MAX_SIGNATURES,
    Checkpoint,
    Note,
    NoteSignature,
    VerifierKey,
    cosign,
    open_checkpoint,
    open_cosignature,
    parse_checkpoint_unverified,
    sign_checkpoint,
    sign_note,
    verify_note,
)
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.merkle import MAX_TREE_SIZE
from govshare.protocols.suite import STANDARD

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors" / "checkpoint"
MANIFEST: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text("utf-8"))
EXTERNAL: dict[str, Any] = json.loads((VECTORS / "external" / "external.json").read_text("utf-8"))
LOG_VKEY = VerifierKey.parse(MANIFEST["keys"]["log"])
WITNESS_VKEY = VerifierKey.parse(MANIFEST["keys"]["witness"])
ERRORS: dict[str, type[Exception]] = {
    "MalformedInput": MalformedInput,
    "VerificationFailed": VerificationFailed,
}


def test_vectors_are_current(tmp_path: Path) -> None:
    """Re-run the generator as a real subprocess; its output must match the committed files."""
    subprocess.run(
        [sys.executable, str(VECTORS / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    generated = {p.name for p in tmp_path.iterdir()}
    committed = {p.name for p in VECTORS.iterdir() if p.suffix in (".txt", ".json")}
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name


def test_every_outcome_is_covered() -> None:
    outcomes = {(v["check"], v["expect"]) for v in MANIFEST["vectors"]}
    assert outcomes == {
        (check, expect)
        for check in ("checkpoint", "cosignature")
        for expect in ("ok", "MalformedInput", "VerificationFailed")
    }


@pytest.mark.parametrize(
    "vector", MANIFEST["vectors"], ids=[v["file"] for v in MANIFEST["vectors"]]
)
def test_vector(vector: dict[str, Any]) -> None:
    data = (VECTORS / vector["file"]).read_bytes()

    def check() -> tuple[Checkpoint, int | None]:
        if vector["check"] == "checkpoint":
            return open_checkpoint(data, LOG_VKEY.public_key, origin=MANIFEST["origin"]), None
        return open_cosignature(data, WITNESS_VKEY.public_key, name=WITNESS_VKEY.name)

    if vector["expect"] != "ok":
        with pytest.raises(ERRORS[vector["expect"]]):
            check()
        return
    checkpoint, cosigned_at = check()
    assert checkpoint.origin == vector["origin"]
    assert checkpoint.size == vector["size"]
    assert checkpoint.root == base64.b64decode(vector["root"])
    assert list(checkpoint.extensions) == vector["extensions"]
    assert cosigned_at == vector.get("cosigned_at")
    # Exact round trips of the wire format.
    assert Note.parse(data).encode() == data
    assert checkpoint.to_text() == Note.parse(data).text


def test_go_sumdb_note_example_is_reproduced_byte_for_byte() -> None:
    """Interop: Go's golang.org/x/mod/sumdb/note example note, from its published key."""
    data = (VECTORS / "external" / "go_sumdb_note_peterneumann.txt").read_bytes()
    meta = EXTERNAL["go_sumdb_note_peterneumann.txt"]
    vkey = VerifierKey.parse(meta["vkey"])
    assert vkey.encode() == meta["vkey"]
    seed = base64.b64decode(meta["skey"].split("+", 4)[4])[1:]  # type byte, then the seed
    private_key = STANDARD.signing_key_from_bytes(seed)
    text = meta["text"].encode()
    ours = Note(text, (sign_note(text, "PeterNeumann", private_key),)).encode()
    assert ours == data
    verify_note(Note.parse(data), "PeterNeumann", vkey.public_key)
    with pytest.raises(VerificationFailed):
        tampered = data.replace(b"cryptography", b"cryptographY")
        verify_note(Note.parse(tampered), "PeterNeumann", vkey.public_key)


def test_real_witness_cosignatures_verify() -> None:
    """Interop: four production witnesses' cosignatures on a real CT log checkpoint."""
    data = (VECTORS / "external" / "arche2025h1_cosigned.txt").read_bytes()
    meta = EXTERNAL["arche2025h1_cosigned.txt"]
    assert Note.parse(data).encode() == data
    for text in meta["witness_vkeys"]:
        vkey = VerifierKey.parse(text)
        assert vkey.encode() == text
        checkpoint, at = open_cosignature(data, vkey.public_key, name=vkey.name)
        assert (checkpoint.origin, checkpoint.size, at) == (
            meta["origin"],
            meta["size"],
            meta["cosigned_at"],
        )
        assert checkpoint.root == base64.b64decode(meta["root"])
        with pytest.raises(VerificationFailed):
            open_cosignature(
                data.replace(b"1432088532", b"1432088533"), vkey.public_key, name=vkey.name
            )


def test_log_signature_of_unknown_type_is_ignored_not_trusted() -> None:
    data = (VECTORS / "external" / "arche2025h1_cosigned.txt").read_bytes()
    witness = VerifierKey.parse(EXTERNAL["arche2025h1_cosigned.txt"]["witness_vkeys"][0])
    with pytest.raises(VerificationFailed):  # a cosigner key is not a note-signer key
        open_checkpoint(data, witness.public_key, origin="arche2025h1.staging.ct.transparency.dev")


# --- round trips and fuzz ---------------------------------------------------------------------

KEY = STANDARD.signing_key_from_bytes(bytes(range(32)))
WITNESS_KEY = STANDARD.signing_key_from_bytes(bytes(range(32, 64)))

line_text = st.text(alphabet=st.characters(min_codepoint=0x20, codec="utf-8"), min_size=1)
key_names = st.text(
    alphabet=st.characters(
        min_codepoint=0x21, codec="utf-8", exclude_categories=("Zs", "Zl", "Zp")
    ),
    min_size=1,
    max_size=40,
).filter(lambda n: "+" not in n and not any(ch.isspace() for ch in n))
checkpoints = st.builds(
    Checkpoint,
    origin=line_text,
    size=st.integers(0, MAX_TREE_SIZE - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(line_text, max_size=3).map(tuple),
)


@given(checkpoints)
def test_checkpoint_text_round_trip(checkpoint: Checkpoint) -> None:
    text = checkpoint.to_text()
    assert Checkpoint.from_text(text) == checkpoint
    assert Checkpoint.from_text(text).to_text() == text


@given(checkpoints, key_names, st.integers(0, 2**63 - 1))
def test_sign_open_cosign_round_trip(checkpoint: Checkpoint, witness: str, now: int) -> None:
    data = sign_checkpoint(checkpoint, KEY, name="log.example/a")
    public = KEY.public_key()
    assert open_checkpoint(data, public, origin=checkpoint.origin, name="log.example/a") == (
        checkpoint
    )
    cosig = cosign(checkpoint, WITNESS_KEY, name=witness, now=now)
    cosigned = Note.parse(data).with_signatures(cosig).encode()
    assert open_cosignature(cosigned, WITNESS_KEY.public_key(), name=witness) == (checkpoint, now)
    assert open_checkpoint(cosigned, public, origin=checkpoint.origin, name="log.example/a") == (
        checkpoint
    )
    assert parse_checkpoint_unverified(cosigned)[0] == checkpoint


@given(
    st.lists(
        st.builds(
            NoteSignature,
            name=key_names,
            key_id=st.binary(min_size=4, max_size=4),
            signature=st.binary(min_size=1, max_size=80),
        ),
        min_size=1,
        max_size=5,
    ).map(tuple),
    st.lists(line_text, min_size=1, max_size=4),
)
def test_note_round_trip(signatures: tuple[NoteSignature, ...], lines: list[str]) -> None:
    note = Note(("\n".join(lines) + "\n").encode(), signatures)
    data = note.encode()
    assert Note.parse(data) == note
    assert Note.parse(data).encode() == data


VALID = (VECTORS / "valid_cosigned.txt").read_bytes()


@given(st.integers(0, len(VALID) - 1), st.integers(1, 255))
def test_any_byte_change_is_rejected_with_a_govshare_error(position: int, xor: int) -> None:
    data = bytearray(VALID)
    data[position] ^= xor
    for check in (
        lambda: open_checkpoint(bytes(data), LOG_VKEY.public_key, origin=MANIFEST["origin"]),
        lambda: open_cosignature(bytes(data), WITNESS_VKEY.public_key, name=WITNESS_VKEY.name),
    ):
        try:
            check()
        except (MalformedInput, VerificationFailed):
            continue
        # Only a change inside the *other* party's signature line can leave this check passing.
        first_sig = VALID.index("\u2014".encode())
        assert position >= first_sig


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_govshare_errors(data: bytes) -> None:
    with pytest.raises((MalformedInput, VerificationFailed)):
        open_checkpoint(data, LOG_VKEY.public_key, origin=MANIFEST["origin"])


def test_too_many_signatures_is_malformed() -> None:
    text = Checkpoint("o", 0, bytes(32)).to_text()
    line = sign_note(text, "k", KEY)
    data = Note(text, (line,) * MAX_SIGNATURES).encode()
    Note.parse(data)
    with pytest.raises(MalformedInput):
        Note.parse(data + line.line())


def test_cosign_default_clock_and_bounds() -> None:
    checkpoint = Checkpoint("o", 1, bytes(32))
    before = int(time.time())
    sig = cosign(checkpoint, WITNESS_KEY, name="w")
    data = Note(checkpoint.to_text(), (sig,)).encode()
    _, at = open_cosignature(data, WITNESS_KEY.public_key(), name="w")
    assert before <= at <= int(time.time())
    for bad in (-1, 2**63):
        with pytest.raises(MalformedInput):
            cosign(checkpoint, WITNESS_KEY, name="w", now=bad)


@pytest.mark.parametrize(
    "vkey",
    [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # key ID
        "PeterNeumann+c74f20a3+ApqmvbdjcntaSyNRLCVlTahRpJ8EeqSmLhc5Ea1pmbWe",  # other key
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T",  # base64
        "PeterNeumann+c74f20a3",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_bad_vkeys_are_malformed(vkey: str) -> None:
    with pytest.raises(MalformedInput):
        VerifierKey.parse(vkey)


def test_api_misuse_is_type_error() -> None:
    with pytest.raises(TypeError):
        Note.parse("a string")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Checkpoint("o", True, bytes(32))
    with pytest.raises(TypeError):
        open_checkpoint(VALID, KEY, origin="o")  # type: ignore[arg-type]


@pytest.mark.parametrize("module", ["merkle.py", "checkpoint.py"])
def test_protocol_modules_are_pure(module: str) -> None:
    tree = ast.parse((REPO / "protocols" / module).read_text("utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"sqlite3", "grpc", "socket", "click", "http", "urllib", "os"}
