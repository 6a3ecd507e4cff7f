"""The SQL dialect: what parses into a plan, and what is refused by name."""

from __future__ import annotations

import pytest

from govshare.node.catalog import Condition
from govshare.node.governance import QueryKind
from govshare.node.sql import parse_join
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
    from govshare.node.sql import parse_filter

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
