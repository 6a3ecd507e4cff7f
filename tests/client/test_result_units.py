"""The unit of an aggregate's sums: each SUM column's decimal places, as the nodes holding it
say in their results (``AggregateResult.column_scales``)."""

from __future__ import annotations

from govshare.client.analyst_aggregate import result_units
from govshare.model.aggregate_plan import PAILLIER, Figures, HorizontalPlan, Part, SumSpec
from govshare.model.governance import QueryKind
from govshare.v1 import aggregate_pb2


def plan(*nodes: str) -> HorizontalPlan:
    return HorizontalPlan(
        kind=QueryKind.HORIZONTAL_AGGREGATE, purpose="p",
        parts=tuple(Part(n, "visits") for n in nodes),
        figures=Figures(None, (SumSpec("cost", 10_000), SumSpec("visits", 10)), None),
        aggregator=nodes[0], scheme=PAILLIER, public_key=b"k",
    )  # fmt: skip


def result(**scales: int) -> aggregate_pb2.AggregateResult:
    return aggregate_pb2.AggregateResult(column_scales=scales)


def test_a_column_every_holder_keeps_at_one_scale_gets_that_unit() -> None:
    told = {"north": result(cost=2), "south": result(cost=2)}
    assert result_units(plan("north", "south"), told) == {
        "units": {"cost": 2}, "unit_warning": None
    }  # fmt: skip


def test_holders_that_disagree_leave_the_column_without_a_unit_and_say_so() -> None:
    told = {"north": result(cost=2), "south": result()}
    units = result_units(plan("north", "south"), told)
    assert units["units"] == {}
    assert units["unit_warning"] == (
        "SUM(cost) adds values the nodes keep at different decimal scales: the total mixes units"
    )


def test_a_scale_out_of_range_is_a_warning_not_a_lost_result() -> None:
    told = {"north": result(cost=42), "south": result(cost=2)}
    units = result_units(plan("north", "south"), told)
    assert units["units"] == {}  # north's cost is read as unscaled: the holders disagree
    assert "node north's result: column 'cost' has no valid scale" in units["unit_warning"]
    assert "SUM(cost) adds values" in units["unit_warning"]
