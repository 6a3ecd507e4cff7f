"""The policy decision: may this request use this dataset, and on what conditions?

:func:`decide` is a pure function of the request, the dataset's registration, the grants on the
dataset, the time, the holder node's jurisdiction, the cross-border assessments in force and what
the requester has used so far. It reads no store and writes no log: the query engine calls it
once per dataset, inside the transaction that reserves the query's budget, records the
:class:`Decision` (allowed or not) to the audit log, and then either refuses
(:meth:`Decision.raise_if_refused` raises :class:`PolicyRefused` naming the rule) or carries out
the query under the decision's :class:`Obligations`.

Admission order (every rule holds at the node; the analyst's own program may be hostile):

1. **Identity**: the caller is taken from its verified certificate (``govshare.node.api.auth``);
   only analysts and nodes ask queries (``role``).
2. **Grant** (使用权): a grant to the requester on this dataset that is unrevoked, unexpired,
   issued after the dataset was registered, signed by this node, for the same purpose, covering
   the query kind and every column used, with queries and ε left under its own caps
   (``grant.*``), and the requester's ε ledger on the dataset — one per (analyst, dataset),
   across all grants — with room for the query (``budget.dataset``). Nothing below is looked at
   for a requester who holds no usable grant, so a refusal at this step says nothing about the
   dataset's rules or rows.
3. **Rules of the data**: grade floors, sharing type, column rules, the release rules (noise by
   default, exact releases), the recipient, owner kind (cross-border) and jurisdiction.
4. **Approval**: the obligation ``requires_approval`` (important data, an operator's flag, or any
   exact release) leaves the query pending until the operator approves it.
5. Only then does the node read the data: the filtered set's floor (exact and record-level
   releases: ``set_size.minimum``, ``grade.important.min_group_size``) and the tracker check of
   exact releases (``filter.overlap``) run when the query runs (``govshare.node.queries.engine``),
   and
   their refusals name the rule and ``k``, never a count. A data-dependent refusal consumes the
   query like a run. A noised statistic has no set floor (obligation ``min_set_size`` 0): its
   noise covers every row, while a refusal on the true size would leak an exact bit.

A rate limit per analyst (``rate_limit``) is counted in the same transaction, before step 2.

Floors by grade (DESIGN.md, "Datasets and governance metadata"; GB/T 43697-2024 grades):

- ``core`` never takes part in a joint query (rule ``grade.core``).
- ``important``: aggregate query kinds only (``grade.important.aggregates_only``), DP noise on
  (``grade.important.requires_dp``), groups and filtered sets of at least
  :data:`IMPORTANT_MIN_GROUP_SIZE` = 10, per-query operator approval (obligation
  ``requires_approval``), and results only to members in allowed jurisdictions
  (``jurisdiction``).
- ``general``: aggregates and intersection cardinality for grantees; record-level release
  (``psi_membership``, or any column used as ``release``) only with sharing type
  ``unconditional`` (``record_release.conditional``), an explicit grant naming the
  ``psi_membership`` kind, and the column's masking rule applied (obligation ``masks``).

Sharing type ``none`` (不予共享) refuses every joint query (``sharing_type.none``).

**Noise by default.** Every statistic an analyst receives (a PSI cardinality, an aggregate, the
count of a membership kept by a department) carries DP noise with a positive ε (``dp_noise``),
or is an **exact release** (``exact``): asked for in the signed request, approved by the operator
of every participating node (obligation ``requires_approval``), never on data that demands DP,
never with GROUP BY (``exact.group_by``: a group under k would reach the analyst's program in
the clear), and checked at run time against earlier exact releases (``filter.overlap``). A
statistic with neither is refused (``release.noise``).

**Budgets.** A grant's ε and query count are caps inside it; over all of a requester's grants on
one dataset, the ε spent and reserved never exceeds the largest ε of a grant in force
(``budget.dataset``), so a second grant does not double the budget. ε and the query count are
reserved at admission and held while the query waits for approval (``QueryStore.admit``).

**Owner kind.** Data whose owner kind is ``individual`` (personal data held in trust) leaves the
holder node's jurisdiction only to destinations covered by a signed cross-border assessment
record in force (``crossborder.assessment``; ``govshare crossborder approve``).

Allowed jurisdictions: ``DatasetInfo.allowed_jurisdictions`` (ISO 3166-1 alpha-2, set when the
dataset is registered). Empty means "only the holder node's own jurisdiction" for ``important``
and "no restriction" for ``general``; a non-empty list restricts any grade.

Operator tightening (``DatasetInfo.min_group_size``, ``min_set_size``, ``require_dp``,
``require_approval``, ``allowed_jurisdictions``) can only raise the floors: the effective k is the
larger of the floor and the operator's value, and a ``False`` flag never switches off what the
grade demands.

Column uses by column kind (anything else is refused by the rule in brackets):

=============  ==========================================================================
``join_key``   join; release only with a masking rule [``column.join_key_release``]
``aggregate``  aggregate, filter [``column.aggregate_only``]
``group_key``  group, filter, with values inside the declared domain
               [``column.group_key_only``, ``column.group_key_domain``]
``masked``     release through its masking rule [``column.masked_only``]
``plaintext``  aggregate, group, filter, release
``deny``       nothing [``column.deny``]
=============  ==========================================================================

Joining on any column that is not a ``join_key`` is refused (``column.not_join_key``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from govshare.model.epsilon import format_epsilon
from govshare.model.governance import (
    ColumnAccess,
    ColumnKind,
    ColumnRule,
    ColumnUse,
    DatasetInfo,
    Grade,
    OwnerKind,
    QueryKind,
    Role,
    SharingType,
)
from govshare.node.policy.grants import Grant, verify_grant
from govshare.protocols.errors import MalformedInput, PolicyRefused, VerificationFailed
from govshare.protocols.suite import VerifyKey

# --------------------------------------------------------------------------- rule names

ALLOWED = "allowed"

GRADE_CORE = "grade.core"
GRADE_IMPORTANT_AGGREGATES_ONLY = "grade.important.aggregates_only"
GRADE_IMPORTANT_REQUIRES_DP = "grade.important.requires_dp"
GRADE_IMPORTANT_MIN_GROUP_SIZE = "grade.important.min_group_size"
SHARING_TYPE_NONE = "sharing_type.none"
JURISDICTION = "jurisdiction"
ROLE = "role"
RECIPIENT = "recipient"
DATASET_REQUIRES_DP = "dataset.requires_dp"
SET_SIZE_MINIMUM = "set_size.minimum"
RECORD_RELEASE_CONDITIONAL = "record_release.conditional"
RECORD_RELEASE_QUERY_KIND = "record_release.query_kind"
RELEASE_NOISE = "release.noise"
EXACT_GROUP_BY = "exact.group_by"
FILTER_OVERLAP = "filter.overlap"
CROSSBORDER_ASSESSMENT = "crossborder.assessment"
RATE_LIMIT = "rate_limit"
BUDGET_DATASET = "budget.dataset"

COLUMN_UNKNOWN = "column.unknown"
COLUMN_DENY = "column.deny"
COLUMN_NOT_JOIN_KEY = "column.not_join_key"
COLUMN_JOIN_KEY_RELEASE = "column.join_key_release"
COLUMN_AGGREGATE_ONLY = "column.aggregate_only"
COLUMN_GROUP_KEY_ONLY = "column.group_key_only"
COLUMN_GROUP_KEY_DOMAIN = "column.group_key_domain"
COLUMN_MASKED_ONLY = "column.masked_only"

GRANT_MISSING = "grant.missing"
GRANT_REVOKED = "grant.revoked"
GRANT_EXPIRED = "grant.expired"
GRANT_PREDATES_DATASET = "grant.predates_dataset"
GRANT_SIGNATURE = "grant.signature"
GRANT_PURPOSE = "grant.purpose"
GRANT_QUERY_KIND = "grant.query_kind"
GRANT_COLUMN = "grant.column"
GRANT_COUNT = "grant.count"
GRANT_BUDGET = "grant.budget"

# The order in which a grant's own checks run. When no grant allows a request, the refusal names
# the rule of the grant that came furthest, i.e. the most specific reason.
GRANT_RULE_ORDER: tuple[str, ...] = (
    GRANT_REVOKED,
    GRANT_EXPIRED,
    GRANT_PREDATES_DATASET,
    GRANT_SIGNATURE,
    GRANT_PURPOSE,
    GRANT_QUERY_KIND,
    GRANT_COLUMN,
    GRANT_COUNT,
    GRANT_BUDGET,
)

RULES: tuple[str, ...] = (
    GRADE_CORE,
    GRADE_IMPORTANT_AGGREGATES_ONLY,
    GRADE_IMPORTANT_REQUIRES_DP,
    GRADE_IMPORTANT_MIN_GROUP_SIZE,
    SHARING_TYPE_NONE,
    JURISDICTION,
    ROLE,
    RECIPIENT,
    DATASET_REQUIRES_DP,
    SET_SIZE_MINIMUM,
    RECORD_RELEASE_CONDITIONAL,
    RECORD_RELEASE_QUERY_KIND,
    RELEASE_NOISE,
    EXACT_GROUP_BY,
    FILTER_OVERLAP,
    CROSSBORDER_ASSESSMENT,
    RATE_LIMIT,
    BUDGET_DATASET,
    COLUMN_UNKNOWN,
    COLUMN_DENY,
    COLUMN_NOT_JOIN_KEY,
    COLUMN_JOIN_KEY_RELEASE,
    COLUMN_AGGREGATE_ONLY,
    COLUMN_GROUP_KEY_ONLY,
    COLUMN_GROUP_KEY_DOMAIN,
    COLUMN_MASKED_ONLY,
    GRANT_MISSING,
    *GRANT_RULE_ORDER,
)

# --------------------------------------------------------------------------- floors

# DESIGN.md: important data is released only in groups of at least 10.
IMPORTANT_MIN_GROUP_SIZE = 10
# General data: cells under 5 are suppressed, the small-cell threshold common in official
# statistics releases; an operator may raise it per dataset.
GENERAL_MIN_GROUP_SIZE = 5
GRADE_MIN_GROUP_SIZE: Mapping[Grade, int] = {
    Grade.GENERAL: GENERAL_MIN_GROUP_SIZE,
    Grade.IMPORTANT: IMPORTANT_MIN_GROUP_SIZE,
}
AGGREGATE_KINDS = frozenset({QueryKind.INTERSECTION_AGGREGATE, QueryKind.HORIZONTAL_AGGREGATE})
# Kinds whose result is a statistic: noised by default, exact only when asked and approved.
STATISTIC_KINDS = frozenset({QueryKind.PSI_CARDINALITY, *AGGREGATE_KINDS})
# Members that may ask joint queries; an auditor reads logs, it does not query data.
QUERYING_ROLES = frozenset({Role.ANALYST, Role.NODE})


# --------------------------------------------------------------------------- request


@dataclass(frozen=True)
class AccessRequest:
    """What a query wants from one dataset, as the planner sees it.

    ``requester``/``role``/``jurisdiction`` come from the verified certificate, never from the
    request body. ``recipient`` is who would receive the result (``None``: the requester); a
    ``psi_membership`` may name a participating department (``recipient_is_department``, with
    its roster ``recipient_jurisdiction``) that learns which of its own keys match.
    ``epsilon`` is the ε this query spends when ``dp_noise`` is on; ``exact`` says the signed
    request asks for an exact release instead, and ``group_by`` that it releases groups.
    Nothing here depends on the dataset's rows: the node reads them only after admission.
    """

    requester: str
    role: Role
    jurisdiction: str
    query_kind: QueryKind
    columns: tuple[ColumnAccess, ...]
    purpose: str
    dp_noise: bool
    epsilon: Fraction = Fraction(0)
    recipient: str | None = None
    recipient_is_department: bool = False
    recipient_jurisdiction: str | None = None
    exact: bool = False
    group_by: bool = False

    @property
    def releases_statistic(self) -> bool:
        """Whether the analyst receives a statistic (which is noised unless exact)."""
        to_department = self.query_kind is QueryKind.PSI_MEMBERSHIP and (
            self.recipient_is_department
        )
        return self.query_kind in STATISTIC_KINDS or to_department


@dataclass(frozen=True)
class GrantUsage:
    """What a grant has consumed so far: queries and ε spent, plus what admitted queries that
    have not finished hold in reserve (``queries`` counts both)."""

    queries: int = 0
    epsilon_spent: Fraction = Fraction(0)
    epsilon_reserved: Fraction = Fraction(0)

    @property
    def epsilon_used(self) -> Fraction:
        return self.epsilon_spent + self.epsilon_reserved


@dataclass(frozen=True)
class DatasetBudget:
    """One requester's ε ledger on one dataset at this node, across all grants."""

    spent: Fraction = Fraction(0)
    reserved: Fraction = Fraction(0)

    @property
    def used(self) -> Fraction:
        return self.spent + self.reserved


def dataset_epsilon_cap(
    grants: Sequence[Grant], *, requester: str, dataset: str, now: int
) -> Fraction:
    """The most ε ``requester`` may ever have spent on ``dataset``: the largest ε of a grant in
    force (a second grant raises the cap only to its own ε, never adds to it)."""
    return max(
        (
            g.epsilon
            for g in grants
            if g.grantee == requester and g.dataset == dataset and not g.revoked
            and now < g.expires_at
        ),
        default=Fraction(0),
    )  # fmt: skip


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Obligations:
    """Conditions an allowed query must meet while it runs and before anything is released.

    ``masks`` pairs each released column with the masking rule to apply
    (:func:`govshare.node.data.masking.apply_mask`); ``epsilon`` is what to charge to ``grant_id``.
    """

    grant_id: str
    requires_approval: bool
    dp_required: bool
    min_group_size: int
    min_set_size: int
    masks: tuple[tuple[str, str], ...] = ()
    epsilon: Fraction = Fraction(0)
    exact: bool = False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # ALLOWED, or the name of the rule that refused
    message: str
    obligations: Obligations | None = field(default=None)

    def raise_if_refused(self) -> Obligations:
        """Return the obligations of an allowed decision.

        Raises:
            PolicyRefused: the decision refused; ``rule`` names the rule.
        """
        if not self.allowed or self.obligations is None:
            raise PolicyRefused(self.rule, self.message)
        return self.obligations

    def audit_fields(self) -> dict[str, object]:
        """The decision as audit-log fields (no floats: ε as its exact decimal text)."""
        fields: dict[str, object] = {
            "allowed": self.allowed,
            "rule": self.rule,
            "message": self.message,
        }
        if self.obligations is not None:
            ob = self.obligations
            fields.update(
                grant_id=ob.grant_id,
                requires_approval=ob.requires_approval,
                dp_required=ob.dp_required,
                min_group_size=ob.min_group_size,
                min_set_size=ob.min_set_size,
                masks=[[column, mask] for column, mask in ob.masks],
                epsilon=format_epsilon(ob.epsilon),
                exact=ob.exact,
            )
        return fields


def _refuse(rule: str, message: str) -> Decision:
    return Decision(allowed=False, rule=rule, message=message)


def effective_min_group_size(dataset: DatasetInfo) -> int:
    """The grade's floor k, raised by the operator's ``min_group_size`` if larger."""
    return max(
        GRADE_MIN_GROUP_SIZE.get(dataset.grade, IMPORTANT_MIN_GROUP_SIZE), dataset.min_group_size
    )


def allowed_jurisdictions(dataset: DatasetInfo, *, node_jurisdiction: str) -> frozenset[str] | None:
    """The jurisdictions results may go to, or ``None`` for no restriction (see module doc)."""
    if dataset.allowed_jurisdictions:
        return frozenset(dataset.allowed_jurisdictions)
    if dataset.grade is Grade.GENERAL:
        return None
    return frozenset({node_jurisdiction})


# --------------------------------------------------------------------------- column checks


def _check_column(
    access: ColumnAccess,
    rule: ColumnRule | None,
    dataset: DatasetInfo,
    kind: QueryKind,
    *,
    keys_leave: bool = True,
) -> tuple[str, str] | None:
    """The (rule, message) refusing one column use, or None when the use is allowed."""
    name, use = access.column, access.use
    where = f"column {name!r} of {dataset.name!r}"
    if rule is None:
        return COLUMN_UNKNOWN, f"{dataset.name!r} has no column {name!r}"
    if rule.kind is ColumnKind.DENY:
        return COLUMN_DENY, f"{where} is 'deny' and takes part in no query"
    if use is ColumnUse.JOIN:
        if rule.kind is not ColumnKind.JOIN_KEY:
            return COLUMN_NOT_JOIN_KEY, f"{where} is {rule.kind.value}, not a join key"
        if kind is QueryKind.PSI_MEMBERSHIP and keys_leave and rule.mask is None:
            return (
                COLUMN_JOIN_KEY_RELEASE,
                f"psi_membership reveals matched keys, and {where} has no masking rule",
            )
        return None
    if rule.kind is ColumnKind.JOIN_KEY:
        if use is ColumnUse.RELEASE and rule.mask is not None:
            return None
        return (
            COLUMN_JOIN_KEY_RELEASE,
            f"{where} is a join key: it is matched, never {use.value}ed"
            + ("" if use is not ColumnUse.RELEASE else " without a masking rule"),
        )
    if rule.kind is ColumnKind.AGGREGATE:
        if use in (ColumnUse.AGGREGATE, ColumnUse.FILTER):
            return None
        return COLUMN_AGGREGATE_ONLY, f"{where} is revealed only inside aggregates"
    if rule.kind is ColumnKind.GROUP_KEY:
        if use not in (ColumnUse.GROUP, ColumnUse.FILTER):
            return COLUMN_GROUP_KEY_ONLY, f"{where} is only a group label or a filter"
        outside = sorted(set(access.values) - set(rule.domain))
        if outside:
            return (
                COLUMN_GROUP_KEY_DOMAIN,
                f"{where}: {', '.join(map(repr, outside))} outside its declared domain",
            )
        return None
    if rule.kind is ColumnKind.MASKED:
        if use is ColumnUse.RELEASE:
            return None
        return COLUMN_MASKED_ONLY, f"{where} is revealed only through its masking rule"
    return None  # plaintext: any use but join, handled above


# --------------------------------------------------------------------------- grant checks


def grant_standing(
    grant: Grant, dataset: DatasetInfo | None, *, now: int
) -> tuple[str, str] | None:
    """Why a grant is no longer in force — revoked, expired, or void because its dataset was
    removed (``dataset`` None) or registered again after it — or None while it is. The same
    answer for a query's check and for an operator's ``grant list``."""
    gid = grant.grant_id
    if grant.revoked:
        return GRANT_REVOKED, f"grant {gid} was revoked at {grant.revoked_at}"
    if now >= grant.expires_at:
        return GRANT_EXPIRED, f"grant {gid} expired at {grant.expires_at}"
    if dataset is None:
        return GRANT_PREDATES_DATASET, f"grant {gid}: dataset {grant.dataset!r} was removed"
    if grant.created_at < dataset.created_at:
        # A dataset removed and registered again under the same name is a new dataset.
        return GRANT_PREDATES_DATASET, f"grant {gid} predates the registration of {dataset.name!r}"
    return None


def _grant_failure(
    grant: Grant,
    request: AccessRequest,
    dataset: DatasetInfo,
    *,
    now: int,
    usage: GrantUsage,
    issuer_key: VerifyKey | None,
) -> tuple[str, str] | None:
    gid = grant.grant_id
    out_of_force = grant_standing(grant, dataset, now=now)
    if out_of_force is not None:
        return out_of_force
    if issuer_key is not None:
        try:
            verify_grant(grant, issuer_key)
        except VerificationFailed:
            return GRANT_SIGNATURE, f"grant {gid} does not carry this node's valid signature"
    if grant.purpose.strip().casefold() != request.purpose.strip().casefold():
        return GRANT_PURPOSE, f"grant {gid} is for the purpose {grant.purpose!r}"
    if request.query_kind not in grant.query_kinds:
        return GRANT_QUERY_KIND, f"grant {gid} does not cover {request.query_kind.value}"
    missing = sorted({a.column for a in request.columns} - set(grant.columns))
    if missing:
        return GRANT_COLUMN, f"grant {gid} does not cover column(s) {', '.join(missing)}"
    if usage.queries + 1 > grant.max_queries:
        return GRANT_COUNT, f"grant {gid} allowed {grant.max_queries} queries, all used"
    if request.dp_noise and usage.epsilon_used + request.epsilon > grant.epsilon:
        left = grant.epsilon - usage.epsilon_used
        return (
            GRANT_BUDGET,
            f"grant {gid} has ε {format_epsilon(max(left, Fraction(0)))} left, "
            f"the query needs {format_epsilon(request.epsilon)}",
        )
    return None


# --------------------------------------------------------------------------- decide


def decide(
    request: AccessRequest,
    dataset: DatasetInfo,
    grants: Sequence[Grant],
    *,
    now: int,
    node_jurisdiction: str,
    usage: Mapping[str, GrantUsage] | None = None,
    budget: DatasetBudget | None = None,
    issuer_key: VerifyKey | None = None,
    assessed: frozenset[str] = frozenset(),
) -> Decision:
    """Decide one request on one dataset, in the admission order of the module docstring.

    Args:
        request: the use the query would make of ``dataset``.
        dataset: the dataset's registration.
        grants: grants on the node (others' and other datasets' are ignored).
        now: unix seconds.
        node_jurisdiction: the holder node's jurisdiction (default allowed set for important).
        usage: per grant id, queries and ε used so far, reservations included.
        budget: the requester's ε ledger on ``dataset`` (missing = nothing used).
        issuer_key: when given, a grant whose signature does not verify under it is refused
            (``grant.signature``).
        assessed: destinations (jurisdictions) covered by cross-border assessment records in
            force for ``dataset``.

    Returns a refusing :class:`Decision` naming the first rule that refuses, or an allowed one
    with its :class:`Obligations`.

    Raises:
        MalformedInput: the request itself is inconsistent (DP on with ε ≤ 0, negative ε, DP and
            exact at once, no columns).
    """
    if request.epsilon < 0 or (request.dp_noise and request.epsilon <= 0):
        raise MalformedInput("a DP query spends a positive ε", field="epsilon")
    if request.dp_noise and request.exact:
        raise MalformedInput("a release is either noised or exact, not both", field="exact")
    if not request.columns:
        raise MalformedInput("a request uses at least one column", field="columns")
    usage = usage or {}
    budget = budget or DatasetBudget()
    grade, kind = dataset.grade, request.query_kind

    # 1. Identity: only members that ask queries.
    if request.role not in QUERYING_ROLES:
        return _refuse(ROLE, f"a member with role {request.role.value} does not ask queries")

    # 2. Grant: the first one that allows wins; otherwise the most specific refusal.
    mine = [g for g in grants if g.dataset == dataset.name and g.grantee == request.requester]
    if not mine:
        return _refuse(GRANT_MISSING, f"{request.requester!r} holds no grant on {dataset.name!r}")
    best: tuple[str, str] | None = None
    chosen: Grant | None = None
    for grant in mine:
        failure = _grant_failure(
            grant,
            request,
            dataset,
            now=now,
            usage=usage.get(grant.grant_id, GrantUsage()),
            issuer_key=issuer_key,
        )
        if failure is None:
            chosen = grant
            break
        if best is None or GRANT_RULE_ORDER.index(failure[0]) > GRANT_RULE_ORDER.index(best[0]):
            best = failure
    if chosen is None:
        # mine is non-empty, so best holds the failure of the grant that came furthest.
        return _refuse(*(best or (GRANT_MISSING, "no usable grant")))
    cap = dataset_epsilon_cap(grants, requester=request.requester, dataset=dataset.name, now=now)
    if request.dp_noise and budget.used + request.epsilon > cap:
        return _refuse(
            BUDGET_DATASET,
            f"{request.requester!r} has ε {format_epsilon(max(cap - budget.used, Fraction(0)))} "
            f"left on {dataset.name!r} over all grants, the query needs "
            f"{format_epsilon(request.epsilon)}",
        )

    # 3. Rules of the data. Floors that no grant can lift first.
    releases = [a for a in request.columns if a.use is ColumnUse.RELEASE]
    record_level = kind is QueryKind.PSI_MEMBERSHIP or bool(releases)
    if grade is Grade.CORE:
        return _refuse(GRADE_CORE, f"{dataset.name!r} is core data and never joins a query")
    if dataset.sharing_type is SharingType.NONE:
        basis = f" ({dataset.legal_basis})" if dataset.legal_basis else ""
        return _refuse(SHARING_TYPE_NONE, f"{dataset.name!r} is not shared{basis}")
    # A membership may go to a participating department, which learns which of its own keys
    # match; its keys never leave it, and 有条件共享 (conditional sharing) is sharing between
    # departments under conditions: the grant.
    to_department = (
        kind is QueryKind.PSI_MEMBERSHIP
        and request.recipient_is_department
        and request.recipient is not None
        and request.recipient != request.requester
    )
    if request.recipient is not None and request.recipient != request.requester:
        if not to_department:
            return _refuse(RECIPIENT, "results go only to the grantee who asked")
    if grade is Grade.IMPORTANT and (kind not in AGGREGATE_KINDS or record_level):
        return _refuse(
            GRADE_IMPORTANT_AGGREGATES_ONLY,
            f"{dataset.name!r} is important data: aggregates only, not {kind.value}",
        )
    if record_level:
        if kind is not QueryKind.PSI_MEMBERSHIP:
            return _refuse(
                RECORD_RELEASE_QUERY_KIND, f"{kind.value} releases no record-level column"
            )
        if dataset.sharing_type is not SharingType.UNCONDITIONAL and not to_department:
            return _refuse(
                RECORD_RELEASE_CONDITIONAL,
                f"{dataset.name!r} is shared {dataset.sharing_type.value}ly: "
                "no record-level release",
            )
    dp_required = grade is Grade.IMPORTANT or dataset.require_dp
    if dp_required and not request.dp_noise:
        rule = GRADE_IMPORTANT_REQUIRES_DP if grade is Grade.IMPORTANT else DATASET_REQUIRES_DP
        return _refuse(rule, f"queries on {dataset.name!r} must add DP noise")
    if request.releases_statistic and not request.dp_noise and not request.exact:
        return _refuse(
            RELEASE_NOISE,
            f"{kind.value} releases a statistic: it carries DP noise (a positive ε), or is an "
            "exact release that every operator approves",
        )
    if request.exact and request.group_by:
        return _refuse(
            EXACT_GROUP_BY,
            "an exact release has no GROUP BY: small groups would reach the analyst; "
            "ask with ε instead",
        )
    for access in request.columns:
        failure = _check_column(
            access, dataset.column(access.column), dataset, kind, keys_leave=not to_department
        )
        if failure is not None:
            return _refuse(*failure)
    receivers = [request.jurisdiction]
    if to_department:
        receivers.append(request.recipient_jurisdiction or "")
    places = allowed_jurisdictions(dataset, node_jurisdiction=node_jurisdiction)
    if places is not None and any(place not in places for place in receivers):
        return _refuse(
            JURISDICTION,
            f"results of {dataset.name!r} go only to members in {', '.join(sorted(places))}",
        )
    if dataset.owner.kind is OwnerKind.INDIVIDUAL:
        abroad = sorted({p for p in receivers if p != node_jurisdiction} - assessed)
        if abroad:
            return _refuse(
                CROSSBORDER_ASSESSMENT,
                f"{dataset.name!r} holds personal data: no cross-border assessment in force "
                f"covers {', '.join(abroad)}",
            )

    # 4. Approval, and what the run must do.
    masks: list[tuple[str, str]] = []
    for access in request.columns:
        column_rule = dataset.column(access.column)
        releasing = access.use is ColumnUse.RELEASE or (
            kind is QueryKind.PSI_MEMBERSHIP and access.use is ColumnUse.JOIN
        )
        if releasing and column_rule is not None and column_rule.mask is not None:
            masks.append((access.column, column_rule.mask))
    k = effective_min_group_size(dataset)
    obligations = Obligations(
        grant_id=chosen.grant_id,
        requires_approval=grade is Grade.IMPORTANT or dataset.require_approval or request.exact,
        dp_required=dp_required,
        min_group_size=k,
        # A noised statistic needs no floor on the filtered set: the noise covers each row, and
        # a refusal that depended on the true size would leak an exact bit of the rows (a filter
        # `id IN (x, and four known members)` would tell whether x is there).
        min_set_size=max(k, dataset.min_set_size) if record_level or request.exact else 0,
        masks=tuple(sorted(set(masks))),
        epsilon=request.epsilon if request.dp_noise else Fraction(0),
        exact=request.exact,
    )
    return Decision(
        allowed=True,
        rule=ALLOWED,
        message=f"allowed under grant {chosen.grant_id}",
        obligations=obligations,
    )


def enforce(
    request: AccessRequest,
    dataset: DatasetInfo,
    grants: Sequence[Grant],
    *,
    now: int,
    node_jurisdiction: str,
    usage: Mapping[str, GrantUsage] | None = None,
    budget: DatasetBudget | None = None,
    issuer_key: VerifyKey | None = None,
    assessed: frozenset[str] = frozenset(),
) -> Obligations:
    """:func:`decide`, raising :class:`PolicyRefused` on refusal (for callers that log the
    refusal from the exception)."""
    return decide(
        request,
        dataset,
        grants,
        now=now,
        node_jurisdiction=node_jurisdiction,
        usage=usage,
        budget=budget,
        issuer_key=issuer_key,
        assessed=assessed,
    ).raise_if_refused()
