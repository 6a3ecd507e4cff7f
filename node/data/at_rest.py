"""Rows and membership results encrypted at rest under the node's data key (issue 12).

What is encrypted, and how (the federation's suite, ``roster.crypto``: AES-256-GCM under
``standard``, SM4-GCM under ``sm``):

- **Dataset rows.** Each stored table of imported rows has a key of its own, random
  (``os.urandom``), kept only *wrapped*: sealed under the node's wrap key, which
  :func:`govshare.node.keystore.at_rest_key` derives from the data key (purpose
  ``table-keys``), with the table's name as associated data. Rows are sealed in chunks, one
  per import batch (``catalog.BATCH_ROWS``, 10,000 rows; one seal per row would cost a nonce, a
  tag and a call per row); a chunk is the JSON list of its columns (the rows' import positions
  ``_row``, then each column's cells, in import order: reads filter and sum a whole column at a
  time), with associated data ``govshare/rows/v1 ‖ table ‖ chunk number``, so a chunk moved to
  another table or position fails to open. Removing a dataset deletes its wrapped key
  (crypto-shredding) as well as its chunks; :func:`purge` then overwrites and reclaims what
  SQLite freed.
- **Membership results** a receiving node keeps (its own keys that matched): one seal per query
  under the ``membership-results`` key, the query id as associated data.

What stays plaintext, because the node works with it without the key or before any read:
dataset registrations (name, governance metadata, column rules and domain labels, formats, row
count, the source file's SHA-256, version), the number and size of each table's chunks (so the
row count, roughly, and the volume of each chunk), query records and budgets, grants, the
audit log (which names datasets and counts, never a cell), and the node's other stores. A
filter cannot use an index over ciphertext, so reads decrypt the chunks and filter in Python
with SQLite's own semantics (text compared by code point, which is UTF-8's byte order;
integers as integers); the answers are the same as the SQL filters gave.

Key check: ``node.db`` records the suite and the data key's check value
(:func:`govshare.protocols.key_shares.key_check_value`) the first time a key seals anything in
it, so that a node started with another key file refuses at once (:class:`WrongDataKey`)
rather than at its first read.

Out of scope: live sources (PostgreSQL tables read at each query, ``node/data/sources``) are
never copied into the node, so their protection at rest is the database server's. The CSV a
dataset was imported from lives outside the home and is the operator's to destroy.

Threat model: as :mod:`govshare.node.keystore` states (a copy of the data volume or backups
without the key file; other local users); not root on a running node.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, overload

from govshare.node.home_permissions import create_private
from govshare.node.keystore import (
    at_rest_key,
    create_data_key,
    data_key_path,
    read_data_key,
)
from govshare.protocols.errors import MalformedInput, NotFound, VerificationFailed
from govshare.protocols.key_shares import key_check_value
from govshare.protocols.suite import Suite, suite_by_name

__all__ = [
    "AtRest",
    "WrongDataKey",
    "open_at_rest",
    "purge",
]

_TABLE_KEYS: Final = "table-keys"
_RESULTS: Final = "membership-results"
_ROWS_AAD: Final = b"govshare/rows/v1\x00"
_TABLE_KEY_AAD: Final = b"govshare/table-key/v1\x00"
_RESULTS_AAD: Final = b"govshare/membership-results/v1\x00"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS at_rest (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    suite     TEXT NOT NULL,
    key_check BLOB NOT NULL
);
"""

Cell = str | int


class SealedColumns(Sequence[list[Cell]]):
    """An opened chunk's columns (``_row`` first), each JSON-decoded when first indexed."""

    __slots__ = ("_decoded", "_parts")

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts
        self._decoded: dict[int, list[Cell]] = {}

    def __len__(self) -> int:
        return len(self._parts)

    @overload
    def __getitem__(self, index: int) -> list[Cell]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[list[Cell]]: ...

    def __getitem__(self, index: int | slice) -> list[Cell] | Sequence[list[Cell]]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        column = self._decoded.get(index)
        if column is None:
            column = self._decoded[index] = json.loads(self._parts[index])
        return column


class WrongDataKey(VerificationFailed):
    """The data key given is not the one ``node.db`` was sealed under, or it is missing."""


@dataclass(frozen=True)
class AtRest:
    """The node's data key with its federation's suite: what seals rows and results."""

    suite: Suite
    data_key: bytes = field(repr=False)
    _wrap: bytes = field(init=False, repr=False)
    _results: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_wrap", at_rest_key(self.suite, self.data_key, _TABLE_KEYS))
        object.__setattr__(self, "_results", at_rest_key(self.suite, self.data_key, _RESULTS))

    @property
    def key_check(self) -> bytes:
        return key_check_value(self.suite, self.data_key)

    # -- table keys -------------------------------------------------------------------

    def new_table_key(self, table: str) -> tuple[bytes, bytes]:
        """A fresh random key for ``table``: (key, the key wrapped for storage)."""
        key = os.urandom(self.suite.cipher_key_size)
        return key, self.suite.seal(self._wrap, key, aad=_TABLE_KEY_AAD + _utf8(table))

    def unwrap_table_key(self, table: str, wrapped: bytes) -> bytes:
        """Raises: WrongDataKey: the wrapped key does not open under this data key."""
        try:
            return self.suite.open(self._wrap, bytes(wrapped), aad=_TABLE_KEY_AAD + _utf8(table))
        except (VerificationFailed, MalformedInput):
            raise WrongDataKey(
                f"the key of stored table {table!r} does not open under this node's data key"
            ) from None

    # -- row chunks -------------------------------------------------------------------

    def seal_chunk(
        self, key: bytes, table: str, chunk: int, columns: Sequence[Sequence[Cell]]
    ) -> bytes:
        """Seal one chunk, given as its columns (``_row`` first): one JSON array per column,
        a line each (JSON text never holds a raw newline), so a read decodes only the columns
        it needs."""
        plain = b"\n".join(
            json.dumps(column, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            for column in columns
        )
        return self.suite.seal(key, plain, aad=_chunk_aad(table, chunk))

    def open_chunk(self, key: bytes, table: str, chunk: int, sealed: bytes) -> SealedColumns:
        """The chunk's columns, each decoded when first read.

        Raises:
            VerificationFailed: the chunk was altered, moved or sealed under another key.
        """
        plain = self.suite.open(key, bytes(sealed), aad=_chunk_aad(table, chunk))
        return SealedColumns(plain.split(b"\n"))

    # -- membership results -----------------------------------------------------------

    def seal_results(self, query_id: str, keys: Sequence[str]) -> bytes:
        plain = json.dumps(list(keys), ensure_ascii=False, separators=(",", ":")).encode()
        return self.suite.seal(self._results, plain, aad=_RESULTS_AAD + _utf8(query_id))

    def open_results(self, query_id: str, sealed: bytes) -> list[str]:
        """Raises: WrongDataKey: the stored results do not open under this data key."""
        try:
            plain = self.suite.open(
                self._results, bytes(sealed), aad=_RESULTS_AAD + _utf8(query_id)
            )
        except (VerificationFailed, MalformedInput):
            raise WrongDataKey(
                f"the results of query {query_id} do not open under this node's data key"
            ) from None
        keys: list[str] = json.loads(plain)
        return keys

    # -- binding to a store -----------------------------------------------------------

    def bind(self, database: Path) -> None:
        """Record this key's check value and suite in ``database`` the first time, and refuse
        another key or suite afterwards.

        Raises:
            WrongDataKey: ``database`` was sealed under another data key.
            MalformedInput: ``database`` was sealed under another suite.
        """
        create_private(database)  # 0600, as a node's home requires; -wal and -shm follow
        conn = sqlite3.connect(database, isolation_level=None, timeout=30.0)
        try:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT suite, key_check FROM at_rest").fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO at_rest VALUES (1, ?, ?)", (self.suite.name, self.key_check)
                    )
            finally:
                conn.execute("COMMIT")
        finally:
            conn.close()
        if row is None:
            return
        suite, check = str(row[0]), bytes(row[1])
        if suite != self.suite.name:
            raise MalformedInput(
                f"{database} was sealed under crypto suite {suite!r}, the roster's is "
                f"{self.suite.name!r}",
                field="suite",
            )
        if check != self.key_check:
            raise WrongDataKey(
                f"the data key does not open {database}: its check value is "
                f"{self.key_check.hex()}, the store's {check.hex()}; put the node's own key back "
                "or recover it with 'govshare node key recover'"
            )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _chunk_aad(table: str, chunk: int) -> bytes:
    return _ROWS_AAD + _utf8(table) + b"\x00" + chunk.to_bytes(8, "big")


def _bound_check(database: Path) -> tuple[str, bytes] | None:
    """(suite, key check) recorded in ``database``, or None (nothing sealed there yet)."""
    if not database.exists():
        return None
    conn = sqlite3.connect(database, timeout=30.0)
    try:
        row = conn.execute("SELECT suite, key_check FROM at_rest").fetchone()
    except sqlite3.OperationalError:  # no at_rest table: a store made before issue 12
        return None
    finally:
        conn.close()
    return None if row is None else (str(row[0]), bytes(row[1]))


def open_at_rest(home: Path, database: Path, suite: Suite | str) -> AtRest:
    """The node's :class:`AtRest`, bound to ``database``.

    A home without a data key gets one here (``node init``; or, for a home made before
    protection at rest, its first start or operator command), unless ``database`` already
    records one: a lost key is recovered from the officers' shares, never replaced.

    Raises:
        WrongDataKey: the key file is missing while ``database`` holds data sealed under a key,
            or it is another key than the one ``database`` was sealed under.
    """
    chosen = suite_by_name(suite) if isinstance(suite, str) else suite
    path = data_key_path(home)
    try:
        key = read_data_key(home)
    except NotFound:
        bound = _bound_check(database)
        if bound is not None:
            raise WrongDataKey(
                f"no data key at {path}, but {database} holds data sealed under one (check "
                f"value {bound[1].hex()}): recover it with 'govshare node key recover SHARE... "
                f"--out {path}'"
            ) from None
        create_data_key(home)
        key = read_data_key(home)
    at_rest = AtRest(chosen, key)
    at_rest.bind(database)
    return at_rest


def purge(conn: sqlite3.Connection, *, vacuum: bool = True) -> bool:
    """Overwrite and reclaim what the store freed: ``VACUUM`` (rebuilds the file without free
    pages; skipped with ``vacuum=False``), then a ``TRUNCATE`` checkpoint (copies the WAL into
    the file, so the zeroed pages replace the old ones there, and cuts the WAL to zero bytes, so
    no old frame survives in it). Run with ``PRAGMA secure_delete=ON`` on the connection that
    deleted, so that what it deleted was zeroed in the pages.

    Returns whether the WAL was truncated: a reader of an older snapshot (another process's
    open read) keeps it, and the node's next checkpoint truncates it.
    """
    if vacuum:
        conn.execute("VACUUM")
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy
