"""Canonical JSON: the one byte form govshare signs and hashes (rosters, grants, requests,
receipts).

Object keys sorted, no whitespace (``,`` and ``:``), UTF-8 without ``\\u`` escapes for non-ASCII,
integers, strings, booleans, null, lists and objects only. Floats are refused: they have no
canonical text, and every signed figure in govshare is an integer or an exact decimal string.
For these values the output equals RFC 8785 (JCS). The audit log's entry encoding follows the
same rules with its own precompiled encoder (``govshare.protocols.auditverify``).
"""

from __future__ import annotations

import json
from typing import Any


def _check(node: Any) -> None:
    if isinstance(node, float):
        raise TypeError("floats have no canonical encoding; use integers or strings")
    if isinstance(node, dict):
        for key, item in node.items():
            if not isinstance(key, str):
                raise TypeError("JSON object keys must be strings")
            _check(item)
    elif isinstance(node, list | tuple):
        for item in node:
            _check(item)


def _refuse(obj: Any) -> Any:
    raise TypeError(f"not canonical JSON: {type(obj).__name__}")


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of ``value``.

    Raises:
        TypeError: a float, a non-string key, or a value JSON cannot encode.
    """
    _check(value)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_refuse
    ).encode("utf-8")
