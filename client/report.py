"""The periodic security assessment report (安全评估报告): what the verified audit logs say about
a period, as one JSON document and one self-contained HTML page (``govshare audit report``).

Three steps, each testable on its own:

- :func:`assess` (the auditor's side): verifies each node's pulled copy
  (:meth:`govshare.client.auditor.Auditor.verify`, offline), reads the entries of the copies that
  verified, runs the risk rules over them (:func:`govshare.client.risk.check_pulled`) and hands
  everything to :func:`build_report`.
- :func:`build_report` (pure): folds each verified log, in log order, into per-(node, dataset,
  analyst) figures — queries by kind, releases (exact, noised, other), refusals by rule,
  approvals granted and denied, the ε spent over time, the purposes analysts gave — and returns
  the report as JSON-ready data (``--json`` prints exactly this).
- :func:`render_html` (pure): the page, drawn from that JSON alone — inline CSS and SVG charts
  drawn here, no script, font or stylesheet from anywhere; the JSON itself is embedded in a
  ``<script type="application/json">`` block, so the page carries its data.

Trust: only copies that verified this run are read; a node whose copy does not verify (or was
never pulled) is listed with its verdict and no figures. The figures cover the entries up to the
newest checkpoint the auditor verified: entries a node appended since are not in the report.

ε accounting follows the nodes' own ledgers
(:meth:`govshare.node.stores.query_store.QueryStore.budget`):
a query's ε is the one its allowed admission decision (``policy.decision``) logged; it counts as
spent when a ``budget.settled`` or ``budget.recovered`` entry says its reservation was
``spent``, never when it was ``returned`` (a denial, an expiry, a failure that released
nothing); a reservation not settled yet is ``reserved``. With ``--since``, counts cover the
entries from that time on, and the ε figures say what was spent before and during the period.

Escaping: log entries carry text that analysts and operators chose (a query's purpose, a
reason, names). :func:`render_html` passes every value through :func:`html.escape`, the
embedded JSON has ``<``, ``>`` and ``&`` as ``\\u`` escapes (it cannot end its script block),
and the page's Content-Security-Policy allows no script at all, so a ``<script>`` in a purpose
is shown as text and never runs.

What the report shows is what an auditor may see: analysts' names, datasets, purposes, counts
and ε — never a query's result (the logs hold only digests of released results).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from govshare.client.auditor import Auditor, LocalLog, Verdict
from govshare.client.risk import check_pulled
from govshare.model.risk import Alert, alerts_json, read_entry
from govshare.protocols.auditverify import AuditEntry
from govshare.protocols.errors import GovshareError
from govshare.protocols.signed_request import SignedRequest

__all__ = [
    "REPORT_FORMAT",
    "NodeLog",
    "assess",
    "build_report",
    "render_html",
    "summary_text",
    "write_html",
]

REPORT_FORMAT = "govshare-assessment-report/1"
SEVERITIES = ("HIGH", "MEDIUM", "LOW")
RELEASES = ("exact", "noised", "other")
# Distinct purposes kept per (node, dataset, analyst), most frequent first: an analyst who
# varies the purpose on every query must not make the report grow without bound.
PURPOSES_KEPT = 20
PURPOSE_SHOWN = 160  # characters of one purpose shown on the page (the JSON keeps it whole)
PURPOSES_SHOWN = 5  # purposes shown per row on the page
ENTRIES_SHOWN = 8  # entry indices listed per alert on the page
DOTS_SHOWN = 60  # a ledger with more spends is drawn as a line alone, without a dot per spend
EPSILON_PLACES = 12  # decimals of ε in the JSON: what govshare.model.epsilon.parse_epsilon reads
# Points kept per ε ledger for its chart: the last of each of this many equal slices of time
# (the values are cumulative, so the last is the highest). The chart is 1,000 px wide; a year of
# queries would otherwise put one point per spent reservation in the page.
LEDGER_POINTS = 400
_NONE = "—"


# --- folding one verified log ------------------------------------------------------------------


@dataclass
class NodeLog:
    """One node's input to :func:`build_report`: its verdict and, when it verified, its
    entries in log order (``None`` otherwise: nothing of an unverified copy is read)."""

    verdict: Verdict
    entries: Iterable[AuditEntry] | None


@dataclass
class _Query:
    analyst: str | None
    # (kind, purpose) of each query.received entry within the period: one per query from an
    # honest node, but a log that repeats a query id is counted as it reads.
    received: list[tuple[str, str | None]] = field(default_factory=list)
    dataset: str | None = None
    epsilon: Fraction = Fraction(0)
    decided: bool = False  # the admission decision was seen
    settled: bool = False


@dataclass
class _Figures:
    """What one (dataset, analyst) did at one node within the period."""

    kinds: Counter[str] = field(default_factory=Counter)
    releases: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    approvals: Counter[str] = field(default_factory=Counter)
    purposes: Counter[str] = field(default_factory=Counter)
    spent_before: Fraction = Fraction(0)
    spent: Fraction = Fraction(0)
    reserved: Fraction = Fraction(0)
    returned: Fraction = Fraction(0)
    series: list[tuple[int, Fraction]] = field(default_factory=list)  # (time, cumulative)

    def add(self, other: _Figures) -> None:
        self.kinds.update(other.kinds)
        self.releases.update(other.releases)
        self.refusals.update(other.refusals)
        self.approvals.update(other.approvals)
        self.spent_before += other.spent_before
        self.spent += other.spent
        self.reserved += other.reserved
        self.returned += other.returned

    def to_json(self) -> dict[str, Any]:
        return {
            "queries": sum(self.kinds.values()),
            "queries_by_kind": dict(sorted(self.kinds.items())),
            "releases": {k: self.releases[k] for k in RELEASES},
            "refusals": sum(self.refusals.values()),
            "refusals_by_rule": dict(sorted(self.refusals.items())),
            "approvals": {"granted": self.approvals["granted"], "denied": self.approvals["denied"]},
            "epsilon": {
                "spent": decimal_text(self.spent),
                "spent_before": decimal_text(self.spent_before),
                "spent_total": decimal_text(self.spent_before + self.spent),
                "reserved": decimal_text(self.reserved),
                "returned": decimal_text(self.returned),
            },
        }


class _LogFold:
    """One node's log folded entry by entry (module docstring: what counts where)."""

    def __init__(self, node: str, since_ms: int | None) -> None:
        self.node = node
        self.since_ms = since_ms
        self.queries: dict[str, _Query] = {}
        self.rows: dict[tuple[str | None, str | None], _Figures] = {}
        self.entries = 0
        self.in_period = 0
        self.first_ms: int | None = None
        self.last_ms: int | None = None

    def _in(self, entry: AuditEntry) -> bool:
        return self.since_ms is None or entry.time_ms >= self.since_ms

    def _row(self, dataset: str | None, analyst: str | None) -> _Figures:
        key = (dataset, analyst)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _Figures()
        return row

    def _query_row(self, query: _Query | None) -> _Figures:
        return self._row(query.dataset, query.analyst) if query else self._row(None, None)

    def add(self, entry: AuditEntry) -> None:
        self.entries += 1
        self.first_ms = entry.time_ms if self.first_ms is None else self.first_ms
        self.last_ms = entry.time_ms
        now = self._in(entry)
        self.in_period += now
        kind, fields, qid = entry.kind, entry.fields, entry.query_id
        query = self.queries.get(qid) if qid is not None else None
        if kind == "query.received" and qid is not None:
            if query is None:
                query = self.queries[qid] = _Query(analyst=entry.actor)
            if now:
                received = (_text(fields.get("kind")) or "unknown", _purpose(fields.get("request")))
                query.received.append(received)
        elif kind == "policy.decision":
            dataset = fields.get("dataset")
            if query is not None and query.dataset is None and isinstance(dataset, str):
                query.dataset = dataset
            allowed = fields.get("allowed") is True
            if query is not None and allowed and not query.decided:
                query.epsilon = _epsilon(fields.get("epsilon"))
            if query is not None:
                query.decided = True
            if not allowed and now:
                # A refusal on the data is logged by the node itself: the analyst is the query's.
                analyst = query.analyst if query else _text(entry.actor)
                analyst = None if analyst == self.node else analyst
                row = self._row(dataset if isinstance(dataset, str) else None, analyst)
                row.refusals[_text(fields.get("rule")) or "unknown"] += 1
        elif kind == "result.released" and now:
            if fields.get("exact") is True:
                release = "exact"
            elif query is not None and query.epsilon > 0:
                release = "noised"
            else:
                release = "other"
            self._query_row(query).releases[release] += 1
        elif kind in ("approval.granted", "approval.denied"):
            dataset, analyst = _text(fields.get("dataset")), _text(fields.get("analyst"))
            if query is not None:
                dataset, analyst = dataset or query.dataset, analyst or query.analyst
            if now:
                self._row(dataset, analyst).approvals[kind.split(".")[1]] += 1
            self._settle(entry, query, fields.get("reservation"), now)
        elif kind in ("budget.settled", "budget.recovered"):
            self._settle(entry, query, fields.get("reservation"), now)

    def _settle(self, entry: AuditEntry, query: _Query | None, state: object, now: bool) -> None:
        if query is None or query.settled or state not in ("spent", "returned"):
            return
        query.settled = True
        if not query.epsilon:
            return
        row = self._query_row(query)
        if state == "returned":
            row.returned += query.epsilon if now else 0
        elif now:
            row.spent += query.epsilon
            row.series.append((entry.time_ms, row.spent_before + row.spent))
        else:
            row.spent_before += query.epsilon

    def finish(self) -> dict[tuple[str | None, str | None], _Figures]:
        for query in self.queries.values():
            for kind, purpose in query.received:
                row = self._query_row(query)
                row.kinds[kind] += 1
                if purpose is not None:
                    row.purposes[purpose] += 1
            if query.epsilon and not query.settled:
                self._query_row(query).reserved += query.epsilon
        return self.rows


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _epsilon(value: object) -> Fraction:
    if not isinstance(value, str):
        return Fraction(0)
    try:
        parsed = Fraction(value)
    except (ValueError, ZeroDivisionError):
        return Fraction(0)
    return parsed if parsed > 0 else Fraction(0)


def _purpose(request: object) -> str | None:
    """The purpose the analyst wrote in a signed request's plan, or None."""
    if not isinstance(request, bytes):
        return None
    try:
        plan = SignedRequest.decode(request).body_json()
    except (GovshareError, ValueError, RecursionError):
        return None
    purpose = plan.get("purpose") if isinstance(plan, dict) else None
    return purpose if isinstance(purpose, str) else None


def decimal_text(value: Fraction) -> str:
    """``value`` as decimal text, rounded to :data:`EPSILON_PLACES` places (ε in the logs is
    exact decimal text; sums of those stay exact)."""
    scale = 10**EPSILON_PLACES
    scaled = round(value * scale)
    sign, scaled = ("-", -scaled) if scaled < 0 else ("", scaled)
    text = f"{scaled // scale}.{scaled % scale:0{EPSILON_PLACES}d}".rstrip("0").rstrip(".")
    return sign + text if text != "0" else "0"


# --- the report as JSON ------------------------------------------------------------------------


def thinned(
    series: Sequence[tuple[int, Fraction]], most: int = LEDGER_POINTS
) -> list[tuple[int, Fraction]]:
    """At most ``most`` points of a cumulative ``series`` (in time order): the last point of
    each of ``most`` equal slices of its time span, and always the last point."""
    if len(series) <= most:
        return list(series)
    start, span = series[0][0], series[-1][0] - series[0][0] + 1
    kept: dict[int, tuple[int, Fraction]] = {}
    for point in series:
        kept[(point[0] - start) * most // span] = point
    return list(kept.values())


def _row_json(
    node: str, dataset: str | None, analyst: str | None, figures: _Figures
) -> dict[str, Any]:
    purposes = figures.purposes.most_common()
    return {
        "node": node,
        "dataset": dataset,
        "analyst": analyst,
        **figures.to_json(),
        "purposes": [{"purpose": p, "queries": n} for p, n in purposes[:PURPOSES_KEPT]],
        "purposes_not_shown": max(len(purposes) - PURPOSES_KEPT, 0),
    }


def _sort_key(item: tuple[tuple[str | None, str | None], Any]) -> tuple[str, str]:
    (dataset, analyst), _ = item
    return (dataset or "\uffff", analyst or "\uffff")


def build_report(
    logs: Sequence[NodeLog],
    alerts: Sequence[Alert],
    *,
    federation: str,
    auditor: str,
    since_ms: int | None,
    now_ms: int,
) -> dict[str, Any]:
    """The assessment report of ``logs`` (in the order given) and the risk ``alerts`` over
    them, for the period from ``since_ms`` (None: the logs' start) to ``now_ms``, as JSON-ready
    data (the shape ``govshare audit report --json`` prints; module docstring).

    Pure: reads only its arguments.
    """
    nodes: list[dict[str, Any]] = []
    ledgers: list[dict[str, Any]] = []
    total = _Figures()
    by_analyst: dict[str, _Figures] = {}
    analyst_nodes: dict[str, set[str]] = {}
    firsts: list[int] = []
    for log in logs:
        verdict = log.verdict
        item: dict[str, Any] = {
            "node": verdict.node,
            "verified": verdict.ok and log.entries is not None,
            "verification": verdict.to_json(),
        }
        nodes.append(item)
        if not item["verified"] or log.entries is None:
            item.update(entries=None, entries_in_period=None, first_ms=None, last_ms=None)
            item.update(totals=None, activity=[])
            continue
        fold = _LogFold(verdict.node, since_ms)
        for entry in log.entries:
            fold.add(entry)
        rows = sorted(fold.finish().items(), key=_sort_key)
        node_total = _Figures()
        activity = []
        for (dataset, analyst), figures in rows:
            node_total.add(figures)
            activity.append(_row_json(verdict.node, dataset, analyst, figures))
            if analyst is not None:
                by_analyst.setdefault(analyst, _Figures()).add(figures)
                if figures.kinds or figures.releases or figures.refusals or figures.approvals:
                    analyst_nodes.setdefault(analyst, set()).add(verdict.node)
            if figures.spent_before or figures.spent or figures.reserved:
                ledgers.append(
                    {
                        "node": verdict.node,
                        "dataset": dataset,
                        "analyst": analyst,
                        "spent_before": decimal_text(figures.spent_before),
                        "spent": decimal_text(figures.spent),
                        "spent_total": decimal_text(figures.spent_before + figures.spent),
                        "reserved": decimal_text(figures.reserved),
                        "spends": len(figures.series),
                        "points": [[t, decimal_text(v)] for t, v in thinned(figures.series)],
                    }
                )
        total.add(node_total)
        if fold.first_ms is not None:
            firsts.append(fold.first_ms)
        item.update(
            entries=fold.entries,
            entries_in_period=fold.in_period,
            first_ms=fold.first_ms,
            last_ms=fold.last_ms,
            totals=node_total.to_json(),
            activity=activity,
        )
    counts = Counter(a.severity.value for a in alerts)
    verified = [n["node"] for n in nodes if n["verified"]]
    return {
        "format": REPORT_FORMAT,
        "federation": federation,
        "auditor": auditor,
        "generated_ms": now_ms,
        "period": {
            "since_ms": since_ms,
            "until_ms": now_ms,
            "first_entry_ms": min(firsts) if firsts else None,
        },
        "summary": {
            "nodes": [n["node"] for n in nodes],
            "verified": verified,
            "not_verified": [n["node"] for n in nodes if not n["verified"]],
            "alerts": {s: counts[s] for s in SEVERITIES},
        },
        "totals": total.to_json(),
        "analysts": [
            {"analyst": name, "nodes": sorted(analyst_nodes.get(name, ())), **figures.to_json()}
            for name, figures in sorted(by_analyst.items())
        ],
        "nodes": nodes,
        "epsilon_ledgers": ledgers,
        "alerts": alerts_json(alerts),
    }


def _verified_entries(store: LocalLog, size: int) -> Iterator[AuditEntry]:
    """The first ``size`` entries of a verified copy (a pull may append more while the report
    reads; those were not part of the verification), decoded without the canonical-form
    checks the verification just made (:func:`govshare.model.risk.read_entry`)."""
    for index, data, _ in store.iter_entries():
        if index >= size:
            return
        yield read_entry(data)


def assess(
    auditor: Auditor,
    nodes: Sequence[str],
    *,
    since_ms: int | None = None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """Verify each of ``nodes``' pulled copies, then build the report of those that verified
    (:func:`build_report`) with the risk alerts over them from ``since_ms`` on. ``now_ms``
    ends the period (default: the clock).

    Raises:
        NotFound: a node is not in the roster.
        MalformedInput: a name is not a node's, or a verified copy holds an entry that does
            not decode (the copy was damaged after its verification).
    """
    when = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    verdicts = auditor.verify_all(nodes)
    verified = [v.node for v in verdicts if v.ok]
    alerts = check_pulled(auditor.state, verified, since_ms=since_ms)
    with ExitStack() as stack:
        logs = []
        for verdict in verdicts:
            store = LocalLog.existing(auditor.state / verdict.node) if verdict.ok else None
            if store is None:
                logs.append(NodeLog(verdict, None))
                continue
            stack.enter_context(store)
            logs.append(NodeLog(verdict, _verified_entries(store, verdict.entries)))
        return build_report(
            logs,
            alerts,
            federation=auditor.roster.federation,
            auditor=auditor.identity.name,
            since_ms=since_ms,
            now_ms=when,
        )


# --- plain-text summary ------------------------------------------------------------------------


def utc_text(time_ms: int | None, *, seconds: bool = False) -> str:
    """``2025-06-01 08:00 UTC`` (``:SS`` with ``seconds``); ``—`` for None."""
    if time_ms is None:
        return _NONE
    when = dt.datetime.fromtimestamp(time_ms / 1000, tz=dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + " UTC"


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else words or word + 's'}"


def period_text(report: Mapping[str, Any]) -> str:
    period = report["period"]
    since = period["since_ms"]
    start = (
        utc_text(since)
        if since is not None
        else f"the start of the logs ({utc_text(period['first_entry_ms'])})"
    )
    return f"{start} to {utc_text(period['until_ms'])}"


def summary_text(report: Mapping[str, Any]) -> str:
    """The report's summary in plain sentences (the page's first paragraph, the CLI's line)."""
    summary, totals = report["summary"], report["totals"]
    nodes, verified, failed = summary["nodes"], summary["verified"], summary["not_verified"]
    alerts = summary["alerts"]
    if not nodes:
        checked = "No node logs were assessed."
    elif not failed:
        checked = f"All {_plural(len(nodes), 'node log')} verified ({', '.join(nodes)})."
    else:
        checked = (
            f"{len(verified)} of {_plural(len(nodes), 'node log')} verified; "
            f"NOT verified, figures omitted: {', '.join(failed)}."
        )
    releases = totals["releases"]
    return (
        f"Period: {period_text(report)}. {checked} "
        f"{_plural(totals['queries'], 'query', 'queries')} received, "
        f"{_plural(sum(releases.values()), 'release')} ({releases['exact']} exact, "
        f"{releases['noised']} noised, {releases['other']} other), "
        f"{_plural(totals['refusals'], 'refusal')}, ε spent {totals['epsilon']['spent']}. "
        f"Risk alerts: {alerts['HIGH']} HIGH, {alerts['MEDIUM']} MEDIUM, {alerts['LOW']} LOW."
    )


# --- the HTML page ------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def embedded_json(report: Mapping[str, Any]) -> str:
    """The report as JSON that cannot end its ``<script>`` block or open a comment."""
    text = json.dumps(report, sort_keys=True, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# Colours: a palette that stays apart for the usual colour-vision deficiencies (Okabe-Ito),
# darkened where text sits on white.
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7a6a00", "#555555")
# Lines that overlap (two ledgers spending alike) stay visible: each draws its own dash.
DASHES = ("none", "7 4", "2 3", "10 3 2 3")
_SEVERITY_CLASS = {"HIGH": "sev-high", "MEDIUM": "sev-medium", "LOW": "sev-low"}

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2933;
 font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC",
 "Microsoft YaHei","Liberation Sans","DejaVu Sans",sans-serif}
header{background:#1d3557;color:#fff;padding:28px 0 24px}
.wrap{max-width:1120px;margin:0 auto;padding:0 28px}
header h1{margin:0;font-size:27px;font-weight:650;letter-spacing:.2px}
header .sub{margin-top:6px;color:#c9d6e8;font-size:14px}
main{padding:22px 0 36px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:20px 24px;
 margin:0 0 20px}
h2{font-size:19px;margin:0 0 12px;color:#1d3557}
h3{font-size:16px;margin:18px 0 8px;color:#334e68}
p{margin:0 0 10px}
.summary{font-size:16px}
.tiles{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0 2px}
.tile{flex:1 1 150px;border:1px solid #e1e4e8;border-radius:8px;padding:10px 14px;
 background:#fafbfc}
.tile .n{font-size:26px;font-weight:650;line-height:1.2}
.tile .l{color:#52606d;font-size:13px}
.tile.bad{border-color:#f5b5b5;background:#fdecec}.tile.bad .n{color:#b42318}
.tile.good .n{color:#1a7f37}
table{border-collapse:collapse;width:100%;font-size:13.5px}
table.fixed{table-layout:fixed}table.fixed td{overflow-wrap:anywhere}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #eceef1;vertical-align:top}
th{background:#f6f8fa;color:#3e4c59;font-weight:600;font-size:12.5px;vertical-align:bottom}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th.num{text-align:right}
.small{font-size:12.5px;color:#52606d}
.ok{color:#1a7f37;font-weight:600}
.failed{color:#b42318;font-weight:600}
#not-verified ul{margin:4px 0 0;padding-left:22px;font-weight:400}
tr.failed-row td{background:#fdecec}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:700}
.sev-high{background:#b42318;color:#fff}
.sev-medium{background:#f5a524;color:#3b2600}
.sev-low{background:#e4e7eb;color:#323f4b}
tr.row-high td{background:#fff5f5}
.charts{display:flex;gap:20px;flex-wrap:wrap}
.chart{flex:1 1 300px;min-width:0}
.chart h3{margin-top:4px}
svg text{font-family:inherit}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;
 vertical-align:-1px}
tr.has-purposes td{border-bottom:0;padding-bottom:2px}
tr.purposes td{font-size:12.5px;color:#52606d;padding-top:0}
.purpose{overflow-wrap:anywhere;color:#323f4b}.count{color:#7b8794}
svg.chart-svg{display:block;max-width:100%;height:auto}
.empty{color:#7b8794;font-style:italic}
footer{color:#7b8794;font-size:12.5px;padding:0 0 30px}
code{font-family:"DejaVu Sans Mono",ui-monospace,monospace;font-size:12.5px}
"""


def _nice_step(span: float, ticks: int) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks over ``span``."""
    raw = span / max(ticks, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 else f"{value:,.2f}".rstrip("0")


def bar_chart(items: Sequence[tuple[str, int]], *, name: str, colour: str, width: int = 320) -> str:
    """A horizontal bar chart of ``items`` (label, count) as inline SVG (labels escaped)."""
    if not items:
        return '<p class="empty">None in this period.</p>'
    label_w, row_h, pad = 150, 26, 6
    height = pad * 2 + row_h * len(items)
    top = max(value for _, value in items) or 1
    span = width - label_w - 12 - 8 * len(f"{top:,}")  # room for the largest value's text
    parts = [
        f'<svg class="chart-svg chart-{_e(name)}" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
    ]
    for row, (label, value) in enumerate(items):
        y = pad + row * row_h
        bar = max(span * value / top, 2)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end" font-size="12" '
            f'fill="#3e4c59"><title>{_e(label)}</title>{_e(_cut(label, 22))}</text>'
            f'<rect class="bar" x="{label_w}" y="{y + 5}" width="{bar:.1f}" height="{row_h - 10}" '
            f'rx="3" fill="{colour}"><title>{_e(label)}: {value:,}</title></rect>'
            f'<text x="{label_w + bar + 6:.1f}" y="{y + 17}" font-size="12" '
            f'font-weight="600" fill="#1f2933">{value:,}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


_SECOND, _MINUTE, _HOUR, _DAY = 1000, 60_000, 3_600_000, 86_400_000
# Steps between time ticks, smallest first: round numbers of seconds, minutes, hours and days.
_TIME_STEPS = (
    *(n * _SECOND for n in (1, 2, 5, 10, 15, 30)),
    *(n * _MINUTE for n in (1, 2, 5, 10, 15, 30)),
    *(n * _HOUR for n in (1, 2, 3, 6, 12)),
    *(n * _DAY for n in (1, 2, 7, 14, 30, 91, 182, 365)),
)


def time_ticks(start_ms: int, end_ms: int, most: int = 7) -> list[tuple[int, str]]:
    """At most ``most`` (time, label) ticks on round UTC times between the two, labelled as
    precisely as their step needs."""
    span = end_ms - start_ms
    step = next((s for s in _TIME_STEPS if span / s <= most - 1), _TIME_STEPS[-1])
    if step < _MINUTE:
        fmt = "%H:%M:%S"
    elif step < _DAY:
        fmt = "%H:%M" if span < _DAY else "%m-%d %H:%M"
    else:
        fmt = "%Y-%m-%d"
    first = -(-start_ms // step) * step
    return [
        (t, dt.datetime.fromtimestamp(t / 1000, tz=dt.UTC).strftime(fmt))
        for t in range(first, end_ms + 1, step)
    ]


def step_chart(
    lines: Sequence[tuple[str, str, float, Sequence[tuple[int, float]]]],
    *,
    start_ms: int,
    end_ms: int,
    name: str,
    width: int = 1000,
    height: int = 320,
) -> str:
    """Cumulative values over time as step lines, inline SVG: ``lines`` are (label, colour,
    value at ``start_ms``, [(time, value), ...]); labels escaped."""
    left, right, top, bottom = 64, 20, 14, 44
    if end_ms <= start_ms:
        start_ms, end_ms = start_ms - 60_000, start_ms + 60_000
    peak = max([v for *_, s0, pts in lines for v in (s0, *(p[1] for p in pts))], default=0)
    peak = peak or 1.0
    step = _nice_step(peak, 4)
    y_max = step * math.ceil(peak / step)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + plot_w * (t - start_ms) / (end_ms - start_ms)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    parts = [
        f'<svg class="chart-svg chart-{_e(name)}" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfd" '
        'stroke="#e1e4e8"/>',
    ]
    tick = 0.0
    while tick <= y_max + 1e-9:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            f'stroke="#e6e9ed"/><text x="{left - 8}" y="{y(tick) + 4:.1f}" text-anchor="end" '
            f'font-size="12" fill="#52606d">{_e(_number(tick))}</text>'
        )
        tick += step
    for t, label in time_ticks(start_ms, end_ms):
        anchor = "start" if x(t) < left + 30 else "end" if x(t) > left + plot_w - 30 else "middle"
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" '
            f'stroke="#9aa5b1"/><text x="{x(t):.1f}" y="{top + plot_h + 20}" '
            f'text-anchor="{anchor}" font-size="12" fill="#52606d">{_e(label)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" '
        'font-size="12" fill="#52606d">time (UTC)</text>'
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" '
        'text-anchor="middle" font-size="12" fill="#52606d">cumulative ε spent</text>'
    )
    for number, (label, colour, start_value, points) in enumerate(lines):
        path = f"M{x(start_ms):.1f} {y(start_value):.1f}"
        dots = []
        for t, v in points:
            path += f" H{x(t):.1f} V{y(v):.1f}"
            if len(points) <= DOTS_SHOWN:
                dots.append(
                    f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}">'
                    f"<title>{_e(label)}: ε {_e(_number(v))} at "
                    f"{_e(utc_text(t, seconds=True))}</title></circle>"
                )
        path += f" H{x(end_ms):.1f}"
        parts.append(
            f'<path class="series" d="{path}" fill="none" stroke="{colour}" stroke-width="2.5" '
            f'stroke-dasharray="{DASHES[number % len(DASHES)]}">'
            f"<title>{_e(label)}</title></path>{''.join(dots)}"
        )
    parts.append("</svg>")
    return "".join(parts)


def _kv_lines(mapping: Mapping[str, int]) -> str:
    if not mapping:
        return _NONE
    return "<br>".join(f"{_e(k)}&nbsp;<b>{v:,}</b>" for k, v in mapping.items())


def _table(
    headers: Sequence[str],
    rows: Sequence[str],
    *,
    numeric: Sequence[int] = (),
    widths: Sequence[int] = (),
) -> str:
    """A table; ``widths`` (percentages, one per column) give every table of a kind the same
    columns."""
    columns = "".join(f'<col style="width:{w}%">' for w in widths)
    layout = f'<table class="fixed"><colgroup>{columns}</colgroup>' if widths else "<table>"
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    return f"{layout}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _first_problem(node: Mapping[str, Any]) -> str:
    problems = node["verification"]["problems"]
    return str(problems[0]["message"]) if problems else "not verified"


def _verification_section(report: Mapping[str, Any]) -> str:
    rows = []
    for node in report["nodes"]:
        v = node["verification"]
        size = v["checkpoint_size"]
        witnesses = f"{len(v['cosignatures_valid'])} of {v['witnesses']} (quorum {v['quorum']})"
        if node["verified"]:
            status, css = '<span class="ok">verified</span>', ""
            note = _e(
                f"{node['entries_in_period']:,} entries in the period; the log runs from "
                f"{utc_text(node['first_ms'])} to {utc_text(node['last_ms'])}"
            )
        else:
            message = _first_problem(node)
            status, css = '<span class="failed">NOT VERIFIED</span>', ' class="failed-row"'
            note = (
                f'<span class="failed">{_e(message)}</span><br><span class="small">Its '
                "figures are not trusted and are left out of this report.</span>"
            )
        rows.append(
            f"<tr{css}><td><b>{_e(node['node'])}</b></td><td>{status}</td>"
            f'<td class="num">{v["entries"]:,}</td>'
            f'<td class="num">{_e(_NONE if size is None else f"{size:,}")}</td>'
            f"<td>{_e(witnesses)}</td><td>{note}</td></tr>"
        )
    table = _table(
        ("node", "log", "entries", "checkpoint", "witnesses cosigned", "notes"),
        rows,
        numeric=(2, 3),
    )
    return (
        '<section id="verification"><h2>1. Log verification</h2>'
        "<p>Each node's signed audit log, as pulled by the auditor, was verified again from "
        "scratch before this report was written: every entry against the signed tree, every "
        "checkpoint signature and the witnesses' cosignatures. Only verified logs are "
        "counted below.</p>"
        f"{table}</section>"
    )


def _alerts_section(report: Mapping[str, Any]) -> str:
    alerts = report["alerts"]
    counts = report["summary"]["alerts"]
    badges = " ".join(
        f'<span class="badge {_SEVERITY_CLASS[s]}">{counts[s]} {s}</span>' for s in SEVERITIES
    )
    if not alerts:
        body = '<p class="empty">No risk rule raised an alert in this period.</p>'
    else:
        rows = []
        for a in alerts:
            refs = [
                f"#{e['index']}" if e["node"] == a["node"] else f"{e['node']}#{e['index']}"
                for e in a["entries"]
            ]
            shown = " ".join(refs[:ENTRIES_SHOWN]) + (
                f" … (+{len(refs) - ENTRIES_SHOWN})" if len(refs) > ENTRIES_SHOWN else ""
            )
            severity = str(a["severity"])
            css = ' class="row-high"' if severity == "HIGH" else ""
            rows.append(
                f'<tr{css}><td><span class="badge {_SEVERITY_CLASS.get(severity, "sev-low")}">'
                f"{_e(severity)}</span></td><td>{_e(a['node'])}</td><td><code>{_e(a['rule'])}"
                f"</code></td><td>{_e(a['analyst'] or _NONE)}</td>"
                f"<td>{_e(a['dataset'] or _NONE)}</td>"
                f'<td class="small">{_e(utc_text(a["time_ms"], seconds=True))}</td>'
                f'<td>{_e(a["detail"])}</td><td class="small">{_e(shown)}</td></tr>'
            )
        body = _table(
            ("severity", "node", "rule", "analyst", "dataset", "time", "detail", "log entries"),
            rows,
        )
    return (
        '<section id="alerts"><h2>2. Risk alerts</h2>'
        f"<p>{badges}</p><p>The risk rules (风险监测预警) read every verified log; HIGH alerts "
        "need an operator's or auditor's attention, MEDIUM ones a look, LOW ones are "
        "informational (for example an exact release that operators approved).</p>"
        f"{body}</section>"
    )


def _activity_section(report: Mapping[str, Any]) -> str:
    totals = report["totals"]
    kinds = sorted(totals["queries_by_kind"].items(), key=lambda kv: (-kv[1], kv[0]))
    rules = sorted(totals["refusals_by_rule"].items(), key=lambda kv: (-kv[1], kv[0]))
    releases = [(k, totals["releases"][k]) for k in RELEASES]
    charts = (
        '<div class="charts">'
        f'<div class="chart"><h3>Queries by kind</h3>'
        f"{bar_chart(kinds, name='queries', colour=PALETTE[0])}</div>"
        f'<div class="chart"><h3>Refusals by rule</h3>'
        f"{bar_chart(rules, name='refusals', colour=PALETTE[1])}</div>"
        f'<div class="chart"><h3>Releases</h3>'
        f"{bar_chart(releases, name='releases', colour=PALETTE[2])}"
        '<p class="small">exact: a statistic without noise, approved by the operators; '
        "noised: carries differential-privacy noise; other: masked records, or a node's "
        "hand-off of its set to its peer.</p></div>"
        "</div>"
    )
    tables = []
    for node in report["nodes"]:
        if not node["verified"]:
            tables.append(
                f'<h3>Node {_e(node["node"])}</h3><p class="failed">Log not verified: figures '
                "omitted.</p>"
            )
            continue
        rows = []
        for row in node["activity"]:
            purposes = " · ".join(
                f'<span class="purpose">“{_e(_cut(p["purpose"], PURPOSE_SHOWN))}”&nbsp;'
                f'<span class="count">&times;{p["queries"]}</span></span>'
                for p in row["purposes"][:PURPOSES_SHOWN]
            )
            hidden = len(row["purposes"]) - PURPOSES_SHOWN + row["purposes_not_shown"]
            if hidden > 0:
                purposes += f" · … and {hidden} more"
            releases_cell = " / ".join(str(row["releases"][k]) for k in RELEASES)
            approvals = row["approvals"]
            css = ' class="has-purposes"' if purposes else ""
            rows.append(
                f"<tr{css}><td>{_e(row['dataset'] or _NONE)}</td>"
                f"<td>{_e(row['analyst'] or _NONE)}"
                f'</td><td class="num">{row["queries"]:,}</td>'
                f'<td class="small">{_kv_lines(row["queries_by_kind"])}</td>'
                f'<td class="num">{_e(releases_cell)}</td>'
                f'<td class="small">{_kv_lines(row["refusals_by_rule"])}</td>'
                f'<td class="num">{approvals["granted"]} / {approvals["denied"]}</td>'
                f'<td class="num">{_e(row["epsilon"]["spent"])}</td></tr>'
            )
            if purposes:
                rows.append(
                    f'<tr class="purposes"><td colspan="8">Purposes given: {purposes}</td></tr>'
                )
        table = (
            _table(
                (
                    "dataset",
                    "analyst",
                    "queries",
                    "by kind",
                    "releases exact / noised / other",
                    "refusals by rule",
                    "approvals granted / denied",
                    "ε spent",
                ),
                rows,
                numeric=(2, 4, 6, 7),
                widths=(13, 10, 7, 20, 13, 16, 13, 8),
            )
            if rows
            else '<p class="empty">No activity in this period.</p>'
        )
        tables.append(f"<h3>Node {_e(node['node'])}</h3>{table}")
    analysts = [
        f"<tr><td><b>{_e(a['analyst'])}</b></td><td>{_e(', '.join(a['nodes']) or _NONE)}</td>"
        f'<td class="num">{a["queries"]:,}</td>'
        f'<td class="num">{_e(" / ".join(str(a["releases"][k]) for k in RELEASES))}</td>'
        f'<td class="num">{a["refusals"]:,}</td>'
        f'<td class="num">{a["approvals"]["granted"]} / {a["approvals"]["denied"]}</td>'
        f'<td class="num">{_e(a["epsilon"]["spent"])}</td></tr>'
        for a in report["analysts"]
    ]
    analyst_table = (
        _table(
            (
                "analyst",
                "nodes",
                "queries",
                "releases exact / noised / other",
                "refusals",
                "approvals granted / denied",
                "ε spent",
            ),
            analysts,
            numeric=(2, 3, 4, 5, 6),
        )
        if analysts
        else '<p class="empty">No analyst activity in this period.</p>'
    )
    return (
        '<section id="activity"><h2>3. Queries, releases and refusals</h2>'
        f"{charts}<h3>By analyst, across nodes</h3>{analyst_table}"
        '<p class="small" style="margin-top:14px">Per node, dataset and analyst below. A '
        "query is counted where it was received; a refusal names the policy rule that refused "
        "it; approvals are the operators' decisions on queries that waited for them.</p>"
        f"{''.join(tables)}</section>"
    )


def _epsilon_section(report: Mapping[str, Any]) -> str:
    ledgers = report["epsilon_ledgers"]
    period = report["period"]
    start = period["since_ms"] if period["since_ms"] is not None else period["first_entry_ms"]
    end = period["until_ms"]
    lines = []
    rows = []
    for number, ledger in enumerate(ledgers):
        colour = PALETTE[number % len(PALETTE)]
        label = f"{ledger['analyst'] or _NONE} on {ledger['node']}.{ledger['dataset'] or _NONE}"
        points = [(int(t), float(Fraction(v))) for t, v in ledger["points"]]
        lines.append((label, colour, float(Fraction(ledger["spent_before"])), points))
        rows.append(
            f'<tr><td><span class="swatch" style="background:{colour}"></span>'
            f"{_e(ledger['analyst'] or _NONE)}</td><td>{_e(ledger['node'])}</td>"
            f"<td>{_e(ledger['dataset'] or _NONE)}</td>"
            f'<td class="num">{_e(ledger["spent_before"])}</td>'
            f'<td class="num"><b>{_e(ledger["spent"])}</b></td>'
            f'<td class="num">{_e(ledger["spent_total"])}</td>'
            f'<td class="num">{_e(ledger["reserved"])}</td></tr>'
        )
    if not ledgers:
        body = '<p class="empty">No privacy budget was spent or reserved.</p>'
    else:
        chart = step_chart(
            lines,
            start_ms=int(start if start is not None else end),
            end_ms=int(end),
            name="epsilon",
        )
        body = chart + _table(
            (
                "analyst",
                "node",
                "dataset",
                "ε spent before",
                "ε spent in period",
                "ε spent in all",
                "ε reserved now",
            ),
            rows,
            numeric=(3, 4, 5, 6),
        )
    return (
        '<section id="epsilon"><h2>4. Privacy budget (ε) spent over time</h2>'
        "<p>Each line is one analyst's ledger on one dataset: the ε of the queries whose "
        "reservation was spent, from the nodes' own settlement entries. ε reserved by a query "
        "that has not finished yet is not spent; ε returned (a denied, expired or failed "
        "query) never counts.</p>"
        f"{body}</section>"
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (module docstring), drawn from ``report``
    (:func:`build_report`'s JSON) alone."""
    summary = report["summary"]
    nodes, failed = summary["nodes"], summary["not_verified"]
    alerts = summary["alerts"]
    totals = report["totals"]
    tiles = [
        (
            f"{len(summary['verified'])} / {len(nodes)}",
            "node logs verified",
            "bad" if failed or not nodes else "good",
        ),
        (str(alerts["HIGH"]), "HIGH alerts", "bad" if alerts["HIGH"] else "good"),
        (f"{totals['queries']:,}", "queries received", ""),
        (f"{totals['refusals']:,}", "refusals", ""),
        (totals["epsilon"]["spent"], "ε spent in the period", ""),
    ]
    tile_html = "".join(
        f'<div class="tile {css}"><div class="n">{_e(n)}</div>'
        f'<div class="l">{_e(label)}</div></div>'
        for n, label, css in tiles
    )
    reasons = [
        f"<li><b>{_e(n['node'])}</b>: {_e(_first_problem(n))}</li>"
        for n in report["nodes"]
        if not n["verified"]
    ]
    not_verified = (
        f'<div class="failed" id="not-verified">These logs did not verify; nothing of them is '
        f"counted in this report:<ul>{''.join(reasons)}</ul></div>"
        if reasons
        else ""
    )
    title = f"Security assessment report — federation {report['federation']}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        # No script may run on this page, whatever a log entry holds.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} (安全评估报告)</title><style>{_CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{_e(title)}</h1>'
        f'<div class="sub">安全评估报告 · period {_e(period_text(report))} · prepared by '
        f"auditor {_e(report['auditor'])} on {_e(utc_text(report['generated_ms']))}</div>"
        '</div></header><main class="wrap">'
        f'<section id="summary-section"><h2>Summary</h2>'
        f'<p class="summary" id="summary">{_e(summary_text(report))}</p>{not_verified}'
        f'<div class="tiles">{tile_html}</div></section>'
        f"{_verification_section(report)}{_alerts_section(report)}"
        f"{_activity_section(report)}{_epsilon_section(report)}"
        '</main><footer class="wrap">Written by <code>govshare audit report</code> from the '
        "auditor's verified copies of the nodes' signed audit logs. The data this page shows is "
        "embedded below as JSON (<code>govshare audit report --json</code> prints the same); "
        f"format <code>{_e(report['format'])}</code>.</footer>"
        '<script type="application/json" id="report-data">'
        f"{embedded_json(report)}</script></body></html>\n"
    )


def write_html(path: Path, report: Mapping[str, Any]) -> None:
    """Write :func:`render_html` of ``report`` to ``path`` (a temporary file renamed over it:
    a reader never sees half a page)."""
    text = render_html(report)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
