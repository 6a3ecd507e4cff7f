"""The analyst's side of joint aggregates: fresh key, sign, submit, approve, run, decrypt, prove.

Per query the analyst draws a fresh Paillier key (3072 bits by default) — or, for a wide
horizontal vector, a fresh BFV context — signs the plan carrying the public key (BFV: its
SHA-256; the context itself travels with ``Aggregate.Run``), submits it to every node
(``Query.Submit``), waits for approvals, runs every node's part at once, decrypts the one
result, and verifies the receipt made of every node's ``result.released`` entry.

Released figures: per group the noisy count and sums, each with its discrete Laplace scale and
the half-width of its 95% interval (``dp.laplace_interval``); AVG = sum / count. A group whose
noisy count is below k (the largest of the nodes' ``min_group_size``) is suppressed: all its
figures are withheld.

The BFV modules (``protocols.bfv``, ``protocols.bfv_simd``: tenseal and numpy) are imported
where a query draws or uses a BFV key, so that a Paillier query starts without them. The
``govshare query`` commands that run no aggregate (``query psi``, ``query results``, every
``--help``) do not import this module at all (it loads grpc and sqlglot): its defaults are in
``client/aggregate_defaults.py``; tests/cli/test_cli_lazy.py checks it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

from govshare.client.aggregate_defaults import DEFAULT_INTERSECTION_SCHEME, DEFAULT_SUM_BOUND
from govshare.client.analyst import (
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_RUN_TIMEOUT,
    POLL_SECONDS,
    StatusCallback,
    ask,
    signed_body,
)
from govshare.client.sql import AggregateColumns, UnionQuery, aggregate_columns, parse_query
from govshare.model.aggregate_plan import (
    BFV,
    BFV_SIMD,
    COUNT,
    MATCHER_SIDE,
    MAX_BOUND,
    MAX_MATCHER_GROUPS,
    PAILLIER,
    VALUES_SIDE,
    AggregatePlan,
    Figures,
    GroupSpec,
    HorizontalPlan,
    IntersectionPlan,
    Part,
    SumSpec,
    slot_name,
)
from govshare.model.digests import digests_for
from govshare.model.epsilon import parse_epsilon
from govshare.model.fixed_point import OutOfRange, TooManyPlaces, to_fixed_point
from govshare.model.governance import QueryKind, column_scales
from govshare.model.identity import Identity
from govshare.model.query_plan import Side
from govshare.protocols import dp, masks
from govshare.protocols.errors import MalformedInput, Unavailable
from govshare.protocols.paillier import DEFAULT_N_BITS, decrypt_unpack, generate_keypair
from govshare.protocols.receipt import Receipt
from govshare.rpc.client import DEFAULT_TIMEOUT, NodeClient
from govshare.v1 import aggregate_pb2

# Horizontal vectors up to this many words go under Paillier (a few ciphertexts); wider ones
# (histograms, cross-tabs) under BFV, whose ciphertext holds 4096 words.
PAILLIER_MAX_WORDS = 128


@dataclass(frozen=True)
class Figure:
    """One released number: ``value`` (None when suppressed), its noise scale and the
    half-width of its 95% interval (both None without DP)."""

    value: int | None
    noise_scale: Fraction | None
    interval: int | None


@dataclass(frozen=True)
class GroupResult:
    label: str
    count: Figure
    sums: dict[str, Figure]
    averages: dict[str, Fraction | None]
    suppressed: bool


@dataclass(frozen=True)
class Budget:
    grant_id: str
    epsilon_spent: Fraction
    epsilon_remaining: Fraction


@dataclass(frozen=True)
class AggregateOutcome:
    query_id: str
    kind: QueryKind
    groups: tuple[GroupResult, ...]
    epsilon: Fraction | None
    min_group_size: int
    budgets: dict[str, Budget]
    scheme: str
    receipt: Receipt | None  # None: see receipt_error (the result stands)
    body: dict[str, Any] = field(default_factory=dict)  # the signed plan (and its SQL)
    receipt_error: str | None = None
    # Decimal places of each SUM column kept at a scale: a sum s reads s / 10^places in the
    # column's declared unit (the nodes holding it said so); ``unit_warning`` when they differ.
    units: dict[str, int] = field(default_factory=dict)
    unit_warning: str | None = None


@dataclass
class _Key:
    scheme: str
    public: bytes  # what the plan carries
    context: bytes = b""  # BFV public context (sent with Run)
    paillier: object = None
    secret: object = None


def _paillier_key(bits: int, unsafe: bool) -> _Key:
    public, private = generate_keypair(bits, unsafe_allow_short_modulus=unsafe)
    return _Key(PAILLIER, public.to_bytes(), paillier=public, secret=private)


def run_intersection_aggregate(
    identity: Identity,
    plan: IntersectionPlan,
    *,
    scheme: str | None = None,
    key_bits: int = DEFAULT_N_BITS,
    unsafe_allow_short_modulus: bool = False,
    on_status: StatusCallback | None = None,
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    poll: float = POLL_SECONDS,
    sql: str | None = None,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> AggregateOutcome:
    """Ask an intersection aggregate (``plan.public_key`` is replaced by a fresh key).

    ``scheme`` (default: the plan's) is ``paillier`` (one DJN-Paillier ciphertext per key,
    ``key_bits``) or ``bfv-simd`` (BFV slots, ``govshare.protocols.bfv_simd``: fresh keys per
    query; only the public and Galois keys leave this program). ``call_timeout``: the deadline
    of each call to a node but the run (:func:`govshare.client.analyst.ask`).

    Raises: as :func:`govshare.client.analyst.run_psi`.
    """
    scheme = scheme or plan.scheme
    if scheme == BFV_SIMD:
        from govshare.protocols.bfv_simd import SimdSecretKeys

        plan = replace(plan, scheme=BFV_SIMD)
        secret = SimdSecretKeys(plan.simd_shape())
        bundle = secret.public_bundle()
        fingerprint = digests_for(identity.roster.crypto).key_fingerprint(bundle)
        key = _Key(BFV_SIMD, fingerprint, context=bundle, secret=secret)
    elif scheme == PAILLIER:
        key = _paillier_key(key_bits, unsafe_allow_short_modulus)
    else:
        raise MalformedInput(f"unknown scheme {scheme!r}", field="scheme")
    plan = IntersectionPlan(
        plan.kind, plan.purpose, plan.values, plan.matcher, plan.figures, key.public, scheme
    )
    return _run(
        identity, plan, key, on_status, approval_timeout, run_timeout, poll, sql, call_timeout
    )


def run_horizontal_aggregate(
    identity: Identity,
    plan: HorizontalPlan,
    *,
    key_bits: int = DEFAULT_N_BITS,
    unsafe_allow_short_modulus: bool = False,
    on_status: StatusCallback | None = None,
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    poll: float = POLL_SECONDS,
    sql: str | None = None,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> AggregateOutcome:
    """Ask a horizontal aggregate; ``plan.scheme`` picks Paillier or BFV (fresh key either way).
    ``call_timeout``: the deadline of each call to a node but the run
    (:func:`govshare.client.analyst.ask`).

    Raises: as :func:`govshare.client.analyst.run_psi`.
    """
    if plan.scheme == BFV:
        from govshare.protocols.bfv import BfvSecretContext

        context = BfvSecretContext.create()
        public_context = context.public_bytes()
        fingerprint = digests_for(identity.roster.crypto).key_fingerprint(public_context)
        key = _Key(BFV, fingerprint, context=public_context, secret=context)
    else:
        key = _paillier_key(key_bits, unsafe_allow_short_modulus)
    plan = HorizontalPlan(
        plan.kind, plan.purpose, plan.parts, plan.figures, plan.aggregator, plan.scheme,
        key.public,
    )  # fmt: skip
    return _run(
        identity, plan, key, on_status, approval_timeout, run_timeout, poll, sql, call_timeout
    )


def pick_scheme(figures: Figures) -> str:
    """Paillier for short vectors, BFV for wide ones."""
    return PAILLIER if len(figures.cells) <= PAILLIER_MAX_WORDS else BFV


def _run(
    identity: Identity,
    plan: AggregatePlan,
    key: _Key,
    on_status: StatusCallback | None,
    approval_timeout: float,
    run_timeout: float,
    poll: float,
    sql: str | None,
    call_timeout: float,
) -> AggregateOutcome:
    keys: list[aggregate_pb2.EphemeralKey] = []
    body = signed_body(plan.to_json(), sql)

    def prepare(clients: dict[str, NodeClient], query_id: str) -> None:
        if isinstance(plan, HorizontalPlan):
            keys.extend(clients[n].aggregate_prepare(query_id) for n in plan.nodes)

    asked = ask(
        identity,
        kind=plan.kind.value,
        body=body,
        nodes=list(plan.nodes),
        prepare=prepare,
        run=lambda client, query_id: client.aggregate_run(
            query_id, keys=keys, public_context=key.context, timeout=run_timeout
        ),
        on_status=on_status,
        running="encrypting and exchanging",
        approval_timeout=approval_timeout,
        poll=poll,
        call_timeout=call_timeout,
    )
    query_id, results, receipt = asked.query_id, asked.outputs, asked.receipt
    releasing = plan.releasing if isinstance(plan, IntersectionPlan) else plan.aggregator
    totals = _decrypt(plan, key, list(results[releasing].ciphertexts))
    k = max(int(r.min_group_size) for r in results.values())
    budgets = {
        n: Budget(r.grant_id, parse_epsilon(r.epsilon_spent), parse_epsilon(r.epsilon_remaining))
        for n, r in results.items()
    }
    return AggregateOutcome(
        query_id=query_id,
        kind=plan.kind,
        groups=release_groups(plan.figures, totals, k),
        epsilon=plan.figures.epsilon,
        min_group_size=k,
        budgets=budgets,
        scheme=key.scheme,
        receipt=receipt,
        body=body,
        receipt_error=asked.receipt_error,
        **result_units(plan, results),
    )


def result_units(
    plan: AggregatePlan, results: Mapping[str, aggregate_pb2.AggregateResult]
) -> dict[str, Any]:
    """``units`` and ``unit_warning`` of an outcome from the nodes' column scales. A column the
    nodes keep at different scales (a horizontal sum of fen and yuan) gets no unit, and a
    warning that its sum mixes units; a scale out of range is a warning too (the result was
    released: it is shown as summed, never lost)."""
    told: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for node, result in results.items():
        try:
            told[node] = column_scales(dict(result.column_scales), where=f"node {node}'s result")
        except MalformedInput as exc:
            told[node] = {}
            problems.append(f"{exc}; its sums are shown as summed")
    holders = (
        [plan.values.node] if isinstance(plan, IntersectionPlan) else [p.node for p in plan.parts]
    )
    units: dict[str, int] = {}
    mixed: list[str] = []
    for column in (s.column for s in plan.figures.sums):
        places = {told[n].get(column, 0) for n in holders if n in told}
        if len(places) > 1:
            mixed.append(column)
        elif places and (only := places.pop()):
            units[column] = only
    if mixed:
        problems.append(
            f"SUM({', '.join(mixed)}) adds values the nodes keep at different decimal scales: "
            "the total mixes units"
        )
    return {"units": units, "unit_warning": "; ".join(problems) or None}


def _decrypt(plan: AggregatePlan, key: _Key, ciphertexts: list[bytes]) -> dict[str, int]:
    """Slot name -> decrypted total (noise included, masks removed)."""
    figures = plan.figures
    if key.scheme == BFV_SIMD:
        from govshare.protocols.bfv_simd import SimdSecretKeys

        if not isinstance(key.secret, SimdSecretKeys):  # pragma: no cover - built above
            raise TypeError("BFV-SIMD keys expected")
        cells = key.secret.decrypt(ciphertexts, cells=len(figures.cells))
        return {slot_name(g, f): v for (g, f), v in zip(figures.cells, cells, strict=True)}
    if key.scheme == BFV:
        from govshare.protocols.bfv import BfvSecretContext

        if not isinstance(key.secret, BfvSecretContext):  # pragma: no cover - built above
            raise TypeError("BFV key expected")
        words = key.secret.decrypt(ciphertexts)
        if len(words) != len(figures.cells):
            raise MalformedInput("the result has the wrong length", field="ciphertexts")
        return {
            slot_name(g, f): masks.from_u64_signed(w)
            for (g, f), w in zip(figures.cells, words, strict=True)
        }
    from govshare.protocols.paillier import DjnPublicKey

    public = key.paillier
    if not isinstance(public, DjnPublicKey):  # pragma: no cover - built above
        raise TypeError("Paillier key expected")
    layouts = plan.layouts(public.n_bits)
    # The matcher's groups (intersection, group column on its side): one set of layouts each.
    groups = plan.matcher_groups if isinstance(plan, IntersectionPlan) else ("",)
    if len(ciphertexts) != len(layouts) * len(groups):
        raise MalformedInput("the result has the wrong number of ciphertexts", field="ciphertexts")
    totals: dict[str, int] = {}
    for g, group in enumerate(groups):
        mine = ciphertexts[g * len(layouts) : (g + 1) * len(layouts)]
        for layout, data in zip(layouts, mine, strict=True):
            values = decrypt_unpack(key.secret, public.ciphertext_from_bytes(data), layout)
            if isinstance(plan, HorizontalPlan):
                values = {
                    s: masks.from_u64_signed(v % masks.MASK_MODULUS) for s, v in values.items()
                }
            if group:  # V packed the figures alone: the group is the matcher's
                values = {slot_name(group, s.split("@", 1)[0]): v for s, v in values.items()}
            totals.update(values)
    return totals


def release_groups(figures: Figures, totals: Mapping[str, int], k: int) -> tuple[GroupResult, ...]:
    """Turn decrypted slot totals into released figures, suppressing groups under ``k``."""
    scales = figures.noise_scales()
    intervals = {f: dp.laplace_interval(s) for f, s in scales.items()}
    out = []
    for group in figures.groups:
        count = totals[slot_name(group, COUNT)]
        hidden = dp.suppressed(count, k)

        def figure(name: str, value: int, hidden: bool = hidden) -> Figure:
            return Figure(None if hidden else value, scales.get(name), intervals.get(name))

        sums = {
            s.column: figure(f"sum:{s.column}", totals[slot_name(group, f"sum:{s.column}")])
            for s in figures.sums
        }
        averages: dict[str, Fraction | None] = {
            c: None if hidden or f.value is None or count <= 0 else Fraction(f.value, count)
            for c, f in sums.items()
        }
        out.append(GroupResult(group, figure(COUNT, count), sums, averages, hidden))
    return tuple(out)


def plan_nodes(plan: AggregatePlan) -> Sequence[str]:
    return plan.nodes


def run_aggregate_sql(
    identity: Identity,
    sql: str,
    purpose: str,
    epsilon: Fraction | None,
    *,
    exact: bool = False,
    sum_bound: Decimal | int = DEFAULT_SUM_BOUND,
    scheme: str = DEFAULT_INTERSECTION_SCHEME,
    on_status: StatusCallback | None = None,
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> AggregateOutcome:
    """Run an aggregate in govshare's SQL dialect (``govshare.client.sql``).

    ``scheme`` is the intersection aggregate's (``bfv-simd`` or ``paillier``).
    ``call_timeout`` is the deadline of each call to a node but the run: the catalogue reads
    below as well as the query's (:func:`govshare.client.analyst.ask`).

    - ``SELECT g, COUNT(*), SUM(v), AVG(v) FROM a JOIN b ON ... GROUP BY g``: an intersection
      aggregate; the table carrying the SUM columns (without SUMs, the GROUP BY column) holds
      the values; a GROUP BY column of the other table is grouped by the matcher.
    - ``SELECT ... FROM (SELECT * FROM n1.d UNION ALL SELECT * FROM n2.d ...) AS h ...``: a
      horizontal aggregate over every listed node, summed by the first.

    The GROUP BY domain is the group_key column's declared domain from the catalogue; each SUM
    is clipped to ``[0, sum_bound]`` (its sensitivity under DP), ``sum_bound`` in the column's
    declared unit: the scale the value holders' catalogues give turns it into the stored units
    the signed plan carries (:func:`stored_bound`). The figures carry DP noise of ``epsilon``,
    or are an exact release when ``exact`` (the nodes then wait for every operator's approval,
    and refuse GROUP BY).

    Raises:
        MalformedInput: SQL outside the dialect (named), columns of both tables in the
            aggregates, or a ``sum_bound`` a SUM column cannot take (:func:`stored_bound`).
        Unavailable: a value holder's catalogue could not be read, so a SUM column's scale is
            unknown; nothing was signed.
    """
    query = parse_query(sql)
    if isinstance(query, UnionQuery):
        columns = aggregate_columns(query.select, query.group_by)
        if {columns.alias, columns.group_alias} - {"", query.alias}:
            raise MalformedInput(f"unknown table alias {columns.alias!r}", field="sql")
        first = query.parts[0]
        holders = [(p.node, p.dataset) for p in query.parts]
        sums = sum_specs(identity, holders, columns.sums, sum_bound, timeout=call_timeout)
        figures = _figures(
            identity, first.node, first.dataset, columns, sums, epsilon, exact,
            timeout=call_timeout,
        )  # fmt: skip
        horizontal = HorizontalPlan(
            QueryKind.HORIZONTAL_AGGREGATE, purpose,
            tuple(Part(p.node, p.dataset, query.filters) for p in query.parts),
            figures, first.node, pick_scheme(figures), b"",
        )  # fmt: skip
        return run_horizontal_aggregate(
            identity, horizontal, on_status=on_status, approval_timeout=approval_timeout, sql=sql,
            call_timeout=call_timeout,
        )  # fmt: skip
    if query.is_count_star:
        raise MalformedInput(
            "a COUNT(*) join is a PSI cardinality: use 'govshare query sql' or 'query psi'",
            field="sql",
        )
    columns = aggregate_columns(query.select, query.group_by)
    tables = {query.left.alias: query.left, query.right.alias: query.right}
    keys = {query.left.alias: query.left_key, query.right.alias: query.right_key}
    alias = columns.alias or query.left.alias
    other = next(a for a in tables if a != alias)
    # GROUP BY the other table's column (SUMs on one table, groups on the other): the
    # matcher groups (at most MAX_MATCHER_GROUPS labels).
    group_table = tables[columns.group_alias or alias]
    values = tables[alias]
    sums = sum_specs(
        identity, [(values.node, values.dataset)], columns.sums, sum_bound, timeout=call_timeout
    )
    figures = _figures(
        identity, group_table.node, group_table.dataset, columns, sums, epsilon, exact,
        side=MATCHER_SIDE if columns.group_alias == other else VALUES_SIDE, timeout=call_timeout,
    )  # fmt: skip

    def side(a: str) -> Side:
        return Side(tables[a].node, tables[a].dataset, keys[a], query.filters[a])

    plan = IntersectionPlan(
        QueryKind.INTERSECTION_AGGREGATE, purpose, side(alias), side(other), figures, b"",
    )  # fmt: skip
    return run_intersection_aggregate(
        identity, plan, scheme=scheme, on_status=on_status, approval_timeout=approval_timeout,
        sql=sql, call_timeout=call_timeout,
    )  # fmt: skip


def _figures(
    identity: Identity,
    node: str,
    dataset: str,
    columns: AggregateColumns,
    sums: tuple[SumSpec, ...],
    epsilon: Fraction | None,
    exact: bool = False,
    side: str = VALUES_SIDE,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Figures:
    """The figures to release; a group column's domain comes from its catalogue entry (at
    ``node``'s ``dataset``, the group column's table; ``side`` says whose it is)."""
    group = None
    if columns.group is not None:
        with NodeClient.to(identity, node, timeout=timeout) as client:
            rule = client.describe_dataset(dataset).column(columns.group)
        if rule is None or not rule.domain:
            raise MalformedInput(f"{columns.group} has no declared group domain", field="sql")
        if side == MATCHER_SIDE and len(rule.domain) > MAX_MATCHER_GROUPS:
            raise MalformedInput(
                f"GROUP BY {columns.group}: {len(rule.domain)} groups on the table without the "
                f"sums; at most {MAX_MATCHER_GROUPS} there",
                field="sql",
            )
        group = GroupSpec(columns.group, rule.domain, side)
    return Figures(group, sums, epsilon, exact)


def sum_specs(
    identity: Identity,
    holders: Sequence[tuple[str, str]],
    columns: Sequence[str],
    bound: Decimal | int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[SumSpec, ...]:
    """Each SUM column with ``bound`` (in its declared unit) in the stored units the plan
    carries, at the scale the catalogues of its holders (``(node, dataset)`` pairs) give
    (each read with the call deadline ``timeout``).

    Raises:
        Unavailable: a holder's catalogue could not be read (its scale is not guessed).
        MalformedInput: the holders keep a column at different scales (a bound in the declared
            unit has no one stored value), or :func:`stored_bound` refuses the bound.
    """
    if not columns:
        return ()
    scales: dict[str, Mapping[str, int]] = {}
    for node, dataset in holders:
        try:
            with NodeClient.to(identity, node, timeout=timeout) as client:
                scales[node] = client.catalog_entry(dataset).scales
        except Unavailable as exc:
            raise Unavailable(
                f"the SUM bound is in each column's declared unit, and {node}.{dataset}'s "
                f"scale could not be read from its catalogue ({exc}); nothing was signed"
            ) from None
    specs = []
    for column in columns:
        kept = {node: scales[node].get(column, 0) for node, _ in holders}
        if len(set(kept.values())) > 1:
            told = ", ".join(f"{n} {p}" for n, p in kept.items())
            raise MalformedInput(
                f"SUM({column}): the nodes keep it to different decimal places ({told}), so "
                "a bound in its declared unit has no one stored value",
                field="sum_bound",
            )
        specs.append(SumSpec(column, stored_bound(column, bound, kept[holders[0][0]])))
    return tuple(specs)


def stored_bound(column: str, bound: Decimal | int, places: int) -> int:
    """``bound`` in SUM(``column``)'s declared unit as the integer the node stores
    (``bound * 10**places``), exactly, as the node converts a cell it imports
    (:func:`govshare.model.fixed_point.to_fixed_point`).

    Raises:
        MalformedInput: a bound that is not positive, that has more decimal places than the
            column keeps (it would have to be rounded), or that is over :data:`MAX_BOUND`
            stored units.
    """
    bound = Decimal(bound)
    kept = f"kept to {places} decimal places" if places else "kept in whole units"
    if places == 1:
        kept = "kept to 1 decimal place"
    if not bound.is_finite() or bound <= 0:
        raise MalformedInput(f"the SUM bound {bound} is not a positive number", field="sum_bound")
    sign, digits, exponent = bound.as_tuple()  # exactly as written: normalize() would round
    if not isinstance(exponent, int):  # pragma: no cover - finite above
        raise MalformedInput(f"the SUM bound {bound} is not a number", field="sum_bound")
    try:
        return to_fixed_point(
            bool(sign), "".join(map(str, digits)), exponent, places, limit=MAX_BOUND
        )
    except TooManyPlaces as exc:
        written = f"{exc.written} decimal place" + ("s" if exc.written > 1 else "")
        raise MalformedInput(
            f"the SUM bound {bound} has {written}; SUM({column}) is {kept} "
            "(catalog show), so the bound cannot be exact",
            field="sum_bound",
        ) from None
    except OutOfRange:
        largest = Decimal(MAX_BOUND).scaleb(-places)
        raise MalformedInput(
            f"the SUM bound {bound} is over the largest SUM({column}) takes: {largest:f} ({kept})",
            field="sum_bound",
        ) from None
