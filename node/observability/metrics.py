"""A node's Prometheus metrics, in a registry of its own.

Each node has its own ``CollectorRegistry``, never the process-wide default, so several nodes
in one process (the tests) count apart. What is counted:

=============================================  ==============================================
``govshare_queries_received_total{kind}``      signed requests admitted to a decision
``govshare_queries_total{kind,outcome}``       how queries ended here: ``released``,
                                               ``failed``, ``refused`` (by policy, at
                                               admission), ``refused_on_data`` (floor or
                                               tracker check), ``cancelled``, ``expired``
``govshare_query_run_seconds{kind}``           a run's time, from ``running`` to its end
``govshare_epsilon_spent_total{dataset}``      ε spent (reservations settled spent)
``govshare_query_runs_computing``              runs holding a turn (the admission gate)
``govshare_query_runs_queued``                 admitted runs waiting for a turn or a peer
``govshare_query_runs_limit{limit}``           the gate's ``running`` and ``queued`` limits
``govshare_rpcs_total{method,code}``           RPCs by full method and gRPC status code
``govshare_serving``                           1, or 0 while the node refuses to serve
=============================================  ==============================================

Denials by the operator are made by ``govshare approvals`` in its own process and are not
counted here; the audit log has them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from govshare.node.observability.events import (
    CANCELLED,
    DECIDED,
    EXPIRED,
    FAILED,
    RECEIVED,
    RELEASED,
    RUNNING,
    SETTLED,
    QueryEvent,
)
from govshare.node.queries.capacity import Load

# Run times span a 10-row PSI (tens of ms) to a 1M-row intersection aggregate (about 13 min,
# README "Benchmarks"), up to the protocol timeout's order of magnitude.
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)


class _GateCollector(Collector):
    """Reads the admission gate and the node's serving state at each scrape."""

    def __init__(self, load: Callable[[], Load], serving: Callable[[], bool]) -> None:
        self._load = load
        self._serving = serving

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        yield GaugeMetricFamily(
            "govshare_query_runs_computing", "Query runs holding a turn", value=load.computing
        )
        yield GaugeMetricFamily(
            "govshare_query_runs_queued",
            "Admitted query runs waiting for a turn or for a peer",
            value=load.queued,
        )
        limits = GaugeMetricFamily(
            "govshare_query_runs_limit", "The admission gate's limits", labels=["limit"]
        )
        limits.add_metric(["running"], load.max_running)
        limits.add_metric(["queued"], load.max_queued)
        yield limits
        yield GaugeMetricFamily(
            "govshare_serving",
            "1 while the node serves; 0 while it refuses (its audit log is broken)",
            value=1 if self._serving() else 0,
        )


class NodeMetrics:
    """One node's counters and gauges; :meth:`observe` takes its query events."""

    def __init__(
        self,
        *,
        load: Callable[[], Load],
        serving: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        registry = self.registry
        self.received = Counter(
            "govshare_queries_received", "Signed query requests received", ["kind"],
            registry=registry,
        )  # fmt: skip
        self.queries = Counter(
            "govshare_queries", "Queries by kind and how they ended at this node",
            ["kind", "outcome"], registry=registry,
        )  # fmt: skip
        self.run_seconds = Histogram(
            "govshare_query_run_seconds", "Time of a query's run at this node", ["kind"],
            buckets=RUN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.epsilon_spent = Counter(
            "govshare_epsilon_spent", "Privacy budget spent, by dataset", ["dataset"],
            registry=registry,
        )  # fmt: skip
        self.rpcs = Counter(
            "govshare_rpcs", "RPCs by method and status code", ["method", "code"],
            registry=registry,
        )  # fmt: skip
        registry.register(_GateCollector(load, serving))

    def observe(self, event: QueryEvent) -> None:
        """Count one query event (a subscriber of ``QueryEvents``)."""
        kind = event.kind or "unknown"
        if event.name == RECEIVED:
            self.received.labels(kind).inc()
        elif event.name == DECIDED and not event.fields.get("allowed", True):
            self.queries.labels(kind, "refused").inc()
        elif event.name == RUNNING:
            with self._lock:
                self._started[event.query_id] = self._clock()
        elif event.name in (RELEASED, FAILED):
            with self._lock:
                started = self._started.pop(event.query_id, None)
            if started is not None:
                self.run_seconds.labels(kind).observe(max(0.0, self._clock() - started))
            outcome = event.name
            if event.name == FAILED and event.fields.get("refused"):
                outcome = "refused_on_data"
            self.queries.labels(kind, outcome).inc()
        elif event.name in (CANCELLED, EXPIRED):
            self.queries.labels(kind, event.name).inc()
        elif event.name == SETTLED and event.fields.get("reservation") == "spent":
            epsilon = event.fields.get("epsilon")
            if isinstance(epsilon, Fraction | int | float) and event.dataset:
                self.epsilon_spent.labels(event.dataset).inc(float(epsilon))

    def rpc(self, method: str, code: str) -> None:
        """Count one RPC's end (``govshare.node.observability.rpc_metrics``)."""
        self.rpcs.labels(method.lstrip("/"), code).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
