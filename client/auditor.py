"""The auditor: pulls each node's signed audit log, verifies it, proves entries, reconciles queries.

An auditor trusts nothing a node says about itself. Keys come from the CA-signed roster in the
auditor's identity bundle (no trust on first use); every checkpoint is opened under the node's
roster key for the origin ``govshare/<federation>/<node>``; every tree is recomputed from the
entry bytes (:func:`govshare.protocols.auditverify.verify_log`); and the auditor keeps, per node,
the last checkpoint it verified, which every later checkpoint must extend.

State folder (default ``./audit-state``)::

    <node>/entries.db        the pulled entries (idx, bytes, leaf hash) and every checkpoint
                             note the auditor verified, in SQLite; triggers refuse UPDATE and
                             DELETE, and entries are only ever appended after they verified
    <node>/checkpoint.note   the last verified checkpoint (with its cosignatures), replaced
                             atomically (write, fsync, rename, fsync the folder)
    <node>/evidence/         the checkpoints that proved a rollback or a fork, kept as evidence

``pull(node)``: fetch the node's latest checkpoint and open it under the roster key (a forged
signature and a key that is not the roster's are told apart and named); check each cosignature
against the witnesses' roster keys; compare with the last verified checkpoint — a smaller size is
a rollback, the same size with another root a fork, a larger size must come with a consistency
proof that verifies (otherwise a fork: history was rewritten); then fetch the entries the auditor
lacks, recompute the whole tree over the local copy plus the new entries, and commit the new
entries and the new checkpoint only if everything holds. When the recomputed root differs from
the signed one and no entry is visibly deleted, reordered or malformed, the auditor bisects with
consistency proofs from the node (``O(log n)`` calls) to name the first entry whose bytes are not
the ones the signed tree commits to. ``pull(node, recheck=True)`` also re-reads the entries the
auditor already holds and names the first one the node now serves differently.

``verify(node)`` works on the local copy only: full recomputation, checkpoint signatures,
cosignatures, consistency with every checkpoint kept in the state.

Witness quorum. The node's own signature only shows that whoever holds its key signed a tree:
an insider with that key can rewrite, truncate, delete or restore the log and sign a fresh
checkpoint that a first-time auditor cannot tell from the real one. The other nodes witness
each checkpoint (:mod:`govshare.node.audit.witness`) and refuse one that does not extend what they
cosigned, so a forged checkpoint lacks their cosignatures. ``pull``, ``verify``,
``verify-export`` and :func:`verify_receipt` therefore accept a checkpoint only when at least
``quorum`` of the roster's *other* nodes validly cosigned it: by default a strict majority,
``(n - 1) // 2 + 1`` of the ``n - 1`` others (:func:`default_quorum`). A federation of one node
has no witnesses: its quorum is 0 and the verdict says so. A node stores its checkpoint before
its witnesses answer, so a checkpoint fetched mid-round may lack cosignatures that arrive a
moment later: a pull that finds too few asks again for up to ``quorum_wait`` seconds before it
reports the missing quorum (a receipt cannot be re-asked: it carries the checkpoint it got).

Witness refusals. Each witness records every checkpoint it refused as a ``witness.refused``
entry in its own log (fields ``log``, ``rule``, ``reason``, and since this version the refused
note as ``checkpoint`` and the note it held as ``cosigned``; actor: the node whose checkpoint
was refused). After its
pulls the auditor reads these entries from every node's *verified* copy and attaches them to
the refused node's verdict, which then FAILS (:attr:`ProblemType.WITNESS_REFUSED`): an honest
node's checkpoints only ever extend each other, so a refusal means a checkpoint signed with the
node's key showed another history — a rollback, a fork or a rewrite. The verdict stays FAILED
as long as the refusal is in the witness's log: resolving the incident is the federation's
decision, not the auditor's. A refusal is the witness's accusation on its own signed record;
when it carries the refused checkpoint, the auditor also says whether that checkpoint verifies
under the accused node's roster key (``checkpoint_signed``). The auditor keeps an index of the
refusal entries in each copy (``refusal_entries``), filled as entries are committed; ``verify``
re-derives it from the entries of the node it verifies and names any difference.

Sampled re-fetch. A node that edits a stored entry in place, after an auditor verified it,
still serves consistent checkpoints (it keeps the stored subtree hashes), so only re-reading old
entries shows it. Every pull re-fetches ``sample`` entries the auditor already holds (default
32, drawn with :mod:`secrets` unless an ``rng`` is given) and compares them byte for byte;
``recheck=True`` re-fetches all of them. One edited entry among ``n`` held is caught by one
pull with probability ``sample / n``, and by ``k`` pulls with ``1 - (1 - sample / n) ** k``.

Query reconciliation (:meth:`Auditor.show_query`): every node in the roster is asked for the
entries it recorded under a query id (``GetQueryEntries``). Entry-field convention the query path
must follow so that logs can be compared:

- ``request_digest`` (str, lower-case hex SHA-256 of the analyst's signed request bytes): recorded
  by every node that takes part, in the entry that accepts the query (e.g. ``query.received``);
- ``participants`` (list of node names): the nodes taking part, recorded with ``request_digest``;
- ``result_digest`` (str, lower-case hex SHA-256 of the bytes a node released) with
  ``recipient`` (member name): recorded by each node for each release (``result.released``).

Fields holding bytes are compared by their hex. The nodes agree when every node that recorded
the query carries ``request_digest`` and ``participants``, these two are equal across nodes (and
within one node), every listed participant recorded the query and every node that recorded it
is listed. Released results are shown side by side but compared only within a node (one node
must not release two different results to the same recipient): in PSI each node releases its
own masked set, so honest nodes' ``result_digest`` values differ by design.

Receipts: :func:`make_receipt` and the pure verifier live in :mod:`govshare.protocols.receipt`;
:func:`verify_receipt` here takes the keys and origins from a roster.

Not detected by design: entries appended after the newest checkpoint (nothing signed covers them
yet), and a fork shown consistently to this auditor alone (cross-check cosignatures and other
auditors' exports).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509

from govshare.model.events import log_origin
from govshare.model.governance import Role
from govshare.model.identity import ROSTER, Identity, Member, Roster
from govshare.model.reconcile import (
    NodeQueryEntries,
    QueryReconciliation,
    _collect_fields,
    _reconcile,
)
from govshare.protocols.auditverify import (
    AuditEntry,
    LogProblem,
    ProblemKind,
    StoredEntry,
    decode_entry,
    verify_log,
)
from govshare.protocols.checkpoint import (
    Checkpoint,
    Note,
    cosignature_key_id,
    open_checkpoint,
    open_cosignature,
    parse_checkpoint_unverified,
    signer_key_id,
)
from govshare.protocols.errors import (
    GovshareError,
    MalformedInput,
    NotFound,
    Unavailable,
    VerificationFailed,
)
from govshare.protocols.merkle import TreeHasher, tree_hasher
from govshare.protocols.receipt import (
    LogKey,
    Receipt,
    ReceiptPart,
    VerifiedPart,
    decode_receipt,
    make_receipt,
)
from govshare.protocols.receipt import verify_receipt as verify_receipt_with_keys
from govshare.rpc.client import DEFAULT_TIMEOUT, NodeClient
from govshare.v1 import audit_pb2, audit_pb2_grpc

__all__ = [
    "DEFAULT_STATE",
    "AuditClient",
    "Auditor",
    "InclusionResult",
    "NodeQueryEntries",
    "Problem",
    "ProblemType",
    "QueryReconciliation",
    "Verdict",
    "WitnessRefusal",
    "WitnessedPart",
    "default_quorum",
    "make_receipt",
    "verify_receipt",
]

DEFAULT_STATE = Path("audit-state")
# Seconds a whole GetEntries stream may take: a million entries is about 200 MB on the wire.
STREAM_TIMEOUT = 600.0
EXPORT_FORMAT = "govshare-audit-export/1"
READ_PAGE = 10_000  # local rows per SELECT
MAX_EXPORT_SIZE = 4 << 30  # refuse to parse a bundle beyond 4 GiB

ENTRIES_DB = "entries.db"
CHECKPOINT_FILE = "checkpoint.note"
EVIDENCE_DIR = "evidence"

# Held entries re-fetched and compared on every pull: 32 of a million catch one edited entry in
# about 1 of 31,000 pulls, 32 of a thousand in 1 of 31; costs one small stream call per run of
# adjacent indices. Configurable (``sample=``, ``--sample``); 0 turns it off.
DEFAULT_SAMPLE = 32
# Seconds a pull keeps asking for a checkpoint that lacks its quorum: a witnessing round asks
# each peer in turn (a few ms each on a LAN), and the node serves its checkpoint before the
# round ends. Long enough for a round, short enough that a forged checkpoint fails promptly.
QUORUM_WAIT = 3.0
QUORUM_POLL = 0.2  # seconds between two such asks
REFUSED_KIND = "witness.refused"
# Canonical entry bytes carry the kind as exactly this; a cheap filter before decoding.
_REFUSAL_MARKER = b'"kind":"witness.refused"'


class ProblemType(StrEnum):
    """What went wrong; the values shared with :class:`ProblemKind` have its meaning."""

    ENTRY_MALFORMED = ProblemKind.ENTRY_MALFORMED.value
    ENTRY_EDITED = ProblemKind.ENTRY_EDITED.value
    ENTRY_DELETED = ProblemKind.ENTRY_DELETED.value
    ENTRY_REORDERED = ProblemKind.ENTRY_REORDERED.value
    LOG_TRUNCATED = ProblemKind.LOG_TRUNCATED.value
    CHECKPOINT_INVALID = ProblemKind.CHECKPOINT_INVALID.value
    CHECKPOINT_MISMATCH = ProblemKind.CHECKPOINT_MISMATCH.value
    CHECKPOINT_FORK = ProblemKind.CHECKPOINT_FORK.value
    CHECKPOINT_FORGED = "checkpoint_forged"
    CHECKPOINT_UNKNOWN_KEY = "checkpoint_unknown_key"
    CHECKPOINT_MALFORMED = "checkpoint_malformed"
    ROLLBACK = "rollback"
    COSIGNATURE_INVALID = "cosignature_invalid"
    QUORUM_MISSING = "quorum_missing"  # too few valid witness cosignatures
    WITNESS_REFUSED = "witness_refused"  # a witness logged refusing the node's checkpoint
    ENTRY_OUT_OF_RANGE = "entry_out_of_range"
    UNREACHABLE = "unreachable"
    NODE_ERROR = "node_error"
    NOT_PULLED = "not_pulled"
    STATE_DAMAGED = "state_damaged"


@dataclass(frozen=True)
class Problem:
    kind: ProblemType
    index: int | None  # the first entry concerned, when one is known
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "index": self.index, "message": self.message}


@dataclass(frozen=True)
class Verdict:
    """The outcome of a pull or a verification of one node's log. ``ok`` iff no problem."""

    node: str
    action: str  # "pull", "verify" or "verify-export"
    entries: int  # entries the auditor holds (verified) for this node
    checkpoint_size: int | None  # size of the checkpoint checked, None if none could be read
    signed: bool  # the checkpoint verified under the node's roster key
    cosignatures_valid: tuple[str, ...] = ()
    cosignatures_invalid: tuple[str, ...] = ()
    fetched: int = 0  # entries added by this pull
    problems: tuple[Problem, ...] = ()
    evidence: tuple[Path, ...] = field(default=())
    quorum: int = 0  # valid witness cosignatures the checkpoint needed
    witnesses: int = 0  # the roster's other nodes: the witnesses that could cosign
    rechecked: int = 0  # entries already held that this pull re-fetched and found unchanged
    refusals: tuple[WitnessRefusal, ...] = ()  # witnesses' refusals of this node's checkpoints

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "action": self.action,
            "ok": self.ok,
            "entries": self.entries,
            "checkpoint_size": self.checkpoint_size,
            "signed": self.signed,
            "cosignatures_valid": list(self.cosignatures_valid),
            "cosignatures_invalid": list(self.cosignatures_invalid),
            "quorum": self.quorum,
            "witnesses": self.witnesses,
            "fetched": self.fetched,
            "rechecked": self.rechecked,
            "problems": [p.to_json() for p in self.problems],
            "evidence": [str(p) for p in self.evidence],
            "witness_refusals": [r.to_json() for r in self.refusals],
        }


@dataclass(frozen=True)
class WitnessRefusal:
    """A ``witness.refused`` entry in a witness node's verified log."""

    witness: str  # the node whose log holds the entry
    index: int  # the entry's index in that log
    node: str  # the node whose checkpoint was refused (the entry's actor)
    rule: str  # witness.rollback, witness.fork or witness.inconsistent
    reason: str
    time_ms: int
    # The refused checkpoint recorded in the entry verifies under ``node``'s roster key (True),
    # does not (False), or was not recorded (None: entries written before witnesses kept it).
    checkpoint_signed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "witness": self.witness,
            "index": self.index,
            "node": self.node,
            "rule": self.rule,
            "reason": self.reason,
            "time_ms": self.time_ms,
            "checkpoint_signed": self.checkpoint_signed,
        }


def default_quorum(witnesses: int) -> int:
    """A strict majority of ``witnesses`` (the roster's other nodes); 0 when there are none."""
    return witnesses // 2 + 1 if witnesses > 0 else 0


def quorum_text(quorum: int, witnesses: int) -> str:
    """``quorum 2 of 3 other nodes``, or why a lone node has none."""
    if witnesses == 0:
        return "no witnesses: a federation of one node, quorum 0"
    return f"quorum {quorum} of {witnesses} other node{'s' if witnesses != 1 else ''}"


def refusal_summary(node: str, refusals: Sequence[WitnessRefusal]) -> str:
    """``witnesses refused 12 of pension's checkpoints: civil 6 (witness.rollback), ...``."""
    by_witness: dict[str, Counter[str]] = {}
    for refusal in refusals:
        by_witness.setdefault(refusal.witness, Counter())[refusal.rule] += 1
    parts = []
    for witness, rules in sorted(by_witness.items()):
        ranked = sorted(rules.items(), key=lambda item: (-item[1], item[0]))
        shown = ranked[0][0] if len(ranked) == 1 else ", ".join(f"{r} {n}" for r, n in ranked)
        parts.append(f"{witness} {sum(rules.values())} ({shown})")
    return f"witnesses refused {len(refusals)} of {node}'s checkpoints: {', '.join(parts)}"


def witness_count(roster: Roster, node: str) -> int:
    """The roster's nodes other than ``node``: the witnesses of its log."""
    return sum(1 for m in roster.with_role(Role.NODE) if m.name != node)


def check_quorum(quorum: int, witnesses: int) -> None:
    """Refuse a quorum that is not an int, is negative, or no set of witnesses could meet.

    Raises:
        TypeError: ``quorum`` is not an int.
        MalformedInput: it is negative or more than ``witnesses``.
    """
    if not isinstance(quorum, int) or isinstance(quorum, bool):
        raise TypeError("quorum must be an int")
    if quorum < 0:
        raise MalformedInput("quorum must be 0 or more", field="quorum")
    if quorum > witnesses:
        raise MalformedInput(
            f"quorum {quorum} is more than the {witnesses} other node"
            f"{'s' if witnesses != 1 else ''} that can cosign",
            field="quorum",
        )


def resolve_quorum(roster: Roster, node: str, quorum: int | None) -> tuple[int, int]:
    """``(cosignatures needed, witnesses)`` for ``node``'s checkpoints; ``quorum`` None is the
    default majority."""
    witnesses = witness_count(roster, node)
    if quorum is None:
        return default_quorum(witnesses), witnesses
    check_quorum(quorum, witnesses)
    return quorum, witnesses


def quorum_problem(size: int, valid: Sequence[str], quorum: int, witnesses: int) -> Problem | None:
    """The problem of a checkpoint of ``size`` with too few ``valid`` cosignatures, if any."""
    if len(valid) >= quorum:
        return None
    return Problem(
        ProblemType.QUORUM_MISSING,
        None,
        f"checkpoint {size} has {len(valid)} of the {quorum} witness "
        f"cosignature{'s' if quorum != 1 else ''} it needs ({quorum_text(quorum, witnesses)})",
    )


class _DetectedError(Exception):
    """Internal: a problem that ends a pull."""

    def __init__(self, problem: Problem, evidence: Sequence[Path] = ()) -> None:
        super().__init__(problem.message)
        self.problem = problem
        self.evidence = tuple(evidence)


# --- the client -------------------------------------------------------------------------------


class AuditClient(NodeClient):
    """An auditor's mutual-TLS connection to one node's Audit service.

    Failed calls become govshare errors naming the node (:meth:`NodeClient.call`).
    """

    def __init__(
        self,
        identity: Identity,
        member: Member,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        stream_timeout: float = STREAM_TIMEOUT,
    ) -> None:
        super().__init__(identity, member, timeout=timeout)
        self.stream_timeout = stream_timeout
        self._audit = audit_pb2_grpc.AuditStub(self.channel)

    def __enter__(self) -> AuditClient:
        return self

    def checkpoint(self) -> bytes:
        """The node's latest signed checkpoint note, with its witnesses' cosignatures."""
        reply = self.call(
            lambda: self._audit.GetCheckpoint(
                audit_pb2.GetCheckpointRequest(), timeout=self.timeout
            )
        )
        return reply.note

    def entries(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """Stream ``(index, data)`` for entries ``start .. end-1`` as the node serves them."""
        call = self._audit.GetEntries(
            audit_pb2.GetEntriesRequest(start=start, end=end), timeout=self.stream_timeout
        )
        pages = iter(call)
        try:
            while True:
                page = self.call(lambda: next(pages, None))
                if page is None:
                    return
                for entry in page.entries:
                    yield entry.index, entry.data
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves Call.cancel untyped

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        reply = self.call(
            lambda: self._audit.GetInclusionProof(
                audit_pb2.InclusionProofRequest(index=index, tree_size=size), timeout=self.timeout
            )
        )
        return list(reply.hashes)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        reply = self.call(
            lambda: self._audit.GetConsistencyProof(
                audit_pb2.ConsistencyProofRequest(old_size=old_size, new_size=new_size),
                timeout=self.timeout,
            )
        )
        return list(reply.hashes)

    def query_entries(self, query_id: str) -> list[tuple[int, bytes]]:
        reply = self.call(
            lambda: self._audit.GetQueryEntries(
                audit_pb2.QueryEntriesRequest(query_id=query_id), timeout=self.timeout
            )
        )
        return [(e.index, e.data) for e in reply.entries]


# --- local state ------------------------------------------------------------------------------

_LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx       INTEGER PRIMARY KEY,
    data      BLOB NOT NULL,
    leaf_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id   INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    note BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS refusal_entries (
    idx INTEGER PRIMARY KEY
);
"""
# refusal_entries: the indices of the witness.refused entries among ``entries``, so that each
# pull reads a witness's refusals without scanning its whole copy (about 1 s per million).


def _local_triggers() -> str:
    return "\n".join(
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{action.lower()} BEFORE {action} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, 'auditor state is append-only'); END;"
        for table in ("entries", "checkpoints", "refusal_entries")
        for action in ("UPDATE", "DELETE")
    )


def is_refusal(data: bytes) -> bool:
    """Whether canonical entry bytes ``data`` are a ``witness.refused`` entry."""
    if _REFUSAL_MARKER not in data:
        return False
    try:
        return decode_entry(data).kind == REFUSED_KIND
    except MalformedInput:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class LocalLog:
    """The auditor's append-only copy of one node's log (see the module docstring)."""

    def __init__(self, directory: Path, merkle: TreeHasher | None = None) -> None:
        """``merkle``: the federation's suite's tree, which :meth:`commit` hashes new entries
        with (a copy opened without it is read only)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._merkle = merkle
        try:
            self._db = sqlite3.connect(directory / ENTRIES_DB, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            indexed = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refusal_entries'"
            ).fetchone()
            self._db.executescript(_LOCAL_SCHEMA + _local_triggers())
            if indexed is None:
                self._index_refusals()  # state written before the index existed
        except sqlite3.DatabaseError as exc:
            raise MalformedInput(f"{directory / ENTRIES_DB} is not auditor state: {exc}") from None

    def _index_refusals(self) -> None:
        rows = self._db.execute(
            "SELECT idx, data FROM entries WHERE instr(data, ?) > 0", (_REFUSAL_MARKER,)
        ).fetchall()
        found = [(int(idx),) for idx, data in rows if is_refusal(bytes(data))]
        if found:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO refusal_entries VALUES (?)", found)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @classmethod
    def existing(cls, directory: Path, merkle: TreeHasher | None = None) -> LocalLog | None:
        return cls(directory, merkle) if (directory / ENTRIES_DB).is_file() else None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LocalLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def size(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def iter_entries(self) -> Iterator[StoredEntry]:
        """Rows as stored, in index order, with the leaf hash computed when they were pulled."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT idx, data, leaf_hash FROM entries WHERE idx > ? ORDER BY idx LIMIT ?",
                (last, READ_PAGE),
            ).fetchall()
            if not rows:
                return
            for idx, data, digest in rows:
                yield int(idx), bytes(data), bytes(digest)
            last = int(rows[-1][0])

    def leaf_hashes(self) -> list[bytes]:
        """The leaf hashes computed when the entries were pulled, in index order."""
        return [digest for _, _, digest in self.iter_entries() if digest is not None]

    def entry(self, index: int) -> bytes | None:
        row = self._db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
        return None if row is None else bytes(row[0])

    def refusal_entries(self) -> list[tuple[int, bytes]]:
        """``(index, bytes)`` of the ``witness.refused`` entries held, in index order."""
        rows = self._db.execute(
            "SELECT e.idx, e.data FROM refusal_entries r JOIN entries e ON e.idx = r.idx "
            "ORDER BY e.idx"
        ).fetchall()
        return [(int(idx), bytes(data)) for idx, data in rows]

    def refusal_indices(self) -> set[int]:
        return {int(r[0]) for r in self._db.execute("SELECT idx FROM refusal_entries")}

    def verified_notes(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._db.execute("SELECT note FROM checkpoints ORDER BY id")]

    def last_verified(self) -> bytes | None:
        path = self.directory / CHECKPOINT_FILE
        return path.read_bytes() if path.is_file() else None

    def commit(self, entries: Sequence[tuple[int, bytes]], note: bytes, size: int) -> None:
        """Append verified ``entries`` and record ``note`` as the last verified checkpoint."""
        merkle = self._merkle
        if merkle is None:
            raise TypeError("this copy was opened read only (no tree hasher)")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO entries (idx, data, leaf_hash) VALUES (?, ?, ?)",
                [(index, data, merkle.leaf_hash(data)) for index, data in entries],
            )
            self._db.executemany(
                "INSERT INTO refusal_entries (idx) VALUES (?)",
                [(index,) for index, data in entries if is_refusal(data)],
            )
            self._db.execute("INSERT INTO checkpoints (size, note) VALUES (?, ?)", (size, note))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        _write_atomic(self.directory / CHECKPOINT_FILE, note)

    def save_evidence(self, kind: str, notes: Sequence[bytes]) -> list[Path]:
        folder = self.directory / EVIDENCE_DIR
        folder.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        paths = []
        for number, note in enumerate(notes):
            path = folder / f"{stamp}-{kind}-{number}.note"
            _write_atomic(path, note)
            paths.append(path)
        return paths


# --- checks shared by pull, verify and verify-export ------------------------------------------


def open_node_checkpoint(note: bytes, member: Member, origin: str) -> Checkpoint:
    """Open ``member``'s checkpoint under its roster key; on failure say precisely why.

    Raises:
        _DetectedError: malformed, another origin, a forged signature, or a key not in the roster.
    """
    try:
        return open_checkpoint(note, member.verify_key(), origin=origin)
    except MalformedInput as exc:
        raise _DetectedError(
            Problem(ProblemType.CHECKPOINT_MALFORMED, None, f"checkpoint is malformed: {exc}")
        ) from None
    except VerificationFailed:
        pass
    checkpoint, parsed = parse_checkpoint_unverified(note)  # parsed fine above
    if checkpoint.origin != origin:
        raise _DetectedError(
            Problem(
                ProblemType.CHECKPOINT_INVALID,
                None,
                f"checkpoint is for the log {checkpoint.origin!r}, not {origin!r}",
            )
        )
    expected = signer_key_id(origin, member.verify_key())
    own = [s for s in parsed.signatures if s.name == origin]
    if any(s.key_id == expected for s in own):
        raise _DetectedError(
            Problem(
                ProblemType.CHECKPOINT_FORGED,
                None,
                f"checkpoint of size {checkpoint.size}: the signature does not verify under "
                f"{member.name}'s roster key (forged)",
            )
        )
    ids = ", ".join(s.key_id.hex() for s in own) or "none"
    raise _DetectedError(
        Problem(
            ProblemType.CHECKPOINT_UNKNOWN_KEY,
            None,
            f"checkpoint of size {checkpoint.size} is signed by a key not in the roster "
            f"(key ID {ids}; {member.name}'s roster key has ID {expected.hex()})",
        )
    )


def check_cosignatures(
    note: bytes, roster: Roster, node: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(valid, invalid)`` witness names for the cosignature lines on ``node``'s checkpoint.

    A line is valid when its name is another node of the roster and it verifies as a
    tlog-cosignature/v1 under that node's roster key; every other line except the log's own
    signature is invalid (with the reason in parentheses).
    """
    parsed = Note.parse(note)
    origin = log_origin(roster.federation, node)
    valid: list[str] = []
    invalid: list[str] = []
    for name in dict.fromkeys(s.name for s in parsed.signatures if s.name != origin):
        try:
            member = roster.member(name)
        except NotFound:
            invalid.append(f"{name} (not in the roster)")
            continue
        if member.role is not Role.NODE or member.name == node:
            invalid.append(f"{name} (not a witness node)")
            continue
        key = member.verify_key()
        kid = cosignature_key_id(name, key)
        lines = [s for s in parsed.signatures if s.name == name]
        if any(s.key_id != kid for s in lines):
            invalid.append(f"{name} (key not in the roster)")
            continue
        try:
            open_cosignature(note, key, name=name)
        except (VerificationFailed, MalformedInput):
            invalid.append(f"{name} (does not verify)")
            continue
        valid.append(name)
    return tuple(valid), tuple(invalid)


def _cosignature_problems(invalid: Sequence[str]) -> list[Problem]:
    return [
        Problem(ProblemType.COSIGNATURE_INVALID, None, f"cosignature by {name} is invalid")
        for name in invalid
    ]


def _from_log_problem(problem: LogProblem) -> Problem:
    return Problem(ProblemType(problem.kind.value), problem.index, problem.message)


def _complete_levels(leaves: list[bytes], merkle: TreeHasher) -> list[list[bytes]]:
    """Hashes of every complete aligned subtree, level by level (level 0: the leaves)."""
    levels = [leaves]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append(
            [merkle.node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        )
    return levels


def _prefix_root(levels: list[list[bytes]], size: int, merkle: TreeHasher) -> bytes:
    return merkle.subtree_hash_from_complete(0, size, lambda level, index: levels[level][index])


def agreeing_prefix(
    client: AuditClient,
    leaves: Sequence[bytes],
    signed: Checkpoint,
    merkle: TreeHasher,
    *,
    known: int = 0,
) -> int:
    """The largest ``m`` such that our first ``m`` leaves are a prefix of the signed tree.

    For a candidate ``m`` the node proves that its tree of ``m`` leaves is a prefix of the signed
    one (RFC 9162 consistency proof); the proof verifies against the root of *our* first ``m``
    leaves exactly when none of them differs from the node's. Bisection takes ``O(log n)``
    calls; ``known`` is a size already known to agree. A node whose proofs are garbage only
    makes the answer smaller, never lets a differing leaf pass.
    """
    limit = min(len(leaves), signed.size)
    levels = _complete_levels(list(leaves[:limit]), merkle)

    def consistent(m: int) -> bool:
        if m == 0:
            return True
        ours = _prefix_root(levels, m, merkle)
        if m == signed.size:
            return ours == signed.root
        try:
            merkle.verify_consistency(
                m, signed.size, client.consistency_proof(m, signed.size), ours, signed.root
            )
        except (VerificationFailed, MalformedInput):
            return False
        return True

    if consistent(limit):
        return limit
    lo, hi = min(known, limit - 1), limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if consistent(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InclusionResult:
    """An entry proven to be in a node's log under its latest signed checkpoint."""

    node: str
    index: int
    entry: bytes
    decoded: AuditEntry
    proof: tuple[bytes, ...]
    note: bytes
    checkpoint: Checkpoint

    def receipt_part(self) -> ReceiptPart:
        return ReceiptPart(self.node, self.entry, self.index, self.proof, self.note)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedInput(f"{what} must be a base64 string", field=what)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise MalformedInput(f"{what} is not valid base64", field=what) from exc
    if _b64(raw) != value:
        raise MalformedInput(f"{what} is not canonical base64", field=what)
    return raw


# --- the auditor ------------------------------------------------------------------------------


class Auditor:
    """An auditor's operations over its identity bundle and its state folder."""

    def __init__(
        self,
        identity: Identity,
        state: Path = DEFAULT_STATE,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        stream_timeout: float = STREAM_TIMEOUT,
        quorum: int | None = None,
        sample: int = DEFAULT_SAMPLE,
        rng: random.Random | None = None,
        quorum_wait: float = QUORUM_WAIT,
    ) -> None:
        """``quorum``: valid witness cosignatures a checkpoint needs (None: a strict majority
        of the roster's other nodes); ``sample``: held entries each pull re-fetches and
        compares (0: none); ``rng``: draws that sample (default :class:`secrets.SystemRandom`;
        tests pass a seeded one); ``quorum_wait``: seconds a pull keeps asking for a
        checkpoint that lacks its quorum (module docstring).

        Raises:
            MalformedInput: not an auditor's identity, a negative ``sample``, or a ``quorum``
                that is negative or larger than the number of other nodes.
        """
        if identity.role is not Role.AUDITOR:
            raise MalformedInput(
                f"{identity.name} is enrolled as {identity.role.value}, not auditor",
                field="identity",
            )
        if quorum is not None:
            nodes = identity.roster.with_role(Role.NODE)
            check_quorum(quorum, max(len(nodes) - 1, 0))
        if not isinstance(sample, int) or isinstance(sample, bool):
            raise TypeError("sample must be an int")
        if sample < 0:
            raise MalformedInput("sample must be 0 or more", field="sample")
        self.identity = identity
        self.state = state
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.quorum = quorum
        self.sample = sample
        self.rng: random.Random = rng if rng is not None else secrets.SystemRandom()
        self.quorum_wait = quorum_wait

    @property
    def roster(self) -> Roster:
        return self.identity.roster

    @property
    def merkle(self) -> TreeHasher:
        """The tree over the federation's suite's hash, which every node's log uses."""
        return tree_hasher(self.roster.crypto)

    def nodes(self) -> list[str]:
        """Every node of the roster, in roster order."""
        return [m.name for m in self.roster.with_role(Role.NODE)]

    def pulled_nodes(self) -> list[str]:
        return [n for n in self.nodes() if (self.state / n / ENTRIES_DB).is_file()]

    def _member(self, node: str) -> Member:
        member = self.roster.member(node)
        if member.role is not Role.NODE:
            raise MalformedInput(f"{node} is a {member.role.value}, not a node", field="node")
        return member

    def _origin(self, node: str) -> str:
        return log_origin(self.roster.federation, node)

    def _client(self, member: Member) -> AuditClient:
        return AuditClient(
            self.identity, member, timeout=self.timeout, stream_timeout=self.stream_timeout
        )

    # --- pull ---------------------------------------------------------------------------------

    def pull(self, node: str, *, recheck: bool = False) -> Verdict:
        """Fetch ``node``'s latest checkpoint and the entries the auditor lacks; verify; keep.

        The checkpoint needs the quorum of witness cosignatures; a sample of the entries
        already held is fetched again and compared byte for byte (all of them with
        ``recheck``). Nothing is committed unless everything verifies. The witnesses' refusals
        of ``node``'s checkpoints found in the verified copies of every pulled node fail the
        verdict too. A node that cannot be reached or that fails a call is reported in the
        verdict, not raised.

        Raises:
            NotFound: ``node`` is not in the roster.
            MalformedInput: ``node`` is not a node, or the state folder is damaged.
        """
        return self.pull_all([node], recheck=recheck)[0]

    def pull_all(
        self, nodes: Sequence[str] | None = None, *, recheck: bool = False
    ) -> list[Verdict]:
        """Pull each of ``nodes`` (default: every node of the roster), then attach to each
        verdict what the witnesses refused of that node: refusals logged by a node pulled
        later in the same run count too."""
        targets = self.nodes() if nodes is None else list(nodes)
        for node in targets:
            self._member(node)  # an unknown name fails before anything is fetched
        return self._with_refusals([self._pull_one(node, recheck=recheck) for node in targets])

    def _pull_one(self, node: str, *, recheck: bool) -> Verdict:
        member = self._member(node)
        needed, witnesses = resolve_quorum(self.roster, node, self.quorum)
        with LocalLog(self.state / node, self.merkle) as store:
            held = store.size

            def failed(problem: Problem, evidence: Sequence[Path] = ()) -> Verdict:
                return Verdict(
                    node, "pull", held, None, False, problems=(problem,),
                    evidence=tuple(evidence), quorum=needed, witnesses=witnesses,
                )  # fmt: skip

            try:
                with self._client(member) as client:
                    return self._pull(client, member, store, recheck=recheck)
            except _DetectedError as found:
                return failed(found.problem, found.evidence)
            except Unavailable as exc:
                return failed(Problem(ProblemType.UNREACHABLE, None, f"unreachable: {exc}"))
            except GovshareError as exc:
                return failed(Problem(ProblemType.NODE_ERROR, None, f"call failed: {exc}"))

    # --- witness refusals ---------------------------------------------------------------------

    def witness_refusals(self) -> dict[str, tuple[WitnessRefusal, ...]]:
        """Every ``witness.refused`` entry in the verified copies of the pulled nodes, by the
        node whose checkpoint was refused (the entry's actor)."""
        found: dict[str, list[WitnessRefusal]] = {}
        for witness in self.pulled_nodes():
            with LocalLog(self.state / witness, self.merkle) as store:
                rows = store.refusal_entries()
            for index, data in rows:
                refusal = self._refusal(witness, index, data)
                if refusal is not None:
                    found.setdefault(refusal.node, []).append(refusal)
        return {node: tuple(items) for node, items in found.items()}

    def _refusal(self, witness: str, index: int, data: bytes) -> WitnessRefusal | None:
        try:
            entry = decode_entry(data)
        except MalformedInput:
            return None  # indexed when it decoded: ``verify`` names an edited copy
        node = entry.actor
        try:
            member = self.roster.member(node)
        except NotFound:
            return None  # not a member: nobody to hold it against
        if member.role is not Role.NODE or node == witness:
            return None
        fields = entry.fields
        note = fields.get("checkpoint")
        signed: bool | None = None
        if isinstance(note, str):
            try:
                open_checkpoint(note.encode(), member.verify_key(), origin=self._origin(node))
                signed = True
            except (MalformedInput, VerificationFailed):
                signed = False
        return WitnessRefusal(
            witness=witness,
            index=index,
            node=node,
            rule=str(fields.get("rule", "")),
            reason=str(fields.get("reason", "")),
            time_ms=entry.time_ms,
            checkpoint_signed=signed,
        )

    def _with_refusals(self, verdicts: Sequence[Verdict]) -> list[Verdict]:
        """Each verdict with the witnesses' refusals of its node, which fail it."""
        refusals = self.witness_refusals()
        out = []
        for verdict in verdicts:
            against = refusals.get(verdict.node, ())
            if not against:
                out.append(verdict)
                continue
            problem = Problem(
                ProblemType.WITNESS_REFUSED, None, refusal_summary(verdict.node, against)
            )
            out.append(replace(verdict, problems=(*verdict.problems, problem), refusals=against))
        return out

    def _previous(self, store: LocalLog, member: Member, origin: str) -> Checkpoint | None:
        note = store.last_verified()
        if note is None:
            if store.size:
                raise MalformedInput(
                    f"{store.directory} holds entries but no verified checkpoint", field="state"
                )
            return None
        try:
            return open_node_checkpoint(note, member, origin)
        except _DetectedError as found:
            raise _DetectedError(
                Problem(
                    ProblemType.STATE_DAMAGED,
                    None,
                    f"the auditor's own last verified checkpoint fails: {found.problem.message}",
                )
            ) from None

    def _check_extends(
        self,
        client: AuditClient,
        store: LocalLog,
        previous: Checkpoint,
        new: Checkpoint,
        note: bytes,
    ) -> None:
        """The new checkpoint must extend the last verified one (RFC 9162 consistency)."""
        node = client.member.name
        if new.size < previous.size:
            agree = agreeing_prefix(client, store.leaf_hashes(), new, self.merkle)
            kept = (
                "a consistent prefix of it"
                if agree == new.size
                else f"the two agree on entries 0..{agree - 1} only"
                if agree
                else "the two share no entry"
            )
            evidence = store.save_evidence("rollback", [store.last_verified() or b"", note])
            raise _DetectedError(
                Problem(
                    ProblemType.ROLLBACK,
                    agree,
                    f"rollback: {node} presents a checkpoint of size {new.size}, smaller than "
                    f"the checkpoint of size {previous.size} the auditor verified ({kept}): "
                    f"entries {agree}..{previous.size - 1} were truncated or rolled back",
                ),
                evidence,
            )
        if new.size == previous.size:
            if new.root != previous.root:
                agree = agreeing_prefix(client, store.leaf_hashes(), new, self.merkle)
                evidence = store.save_evidence("fork", [store.last_verified() or b"", note])
                raise _DetectedError(
                    Problem(
                        ProblemType.CHECKPOINT_FORK,
                        agree,
                        f"fork: two checkpoints of size {new.size} signed by {node} with "
                        f"different roots ({previous.root.hex()[:16]} verified, "
                        f"{new.root.hex()[:16]} presented); the histories diverge at entry "
                        f"{agree}",
                    ),
                    evidence,
                )
            return
        if previous.size == 0:
            return  # every tree extends the empty tree
        proof = client.consistency_proof(previous.size, new.size)
        try:
            self.merkle.verify_consistency(previous.size, new.size, proof, previous.root, new.root)
        except (VerificationFailed, MalformedInput):
            agree = agreeing_prefix(client, store.leaf_hashes(), new, self.merkle)
            evidence = store.save_evidence("fork", [store.last_verified() or b"", note])
            raise _DetectedError(
                Problem(
                    ProblemType.CHECKPOINT_FORK,
                    agree,
                    f"fork: {node}'s checkpoint of size {new.size} does not extend the "
                    f"checkpoint of size {previous.size} the auditor verified (consistency "
                    f"proof fails: history was rewritten; the histories diverge at entry "
                    f"{agree})",
                ),
                evidence,
            ) from None

    def _pull(
        self, client: AuditClient, member: Member, store: LocalLog, *, recheck: bool
    ) -> Verdict:
        node = member.name
        origin = self._origin(node)
        needed, witnesses = resolve_quorum(self.roster, node, self.quorum)
        previous = self._previous(store, member, origin)
        held = store.size
        rechecked = 0

        def fetch() -> tuple[bytes, Checkpoint, tuple[str, ...], tuple[str, ...]]:
            note = client.checkpoint()
            new = open_node_checkpoint(note, member, origin)
            return (note, new, *check_cosignatures(note, self.roster, node))

        note, new, valid, invalid = fetch()

        def verdict(problems: Sequence[Problem], fetched: int = 0, size: int = held) -> Verdict:
            return Verdict(
                node, "pull", size, new.size, True, valid, invalid, fetched, tuple(problems),
                quorum=needed, witnesses=witnesses, rechecked=rechecked,
            )  # fmt: skip

        # A rollback or fork against what this auditor verified is named before a missing
        # quorum (it says more); a checkpoint short of its quorum is asked for again while its
        # witnessing round may still be running (module docstring).
        deadline = time.monotonic() + self.quorum_wait
        while True:
            if invalid:
                return verdict(_cosignature_problems(invalid))
            if previous is not None:
                self._check_extends(client, store, previous, new, note)
            short = quorum_problem(new.size, valid, needed, witnesses)
            if short is None or time.monotonic() >= deadline:
                break
            time.sleep(QUORUM_POLL)
            note, new, valid, invalid = fetch()
        if previous is not None and held != previous.size:
            raise MalformedInput(
                f"{store.directory} holds {held} entries but its checkpoint has size "
                f"{previous.size}; start a fresh state folder",
                field="state",
            )
        if short is not None:
            return verdict([short])
        if held and (recheck or self.sample):
            indices = None if recheck else self._sample_indices(held)
            changed = self._recheck(client, store, held, indices)
            if changed is not None:
                return verdict([changed])
            rechecked = held if indices is None else len(indices)

        incoming: list[tuple[int, bytes]] = []
        stray: list[Problem] = []

        def served() -> Iterator[StoredEntry]:
            for index, data in client.entries(held, new.size):
                if not held <= index < new.size or (incoming and index <= incoming[-1][0]):
                    stray.append(
                        Problem(
                            ProblemType.ENTRY_OUT_OF_RANGE,
                            index,
                            f"entry {index}: served out of order or outside [{held}, {new.size})",
                        )
                    )
                    return
                incoming.append((index, data))
                yield index, data, None

        def everything() -> Iterator[StoredEntry]:
            yield from store.iter_entries()
            yield from served()

        result = verify_log(
            everything(),
            [*store.verified_notes(), note],
            public_key=member.verify_key(),
            origin=origin,
        )
        if stray:
            return verdict(stray)
        problems = [_from_log_problem(p) for p in result.problems]
        for position, problem in enumerate(problems):
            if problem.kind is ProblemType.LOG_TRUNCATED:
                problems[position] = Problem(
                    problem.kind,
                    result.size,
                    f"{node} served {result.size} entries but its signed checkpoint commits to "
                    f"{new.size} (truncated)",
                )
        if problems and problems[0].kind is ProblemType.CHECKPOINT_MISMATCH:
            leaves = store.leaf_hashes() + [self.merkle.leaf_hash(data) for _, data in incoming]
            edited = agreeing_prefix(client, leaves, new, self.merkle, known=held)
            if len(leaves) == new.size and edited < new.size:
                problems.insert(
                    0,
                    Problem(
                        ProblemType.ENTRY_EDITED,
                        edited,
                        f"entry {edited}: leaf hash mismatch — its bytes are not the ones "
                        f"{node}'s signed checkpoint of size {new.size} commits to (edited)",
                    ),
                )
        if problems:
            return verdict(problems)
        store.commit(incoming, note, new.size)
        return verdict([], fetched=len(incoming), size=held + len(incoming))

    def _sample_indices(self, held: int) -> list[int]:
        """``sample`` distinct indices below ``held``, drawn with the auditor's rng, sorted."""
        return sorted(self.rng.sample(range(held), min(self.sample, held)))

    def _recheck(
        self,
        client: AuditClient,
        store: LocalLog,
        held: int,
        indices: Sequence[int] | None = None,
    ) -> Problem | None:
        """Re-fetch held entries (all of them, or the sorted ``indices``) and compare them byte
        for byte with the copy the auditor verified; the first difference is the problem."""
        node = client.member.name

        def changed(position: int) -> Problem:
            return Problem(
                ProblemType.ENTRY_EDITED,
                position,
                f"entry {position}: {node} now serves other bytes than the entry the "
                "auditor verified (edited, deleted or reordered after verification)",
            )

        if indices is not None:
            for start, end in _runs(indices):
                served = iter(list(client.entries(start, end)))  # at most ``sample`` entries
                for position in range(start, end):
                    got = next(served, None)
                    if got is None:
                        return Problem(
                            ProblemType.LOG_TRUNCATED,
                            position,
                            f"{node} no longer serves entry {position}, which the auditor "
                            "verified (truncated or deleted)",
                        )
                    if got[0] != position or got[1] != store.entry(position):
                        return changed(position)
            return None
        ours = store.iter_entries()
        count = 0
        for (index, data), (position, mine, _) in zip(client.entries(0, held), ours, strict=False):
            if index != position or data != mine:
                return changed(position)
            count += 1
        if count != held:
            return Problem(
                ProblemType.LOG_TRUNCATED,
                count,
                f"{node} now serves {count} of the {held} entries the auditor verified (truncated)",
            )
        return None

    # --- verify -------------------------------------------------------------------------------

    def verify(self, node: str) -> Verdict:
        """Verify the local copy of ``node``'s log from scratch (no network): entries,
        checkpoints, cosignatures and their quorum; the witnesses' refusals of ``node``'s
        checkpoints in the pulled copies fail the verdict too.

        Raises:
            NotFound: ``node`` is not in the roster.
        """
        return self.verify_all([node])[0]

    def verify_all(self, nodes: Sequence[str] | None = None) -> list[Verdict]:
        """Verify each of ``nodes`` (default: every node of the roster), with the refusals."""
        targets = self.nodes() if nodes is None else list(nodes)
        members = [self._member(node) for node in targets]
        return self._with_refusals([self._verify_one(member) for member in members])

    def _verify_one(self, member: Member) -> Verdict:
        node = member.name
        store = LocalLog.existing(self.state / node, self.merkle)
        if store is None:
            return _not_pulled(node)
        with store:
            last = store.last_verified()
            if last is None:
                return _not_pulled(node)
            seen: set[int] = set()

            def entries() -> Iterator[StoredEntry]:
                for item in store.iter_entries():
                    if is_refusal(item[1]):
                        seen.add(item[0])
                    yield item

            verdict = _verify_material(
                "verify",
                member,
                self.roster,
                entries(),
                store.verified_notes(),
                last,
                quorum=self.quorum,
            )
            indexed = store.refusal_indices()
        if seen != indexed:
            differ = sorted(seen ^ indexed)
            problem = Problem(
                ProblemType.STATE_DAMAGED,
                differ[0],
                f"the auditor's index of witness refusals in its copy of {node} differs from "
                f"the entries at {', '.join(map(str, differ[:5]))}"
                f"{' …' if len(differ) > 5 else ''}",
            )
            verdict = replace(verdict, problems=(*verdict.problems, problem))
        return verdict

    # --- prove --------------------------------------------------------------------------------

    def prove(self, node: str, index: int) -> InclusionResult:
        """Prove that entry ``index`` is in ``node``'s log under its latest checkpoint.

        The checkpoint is opened under the roster key and, when the auditor holds a verified
        checkpoint of the node, must extend it; the entry's bytes must match the auditor's copy
        when it holds one. The state is not changed.

        Raises:
            VerificationFailed: a signature, consistency or inclusion check fails (the message
                says which).
            MalformedInput: ``index`` is not below the checkpoint's size.
            Unavailable: the node cannot be reached.
        """
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise MalformedInput("index must be a non-negative integer", field="index")
        member = self._member(node)
        origin = self._origin(node)
        with LocalLog(self.state / node, self.merkle) as store, self._client(member) as client:
            try:
                previous = self._previous(store, member, origin)
                note = client.checkpoint()
                checkpoint = open_node_checkpoint(note, member, origin)
                if previous is not None:
                    self._check_extends(client, store, previous, checkpoint, note)
            except _DetectedError as found:
                raise VerificationFailed(f"{node}: {found.problem.message}") from None
            if index >= checkpoint.size:
                raise MalformedInput(
                    f"{node}'s checkpoint covers entries 0..{checkpoint.size - 1}, not {index}",
                    field="index",
                )
            served = list(client.entries(index, index + 1))
            if len(served) != 1 or served[0][0] != index:
                raise VerificationFailed(f"{node} did not serve entry {index} (deleted?)")
            data = served[0][1]
            proof = tuple(client.inclusion_proof(index, checkpoint.size))
            try:
                merkle = self.merkle
                merkle.verify_inclusion(
                    index, checkpoint.size, merkle.leaf_hash(data), proof, checkpoint.root
                )
            except (VerificationFailed, MalformedInput):
                raise VerificationFailed(
                    f"entry {index} of {node}: inclusion proof does not verify under the signed "
                    f"checkpoint of size {checkpoint.size} (edited?)"
                ) from None
            mine = store.entry(index)
            if mine is not None and mine != data:
                raise VerificationFailed(
                    f"entry {index} of {node}: differs from the copy the auditor verified"
                )
        return InclusionResult(node, index, data, decode_entry(data), proof, note, checkpoint)

    # --- show a query -------------------------------------------------------------------------

    def show_query(self, query_id: str) -> QueryReconciliation:
        """Every node's entries for ``query_id``, and whether they agree (module docstring)."""
        if not query_id:
            raise MalformedInput("a query id is required", field="query_id")
        views: list[NodeQueryEntries] = []
        problems: list[str] = []
        for member in self.roster.with_role(Role.NODE):
            try:
                with self._client(member) as client:
                    served = client.query_entries(query_id)
            except GovshareError as exc:
                views.append(NodeQueryEntries(member.name, error=str(exc)))
                continue
            entries: list[AuditEntry] = []
            local = LocalLog.existing(self.state / member.name, self.merkle)
            try:
                for index, data in served:
                    try:
                        entry = decode_entry(data)
                    except MalformedInput as exc:
                        problems.append(f"{member.name} entry {index} is malformed: {exc}")
                        continue
                    if entry.query_id != query_id or entry.index != index:
                        problems.append(
                            f"{member.name} served entry {index} as part of the query, but it "
                            f"records query {entry.query_id!r} at index {entry.index}"
                        )
                        continue
                    mine = local.entry(index) if local is not None else None
                    if mine is not None and mine != data:
                        problems.append(
                            f"{member.name} entry {index} differs from the copy the auditor "
                            "verified"
                        )
                    entries.append(entry)
            finally:
                if local is not None:
                    local.close()
            views.append(_collect_fields(member.name, entries))
        issues = problems + _reconcile(query_id, views)
        return QueryReconciliation(query_id, tuple(views), tuple(issues))

    # --- export -------------------------------------------------------------------------------

    def export(self, out_file: Path) -> list[str]:
        """Write every pulled node's entries and verified checkpoints, with the signed roster,
        to ``out_file`` (atomically); return the nodes exported."""
        roster_bytes = (self.identity.directory / ROSTER).read_bytes()
        Roster.verify(roster_bytes, x509.load_pem_x509_certificate(self.identity.ca_cert_pem))
        nodes: dict[str, Any] = {}
        for node in self.pulled_nodes():
            with LocalLog(self.state / node, self.merkle) as store:
                last = store.last_verified()
                if last is None:
                    continue
                nodes[node] = {
                    "checkpoint": _b64(last),
                    "checkpoints": [_b64(n) for n in store.verified_notes()],
                    "entries": [_b64(data) for _, data, _ in store.iter_entries()],
                }
        bundle = {
            "format": EXPORT_FORMAT,
            "federation": self.roster.federation,
            "exported_by": self.identity.name,
            "roster": _b64(roster_bytes),
            "nodes": nodes,
        }
        _write_atomic(out_file, json.dumps(bundle, sort_keys=True).encode())
        return list(nodes)

    def verify_export(self, path: Path) -> list[Verdict]:
        """Verify an export bundle offline: see :func:`verify_export`."""
        return verify_export(path, ca_cert_pem=self.identity.ca_cert_pem, quorum=self.quorum)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``indices`` as half-open runs of adjacent ones: [1, 2, 5] gives
    (1, 3) and (5, 6)."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _not_pulled(node: str) -> Verdict:
    problem = Problem(
        ProblemType.NOT_PULLED, None, f"nothing pulled yet; run 'govshare audit pull {node}'"
    )
    return Verdict(node, "verify", 0, None, False, problems=(problem,))


def _verify_material(
    action: str,
    member: Member,
    roster: Roster,
    entries: Iterable[StoredEntry],
    notes: Sequence[bytes],
    last: bytes,
    *,
    quorum: int | None,
) -> Verdict:
    """Verify a log copy: checkpoint signature, cosignatures and their quorum, full
    recomputation."""
    node = member.name
    origin = log_origin(roster.federation, node)
    needed, witnesses = resolve_quorum(roster, node, quorum)
    try:
        checkpoint = open_node_checkpoint(last, member, origin)
    except _DetectedError as found:
        return Verdict(
            node, action, 0, None, False, problems=(found.problem,),
            quorum=needed, witnesses=witnesses,
        )  # fmt: skip
    valid, invalid = check_cosignatures(last, roster, node)
    result = verify_log(entries, [*notes, last], public_key=member.verify_key(), origin=origin)
    problems = [_from_log_problem(p) for p in result.problems]
    largest = max([checkpoint.size, *(parse_checkpoint_unverified(n)[0].size for n in notes)])
    if result.size > largest:
        problems.append(
            Problem(
                ProblemType.ENTRY_OUT_OF_RANGE,
                largest,
                f"entries {largest}..{result.size - 1} are not covered by any verified checkpoint",
            )
        )
    problems.extend(_cosignature_problems(invalid))
    short = quorum_problem(checkpoint.size, valid, needed, witnesses)
    if short is not None:
        problems.append(short)
    return Verdict(
        node,
        action,
        result.size,
        checkpoint.size,
        True,
        valid,
        invalid,
        problems=tuple(problems),
        quorum=needed,
        witnesses=witnesses,
    )


def _parse_bundle(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise MalformedInput("export bundle is not UTF-8 JSON", field="bundle") from exc
    keys = {"format", "federation", "exported_by", "roster", "nodes"}
    if not isinstance(value, dict) or value.keys() != keys:
        raise MalformedInput(f"export bundle must be an object with {sorted(keys)}")
    if value["format"] != EXPORT_FORMAT:
        raise MalformedInput(f"unsupported export format {value['format']!r}", field="format")
    if not isinstance(value["nodes"], dict) or not isinstance(value["federation"], str):
        raise MalformedInput("export bundle: nodes must be an object", field="nodes")
    for node, raw in value["nodes"].items():
        if not isinstance(raw, dict) or raw.keys() != {"checkpoint", "checkpoints", "entries"}:
            raise MalformedInput(f"export bundle: node {node!r} is malformed", field="nodes")
        if not isinstance(raw["checkpoints"], list) or not isinstance(raw["entries"], list):
            raise MalformedInput(f"export bundle: node {node!r} lists are malformed")
    return value


def verify_export(path: Path, *, ca_cert_pem: bytes, quorum: int | None = None) -> list[Verdict]:
    """Verify an export bundle without network: the roster must be signed by the federation CA
    ``ca_cert_pem`` (the verifying auditor's own, never the bundle's), then every node's copy is
    verified as :meth:`Auditor.verify` does, each last checkpoint needing ``quorum`` witness
    cosignatures (None: a majority of the other nodes, :func:`default_quorum`).

    Raises:
        MalformedInput: the bundle is not a well-formed export.
        VerificationFailed: its roster is not signed by this federation's CA.
    """
    if path.stat().st_size > MAX_EXPORT_SIZE:
        raise MalformedInput(f"{path} is larger than an export may be", field="bundle")
    bundle = _parse_bundle(path.read_bytes())
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError:
        raise MalformedInput("the federation CA certificate is not PEM") from None
    roster = Roster.verify(_unb64(bundle["roster"], "roster"), ca_cert)
    if roster.federation != bundle["federation"]:
        raise MalformedInput("export bundle names another federation than its roster")
    verdicts: list[Verdict] = []
    for node, raw in sorted(bundle["nodes"].items()):
        member = roster.member(node)
        if member.role is not Role.NODE:
            raise MalformedInput(f"export bundle: {node} is not a node", field="nodes")
        entries = (
            (position, _unb64(item, "entry"), None) for position, item in enumerate(raw["entries"])
        )
        verdicts.append(
            _verify_material(
                "verify-export",
                member,
                roster,
                entries,
                [_unb64(n, "checkpoint") for n in raw["checkpoints"]],
                _unb64(raw["checkpoint"], "checkpoint"),
                quorum=quorum,
            )
        )
    return verdicts


@dataclass(frozen=True)
class WitnessedPart(VerifiedPart):
    """A verified receipt part, with the witnesses that validly cosigned its checkpoint."""

    cosignatures_valid: tuple[str, ...] = ()
    quorum: int = 0
    witnesses: int = 0


def verify_receipt(
    receipt: Receipt | bytes, roster: Roster, *, quorum: int | None = None
) -> tuple[WitnessedPart, ...]:
    """Verify a query receipt against the nodes' keys and origins in ``roster``, each part's
    checkpoint needing ``quorum`` valid witness cosignatures (None: a majority of the roster's
    other nodes, :func:`default_quorum`).

    Raises:
        MalformedInput: the receipt (bytes) or one of its entries or notes is malformed, or
            ``quorum`` exceeds the other nodes.
        VerificationFailed: a part's checkpoint signature, query id, index or inclusion proof
            does not verify, a part names a member that is not a node, or a part's checkpoint
            has an invalid cosignature or fewer valid ones than the quorum.
    """
    parsed = decode_receipt(receipt) if isinstance(receipt, bytes) else receipt
    logs = {
        m.name: LogKey(log_origin(roster.federation, m.name), m.verify_key())
        for m in roster.with_role(Role.NODE)
    }
    witnessed: list[WitnessedPart] = []
    for number, (part, verified) in enumerate(
        zip(parsed.parts, verify_receipt_with_keys(parsed, logs), strict=True)
    ):
        where = f"receipt part {number} ({part.node}, entry {part.index})"
        needed, witnesses = resolve_quorum(roster, part.node, quorum)
        valid, invalid = check_cosignatures(part.checkpoint, roster, part.node)
        if invalid:
            raise VerificationFailed(f"{where}: cosignature by {invalid[0]} is invalid")
        short = quorum_problem(verified.checkpoint.size, valid, needed, witnesses)
        if short is not None:
            raise VerificationFailed(f"{where}: {short.message}")
        witnessed.append(
            WitnessedPart(
                verified.node,
                verified.index,
                verified.entry,
                verified.checkpoint,
                cosignatures_valid=valid,
                quorum=needed,
                witnesses=witnesses,
            )
        )
    return tuple(witnessed)
