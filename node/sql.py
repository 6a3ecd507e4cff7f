"""govshare's small SQL dialect for joint queries, parsed with sqlglot.

Supported today (anything else is refused with a message naming the construct)::

    SELECT COUNT(*)
    FROM civil.assistance AS a JOIN tax.residents AS t ON a.id_number = t.id_number
    WHERE t.income_band = 'high' AND a.year IN (2024, 2025)

- Tables are ``node.dataset``, each with an optional alias; exactly one inner ``JOIN`` of two
  datasets on different nodes, on one equality of their join-key columns.
- ``WHERE`` is a conjunction (``AND``) of ``column op literal`` or ``column IN (literals)``
  comparisons, each naming one dataset's column; every comparison is pushed to that dataset's
  node and runs there.
- ``SELECT COUNT(*)`` asks the intersection cardinality.

:func:`parse_join` returns the parsed :class:`JoinQuery`; :meth:`JoinQuery.psi_plan` turns a
``COUNT(*)`` query into the PSI plan the analyst signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from govshare.node.catalog import Condition
from govshare.node.governance import QueryKind
from govshare.node.query_plan import PsiPlan, Side
from govshare.protocols.errors import MalformedInput

_OPERATORS: dict[type[exp.Expression], str] = {
    exp.EQ: "=",
    exp.NEQ: "!=",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
}


def unsupported(construct: str) -> MalformedInput:
    return MalformedInput(f"unsupported SQL: {construct}", field="sql")


@dataclass(frozen=True)
class TableRef:
    node: str
    dataset: str
    alias: str


@dataclass(frozen=True)
class JoinQuery:
    """A two-dataset join: tables, join columns, pushed-down filters and the select list."""

    left: TableRef
    right: TableRef
    left_key: str
    right_key: str
    filters: dict[str, tuple[Condition, ...]]  # by alias
    select: tuple[exp.Expression, ...]
    group_by: tuple[exp.Column, ...]

    @property
    def is_count_star(self) -> bool:
        return (
            len(self.select) == 1
            and isinstance(self.select[0], exp.Count)
            and isinstance(self.select[0].this, exp.Star)
            and not self.group_by
        )

    def psi_plan(self, purpose: str) -> PsiPlan:
        """The PSI cardinality plan of a ``SELECT COUNT(*)`` join."""
        if not self.is_count_star:
            shown = ", ".join(e.sql() for e in self.select)
            raise unsupported(f"SELECT {shown} (a join answers COUNT(*) so far)")
        return PsiPlan(
            kind=QueryKind.PSI_CARDINALITY,
            purpose=purpose,
            left=Side(
                self.left.node, self.left.dataset, self.left_key, self.filters[self.left.alias]
            ),
            right=Side(
                self.right.node, self.right.dataset, self.right_key, self.filters[self.right.alias]
            ),
        )


def _table(node: exp.Expression | None) -> TableRef:
    if not isinstance(node, exp.Table):
        raise unsupported("FROM and JOIN take node.dataset tables, not subqueries")
    if not node.db or node.args.get("catalog"):
        raise unsupported(f"table {node.sql()!r}: name it as node.dataset, e.g. tax.residents")
    return TableRef(node=node.db, dataset=node.name, alias=node.alias_or_name)


def _column(node: exp.Expression, aliases: dict[str, TableRef]) -> tuple[str, str]:
    if not isinstance(node, exp.Column):
        raise unsupported(f"{node.sql()!r} where a column was expected")
    if not node.table:
        raise unsupported(f"column {node.name!r} must be qualified by its table alias")
    if node.table not in aliases:
        raise MalformedInput(f"unknown table alias {node.table!r} in {node.sql()!r}", field="sql")
    return node.table, node.name


def _literal(node: exp.Expression) -> str | int:
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        return -int(node.this.this)
    if not isinstance(node, exp.Literal):
        raise unsupported(f"{node.sql()!r}: compare with a literal")
    if node.is_string:
        return str(node.this)
    try:
        return int(node.this)
    except ValueError:
        raise unsupported(f"{node.sql()!r}: numbers are integers") from None


def _conjuncts(node: exp.Expression) -> list[exp.Expression]:
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    if isinstance(node, exp.Paren):
        return _conjuncts(node.this)
    return [node]


def _filters(
    where: exp.Expression | None, aliases: dict[str, TableRef]
) -> dict[str, tuple[Condition, ...]]:
    found: dict[str, list[Condition]] = {alias: [] for alias in aliases}
    if where is None:
        return {alias: () for alias in aliases}
    for term in _conjuncts(where.this):
        if isinstance(term, exp.Or):
            raise unsupported(f"OR in WHERE ({term.sql()}); each node's filter is a conjunction")
        if isinstance(term, exp.Not):
            raise unsupported(f"NOT in WHERE ({term.sql()})")
        if isinstance(term, exp.In):
            alias, column = _column(term.this, aliases)
            if term.args.get("query"):
                raise unsupported("IN (SELECT ...)")
            values = tuple(_literal(v) for v in term.expressions)
            found[alias].append(Condition(column, "in", values))
            continue
        operator = _OPERATORS.get(type(term))
        if operator is None:
            raise unsupported(f"{type(term).__name__.upper()} in WHERE ({term.sql()})")
        alias, column = _column(term.this, aliases)
        found[alias].append(Condition(column, operator, _literal(term.expression)))
    return {alias: tuple(conditions) for alias, conditions in found.items()}


def parse_join(sql: str) -> JoinQuery:
    """Parse a joint query.

    Raises:
        MalformedInput: not SQL, or a construct govshare does not run (named in the message).
    """
    try:
        statements = sqlglot.parse(sql)
    except (ParseError, TokenError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise MalformedInput(f"SQL does not parse: {first}", field="sql") from None
    if len(statements) != 1 or statements[0] is None:
        raise unsupported("one SELECT statement at a time")
    query = statements[0]
    if isinstance(query, exp.Union):
        raise unsupported("UNION (horizontal aggregates are not served yet)")
    if not isinstance(query, exp.Select):
        raise unsupported(f"{type(query).__name__.upper()} statements (only SELECT)")
    for clause in ("having", "order", "limit", "offset", "with", "distinct", "qualify"):
        if query.args.get(clause):
            raise unsupported(clause.upper())
    joins = query.args.get("joins") or []
    if len(joins) != 1:
        raise unsupported("a joint query joins exactly two datasets")
    join = joins[0]
    if join.args.get("side") or join.args.get("kind") not in (None, "INNER"):
        raise unsupported(
            f"{join.args.get('side') or join.args.get('kind')} JOIN (inner joins only)"
        )
    if join.args.get("using"):
        raise unsupported("JOIN ... USING (write ON a.key = b.key)")
    from_ = query.args.get("from_") or query.args.get("from")
    left = _table(from_.this if from_ is not None else None)
    right = _table(join.this)
    if left.alias == right.alias:
        raise MalformedInput("the two tables need different aliases", field="sql")
    aliases = {left.alias: left, right.alias: right}
    on = join.args.get("on")
    if not isinstance(on, exp.EQ):
        raise unsupported("a join condition other than one equality of join keys")
    (a_alias, a_col), (b_alias, b_col) = _column(on.this, aliases), _column(on.expression, aliases)
    if a_alias == b_alias:
        raise MalformedInput("the join condition must compare the two tables", field="sql")
    keys = {a_alias: a_col, b_alias: b_col}
    group = query.args.get("group")
    return JoinQuery(
        left=left,
        right=right,
        left_key=keys[left.alias],
        right_key=keys[right.alias],
        filters=_filters(query.args.get("where"), aliases),
        select=tuple(query.expressions),
        group_by=tuple(group.expressions) if group else (),
    )


def parse_filter(text: str) -> tuple[str, str, Condition]:
    """Parse one ``--where`` filter of the ``query psi`` command.

    ``NODE.DATASET.COLUMN OP LITERAL`` or ``NODE.DATASET.COLUMN IN (LITERAL, ...)``, e.g.
    ``tax.residents.income_band = 'high'``. Returns ``(node, dataset, condition)``.

    Raises:
        MalformedInput: anything else, naming the construct.
    """
    try:
        term = sqlglot.parse_one(text, into=exp.Condition)
    except (ParseError, TokenError):
        raise MalformedInput(f"filter {text!r} does not parse", field="where") from None
    column = term.this if isinstance(term, exp.In | exp.Binary) else None
    if not isinstance(column, exp.Column) or not column.db or not column.table:
        raise MalformedInput(
            f"filter {text!r}: name the column as NODE.DATASET.COLUMN", field="where"
        )
    ref = TableRef(column.db, column.table, column.table)
    conditions = _filters(exp.Where(this=term), {ref.alias: ref})[ref.alias]
    if len(conditions) != 1:
        raise unsupported(f"filter {text!r}: one comparison per --where")
    return column.db, column.table, conditions[0]
