"""The analyst's aggregate defaults: what a query uses when the analyst names no other.

Kept apart from ``client/analyst_aggregate.py`` (which talks to nodes over gRPC and parses SQL)
so that ``govshare query`` can show them in its options without loading grpc or sqlglot;
tests/cli/test_cli_lazy.py checks it.
"""

from __future__ import annotations

from decimal import Decimal

from govshare.model.aggregate_plan import BFV_SIMD

# Clipping bound of a SUM written without one in SQL (its sensitivity under DP), in the
# column's declared unit (100,000 yuan for a column kept to 2 decimal places).
DEFAULT_SUM_BOUND = Decimal(100_000)
# The intersection aggregate's scheme unless the analyst picks one: bfv-simd measured well ahead
# of per-key Paillier in bench/aggregate.py (README, "Benchmarks").
DEFAULT_INTERSECTION_SCHEME = BFV_SIMD
