"""Filter conditions: ``column op value`` pushed down to the node that holds the column.

The analyst's plans carry them, the node's catalogue evaluates them, the risk rules compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in")


@dataclass(frozen=True)
class Condition:
    """``column op value`` for a pushed-down filter; ``value`` is a tuple for ``in``."""

    column: str
    op: str
    value: str | int | tuple[str | int, ...]
