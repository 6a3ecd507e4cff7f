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
- ``SELECT COUNT(*)`` asks the intersection cardinality; ``SELECT g, COUNT(*), SUM(v), AVG(v)
  ... GROUP BY g`` over one table's columns asks an intersection aggregate.

A horizontal aggregate over the same-schema datasets of several nodes is written as a
``UNION ALL`` of whole datasets, aliased, with the filters and aggregates outside::

    SELECT h.age_band, COUNT(*), SUM(h.visits), AVG(h.visits)
    FROM (SELECT * FROM health.clinic_visits
          UNION ALL SELECT * FROM health_north.clinic_visits) AS h
    WHERE h.year = 2025
    GROUP BY h.age_band

:func:`parse_query` returns a :class:`JoinQuery` or a :class:`UnionQuery`; :func:`parse_join`
accepts joins only; :meth:`JoinQuery.psi_plan` turns a ``COUNT(*)`` join into the PSI plan the
analyst signs; :func:`aggregate_columns` reads an aggregate select list.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
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


@dataclass(frozen=True)
class UnionQuery:
    """A horizontal aggregate: same-schema datasets of several nodes, filtered alike."""

    parts: tuple[TableRef, ...]
    alias: str
    filters: tuple[Condition, ...]
    select: tuple[exp.Expression, ...]
    group_by: tuple[exp.Column, ...]


@dataclass(frozen=True)
class AggregateColumns:
    """What an aggregate select list asks of one table: SUM/AVG columns and the group column."""

    alias: str
    sums: tuple[str, ...]
    group: str | None
    group_alias: str = ""  # the group column's table (a join may group by the other one)


def aggregate_columns(
    select: tuple[exp.Expression, ...], group_by: tuple[exp.Column, ...]
) -> AggregateColumns:
    """Read ``g, COUNT(*), SUM(v), AVG(v)``: SUM/AVG over one table alias, at most one group
    column (of that table or, in a join, of the other: ``group_alias`` names it).

    Raises:
        MalformedInput: another expression, or SUM/AVG columns of two tables (named).
    """
    if len(group_by) > 1:
        raise unsupported("GROUP BY more than one column")
    group = group_by[0] if group_by else None
    used: set[str] = set()
    sums: list[str] = []
    for item in select:
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, exp.Count) and isinstance(node.this, exp.Star):
            continue
        if isinstance(node, exp.Sum | exp.Avg) and isinstance(node.this, exp.Column):
            used.add(node.this.table)
            if node.this.name not in sums:
                sums.append(node.this.name)
            continue
        if isinstance(node, exp.Column) and group is not None and node.name == group.name:
            continue
        raise unsupported(f"{node.sql()} in an aggregate SELECT (COUNT(*), SUM, AVG, the group)")
    if len(used) > 1:
        raise unsupported("aggregates over the columns of one table")
    group_alias = group.table if group is not None else ""
    alias = used.pop() if used else group_alias
    return AggregateColumns(
        alias, tuple(sums), group.name if group is not None else None, group_alias
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


def parse_query(sql: str) -> JoinQuery | UnionQuery:
    """Parse a joint query: a two-dataset join, or a UNION ALL horizontal aggregate.

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
        raise unsupported("a bare UNION (write SELECT ... FROM (... UNION ALL ...) AS alias)")
    if not isinstance(query, exp.Select):
        raise unsupported(f"{type(query).__name__.upper()} statements (only SELECT)")
    for clause in ("having", "order", "limit", "offset", "with", "distinct", "qualify"):
        if query.args.get(clause):
            raise unsupported(clause.upper())
    from_ = query.args.get("from_") or query.args.get("from")
    group = query.args.get("group")
    group_by = tuple(group.expressions) if group else ()
    joins = query.args.get("joins") or []
    if from_ is not None and isinstance(from_.this, exp.Subquery):
        if joins:
            raise unsupported("a JOIN with a UNION ALL subquery")
        return _union_query(from_.this, query, group_by)
    if len(joins) != 1:
        raise unsupported("a joint query joins exactly two datasets")
    join = joins[0]
    if join.args.get("side") or join.args.get("kind") not in (None, "INNER"):
        raise unsupported(
            f"{join.args.get('side') or join.args.get('kind')} JOIN (inner joins only)"
        )
    if join.args.get("using"):
        raise unsupported("JOIN ... USING (write ON a.key = b.key)")
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
    return JoinQuery(
        left=left,
        right=right,
        left_key=keys[left.alias],
        right_key=keys[right.alias],
        filters=_filters(query.args.get("where"), aliases),
        select=tuple(query.expressions),
        group_by=group_by,
    )


def _union_parts(node: exp.Expression) -> list[TableRef]:
    """Flatten ``SELECT * FROM a UNION ALL SELECT * FROM b ...`` in written order."""
    if isinstance(node, exp.Union):
        if node.args.get("distinct"):
            raise unsupported("UNION without ALL (rows of different nodes are never merged)")
        return _union_parts(node.this) + _union_parts(node.expression)
    if not isinstance(node, exp.Select):
        raise unsupported(f"{node.sql()!r} inside UNION ALL")
    if len(node.expressions) != 1 or not isinstance(node.expressions[0], exp.Star):
        raise unsupported("UNION ALL parts other than SELECT * FROM node.dataset")
    for clause in ("where", "joins", "group", "having", "order", "limit"):
        if node.args.get(clause):
            raise unsupported(f"{clause.upper()} inside a UNION ALL part (filter outside it)")
    from_ = node.args.get("from_") or node.args.get("from")
    return [_table(from_.this if from_ is not None else None)]


def _union_query(
    subquery: exp.Subquery, query: exp.Select, group_by: tuple[exp.Column, ...]
) -> UnionQuery:
    alias = subquery.alias
    if not alias:
        raise unsupported("a UNION ALL subquery without an alias")
    parts = _union_parts(subquery.this)
    if len(parts) < 2:
        raise unsupported("a horizontal aggregate over fewer than two datasets")
    if len({p.node for p in parts}) != len(parts):
        raise unsupported("two datasets of one node in a UNION ALL (one dataset per node)")
    ref = TableRef(node="", dataset="", alias=alias)
    filters = _filters(query.args.get("where"), {alias: ref})[alias]
    return UnionQuery(
        parts=tuple(parts),
        alias=alias,
        filters=filters,
        select=tuple(query.expressions),
        group_by=group_by,
    )


def parse_join(sql: str) -> JoinQuery:
    """Parse a two-dataset join (see :func:`parse_query`).

    Raises:
        MalformedInput: anything else, naming the construct.
    """
    query = parse_query(sql)
    if not isinstance(query, JoinQuery):
        raise unsupported("UNION ALL here: this asks a horizontal aggregate, not a join")
    return query


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
