"""The node's append-only audit log: one SQLite file, RFC 6962 tree, signed C2SP checkpoints.

Storage and durability:

- Its own SQLite file in WAL mode with ``synchronous=FULL``: a call that returned has its entries
  on disk, and a crash (``kill -9``, power loss) leaves the log at the last committed append.
- Triggers refuse ``UPDATE`` and ``DELETE`` on every table (``RAISE(ABORT, ...)``). They stop
  mistakes and ordinary code paths, not an attacker with the file: that is what signed
  checkpoints, witnesses and auditors (:func:`govshare.protocols.auditverify.verify_log`) are for.
- ``entries`` holds each entry's canonical bytes (see :mod:`govshare.protocols.auditverify`) and
  leaf hash; ``nodes`` holds the hash of every complete aligned subtree, written once when its last
  leaf arrives, so inclusion and consistency proofs for any past size take ``O(log^2 n)`` lookups
  and never rescan the log.
- ``record`` commits each entry on its own (per-append durability, the default). ``record_many``
  commits a batch in one transaction: same durability for the whole batch, far higher throughput.

Checkpoints: :meth:`AuditLog.checkpoint` signs the current (size, root) as a C2SP checkpoint with
the node's Ed25519 key and stores it; witness cosignatures are stored beside it after they verify.
The log only ever signs its own append-only tree, so two of its checkpoints are always consistent.

Thread safety: one connection guarded by a lock; every public method may be called from any
thread. The clock is injected (unix milliseconds) so tests and replays are deterministic.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from govshare.protocols.auditverify import (
    AuditEntry,
    LogVerification,
    decode_entry,
    encode_entry,
    verify_log,
)
from govshare.protocols.checkpoint import (
    Checkpoint,
    Note,
    NoteSignature,
    open_checkpoint,
    open_cosignature,
    sign_checkpoint,
)
from govshare.protocols.errors import MalformedInput, NotFound
from govshare.protocols.merkle import (
    CompactRange,
    consistency_proof_from_subtrees,
    inclusion_proof_from_subtrees,
    leaf_hash,
    subtree_hash_from_complete,
)

SCHEMA_VERSION = 1
READ_PAGE = 10_000  # rows per SELECT when streaming the whole log

Clock = Callable[[], int]
"""Returns the current time in unix milliseconds."""


def system_clock_ms() -> int:
    return time.time_ns() // 1_000_000


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    idx       INTEGER PRIMARY KEY,
    data      BLOB NOT NULL,
    leaf_hash BLOB NOT NULL CHECK (length(leaf_hash) = 32),
    query_id  TEXT
);
CREATE INDEX IF NOT EXISTS entries_by_query ON entries(query_id) WHERE query_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    id         INTEGER PRIMARY KEY,
    size       INTEGER NOT NULL,
    root       BLOB NOT NULL,
    note       BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cosignatures (
    id            INTEGER PRIMARY KEY,
    checkpoint_id INTEGER NOT NULL REFERENCES checkpoints(id),
    witness       TEXT NOT NULL,
    line          BLOB NOT NULL,
    cosigned_at   INTEGER NOT NULL,
    UNIQUE (checkpoint_id, witness)
);
"""

_APPEND_ONLY_TABLES = ("meta", "entries", "nodes", "checkpoints", "cosignatures")


def _triggers() -> str:
    statements = []
    for table in _APPEND_ONLY_TABLES:
        for action in ("UPDATE", "DELETE"):
            statements.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{action.lower()} "
                f"BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'audit log is append-only: {action} on {table}'); END;"
            )
    return "\n".join(statements)


@dataclass(frozen=True)
class LogEntry:
    """A stored entry: its index, canonical bytes and leaf hash ``SHA-256(0x00 || data)``."""

    index: int
    data: bytes
    leaf_hash: bytes

    def decode(self) -> AuditEntry:
        return decode_entry(self.data)


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint as stored; ``note`` includes the witness cosignatures received."""

    id: int
    size: int
    root: bytes
    note: bytes
    created_ms: int


@dataclass(frozen=True)
class Event:
    """One event for :meth:`AuditLog.record_many`, the arguments of :meth:`AuditLog.record`."""

    kind: str
    fields: Mapping[str, object]
    actor: str
    query_id: str | None = None


class AuditLog:
    """The node's audit log; implements :class:`govshare.node.audit_sink.AuditSink`."""

    def __init__(self, connection: sqlite3.Connection, *, clock: Clock = system_clock_ms) -> None:
        """Use :meth:`open`; this takes an already configured connection."""
        self._db = connection
        self._clock = clock
        self._lock = threading.RLock()
        self._tree = self._load_tree()

    @classmethod
    def open(cls, path: str | Path, *, clock: Clock = system_clock_ms) -> AuditLog:
        """Open (creating if needed) the log file at ``path``.

        Raises:
            MalformedInput: the file is not a govshare audit log of a supported version, or its
                stored tree is damaged (use :func:`verify_log` to find where).
        """
        connection = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise MalformedInput(f"cannot put {path} in WAL mode", field="path")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.executescript(_SCHEMA + _triggers())  # idempotent: IF NOT EXISTS
            connection.execute("BEGIN IMMEDIATE")
            row = connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise MalformedInput(f"unsupported audit log schema {row[0]}", field="path")
            connection.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise MalformedInput(f"{path} is not a usable audit log: {exc}", field="path") from exc
        except BaseException:
            connection.close()
            raise
        try:
            return cls(connection, clock=clock)
        except BaseException:
            connection.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- tree state ---------------------------------------------------------------------------

    def _load_tree(self) -> CompactRange:
        row = self._db.execute("SELECT count(*), max(idx) FROM entries").fetchone()
        count, last = int(row[0]), row[1]
        if count and last != count - 1:
            raise MalformedInput("audit log entries are not contiguous", field="entries")
        positions = CompactRange.positions(count)
        try:
            hashes = [self._complete(level, index) for level, index in positions]
        except NotFound as exc:
            raise MalformedInput("audit log subtree hashes are missing", field="nodes") from exc
        return CompactRange(count, hashes)

    def _complete(self, level: int, index: int) -> bytes:
        if level == 0:
            row = self._db.execute("SELECT leaf_hash FROM entries WHERE idx = ?", (index,))
        else:
            row = self._db.execute(
                "SELECT hash FROM nodes WHERE level = ? AND idx = ?", (level, index)
            )
        found = row.fetchone()
        if found is None:
            raise NotFound(f"no subtree hash at level {level}, index {index}")
        value: bytes = found[0]
        return value

    def _subtree(self, start: int, end: int) -> bytes:
        return subtree_hash_from_complete(start, end, self._complete)

    @property
    def size(self) -> int:
        with self._lock:
            self._sync()
            return self._tree.size

    def root(self) -> bytes:
        """The RFC 6962 root of the whole log as committed."""
        with self._lock:
            return self._tree.root()

    # --- appending ----------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str,
        query_id: str | None = None,
    ) -> int:
        """Append one entry durably (its own transaction, fsynced) and return its index.

        Raises:
            MalformedInput, TypeError: the event cannot be encoded (see
                :func:`govshare.protocols.auditverify.encode_entry`); nothing is written.
        """
        return self.record_many([Event(kind, fields, actor, query_id)])[0]

    def record_many(self, events: Sequence[Event]) -> list[int]:
        """Append ``events`` in one transaction; return their indices. All or nothing.

        Safe beside other processes appending to the same file (an operator's command while the
        node serves): the write lock is taken first, then the tree continues from what is
        stored.
        """
        if not events:
            return []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._sync()
                tree = CompactRange(self._tree.size, self._tree.hashes)
                now = self._clock()
                entry_rows: list[tuple[int, bytes, bytes, str | None]] = []
                node_rows: list[tuple[int, int, bytes]] = []
                for event in events:
                    index = tree.size
                    data = encode_entry(
                        AuditEntry(
                            index=index,
                            time_ms=now,
                            kind=event.kind,
                            actor=event.actor,
                            query_id=event.query_id,
                            fields=event.fields,
                        )
                    )
                    digest = leaf_hash(data)
                    entry_rows.append((index, data, digest, event.query_id))
                    node_rows.extend(tree.append(digest))
                self._db.executemany(
                    "INSERT INTO entries (idx, data, leaf_hash, query_id) VALUES (?, ?, ?, ?)",
                    entry_rows,
                )
                self._db.executemany(
                    "INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", node_rows
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._tree = tree
            return [row[0] for row in entry_rows]

    def _sync(self) -> None:
        """Reload the tree if another handle appended since this one last looked."""
        row = self._db.execute("SELECT max(idx) FROM entries").fetchone()
        stored = 0 if row[0] is None else int(row[0]) + 1
        if stored != self._tree.size:
            self._tree = self._load_tree()

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint(
        self, signing_key: Ed25519PrivateKey, origin: str, now: int | None = None
    ) -> bytes:
        """Sign and store a checkpoint of the current size and root; return the signed note.

        If the latest stored checkpoint already covers this size with the same origin, it is
        returned (with its cosignatures) and nothing new is stored. ``now`` (unix ms) is the
        stored creation time; it defaults to the injected clock.
        """
        with self._lock:
            self._sync()
            checkpoint = Checkpoint(origin, self._tree.size, self._tree.root())
            note = sign_checkpoint(checkpoint, signing_key)
            latest = self._latest_row()
            if latest is not None and latest[2] == note:
                return self._with_cosignatures(latest[0], latest[2])
            created = self._clock() if now is None else now
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO checkpoints (size, root, note, created_ms) VALUES (?, ?, ?, ?)",
                    (checkpoint.size, checkpoint.root, note, created),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return note

    def _latest_row(self) -> tuple[int, int, bytes] | None:
        row = self._db.execute(
            "SELECT id, size, note FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))

    def _with_cosignatures(self, checkpoint_id: int, note: bytes) -> bytes:
        lines = [
            bytes(row[0])
            for row in self._db.execute(
                "SELECT line FROM cosignatures WHERE checkpoint_id = ? ORDER BY id",
                (checkpoint_id,),
            )
        ]
        return note + b"".join(lines)

    def _stored(self, row: tuple[int, int, bytes, bytes, int]) -> StoredCheckpoint:
        checkpoint_id, size, root, note, created = row
        return StoredCheckpoint(
            id=checkpoint_id,
            size=size,
            root=bytes(root),
            note=self._with_cosignatures(checkpoint_id, bytes(note)),
            created_ms=created,
        )

    def checkpoints(self) -> list[StoredCheckpoint]:
        """Every stored checkpoint, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, size, root, note, created_ms FROM checkpoints ORDER BY id"
            ).fetchall()
            return [self._stored(row) for row in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, size, root, note, created_ms FROM checkpoints ORDER BY id DESC LIMIT 1"
            ).fetchone()
            return None if row is None else self._stored(row)

    def checkpoint_at(self, size: int) -> StoredCheckpoint:
        """The latest checkpoint of exactly ``size`` entries.

        Raises:
            NotFound: no checkpoint was signed at that size.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT id, size, root, note, created_ms FROM checkpoints WHERE size = ? "
                "ORDER BY id DESC LIMIT 1",
                (size,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no checkpoint of size {size}")
            return self._stored(row)

    def add_cosignature(
        self,
        checkpoint_id: int,
        signature: NoteSignature,
        *,
        witness_key: Ed25519PublicKey,
        log_key: Ed25519PublicKey,
    ) -> int:
        """Store a witness's cosignature on checkpoint ``checkpoint_id``; return its time.

        It is verified first (tlog-cosignature v1 under ``witness_key``), together with the log's
        own signature under ``log_key``, so only valid lines are ever served.

        Raises:
            NotFound: no such checkpoint.
            VerificationFailed: the cosignature does not verify.
            MalformedInput: it is malformed, or this witness already cosigned it.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT note FROM checkpoints WHERE id = ?", (checkpoint_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no checkpoint {checkpoint_id}")
            note = Note.parse(bytes(row[0])).with_signatures(signature)
            checkpoint = Checkpoint.from_text(note.text)
            open_checkpoint(note.encode(), log_key, origin=checkpoint.origin)
            _, cosigned_at = open_cosignature(note.encode(), witness_key, name=signature.name)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO cosignatures (checkpoint_id, witness, line, cosigned_at) "
                    "VALUES (?, ?, ?, ?)",
                    (checkpoint_id, signature.name, signature.line(), cosigned_at),
                )
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise MalformedInput("this witness already cosigned this checkpoint") from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cosigned_at

    # --- reading ------------------------------------------------------------------------------

    def entries(self, start: int, end: int) -> list[LogEntry]:
        """Entries ``start .. end-1``.

        Raises:
            MalformedInput: not ``0 <= start <= end <= size``.
        """
        with self._lock:
            self._check_range(start, end, self._tree.size)
            rows = self._db.execute(
                "SELECT idx, data, leaf_hash FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end),
            ).fetchall()
        return [LogEntry(int(i), bytes(d), bytes(h)) for i, d, h in rows]

    def iter_entries(self, start: int = 0, end: int | None = None) -> Iterator[LogEntry]:
        """Stream entries in pages of :data:`READ_PAGE`, for exports and full verification."""
        stop = self.size if end is None else end
        self._check_range(start, stop, self.size)
        position = start
        while position < stop:
            page = self.entries(position, min(stop, position + READ_PAGE))
            yield from page
            position += len(page)

    def entries_for_query(self, query_id: str) -> list[LogEntry]:
        """Every entry recorded with this ``query_id``, in log order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, data, leaf_hash FROM entries WHERE query_id = ? ORDER BY idx",
                (query_id,),
            ).fetchall()
        return [LogEntry(int(i), bytes(d), bytes(h)) for i, d, h in rows]

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of entry ``index`` in the tree of the first ``size`` entries.

        Raises:
            MalformedInput: ``index >= size`` or ``size`` beyond the log.
        """
        with self._lock:
            self._check_range(0, size, self._tree.size)
            return inclusion_proof_from_subtrees(index, size, self._subtree)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof from ``old_size`` to ``new_size`` entries.

        Raises:
            MalformedInput: not ``0 <= old_size <= new_size <= size``.
        """
        with self._lock:
            self._check_range(old_size, new_size, self._tree.size)
            return consistency_proof_from_subtrees(old_size, new_size, self._subtree)

    def root_at(self, size: int) -> bytes:
        """The root of the tree of the first ``size`` entries."""
        with self._lock:
            self._check_range(0, size, self._tree.size)
            if size == 0:
                return CompactRange().root()
            return self._subtree(0, size)

    @staticmethod
    def _check_range(start: int, end: int, size: int) -> None:
        for value in (start, end):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError("indices must be int")
        if not 0 <= start <= end <= size:
            raise MalformedInput(
                f"range [{start}, {end}) is outside the log of {size} entries", field="range"
            )

    # --- verification -------------------------------------------------------------------------

    def verify(
        self,
        public_key: Ed25519PublicKey,
        origin: str,
        *,
        trusted_checkpoints: Sequence[bytes] = (),
    ) -> LogVerification:
        """Run :func:`verify_log` over this file: every entry, every stored checkpoint, plus
        ``trusted_checkpoints`` the caller kept (which catch truncation of this file)."""
        with self._lock:
            return _verify_connection(
                self._db,
                public_key=public_key,
                origin=origin,
                trusted_checkpoints=trusted_checkpoints,
            )


def verify_log_file(
    path: str | Path,
    *,
    public_key: Ed25519PublicKey,
    origin: str,
    trusted_checkpoints: Sequence[bytes] = (),
) -> LogVerification:
    """Verify an audit log file from scratch, without trusting its tree state (it never writes).

    Opens even a damaged or tampered file that :meth:`AuditLog.open` would refuse, so an auditor
    learns *what* is wrong: the report names the first bad entry (see
    :func:`govshare.protocols.auditverify.verify_log`).

    Raises:
        MalformedInput: the file is not an SQLite audit log at all.
    """
    if not Path(path).is_file():
        raise NotFound(f"no audit log at {path}")
    connection = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    try:
        return _verify_connection(
            connection,
            public_key=public_key,
            origin=origin,
            trusted_checkpoints=trusted_checkpoints,
        )
    except sqlite3.DatabaseError as exc:
        raise MalformedInput(f"{path} is not a readable audit log: {exc}", field="path") from exc
    finally:
        connection.close()


def _verify_connection(
    connection: sqlite3.Connection,
    *,
    public_key: Ed25519PublicKey,
    origin: str,
    trusted_checkpoints: Sequence[bytes],
) -> LogVerification:
    lines: dict[int, bytes] = {}
    for checkpoint_id, line in connection.execute(
        "SELECT checkpoint_id, line FROM cosignatures ORDER BY id"
    ):
        lines[int(checkpoint_id)] = lines.get(int(checkpoint_id), b"") + bytes(line)
    notes = [
        bytes(note) + lines.get(int(checkpoint_id), b"")
        for checkpoint_id, note in connection.execute("SELECT id, note FROM checkpoints")
    ]
    return verify_log(
        _stream_rows(connection),
        [*notes, *trusted_checkpoints],
        public_key=public_key,
        origin=origin,
    )


def _stream_rows(connection: sqlite3.Connection) -> Iterator[tuple[int, bytes, bytes | None]]:
    """Rows as stored, in index order; positions may have gaps if the file was tampered with."""
    last = -1
    while True:
        rows = connection.execute(
            "SELECT idx, data, leaf_hash FROM entries WHERE idx > ? ORDER BY idx LIMIT ?",
            (last, READ_PAGE),
        ).fetchall()
        if not rows:
            return
        for idx, data, digest in rows:
            yield int(idx), bytes(data), bytes(digest)
        last = int(rows[-1][0])
