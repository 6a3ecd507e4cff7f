"""``govshare query``: the analyst asks joint queries and keeps their receipts."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.status import Status

from govshare.cli.aggregate import (
    outcome_to_json,
    render_aggregate,
    render_aggregate_json,
    scheme_option,
)
from govshare.cli.common import (
    console,
    emit_json,
    err_console,
    identity_option,
    json_option,
    render_table,
)
from govshare.client.aggregate_defaults import DEFAULT_SUM_BOUND
from govshare.client.results import ResultsStore, SavedResult, default_folder
from govshare.model.conditions import Condition
from govshare.model.epsilon import format_epsilon, parse_epsilon
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity
from govshare.model.query_plan import ECDH, ENGINES, PsiPlan, Side
from govshare.protocols.receipt import Receipt, encode_receipt

if TYPE_CHECKING:
    # The clients that talk to nodes (grpc) and parse SQL (sqlglot) load in the commands that
    # ask a query: '--help', 'query result' and 'query results' start without them.
    from govshare.client.analyst import PsiOutcome, StatusCallback

_purpose = click.option(
    "--purpose", required=True, help="Why you ask; must match the purpose of your grants."
)
_receipt = click.option(
    "--receipt",
    "receipt_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to save the receipt [default: receipt-<query id>.json].",
)
_epsilon = click.option(
    "--epsilon",
    default="1",
    show_default=True,
    help="DP budget ε the released statistic spends (noise on by default).",
)
_exact = click.option(
    "--exact",
    is_flag=True,
    help="Ask for an exact release instead of noise: every operator must approve it, and "
    "GROUP BY is refused.",
)
_approval_timeout = click.option(
    "--approval-timeout",
    default=600.0,
    show_default=True,
    help="Seconds to wait for operators' approvals.",
)


_results = click.option(
    "--results",
    "results_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of your saved results [default: results/ in your identity bundle].",
)


@click.group("query")
def group() -> None:
    """Ask joint queries across departments (analyst).

    Every released result is saved in your results folder the moment it arrives, before it is
    printed or its receipt written: 'govshare query result ID' shows it again.
    """


def _store(identity: Path, results_dir: Path | None) -> ResultsStore:
    return ResultsStore(results_dir or default_folder(identity))


def _keep(
    store: ResultsStore,
    *,
    query_id: str,
    kind: str,
    body: Mapping[str, Any],
    result: Mapping[str, Any],
    receipt: Receipt | None,
) -> Path | None:
    """Save a released result first of all; a failure to save is said, never fatal (the
    result is still printed and its receipt written)."""
    sql = body.get("sql")
    plan = {k: v for k, v in body.items() if k != "sql"}
    try:
        return store.save(
            query_id, kind=kind, plan=plan, result=result, receipt=receipt,
            sql=sql if isinstance(sql, str) else None,
        )  # fmt: skip
    except OSError as exc:
        err_console.print(
            f"warning: the result could not be saved in {store.folder}: {exc.strerror or exc}"
        )
        return None


def _column_ref(text: str, option: str) -> tuple[str, str, str]:
    parts = text.split(".")
    if len(parts) != 3 or not all(parts):
        raise click.BadParameter("expected NODE.DATASET.COLUMN", param_hint=option)
    return parts[0], parts[1], parts[2]


def _run(
    identity: Path, plan: PsiPlan, approval_timeout: float, as_json: bool, sql: str | None = None
) -> PsiOutcome:
    from govshare.client.analyst import run_psi

    me = Identity.load(identity)
    if as_json:
        return run_psi(me, plan, approval_timeout=approval_timeout, sql=sql)
    with Status("submitting the signed query", console=err_console) as status:
        return run_psi(
            me, plan, on_status=_status_printer(status), approval_timeout=approval_timeout,
            sql=sql,
        )  # fmt: skip


def _status_printer(status: Status) -> StatusCallback:
    def on_status(node: str, state: str, message: str) -> None:
        err_console.print(f"  {node}: {state} — {message}")
        status.update(f"{node}: {state}")

    return on_status


def _check_receipt_path(path: Path | None) -> None:
    """Refuse, before anything is submitted, a receipt path that cannot be written: a released
    result (and the budget it spent) must never be lost to a typo in a folder name."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise click.BadParameter(f"folder {str(folder)!r} does not exist", param_hint="--receipt")
    if path.is_dir() or not os.access(folder, os.W_OK):
        raise click.BadParameter(f"{str(path)!r} cannot be written", param_hint="--receipt")


def _save_receipt(query_id: str, receipt: Receipt, path: Path | None) -> tuple[Path, str | None]:
    """Save the receipt; (its path, None), or (the path, why it could not be saved)."""
    target = path or Path(f"receipt-{query_id}.json")
    try:
        target.write_bytes(encode_receipt(receipt))
    except OSError as exc:
        return target, f"the receipt could not be saved to {target}: {exc.strerror or exc}"
    return target, None


# A SUM bound as written: plain decimal notation (no sign, exponent or separators), short.
_BOUND = re.compile(r"^[0-9]{1,24}(?:\.[0-9]{1,24})?$")


def _sum_bound(ctx: click.Context, param: click.Parameter, value: str) -> Decimal:
    """``--sum-bound`` as an exact Decimal in the SUM column's declared unit; the client checks
    it against the column's scale (``stored_bound``) once the catalogue told it."""
    if not _BOUND.match(value) or Decimal(value) <= 0:
        raise click.BadParameter(
            f"{value!r} is not a positive decimal number (e.g. 5000 or 5000.50)"
        )
    return Decimal(value)


def _release(epsilon: str, exact: bool) -> tuple[Fraction | None, bool]:
    """(ε, exact) of a statistic: noise by default, exact only when asked."""
    return (None, True) if exact else (parse_epsilon(epsilon), False)


def _nodes(receipt: Receipt) -> str:
    return ", ".join(dict.fromkeys(p.node for p in receipt.parts))


def _psi_result(outcome: PsiOutcome, recipient: str | None) -> dict[str, Any]:
    """A PSI's result as ``--json`` prints it (and the results store keeps it)."""
    result: dict[str, Any] = {
        "query_id": outcome.query_id,
        "kind": outcome.kind.value,
    }
    noise: dict[str, Any] = {"exact": outcome.epsilon is None}
    if outcome.epsilon is not None and outcome.interval is not None:
        noise.update(epsilon=format_epsilon(outcome.epsilon), interval_95=list(outcome.interval))
    if outcome.kind is QueryKind.PSI_CARDINALITY:
        result.update(count=outcome.count, set_sizes=outcome.sizes, **noise)
    else:
        result.update(count=outcome.count, members=list(outcome.records), kept_by=recipient)
        if recipient is not None:
            result.update(noise)
    return result


def _how(result: Mapping[str, Any]) -> str:
    """How a released count was protected, in words."""
    if result.get("epsilon") is None or result.get("interval_95") is None:
        return "(exact release, approved by every operator)"
    low, high = result["interval_95"]
    return f"(DP noise, ε {result['epsilon']} spent; 95% interval {low:,} to {high:,})"


def _print_psi(result: Mapping[str, Any]) -> None:
    """Print a PSI result (live, or saved) from its JSON form."""
    how, count, recipient = _how(result), result["count"], result.get("kept_by")
    if result["kind"] == QueryKind.PSI_CARDINALITY.value:
        sizes = ", ".join(f"{node} {size:,}" for node, size in result["set_sizes"].items())
        sign = "=" if result.get("exact") else "≈"
        console.print(f"[bold]|intersection| {sign} {count:,}[/]  {how}")
        estimated = " (estimated)" if result.get("epsilon") else ""
        console.print(f"  set sizes{estimated}: {sizes}")
    elif recipient is not None:
        console.print(
            f"[bold]about {count:,} of {recipient}'s keys match[/] {how}; {recipient} "
            f"keeps which (its operator: govshare node results {result['query_id']})"
        )
    else:
        console.print(f"[bold]{count:,} matching records[/] (masked):")
        for record in result["members"]:
            console.print(f"  {record}")


def _report(
    outcome: PsiOutcome,
    receipt_path: Path | None,
    as_json: bool,
    store: ResultsStore,
    recipient: str | None = None,
) -> None:
    result = _psi_result(outcome, recipient)
    _finish(
        outcome.query_id, outcome.kind.value, outcome.body, result, lambda: _print_psi(result),
        outcome.receipt, outcome.receipt_error, receipt_path, as_json, store,
    )  # fmt: skip


def _finish(
    query_id: str,
    kind: str,
    body: Mapping[str, Any],
    result: dict[str, Any],
    show: Callable[[], None],
    receipt: Receipt | None,
    receipt_error: str | None,
    receipt_path: Path | None,
    as_json: bool,
    store: ResultsStore,
) -> None:
    """A released result: kept, then shown, then its receipt saved. A receipt that could not
    be fetched, did not verify or could not be saved is said after the result (exit 1)."""
    result = result | {"receipt_verified": receipt is not None}
    if receipt_error is not None:
        result["receipt_error"] = receipt_error  # kept with the result: 'query result' says it
    kept = _keep(
        store, query_id=query_id, kind=kind, body=body, result=result, receipt=receipt
    )  # fmt: skip
    path: Path | None = None
    problem = receipt_error
    if receipt is not None:
        path, problem = _save_receipt(query_id, receipt, receipt_path)
    if as_json:
        emit_json(
            result
            | {"receipt": None if problem or path is None else str(path),
               "receipt_error": problem, "saved": None if kept is None else str(kept)}
        )  # fmt: skip
        if problem:
            raise SystemExit(1)
        return
    show()
    console.print(f"query {query_id}")
    _kept_line(query_id, kept)
    if problem is None and receipt is not None and path is not None:
        console.print(f"receipt from {_nodes(receipt)} verified and saved to {path}")
        return
    err_console.print(f"error: the result is shown above and kept; {problem}")
    raise SystemExit(1)


def _kept_line(query_id: str, kept: Path | None) -> None:
    if kept is not None:
        console.print(f"result kept in {kept} (govshare query result {query_id[:12]})")


@group.command("psi")
@identity_option
@click.option("--left", required=True, help="NODE.DATASET.COLUMN of the first join key.")
@click.option("--right", required=True, help="NODE.DATASET.COLUMN of the second join key.")
@click.option(
    "--where",
    "filters",
    multiple=True,
    help="A filter run at its node: \"NODE.DATASET.COLUMN = 'value'\" (repeatable).",
)
@click.option(
    "--reveal",
    type=click.Choice(["count", "members"]),
    default="count",
    show_default=True,
    help="count: |left ∩ right| only; members: the left side's matching keys, masked "
    "(or, with --to, kept by that node).",
)
@click.option(
    "--to",
    "recipient",
    default=None,
    help="With --reveal members: the node (left or right) that learns which of its own keys "
    "match; you learn only how many.",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=ECDH,
    show_default=True,
    help="With --reveal members: the PSI engine, signed with the query. rr22: SecretFlow's "
    "OT-extension PSI, where both nodes offer it ([engines] in node.toml).",
)
@_purpose
@_epsilon
@_exact
@_receipt
@_approval_timeout
@_results
@json_option
def psi(
    identity: Path,
    left: str,
    right: str,
    filters: tuple[str, ...],
    reveal: str,
    recipient: str | None,
    engine: str,
    purpose: str,
    epsilon: str,
    exact: bool,
    receipt_path: Path | None,
    approval_timeout: float,
    results_dir: Path | None,
    as_json: bool,
) -> None:
    """Private set intersection between two departments' datasets."""
    from govshare.client.sql import parse_filter

    _check_receipt_path(receipt_path)
    sides = [_column_ref(left, "--left"), _column_ref(right, "--right")]
    where: dict[tuple[str, str], list[Condition]] = {(n, d): [] for n, d, _ in sides}
    for text in filters:
        node, dataset, condition = parse_filter(text)
        if (node, dataset) not in where:
            raise click.BadParameter(
                f"{node}.{dataset} is neither --left nor --right", param_hint="--where"
            )
        where[(node, dataset)].append(condition)
    # A count is a statistic (noised, or exact); members released to you are records.
    noise, exact_release = (
        _release(epsilon, exact) if reveal == "count" or recipient else (None, False)
    )
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY if reveal == "count" else QueryKind.PSI_MEMBERSHIP,
        purpose=purpose,
        left=Side(*sides[0], tuple(where[sides[0][:2]])),
        right=Side(*sides[1], tuple(where[sides[1][:2]])),
        recipient=recipient,
        epsilon=noise,
        exact=exact_release,
        engine=engine,
    )
    if engine != ECDH and reveal != "members":
        raise click.BadParameter(
            f"{engine} serves --reveal members only (its receiver learns the intersection)",
            param_hint="--engine",
        )
    if recipient is not None and (reveal != "members" or recipient not in plan.nodes):
        raise click.BadParameter(
            "--to names the --left or --right node, with --reveal members", param_hint="--to"
        )
    store = _store(identity, results_dir)
    outcome = _run(identity, plan, approval_timeout, as_json)
    _report(outcome, receipt_path, as_json, store, recipient)


@group.command("sql")
@identity_option
@click.argument("statement")
@_purpose
@_epsilon
@_exact
@click.option(
    "--sum-bound",
    default=str(DEFAULT_SUM_BOUND),
    callback=_sum_bound,
    show_default=True,
    help="Each SUM clips every value to [0, bound] (its DP sensitivity), in the column's "
    "declared unit: 5000 is 5,000 yuan for a column kept to 2 decimal places (catalog show "
    "says), and may have as many decimals as the column keeps.",
)
@scheme_option
@_receipt
@_approval_timeout
@_results
@json_option
def sql(
    identity: Path,
    statement: str,
    purpose: str,
    epsilon: str,
    exact: bool,
    sum_bound: Decimal,
    scheme: str,
    receipt_path: Path | None,
    approval_timeout: float,
    results_dir: Path | None,
    as_json: bool,
) -> None:
    """A joint query in govshare's SQL dialect.

    \b
    Intersection cardinality:
      SELECT COUNT(*) FROM civil.assistance a JOIN tax.residents t
      ON a.id_number = t.id_number WHERE t.income_band = 'high'
    Intersection aggregate:
      SELECT a.district, COUNT(*), SUM(a.amount), AVG(a.amount) FROM civil.assistance a
      JOIN tax.residents t ON a.id_number = t.id_number
      WHERE t.income_band = 'high' GROUP BY a.district
    Horizontal aggregate over several nodes:
      SELECT h.age_band, COUNT(*), SUM(h.visits) FROM (SELECT * FROM health.clinic_visits
      UNION ALL SELECT * FROM health_north.clinic_visits) AS h GROUP BY h.age_band
    """
    from govshare.client.analyst_aggregate import run_aggregate_sql
    from govshare.client.sql import JoinQuery, parse_query

    _check_receipt_path(receipt_path)
    store = _store(identity, results_dir)
    query = parse_query(statement)
    budget, exact_release = _release(epsilon, exact)
    if isinstance(query, JoinQuery) and query.is_count_star:
        plan = replace(query.psi_plan(purpose), epsilon=budget, exact=exact_release)
        counted = _run(identity, plan, approval_timeout, as_json, sql=statement)
        _report(counted, receipt_path, as_json, store)
        return
    me = Identity.load(identity)
    if as_json:
        outcome = run_aggregate_sql(
            me, statement, purpose, budget, exact=exact_release, sum_bound=sum_bound,
            scheme=scheme, approval_timeout=approval_timeout,
        )  # fmt: skip
    else:
        with Status("submitting the signed query", console=err_console) as status:
            outcome = run_aggregate_sql(
                me, statement, purpose, budget, exact=exact_release, sum_bound=sum_bound,
                scheme=scheme, on_status=_status_printer(status),
                approval_timeout=approval_timeout,
            )  # fmt: skip
    result = outcome_to_json(outcome)
    _finish(
        outcome.query_id, outcome.kind.value, outcome.body, result,
        lambda: render_aggregate(outcome, as_json=False), outcome.receipt,
        outcome.receipt_error, receipt_path, as_json, store,
    )  # fmt: skip


@group.command("result")
@identity_option
@click.argument("query_id")
@_results
@click.option(
    "--receipt",
    "receipt_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the saved receipt to this file.",
)
@json_option
def result(
    identity: Path, query_id: str, results_dir: Path | None, receipt_path: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Show an earlier result again from your results folder (a unique id prefix will do)."""
    _check_receipt_path(receipt_path)
    saved = _store(identity, results_dir).get(query_id)
    if as_json:
        emit_json(saved.to_json())
    elif saved.kind in (QueryKind.PSI_CARDINALITY.value, QueryKind.PSI_MEMBERSHIP.value):
        _print_psi(saved.result)
    else:
        render_aggregate_json(saved.result)
    if not as_json:
        console.print(f"query {saved.query_id} ({saved.kind}), saved {_utc(saved.saved_at)} UTC")
        if saved.sql is not None:
            click.echo(f"sql: {saved.sql}")  # whole, never wrapped: it may be copied
        receipt = "verified when received" if saved.receipt is not None else "none saved"
        why = saved.result.get("receipt_error")
        console.print(f"receipt: {receipt}" + (f" ({why})" if why else ""))
    if receipt_path is not None and saved.receipt is not None:
        receipt_path.write_bytes(encode_receipt(saved.receipt))
        err_console.print(f"receipt written to {receipt_path}")


def _summary(saved: SavedResult) -> str:
    """A result in a few words for the listing."""
    result = saved.result
    if "count" in result:
        sign = "=" if result.get("exact") else "≈"
        if result.get("members") and result.get("kept_by") is None:
            return f"{result['count']:,} records"
        return f"count {sign} {result['count']:,}"
    groups = result.get("groups", [])
    shown = sum(1 for g in groups if not g.get("suppressed"))
    return f"{len(groups)} groups ({shown} released)"


@group.command("results")
@identity_option
@_results
@json_option
def results(identity: Path, results_dir: Path | None, as_json: bool) -> None:
    """List your saved results, oldest first (ids whole; tab-separated when piped)."""
    saved = _store(identity, results_dir).saved()
    if as_json:
        emit_json([s.to_json() for s in saved])
        return
    if not saved and console.is_terminal:
        console.print("no saved results")
        return
    render_table(
        "saved results (govshare query result ID)",
        ["query", "kind", "saved (UTC)", "result", "receipt"],
        (
            (
                s.query_id,
                s.kind,
                _utc(s.saved_at),
                _summary(s),
                "verified" if s.receipt is not None else "-",
            )
            for s in saved
        ),
        whole=["query"],
        plain_when_piped=True,
    )


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")
