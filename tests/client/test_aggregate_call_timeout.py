"""The aggregate client's ``call_timeout`` is the deadline of its calls to the nodes.

Real nodes over mutual TLS. Each records, for every catalogue, query and aggregate call the
analyst makes, the deadline the call arrived with (``ServicerContext.time_remaining()``): the
deadline the client set is read where it counts, at the node, and nothing is timed. The
deadlines are 10 s (the client's default), 600 s (the ``call_timeout`` given) and 900 s (the
run's own): each is told apart from the others by a band minutes wide, whatever the machine's
load (and gRPC's rounding of the deadline it sends: a 600 s call arrives with up to 601 s left).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
from conftest import CIVIL_COLUMNS, PURPOSE, TAX_COLUMNS, build_federation, grant, register, served

from govshare.client.analyst import DEFAULT_RUN_TIMEOUT
from govshare.client.analyst_aggregate import run_aggregate_sql
from govshare.examples import synth
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.node.api.aggregate_service import AggregateService
from govshare.node.api.auth import current_caller
from govshare.node.api.services import CatalogService, QueryService
from govshare.rpc.client import DEFAULT_TIMEOUT

CALL_TIMEOUT = 600.0
# The bands of seconds left on arrival: below DEFAULT_BAND, a call with the 10 s default;
# between the two, a call given CALL_TIMEOUT; above RUN_BAND, the run's 900 s.
DEFAULT_BAND = 60.0
RUN_BAND = (CALL_TIMEOUT + DEFAULT_RUN_TIMEOUT) / 2
# The analyst's unary calls, each served by one method of the node's services.
PROBED: dict[type[Any], tuple[str, ...]] = {
    CatalogService: ("DescribeDataset",),
    QueryService: ("Submit", "Status", "Cancel", "Receipt"),
    AggregateService: ("Prepare", "Run"),
}
JOIN = (
    "SELECT a.district, COUNT(*), SUM(a.amount) FROM civil.assistance AS a "
    "JOIN tax.residents AS t ON a.id_number = t.id_number GROUP BY a.district"
)
UNION = (
    "SELECT h.district, COUNT(*), SUM(h.amount) FROM (SELECT * FROM tax.assistance "
    "UNION ALL SELECT * FROM civil.assistance) AS h GROUP BY h.district"
)


@dataclass
class Probed:
    alice: Identity
    # (service.method, seconds left of the call's deadline) of each call alice made.
    calls: list[tuple[str, float]]

    def take(self) -> list[tuple[str, float]]:
        taken, self.calls[:] = list(self.calls), []
        return taken


def _probe(calls: list[tuple[str, float]], cls: type[Any], method: str) -> Any:
    original = getattr(cls, method)

    async def recorded(self: Any, request: Any, context: Any) -> Any:
        if current_caller().name == "alice":
            calls.append((f"{cls.__name__}.{method}", context.time_remaining()))
        return await original(self, request, context)

    return recorded


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probed]:
    fed = build_federation(tmp_path_factory.mktemp("callfed"), "callfed")
    data = tmp_path_factory.mktemp("calldata")
    synth.generate(data, size=400, seed=5)
    calls: list[tuple[str, float]] = []
    kinds = [QueryKind.INTERSECTION_AGGREGATE, QueryKind.HORIZONTAL_AGGREGATE]
    with pytest.MonkeyPatch.context() as patch:
        # Before the servers are built: each binds its servicers' methods when it starts.
        for cls, methods in PROBED.items():
            for method in methods:
                patch.setattr(cls, method, _probe(calls, cls, method))
        with served(fed, ("tax", "civil")) as nodes:
            tax, civil = nodes["tax"], nodes["civil"]
            register(tax, data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
            grant(tax, "residents", "alice", ["id_number"], kinds)
            for node in (tax, civil):
                register(
                    node, data / f"{synth.CIVIL}.csv", name="assistance", columns=CIVIL_COLUMNS
                )
                grant(node, "assistance", "alice", ["id_number", "district", "amount"], kinds)
            yield Probed(fed.identity("alice"), calls)


def _deadlines(calls: list[tuple[str, float]]) -> tuple[set[str], list[float], list[float]]:
    """The methods called, the seconds left of each call but the run, and of each run."""
    runs = [left for name, left in calls if name == "AggregateService.Run"]
    others = [left for name, left in calls if name != "AggregateService.Run"]
    return {name for name, _ in calls}, others, runs


@pytest.mark.parametrize(
    ("sql", "kind", "prepared"),
    [
        (JOIN, QueryKind.INTERSECTION_AGGREGATE, set()),
        (UNION, QueryKind.HORIZONTAL_AGGREGATE, {"AggregateService.Prepare"}),
    ],
)
def test_every_call_but_the_run_carries_the_call_timeout(
    probed: Probed, sql: str, kind: QueryKind, prepared: set[str]
) -> None:
    probed.take()
    outcome = run_aggregate_sql(probed.alice, sql, PURPOSE, Fraction(1), call_timeout=CALL_TIMEOUT)
    assert outcome.kind is kind
    methods, others, runs = _deadlines(probed.take())
    # The catalogue read (the SUM column's scale, the GROUP BY domain), the query's own calls,
    # and for a horizontal aggregate the nodes' ephemeral keys.
    expected = {"CatalogService.DescribeDataset", "QueryService.Submit", "QueryService.Receipt"}
    assert expected | prepared | {"AggregateService.Run"} <= methods
    assert all(DEFAULT_BAND < left < RUN_BAND for left in others), sorted(others)
    # The run keeps its own deadline (DEFAULT_RUN_TIMEOUT, 900 s), not call_timeout.
    assert runs and all(left > RUN_BAND for left in runs), runs


def test_without_call_timeout_the_calls_keep_the_clients_default(probed: Probed) -> None:
    # The probe tells the two apart: the same query without call_timeout reaches the nodes
    # with the client's 10 s deadline on every call but the run.
    probed.take()
    run_aggregate_sql(probed.alice, JOIN, PURPOSE, Fraction(1))
    methods, others, runs = _deadlines(probed.take())
    assert {"CatalogService.DescribeDataset", "QueryService.Submit"} <= methods
    assert DEFAULT_TIMEOUT < DEFAULT_BAND
    assert others and all(left < DEFAULT_BAND for left in others), sorted(others)
    assert runs and all(left > RUN_BAND for left in runs), runs
