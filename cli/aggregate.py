"""Rendering of joint aggregate results for ``govshare query sql`` (the CLI only renders), and
the aggregate options that command takes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from govshare.cli.common import console, err_console
from govshare.client.aggregate_defaults import DEFAULT_INTERSECTION_SCHEME
from govshare.model.aggregate_plan import INTERSECTION_SCHEMES
from govshare.model.epsilon import format_epsilon

if TYPE_CHECKING:
    # The aggregate client (grpc, sqlglot) loads only in the command that runs an aggregate.
    from govshare.client.analyst_aggregate import AggregateOutcome, Figure

scheme_option = click.option(
    "--scheme",
    type=click.Choice(INTERSECTION_SCHEMES),
    default=DEFAULT_INTERSECTION_SCHEME,
    show_default=True,
    help="Encryption of an intersection aggregate: BFV slots (bfv-simd) or one Paillier "
    "ciphertext per key (paillier).",
)


def _figure(figure: Figure, places: int = 0) -> dict[str, object]:
    """A figure for --json: ``value`` and ``interval95`` as summed (stored units); with
    ``places`` (a column kept at a scale) also ``amount``, the value in the declared unit."""
    out: dict[str, object] = {
        "value": figure.value,
        "noise_scale": None if figure.noise_scale is None else str(figure.noise_scale),
        "interval95": figure.interval,
    }
    if places:
        out["amount"] = None if figure.value is None else _decimal(figure.value, places)
    return out


def _decimal(value: int, places: int) -> str:
    """``value / 10^places`` as exact decimal text (12345, 2 -> "123.45")."""
    return f"{Decimal(value).scaleb(-places):f}"


def outcome_to_json(outcome: AggregateOutcome) -> dict[str, object]:
    return {
        "query_id": outcome.query_id,
        "kind": outcome.kind.value,
        "scheme": outcome.scheme,
        "epsilon": None if outcome.epsilon is None else format_epsilon(outcome.epsilon),
        "min_group_size": outcome.min_group_size,
        "units": dict(outcome.units),
        "unit_warning": outcome.unit_warning,
        "groups": [
            {
                "group": g.label,
                "suppressed": g.suppressed,
                "count": _figure(g.count),
                "sums": {c: _figure(f, outcome.units.get(c, 0)) for c, f in g.sums.items()},
                # In the column's declared unit.
                "averages": {
                    c: None if a is None else float(a / 10 ** outcome.units.get(c, 0))
                    for c, a in g.averages.items()
                },
            }
            for g in outcome.groups
        ],
        "budgets": {
            n: {
                "grant_id": b.grant_id,
                "epsilon_spent": format_epsilon(b.epsilon_spent),
                "epsilon_remaining": format_epsilon(b.epsilon_remaining),
            }
            for n, b in outcome.budgets.items()
        },
    }


def _cell(figure: Mapping[str, Any], places: int = 0) -> str:
    value, interval = figure.get("value"), figure.get("interval95")
    if value is None:
        return "suppressed"
    if places:  # in the declared unit, grouped: 1,575.00 ±3.20
        shown = f"{Decimal(value).scaleb(-places):,.{places}f}"
        spread = None if interval is None else f"{Decimal(interval).scaleb(-places):,.{places}f}"
        return shown + ("" if spread is None else f" ±{spread}")
    return f"{value:,}" + ("" if interval is None else f" ±{interval:,}")


def render_aggregate(outcome: AggregateOutcome, as_json: bool) -> None:
    """Print an aggregate outcome: a table (each figure ± its 95% noise interval) or JSON."""
    if as_json:
        click.echo(json.dumps(outcome_to_json(outcome), indent=2, ensure_ascii=False))
        return
    render_aggregate_json(outcome_to_json(outcome))


def render_aggregate_json(result: Mapping[str, Any]) -> None:
    """Print an aggregate result as :func:`outcome_to_json` gives it (live, or saved in the
    analyst's results store) as a table with its noise, suppression and budget lines."""
    groups: list[Mapping[str, Any]] = list(result.get("groups", []))
    columns = list(groups[0]["sums"]) if groups else []
    units: Mapping[str, int] = result.get("units") or {}
    table = Table(
        title=f"{result['kind']} ({result['scheme']}), query {result['query_id']}",
        header_style="bold",
    )
    table.add_column("group")
    table.add_column("COUNT(*)", justify="right")
    for column in columns:
        table.add_column(f"SUM({column})", justify="right")
        table.add_column(f"AVG({column})", justify="right")
    for group in groups:
        cells = [group["group"] or "(all)", _cell(group["count"])]
        for column in columns:
            average = group["averages"].get(column)
            cells += [
                _cell(group["sums"][column], units.get(column, 0)),
                "suppressed" if average is None else f"{float(average):,.2f}",
            ]
        table.add_row(*cells)
    console.print(table)
    first = groups[0] if groups else None
    if result.get("epsilon") is None or first is None:
        console.print("no DP noise: figures are exact")
    else:
        scales = [f"COUNT {first['count']['noise_scale']}"] + [
            f"SUM({c}) {f['noise_scale']}" for c, f in first["sums"].items()
        ]
        console.print(
            f"discrete Laplace noise, ε = {result['epsilon']}; scale per figure: "
            + ", ".join(scales)
            + "; ± is the 95% interval"
        )
    console.print(f"groups with a noisy count under k = {result['min_group_size']} are suppressed")
    if units:
        places = ", ".join(f"{c} to {p} decimal places" for c, p in units.items())
        console.print(
            f"sums and averages in each column's declared unit ({places})", soft_wrap=True
        )
    if result.get("unit_warning"):
        err_console.print(f"warning: {result['unit_warning']}")
    for node, budget in result.get("budgets", {}).items():
        console.print(
            f"{node}: ε spent {budget['epsilon_spent']}, "
            f"remaining {budget['epsilon_remaining']} (grant {budget['grant_id']})"
        )
