"""Generate govshare's checkpoint known-answer vectors into this folder (or the folder given).

    .venv/bin/python tests/vectors/checkpoint/generate.py [OUTPUT_DIR]

Deterministic: fixed test keys derived from fixed seeds, a fixed cosignature time, and Ed25519's
deterministic signatures (RFC 8032). ``tests/protocols/test_checkpoint.py`` re-runs this script
into a temporary folder and requires byte-identical output, so the committed files are always
current.

Every ``*.txt`` is one raw note (exact bytes); ``vectors.json`` says, for each, which check to run
and what it must give. Files are named after what is wrong with them; ``valid_*`` ones are fine.
The keys are TEST KEYS ONLY: their seeds are printed right here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from govshare.protocols.checkpoint import (
    Checkpoint,
    Note,
    NoteSignature,
    VerifierKey,
    cosign,
    sign_note,
)
from govshare.protocols.merkle import EMPTY_ROOT, leaf_hash, root_hash
from govshare.protocols.suite import STANDARD, SigningKey

ORIGIN = "govshare.example/node-a/audit"
OTHER_ORIGIN = "govshare.example/node-z/audit"
WITNESS = "govshare.example/node-b/witness"
STRANGER = "stranger.example/log"
COSIGNED_AT = 1_700_000_000  # 2023-11-14T22:13:20Z, fixed so cosignatures are reproducible


def _key(label: str) -> SigningKey:
    return STANDARD.signing_key_from_bytes(hashlib.sha256(label.encode()).digest())


LOG_KEY = _key("govshare checkpoint test vector: log key")
WITNESS_KEY = _key("govshare checkpoint test vector: witness key")
STRANGER_KEY = _key("govshare checkpoint test vector: stranger key")

ROOT = root_hash([leaf_hash(f"entry {i}".encode()) for i in range(5)])
CHECKPOINT = Checkpoint(ORIGIN, 5, ROOT)


def _signed(text: bytes, *extra: NoteSignature, name: str = ORIGIN) -> bytes:
    return Note(text, (sign_note(text, name, LOG_KEY), *extra)).encode()


def _valid() -> bytes:
    return _signed(CHECKPOINT.to_text())


def _reencode_signature(note: bytes, index: int, edit: Callable[[bytes], bytes]) -> bytes:
    parsed = Note.parse(note)
    sig = parsed.signatures[index]
    raw = edit(sig.key_id + sig.signature)
    line = f"\u2014 {sig.name} {base64.b64encode(raw).decode()}\n".encode()
    lines = [s.line() for s in parsed.signatures]
    lines[index] = line
    return parsed.text + b"\n" + b"".join(lines)


def _flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0x01])


def _noncanonical(blob: str) -> str:
    """Set a padding bit that canonical base64 leaves zero (68 bytes -> one '=')."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    if not blob.endswith("=") or blob.endswith("=="):
        raise ValueError("expected exactly one '=' of padding")
    last = blob[-2]
    return blob[:-2] + alphabet[alphabet.index(last) | 1] + "="


def _cosigned(now: int = COSIGNED_AT) -> bytes:
    cosig = cosign(CHECKPOINT, WITNESS_KEY, name=WITNESS, now=now)
    return _signed(CHECKPOINT.to_text(), cosig)


def build() -> tuple[dict[str, bytes], list[dict[str, object]]]:
    text = CHECKPOINT.to_text()
    root_b64 = base64.b64encode(ROOT).decode()
    files: dict[str, bytes] = {}
    manifest: list[dict[str, object]] = []

    def add(name: str, data: bytes, check: str, expect: str, description: str) -> None:
        files[f"{name}.txt"] = data
        entry: dict[str, object] = {
            "file": f"{name}.txt",
            "check": check,
            "expect": expect,
            "description": description,
        }
        manifest.append(entry)

    def ok(name: str, data: bytes, check: str, cp: Checkpoint, desc: str, at: int = 0) -> None:
        add(name, data, check, "ok", desc)
        manifest[-1]["origin"] = cp.origin
        manifest[-1]["size"] = cp.size
        manifest[-1]["root"] = base64.b64encode(cp.root).decode()
        manifest[-1]["extensions"] = list(cp.extensions)
        if check == "cosignature":
            manifest[-1]["cosigned_at"] = at

    ext = Checkpoint(ORIGIN, 5, ROOT, ("govshare-extension one", "two"))
    empty = Checkpoint(ORIGIN, 0, EMPTY_ROOT)
    stranger_sig = sign_note(text, STRANGER, STRANGER_KEY)
    same_name_other_key = sign_note(text, ORIGIN, STRANGER_KEY)

    ok("valid", _valid(), "checkpoint", CHECKPOINT, "log signature only")
    ok("valid_with_extensions", _signed(ext.to_text()), "checkpoint", ext, "two extension lines")
    ok("valid_empty_tree", _signed(empty.to_text()), "checkpoint", empty, "size 0, SHA-256('')")
    ok("valid_cosigned", _cosigned(), "checkpoint", CHECKPOINT, "log signature + cosignature")
    ok(
        "valid_cosignature",
        _cosigned(),
        "cosignature",
        CHECKPOINT,
        "the witness's cosignature on the same note",
        COSIGNED_AT,
    )
    ok(
        "valid_unknown_signer_ignored",
        _signed(text, stranger_sig),
        "checkpoint",
        CHECKPOINT,
        "an extra line from an unknown key is ignored",
    )
    ok(
        "valid_same_name_other_key_ignored",
        Note(text, (same_name_other_key, sign_note(text, ORIGIN, LOG_KEY))).encode(),
        "checkpoint",
        CHECKPOINT,
        "same name, other key (other key ID): ignored, not a failure",
    )

    valid = _valid()
    add(
        "signature_truncated",
        _reencode_signature(valid, 0, lambda raw: raw[:-1]),
        "checkpoint",
        "MalformedInput",
        "log signature is 63 bytes",
    )
    add(
        "signature_bit_flipped",
        _reencode_signature(valid, 0, _flip_last_byte),
        "checkpoint",
        "VerificationFailed",
        "one bit of the log signature flipped",
    )
    blob = valid.decode().rsplit(" ", 1)[1].rstrip("\n")
    add(
        "signature_bad_base64",
        valid.replace(blob.encode(), b"!" + blob[1:].encode()),
        "checkpoint",
        "MalformedInput",
        "'!' in the signature's base64",
    )
    add(
        "signature_noncanonical_base64",
        valid.replace(blob.encode(), _noncanonical(blob).encode()),
        "checkpoint",
        "MalformedInput",
        "base64 with a non-zero padding bit",
    )
    add(
        "signature_missing",
        text + b"\n",
        "checkpoint",
        "MalformedInput",
        "blank line but no signature lines",
    )
    add(
        "signature_only_unknown_key",
        Note(text, (stranger_sig,)).encode(),
        "checkpoint",
        "VerificationFailed",
        "signed, but not by the log's key",
    )
    add(
        "signature_key_id_wrong",
        _reencode_signature(valid, 0, lambda raw: bytes([raw[0] ^ 0x80]) + raw[1:]),
        "checkpoint",
        "VerificationFailed",
        "right name, wrong key ID: the line is not the log's, so nothing verifies",
    )
    add(
        "signature_line_hyphen_not_em_dash",
        valid.replace("\u2014 ".encode(), b"- "),
        "checkpoint",
        "MalformedInput",
        "'-' instead of U+2014",
    )
    add(
        "signature_line_double_space",
        valid.replace(f" {blob}".encode(), f"  {blob}".encode()),
        "checkpoint",
        "MalformedInput",
        "two spaces before the signature",
    )
    add(
        "signature_line_no_final_newline",
        valid[:-1],
        "checkpoint",
        "MalformedInput",
        "note does not end with a newline",
    )
    add(
        "blank_line_missing",
        valid.replace(b"\n\n", b"\n", 1),
        "checkpoint",
        "MalformedInput",
        "no blank line between text and signatures",
    )
    add(
        "body_size_changed_after_signing",
        valid.replace(b"\n5\n", b"\n6\n", 1),
        "checkpoint",
        "VerificationFailed",
        "size edited after signing",
    )
    add(
        "origin_unexpected",
        _signed(Checkpoint(OTHER_ORIGIN, 5, ROOT).to_text(), name=ORIGIN),
        "checkpoint",
        "VerificationFailed",
        "validly signed by the log key for another origin",
    )
    # Malformed bodies carry a *valid* log signature, so only the body parser can reject them.
    bad_bodies = {
        "body_size_leading_zero": text.replace(b"\n5\n", b"\n05\n", 1),
        "body_size_plus_sign": text.replace(b"\n5\n", b"\n+5\n", 1),
        "body_size_negative": text.replace(b"\n5\n", b"\n-5\n", 1),
        "body_size_beyond_uint64": text.replace(b"\n5\n", f"\n{2**64}\n".encode(), 1),
        "body_size_non_ascii_digit": text.replace(b"\n5\n", "\n\u0665\n".encode(), 1),
        "body_root_short": text.replace(root_b64.encode(), base64.b64encode(ROOT[:31]), 1),
        "body_root_noncanonical_base64": text.replace(
            root_b64.encode(), root_b64[:-2].encode() + b"R=", 1
        ),
        "body_root_line_missing": f"{ORIGIN}\n5\n".encode(),
        "body_origin_empty": b"\n" + text.split(b"\n", 1)[1],
        "body_empty_extension_line": text + b"\next\n",
        "body_carriage_return": text.replace(b"\n", b"\r\n"),
        "body_tab_in_origin": text.replace(b"node-a", b"node\ta", 1),
        "body_invalid_utf8": text.replace(b"node-a", b"node-\xff", 1),
    }
    for name, body in bad_bodies.items():
        note = body + b"\n" + sign_note(body, ORIGIN, LOG_KEY).line()
        add(name, note, "checkpoint", "MalformedInput", "validly signed malformed body")

    cosigned = _cosigned()
    add(
        "cosignature_bit_flipped",
        _reencode_signature(cosigned, 1, _flip_last_byte),
        "cosignature",
        "VerificationFailed",
        "one bit of the witness's Ed25519 signature flipped",
    )
    add(
        "cosignature_time_changed",
        _reencode_signature(
            cosigned, 1, lambda raw: raw[:4] + struct.pack(">Q", COSIGNED_AT + 1) + raw[12:]
        ),
        "cosignature",
        "VerificationFailed",
        "timestamp edited after cosigning",
    )
    add(
        "cosignature_truncated",
        _reencode_signature(cosigned, 1, lambda raw: raw[:-1]),
        "cosignature",
        "MalformedInput",
        "cosignature is 8 + 63 bytes",
    )
    add(
        "cosignature_time_beyond_int63",
        _reencode_signature(cosigned, 1, lambda raw: raw[:4] + struct.pack(">Q", 2**63) + raw[12:]),
        "cosignature",
        "MalformedInput",
        "timestamp 2**63 exceeds the spec's limit",
    )
    add(
        "cosignature_missing",
        valid,
        "cosignature",
        "VerificationFailed",
        "the note carries no line from the witness",
    )
    add(
        "cosignature_by_log_key_type",
        _signed(text, sign_note(text, WITNESS, WITNESS_KEY)),
        "cosignature",
        "VerificationFailed",
        "the witness key signed as a plain note signer (type 0x01): wrong key ID, ignored",
    )
    return files, manifest


def keys_document() -> dict[str, str]:
    return {
        "log": VerifierKey(ORIGIN, False, LOG_KEY.public_key()).encode(),
        "witness": VerifierKey(WITNESS, True, WITNESS_KEY.public_key()).encode(),
        "stranger": VerifierKey(STRANGER, False, STRANGER_KEY.public_key()).encode(),
    }


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files, manifest = build()
    written: list[Path] = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        written.append(out / name)
    document = {
        "generator": "tests/vectors/checkpoint/generate.py",
        "origin": ORIGIN,
        "witness": WITNESS,
        "keys": keys_document(),
        "vectors": manifest,
    }
    manifest_path = out / "vectors.json"
    manifest_path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", "utf-8")
    written.append(manifest_path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for path in write(target):
        print(path.name)
