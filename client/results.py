"""The analyst's local store of released results: a result the nodes released is never lost.

A released result costs the analyst budget at every node and cannot be asked for again for
free, so the analyst's CLI keeps each one the moment it arrives, before it prints anything or
writes the receipt where ``--receipt`` says: one JSON file per query in a folder (by default
``results/`` inside the analyst's identity bundle), holding the query id, kind, the signed plan
(and the SQL it came from), the result as ``--json`` prints it, when it was saved and the
receipt, which the client verified against the roster before handing the result over (or,
when a node gave no receipt after releasing or it did not verify, none, and the result says
why: the result itself is kept either way).

Files are written whole to a temporary name and renamed into place (``os.replace``), so a crash
leaves either the old file or the new one, never half of one. ``govshare query result ID``
reads one back (a unique prefix of the id will do); ``govshare query results`` lists them
(:meth:`ResultsStore.saved`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from govshare.protocols.errors import MalformedInput, NotFound
from govshare.protocols.receipt import Receipt, decode_receipt, encode_receipt

# The folder inside an identity bundle that holds the analyst's results by default.
RESULTS_FOLDER = "results"
# Bumped if the file layout changes, so an older govshare refuses rather than misreads.
RESULT_FORMAT = "govshare-result/1"
# Candidates an ambiguous id prefix names in its refusal.
MAX_CANDIDATES_SHOWN = 8
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class SavedResult:
    """One released result as the store holds it."""

    query_id: str
    kind: str
    saved_at: int
    plan: Mapping[str, Any]
    sql: str | None
    result: Mapping[str, Any]
    receipt: Receipt | None
    path: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "kind": self.kind,
            "saved_at": self.saved_at,
            "plan": dict(self.plan),
            "sql": self.sql,
            "result": dict(self.result),
            "receipt_verified": self.receipt is not None,
            "receipt": None
            if self.receipt is None
            else json.loads(encode_receipt(self.receipt).decode("utf-8")),
            "file": str(self.path),
        }


def default_folder(identity_dir: Path) -> Path:
    """Where an analyst's results go unless ``--results`` says otherwise."""
    return identity_dir / RESULTS_FOLDER


class ResultsStore:
    """A folder of saved results, one ``<query id>.json`` each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, query_id: str) -> Path:
        if not query_id or not set(query_id) <= _HEX:
            raise MalformedInput(f"not a query id: {query_id!r}", field="query_id")
        return self.folder / f"{query_id}.json"

    def save(
        self,
        query_id: str,
        *,
        kind: str,
        plan: Mapping[str, Any],
        result: Mapping[str, Any],
        receipt: Receipt | None,
        sql: str | None = None,
        now: int | None = None,
    ) -> Path:
        """Write (or overwrite) the result of ``query_id``; returns its file.

        Raises:
            OSError: the folder cannot be created or written.
        """
        path = self._path(query_id)
        value = {
            "format": RESULT_FORMAT,
            "query_id": query_id,
            "kind": kind,
            "saved_at": int(time.time()) if now is None else now,
            "plan": dict(plan),
            "sql": sql,
            "result": dict(result),
            "receipt": None if receipt is None else encode_receipt(receipt).decode("utf-8"),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
        handle, temporary = tempfile.mkstemp(prefix=f".{query_id}.", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def resolve(self, prefix: str) -> str:
        """The one saved query id starting with ``prefix``.

        Raises:
            NotFound: none.
            MalformedInput: several (named).
        """
        wanted = prefix.strip().lower()
        ids = sorted(p.stem for p in self._files()) if set(wanted) <= _HEX else []
        candidates = [i for i in ids if wanted and i.startswith(wanted)]
        if not candidates:
            raise NotFound(f"no saved result for query {prefix} in {self.folder}")
        if len(candidates) > 1:
            named = ", ".join(candidates[:MAX_CANDIDATES_SHOWN])
            more = ", ..." if len(candidates) > MAX_CANDIDATES_SHOWN else ""
            raise MalformedInput(
                f"query id prefix {prefix!r} is ambiguous: it matches {named}{more}; "
                "give more characters",
                field="query_id",
            )
        return str(candidates[0])

    def get(self, prefix: str) -> SavedResult:
        """The saved result of the query ``prefix`` names (a unique prefix will do)."""
        return self._load(self._path(self.resolve(prefix)))

    def saved(self) -> list[SavedResult]:
        """Every saved result, oldest first."""
        found = [self._load(path) for path in self._files()]
        return sorted(found, key=lambda r: (r.saved_at, r.query_id))

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [
            p
            for p in self.folder.glob("*.json")
            if not p.name.startswith(".") and set(p.stem) <= _HEX
        ]

    def _load(self, path: Path) -> SavedResult:
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedInput(f"{path}: not a saved result ({exc})", field="result") from None
        if not isinstance(raw, dict) or raw.get("format") != RESULT_FORMAT:
            raise MalformedInput(f"{path}: not a {RESULT_FORMAT} file", field="format")
        receipt_text = raw.get("receipt")
        try:
            return SavedResult(
                query_id=str(raw["query_id"]),
                kind=str(raw["kind"]),
                saved_at=int(raw["saved_at"]),
                plan=dict(raw.get("plan") or {}),
                sql=raw.get("sql") if isinstance(raw.get("sql"), str) else None,
                result=dict(raw["result"]),
                receipt=None
                if receipt_text is None
                else decode_receipt(str(receipt_text).encode("utf-8")),
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(
                f"{path}: a field is missing or wrong ({exc})", field="result"
            ) from None
