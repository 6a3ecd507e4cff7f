"""Every masking rule, end to end: a PSI membership between two real nodes over mutual TLS
releases exactly the masked intersection, and hash_prefix pseudonyms are keyed per column from
the releasing node's own secret."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PURPOSE, FederationFixture, PsiData, grant, register

from govshare.client.analyst import PsiOutcome, run_psi
from govshare.model.governance import QueryKind, SharingType
from govshare.model.query_plan import PsiPlan, Side
from govshare.node.data import keys as key_types
from govshare.node.data import resident_id
from govshare.node.data.mask_key import MASK_SECRET, MaskSecret
from govshare.node.data.masking import apply_mask
from govshare.protocols.suite import STANDARD

# Rules released from resident IDs; year_only needs dates and has its own datasets.
ID_RULES = ("keep_last:4", "keep_first:3", "redact", "hash_prefix")
DATES = "mr_dates"
HASH = "hash_prefix"
HASH_COPY = "mr_tax_hash_copy"  # the same rows as tax's hash_prefix dataset, under another name
# Tax holds people 0..29, civil 12..39: 18 shared, well above the general grade's k = 5.
TAX_PEOPLE = range(30)
CIVIL_PEOPLE = range(12, 40)


def slug(rule: str) -> str:
    return rule.replace(":", "_")


def tax_dataset(rule: str) -> str:
    return f"mr_tax_{slug(rule)}"


def civil_dataset(rule: str) -> str:
    return f"mr_civil_{slug(rule)}"


def person_id(person: int) -> str:
    return resident_id.make("110101", dt.date(1950, 1, 1) + dt.timedelta(days=397 * person), person)


def birth_date(person: int) -> str:
    """A date written one of the three ways year_only reads; several share a year."""
    day = dt.date(1980, 2, 3) + dt.timedelta(days=131 * person)
    return day.strftime(("%Y-%m-%d", "%Y/%m/%d", "%Y%m%d")[person % 3])


@dataclass(frozen=True)
class Files:
    tax_ids: Path
    civil_ids: Path
    tax_dates: Path
    civil_dates: Path


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def column_values(path: Path, column: str, key_type: str) -> set[str]:
    """The distinct normalised keys of one CSV column, as the node stores them."""
    with path.open(encoding="utf-8") as handle:
        return {key_types.normalise(key_type, row[column]) for row in csv.DictReader(handle)}


def membership_kinds() -> list[QueryKind]:
    return [QueryKind.PSI_MEMBERSHIP]


@pytest.fixture(scope="module")
def files(psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Register, on tax and civil, one unconditional dataset pair per rule, granted to alice."""
    data = tmp_path_factory.mktemp("masking_release")
    made = Files(
        tax_ids=write_csv(
            data / "tax_ids.csv",
            ("id_number", "alt_id", "year"),
            [(person_id(p), person_id(p), "2025") for p in TAX_PEOPLE],
        ),
        civil_ids=write_csv(
            data / "civil_ids.csv", ("id_number",), [(person_id(p),) for p in CIVIL_PEOPLE]
        ),
        tax_dates=write_csv(
            data / "tax_dates.csv",
            ("birth_date", "year"),
            [(birth_date(p), "2025") for p in TAX_PEOPLE],
        ),
        civil_dates=write_csv(
            data / "civil_dates.csv", ("birth_date",), [(birth_date(p),) for p in CIVIL_PEOPLE]
        ),
    )
    tax, civil = psi_data.tax, psi_data.civil
    unconditional = SharingType.UNCONDITIONAL
    for rule in ID_RULES:
        tax_columns = (
            f"id_number=join_key:resident_id:mask={rule}",
            f"alt_id=join_key:resident_id:mask={rule}",
            "year=plaintext",
        )
        names = [tax_dataset(rule)] + ([HASH_COPY] if rule == HASH else [])
        for name in names:
            register(tax, made.tax_ids, name=name, columns=tax_columns, sharing=unconditional)
            grant(tax, name, "alice", ["id_number", "alt_id"], membership_kinds())
        register(
            civil, made.civil_ids, name=civil_dataset(rule),
            columns=(f"id_number=join_key:resident_id:mask={rule}",), sharing=unconditional,
        )  # fmt: skip
        grant(civil, civil_dataset(rule), "alice", ["id_number"], membership_kinds())
    register(
        tax, made.tax_dates, name=f"{DATES}_tax", sharing=unconditional,
        columns=("birth_date=join_key:text:mask=year_only", "year=plaintext"),
    )  # fmt: skip
    grant(tax, f"{DATES}_tax", "alice", ["birth_date"], membership_kinds())
    register(
        civil, made.civil_dates, name=f"{DATES}_civil", sharing=unconditional,
        columns=("birth_date=join_key:text:mask=year_only",),
    )  # fmt: skip
    grant(civil, f"{DATES}_civil", "alice", ["birth_date"], membership_kinds())
    return made


def release(
    fed: FederationFixture,
    rule: str,
    tax_dataset: str,
    tax_column: str,
    civil_dataset: str,
    column: str,
) -> PsiOutcome:
    """A membership whose matches tax (the left, releasing side) hands alice through ``rule``,
    which both nodes check is their column's own."""
    plan = PsiPlan(
        kind=QueryKind.PSI_MEMBERSHIP,
        purpose=PURPOSE,
        left=Side("tax", tax_dataset, tax_column),
        right=Side("civil", civil_dataset, column),
        mask=rule,
    )
    return run_psi(fed.identity("alice"), plan)


def id_intersection(files: Files, tax_column: str = "id_number") -> set[str]:
    shared = column_values(files.tax_ids, tax_column, key_types.RESIDENT_ID) & column_values(
        files.civil_ids, "id_number", key_types.RESIDENT_ID
    )
    assert len(shared) == len(set(TAX_PEOPLE) & set(CIVIL_PEOPLE))  # the data is what we think
    return shared


@pytest.mark.parametrize("rule", ["keep_last:4", "keep_first:3", "redact"])
def test_unkeyed_rules_release_exactly_the_masked_intersection(
    fed: FederationFixture, files: Files, rule: str
) -> None:
    outcome = release(fed, rule, tax_dataset(rule), "id_number", civil_dataset(rule), "id_number")
    shared = id_intersection(files)
    assert sorted(outcome.records) == sorted(apply_mask(rule, k, suite=STANDARD) for k in shared)
    assert outcome.count == len(shared)
    assert not set(outcome.records) & shared  # never a whole key


def test_year_only_releases_the_years_of_the_shared_dates(
    fed: FederationFixture, files: Files
) -> None:
    outcome = release(
        fed, "year_only", f"{DATES}_tax", "birth_date", f"{DATES}_civil", "birth_date"
    )
    shared = column_values(files.tax_dates, "birth_date", key_types.TEXT) & column_values(
        files.civil_dates, "birth_date", key_types.TEXT
    )
    expected = sorted(apply_mask("year_only", d, suite=STANDARD) for d in shared)
    assert len(shared) == len(set(TAX_PEOPLE) & set(CIVIL_PEOPLE))
    assert len(set(expected)) < len(expected)  # some years repeat: a multiset, not a set
    assert sorted(outcome.records) == expected
    assert all(len(r) == 4 and r.isdigit() for r in outcome.records)


def tax_secret(fed: FederationFixture) -> bytes:
    path = fed.node_home("tax") / MASK_SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_bytes()


def test_hash_prefix_is_keyed_per_column_from_the_node_secret(
    fed: FederationFixture, psi_data: PsiData, files: Files
) -> None:
    secret = MaskSecret.load(fed.node_home("tax") / MASK_SECRET)
    shared = id_intersection(files)
    civil = civil_dataset(HASH)

    def expected(dataset: str, column: str) -> list[str]:
        key = secret.key(dataset, column, STANDARD)
        return sorted(apply_mask(HASH, k, key=key, suite=STANDARD) for k in shared)

    first = release(fed, HASH, tax_dataset(HASH), "id_number", civil, "id_number")
    assert sorted(first.records) == expected(tax_dataset(HASH), "id_number")
    assert len(set(first.records)) == len(shared)
    # The same column released again: the same pseudonyms (linkable within the column).
    again = release(fed, HASH, tax_dataset(HASH), "id_number", civil, "id_number")
    assert again.query_id != first.query_id
    assert sorted(again.records) == sorted(first.records)
    # The same people released from another column, or another dataset: unlinkable.
    other_column = release(fed, HASH, tax_dataset(HASH), "alt_id", civil, "id_number")
    assert sorted(other_column.records) == expected(tax_dataset(HASH), "alt_id")
    other_dataset = release(fed, HASH, HASH_COPY, "id_number", civil, "id_number")
    assert sorted(other_dataset.records) == expected(HASH_COPY, "id_number")
    for other in (other_column, other_dataset):
        assert not set(other.records) & set(first.records)

    # Neither the secret nor a key derived from it is in the releasing node's audit log.
    raw = tax_secret(fed)
    leaked = [raw, secret.key(tax_dataset(HASH), "id_number", STANDARD)]
    forms = [f for b in leaked for f in (b, b.hex().encode(), base64.b64encode(b))]
    log = psi_data.tax.audit
    for entry in log.entries(0, log.size):
        assert not any(form in entry.data for form in forms)
