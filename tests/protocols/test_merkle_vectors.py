"""RFC 6962/9162 proof vectors from transparency-dev/merkle, run against govshare's verifier.

The vectors live in ``../shared/vectors/merkle`` (see its README); ``GOVSHARE_VECTORS`` overrides
the folder. A missing folder is a failure, not a skip: these vectors are the verifier's spec.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
    verify_witness_consistency,
)

EXPECTED_VECTOR_COUNT = 196  # README of ../shared/vectors/merkle: every one must pass


def _vectors_dir() -> Path:
    override = os.environ.get("GOVSHARE_VECTORS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "merkle"


VECTORS_DIR = _vectors_dir()
VECTOR_FILES = sorted(VECTORS_DIR.rglob("*.json")) if VECTORS_DIR.is_dir() else []


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _proof(value: list[str] | None) -> list[bytes]:
    return [_b64(item) for item in value or []]


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_vectors_folder_is_present_and_complete() -> None:
    assert VECTORS_DIR.is_dir(), f"Merkle vectors missing at {VECTORS_DIR} (set GOVSHARE_VECTORS)"
    assert len(VECTOR_FILES) == EXPECTED_VECTOR_COUNT
    kinds = {path.relative_to(VECTORS_DIR).parts[0] for path in VECTOR_FILES}
    assert kinds == {"inclusion", "consistency"}


@pytest.mark.parametrize(
    "path",
    VECTOR_FILES,
    ids=[str(path.relative_to(VECTORS_DIR)) for path in VECTOR_FILES],
)
def test_vector(path: Path) -> None:
    vector = _load(path)
    kind = path.relative_to(VECTORS_DIR).parts[0]
    if kind == "inclusion":

        def check() -> None:
            verify_inclusion(
                vector["leafIdx"],
                vector["treeSize"],
                _b64(vector["leafHash"]),
                _proof(vector["proof"]),
                _b64(vector["root"]),
            )

    else:

        def check() -> None:
            verify_consistency(
                vector["size1"],
                vector["size2"],
                _proof(vector["proof"]),
                _b64(vector["root1"]),
                _b64(vector["root2"]),
            )

    if vector["wantErr"]:
        with pytest.raises((VerificationFailed, MalformedInput)):
            check()
    else:
        check()


def _happy_inclusion() -> list[dict[str, Any]]:
    return [
        _load(p)
        for p in VECTOR_FILES
        if p.relative_to(VECTORS_DIR).parts[0] == "inclusion" and p.name == "happy-path.json"
    ]


def test_happy_vectors_exist() -> None:
    # Guards the tests below against vacuous passes.
    assert len(_happy_inclusion()) >= 4


def test_wrong_length_hashes_are_malformed_not_failed() -> None:
    vector = _happy_inclusion()[0]
    args = (vector["leafIdx"], vector["treeSize"], _b64(vector["leafHash"]))
    with pytest.raises(MalformedInput):
        verify_inclusion(*args, _proof(vector["proof"]), _b64(vector["root"])[:-1])
    with pytest.raises(MalformedInput):
        verify_inclusion(*args, [*_proof(vector["proof"]), b""], _b64(vector["root"]))


def test_consistency_from_zero_always_fails_but_witness_rule_accepts_empty_proof() -> None:
    """The vectors reject every proof from size 0; the tlog-witness path accepts 0 + empty."""
    new_root = root_hash([leaf_hash(b"a"), leaf_hash(b"b")])
    with pytest.raises(VerificationFailed):
        verify_consistency(0, 2, [], EMPTY_ROOT, new_root)
    verify_witness_consistency(0, 2, [], EMPTY_ROOT, new_root)
    verify_witness_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(VerificationFailed):
        verify_witness_consistency(0, 2, [new_root], EMPTY_ROOT, new_root)
    with pytest.raises(VerificationFailed):
        verify_witness_consistency(0, 2, [], new_root, new_root)
    with pytest.raises(VerificationFailed):
        verify_witness_consistency(0, 0, [], EMPTY_ROOT, new_root)


def test_known_answers_from_readme() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_hash([]) == EMPTY_ROOT
    assert (
        leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


# RFC 6962's reference tree of 8 leaves (transparency-dev/merkle rfc6962_test.go and the
# inclusion vectors above): leaf i is the i-th of these byte strings.
RFC6962_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]


def test_generated_proofs_match_every_happy_inclusion_vector() -> None:
    """Our generator, not only our verifier, agrees with the published proofs."""
    leaves = [leaf_hash(data) for data in RFC6962_LEAVES]
    matched = 0
    for vector in _happy_inclusion():
        size = vector["treeSize"]
        index = vector["leafIdx"]
        if size > len(leaves) or _b64(vector["leafHash"]) != leaves[index]:
            continue
        assert root_hash(leaves[:size]) == _b64(vector["root"])
        assert inclusion_proof(index, leaves[:size]) == _proof(vector["proof"])
        matched += 1
    assert matched >= 4


def test_generated_proofs_match_every_happy_consistency_vector() -> None:
    leaves = [leaf_hash(data) for data in RFC6962_LEAVES]
    matched = 0
    for path in VECTOR_FILES:
        if path.relative_to(VECTORS_DIR).parts[0] != "consistency":
            continue
        if path.name != "happy-path.json":
            continue
        vector = _load(path)
        size1, size2 = vector["size1"], vector["size2"]
        if size2 > len(leaves) or root_hash(leaves[:size2]) != _b64(vector["root2"]):
            continue
        assert root_hash(leaves[:size1]) == _b64(vector["root1"])
        assert consistency_proof(size1, leaves[:size2]) == _proof(vector["proof"])
        matched += 1
    assert matched >= 4
