"""The SQL dialect: what parses into a plan, and what is refused by name."""

from __future__ import annotations

import pytest

from govshare.client.sql import parse_join
from govshare.model.conditions import Condition
from govshare.model.governance import QueryKind
from govshare.protocols.errors import MalformedInput

COUNT = (
    "SELECT COUNT(*) FROM civil.assistance a JOIN tax.residents t "
    "ON a.id_number = t.id_number WHERE t.income_band = 'high' AND a.year IN (2024, 2025)"
)


def test_count_join_becomes_a_psi_plan_with_pushed_filters() -> None:
    plan = parse_join(COUNT).psi_plan("review")
    assert plan.kind is QueryKind.PSI_CARDINALITY
    assert (plan.left.node, plan.left.dataset, plan.left.column) == (
        "civil",
        "assistance",
        "id_number",
    )
    assert (plan.right.node, plan.right.dataset) == ("tax", "residents")
    assert plan.right.where == (Condition("income_band", "=", "high"),)
    assert plan.left.where == (Condition("year", "in", (2024, 2025)),)


def test_join_keys_may_be_written_either_way_round() -> None:
    plan = parse_join(
        "SELECT COUNT(*) FROM tax.residents AS t JOIN civil.assistance AS a "
        "ON a.id_number = t.id_number"
    ).psi_plan("review")
    assert (plan.left.node, plan.right.node) == ("tax", "civil")
    assert plan.left.where == plan.right.where == ()


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (COUNT.replace("AND", "OR"), "OR in WHERE"),
        (COUNT.replace("JOIN", "LEFT JOIN"), "LEFT JOIN"),
        (COUNT + " ORDER BY 1", "ORDER"),
        (COUNT + " LIMIT 5", "LIMIT"),
        ("SELECT COUNT(*) FROM civil.assistance a", "exactly two datasets"),
        (COUNT.replace("t.income_band = 'high'", "t.income_band LIKE 'h%'"), "LIKE"),
        (COUNT.replace("t.income_band", "income_band"), "qualified"),
        (COUNT.replace("FROM civil.assistance", "FROM assistance"), "node.dataset"),
        ("DELETE FROM tax.residents", "DELETE"),
        ("SELECT COUNT(*) FROM a.x p JOIN b.y q ON p.k = q.k UNION SELECT 1", "UNION"),
        (COUNT.replace("COUNT(*)", "t.id_number"), "COUNT(*)"),
        ("SELEC nonsense", "unsupported SQL"),
    ],
)
def test_unsupported_sql_is_refused_naming_the_construct(sql: str, named: str) -> None:
    with pytest.raises(MalformedInput, match=None) as failure:
        parse_join(sql).psi_plan("review")
    assert named in str(failure.value)


def test_garbage_is_a_parse_error() -> None:
    with pytest.raises(MalformedInput, match="does not parse"):
        parse_join("SELECT (((")


def test_psi_filter_names_node_dataset_column() -> None:
    from govshare.client.sql import parse_filter

    assert parse_filter("tax.residents.income_band = 'high'") == (
        "tax", "residents", Condition("income_band", "=", "high"),
    )  # fmt: skip
    assert parse_filter("civil.assistance.year IN (2024, 2025)")[2] == Condition(
        "year", "in", (2024, 2025)
    )
    with pytest.raises(MalformedInput, match=r"NODE\.DATASET\.COLUMN"):
        parse_filter("income_band = 'high'")
    with pytest.raises(MalformedInput, match="LIKE"):
        parse_filter("tax.residents.income_band LIKE 'h%'")


UNION = (
    "SELECT h.age_band, COUNT(*), SUM(h.visits), AVG(h.visits) FROM ("
    "SELECT * FROM health.clinic_visits UNION ALL SELECT * FROM north.clinic_visits "
    "UNION ALL SELECT * FROM south.clinic_visits) AS h WHERE h.year = 2025 GROUP BY h.age_band"
)


def test_union_all_is_a_horizontal_aggregate_in_written_order() -> None:
    from govshare.client.sql import UnionQuery, aggregate_columns, parse_query

    query = parse_query(UNION)
    assert isinstance(query, UnionQuery)
    assert [p.node for p in query.parts] == ["health", "north", "south"]
    assert query.filters == (Condition("year", "=", 2025),)
    columns = aggregate_columns(query.select, query.group_by)
    assert (columns.alias, columns.sums, columns.group) == ("h", ("visits",), "age_band")


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (
            UNION.replace("UNION ALL SELECT * FROM north", "UNION SELECT * FROM north"),
            "without ALL",
        ),
        (
            UNION.replace(
                "SELECT * FROM north.clinic_visits", "SELECT * FROM north.clinic_visits WHERE 1 = 1"
            ),
            "inside a UNION ALL part",
        ),
        (UNION.replace("south.clinic_visits", "health.other"), "one dataset per node"),
        (UNION.replace("COUNT(*),", "MAX(h.visits),"), "aggregate SELECT"),
        (
            UNION.replace("GROUP BY h.age_band", "GROUP BY h.age_band, h.district"),
            "more than one column",
        ),
        (UNION.replace(") AS h", ")"), "without an alias"),
    ],
)
def test_unsupported_union_forms_are_named(sql: str, named: str) -> None:
    from govshare.client.sql import aggregate_columns, parse_query

    with pytest.raises(MalformedInput) as failure:
        query = parse_query(sql)
        aggregate_columns(query.select, query.group_by)
    assert named in str(failure.value)


def test_a_union_is_not_a_join() -> None:
    with pytest.raises(MalformedInput, match="horizontal aggregate"):
        parse_join(UNION)


def test_a_join_may_group_by_the_other_tables_column_but_sums_stay_on_one() -> None:
    from govshare.client.sql import aggregate_columns, parse_query

    join = (
        "SELECT t.income_band, COUNT(*), SUM(a.amount), AVG(a.amount) FROM civil.assistance a "
        "JOIN tax.residents t ON a.id_number = t.id_number GROUP BY t.income_band"
    )
    query = parse_query(join)
    columns = aggregate_columns(query.select, query.group_by)
    assert (columns.alias, columns.sums, columns.group, columns.group_alias) == (
        "a", ("amount",), "income_band", "t",
    )  # fmt: skip
    counted = parse_query(join.replace(", SUM(a.amount), AVG(a.amount)", ""))
    columns = aggregate_columns(counted.select, counted.group_by)
    assert (columns.alias, columns.group_alias) == ("t", "t")  # no SUM: the group's table
    both = parse_query(join.replace("AVG(a.amount)", "SUM(t.annual_income)"))
    with pytest.raises(MalformedInput, match="aggregates over the columns of one table"):
        aggregate_columns(both.select, both.group_by)
