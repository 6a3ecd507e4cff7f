"""``govshare audit``: the auditor pulls, verifies and proves the nodes' signed audit logs.

Parsing and rendering only; the work is :mod:`govshare.client.auditor`. Every command that checks
something exits with code 1 when a check fails, after printing one verdict line per node.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.markup import escape

from govshare.cli.common import console, emit_json, identity_option, json_option, render_table
from govshare.client.auditor import (
    DEFAULT_SAMPLE,
    DEFAULT_STATE,
    Auditor,
    ProblemType,
    Verdict,
    quorum_text,
    refusal_summary,
    verify_receipt,
)
from govshare.client.auditor import (
    verify_export as verify_export_bundle,  # the command below is named verify_export
)
from govshare.client.report import assess, summary_text, write_html
from govshare.client.risk import PulledLogs
from govshare.model.identity import CA_CERT, Identity
from govshare.model.reconcile import QueryReconciliation
from govshare.model.risk import RULES, Alert, Severity
from govshare.protocols.errors import MalformedInput, NotFound, VerificationFailed

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1


def state_option(func: F) -> F:
    """``--state``: the auditor's state folder (default ``$GOVSHARE_AUDIT_STATE`` or
    ``./audit-state``)."""
    return click.option(
        "--state",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: Path(os.environ.get("GOVSHARE_AUDIT_STATE", str(DEFAULT_STATE))),
        show_default=f"$GOVSHARE_AUDIT_STATE or ./{DEFAULT_STATE}",
        help="The auditor's state folder: pulled entries and last verified checkpoints.",
    )(func)


def quorum_option(func: F) -> F:
    """``--quorum``: witness cosignatures a node's checkpoint needs."""
    return click.option(
        "--quorum",
        type=click.IntRange(min=0),
        default=None,
        help="Valid witness cosignatures a checkpoint needs "
        "[default: a strict majority of the other nodes].",
    )(func)


def _auditor(
    identity: Path, state: Path, *, quorum: int | None = None, sample: int = DEFAULT_SAMPLE
) -> Auditor:
    return Auditor(Identity.load(identity), state, quorum=quorum, sample=sample)


def verdict_line(verdict: Verdict) -> str:
    """One line: ``tax: OK — 1,234 entries, checkpoint 1234 signed, 1/1 cosignatures valid``."""
    if not verdict.ok:
        problem = verdict.problems[0]
        more = len(verdict.problems) - 1
        extra = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
        return f"{verdict.node}: FAILED — {problem.message}{extra}"
    valid = len(verdict.cosignatures_valid)
    present = valid + len(verdict.cosignatures_invalid)
    new = f" ({verdict.fetched:,} new)" if verdict.action == "pull" else ""
    rechecked = (
        f", {verdict.rechecked:,} held entries re-fetched unchanged" if verdict.rechecked else ""
    )
    return (
        f"{verdict.node}: OK — {verdict.entries:,} entries{new}, checkpoint "
        f"{verdict.checkpoint_size} signed, {valid}/{present} cosignatures valid "
        f"({quorum_text(verdict.quorum, verdict.witnesses)}){rechecked}"
    )


def refusal_line(verdict: Verdict) -> str | None:
    """The witnesses' refusals of the node's checkpoints, when the verdict line does not
    already show them."""
    first = verdict.first_problem
    if not verdict.refusals or (first and first.kind is ProblemType.WITNESS_REFUSED):
        return None
    return f"{verdict.node}: {refusal_summary(verdict.node, verdict.refusals)}"


def _report(verdicts: Sequence[Verdict], as_json: bool) -> None:
    ok = all(v.ok for v in verdicts)
    if as_json:
        emit_json({"ok": ok, "verdicts": [v.to_json() for v in verdicts]})
    else:
        for verdict in verdicts:
            click.echo(verdict_line(verdict))  # plain echo: one line, never wrapped
            refused = refusal_line(verdict)
            if refused is not None:
                click.echo(refused)
    if not ok:
        _fail()


def _fail() -> NoReturn:
    # SystemExit, not ctx.exit(): govshare's main() runs click with standalone_mode=False,
    # where click returns ctx.exit()'s code instead of exiting with it.
    sys.exit(EXIT_FAILED)


def _targets(
    auditor: Auditor, node: str | None, all_nodes: bool, *, default_all: bool
) -> list[str]:
    if node and all_nodes:
        raise click.UsageError("give NODE or --all, not both")
    if node:
        return [node]
    if all_nodes or default_all:
        return auditor.nodes()
    raise click.UsageError("give NODE or --all")


@click.group("audit")
def group() -> None:
    """Pull, verify and prove the nodes' signed audit logs (auditor)."""


@group.command("pull")
@identity_option
@state_option
@click.argument("node", required=False)
@click.option("--all", "all_nodes", is_flag=True, help="Every node in the roster.")
@click.option(
    "--recheck", is_flag=True, help="Also re-read all the entries already held and compare them."
)
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=DEFAULT_SAMPLE,
    show_default=True,
    help="Entries already held to re-fetch at random and compare (0: none).",
)
@quorum_option
@json_option
def pull(
    identity: Path,
    state: Path,
    node: str | None,
    all_nodes: bool,
    recheck: bool,
    sample: int,
    quorum: int | None,
    as_json: bool,
) -> None:
    """Fetch a node's latest checkpoint and new entries; keep them only if they verify."""
    auditor = _auditor(identity, state, quorum=quorum, sample=sample)
    targets = _targets(auditor, node, all_nodes, default_all=False)
    _report(auditor.pull_all(targets, recheck=recheck), as_json)


@group.command("verify")
@identity_option
@state_option
@click.argument("node", required=False)
@click.option("--all", "all_nodes", is_flag=True, help="Every node in the roster (the default).")
@quorum_option
@json_option
def verify(
    identity: Path,
    state: Path,
    node: str | None,
    all_nodes: bool,
    quorum: int | None,
    as_json: bool,
) -> None:
    """Verify the pulled copies from scratch, offline: entries, checkpoints, cosignatures."""
    auditor = _auditor(identity, state, quorum=quorum)
    targets = _targets(auditor, node, all_nodes, default_all=True)
    _report(auditor.verify_all(targets), as_json)


@group.command("prove")
@identity_option
@state_option
@click.argument("node")
@click.argument("index", type=click.IntRange(min=0))
@json_option
def prove(identity: Path, state: Path, node: str, index: int, as_json: bool) -> None:
    """Prove that entry INDEX is in NODE's log under its latest signed checkpoint."""
    result = _auditor(identity, state).prove(node, index)
    entry = result.decoded
    if as_json:
        emit_json(
            {
                "node": node,
                "index": index,
                "entry": json.loads(result.entry),
                "proof": [h.hex() for h in result.proof],
                "checkpoint": {
                    "size": result.checkpoint.size,
                    "root": result.checkpoint.root.hex(),
                    "note": result.note.decode("utf-8"),
                },
                "verified": True,
            }
        )
        return
    render_table(
        f"{node} entry {index} — included under checkpoint {result.checkpoint.size}",
        ("field", "value"),
        [
            ("kind", entry.kind),
            ("actor", entry.actor),
            ("query", entry.query_id or ""),
            ("time (unix ms)", entry.time_ms),
            ("fields", json.dumps(json.loads(result.entry)["fields"], sort_keys=True)),
            ("checkpoint root", result.checkpoint.root.hex()),
            ("proof", "\n".join(h.hex() for h in result.proof) or "(empty: a one-entry tree)"),
        ],
    )
    click.echo(f"{node}: entry {index} inclusion proof verified")


def _query_json(view: QueryReconciliation) -> dict[str, Any]:
    return {
        "query_id": view.query_id,
        "agree": view.ok,
        "disagreements": list(view.disagreements),
        "nodes": [
            {
                "node": n.node,
                "error": n.error,
                "entries": [
                    {"index": e.index, "kind": e.kind, "actor": e.actor} for e in n.entries
                ],
                "request_digest": list(n.request_digest),
                "participants": [list(p) for p in n.participants],
                "result_digest": list(n.result_digest),
            }
            for n in view.nodes
        ],
    }


@group.command("show")
@identity_option
@state_option
@click.option("--query", "query_id", required=True, help="The query id to reconcile.")
@json_option
def show(identity: Path, state: Path, query_id: str, as_json: bool) -> None:
    """Show one query's entries from every node side by side, and whether they agree."""
    view = _auditor(identity, state).show_query(query_id)
    if as_json:
        emit_json(_query_json(view))
    else:
        render_table(
            f"query {query_id}",
            ("node", "entries", "request digest", "participants", "result digest"),
            [
                (
                    n.node,
                    n.error or "\n".join(f"#{e.index} {e.kind}" for e in n.entries) or "—",
                    "\n".join(d[:16] for d in n.request_digest),
                    "\n".join(",".join(p) for p in n.participants),
                    "\n".join(d[:16] for d in n.result_digest),
                )
                for n in view.nodes
            ],
        )
        if view.ok:
            click.echo(f"query {query_id}: nodes agree")
        for issue in view.disagreements:
            click.echo(f"query {query_id}: DISAGREE — {issue}")
    if not view.ok:
        _fail()


@group.command("export")
@identity_option
@state_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def export(identity: Path, state: Path, file: Path, as_json: bool) -> None:
    """Write the verified copies and the signed roster to FILE for offline verification."""
    nodes = _auditor(identity, state).export(file)
    if as_json:
        emit_json({"file": str(file), "nodes": nodes})
    else:
        click.echo(f"exported {len(nodes)} node log(s) to {file}: {', '.join(nodes) or 'none'}")


@group.command("verify-export")
@identity_option
@state_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The federation CA certificate to trust [default: ca.crt in the --identity folder].",
)
@quorum_option
@json_option
def verify_export(
    identity: Path, state: Path, file: Path, ca: Path | None, quorum: int | None, as_json: bool
) -> None:
    """Verify an export bundle offline, against your own federation CA certificate.

    Needs no private key and no network: only the CA certificate (--ca, or the ca.crt of the
    --identity folder), never the bundle's own.
    """
    ca_file = ca or identity / CA_CERT
    if not ca_file.is_file():
        raise NotFound(f"no federation CA certificate at {ca_file}; pass --ca or --identity")
    verdicts = verify_export_bundle(file, ca_cert_pem=ca_file.read_bytes(), quorum=quorum)
    if not verdicts:
        raise MalformedInput(f"{file} holds no node logs")
    _report(verdicts, as_json)


@group.command("verify-receipt")
@identity_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@quorum_option
@json_option
def verify_receipt_(identity: Path, file: Path, quorum: int | None, as_json: bool) -> None:
    """Verify a query receipt: every node's entry, inclusion proof, signed checkpoint and its
    witness cosignatures."""
    roster = Identity.load(identity).roster
    try:
        parts = verify_receipt(file.read_bytes(), roster, quorum=quorum)
    except VerificationFailed as exc:
        if as_json:
            emit_json({"ok": False, "error": str(exc)})
        else:
            click.echo(f"receipt {file}: FAILED — {exc}")
        _fail()
    query_id = parts[0].entry.query_id
    if as_json:
        emit_json(
            {
                "ok": True,
                "query_id": query_id,
                "parts": [
                    {
                        "node": p.node,
                        "index": p.index,
                        "kind": p.entry.kind,
                        "checkpoint_size": p.checkpoint.size,
                        "cosignatures_valid": list(p.cosignatures_valid),
                        "quorum": p.quorum,
                        "witnesses": p.witnesses,
                    }
                    for p in parts
                ],
            }
        )
        return
    listed = ", ".join(
        f"{p.node} entry {p.index} (checkpoint {p.checkpoint.size}, "
        f"cosigned by {', '.join(p.cosignatures_valid) or 'no witness'}; "
        f"{quorum_text(p.quorum, p.witnesses)})"
        for p in parts
    )
    click.echo(f"receipt for query {query_id}: OK — {listed}")
    console.print(f"{len(parts)} part(s) verified against the roster's node keys")


# --- risk monitoring --------------------------------------------------------------------------

EXIT_HIGH = 2  # audit check: at least one HIGH alert
EXIT_INTERRUPTED = 130  # audit check --watch stopped with Ctrl-C (128 + SIGINT)
ENTRIES_SHOWN = 6  # entry indices listed per alert in the table
_DURATION = re.compile(r"^(\d+)([mhd])$")
_DURATION_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SEVERITY_STYLE = {Severity.HIGH: "bold red", Severity.MEDIUM: "yellow", Severity.LOW: "dim"}


def parse_since(text: str, *, now_ms: int) -> int:
    """``--since``: a UTC date or date and time (``2025-06-01``, ``2025-06-01T08:00``) or a
    duration back from ``now_ms`` (``30m``, ``24h``, ``7d``); unix ms."""
    duration = _DURATION.match(text.strip())
    if duration:
        return now_ms - int(duration.group(1)) * _DURATION_MS[duration.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a date (2025-06-01, 2025-06-01T08:00) nor a duration "
            "(30m, 24h, 7d)",
            param_hint="--since",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _entries_cell(alert: Alert) -> str:
    refs = [f"#{e.index}" if e.node == alert.node else f"{e.node}#{e.index}" for e in alert.entries]
    more = len(refs) - ENTRIES_SHOWN
    return " ".join(refs[:ENTRIES_SHOWN]) + (f" … (+{more})" if more > 0 else "")


def _alerts_table(title: str, alerts: Sequence[Alert]) -> None:
    render_table(
        title,
        ("severity", "node", "rule", "entries", "detail"),
        (
            (
                f"[{_SEVERITY_STYLE[a.severity]}]{a.severity.value}[/]",
                escape(a.node),
                escape(a.rule),
                escape(_entries_cell(a)),
                escape(a.detail),
            )
            for a in alerts
        ),
    )


def _counts(alerts: Sequence[Alert]) -> str:
    return ", ".join(
        f"{sum(a.severity is s for a in alerts)} {s.value}"
        for s in (Severity.HIGH, Severity.MEDIUM, Severity.LOW)
    )


@group.command("check")
@identity_option
@state_option
@click.argument("node", required=False)
@click.option("--all", "all_nodes", is_flag=True, help="Every node in the roster (the default).")
@click.option(
    "--since",
    metavar="DATE",
    help="Only alerts from DATE on: a UTC date or time (2025-06-01, 2025-06-01T08:00) or a "
    "duration back from now (30m, 24h, 7d). The rules still read the whole logs.",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Pull, check and print the new alerts every SECONDS, until Ctrl-C (exit 130).",
)
@click.option("--iterations", type=click.IntRange(min=1), hidden=True)
@click.option("--rules", "list_rules", is_flag=True, help="List the rules and exit.")
@json_option
def check(
    identity: Path,
    state: Path,
    node: str | None,
    all_nodes: bool,
    since: str | None,
    watch: float | None,
    iterations: int | None,
    list_rules: bool,
    as_json: bool,
) -> None:
    """Run the risk rules over the pulled, verified logs; exit 2 when an alert is HIGH.

    Without --watch, checks what 'govshare audit pull' fetched; with --watch, pulls first,
    each round. --rules lists every rule, its severities and what it catches.
    """
    if list_rules:
        _print_rules(as_json)
        return
    auditor = _auditor(identity, state)
    targets = _targets(auditor, node, all_nodes, default_all=True)
    logs = PulledLogs(state, targets)

    def since_ms() -> int | None:
        return None if since is None else parse_since(since, now_ms=time.time_ns() // 1_000_000)

    since_ms()  # a malformed --since fails before any work
    if watch is None:
        held = logs.held()
        if node is not None and not held:
            raise NotFound(f"nothing pulled from {node} yet; run 'govshare audit pull {node}'")
        alerts = logs.update(since_ms=since_ms())
        if as_json:
            emit_json([a.to_json() for a in alerts])
        else:
            _print_check(alerts, held, [n for n in targets if n not in held])
        if any(a.severity is Severity.HIGH for a in alerts):
            sys.exit(EXIT_HIGH)
        return
    try:
        high = _watch(auditor, logs, targets, watch, iterations, since_ms, as_json)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    if high:
        sys.exit(EXIT_HIGH)


def _print_rules(as_json: bool) -> None:
    rules = [
        {
            "rule": r.name,
            "severities": [s.value for s in r.severities],
            "scope": r.scope.value,
            "catches": r.description,
        }
        for r in RULES.values()
    ]
    if as_json:
        emit_json(rules)
        return
    render_table(
        "risk rules (scope log: a node also runs it on its own log)",
        ("rule", "severity", "scope", "catches"),
        (
            (r["rule"], "/".join(r["severities"]), r["scope"], escape(str(r["catches"])))
            for r in rules
        ),
    )


def _print_check(alerts: Sequence[Alert], held: Sequence[str], missing: Sequence[str]) -> None:
    scope = f"{len(held)} node log(s): {', '.join(held) or 'none'}"
    if alerts:
        _alerts_table(f"risk alerts over {scope}", alerts)
    click.echo(f"audit check: {_counts(alerts)} over {scope}")
    for name in missing:
        click.echo(f"{name}: not pulled; run 'govshare audit pull {name}'")


def _watch(
    auditor: Auditor,
    logs: PulledLogs,
    targets: Sequence[str],
    seconds: float,
    iterations: int | None,
    since_ms: Callable[[], int | None],
    as_json: bool,
) -> bool:
    """Pull, check, print the new alerts; every ``seconds``. Returns whether any was HIGH."""
    seen: set[str] = set()
    lines: dict[str, str] = {}
    high = False
    round_ = 0
    while iterations is None or round_ < iterations:
        if round_:
            time.sleep(seconds)
        round_ += 1
        for verdict in (auditor.pull(name) for name in targets):
            line = verdict_line(verdict)
            if not verdict.ok and lines.get(verdict.node) != line:
                click.echo(line, err=as_json)  # JSON lines on stdout stay alerts only
            lines[verdict.node] = line
        new = [a for a in logs.update(since_ms=since_ms()) if a.key not in seen]
        seen.update(a.key for a in new)
        high = high or any(a.severity is Severity.HIGH for a in new)
        if as_json:
            for alert in new:  # one JSON object a line, as they come
                click.echo(json.dumps(alert.to_json(), sort_keys=True, ensure_ascii=False))
        elif new:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            _alerts_table(f"{stamp} UTC — {len(new)} new alert(s): {_counts(new)}", new)
        sys.stdout.flush()
    return high


# --- periodic assessment ----------------------------------------------------------------------


@group.command("report")
@identity_option
@state_option
@click.argument("nodes", nargs=-1)
@click.option("--all", "all_nodes", is_flag=True, help="Every node in the roster (the default).")
@click.option(
    "--since",
    metavar="DATE",
    help="Only what happened from DATE on: a UTC date or time (2025-06-01, 2025-06-01T08:00) or "
    "a duration back from now (30m, 24h, 7d) [default: the start of the logs].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report to this file as one self-contained HTML page.",
)
@quorum_option
@json_option
def report(
    identity: Path,
    state: Path,
    nodes: tuple[str, ...],
    all_nodes: bool,
    since: str | None,
    out: Path | None,
    quorum: int | None,
    as_json: bool,
) -> None:
    """Write the periodic security assessment (安全评估报告) of the pulled logs: per node,
    dataset and analyst, queries, releases, refusals, approvals, ε spent over time, and the
    risk alerts. Each log is verified first; one that does not verify is shown as such, without
    figures, and the command exits 1 after writing the report.
    """
    if nodes and all_nodes:
        raise click.UsageError("give NODE... or --all, not both")
    if out is None and not as_json:
        raise click.UsageError("give --out FILE, --json, or both")
    now_ms = time.time_ns() // 1_000_000
    since_ms = None if since is None else parse_since(since, now_ms=now_ms)
    auditor = _auditor(identity, state, quorum=quorum)
    data = assess(auditor, list(nodes) or auditor.nodes(), since_ms=since_ms, now_ms=now_ms)
    if out is not None:
        write_html(out, data)
    if as_json:
        emit_json(data)
    else:
        click.echo(summary_text(data))
        click.echo(f"report written to {out}")
    if data["summary"]["not_verified"]:
        _fail()
