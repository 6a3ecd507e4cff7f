"""Rendering of joint aggregate results for ``govshare query sql`` (the CLI only renders)."""

from __future__ import annotations

import json

import click

from govshare.node.analyst_aggregate import AggregateOutcome, Figure
from govshare.node.grants import format_epsilon


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
    return str(figure.value) + ("" if figure.interval is None else f" ±{figure.interval}")


def render_aggregate(outcome: AggregateOutcome, as_json: bool) -> None:
    """Print an aggregate outcome: a table (± the 95% noise interval) or JSON."""
    if as_json:
        click.echo(json.dumps(outcome_to_json(outcome), indent=2, ensure_ascii=False))
        return
    for group in outcome.groups:
        sums = "  ".join(f"SUM({c})={_cell(f)}" for c, f in group.sums.items())
        avgs = "  ".join(
            f"AVG({c})={'suppressed' if a is None else f'{float(a):.2f}'}"
            for c, a in group.averages.items()
        )
        click.echo(f"{group.label or '(all)'}: COUNT={_cell(group.count)}  {sums}  {avgs}")
    for node, budget in outcome.budgets.items():
        click.echo(
            f"{node}: ε spent {format_epsilon(budget.epsilon_spent)}, "
            f"remaining {format_epsilon(budget.epsilon_remaining)} (grant {budget.grant_id})"
        )
    click.echo(f"query {outcome.query_id}; groups under k={outcome.min_group_size} suppressed")
