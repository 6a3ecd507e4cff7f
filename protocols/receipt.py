"""Query receipts: from every node that took part, a log entry and its inclusion proof under a
signed checkpoint (DESIGN.md, "Audit log").

A receipt says: each named node's signed, append-only audit log holds, at ``index``, the entry
``entry`` that records query ``query_id``. It is checked offline against the nodes' Ed25519 keys
from the federation roster:

1. the checkpoint note verifies under the node's key, for the node's log origin
   (:func:`govshare.protocols.checkpoint.open_checkpoint`);
2. the entry decodes canonically (:func:`govshare.protocols.auditverify.decode_entry`), its
   ``query_id`` is the receipt's and its ``index`` is the part's;
3. the RFC 9162 inclusion proof puts ``SHA-256(0x00 || entry)`` at ``index`` in the tree of the
   checkpoint's size and root (:func:`govshare.protocols.merkle.verify_inclusion`).

What it does not prove: that the node recorded *every* step of the query (only the entries in
the receipt), or that the checkpoint is the node's latest; an auditor who keeps the node's last
verified checkpoint checks that separately (consistency). A receipt reveals the entries it
carries and ``log2(size)`` hashes per part, nothing else of the logs.

Wire form (JSON, UTF-8, keys sorted, no whitespace), bytes as canonical standard base64 ::

    {"format":"govshare-receipt/1","parts":[{"checkpoint":b64,"entry":b64,"index":int,
     "node":str,"proof":[b64,...]}, ...],"query_id":str}

Parsing is strict: exactly these keys, these types, canonical base64, at least one part, no
part repeated; anything else raises :class:`MalformedInput`. A failed check raises
:class:`VerificationFailed` naming the part and the check (never a secret-dependent value).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from govshare.protocols.auditverify import AuditEntry, decode_entry
from govshare.protocols.canonical import canonical_json
from govshare.protocols.checkpoint import MAX_NOTE_SIZE, Checkpoint, open_checkpoint
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.merkle import HASH_SIZE, MAX_TREE_SIZE, tree_hasher
from govshare.protocols.suite import VerifyKey, suite_by_name

RECEIPT_FORMAT = "govshare-receipt/1"
MAX_PARTS = 1000  # one part per entry of a query per node; a federation has tens of nodes
MAX_PROOF_HASHES = 64  # a uint64-sized tree has at most 64 levels (RFC 9162 §2.1.3)
MAX_RECEIPT_SIZE = 64 << 20  # defensive cap on a whole receipt file

_RECEIPT_KEYS = frozenset({"format", "parts", "query_id"})
_PART_KEYS = frozenset({"checkpoint", "entry", "index", "node", "proof"})


@dataclass(frozen=True)
class ReceiptPart:
    """One node's evidence: the entry bytes, their index, the proof and the signed checkpoint."""

    node: str
    entry: bytes
    index: int
    proof: tuple[bytes, ...]
    checkpoint: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not isinstance(self.entry, bytes):
            raise TypeError("node must be str and entry bytes")
        if not isinstance(self.checkpoint, bytes) or not isinstance(self.proof, tuple):
            raise TypeError("checkpoint must be bytes and proof a tuple")
        if not isinstance(self.index, int) or isinstance(self.index, bool):
            raise TypeError("index must be an int")
        if not self.node:
            raise MalformedInput("a receipt part needs a node name", field="node")
        if not 0 <= self.index < MAX_TREE_SIZE:
            raise MalformedInput("index is outside [0, 2**64)", field="index")
        if len(self.proof) > MAX_PROOF_HASHES:
            raise MalformedInput("inclusion proof is too long", field="proof")
        for value in self.proof:
            if not isinstance(value, bytes):
                raise TypeError("proof hashes must be bytes")
            if len(value) != HASH_SIZE:
                raise MalformedInput(f"proof hashes are {HASH_SIZE} bytes", field="proof")
        if not self.entry:
            raise MalformedInput("entry is empty", field="entry")
        if not self.checkpoint or len(self.checkpoint) > MAX_NOTE_SIZE:
            raise MalformedInput("checkpoint is empty or oversized", field="checkpoint")


@dataclass(frozen=True)
class Receipt:
    query_id: str
    parts: tuple[ReceiptPart, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.query_id, str) or not isinstance(self.parts, tuple):
            raise TypeError("query_id must be str and parts a tuple")
        if not self.query_id:
            raise MalformedInput("a receipt needs a query id", field="query_id")
        if not self.parts:
            raise MalformedInput("a receipt needs at least one part", field="parts")
        if len(self.parts) > MAX_PARTS:
            raise MalformedInput(f"more than {MAX_PARTS} parts", field="parts")
        seen: set[tuple[str, int]] = set()
        for part in self.parts:
            if not isinstance(part, ReceiptPart):
                raise TypeError("parts must be ReceiptPart")
            key = (part.node, part.index)
            if key in seen:
                raise MalformedInput(
                    f"entry {part.index} of {part.node} appears twice", field="parts"
                )
            seen.add(key)


@dataclass(frozen=True)
class LogKey:
    """How to check one node's checkpoints: its log origin and its roster Ed25519 key."""

    origin: str
    public_key: VerifyKey


@dataclass(frozen=True)
class VerifiedPart:
    node: str
    index: int
    entry: AuditEntry
    checkpoint: Checkpoint


PartTuple = tuple[str, bytes, int, Sequence[bytes], bytes]
"""``(node, entry bytes, entry index, inclusion proof, signed checkpoint note)``."""


def make_receipt(query_id: str, parts: Iterable[PartTuple | ReceiptPart]) -> Receipt:
    """Build a receipt from each node's ``(node, entry, index, proof, checkpoint note)``.

    Nothing is verified here (the query path has just produced the parts); call
    :func:`verify_receipt` to check one.

    Raises:
        MalformedInput: no parts, a repeated (node, index), a hash of the wrong length.
        TypeError: a part of the wrong shape.
    """
    built: list[ReceiptPart] = []
    for part in parts:
        if isinstance(part, ReceiptPart):
            built.append(part)
            continue
        if not isinstance(part, tuple) or len(part) != 5:
            raise TypeError("a part is (node, entry, index, proof, checkpoint)")
        node, entry, index, proof, checkpoint = part
        built.append(ReceiptPart(node, entry, index, tuple(proof), checkpoint))
    return Receipt(query_id, tuple(built))


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def encode_receipt(receipt: Receipt) -> bytes:
    """The canonical JSON bytes of ``receipt`` (see the module docstring)."""
    value = {
        "format": RECEIPT_FORMAT,
        "query_id": receipt.query_id,
        "parts": [
            {
                "node": part.node,
                "index": part.index,
                "entry": _b64(part.entry),
                "proof": [_b64(h) for h in part.proof],
                "checkpoint": _b64(part.checkpoint),
            }
            for part in receipt.parts
        ],
    }
    return canonical_json(value)


def _unb64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedInput(f"{field} must be a base64 string", field=field)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise MalformedInput(f"{field} is not valid base64", field=field) from exc
    if _b64(raw) != value:
        raise MalformedInput(f"{field} is not canonical base64", field=field)
    return raw


def _reject_constant(text: str) -> object:
    raise MalformedInput(f"receipt holds a non-JSON number {text}", field="receipt")


def _reject_float(text: str) -> object:
    raise MalformedInput("receipt holds a float", field="receipt")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedInput(f"receipt repeats the key {key!r}", field="receipt")
        result[key] = value
    return result


def decode_receipt(data: bytes) -> Receipt:
    """Parse a receipt strictly.

    Raises:
        MalformedInput: not UTF-8 JSON, a missing or extra key, a wrong type, bad base64, an
            unknown format, no parts or a repeated part.
    """
    if not isinstance(data, bytes):
        raise TypeError("receipt must be bytes")
    if len(data) > MAX_RECEIPT_SIZE:
        raise MalformedInput("receipt is too large", field="receipt")
    try:
        value = json.loads(
            data.decode("utf-8"),
            parse_float=_reject_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise MalformedInput("receipt is not UTF-8 JSON", field="receipt") from exc
    if not isinstance(value, dict) or value.keys() != _RECEIPT_KEYS:
        raise MalformedInput("receipt must be an object with format, query_id, parts")
    if value["format"] != RECEIPT_FORMAT:
        raise MalformedInput(f"unsupported receipt format {value['format']!r}", field="format")
    query_id, raw_parts = value["query_id"], value["parts"]
    if not isinstance(query_id, str):
        raise MalformedInput("query_id must be a string", field="query_id")
    if not isinstance(raw_parts, list):
        raise MalformedInput("parts must be a list", field="parts")
    parts: list[ReceiptPart] = []
    for number, raw in enumerate(raw_parts):
        if not isinstance(raw, dict) or raw.keys() != _PART_KEYS:
            raise MalformedInput(
                f"part {number} must have checkpoint, entry, index, node, proof", field="parts"
            )
        node, index, proof = raw["node"], raw["index"], raw["proof"]
        if not isinstance(node, str):
            raise MalformedInput(f"part {number}: node must be a string", field="node")
        if not isinstance(index, int) or isinstance(index, bool):
            raise MalformedInput(f"part {number}: index must be an integer", field="index")
        if not isinstance(proof, list):
            raise MalformedInput(f"part {number}: proof must be a list", field="proof")
        try:
            parts.append(
                ReceiptPart(
                    node=node,
                    entry=_unb64(raw["entry"], "entry"),
                    index=index,
                    proof=tuple(_unb64(h, "proof") for h in proof),
                    checkpoint=_unb64(raw["checkpoint"], "checkpoint"),
                )
            )
        except TypeError as exc:
            raise MalformedInput(f"part {number}: {exc}", field="parts") from exc
    return Receipt(query_id, tuple(parts))


def verify_receipt(receipt: Receipt, logs: Mapping[str, LogKey]) -> tuple[VerifiedPart, ...]:
    """Check every part of ``receipt`` against the nodes' log keys; return what was proven.

    ``logs`` maps node names to their origin and roster key; a part naming a node that is not
    in ``logs`` fails.

    Raises:
        VerificationFailed: a part names an unknown node, its checkpoint is not signed by that
            node's key, its entry is for another query or index, or its proof does not verify.
        MalformedInput: a part's entry or checkpoint is malformed.
    """
    if not isinstance(receipt, Receipt):
        raise TypeError("receipt must be a Receipt")
    verified: list[VerifiedPart] = []
    for number, part in enumerate(receipt.parts):
        where = f"receipt part {number} ({part.node}, entry {part.index})"
        log = logs.get(part.node)
        if log is None:
            raise VerificationFailed(f"{where}: not a node of the federation")
        try:
            checkpoint = open_checkpoint(part.checkpoint, log.public_key, origin=log.origin)
        except VerificationFailed:
            raise VerificationFailed(
                f"{where}: checkpoint is not signed by {part.node}'s roster key"
            ) from None
        entry = decode_entry(part.entry)
        if entry.query_id != receipt.query_id:
            raise VerificationFailed(f"{where}: the entry records another query")
        if entry.index != part.index:
            raise VerificationFailed(f"{where}: the entry carries index {entry.index}")
        try:
            merkle = tree_hasher(suite_by_name(log.public_key.suite))
            merkle.verify_inclusion(
                part.index,
                checkpoint.size,
                merkle.leaf_hash(part.entry),
                part.proof,
                checkpoint.root,
            )
        except VerificationFailed:
            raise VerificationFailed(
                f"{where}: inclusion proof does not verify under the checkpoint of size "
                f"{checkpoint.size}"
            ) from None
        verified.append(VerifiedPart(part.node, part.index, entry, checkpoint))
    return tuple(verified)
