"""Plans of joint aggregates (DESIGN.md protocols 2 and 3) and the figures they release.

The body of the analyst's signed request for an aggregate is one of these plans as canonical
JSON. Every node reads the same plan, finds its part, and derives from it — never from anything
it is told later — the figures, the DP noise scales and the Paillier packing, so the parties
agree on them without a message.

Intersection aggregate (``intersection_aggregate``, protocol 2)::

    {"kind": "intersection_aggregate",
     "purpose": "assistance eligibility review",
     "values":  {"node": "civil", "dataset": "assistance", "column": "id_number",
                 "where": [["year", "=", 2025]]},          # the value holder V
     "matcher": {"node": "tax", "dataset": "residents", "column": "id_number",
                 "where": [["income_band", "=", "high"]]},  # the matcher M
     "group_by": {"column": "district", "domain": ["Dongcheng", ...]},   # V's column, or null
                                       # {"column": ..., "domain": [...], "side": "matcher"}:
                                       # M's column (at most MAX_MATCHER_GROUPS labels)
     "sums": [{"column": "amount", "bound": 30000}],        # V's columns
     "epsilon": "0.5",                 # or null with "exact": true (approved, no GROUP BY)
     "scheme": "bfv-simd",             # or "paillier" (absent: paillier)
     "public_key": "<hex>"}            # paillier: the fresh DjnPublicKey.to_bytes();
                                       # bfv-simd: SHA-256 of the public key bundle

Under ``bfv-simd`` (``govshare.protocols.bfv_simd``) every node derives the slot layout and the
number of CRT plaintext moduli from the plan (:meth:`IntersectionPlan.simd_shape`); the bundle
of public and Galois keys travels with ``Aggregate.Run`` and must hash to ``public_key``.

**Groups on either side.** With the group column on V's side (the default, ``"side"`` absent)
V packs each key's figures one-hot over the groups (:attr:`IntersectionPlan.value_cells` is
every (group, figure) cell) and M sums one result. With ``"side": "matcher"`` V packs only the
figures of each key (count, sums) and M sums them into one result per group of its own
(:attr:`IntersectionPlan.matcher_groups`): M masks the keys of each group under a scalar of
their own, so it tells a matched position's group without learning which of its keys it is.
A join key of M's filtered rows must carry one label of the domain (M refuses a key with two:
the groups must stay disjoint for the DP accounting below). Either way the result is the same
(group, figure) cells in the same order, so the analyst reads both alike.

Horizontal aggregate (``horizontal_aggregate``, protocol 3)::

    {"kind": "horizontal_aggregate",
     "purpose": "...",
     "parts": [{"node": "tax", "dataset": "visits", "where": []}, ...],   # same schema
     "group_by": {"column": "age_band", "domain": [...]},
     "sums": [{"column": "visits", "bound": 100}],
     "epsilon": "1",
     "aggregator": "tax",                  # one of the parts' nodes: sums the ciphertexts
     "scheme": "paillier",                 # or "bfv" for wide vectors
     "public_key": "<hex>"}                # paillier: the key; bfv: SHA-256 of the context

**Figures.** Per group (in domain order; a single unnamed group without GROUP BY): ``count``
(rows), then ``sum:<column>`` for each SUM column. A row's SUM value is clipped to ``[0,
bound]``; the bound is the SUM's sensitivity, so the analyst picks it at or above the column's
true maximum to get an exact (noise-free) sum. It is in the column's stored units (fen for yuan
kept to 2 decimal places): the analyst's client converts the bound written in the declared unit
with the scale the value holder's catalogue gives, before it signs.

**DP** (DESIGN.md protocol 4). Unit of privacy: one row of a dataset (record-level DP; a resident
with ``r`` rows is protected at ``r * epsilon``). One row changes exactly one group's figures
(groups are disjoint: parallel composition), by 1 in ``count`` and by at most ``bound`` in each
``sum``. The query's ε is split evenly over the ``1 + len(sums)`` figures of a group, so figure
``f`` gets discrete Laplace noise of scale ``sensitivity_f * (1 + len(sums)) / epsilon``
(:func:`noise_scales`), and the whole release is ε-DP by basic composition. AVG is the noisy
sum over the noisy count, post-processing. With M's groups the same holds: M refuses a join key
in two of its groups, so a row of V's still lands in one group, and a row of M's changes one
group's figures as it would change the one total of a plan without groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Final

from govshare.model.governance import ColumnAccess, ColumnUse, QueryKind
from govshare.model.query_plan import Side, _condition, _side, _text, parse_release, release_json
from govshare.protocols import dp
from govshare.protocols.errors import MalformedInput
from govshare.protocols.paillier import PackingLayout, Slot

AGGREGATE_KINDS: Final = (QueryKind.INTERSECTION_AGGREGATE, QueryKind.HORIZONTAL_AGGREGATE)
PAILLIER: Final = "paillier"
BFV: Final = "bfv"
SCHEMES: Final = (PAILLIER, BFV)
BFV_SIMD: Final = "bfv-simd"
INTERSECTION_SCHEMES: Final = (PAILLIER, BFV_SIMD)
# Groups one query may ask for (a declared domain is short; this bounds the vector a plan
# can make every node compute and encrypt).
MAX_GROUPS: Final = 4096
# Groups on the matcher's side: each is one more masking of every streamed key at the matcher
# and one more result per plaintext (issue 15 asks for up to 16).
MAX_MATCHER_GROUPS: Final = 16
VALUES_SIDE: Final = "values"
MATCHER_SIDE: Final = "matcher"
MAX_SUMS: Final = 8
MAX_PARTS: Final = 64
# Largest SUM clipping bound: a 2^40 bound keeps every packed slot far inside a 3072-bit
# plaintext and the horizontal totals inside 64 bits.
MAX_BOUND: Final = 1 << 40
# Intersection aggregate: rows of the value holder that may share one join key (they travel as
# one ciphertext per key, so the matcher sees distinct keys only), and keys that may be summed.
MAX_ROWS_PER_KEY: Final = 16
MAX_KEYS: Final = 1 << 24
# P(|noise| > noise bound) <= 2^-64 per slot: a packed noise share never overflows its slot.
NOISE_FAILURE_BITS: Final = 64
COUNT: Final = "count"


@dataclass(frozen=True)
class SumSpec:
    column: str
    bound: int


@dataclass(frozen=True)
class GroupSpec:
    column: str
    domain: tuple[str, ...]
    # An intersection aggregate's group column belongs to the value holder (``values``) or to
    # the matcher (``matcher``); a horizontal aggregate's to every part (``values``).
    side: str = VALUES_SIDE


@dataclass(frozen=True)
class Part:
    """One node's dataset in a horizontal aggregate."""

    node: str
    dataset: str
    where: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Figures:
    """What an aggregate releases: groups x (count, sums), and the DP parameters."""

    group_by: GroupSpec | None
    sums: tuple[SumSpec, ...]
    epsilon: Fraction | None
    exact: bool = False

    @property
    def groups(self) -> tuple[str, ...]:
        return self.group_by.domain if self.group_by else ("",)

    @property
    def names(self) -> tuple[str, ...]:
        """Figure names within a group: ``count``, ``sum:<column>``..."""
        return (COUNT, *(f"sum:{s.column}" for s in self.sums))

    @property
    def cells(self) -> tuple[tuple[str, str], ...]:
        """(group, figure) in wire order: group-major."""
        return tuple((g, f) for g in self.groups for f in self.names)

    def sensitivity(self, figure: str) -> int:
        if figure == COUNT:
            return 1
        for spec in self.sums:
            if figure == f"sum:{spec.column}":
                return spec.bound
        raise MalformedInput(f"unknown figure {figure!r}", field="figure")

    def noise_scales(self) -> dict[str, Fraction]:
        """Discrete Laplace scale per figure (see the module docstring); empty without DP."""
        if self.epsilon is None:
            return {}
        share = self.epsilon / len(self.names)
        return {
            f: dp.laplace_scale(epsilon=share, sensitivity=self.sensitivity(f)) for f in self.names
        }

    def noise_bound(self) -> int:
        scales = self.noise_scales()
        if not scales:
            return 0
        return dp.laplace_tail_bound(max(scales.values()), failure_bits=NOISE_FAILURE_BITS)

    def to_json(self) -> dict[str, Any]:
        group: dict[str, Any] | None = None
        if self.group_by is not None:
            group = {"column": self.group_by.column, "domain": list(self.group_by.domain)}
            if self.group_by.side != VALUES_SIDE:  # plans of V's groups read as they always did
                group["side"] = self.group_by.side
        return {
            "group_by": group,
            "sums": [{"column": s.column, "bound": s.bound} for s in self.sums],
            **release_json(self.epsilon, self.exact),
        }


def slot_name(group: str, figure: str) -> str:
    return f"{figure}@{group}"


@dataclass(frozen=True)
class IntersectionPlan:
    kind: QueryKind
    purpose: str
    values: Side
    matcher: Side
    figures: Figures
    public_key: bytes
    scheme: str = PAILLIER

    @property
    def nodes(self) -> tuple[str, str]:
        return self.values.node, self.matcher.node

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "purpose": self.purpose,
            "values": self.values.to_json(),
            "matcher": self.matcher.to_json(),
            **self.figures.to_json(),
            "scheme": self.scheme,
            "public_key": self.public_key.hex(),
        }

    @property
    def groups_on_matcher(self) -> bool:
        group = self.figures.group_by
        return group is not None and group.side == MATCHER_SIDE

    @property
    def value_cells(self) -> tuple[tuple[str, str], ...]:
        """The (group, figure) cells V packs per key: every cell with V's groups (one-hot), the
        figures alone (group ``""``) with M's."""
        if self.groups_on_matcher:
            return tuple(("", f) for f in self.figures.names)
        return self.figures.cells

    @property
    def matcher_groups(self) -> tuple[str, ...]:
        """The groups M sums separately, one result each (``("",)``: one result)."""
        return self.figures.groups if self.groups_on_matcher else ("",)

    def max_abs_total(self) -> int:
        """The largest |total + noise| of any cell: every key summed at its bound."""
        figures = self.figures
        largest = max(figures.sensitivity(f) for f in figures.names)
        return MAX_KEYS * MAX_ROWS_PER_KEY * largest + figures.noise_bound()

    @property
    def sums_at_values(self) -> bool:
        """``bfv-simd`` without M's groups: M encrypts its selection bits and V sums its own
        values under them (``govshare.protocols.bfv_simd``, "Sums at the value holder")."""
        return self.scheme == BFV_SIMD and not self.groups_on_matcher

    @property
    def releasing(self) -> str:
        """The node that releases the result to the analyst (and adds the DP noise)."""
        return self.values.node if self.sums_at_values else self.matcher.node

    def simd_shape(self) -> Any:
        """The ``bfv-simd`` layout: one slot per (group, figure) cell, and the CRT moduli."""
        from govshare.protocols import bfv_simd  # TenSEAL is loaded only where it is used

        moduli = bfv_simd.moduli_for(self.max_abs_total())
        if self.sums_at_values:
            return bfv_simd.selection_shape(len(self.value_cells), moduli)
        return bfv_simd.SimdShape(len(self.value_cells), moduli, len(self.matcher_groups))

    def layouts(self, modulus_bits: int) -> tuple[PackingLayout, ...]:
        """The packing of one key's row values (:attr:`value_cells`) into plaintexts; with M's
        groups, M sums one set of these per group.

        Each slot takes at most :data:`MAX_ROWS_PER_KEY` rows' worth per key and
        :data:`MAX_KEYS` keys; with DP, one noise share (the matcher's) per slot.
        """
        figures = self.figures
        slots = [
            Slot(slot_name(g, f), MAX_ROWS_PER_KEY * figures.sensitivity(f))
            for g, f in self.value_cells
        ]
        return PackingLayout.split(
            slots,
            max_rows=MAX_KEYS,
            modulus_bits=modulus_bits,
            noise_bound=figures.noise_bound(),
            noise_shares=0 if figures.epsilon is None else 1,
        )

    def accesses(self, node: str) -> tuple[str, tuple[ColumnAccess, ...], tuple[Any, ...]]:
        """(dataset, column uses, filters) of ``node``'s side, for the policy decision."""
        on_matcher = self.groups_on_matcher
        if node == self.values.node:
            uses = list(self.values.accesses(release=False))
            uses.extend(_figure_accesses(self.figures, group=not on_matcher))
            return self.values.dataset, tuple(uses), self.values.where
        if node == self.matcher.node:
            uses = list(self.matcher.accesses(release=False))
            if on_matcher:
                uses.extend(_figure_accesses(replace(self.figures, sums=()), group=True))
            return self.matcher.dataset, tuple(uses), self.matcher.where
        raise MalformedInput(f"the query does not involve node {node}", field="values")


@dataclass(frozen=True)
class HorizontalPlan:
    kind: QueryKind
    purpose: str
    parts: tuple[Part, ...]
    figures: Figures
    aggregator: str
    scheme: str
    public_key: bytes  # paillier: DjnPublicKey bytes; bfv: SHA-256 of the public context

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(p.node for p in self.parts)

    @property
    def designated(self) -> str:
        """The node that adds the whole DP noise (``dp.designated_node``)."""
        return dp.designated_node(self.nodes)

    def part(self, node: str) -> Part:
        for part in self.parts:
            if part.node == node:
                return part
        raise MalformedInput(f"the query does not involve node {node}", field="parts")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "purpose": self.purpose,
            "parts": [
                {
                    "node": p.node,
                    "dataset": p.dataset,
                    "where": Side(p.node, p.dataset, "-", p.where).to_json()["where"],
                }
                for p in self.parts
            ],
            **self.figures.to_json(),
            "aggregator": self.aggregator,
            "scheme": self.scheme,
            "public_key": self.public_key.hex(),
        }

    def layouts(self, modulus_bits: int) -> tuple[PackingLayout, ...]:
        """Paillier packing of a u64 vector: each slot sums one word over every node."""
        slots = [Slot(slot_name(g, f), (1 << 64) - 1) for g, f in self.figures.cells]
        return PackingLayout.split(slots, max_rows=len(self.parts), modulus_bits=modulus_bits)

    def accesses(self, node: str) -> tuple[str, tuple[ColumnAccess, ...], tuple[Any, ...]]:
        part = self.part(node)
        filters = Side(part.node, part.dataset, "-", part.where).accesses(release=False)[1:]
        return part.dataset, (*_figure_accesses(self.figures), *filters), part.where


def _figure_accesses(figures: Figures, *, group: bool = True) -> list[ColumnAccess]:
    uses = [ColumnAccess(s.column, ColumnUse.AGGREGATE) for s in figures.sums]
    if group and figures.group_by is not None:
        uses.append(ColumnAccess(figures.group_by.column, ColumnUse.GROUP, figures.group_by.domain))
    return uses


AggregatePlan = IntersectionPlan | HorizontalPlan


# --------------------------------------------------------------------------- parsing


def _int(raw: Any, field: str, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise MalformedInput(f"field {field!r} must be an integer in [{low}, {high}]", field=field)
    return raw


def _figures(raw: dict[str, Any]) -> Figures:
    group_raw = raw.get("group_by")
    group: GroupSpec | None = None
    if group_raw is not None:
        if not isinstance(group_raw, dict):
            raise MalformedInput("field 'group_by' must be an object or null", field="group_by")
        domain = group_raw.get("domain")
        if not isinstance(domain, list) or not 1 <= len(domain) <= MAX_GROUPS:
            raise MalformedInput(
                f"field 'group_by.domain' must list 1 to {MAX_GROUPS} labels",
                field="group_by.domain",
            )
        labels = tuple(_text(d, "group_by.domain") for d in domain)
        if len(set(labels)) != len(labels):
            raise MalformedInput("field 'group_by.domain' repeats a label", field="group_by")
        side = group_raw.get("side", VALUES_SIDE)
        if side not in (VALUES_SIDE, MATCHER_SIDE):
            raise MalformedInput(
                f"field 'group_by.side' must be {VALUES_SIDE} or {MATCHER_SIDE}",
                field="group_by.side",
            )
        if side == MATCHER_SIDE and len(labels) > MAX_MATCHER_GROUPS:
            raise MalformedInput(
                f"field 'group_by.domain': at most {MAX_MATCHER_GROUPS} groups on the matcher's "
                "side",
                field="group_by.domain",
            )
        group = GroupSpec(_text(group_raw.get("column"), "group_by.column"), labels, side)
    sums_raw = raw.get("sums", [])
    if not isinstance(sums_raw, list) or len(sums_raw) > MAX_SUMS:
        raise MalformedInput(f"field 'sums' must list at most {MAX_SUMS} sums", field="sums")
    sums = []
    for item in sums_raw:
        if not isinstance(item, dict):
            raise MalformedInput("field 'sums': each is {column, bound}", field="sums")
        sums.append(
            SumSpec(
                _text(item.get("column"), "sums.column"),
                _int(item.get("bound"), "sums.bound", 1, MAX_BOUND),
            )
        )
    if len({s.column for s in sums}) != len(sums):
        raise MalformedInput("field 'sums' repeats a column", field="sums")
    epsilon, exact = parse_release(raw)
    return Figures(group, tuple(sums), epsilon, exact)


def _hex(raw: Any, field: str) -> bytes:
    if not isinstance(raw, str) or not raw:
        raise MalformedInput(f"field {field!r} must be hex", field=field)
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise MalformedInput(f"field {field!r} must be hex", field=field) from None


def parse_aggregate_plan(raw: Any, *, kind: str) -> AggregatePlan:
    """Parse an aggregate request body; ``kind`` is the request's signed kind and must match.

    Raises:
        MalformedInput: naming the field that is wrong.
    """
    if not isinstance(raw, dict):
        raise MalformedInput("query body must be a JSON object", field="body")
    if raw.get("kind") != kind or kind not in {k.value for k in AGGREGATE_KINDS}:
        raise MalformedInput("field 'kind' disagrees with the signed kind", field="kind")
    query_kind = QueryKind(kind)
    purpose = _text(raw.get("purpose"), "purpose")
    figures = _figures(raw)
    public_key = _hex(raw.get("public_key"), "public_key")
    if query_kind is QueryKind.INTERSECTION_AGGREGATE:
        values, matcher = _side(raw.get("values"), "values"), _side(raw.get("matcher"), "matcher")
        if values.node == matcher.node:
            raise MalformedInput("an intersection joins two different nodes", field="matcher")
        scheme = raw.get("scheme", PAILLIER)
        if scheme not in INTERSECTION_SCHEMES:
            raise MalformedInput(
                f"field 'scheme' must be one of {', '.join(INTERSECTION_SCHEMES)}", field="scheme"
            )
        if scheme == BFV_SIMD and len(public_key) != 32:
            raise MalformedInput(
                "field 'public_key': a bfv-simd plan carries a SHA-256", field="public_key"
            )
        return IntersectionPlan(
            query_kind, purpose, values, matcher, figures, public_key, str(scheme)
        )
    parts_raw = raw.get("parts")
    if not isinstance(parts_raw, list) or not 2 <= len(parts_raw) <= MAX_PARTS:
        raise MalformedInput(f"field 'parts' must list 2 to {MAX_PARTS} parts", field="parts")
    parts = []
    for item in parts_raw:
        if not isinstance(item, dict):
            raise MalformedInput("field 'parts': each is {node, dataset, where}", field="parts")
        where = item.get("where", [])
        if not isinstance(where, list) or len(where) > 16:
            raise MalformedInput("field 'parts.where' must be a list of filters", field="parts")
        parts.append(
            Part(
                _text(item.get("node"), "parts.node"),
                _text(item.get("dataset"), "parts.dataset"),
                tuple(_condition(c, "parts.where") for c in where),
            )
        )
    if len({p.node for p in parts}) != len(parts):
        raise MalformedInput("field 'parts': one part per node", field="parts")
    aggregator = _text(raw.get("aggregator"), "aggregator")
    if aggregator not in {p.node for p in parts}:
        raise MalformedInput(
            "field 'aggregator' must be one of the parts' nodes", field="aggregator"
        )
    if figures.group_by is not None and figures.group_by.side != VALUES_SIDE:
        raise MalformedInput(
            "field 'group_by.side': a horizontal aggregate groups every part alike",
            field="group_by.side",
        )
    scheme = raw.get("scheme")
    if scheme not in SCHEMES:
        raise MalformedInput(f"field 'scheme' must be one of {', '.join(SCHEMES)}", field="scheme")
    if scheme == BFV and len(public_key) != 32:
        raise MalformedInput("field 'public_key': a BFV plan carries a SHA-256", field="public_key")
    return HorizontalPlan(
        query_kind, purpose, tuple(parts), figures, aggregator, str(scheme), public_key
    )
