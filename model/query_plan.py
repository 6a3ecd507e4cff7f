"""The description of a joint query that an analyst signs and every node involved reads.

The body of a signed request (``govshare.protocols.signed_request``) is this plan as canonical
JSON. Each node finds its own side in it, pushes that side's filters down to its store, and
checks every column against its rules and grants before any protocol message leaves it::

    {"kind": "psi_cardinality",            # or "psi_membership"
     "purpose": "assistance eligibility review",
     "left":  {"node": "tax", "dataset": "residents", "column": "id_number",
               "where": [["income_band", "=", "high"]]},
     "right": {"node": "civil", "dataset": "assistance", "column": "id_number", "where": []},
     "recipient": null,
     "mask": null,                         # membership: the masking rule of the released keys
     "epsilon": "1",                       # DP noise on the released count, or null
     "exact": false,                       # an exact release (needs every operator's approval)
     "engine": "rr22"}                     # membership's engine; absent: "ecdh"

A statistic (the cardinality, or the count of a membership kept by a department) is released with
DP noise of the signed ε, or exactly when ``exact`` is true and every operator approves; the
nodes refuse one with neither (``govshare.node.policy.decision``).

A filter is ``[column, op, value]`` with ``op`` one of the catalogue's operators, and ``value`` a
string, an integer, or (for ``in``) a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from govshare.model.conditions import OPERATORS, Condition
from govshare.model.epsilon import format_epsilon, parse_epsilon
from govshare.model.governance import ColumnAccess, ColumnUse, QueryKind
from govshare.protocols.errors import MalformedInput

PSI_KINDS = (QueryKind.PSI_CARDINALITY, QueryKind.PSI_MEMBERSHIP)
# The PSI engines: ECDH-PSI (govshare.protocols.ecdh_psi, every PSI kind) and RR22, an
# OT-extension engine for membership (govshare.node.queries.engines.rr22). Signed with the plan,
# so nobody changes it after the analyst signed.
ECDH, RR22 = "ecdh", "rr22"
ENGINES = (ECDH, RR22)
MAX_FILTERS = 16


@dataclass(frozen=True)
class Side:
    node: str
    dataset: str
    column: str
    where: tuple[Condition, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "dataset": self.dataset,
            "column": self.column,
            "where": [
                [c.column, c.op, list(c.value) if isinstance(c.value, tuple) else c.value]
                for c in self.where
            ],
        }

    @property
    def label(self) -> str:
        return f"{self.node}.{self.dataset}.{self.column}"

    def accesses(self, *, release: bool) -> tuple[ColumnAccess, ...]:
        """The column uses this side makes, for the policy decision."""
        uses = [ColumnAccess(self.column, ColumnUse.JOIN)]
        if release:
            uses.append(ColumnAccess(self.column, ColumnUse.RELEASE))
        for condition in self.where:
            values = condition.value if isinstance(condition.value, tuple) else (condition.value,)
            uses.append(
                ColumnAccess(condition.column, ColumnUse.FILTER, tuple(str(v) for v in values))
            )
        return tuple(uses)


@dataclass(frozen=True)
class PsiPlan:
    kind: QueryKind
    purpose: str
    left: Side
    right: Side
    recipient: str | None = None
    # Membership: the masking rule the released keys go through. Both nodes check it is their
    # own join column's rule, so a release honours each side's rule.
    mask: str | None = None
    epsilon: Fraction | None = None
    exact: bool = False
    engine: str = ECDH

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "purpose": self.purpose,
            "left": self.left.to_json(),
            "right": self.right.to_json(),
            "recipient": self.recipient,
            "mask": self.mask,
            **release_json(self.epsilon, self.exact),
            # Absent for the default, so plans signed before engines existed read the same.
            **({"engine": self.engine} if self.engine != ECDH else {}),
        }

    @property
    def noised(self) -> bool:
        """Whether the released count carries DP noise (cardinality, membership to a node)."""
        return self.epsilon is not None and (
            self.kind is QueryKind.PSI_CARDINALITY or self.recipient is not None
        )

    def side_of(self, node: str) -> tuple[Side, Side]:
        """(this node's side, the peer's side).

        Raises:
            MalformedInput: the plan does not involve ``node``, or joins a node with itself.
        """
        if self.left.node == self.right.node:
            raise MalformedInput("a PSI joins datasets on two different nodes", field="right")
        if self.left.node == node:
            return self.left, self.right
        if self.right.node == node:
            return self.right, self.left
        raise MalformedInput(f"the query does not involve node {node}", field="left")

    @property
    def nodes(self) -> tuple[str, str]:
        return self.left.node, self.right.node

    @property
    def receiver(self) -> str:
        """In membership, the node that finds which of its keys match: the recipient, or the
        left node when the (masked) keys go to the analyst."""
        return self.recipient or self.left.node


def _text(raw: Any, field: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise MalformedInput(f"field {field!r} must be a non-empty string", field=field)
    return raw


def release_json(epsilon: Fraction | None, exact: bool) -> dict[str, Any]:
    """The release fields of a plan: ``epsilon`` (decimal text or null) and ``exact``."""
    return {"epsilon": None if epsilon is None else format_epsilon(epsilon), "exact": exact}


def parse_release(raw: dict[str, Any]) -> tuple[Fraction | None, bool]:
    """(ε, exact) of a plan body.

    Raises:
        MalformedInput: ε not a positive decimal string, ``exact`` not a boolean, or both.
    """
    epsilon_raw, exact = raw.get("epsilon"), raw.get("exact", False)
    if not isinstance(exact, bool):
        raise MalformedInput("field 'exact' must be true or false", field="exact")
    epsilon: Fraction | None = None
    if epsilon_raw is not None:
        if not isinstance(epsilon_raw, str):
            raise MalformedInput("field 'epsilon' is a decimal string", field="epsilon")
        try:
            epsilon = parse_epsilon(epsilon_raw)
        except (ValueError, MalformedInput):
            raise MalformedInput(f"field 'epsilon': {epsilon_raw!r}", field="epsilon") from None
        if epsilon <= 0:
            raise MalformedInput("field 'epsilon' must be positive", field="epsilon")
    if epsilon is not None and exact:
        raise MalformedInput("field 'exact': an exact release carries no ε", field="exact")
    return epsilon, exact


def _condition(raw: Any, field: str) -> Condition:
    if not isinstance(raw, list) or len(raw) != 3:
        raise MalformedInput(f"field {field!r}: a filter is [column, op, value]", field=field)
    column, op, value = raw
    column = _text(column, field)
    if op not in OPERATORS:
        raise MalformedInput(
            f"field {field!r}: operator {op!r} is not one of {', '.join(OPERATORS)}", field=field
        )

    def scalar(item: Any) -> str | int:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise MalformedInput(f"field {field!r}: values are strings or integers", field=field)
        return item

    if op == "in":
        if not isinstance(value, list) or not value:
            raise MalformedInput(f"field {field!r}: 'in' takes a list of values", field=field)
        return Condition(column, op, tuple(scalar(v) for v in value))
    return Condition(column, op, scalar(value))


def _side(raw: Any, field: str) -> Side:
    if not isinstance(raw, dict):
        raise MalformedInput(f"field {field!r} must be an object", field=field)
    where = raw.get("where", [])
    if not isinstance(where, list) or len(where) > MAX_FILTERS:
        raise MalformedInput(
            f"field '{field}.where' must be a list of at most {MAX_FILTERS} filters",
            field=f"{field}.where",
        )
    return Side(
        node=_text(raw.get("node"), f"{field}.node"),
        dataset=_text(raw.get("dataset"), f"{field}.dataset"),
        column=_text(raw.get("column"), f"{field}.column"),
        where=tuple(_condition(c, f"{field}.where") for c in where),
    )


def parse_plan(raw: Any, *, kind: str) -> PsiPlan:
    """Parse a request body; ``kind`` is the request's signed kind and must match.

    Raises:
        MalformedInput: naming the field that is wrong.
    """
    if not isinstance(raw, dict):
        raise MalformedInput("query body must be a JSON object", field="body")
    try:
        query_kind = QueryKind(str(raw.get("kind")))
    except ValueError:
        raise MalformedInput(
            f"field 'kind': {raw.get('kind')!r} is not a query kind", field="kind"
        ) from None
    if query_kind not in PSI_KINDS:
        raise MalformedInput(f"field 'kind': {query_kind.value} is not served yet", field="kind")
    if query_kind.value != kind:
        raise MalformedInput("field 'kind' disagrees with the signed kind", field="kind")
    recipient = raw.get("recipient")
    if recipient is not None:
        recipient = _text(recipient, "recipient")
    mask = raw.get("mask")
    if mask is not None:
        mask = _text(mask, "mask")
    epsilon, exact = parse_release(raw)
    engine = raw.get("engine", ECDH)
    if engine not in ENGINES:
        raise MalformedInput(
            f"field 'engine': {engine!r} is not one of {', '.join(ENGINES)}", field="engine"
        )
    plan = PsiPlan(
        kind=query_kind,
        purpose=_text(raw.get("purpose"), "purpose"),
        left=_side(raw.get("left"), "left"),
        right=_side(raw.get("right"), "right"),
        recipient=recipient,
        mask=mask,
        epsilon=epsilon,
        exact=exact,
        engine=engine,
    )
    if plan.engine == RR22 and plan.kind is not QueryKind.PSI_MEMBERSHIP:
        raise MalformedInput(
            "field 'engine': rr22 serves membership only (its receiver learns the intersection)",
            field="engine",
        )
    if plan.kind is QueryKind.PSI_MEMBERSHIP and plan.recipient is None and plan.mask is None:
        raise MalformedInput("field 'mask': membership names the masking rule", field="mask")
    if plan.kind is QueryKind.PSI_MEMBERSHIP and plan.recipient not in (None, *plan.nodes):
        raise MalformedInput("field 'recipient' must be one of the two nodes", field="recipient")
    if plan.kind is QueryKind.PSI_CARDINALITY and plan.recipient is not None:
        raise MalformedInput(
            "field 'recipient': a cardinality goes to the analyst", field="recipient"
        )
    return plan
