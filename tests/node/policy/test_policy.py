"""The policy decision: every grade floor and every grant field, allowed once and refused once."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest

from govshare.model.governance import (
    ColumnAccess,
    ColumnKind,
    ColumnRule,
    ColumnUse,
    DatasetInfo,
    Grade,
    Owner,
    OwnerKind,
    QueryKind,
    Role,
    SharingType,
)
from govshare.node.policy import decision as policy
from govshare.node.policy.decision import (
    AccessRequest,
    DatasetBudget,
    Decision,
    GrantUsage,
    decide,
    enforce,
)
from govshare.node.policy.grants import Grant, issue_grant
from govshare.protocols.errors import MalformedInput, PolicyRefused
from govshare.protocols.suite import STANDARD, VerifyKey

NOW = 1_800_000_000
DAY = 24 * 3600
KEY = STANDARD.signing_key_from_bytes(b"\x07" * 32)
PURPOSE = "poverty relief evaluation"

GENERAL = DatasetInfo(
    name="benefits",
    grade=Grade.GENERAL,
    sharing_type=SharingType.CONDITIONAL,
    owner=Owner(OwnerKind.INDIVIDUAL, "residents (in trust)", "social"),
    columns=(
        ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
        ColumnRule("masked_id", ColumnKind.JOIN_KEY, key_type="resident_id", mask="keep_last:4"),
        ColumnRule("amount", ColumnKind.AGGREGATE),
        ColumnRule("district", ColumnKind.GROUP_KEY, domain=("east", "west")),
        ColumnRule("name", ColumnKind.MASKED, mask="keep_last:1"),
        ColumnRule("year", ColumnKind.PLAINTEXT),
        ColumnRule("notes", ColumnKind.DENY),
    ),
    row_count=1000,
    created_at=NOW - 30 * DAY,
)
IMPORTANT = replace(GENERAL, grade=Grade.IMPORTANT)
UNCONDITIONAL = replace(GENERAL, sharing_type=SharingType.UNCONDITIONAL)
STATE = replace(GENERAL, owner=Owner(OwnerKind.STATE, "state", "social"))
ALL_COLUMNS = ("amount", "district", "id_number", "masked_id", "name", "year")


def grant(
    dataset: DatasetInfo = GENERAL,
    *,
    grantee: str = "alice",
    purpose: str = PURPOSE,
    columns: tuple[str, ...] = ALL_COLUMNS,
    kinds: tuple[QueryKind, ...] = tuple(QueryKind),
    expires_at: int = NOW + 365 * DAY,
    epsilon: str = "1.0",
    max_queries: int = 100,
    created_at: int = NOW - DAY,
    grant_id: str = "00000000000000a1",
) -> Grant:
    return issue_grant(
        KEY,
        issuer="social",
        dataset=dataset,
        grantee=grantee,
        purpose=purpose,
        columns=columns,
        query_kinds=kinds,
        expires_at=expires_at,
        epsilon=epsilon,
        max_queries=max_queries,
        now=created_at,
        grant_id=grant_id,
    )


AGGREGATE_COLUMNS = (
    ColumnAccess("id_number", ColumnUse.JOIN),
    ColumnAccess("amount", ColumnUse.AGGREGATE),
    ColumnAccess("district", ColumnUse.GROUP),
)


def request(
    *,
    kind: QueryKind = QueryKind.INTERSECTION_AGGREGATE,
    columns: tuple[ColumnAccess, ...] = AGGREGATE_COLUMNS,
    requester: str = "alice",
    role: Role = Role.ANALYST,
    jurisdiction: str = "CN",
    purpose: str = PURPOSE,
    dp_noise: bool = True,
    epsilon: Fraction = Fraction(1, 10),
    recipient: str | None = None,
    exact: bool = False,
    group_by: bool = False,
) -> AccessRequest:
    return AccessRequest(
        requester=requester,
        role=role,
        jurisdiction=jurisdiction,
        query_kind=kind,
        columns=columns,
        purpose=purpose,
        dp_noise=dp_noise,
        epsilon=epsilon,
        recipient=recipient,
        exact=exact,
        group_by=group_by,
    )


def run(
    req: AccessRequest,
    dataset: DatasetInfo = GENERAL,
    grants: tuple[Grant, ...] | None = None,
    *,
    usage: dict[str, GrantUsage] | None = None,
    budget: DatasetBudget | None = None,
    issuer_key: VerifyKey | None = None,
    now: int = NOW,
    assessed: frozenset[str] = frozenset(),
) -> Decision:
    return decide(
        req,
        dataset,
        grants if grants is not None else (grant(dataset),),
        now=now,
        node_jurisdiction="CN",
        usage=usage,
        budget=budget,
        issuer_key=issuer_key,
        assessed=assessed,
    )


def allowed(decision: Decision) -> policy.Obligations:
    assert decision.allowed, decision.message
    assert decision.rule == policy.ALLOWED
    assert decision.obligations is not None
    return decision.obligations


def refused(decision: Decision, rule: str) -> None:
    assert not decision.allowed
    assert decision.rule == rule, decision.message
    assert decision.obligations is None
    with pytest.raises(PolicyRefused) as info:
        decision.raise_if_refused()
    assert info.value.rule == rule


def test_rule_names_are_unique_and_dotted() -> None:
    assert len(set(policy.RULES)) == len(policy.RULES)
    assert all(rule.replace("_", "").replace(".", "").isalpha() for rule in policy.RULES)


# --------------------------------------------------------------------------- grade floors


def test_general_aggregate_allowed_with_general_obligations() -> None:
    ob = allowed(run(request()))
    assert ob.grant_id == "00000000000000a1"
    assert (ob.requires_approval, ob.dp_required, ob.exact) == (False, False, False)
    assert ob.min_group_size == policy.GENERAL_MIN_GROUP_SIZE
    assert ob.min_set_size == 0  # the noise covers small sets; no refusal on the true size
    assert ob.epsilon == Fraction(1, 10)


@pytest.mark.parametrize(
    "kind",
    [QueryKind.PSI_CARDINALITY, QueryKind.INTERSECTION_AGGREGATE, QueryKind.HORIZONTAL_AGGREGATE],
)
def test_a_statistic_without_noise_is_refused_unless_exact(kind: QueryKind) -> None:
    req = request(kind=kind, columns=AGGREGATE_COLUMNS[:2], dp_noise=False, epsilon=Fraction(0))
    if kind is QueryKind.HORIZONTAL_AGGREGATE:
        req = replace(req, columns=AGGREGATE_COLUMNS[1:2])
    refused(run(req), policy.RELEASE_NOISE)
    ob = allowed(run(replace(req, exact=True)))
    # An exact release always waits for the operator, and keeps the filtered-set floor.
    assert ob.exact and ob.requires_approval and ob.epsilon == 0
    assert ob.min_set_size == policy.GENERAL_MIN_GROUP_SIZE


def test_exact_release_with_group_by_is_refused() -> None:
    req = request(dp_noise=False, epsilon=Fraction(0), exact=True, group_by=True)
    refused(run(req), policy.EXACT_GROUP_BY)
    allowed(run(replace(req, group_by=False, columns=AGGREGATE_COLUMNS[:2])))


def test_noise_and_exact_at_once_is_malformed() -> None:
    with pytest.raises(MalformedInput):
        run(request(exact=True))


def test_general_psi_cardinality_allowed() -> None:
    req = request(kind=QueryKind.PSI_CARDINALITY, columns=AGGREGATE_COLUMNS[:1])
    allowed(run(req))


def test_core_never_joins() -> None:
    core = replace(GENERAL, grade=Grade.CORE)
    refused(run(request(), core, (grant(core),)), policy.GRADE_CORE)


def test_sharing_none_refused_and_conditional_allowed() -> None:
    none = replace(GENERAL, sharing_type=SharingType.NONE, legal_basis="PIPL art. 28")
    decision = run(request(), none, (grant(none),))
    refused(decision, policy.SHARING_TYPE_NONE)
    assert "PIPL art. 28" in decision.message
    allowed(run(request()))


def test_important_aggregate_allowed_with_floor_obligations() -> None:
    ob = allowed(run(request(), IMPORTANT, (grant(IMPORTANT),)))
    assert ob.requires_approval and ob.dp_required
    assert ob.min_group_size == policy.IMPORTANT_MIN_GROUP_SIZE == 10
    assert ob.epsilon == Fraction(1, 10)


@pytest.mark.parametrize("kind", [QueryKind.PSI_CARDINALITY, QueryKind.PSI_MEMBERSHIP])
def test_important_is_aggregates_only(kind: QueryKind) -> None:
    req = request(kind=kind, columns=(ColumnAccess("masked_id", ColumnUse.JOIN),))
    refused(run(req, IMPORTANT, (grant(IMPORTANT),)), policy.GRADE_IMPORTANT_AGGREGATES_ONLY)


def test_important_horizontal_aggregate_allowed() -> None:
    req = request(kind=QueryKind.HORIZONTAL_AGGREGATE, columns=AGGREGATE_COLUMNS[1:])
    allowed(run(req, IMPORTANT, (grant(IMPORTANT),)))


def test_important_requires_dp() -> None:
    req = request(dp_noise=False, epsilon=Fraction(0))
    refused(run(req, IMPORTANT, (grant(IMPORTANT),)), policy.GRADE_IMPORTANT_REQUIRES_DP)


def test_important_min_group_size() -> None:
    ob = allowed(run(request(), IMPORTANT, (grant(IMPORTANT),)))
    assert ob.min_group_size == 10


def test_important_exact_release_is_refused() -> None:
    req = request(dp_noise=False, epsilon=Fraction(0), exact=True, columns=AGGREGATE_COLUMNS[:2])
    refused(run(req, IMPORTANT, (grant(IMPORTANT),)), policy.GRADE_IMPORTANT_REQUIRES_DP)


def test_important_jurisdiction_defaults_to_the_holder_node() -> None:
    grants = (grant(IMPORTANT),)
    refused(run(request(jurisdiction="HK"), IMPORTANT, grants), policy.JURISDICTION)
    allowed(run(request(jurisdiction="CN"), IMPORTANT, grants))


def test_important_configured_jurisdictions_replace_the_default() -> None:
    both = replace(IMPORTANT, allowed_jurisdictions=("CN", "HK"), owner=STATE.owner)
    allowed(run(request(jurisdiction="HK"), both, (grant(both),)))
    refused(run(request(jurisdiction="MO"), both, (grant(both),)), policy.JURISDICTION)


def test_general_jurisdiction_unrestricted_unless_tightened() -> None:
    allowed(run(request(jurisdiction="HK"), STATE, (grant(STATE),)))
    tight = replace(STATE, allowed_jurisdictions=("CN",))
    refused(run(request(jurisdiction="HK"), tight, (grant(tight),)), policy.JURISDICTION)


def test_personal_data_stays_home_without_a_crossborder_assessment() -> None:
    # GENERAL's owner kind is individual: results leave CN only where an assessment covers it.
    decision = run(request(jurisdiction="US"))
    refused(decision, policy.CROSSBORDER_ASSESSMENT)
    assert "US" in decision.message
    allowed(run(request(jurisdiction="US"), assessed=frozenset({"US"})))
    refused(
        run(request(jurisdiction="US"), assessed=frozenset({"HK"})), policy.CROSSBORDER_ASSESSMENT
    )
    allowed(run(request(jurisdiction="CN")))  # at home no assessment is needed
    allowed(run(request(jurisdiction="US"), STATE, (grant(STATE),)))  # state data: no rule


def test_membership_to_a_department_abroad_needs_an_assessment() -> None:
    refused(run(membership_to(recipient_jurisdiction="HK")), policy.CROSSBORDER_ASSESSMENT)
    allowed(run(membership_to(recipient_jurisdiction="HK"), assessed=frozenset({"HK"})))


def test_operator_cannot_loosen_important_floor() -> None:
    # A registration bypassing the catalogue's checks still gets the floors.
    loose = replace(IMPORTANT, min_group_size=2, require_dp=False, require_approval=False)
    grants = (grant(loose),)
    ob = allowed(run(request(), loose, grants))
    assert ob.min_group_size == 10 and ob.requires_approval and ob.dp_required
    refused(
        run(request(dp_noise=False, epsilon=Fraction(0)), loose, grants),
        policy.GRADE_IMPORTANT_REQUIRES_DP,
    )


def test_operator_tightening_on_general() -> None:
    tight = replace(
        GENERAL, min_group_size=20, min_set_size=100, require_dp=True, require_approval=True
    )
    grants = (grant(tight),)
    ob = allowed(run(request(), tight, grants))
    assert ob.min_group_size == 20
    assert ob.requires_approval and ob.dp_required
    membership = request(kind=QueryKind.PSI_MEMBERSHIP, columns=MEMBERSHIP_COLUMNS, dp_noise=False)
    unconditional = replace(tight, sharing_type=SharingType.UNCONDITIONAL, require_dp=False)
    assert allowed(run(membership, unconditional, (grant(unconditional),))).min_set_size == 100
    refused(
        run(request(dp_noise=False, epsilon=Fraction(0)), tight, grants),
        policy.DATASET_REQUIRES_DP,
    )


def test_set_size_floor_is_an_obligation_of_exact_and_record_releases() -> None:
    exact = request(dp_noise=False, epsilon=Fraction(0), exact=True, columns=AGGREGATE_COLUMNS[:2])
    assert allowed(run(exact)).min_set_size == policy.GENERAL_MIN_GROUP_SIZE
    assert allowed(run(request())).min_set_size == 0


def test_auditor_role_does_not_query() -> None:
    refused(run(request(role=Role.AUDITOR)), policy.ROLE)
    allowed(run(request(role=Role.NODE)))


def test_results_only_to_the_requester() -> None:
    refused(run(request(recipient="bob")), policy.RECIPIENT)
    allowed(run(request(recipient="alice")))


# --------------------------------------------------------------------------- record release

MEMBERSHIP_COLUMNS = (
    ColumnAccess("masked_id", ColumnUse.JOIN),
    ColumnAccess("name", ColumnUse.RELEASE),
    ColumnAccess("year", ColumnUse.RELEASE),
)


def test_record_release_allowed_when_unconditional_granted_and_masked() -> None:
    req = request(kind=QueryKind.PSI_MEMBERSHIP, columns=MEMBERSHIP_COLUMNS)
    ob = allowed(run(req, UNCONDITIONAL, (grant(UNCONDITIONAL),)))
    assert ob.masks == (("masked_id", "keep_last:4"), ("name", "keep_last:1"))


def test_record_release_refused_when_conditional() -> None:
    req = request(kind=QueryKind.PSI_MEMBERSHIP, columns=MEMBERSHIP_COLUMNS)
    refused(run(req), policy.RECORD_RELEASE_CONDITIONAL)


def test_record_release_needs_an_explicit_membership_grant() -> None:
    req = request(kind=QueryKind.PSI_MEMBERSHIP, columns=MEMBERSHIP_COLUMNS)
    aggregates_only = grant(UNCONDITIONAL, kinds=(QueryKind.INTERSECTION_AGGREGATE,))
    refused(run(req, UNCONDITIONAL, (aggregates_only,)), policy.GRANT_QUERY_KIND)


def test_membership_needs_a_masked_join_key() -> None:
    req = request(
        kind=QueryKind.PSI_MEMBERSHIP, columns=(ColumnAccess("id_number", ColumnUse.JOIN),)
    )
    refused(run(req, UNCONDITIONAL, (grant(UNCONDITIONAL),)), policy.COLUMN_JOIN_KEY_RELEASE)


def test_release_inside_an_aggregate_query_is_refused() -> None:
    req = request(columns=(*AGGREGATE_COLUMNS, ColumnAccess("name", ColumnUse.RELEASE)))
    refused(run(req, UNCONDITIONAL, (grant(UNCONDITIONAL),)), policy.RECORD_RELEASE_QUERY_KIND)


# --------------------------------------------------------------------------- column rules


@pytest.mark.parametrize(
    ("access", "rule"),
    [
        # No grant can name an unknown or a 'deny' column: the grant check refuses first.
        (ColumnAccess("salary", ColumnUse.AGGREGATE), policy.GRANT_COLUMN),
        (ColumnAccess("notes", ColumnUse.FILTER), policy.GRANT_COLUMN),
        (ColumnAccess("year", ColumnUse.JOIN), policy.COLUMN_NOT_JOIN_KEY),
        (ColumnAccess("id_number", ColumnUse.GROUP), policy.COLUMN_JOIN_KEY_RELEASE),
        (ColumnAccess("id_number", ColumnUse.FILTER), policy.COLUMN_JOIN_KEY_RELEASE),
        (ColumnAccess("amount", ColumnUse.GROUP), policy.COLUMN_AGGREGATE_ONLY),
        (ColumnAccess("district", ColumnUse.AGGREGATE), policy.COLUMN_GROUP_KEY_ONLY),
        (ColumnAccess("district", ColumnUse.FILTER, ("north",)), policy.COLUMN_GROUP_KEY_DOMAIN),
        (ColumnAccess("district", ColumnUse.GROUP, ("east", "x")), policy.COLUMN_GROUP_KEY_DOMAIN),
        (ColumnAccess("name", ColumnUse.FILTER), policy.COLUMN_MASKED_ONLY),
        (ColumnAccess("name", ColumnUse.AGGREGATE), policy.COLUMN_MASKED_ONLY),
    ],
)
def test_column_misuse_is_refused(access: ColumnAccess, rule: str) -> None:
    # Even a grant that names the column does not lift the column's rule.
    refused(run(request(columns=(AGGREGATE_COLUMNS[0], access))), rule)


@pytest.mark.parametrize(
    "access",
    [
        ColumnAccess("amount", ColumnUse.FILTER),
        ColumnAccess("district", ColumnUse.FILTER, ("east",)),
        ColumnAccess("district", ColumnUse.GROUP, ("east", "west")),
        ColumnAccess("year", ColumnUse.GROUP),
        ColumnAccess("year", ColumnUse.FILTER),
        ColumnAccess("year", ColumnUse.AGGREGATE),
    ],
)
def test_column_uses_within_the_rules_are_allowed(access: ColumnAccess) -> None:
    allowed(run(request(columns=(AGGREGATE_COLUMNS[0], access))))


def test_release_of_unmasked_join_key_refused() -> None:
    req = request(
        kind=QueryKind.PSI_MEMBERSHIP,
        columns=(
            ColumnAccess("masked_id", ColumnUse.JOIN),
            ColumnAccess("id_number", ColumnUse.RELEASE),
        ),
    )
    refused(run(req, UNCONDITIONAL, (grant(UNCONDITIONAL),)), policy.COLUMN_JOIN_KEY_RELEASE)


# --------------------------------------------------------------------------- grant fields


def test_grantee_must_hold_the_grant() -> None:
    refused(run(request(), grants=(grant(grantee="bob"),)), policy.GRANT_MISSING)
    refused(run(request(), grants=()), policy.GRANT_MISSING)
    allowed(run(request(requester="bob"), grants=(grant(grantee="bob"),)))


def test_grant_must_be_on_this_dataset() -> None:
    tax = replace(GENERAL, name="tax")
    refused(run(request(), grants=(grant(tax),)), policy.GRANT_MISSING)


def test_grant_purpose_must_match() -> None:
    refused(run(request(purpose="marketing")), policy.GRANT_PURPOSE)
    allowed(run(request(purpose="  Poverty Relief Evaluation ")))


def test_grant_columns_must_cover_every_column_used() -> None:
    narrow = grant(columns=("amount", "id_number"))
    decision = run(request(), grants=(narrow,))
    refused(decision, policy.GRANT_COLUMN)
    assert "district" in decision.message
    allowed(run(request(columns=AGGREGATE_COLUMNS[:2]), grants=(narrow,)))


def test_grant_query_kinds_must_cover_the_query() -> None:
    card_only = grant(kinds=(QueryKind.PSI_CARDINALITY,))
    refused(run(request(), grants=(card_only,)), policy.GRANT_QUERY_KIND)
    req = request(kind=QueryKind.PSI_CARDINALITY, columns=AGGREGATE_COLUMNS[:1])
    allowed(run(req, grants=(card_only,)))


def test_grant_expiry_is_exclusive() -> None:
    g = grant(expires_at=NOW + 10)
    allowed(run(request(), grants=(g,), now=NOW + 9))
    refused(run(request(), grants=(g,), now=NOW + 10), policy.GRANT_EXPIRED)


def test_grant_revoked() -> None:
    g = grant()
    refused(run(request(), grants=(replace(g, revoked_at=NOW - 1),)), policy.GRANT_REVOKED)
    allowed(run(request(), grants=(g,)))


def test_grant_epsilon_budget_is_exact() -> None:
    g = grant(epsilon="1.0")
    # Nine tenths spent plus one asked is exactly the budget: allowed, with no rounding.
    spent = {
        g.grant_id: GrantUsage(queries=9, epsilon_spent=sum([Fraction(1, 10)] * 9, Fraction(0)))
    }
    ob = allowed(run(request(epsilon=Fraction(1, 10)), grants=(g,), usage=spent))
    assert ob.epsilon == Fraction(1, 10)
    refused(run(request(epsilon=Fraction(2, 10)), grants=(g,), usage=spent), policy.GRANT_BUDGET)
    # Reserved ε counts like spent ε: queries waiting for approval hold their share.
    held = {g.grant_id: GrantUsage(queries=9, epsilon_reserved=Fraction(9, 10))}
    refused(run(request(epsilon=Fraction(2, 10)), grants=(g,), usage=held), policy.GRANT_BUDGET)
    # An exact release spends no ε, so an exhausted budget does not block it on general data.
    done = {g.grant_id: GrantUsage(queries=10, epsilon_spent=Fraction(1))}
    exact = request(dp_noise=False, epsilon=Fraction(0), exact=True, columns=AGGREGATE_COLUMNS[:2])
    allowed(run(exact, grants=(g,), usage=done))


def test_one_ledger_per_analyst_and_dataset_across_grants() -> None:
    first = grant(epsilon="1.0", grant_id="00000000000000b1")
    second = grant(epsilon="1.0", grant_id="00000000000000b2")
    # The first grant is spent; the second is fresh, but the ledger over both is at its cap.
    usage = {first.grant_id: GrantUsage(queries=1, epsilon_spent=Fraction(1))}
    decision = run(
        request(epsilon=Fraction(1, 2)), grants=(first, second), usage=usage,
        budget=DatasetBudget(spent=Fraction(1)),
    )  # fmt: skip
    refused(decision, policy.BUDGET_DATASET)
    # A larger grant raises the cap to its own ε, never to the sum.
    bigger = grant(epsilon="1.5", grant_id="00000000000000b3")
    ob = allowed(
        run(request(epsilon=Fraction(1, 2)), grants=(first, bigger), usage=usage,
            budget=DatasetBudget(spent=Fraction(1)))
    )  # fmt: skip
    assert ob.grant_id == bigger.grant_id
    refused(
        run(request(epsilon=Fraction(1, 2)), grants=(first, bigger), usage=usage,
            budget=DatasetBudget(spent=Fraction(1), reserved=Fraction(1, 10))),
        policy.BUDGET_DATASET,
    )  # fmt: skip


def test_grant_is_checked_before_any_rule_of_the_data() -> None:
    # Without a grant, a core dataset, a dataset not shared and a foreign jurisdiction all
    # give the same refusal: nothing about the dataset's rules is revealed.
    core = replace(GENERAL, grade=Grade.CORE)
    none = replace(GENERAL, sharing_type=SharingType.NONE, legal_basis="PIPL")
    for dataset in (GENERAL, core, none):
        decision = run(request(jurisdiction="US"), dataset, grants=())
        refused(decision, policy.GRANT_MISSING)
        assert decision.message == "'alice' holds no grant on 'benefits'"


def test_grant_max_queries() -> None:
    g = grant(max_queries=3)
    allowed(run(request(), grants=(g,), usage={g.grant_id: GrantUsage(queries=2)}))
    refused(
        run(request(), grants=(g,), usage={g.grant_id: GrantUsage(queries=3)}), policy.GRANT_COUNT
    )


def test_grant_created_before_the_dataset_registration() -> None:
    old = grant(created_at=GENERAL.created_at - 1)
    refused(run(request(), grants=(old,)), policy.GRANT_PREDATES_DATASET)
    allowed(run(request(), grants=(grant(created_at=GENERAL.created_at),)))


def test_grant_signature_checked_when_key_given() -> None:
    g = grant()
    allowed(run(request(), grants=(g,), issuer_key=KEY.public_key()))
    forged = replace(g, max_queries=10_000)
    refused(run(request(), grants=(forged,), issuer_key=KEY.public_key()), policy.GRANT_SIGNATURE)


def test_first_usable_grant_wins_else_most_specific_refusal() -> None:
    expired = grant(expires_at=NOW, grant_id="00000000000000e1")
    good = grant(grant_id="00000000000000e2")
    assert allowed(run(request(), grants=(expired, good))).grant_id == good.grant_id
    wrong_column = grant(columns=("amount",), grant_id="00000000000000e3")
    refused(run(request(), grants=(expired, wrong_column)), policy.GRANT_COLUMN)


# --------------------------------------------------------------------------- API


def test_enforce_raises_and_returns_obligations() -> None:
    assert (
        enforce(request(), GENERAL, (grant(),), now=NOW, node_jurisdiction="CN").grant_id
        == "00000000000000a1"
    )
    with pytest.raises(PolicyRefused) as info:
        enforce(request(), GENERAL, (), now=NOW, node_jurisdiction="CN")
    assert info.value.rule == policy.GRANT_MISSING


def test_audit_fields_hold_no_floats() -> None:
    fields = run(request()).audit_fields()
    assert fields["rule"] == policy.ALLOWED and fields["epsilon"] == "0.1"
    assert not any(isinstance(v, float) for v in fields.values())
    assert run(request(purpose="x")).audit_fields()["rule"] == policy.GRANT_PURPOSE


@pytest.mark.parametrize(
    "req",
    [
        request(dp_noise=True, epsilon=Fraction(0)),
        request(epsilon=Fraction(-1)),
        request(exact=True),
        request(columns=()),
    ],
)
def test_inconsistent_requests_are_malformed(req: AccessRequest) -> None:
    with pytest.raises(MalformedInput):
        run(req)


# ---------------------------------------------------------- membership to a department

TO_DEPARTMENT = dict(recipient="tax", recipient_is_department=True, recipient_jurisdiction="CN")
JOIN_ONLY = (ColumnAccess("id_number", ColumnUse.JOIN),)


def membership_to(**overrides: object) -> AccessRequest:
    fields: dict[str, object] = {
        "kind": QueryKind.PSI_MEMBERSHIP, "columns": JOIN_ONLY, "dp_noise": True,
        "epsilon": Fraction(1),
    }  # fmt: skip
    base = request(**fields)  # type: ignore[arg-type]
    return replace(base, **(TO_DEPARTMENT | overrides))  # type: ignore[arg-type]


def test_membership_to_a_department_is_allowed_on_conditional_data_without_a_mask() -> None:
    allowed(run(membership_to()))  # keys stay with the receiving department


def test_membership_to_a_department_needs_a_membership_grant() -> None:
    cardinality_only = grant(kinds=(QueryKind.PSI_CARDINALITY,))
    refused(run(membership_to(), GENERAL, (cardinality_only,)), policy.GRANT_QUERY_KIND)


def test_membership_to_a_department_outside_the_allowed_jurisdictions_is_refused() -> None:
    mainland_only = replace(GENERAL, allowed_jurisdictions=("CN",))
    refused(
        run(membership_to(recipient_jurisdiction="HK"), mainland_only, (grant(mainland_only),)),
        policy.JURISDICTION,
    )


def test_membership_to_someone_not_a_department_is_refused() -> None:
    refused(run(membership_to(recipient_is_department=False)), policy.RECIPIENT)


def test_membership_to_a_department_never_reaches_important_data() -> None:
    refused(
        run(membership_to(), IMPORTANT, (grant(IMPORTANT),)), policy.GRADE_IMPORTANT_AGGREGATES_ONLY
    )
