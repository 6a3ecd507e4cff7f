"""The audit log's entry format and its full verifier: pure functions over bytes.

Shared by the node's store (:mod:`govshare.node.audit.auditlog`), the auditor CLI and the tests.

Entry encoding (version 1): canonical JSON, UTF-8, one object ::

    {"actor":str,"fields":{...},"index":int,"kind":str,"query_id":str|null,"time_ms":int,"v":1}

- Exactly what ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
  emits, encoded as UTF-8: keys sorted by code point, no whitespace, non-ASCII characters literal,
  only ``"``, ``\\`` and control characters escaped.
- Values are ``null``, ``true``/``false``, integers in the signed 64-bit range, strings, lists
  and objects with string keys. No floats, NaN or infinities, anywhere.
- Bytes are the tagged object ``{"$b64": "<canonical standard base64>"}``; object keys starting
  with ``$`` are reserved for tags and refused in ``fields``.
- ``time_ms`` is the node clock in unix milliseconds; ``index`` is the entry's position (0-based).

Decoding is strict: a byte string decodes only if it is exactly the canonical encoding of what it
decodes to (so whitespace, key order, duplicate keys and alternative escapes are all rejected),
which makes ``encode(decode(b)) == b`` and therefore one leaf hash per entry.

Security: :func:`verify_log` recomputes every leaf hash and the tree from the entry bytes alone;
stored leaf hashes and subtree hashes are never trusted, only compared. Checkpoints are trusted
only after their Ed25519 signature verifies under the node's key from the roster. What it detects:
edited entries (stored leaf hash or a signed root no longer matches), deleted entries (a gap, or
renumbered entries), reordered entries, truncation below a signed checkpoint, and two signed
checkpoints that disagree (a fork). What it cannot detect alone: a rewrite of the entries *after*
the last checkpoint the verifier holds, made together with their stored hashes; hence checkpoints
after every batch, witness cosignatures and auditors that keep the last checkpoint they verified.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from govshare.protocols.checkpoint import Checkpoint, open_checkpoint
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.merkle import tree_hasher
from govshare.protocols.suite import VerifyKey, suite_by_name

ENTRY_FORMAT_VERSION = 1
MAX_ENTRY_SIZE = 1 << 20  # an entry holds digests and names, never data sets
MAX_NESTING = 16  # fields are flat records; bounds recursion on decode
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # int64, so every JSON consumer reads ints exactly
BYTES_TAG = "$b64"
MAX_PROBLEMS = 100  # a report lists this many problems at most

_KIND = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*", re.ASCII)
_ENTRY_KEYS = frozenset({"actor", "fields", "index", "kind", "query_id", "time_ms", "v"})


@dataclass(frozen=True)
class AuditEntry:
    """One decoded log entry. ``fields`` holds str, int, bool, None, bytes, lists and dicts."""

    index: int
    time_ms: int
    kind: str
    actor: str
    query_id: str | None
    fields: Mapping[str, Any]


def _no_float(text: str) -> Any:
    raise MalformedInput(f"floats are not allowed in audit entries: {text[:20]}", field="entry")


def _to_json(value: object, depth: int) -> object:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise MalformedInput("integers must fit in 64 bits", field="fields")
        return value
    if isinstance(value, bytes):
        return {BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)):
        _too_deep(depth)
        return [_to_json(item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        _too_deep(depth)
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError("field names must be str")
            if key.startswith("$"):
                raise MalformedInput(f"field names starting with '$' are reserved: {key}")
            out[key] = _to_json(item, depth + 1)
        return out
    if isinstance(value, float):
        raise MalformedInput("floats are not allowed in audit entries", field="fields")
    raise TypeError(f"cannot record a {type(value).__name__} in an audit entry")


def _too_deep(depth: int) -> None:
    if depth > MAX_NESTING:
        raise MalformedInput("fields are nested too deeply", field="fields")


def _from_json(value: object, depth: int) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise MalformedInput("integers must fit in 64 bits", field="fields")
        return value
    if isinstance(value, list):
        _too_deep(depth)
        return [_from_json(item, depth + 1) for item in value]
    if isinstance(value, dict):
        if any(key.startswith("$") for key in value):
            tagged = value.get(BYTES_TAG)
            if len(value) != 1 or not isinstance(tagged, str):
                raise MalformedInput("reserved '$' key outside a bytes tag", field="fields")
            try:
                raw = base64.b64decode(tagged, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MalformedInput("bad base64 in a bytes tag", field="fields") from exc
            if base64.b64encode(raw).decode("ascii") != tagged:
                raise MalformedInput("non-canonical base64 in a bytes tag", field="fields")
            return raw
        _too_deep(depth)  # after the tag: a bytes tag is a value, not a level (as on encode)
        return {key: _from_json(item, depth + 1) for key, item in value.items()}
    raise MalformedInput("unexpected JSON value", field="fields")


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_DECODER = json.JSONDecoder(parse_float=_no_float, parse_constant=_no_float)
# Maps every ASCII digit to "0" and every other byte to "x": a run of 19 "0"s in the result is
# the only way an integer beyond int64 can appear (18 digits always fit).
_DIGIT_RUNS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_LONG_RUN = b"0" * 19


def _dumps(value: object) -> bytes:
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate in a str
        raise MalformedInput("strings must be valid Unicode", field="entry") from exc
    except RecursionError as exc:
        raise MalformedInput("fields are nested too deeply", field="fields") from exc


# A one-key bytes tag whose base64 is canonical: full quads, then an optional final quad whose
# unused low bits are zero ("xA==", "xyA=" with the last symbol from the listed sets).
_TAG = re.compile(
    rb'\{"\$b64":"(?:[A-Za-z0-9+/]{4})*'
    rb'(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?"\}'
)
_PLAIN, _TAGS_OK, _WALK = 0, 1, 2


def _fields_precheck(data: bytes) -> int:
    """Decide from the canonical bytes whether the fields obey the rules the walk enforces.

    ``_PLAIN``: no ``"$`` anywhere (no tags, no reserved keys), no run of 19 digits (every int
    fits in int64) and few enough brackets (nesting within the limit). ``_TAGS_OK``: the same,
    except that every ``"$`` starts a one-key ``{"$b64":"..."}`` object with canonical base64;
    in canonical JSON quotes inside strings are escaped, so that pattern can only be a real tag
    object. ``_WALK``: anything else, which takes the full walk, so all paths enforce the same
    rules.
    """
    tags = data.count(b'"$')
    if tags and len(_TAG.findall(data)) != tags:
        return _WALK
    if data.count(b"{") + data.count(b"[") - tags > MAX_NESTING:
        return _WALK
    if _LONG_RUN in data.translate(_DIGIT_RUNS):
        return _WALK
    return _TAGS_OK if tags else _PLAIN


def _check_text(value: object, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str")
    if not value:
        raise MalformedInput(f"{name} must be non-empty", field=name)


def _check_header(entry: AuditEntry) -> None:
    _check_text(entry.kind, "kind")
    if not _KIND.fullmatch(entry.kind):
        raise MalformedInput("kind must be a dotted lower-case name", field="kind")
    _check_text(entry.actor, "actor")
    _check_text(entry.query_id, "query_id", optional=True)
    for name, number in (("index", entry.index), ("time_ms", entry.time_ms)):
        if not isinstance(number, int) or isinstance(number, bool):
            raise TypeError(f"{name} must be an int")
        if not 0 <= number <= INT_MAX:
            raise MalformedInput(f"{name} must be in [0, 2**63)", field=name)
    if not isinstance(entry.fields, Mapping):
        raise TypeError("fields must be a mapping")


def encode_entry(entry: AuditEntry) -> bytes:
    """The canonical bytes of ``entry`` (see the module docstring).

    Raises:
        MalformedInput: a float, an out-of-range int, a reserved ``$`` key, a bad kind.
        TypeError: a value of a type the format does not carry.
    """
    _check_header(entry)
    data = _dumps(
        {
            "actor": entry.actor,
            "fields": _to_json(entry.fields, 1),
            "index": entry.index,
            "kind": entry.kind,
            "query_id": entry.query_id,
            "time_ms": entry.time_ms,
            "v": ENTRY_FORMAT_VERSION,
        }
    )
    if len(data) > MAX_ENTRY_SIZE:
        raise MalformedInput(f"entry exceeds {MAX_ENTRY_SIZE} bytes", field="fields")
    return data


def decode_entry(data: bytes) -> AuditEntry:
    """Decode canonical entry bytes strictly.

    Raises:
        MalformedInput: not UTF-8 JSON, not canonical, a float, a missing or extra key, a wrong
            type, a bad bytes tag or an unsupported format version.
    """
    return _decode(data, need_bytes=True)


def decoded_index(data: bytes) -> int:
    """Validate ``data`` exactly as :func:`decode_entry` does and return only its index.

    Faster: bytes tags are checked in place instead of being converted (the verifier's path).
    """
    return _decode(data, need_bytes=False).index


def _decode(data: bytes, *, need_bytes: bool) -> AuditEntry:
    if not isinstance(data, bytes):
        raise TypeError("entry must be bytes")
    if len(data) > MAX_ENTRY_SIZE:
        raise MalformedInput(f"entry exceeds {MAX_ENTRY_SIZE} bytes", field="entry")
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise MalformedInput("entry is not UTF-8 JSON", field="entry") from exc
    if not isinstance(value, dict) or value.keys() != _ENTRY_KEYS:
        raise MalformedInput("entry must be an object with the version 1 keys", field="entry")
    if _dumps(value) != data:
        raise MalformedInput("entry is not in canonical form", field="entry")
    version, index, time_ms = value["v"], value["index"], value["time_ms"]
    kind, actor, query_id, fields = (
        value["kind"],
        value["actor"],
        value["query_id"],
        value["fields"],
    )
    # The checks of _check_header, inlined for the verifier's speed; type() excludes bool.
    if type(version) is not int or version != ENTRY_FORMAT_VERSION:
        raise MalformedInput("unsupported entry format version", field="v")
    if type(index) is not int or not 0 <= index <= INT_MAX:
        raise MalformedInput("index must be an int in [0, 2**63)", field="index")
    if type(time_ms) is not int or not 0 <= time_ms <= INT_MAX:
        raise MalformedInput("time_ms must be an int in [0, 2**63)", field="time_ms")
    if type(kind) is not str or not _KIND.fullmatch(kind):
        raise MalformedInput("kind must be a dotted lower-case name", field="kind")
    if type(actor) is not str or not actor:
        raise MalformedInput("actor must be a non-empty str", field="actor")
    if query_id is not None and (type(query_id) is not str or not query_id):
        raise MalformedInput("query_id must be null or a non-empty str", field="query_id")
    if type(fields) is not dict:
        raise MalformedInput("fields must be an object", field="fields")
    return AuditEntry(
        index, time_ms, kind, actor, query_id, _walk_or_keep(fields, data, need_bytes)
    )


def _walk_or_keep(fields: object, data: bytes, need_bytes: bool) -> Any:
    check = _fields_precheck(data)
    if check == _WALK or (check == _TAGS_OK and need_bytes):
        return _from_json(fields, 1)
    return fields  # validated in place; tags stay as {"$b64": ...} when need_bytes is False


# --- the full verifier ------------------------------------------------------------------------


class ProblemKind(StrEnum):
    ENTRY_MALFORMED = "entry_malformed"
    ENTRY_EDITED = "entry_edited"
    ENTRY_DELETED = "entry_deleted"
    ENTRY_REORDERED = "entry_reordered"
    LOG_TRUNCATED = "log_truncated"
    CHECKPOINT_INVALID = "checkpoint_invalid"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    CHECKPOINT_FORK = "checkpoint_fork"


_ENTRY_LEVEL = frozenset(
    {
        ProblemKind.ENTRY_MALFORMED,
        ProblemKind.ENTRY_EDITED,
        ProblemKind.ENTRY_DELETED,
        ProblemKind.ENTRY_REORDERED,
    }
)


@dataclass(frozen=True)
class LogProblem:
    kind: ProblemKind
    index: int | None  # the first entry concerned, when one is known
    message: str


@dataclass(frozen=True)
class LogVerification:
    """What :func:`verify_log` established. ``ok`` only when ``problems`` is empty."""

    size: int
    root: bytes
    checkpoints_verified: int
    problems: tuple[LogProblem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> LogProblem | None:
        return self.problems[0] if self.problems else None


StoredEntry = tuple[int, bytes, bytes | None]
"""``(position, entry bytes, stored leaf hash or None)`` as a store holds it."""


def verify_log(
    entries: Iterable[StoredEntry],
    checkpoints: Iterable[bytes],
    *,
    public_key: VerifyKey,
    origin: str,
) -> LogVerification:
    """Recompute the whole log from entry bytes and check it against signed checkpoints.

    ``entries`` are streamed in stored order (positions should be 0, 1, 2, ...); ``checkpoints``
    are signed notes from the store *and* from the auditor's own records (a checkpoint the auditor
    kept is what catches truncation or rollback of the store's checkpoint table too).

    The report lists problems by position, the first bad entry first: a missing position or an
    entry carrying another index (deleted or reordered, told apart by whether the displaced index
    turns up elsewhere), bytes that do not decode canonically, bytes that do not match the stored
    leaf hash, a signed root that the recomputed tree does not reproduce (an edit somewhere between
    the last matching checkpoint and that one), a signed size beyond the log (truncated).
    """
    problems: list[LogProblem] = []
    by_size: dict[int, Checkpoint] = {}
    verified = 0
    for number, note in enumerate(checkpoints):
        try:
            checkpoint = open_checkpoint(note, public_key, origin=origin)
        except (MalformedInput, VerificationFailed):
            problems.append(
                LogProblem(
                    ProblemKind.CHECKPOINT_INVALID,
                    None,
                    f"checkpoint #{number} does not verify under the node's key (forged or "
                    "corrupted)",
                )
            )
            continue
        verified += 1
        known = by_size.get(checkpoint.size)
        if known is not None and known.root != checkpoint.root:
            problems.append(
                LogProblem(
                    ProblemKind.CHECKPOINT_FORK,
                    None,
                    f"two signed checkpoints of size {checkpoint.size} disagree (fork)",
                )
            )
        by_size[checkpoint.size] = checkpoint

    targets = [s for s in sorted(by_size) if s > 0]  # the empty tree is checked below
    target_iter = iter([*targets, -1])
    next_target = next(target_iter)
    last_matching_size = 0
    mismatch_reported = False
    merkle = tree_hasher(suite_by_name(public_key.suite))
    leaf_hash = merkle.leaf_hash
    tree = merkle.compact_range()
    append = tree._append_unchecked
    displaced: dict[int, int] = {}  # position -> index found there, when they differ
    found_at: dict[int, int] = {}  # index -> position, for displaced indices
    entry_problems: list[LogProblem] = []

    def report(kind: ProblemKind, index: int | None, message: str) -> None:
        if len(entry_problems) < MAX_PROBLEMS:
            entry_problems.append(LogProblem(kind, index, message))

    count = 0  # entries seen; also the position the next entry should have
    for position, data, stored_leaf in entries:
        if position != count:
            report(
                ProblemKind.ENTRY_DELETED,
                count,
                f"entries {count}..{position - 1} are missing (deleted)",
            )
        computed = leaf_hash(data)
        append(computed)
        try:
            index = decoded_index(data)
        except MalformedInput as exc:
            report(
                ProblemKind.ENTRY_MALFORMED,
                position,
                f"entry {position} is malformed (edited?): {exc}",
            )
        else:
            if index != position and len(displaced) < MAX_PROBLEMS:
                displaced[position] = index
                found_at.setdefault(index, position)
        if stored_leaf is not None and stored_leaf != computed:
            report(
                ProblemKind.ENTRY_EDITED,
                position,
                f"entry {position}: bytes do not match the stored leaf hash (edited)",
            )
        count = position + 1 if position >= count else count + 1
        if tree.size == next_target:
            if tree.root() == by_size[next_target].root:
                last_matching_size = next_target
            elif not mismatch_reported:
                mismatch_reported = True
                report(
                    ProblemKind.CHECKPOINT_MISMATCH,
                    last_matching_size,
                    f"entries {last_matching_size}..{next_target - 1} do not reproduce "
                    f"the signed checkpoint of size {next_target} (edited)",
                )
            next_target = next(target_iter)

    for position, index in displaced.items():
        if position in found_at:
            message = (
                f"entry {position} is stored at position {found_at[position]} and position "
                f"{position} holds entry {index} (reordered)"
            )
            kind = ProblemKind.ENTRY_REORDERED
        else:
            message = (
                f"position {position} holds entry {index}: entry {position} is missing and "
                "later entries were renumbered (deleted)"
            )
            kind = ProblemKind.ENTRY_DELETED
        entry_problems.append(LogProblem(kind, position, message))

    size = tree.size
    if 0 in by_size and by_size[0].root != merkle.empty_root:
        entry_problems.append(
            LogProblem(ProblemKind.CHECKPOINT_MISMATCH, 0, "signed empty checkpoint is wrong")
        )
    beyond = [s for s in targets if s > size]
    if beyond:
        entry_problems.append(
            LogProblem(
                ProblemKind.LOG_TRUNCATED,
                size,
                f"the log has {size} entries but a signed checkpoint commits to {max(beyond)} "
                "(truncated)",
            )
        )
    # Direct evidence about an entry first, by position; then what the checkpoints show.
    problems.extend(entry_problems)
    problems.sort(key=lambda p: (p.kind not in _ENTRY_LEVEL, p.index or 0))
    return LogVerification(
        size=size,
        root=tree.root(),
        checkpoints_verified=verified,
        problems=tuple(problems[:MAX_PROBLEMS]),
    )
