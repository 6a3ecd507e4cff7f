"""How a column's cells are read at import: decimals as fixed-point integers, and blank cells.

**Decimals.** An ``aggregate`` column holds signed 64-bit integers, because sums over it are
exact integer sums (SQLite's ``SUM`` over ``INTEGER``, then Paillier or BFV slots and masks
over integers). A column of money in yuan is declared with a *scale*, the number of decimal
places it keeps: ``scale=2`` stores ``12.34`` as the integer ``1234`` (fen), so every sum stays
exact and is read back by dividing by ``10**scale``. A cell with more significant decimal
places than the scale is refused (``12.345`` at scale 2): rounding would change the data the
department certified. Trailing zeros beyond the scale are not significant (``12.340`` is
``1234``). Only plain decimal notation is read: an optional sign, digits, optionally a point
and digits — no exponent, no thousands separator, no currency sign.

**Blank cells** (empty after stripping blanks) follow the column's NULL policy:

- ``refuse``: the row is bad (the whole file is refused, or the row is rejected under
  ``--skip-invalid``). The default for ``join_key``, ``group_key`` and ``aggregate`` columns,
  whose values are computed on;
- ``skip-row``: the row is left out of the import and counted in the report;
- ``zero``: the cell is 0 (``aggregate`` columns only);
- ``keep``: the cell is stored as the empty string (``masked``, ``plaintext`` and ``deny``
  columns only; their default, as before NULL policies existed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from govshare.model.fixed_point import MAX_STORED, OutOfRange, TooManyPlaces, to_fixed_point
from govshare.model.governance import MAX_SCALE, ColumnKind, ColumnRule
from govshare.protocols.errors import MalformedInput

# Aggregate cells are signed 64-bit integers, SQLite's INTEGER.
MAX_ABS_AGGREGATE = MAX_STORED

_DECIMAL = re.compile(r"^([+-]?)([0-9]+)(?:\.([0-9]+))?$")
# Longer than any 64-bit value at any scale, with sign, point and trailing zeros to spare:
# refused before int() so a huge cell costs nothing.
_MAX_NUMBER_CHARS = 64


class NullPolicy(StrEnum):
    REFUSE = "refuse"
    SKIP_ROW = "skip-row"
    ZERO = "zero"
    KEEP = "keep"


# The kinds computed on: a blank cell there is refused unless the operator says otherwise.
_COMPUTED = (ColumnKind.JOIN_KEY, ColumnKind.GROUP_KEY, ColumnKind.AGGREGATE)


@dataclass(frozen=True)
class ColumnFormat:
    """A column's import format: its decimal ``scale`` (aggregates) and NULL policy (``None``:
    the kind's default, see :func:`default_null`)."""

    scale: int = 0
    null: NullPolicy | None = None

    def to_json(self) -> dict[str, object]:
        return {"scale": self.scale, "null": None if self.null is None else self.null.value}


def default_null(kind: ColumnKind) -> NullPolicy:
    return NullPolicy.REFUSE if kind in _COMPUTED else NullPolicy.KEEP


def validate_format(rule: ColumnRule, fmt: ColumnFormat) -> ColumnFormat:
    """Return ``fmt`` with its NULL policy made explicit.

    Raises:
        MalformedInput: a scale on a column that is not an aggregate or outside
            ``0..MAX_SCALE``; ``zero`` on a non-aggregate; ``keep`` on a column computed on.
    """
    if isinstance(fmt.scale, bool) or not isinstance(fmt.scale, int):
        raise TypeError("scale must be an int")
    if fmt.scale and rule.kind is not ColumnKind.AGGREGATE:
        raise MalformedInput(
            f"only an aggregate column takes a scale ({rule.name!r})", field="columns"
        )
    if not 0 <= fmt.scale <= MAX_SCALE:
        raise MalformedInput(
            f"column {rule.name!r}: the scale is 0 to {MAX_SCALE} decimal places", field="columns"
        )
    try:
        null = default_null(rule.kind) if fmt.null is None else NullPolicy(fmt.null)
    except ValueError:
        known = ", ".join(p.value for p in NullPolicy)
        raise MalformedInput(
            f"column {rule.name!r}: unknown NULL policy {fmt.null!r}; known: {known}",
            field="columns",
        ) from None
    if null is NullPolicy.ZERO and rule.kind is not ColumnKind.AGGREGATE:
        raise MalformedInput(
            f"only an aggregate column takes null=zero ({rule.name!r})", field="columns"
        )
    if null is NullPolicy.KEEP and rule.kind in _COMPUTED:
        raise MalformedInput(
            f"column {rule.name!r} is a {rule.kind.value}: a blank cell there is refused, "
            "skipped (null=skip-row) or, for an aggregate, zero (null=zero)",
            field="columns",
        )
    return ColumnFormat(fmt.scale, null)


def format_from_json(raw: dict[str, object], kind: ColumnKind) -> ColumnFormat:
    """A stored column's format; columns stored before formats existed read as the default.

    Raises: ValueError for a stored value of the wrong shape.
    """
    scale, null = raw.get("scale", 0), raw.get("null")
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise ValueError("bad scale")
    if null is not None and not isinstance(null, str):
        raise ValueError("bad NULL policy")
    return ColumnFormat(scale, default_null(kind) if null is None else NullPolicy(null))


def parse_fixed_point(cell: str, scale: int) -> int:
    """The integer ``cell * 10**scale`` for a decimal ``cell`` (see the module docstring): the
    cell's plain notation read here, converted by :func:`govshare.model.fixed_point.to_fixed_point`.

    Raises:
        MalformedInput: not a decimal number, more significant decimal places than ``scale``,
            or out of the signed 64-bit range. The message never quotes the cell.
    """
    if scale == 0 and len(cell) <= 18 and cell.isascii() and cell.isdigit():
        return int(cell)  # the common case, below 2**63 by its length
    match = _DECIMAL.match(cell) if len(cell) <= _MAX_NUMBER_CHARS else None
    if match is None:
        raise MalformedInput("not an integer" if scale == 0 else "not a decimal number")
    fraction = match.group(3) or ""
    try:
        return to_fixed_point(
            match.group(1) == "-", match.group(2) + fraction, -len(fraction), scale
        )
    except TooManyPlaces as exc:
        if scale == 0:
            raise MalformedInput(
                "not an integer: it has decimal places; declare the column's scale "
                "(aggregate:scale=N) to import decimals"
            ) from None
        raise MalformedInput(
            f"{exc.written} decimal places, more than the column's scale {scale}"
        ) from None
    except OutOfRange:
        raise MalformedInput(
            "not an integer: out of the signed 64-bit range"
            if scale == 0
            else f"out of range: at scale {scale} the column holds at most "
            f"{MAX_ABS_AGGREGATE // 10**scale} whole units"
        ) from None
