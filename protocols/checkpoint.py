"""Signed checkpoints: C2SP signed-note, tlog-checkpoint and tlog-cosignature, under the
federation's crypto suite (Ed25519 in ``standard``, SM2-with-SM3 in ``sm``).

Specs: https://c2sp.org/signed-note@v1.0.0, https://c2sp.org/tlog-checkpoint@v1.0.0,
https://c2sp.org/tlog-cosignature@v1.0.0.

A checkpoint is a signed note whose text is ::

    <origin>\\n<tree size, ASCII decimal>\\n<base64 root hash>\\n[<extension line>\\n ...]

followed by a blank line and signature lines ``— <key name> <base64(key id || signature)>\\n``.

- The log signs the note text with Ed25519 (signature type 0x01); key ID =
  ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``. Under the SM suite the same note carries
  an SM2 signature of type ``0xff || "govshare-sm2-sm3"`` and an SM3 key ID, and a cosignature
  is of type ``0xff || "govshare-sm2-sm3-cosignature/v1"`` (:mod:`govshare.protocols.suite`
  documents both). Keys carry their suite, so one verifier never accepts the other suite's
  signature. A valid log signature means: the log's key
  holder asserts that its tree of ``size`` leaves has root ``root``. Because the log never signs two
  inconsistent checkpoints, two valid checkpoints that fail a consistency proof prove misbehaviour.
- A witness cosignature (type 0x04) signs ``"cosignature/v1\\ntime <t>\\n" || note text`` and
  carries ``u64 big-endian t || Ed25519 signature``. It means: as of time ``t`` (unix seconds), this
  is the largest consistent tree the witness has seen for the origin. Extension lines are signed
  but the witness makes no statement about them.
- Verifiers are configured with (name, public key) and ignore signature lines of other keys; a
  line that matches a known key and fails to verify rejects the whole note; a note with no verified
  known signature is rejected. Key IDs are identifiers, not security: the public key is.

Parsing is strict and byte-exact: a note that parses re-encodes to the same bytes. Anything
malformed raises :class:`MalformedInput`; a failed signature, an unknown signer or an unexpected
origin raises the detail-free :class:`VerificationFailed`. The note text must be ignored unless
:func:`open_checkpoint` accepted it.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import time
from dataclasses import dataclass

from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.merkle import HASH_SIZE, MAX_TREE_SIZE
from govshare.protocols.suite import SM, STANDARD, SigningKey, Suite, VerifyKey, suite_by_name

SIGNATURE_TYPE_ED25519 = 0x01  # signed-note §Signature types
SIGNATURE_TYPE_COSIGNATURE_V1 = 0x04  # signed-note §Signature types, tlog-cosignature
KEY_ID_SIZE = 4  # signed-note: uint32 key ID
SIGNATURE_SIZE = 64  # Ed25519 (RFC 8032) and SM2 as r || s
MAX_SIGNATURES = 100  # Go's golang.org/x/mod/sumdb/note cap; signed-note requires at least 16
MAX_NOTE_SIZE = 1 << 20  # defensive cap on a whole note; ours are a few hundred bytes
MAX_COSIGNATURE_TIME = 2**63 - 1  # tlog-cosignature: timestamp MUST NOT exceed 2^63 - 1
COSIGNATURE_HEADER = b"cosignature/v1\n"

_SIGNATURE_PREFIX = "\u2014 "  # em dash and a space
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)", re.ASCII)


def _malformed(message: str, field: str) -> MalformedInput:
    return MalformedInput(message, field=field)


def _strict_b64decode(text: str, field: str) -> bytes:
    """Standard base64 with padding, canonical only (re-encodes to the same text)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise _malformed(f"{field} is not valid base64", field) from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise _malformed(f"{field} is not canonical base64", field)
    return raw


def _check_key_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError("key name must be a str")
    if not name or any(ch.isspace() or ch == "+" or ord(ch) < 0x20 for ch in name):
        raise _malformed("key name must be non-empty, without spaces or '+'", "name")
    return name


def _suite_of(key: object) -> Suite:
    """The suite of a public key (a :class:`VerifyKey`; anything else is a TypeError)."""
    if not isinstance(key, VerifyKey):
        raise TypeError("public_key must be a suite's VerifyKey")
    return suite_by_name(key.suite)


def _signing_suite(key: object) -> Suite:
    if not isinstance(key, SigningKey):
        raise TypeError("private_key must be a suite's SigningKey")
    return suite_by_name(key.suite)


def signer_key_id(name: str, public_key: VerifyKey) -> bytes:
    """Key ID of a log's note signer (Ed25519: type 0x01; SM2: its suite's type)."""
    _check_key_name(name)
    return _suite_of(public_key).note_key_id(name, public_key.raw)


def cosignature_key_id(name: str, public_key: VerifyKey) -> bytes:
    """Key ID of a witness cosigner (Ed25519: type 0x04; SM2: its suite's type)."""
    _check_key_name(name)
    suite = _suite_of(public_key)
    return suite.note_key_id(name, public_key.raw, signature_type=suite.cosignature_type)


def _vkey_types() -> dict[bytes, tuple[Suite, bool]]:
    """Every known vkey type prefix: its suite, and whether it is a cosigner's."""
    return {
        kind: (suite, cosigner)
        for suite in (STANDARD, SM)
        for kind, cosigner in ((suite.note_signature_type, False), (suite.cosignature_type, True))
    }


@dataclass(frozen=True)
class VerifierKey:
    """A signed-note verifier key ("vkey"): ``<name>+<hex key ID>+<base64(type || key)>``.

    Types: the suite's note signer (Ed25519 0x01, e.g. a log) and cosigner (Ed25519 0x04), and
    their SM2 counterparts (:mod:`govshare.protocols.suite`).
    """

    name: str
    cosigner: bool
    public_key: VerifyKey

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        _suite_of(self.public_key)

    @property
    def signature_type(self) -> bytes:
        suite = _suite_of(self.public_key)
        return suite.cosignature_type if self.cosigner else suite.note_signature_type

    @property
    def key_id(self) -> bytes:
        if self.cosigner:
            return cosignature_key_id(self.name, self.public_key)
        return signer_key_id(self.name, self.public_key)

    def encode(self) -> str:
        blob = self.signature_type + self.public_key.raw
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(blob).decode('ascii')}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Parse a vkey strictly; the key ID must match the name, type and key.

        Raises:
            MalformedInput: wrong shape, unsupported type, bad key or mismatched key ID.
        """
        if not isinstance(text, str):
            raise TypeError("vkey must be a str")
        parts = text.split("+", 2)  # the base64 part may itself contain '+'
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1], re.ASCII):
            raise _malformed("vkey must be <name>+<8 hex digits>+<base64>", "vkey")
        name, kid_hex, blob_text = parts
        blob = _strict_b64decode(blob_text, "vkey")
        match = next(
            (
                (kind, suite, cosigner)
                for kind, (suite, cosigner) in _vkey_types().items()
                if blob.startswith(kind) and len(blob) == len(kind) + suite.public_key_size
            ),
            None,
        )
        if match is None:
            raise _malformed("vkey must hold a known signature type and its key", "vkey")
        kind, suite, cosigner = match
        try:
            public_key = suite.verify_key(blob[len(kind) :])
        except MalformedInput as exc:
            what = suite.signature_algorithm
            raise _malformed(f"vkey holds an invalid {what} key", "vkey") from exc
        vkey = cls(_check_key_name(name), cosigner, public_key)
        if vkey.key_id.hex() != kid_hex:
            raise _malformed("vkey key ID does not match its name and key", "vkey")
        return vkey


# --- signed notes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID, and the algorithm's signature bytes."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if len(self.key_id) != KEY_ID_SIZE:
            raise MalformedInput("key ID is 4 bytes", field="key_id")
        if not self.signature:
            raise MalformedInput("signature is empty", field="signature")

    def line(self) -> bytes:
        """The line ``— <name> <base64(key id || signature)>\\n``."""
        blob = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{_SIGNATURE_PREFIX}{self.name} {blob}\n".encode()

    @classmethod
    def parse_line(cls, line: str) -> NoteSignature:
        """Parse one signature line without its final newline."""
        if not line.startswith(_SIGNATURE_PREFIX):
            raise _malformed("signature line must start with an em dash and a space", "line")
        parts = line[len(_SIGNATURE_PREFIX) :].split(" ")
        if len(parts) != 2:
            raise _malformed("signature line must be '— <name> <signature>'", "line")
        name, blob = parts
        raw = _strict_b64decode(blob, "signature")
        if len(raw) <= KEY_ID_SIZE:
            raise _malformed("signature is shorter than its key ID", "signature")
        return cls(_check_key_name(name), raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


@dataclass(frozen=True)
class Note:
    """A signed note: ``text`` (UTF-8, ending in a newline) and at least one signature."""

    text: bytes
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.text, bytes) or not isinstance(self.signatures, tuple):
            raise TypeError("text must be bytes and signatures a tuple")
        if not self.text.endswith(b"\n"):
            raise MalformedInput("note text must end with a newline", field="text")
        if not self.signatures:
            raise MalformedInput("a note needs at least one signature", field="signatures")

    def encode(self) -> bytes:
        """The wire form: text, a blank line, the signature lines."""
        return self.text + b"\n" + b"".join(sig.line() for sig in self.signatures)

    def with_signatures(self, *signatures: NoteSignature) -> Note:
        """The same note with ``signatures`` appended (e.g. witness cosignatures)."""
        combined = self.signatures + signatures
        if len(combined) > MAX_SIGNATURES:
            raise MalformedInput(f"more than {MAX_SIGNATURES} signatures", field="signatures")
        return Note(self.text, combined)

    @classmethod
    def parse(cls, data: bytes) -> Note:
        """Parse a signed note strictly (signed-note §Format).

        Raises:
            MalformedInput: invalid UTF-8, control characters, no blank line, a bad signature
                line, no signatures, too many signatures, or an oversized note.
        """
        if not isinstance(data, bytes):
            raise TypeError("note must be bytes")
        if len(data) > MAX_NOTE_SIZE:
            raise _malformed(f"note exceeds {MAX_NOTE_SIZE} bytes", "note")
        try:
            decoded = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed("note is not valid UTF-8", "note") from exc
        if any(ord(ch) < 0x20 and ch != "\n" for ch in decoded):
            raise _malformed("note contains a control character", "note")
        split = data.rfind(b"\n\n")
        if split < 0:
            raise _malformed("note has no blank line before its signatures", "note")
        text, block = data[: split + 1], data[split + 2 :]
        if not block.endswith(b"\n"):
            raise _malformed("signature block must end with a newline", "signatures")
        lines = block[:-1].decode("utf-8").split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise _malformed(f"more than {MAX_SIGNATURES} signatures", "signatures")
        signatures = tuple(NoteSignature.parse_line(line) for line in lines)
        return cls(text, signatures)


def sign_note(text: bytes, name: str, private_key: SigningKey) -> NoteSignature:
    """Note signature over ``text`` under the key's suite (Ed25519 type 0x01, deterministic;
    SM2 with the suite's type, randomised inside Tongsuo)."""
    _signing_suite(private_key)
    kid = signer_key_id(name, private_key.public_key())
    return NoteSignature(name, kid, private_key.sign(text))


def verify_note(note: Note, name: str, public_key: VerifyKey) -> None:
    """Verify the note under the known key (name, public key), per signed-note §Signatures.

    Lines from other keys are ignored; any line matching the key that fails rejects the note.

    Raises:
        VerificationFailed: no line of this key, or one that does not verify.
    """
    kid = signer_key_id(name, public_key)
    matching = [s for s in note.signatures if s.name == name and s.key_id == kid]
    if not matching:
        raise VerificationFailed()
    for sig in matching:
        if len(sig.signature) != SIGNATURE_SIZE:
            raise MalformedInput("a note signature must be 64 bytes", field="signature")
        public_key.verify(sig.signature, note.text)


# --- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: ``origin`` names the log, ``size`` leaves, RFC 6962 ``root``."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not isinstance(self.root, bytes):
            raise TypeError("origin must be str and root bytes")
        if not isinstance(self.size, int) or isinstance(self.size, bool):
            raise TypeError("size must be an int")
        if not isinstance(self.extensions, tuple):
            raise TypeError("extensions must be a tuple")
        if not self.origin or "\n" in self.origin or _has_control(self.origin):
            raise MalformedInput("origin must be one non-empty line", field="origin")
        if not 0 <= self.size < MAX_TREE_SIZE:
            raise MalformedInput("size is outside [0, 2**64)", field="size")
        if len(self.root) != HASH_SIZE:
            raise MalformedInput(f"root is not {HASH_SIZE} bytes", field="root")
        for line in self.extensions:
            if not isinstance(line, str):
                raise TypeError("extension lines must be str")
            if not line or "\n" in line or _has_control(line):
                raise MalformedInput("extension lines must be non-empty lines", field="extension")

    def to_text(self) -> bytes:
        """The note text (the signed body), ending in a newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        lines.extend(self.extensions)
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def from_text(cls, text: bytes) -> Checkpoint:
        """Parse a checkpoint body strictly (tlog-checkpoint §Note text).

        Raises:
            MalformedInput: fewer than three lines, an empty line, a size with a sign, leading
                zero or beyond uint64, a root that is not canonical base64 of 32 bytes.
        """
        if not isinstance(text, bytes):
            raise TypeError("checkpoint text must be bytes")
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed("checkpoint is not valid UTF-8", "checkpoint") from exc
        if not decoded.endswith("\n"):
            raise _malformed("checkpoint text must end with a newline", "checkpoint")
        lines = decoded[:-1].split("\n")
        if len(lines) < 3:
            raise _malformed("checkpoint needs origin, size and root lines", "checkpoint")
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text):
            raise _malformed("size must be decimal without sign or leading zeros", "size")
        size = int(size_text)
        if size >= MAX_TREE_SIZE:
            raise _malformed("size is beyond uint64", "size")
        root = _strict_b64decode(root_text, "root")
        return cls(origin, size, root, tuple(extensions))


def _has_control(value: str) -> bool:
    return any(ord(ch) < 0x20 for ch in value)


def sign_checkpoint(
    checkpoint: Checkpoint, private_key: SigningKey, *, name: str | None = None
) -> bytes:
    """Return the signed note for ``checkpoint``; the key name defaults to the origin.

    A log MUST NOT sign a checkpoint inconsistent with one it signed before; callers (the audit
    log) only sign their own append-only tree.
    """
    text = checkpoint.to_text()
    return Note(text, (sign_note(text, name or checkpoint.origin, private_key),)).encode()


def open_checkpoint(
    data: bytes,
    public_key: VerifyKey,
    *,
    origin: str,
    name: str | None = None,
) -> Checkpoint:
    """Verify a signed checkpoint from the log ``origin`` and return it.

    The key name defaults to ``origin``. Signatures of other keys (witnesses) are ignored here.

    Raises:
        MalformedInput: the note or its body is malformed.
        VerificationFailed: no valid signature by the key, or the origin is not ``origin``.
    """
    note = Note.parse(data)
    verify_note(note, name or origin, public_key)
    checkpoint = Checkpoint.from_text(note.text)
    if checkpoint.origin != origin:
        raise VerificationFailed()
    return checkpoint


def parse_checkpoint_unverified(data: bytes) -> tuple[Checkpoint, Note]:
    """Parse a signed checkpoint *without verifying anything*, e.g. to pick the right key.

    Security: the result must not be trusted; call :func:`open_checkpoint` before using it.
    """
    note = Note.parse(data)
    return Checkpoint.from_text(note.text), note


# --- witness cosignatures ---------------------------------------------------------------------


def _cosigned_message(text: bytes, timestamp: int) -> bytes:
    return COSIGNATURE_HEADER + b"time " + str(timestamp).encode("ascii") + b"\n" + text


def cosign(
    checkpoint: Checkpoint,
    private_key: SigningKey,
    *,
    name: str,
    now: int | None = None,
) -> NoteSignature:
    """Return a tlog-cosignature/v1 line over ``checkpoint`` at ``now`` (unix seconds).

    ``now`` defaults to the system clock; known-answer tests pass it. The caller (a witness) must
    first check that ``checkpoint`` is consistent with the last one it cosigned for the origin:
    the cosignature asserts exactly that.

    Raises:
        MalformedInput: ``now`` is negative or beyond 2^63 - 1.
    """
    _signing_suite(private_key)
    timestamp = int(time.time()) if now is None else now
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise TypeError("now must be an int")
    if not 0 <= timestamp <= MAX_COSIGNATURE_TIME:
        raise MalformedInput("cosignature time is outside [0, 2**63 - 1]", field="now")
    signature = private_key.sign(_cosigned_message(checkpoint.to_text(), timestamp))
    kid = cosignature_key_id(name, private_key.public_key())
    return NoteSignature(name, kid, struct.pack(">Q", timestamp) + signature)


def open_cosignature(data: bytes, public_key: VerifyKey, *, name: str) -> tuple[Checkpoint, int]:
    """Verify the witness ``name``'s cosignature on a checkpoint note; return it and its time.

    This checks the witness only; check the log's own signature with :func:`open_checkpoint`.

    Raises:
        MalformedInput: the note, body or cosignature is malformed.
        VerificationFailed: no cosignature by this witness key, or one that does not verify.
    """
    note = Note.parse(data)
    checkpoint = Checkpoint.from_text(note.text)
    kid = cosignature_key_id(name, public_key)
    matching = [s for s in note.signatures if s.name == name and s.key_id == kid]
    if not matching:
        raise VerificationFailed()
    timestamps: list[int] = []
    for sig in matching:
        if len(sig.signature) != 8 + SIGNATURE_SIZE:
            raise MalformedInput("cosignature must be 8 + 64 bytes", field="cosignature")
        (timestamp,) = struct.unpack(">Q", sig.signature[:8])
        if timestamp > MAX_COSIGNATURE_TIME:
            raise MalformedInput("cosignature time exceeds 2**63 - 1", field="cosignature")
        public_key.verify(sig.signature[8:], _cosigned_message(note.text, timestamp))
        timestamps.append(timestamp)
    return checkpoint, max(timestamps)
