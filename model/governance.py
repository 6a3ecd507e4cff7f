"""govshare's governance vocabulary: grades, sharing types, column rules, query kinds, roles.

- Grades follow GB/T 43697-2024 (data security — rules for data classification and grading):
  ``general`` 一般, ``important`` 重要, ``core`` 核心.
- Sharing types follow the State Council's 2016 No. 51 measures on government information
  resource sharing: ``unconditional`` 无条件共享, ``conditional`` 有条件共享, ``none`` 不予共享
  (which must cite its legal basis).
- Ownership (所有权) says who owns the data and which department holds it; use rights
  (使用权) are :mod:`govshare.node.policy.grants`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from govshare.protocols.errors import MalformedInput


class Grade(StrEnum):
    GENERAL = "general"
    IMPORTANT = "important"
    CORE = "core"


class SharingType(StrEnum):
    UNCONDITIONAL = "unconditional"
    CONDITIONAL = "conditional"
    NONE = "none"


# Decimal places an aggregate column may be kept at (``aggregate:scale=N``): at 9 a 64-bit
# column still holds ±9.2 billion whole units; more places than that is a unit error (store the
# smaller unit instead).
MAX_SCALE = 9


def column_scales(pairs: Mapping[str, int], *, where: str) -> dict[str, int]:
    """Column -> decimal places as a node tells them (catalogue entry, aggregate result).

    Raises:
        MalformedInput: a scale outside 1..MAX_SCALE (0 is never listed).
    """
    bad = sorted(c for c, s in pairs.items() if not 0 < s <= MAX_SCALE)
    if bad:
        raise MalformedInput(f"{where}: column {bad[0]!r} has no valid scale", field="scale")
    return dict(pairs)


class ColumnKind(StrEnum):
    JOIN_KEY = "join_key"  # matched, never revealed (unless a mask governs record release)
    AGGREGATE = "aggregate"  # revealed only inside aggregates
    GROUP_KEY = "group_key"  # revealed as a group label for groups of at least k members
    MASKED = "masked"  # revealed only through its masking rule
    PLAINTEXT = "plaintext"
    DENY = "deny"


class OwnerKind(StrEnum):
    STATE = "state"  # public data owned by the state
    INDIVIDUAL = "individual"  # an individual's data held in trust by the department
    ENTERPRISE = "enterprise"


class QueryKind(StrEnum):
    PSI_CARDINALITY = "psi_cardinality"
    PSI_MEMBERSHIP = "psi_membership"
    INTERSECTION_AGGREGATE = "intersection_aggregate"
    HORIZONTAL_AGGREGATE = "horizontal_aggregate"


class Role(StrEnum):
    NODE = "node"
    ANALYST = "analyst"
    AUDITOR = "auditor"
    OPERATOR = "operator"  # a named person who runs one node's acts (govshare.model.operator_act)


@dataclass(frozen=True)
class ColumnRule:
    """How one column of a dataset may be used.

    ``key_type`` names the key normaliser of a ``join_key`` column (``resident_id``, ``text``);
    ``domain`` lists the declared labels of a ``group_key`` column; ``mask`` names the masking
    rule of a ``masked`` column (or of a ``join_key`` released at record level).
    """

    name: str
    kind: ColumnKind
    key_type: str | None = None
    domain: tuple[str, ...] = ()
    mask: str | None = None


@dataclass(frozen=True)
class Owner:
    kind: OwnerKind
    name: str  # who owns it: "state", the enterprise's name, "residents (in trust)"
    holder: str  # the department that holds it


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset's metadata: everything the catalogue may show, never rows."""

    name: str
    grade: Grade
    sharing_type: SharingType
    owner: Owner
    columns: tuple[ColumnRule, ...]
    row_count: int
    legal_basis: str = ""  # required when sharing_type is NONE
    description: str = ""
    created_at: int = 0  # unix seconds
    min_set_size: int = field(default=0)  # smallest filtered set a PSI may run on (0 = default)
    # Operator tightening above the grade floors (govshare.node.policy.decision); never loosens
    # them.
    # Jurisdictions (ISO 3166-1 alpha-2) whose members may receive results. Empty means: no
    # restriction for ``general``, and only the holder node's own jurisdiction for ``important``.
    allowed_jurisdictions: tuple[str, ...] = ()
    min_group_size: int = 0  # smallest released group (0 = the grade's floor k)
    require_dp: bool = False  # DP noise on every query, even where the grade does not demand it
    require_approval: bool = False  # per-query operator approval, even for ``general``

    def column(self, name: str) -> ColumnRule | None:
        for rule in self.columns:
            if rule.name == name:
                return rule
        return None


class ColumnUse(StrEnum):
    JOIN = "join"  # matched by PSI
    AGGREGATE = "aggregate"  # inside SUM / COUNT / AVG
    GROUP = "group"  # a GROUP BY label
    FILTER = "filter"  # compared in a WHERE pushed to this node
    RELEASE = "release"  # revealed at record level (psi_membership)


@dataclass(frozen=True)
class ColumnAccess:
    """One use of one column. ``values``: the labels a FILTER compares against or the groups a
    GROUP asks for (checked against a ``group_key``'s domain; empty = the whole domain)."""

    column: str
    use: ColumnUse
    values: tuple[str, ...] = ()
