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
- ``record`` returns once its entry is committed and fsynced. Entries recorded at the same time
  by several threads share one transaction (group commit: the first waiting caller commits
  everything queued, the others wait for it), so a busy node pays one fsync per batch, not per
  entry, and a caller never waits behind more than one commit. An entry that cannot be encoded
  is refused before it joins a batch, so it never fails the others. ``record_many`` commits a
  caller's own batch in one transaction.

Checkpoints: :meth:`AuditLog.checkpoint` signs the current (size, root) as a C2SP checkpoint with
the node's Ed25519 key and stores it; witness cosignatures are stored beside it after they verify.
The log only ever signs its own append-only tree, so two of its checkpoints are always consistent.

Self-check: :func:`self_check` is the node's own check of its file before it serves (see
:mod:`govshare.node.audit.selfcheck` for when it runs and what a broken log does to the node). It
re-reads
entries against their stored leaf hashes, recomputes the tree against every stored subtree hash
and the signed checkpoint roots, and verifies the latest checkpoint's signature; it stops at the
first broken entry and names it. Whole aligned pages are hashed level by level and compared as
lists, which makes a whole check 1.7-2.9x a bare read-and-hash pass (``bench/audit.py``, 2 cores:
4.3-7.6 s at 1,000,000 entries, 0.6-0.8 s at 100,000), where :func:`verify_log`, which decodes
every entry strictly, takes 10-15x. :meth:`AuditLog.check_tail` checks only the entries since the
latest checkpoint, anchored on the stored subtree hashes that reproduce its signed root. A log
found broken is sealed (:meth:`AuditLog.seal`): every append raises :class:`LogBroken`, reads go
on. A file whose stored tree cannot even be loaded opens sealed.

Thread safety: one connection guarded by a lock; every public method may be called from any
thread (:meth:`AuditLog.check_whole` reads on a connection of its own, without the lock). The
clock is injected (unix milliseconds) so tests and replays are deterministic.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from govshare.model.events import Event
from govshare.node.home_permissions import create_private
from govshare.protocols.auditverify import (
    AuditEntry,
    LogVerification,
    decode_entry,
    decoded_index,
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
from govshare.protocols.errors import Conflict, MalformedInput, NotFound, VerificationFailed
from govshare.protocols.merkle import (
    CompactRange,
    TreeHasher,
    consistency_proof_from_subtrees,
    inclusion_proof_from_subtrees,
    tree_hasher,
)
from govshare.protocols.suite import STANDARD, SigningKey, Suite, VerifyKey, suite_by_name

SCHEMA_VERSION = 1
READ_PAGE = 10_000  # rows per SELECT when streaming the whole log
# The self-check hashes whole aligned pages of 2**13 = 8,192 entries level by level (list
# operations: 4.3 s instead of 5.6 s at 1M entries); a page's rows and hashes take a few MB.
BULK_PAGE_LEVEL = 13
BULK_PAGE = 1 << BULK_PAGE_LEVEL

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


def _claim_hash(connection: sqlite3.Connection, path: str | Path, suite: Suite) -> None:
    """Record the tree's hash in a new log, or check a log's record against ``suite``."""
    row = connection.execute("SELECT value FROM meta WHERE key = 'hash'").fetchone()
    if row is None:
        (entries,) = connection.execute("SELECT count(*) FROM entries").fetchone()
        if entries and suite.hash_name != STANDARD.hash_name:
            raise MalformedInput(
                f"{path} was written before logs recorded their hash (SHA-256); the federation's "
                f"suite hashes with {suite.hash_name}",
                field="path",
            )
        connection.execute("INSERT INTO meta (key, value) VALUES ('hash', ?)", (suite.hash_name,))
    elif row[0] != suite.hash_name:
        raise MalformedInput(
            f"{path} hashes with {row[0]} but the federation's {suite.name!r} suite hashes with "
            f"{suite.hash_name}",
            field="path",
        )


class LogBroken(Conflict):
    """The log was found broken (see :meth:`AuditLog.seal`): it refuses every append."""


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


@dataclass
class _Pending:
    """An entry of :meth:`AuditLog.record` waiting for its group's commit."""

    event: Event
    index: int | None = None
    error: BaseException | None = None


class AuditLog:
    """The node's audit log; implements :class:`govshare.node.audit.sink.AuditSink`."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        suite: Suite,
        clock: Clock = system_clock_ms,
    ) -> None:
        """Use :meth:`open`; this takes an already configured connection.

        A file whose stored tree cannot be loaded (entries not contiguous, subtree hashes
        missing) still opens, sealed (:attr:`broken`): its entries stay readable so the evidence
        can be pulled, and nothing more is appended to it.
        """
        self._db = connection
        self._clock = clock
        self._suite = suite
        self._merkle = tree_hasher(suite)
        self._lock = threading.RLock()
        # Group commit of record(): entries waiting for a commit, and whether one is under way.
        self._group = threading.Condition(threading.Lock())
        self._waiting: list[_Pending] = []
        self._committing = False
        self._broken: str | None = None
        self._unloadable = False
        try:
            self._tree = self._load_tree()
        except MalformedInput as exc:
            self._tree = self._merkle.compact_range()
            self._unloadable = True
            self._broken = f"its stored tree cannot be loaded: {exc}"

    @classmethod
    def open(cls, path: str | Path, *, suite: Suite, clock: Clock = system_clock_ms) -> AuditLog:
        """Open (creating if needed) the log file at ``path``, whose tree hashes with ``suite``'s
        hash (recorded when the log is made; a log made before that record is SHA-256's).

        Raises:
            MalformedInput: the file is not a govshare audit log of a supported version, or its
                tree hashes with another suite's hash. (A file whose stored tree is damaged opens
                sealed: see :attr:`broken`.)
        """
        create_private(path)  # 0600, as a node's home requires; -wal and -shm follow
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
            _claim_hash(connection, path, suite)
            connection.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise MalformedInput(f"{path} is not a usable audit log: {exc}", field="path") from exc
        except BaseException:
            connection.close()
            raise
        try:
            return cls(connection, clock=clock, suite=suite)
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
        return self._merkle.compact_range(count, hashes)

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
        return self._merkle.subtree_hash_from_complete(start, end, self._complete)

    @property
    def suite(self) -> Suite:
        """The crypto suite whose hash builds this log's tree."""
        return self._suite

    @property
    def size(self) -> int:
        with self._lock:
            return self._size_now()

    def _size_now(self) -> int:
        if self._unloadable:  # the stored rows are all there is
            row = self._db.execute("SELECT max(idx) FROM entries").fetchone()
            return 0 if row[0] is None else int(row[0]) + 1
        self._sync()
        return self._tree.size

    @property
    def path(self) -> Path:
        """The log's file (a second connection reads it for the background self-check)."""
        with self._lock:
            row = self._db.execute("PRAGMA database_list").fetchone()
        return Path(row[2])

    @property
    def broken(self) -> str | None:
        """Why the log is sealed, or None while it accepts appends."""
        with self._lock:
            return self._broken

    def seal(self, reason: str) -> None:
        """Refuse every later append, checkpoint and cosignature (:class:`LogBroken`).

        A node seals its log when its own check finds it broken, so nothing it does afterwards
        lands in a log that no longer proves anything. Reading stays possible. The first
        reason is kept.
        """
        with self._lock:
            if self._broken is None:
                self._broken = reason

    def _refuse_if_broken(self) -> None:
        if self._broken is not None:
            raise LogBroken(f"the audit log is sealed: {self._broken}")

    def _loaded_tree(self) -> CompactRange:
        if self._unloadable:
            raise LogBroken(f"no proofs from this audit log: {self._broken}")
        return self._tree

    def root(self) -> bytes:
        """The RFC 6962 root of the whole log as committed."""
        with self._lock:
            return self._loaded_tree().root()

    # --- appending ----------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str,
        query_id: str | None = None,
    ) -> int:
        """Append one entry durably (committed and fsynced, perhaps with others' entries
        recorded at the same time) and return its index.

        Raises:
            MalformedInput, TypeError: the event cannot be encoded (see
                :func:`govshare.protocols.auditverify.encode_entry`); nothing is written.
        """
        event = Event(kind, fields, actor, query_id)
        # Refused here, alone, rather than failing a batch of other callers' entries.
        encode_entry(AuditEntry(0, 0, kind, actor, query_id, fields))
        mine = _Pending(event)
        with self._group:
            self._waiting.append(mine)
            while mine.index is None and mine.error is None and self._committing:
                self._group.wait()
            if mine.index is None and mine.error is None:
                self._committing = True
                batch, self._waiting = self._waiting, []
            else:
                batch = []
        if batch:
            try:
                indices = self.record_many([p.event for p in batch])
            except BaseException as exc:
                for pending in batch:
                    pending.error = exc
            else:
                for pending, index in zip(batch, indices, strict=True):
                    pending.index = index
            with self._group:
                self._committing = False
                self._group.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.index is not None
        return mine.index

    def record_many(self, events: Sequence[Event]) -> list[int]:
        """Append ``events`` in one transaction; return their indices. All or nothing.

        Safe beside other processes appending to the same file (an operator's command while the
        node serves): the write lock is taken first, then the tree continues from what is
        stored.
        """
        if not events:
            return []
        with self._lock:
            self._refuse_if_broken()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._sync()
                tree = self._merkle.compact_range(self._tree.size, self._tree.hashes)
                leaf_hash = self._merkle.leaf_hash
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

    def checkpoint(self, signing_key: SigningKey, origin: str, now: int | None = None) -> bytes:
        """Sign and store a checkpoint of the current size and root; return the signed note.

        If the latest stored checkpoint already covers this size with the same origin, it is
        returned (with its cosignatures) and nothing new is stored. ``now`` (unix ms) is the
        stored creation time; it defaults to the injected clock.
        """
        if signing_key.suite != self._suite.name:
            raise MalformedInput(
                f"a {signing_key.suite!r} key cannot sign a log of the {self._suite.name!r} suite",
                field="signing_key",
            )
        with self._lock:
            self._refuse_if_broken()
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
        witness_key: VerifyKey,
        log_key: VerifyKey,
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
            self._refuse_if_broken()
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
            self._check_range(start, end, self._size_now())
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
            self._check_range(0, size, self._loaded_tree().size)
            return inclusion_proof_from_subtrees(index, size, self._subtree)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof from ``old_size`` to ``new_size`` entries.

        Raises:
            MalformedInput: not ``0 <= old_size <= new_size <= size``.
        """
        with self._lock:
            self._check_range(old_size, new_size, self._loaded_tree().size)
            return consistency_proof_from_subtrees(old_size, new_size, self._subtree)

    def root_at(self, size: int) -> bytes:
        """The root of the tree of the first ``size`` entries."""
        with self._lock:
            self._check_range(0, size, self._loaded_tree().size)
            if size == 0:
                return self._merkle.empty_root
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
        public_key: VerifyKey,
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

    def check_tail(self, public_key: VerifyKey, origin: str) -> SelfCheck:
        """:func:`self_check` of the entries since the latest checkpoint, on this handle.

        Holds the log's lock (nothing is appended meanwhile); cheap when checkpoints are
        frequent. A log whose tree could not be loaded gets a whole check instead.
        """
        with self._lock:
            return self_check(
                self._db, public_key=public_key, origin=origin, whole=self._unloadable
            )

    def check_whole(
        self,
        public_key: VerifyKey,
        origin: str,
        *,
        stop: threading.Event | None = None,
    ) -> SelfCheck:
        """:func:`self_check` of every entry, on a connection of its own (appends go on)."""
        connection = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        try:
            connection.execute("PRAGMA query_only=ON")
            return self_check(
                connection, public_key=public_key, origin=origin, whole=True, stop=stop
            )
        finally:
            connection.close()


def verify_log_file(
    path: str | Path,
    *,
    public_key: VerifyKey,
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
    public_key: VerifyKey,
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


# --- the node's check of its own log -------------------------------------------------------------


@dataclass(frozen=True)
class LogDamage:
    """Where a node's check of its own log first found it broken.

    ``where`` names the first broken entry (``"entry 17"``) or, when no entry can be named, the
    checkpoint (``"checkpoint 3 (size 200)"``); ``reason`` says what failed there.
    """

    where: str
    reason: str
    index: int | None = None  # the first broken entry, when one is named


@dataclass(frozen=True)
class SelfCheck:
    """The verdict of :func:`self_check` (see :mod:`govshare.node.audit.selfcheck`)."""

    whole: bool  # every entry re-read, or only those since the latest checkpoint
    size: int  # entries in the log when the check began
    checked_from: int  # the first entry re-read (0 for a whole check)
    checkpoint: int | None  # size of the latest checkpoint, its signature and root checked
    checkpoints: int  # checkpoints whose signature was checked
    seconds: float
    damage: LogDamage | None = None
    interrupted: bool = False  # stopped before the end (the node is shutting down)

    @property
    def ok(self) -> bool:
        return self.damage is None and not self.interrupted


class _DamageError(Exception):
    def __init__(self, damage: LogDamage) -> None:
        super().__init__(damage.where)
        self.damage = damage


def _entry_damage(index: int, reason: str) -> _DamageError:
    return _DamageError(LogDamage(f"entry {index}", reason, index))


def self_check(
    connection: sqlite3.Connection,
    *,
    public_key: VerifyKey,
    origin: str,
    whole: bool,
    stop: threading.Event | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> SelfCheck:
    """A node's check of its own log file: stops at, and names, the first broken entry.

    Checked, from the first entry re-read (0 when ``whole``, else the size of the latest
    checkpoint) to the end: positions are contiguous; ``SHA-256(0x00 || data)`` equals the stored
    leaf hash; every subtree hash completed on the way equals the stored one (``nodes``); entries
    since the latest checkpoint decode strictly and carry their own position. The latest
    checkpoint's Ed25519 signature verifies under ``public_key`` for ``origin`` and its signed
    root equals the tree it commits to: recomputed from the entries when ``whole``, else
    rebuilt from the stored subtree hashes at its size, which anchor the tail. A whole check
    also verifies every other stored checkpoint's signature and root. Stored checkpoint columns
    must agree with their signed notes.

    Not a substitute for :func:`verify_log`: older entries are bound by hashes only (they were
    decoded when written, and their bytes are fixed by the leaf hashes and signed roots), and
    truncation together with the checkpoints needs a checkpoint kept elsewhere (witnesses,
    auditors). Reads inside one transaction, so it sees one snapshot of a log being appended to.
    ``stop`` is polled between pages; when set, the verdict comes back ``interrupted``.
    """
    began = timer()
    try:
        connection.execute("BEGIN")
        return _self_check(connection, public_key, origin, whole, stop, timer, began)
    except sqlite3.DatabaseError as exc:  # pages SQLite itself cannot read
        damage = LogDamage("its SQLite file", f"unreadable: {exc}")
        return SelfCheck(whole, 0, 0, None, 0, timer() - began, damage)
    finally:
        if connection.in_transaction:
            connection.execute("COMMIT")


def _self_check(
    db: sqlite3.Connection,
    public_key: VerifyKey,
    origin: str,
    whole: bool,
    stop: threading.Event | None,
    timer: Callable[[], float],
    began: float,
) -> SelfCheck:
    count, last = db.execute("SELECT count(*), max(idx) FROM entries").fetchone()
    size = 0 if last is None else int(last) + 1
    rows = db.execute("SELECT id, size, root, note FROM checkpoints ORDER BY id").fetchall()
    latest: int | None = None
    checked = 0
    signed: dict[int, bytes] = {}
    start = 0

    def verdict(damage: LogDamage | None = None, *, interrupted: bool = False) -> SelfCheck:
        return SelfCheck(
            whole=whole, size=size, checked_from=start, checkpoint=latest, checkpoints=checked,
            seconds=timer() - began, damage=damage, interrupted=interrupted,
        )  # fmt: skip

    for checkpoint_id, stored_size, stored_root, note in rows if whole else rows[-1:]:
        where = f"checkpoint {checkpoint_id} (size {stored_size})"
        try:
            checkpoint = open_checkpoint(_blob(note), public_key, origin=origin)
        except (MalformedInput, VerificationFailed):
            return verdict(LogDamage(where, "its signature does not verify under the node's key"))
        if (checkpoint.size, checkpoint.root) != (stored_size, stored_root):
            return verdict(LogDamage(where, "its stored size or root differ from its signed note"))
        if signed.setdefault(checkpoint.size, checkpoint.root) != checkpoint.root:
            return verdict(LogDamage(where, "another checkpoint of its size has another root"))
        checked += 1
        latest = checkpoint.size
    if latest is not None and latest > size:
        return verdict(
            LogDamage(
                f"entry {size}",
                f"the log ends there but its latest checkpoint commits to {latest} (truncated)",
                size,
            )
        )
    merkle = tree_hasher(suite_by_name(public_key.suite))
    if signed.get(0, merkle.empty_root) != merkle.empty_root:
        return verdict(LogDamage("checkpoint of size 0", "its root is not the empty tree's"))

    try:
        if not whole and latest is not None:
            if int(count) != size:  # a whole check names the first missing entry
                raise _DamageError(LogDamage("entries", f"{size - int(count)} of the first {size} "
                                         "positions hold no entry (deleted)"))  # fmt: skip
            start = latest
        tree = _anchor(db, start, signed[start], merkle) if start else merkle.compact_range()
        interrupted = _scan(db, merkle, tree, start, size, latest or 0, signed, stop)
    except _DamageError as exc:
        return verdict(exc.damage)
    return verdict(interrupted=interrupted)


def _blob(value: object) -> bytes:
    """A stored BLOB column; a value of another type (tampered) becomes bytes that fail checks."""
    return value if isinstance(value, bytes) else repr(value).encode()


def _anchor(
    db: sqlite3.Connection, size: int, signed_root: bytes | None, merkle: TreeHasher
) -> CompactRange:
    """The tree's right edge at ``size`` from the stored hashes, checked against its signed
    root: what the tail check starts from."""
    hashes: list[bytes] = []
    for level, index in CompactRange.positions(size):
        if level == 0:
            row = db.execute("SELECT leaf_hash FROM entries WHERE idx = ?", (index,)).fetchone()
        else:
            row = db.execute(
                "SELECT hash FROM nodes WHERE level = ? AND idx = ?", (level, index)
            ).fetchone()
        if row is None or len(row[0]) != 32:
            first = index << level
            raise _entry_damage(
                first,
                f"the stored subtree hash over entries {first}..{((index + 1) << level) - 1} "
                "is missing",
            )
        hashes.append(bytes(row[0]))
    tree = merkle.compact_range(size, hashes)
    if tree.root() != signed_root:
        raise _DamageError(
            LogDamage(
                f"checkpoint of size {size}",
                "the stored tree does not reproduce its signed root",
            )
        )
    return tree


def _stored_nodes(db: sqlite3.Connection, start: int, end: int) -> dict[tuple[int, int], object]:
    """Stored subtree hashes completed by appending leaves ``start .. end-1``.

    Node ``(level, j)`` completes with leaf ``(j + 1) * 2**level - 1``, so at each level the
    ``j`` run from ``start >> level`` to ``(end >> level) - 1``.
    """
    found: dict[tuple[int, int], object] = {}
    level = 1
    while (end >> level) - 1 >= start >> level:
        for index, value in db.execute(
            "SELECT idx, hash FROM nodes WHERE level = ? AND idx BETWEEN ? AND ?",
            (level, start >> level, (end >> level) - 1),
        ):
            found[(level, int(index))] = value
        level += 1
    return found


def _scan(
    db: sqlite3.Connection,
    merkle: TreeHasher,
    tree: CompactRange,
    start: int,
    size: int,
    strict_from: int,
    signed: Mapping[int, bytes],
    stop: threading.Event | None,
) -> bool:
    """Re-read entries ``start .. size-1`` into ``tree``; raise at the first fault.

    Returns True when ``stop`` interrupted it.
    """
    return _Scan(db, merkle, tree, start, size, strict_from, signed).run(stop)


def _fold(blocks: Sequence[bytes], digest: Callable[[bytes], bytes]) -> bytes:
    """RFC 6962 root over complete-subtree hashes listed largest first (``CompactRange.root``)."""
    result = blocks[-1]
    for block in reversed(blocks[:-1]):
        result = digest(b"\x01" + block + result)
    return result


class _Scan:
    """The entry-by-entry part of :func:`self_check`.

    Two paths that agree on every verdict: whole aligned pages of :data:`BULK_PAGE` entries
    older than ``strict_from`` are hashed level by level and compared with the stored hashes as
    lists (most of a whole check's time); any other page, and any page where the lists differ,
    goes leaf by leaf, which finds the first fault in log order.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        merkle: TreeHasher,
        tree: CompactRange,
        start: int,
        size: int,
        strict_from: int,
        signed: Mapping[int, bytes],
    ) -> None:
        self.db = db
        self.merkle = merkle
        self.digest = merkle._h
        self.tree = tree
        self.position = start
        self.size = size
        self.strict_from = strict_from
        self.signed = signed
        self.targets = deque(sorted(s for s in signed if s > start))
        self.matched = start  # the largest signed size reproduced so far

    def run(self, stop: threading.Event | None) -> bool:
        while self.position < self.size:
            if stop is not None and stop.is_set():
                return True
            begin = self.position
            end = min(self.size, (begin // BULK_PAGE + 1) * BULK_PAGE)
            rows = self.db.execute(
                "SELECT idx, data, leaf_hash FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (begin, end),
            ).fetchall()
            whole_page = begin % BULK_PAGE == 0 and end - begin == BULK_PAGE
            if not (whole_page and end <= self.strict_from and self._bulk(rows)):
                self._leaves(rows, end)
        return False

    def _target_reached(self) -> None:
        target = self.targets.popleft()
        self.matched = target

    def _mismatch(self, target: int) -> _DamageError:
        return _entry_damage(
            self.matched,
            f"entries {self.matched}..{target - 1} do not reproduce the signed checkpoint of "
            f"size {target}",
        )

    def _leaves(self, rows: Sequence[tuple[int, object, object]], end: int) -> None:
        position = self.position
        stored = _stored_nodes(self.db, position, end)
        append = self.tree._append_unchecked  # leaf hashes are digests: always 32 bytes
        h = self.digest
        for index, data, stored_leaf in rows:
            if index != position:
                raise _entry_damage(position, "missing (deleted)")
            if type(data) is not bytes:
                raise _entry_damage(position, "its stored bytes are not a blob")
            digest = h(b"\x00" + data)
            if digest != stored_leaf:
                raise _entry_damage(position, "leaf hash mismatch")
            if position >= self.strict_from:
                try:
                    held = decoded_index(data)
                except MalformedInput as exc:
                    raise _entry_damage(position, f"malformed: {exc}") from None
                if held != position:
                    raise _entry_damage(position, f"it holds entry {held}")
            for level, node, value in append(digest):
                if stored.get((level, node)) != value:
                    raise _node_damage(level, node, (level, node) in stored)
            position += 1
            self.position = position
            if self.targets and position == self.targets[0]:
                if self.tree.root() != self.signed[position]:
                    raise self._mismatch(position)
                self._target_reached()
        if position < end:
            raise _entry_damage(position, "missing (deleted)")

    def _bulk(self, rows: Sequence[tuple[int, object, object]]) -> bool:
        """Check one aligned page as lists; False (nothing changed) when anything differs."""
        begin = self.position
        if len(rows) != BULK_PAGE or rows[0][0] != begin or rows[-1][0] != begin + BULK_PAGE - 1:
            return False
        h = self.digest
        try:
            level = [h(b"\x00" + row[1]) for row in rows]  # type: ignore[operator]
        except TypeError:  # a value that is not a blob
            return False
        if level != [row[2] for row in rows]:
            return False
        levels = [level]
        for height in range(1, BULK_PAGE_LEVEL + 1):
            level = [h(b"\x01" + a + b) for a, b in zip(level[::2], level[1::2], strict=True)]
            stored = [
                value
                for (value,) in self.db.execute(
                    "SELECT hash FROM nodes WHERE level = ? AND idx BETWEEN ? AND ? ORDER BY idx",
                    (height, begin >> height, ((begin + BULK_PAGE) >> height) - 1),
                )
            ]
            if level != stored:
                return False
            levels.append(level)
        edge = self.tree.hashes  # levels >= BULK_PAGE_LEVEL: begin is a multiple of the page
        end = begin + BULK_PAGE
        while self.targets and self.targets[0] < end:
            target = self.targets[0]
            blocks = list(edge)
            position = begin
            width = target - begin
            for height in range(width.bit_length() - 1, -1, -1):
                if width >> height & 1:
                    blocks.append(levels[height][(position - begin) >> height])
                    position += 1 << height
            if _fold(blocks, h) != self.signed[target]:
                raise self._mismatch(target)
            self._target_reached()
        upper = self.merkle.compact_range(begin >> BULK_PAGE_LEVEL, edge)
        for height, node, value in upper._append_unchecked(levels[-1][0]):
            height += BULK_PAGE_LEVEL
            row = self.db.execute(
                "SELECT hash FROM nodes WHERE level = ? AND idx = ?", (height, node)
            ).fetchone()
            if row is None or row[0] != value:
                raise _node_damage(height, node, row is not None)
        self.tree = self.merkle.compact_range(end, upper.hashes)
        self.position = end
        if self.targets and self.targets[0] == end:
            if self.tree.root() != self.signed[end]:
                raise self._mismatch(end)
            self._target_reached()
        return True


def _node_damage(level: int, node: int, present: bool) -> _DamageError:
    first = node << level
    return _entry_damage(
        first,
        f"stored subtree hash over entries {first}..{((node + 1) << level) - 1} "
        f"{'does not match' if present else 'is missing'}",
    )
