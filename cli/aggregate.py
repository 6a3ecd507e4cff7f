"""Rendering of joint aggregate results for ``govshare query sql`` (the CLI only renders)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from govshare.cli.common import console
from govshare.client.analyst_aggregate import AggregateOutcome, Figure
from govshare.model.epsilon import format_epsilon


def _figure(figure: Figure) -> dict[str, object]:
    return {
        "value": figure.value,
        "noise_scale": None if figure.noise_scale is None else str(figure.noise_scale),
        "interval95": figure.interval,
    }


def outcome_to_json(outcome: AggregateOutcome) -> dict[str, object]:
    return {
        "query_id": outcome.query_id,
        "kind": outcome.kind.value,
        "scheme": outcome.scheme,
        "epsilon": None if outcome.epsilon is None else format_epsilon(outcome.epsilon),
        "min_group_size": outcome.min_group_size,
        "groups": [
            {
                "group": g.label,
                "suppressed": g.suppressed,
                "count": _figure(g.count),
                "sums": {c: _figure(f) for c, f in g.sums.items()},
                "averages": {c: None if a is None else float(a) for c, a in g.averages.items()},
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


def _cell(figure: Figure) -> str:
    if figure.value is None:
        return "suppressed"
    return f"{figure.value:,}" + ("" if figure.interval is None else f" ±{figure.interval:,}")


def render_aggregate(outcome: AggregateOutcome, as_json: bool) -> None:
    """Print an aggregate outcome: a table (each figure ± its 95% noise interval) or JSON."""
    if as_json:
        click.echo(json.dumps(outcome_to_json(outcome), indent=2, ensure_ascii=False))
        return
    columns = next(iter(outcome.groups)).sums.keys() if outcome.groups else ()
    table = Table(
        title=f"{outcome.kind.value} ({outcome.scheme}), query {outcome.query_id}",
        header_style="bold",
    )
    table.add_column("group")
    table.add_column("COUNT(*)", justify="right")
    for column in columns:
        table.add_column(f"SUM({column})", justify="right")
        table.add_column(f"AVG({column})", justify="right")
    for group in outcome.groups:
        cells = [group.label or "(all)", _cell(group.count)]
        for column in columns:
            average = group.averages.get(column)
            cells += [
                _cell(group.sums[column]),
                "suppressed" if average is None else f"{float(average):,.2f}",
            ]
        table.add_row(*cells)
    console.print(table)
    first = next(iter(outcome.groups), None)
    if outcome.epsilon is None or first is None:
        console.print("no DP noise: figures are exact")
    else:
        scales = [f"COUNT {first.count.noise_scale}"] + [
            f"SUM({c}) {f.noise_scale}" for c, f in first.sums.items()
        ]
        console.print(
            f"discrete Laplace noise, ε = {format_epsilon(outcome.epsilon)}; scale per figure: "
            + ", ".join(scales)
            + "; ± is the 95% interval"
        )
    console.print(f"groups with a noisy count under k = {outcome.min_group_size} are suppressed")
    for node, budget in outcome.budgets.items():
        console.print(
            f"{node}: ε spent {format_epsilon(budget.epsilon_spent)}, "
            f"remaining {format_epsilon(budget.epsilon_remaining)} (grant {budget.grant_id})"
        )
