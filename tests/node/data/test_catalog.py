"""The dataset catalogue over real SQLite files: registration rules, atomic import, reads."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest

from govshare.model.conditions import Condition
from govshare.model.governance import ColumnKind, ColumnRule, Grade, Owner, OwnerKind, SharingType
from govshare.node.data import resident_id
from govshare.node.data.catalog import REASONS_KEPT, Catalogue, ImportReport
from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound, PolicyRefused

IDS = [resident_id.make("110101", date(1970 + i, 1 + i % 12, 1 + i), i) for i in range(12)]
OWNER = Owner(OwnerKind.INDIVIDUAL, "residents (in trust)", "social")
RULES = [
    ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
    ColumnRule("district", ColumnKind.GROUP_KEY, domain=("east", "west")),
    ColumnRule("amount", ColumnKind.AGGREGATE),
    ColumnRule("name", ColumnKind.MASKED, mask="keep_last:1"),
    ColumnRule("notes", ColumnKind.DENY),
]
HEADER = "id_number,district,amount,name,notes"


@dataclass
class Recorder:
    entries: list[tuple[str, dict[str, object], str]] = field(default_factory=list)
    fail: bool = False

    def record(
        self,
        kind: str,
        fields: Mapping[str, object],
        *,
        actor: str,
        query_id: str | None = None,
    ) -> int:
        if self.fail:
            raise OSError("audit log unavailable")
        self.entries.append((kind, dict(fields), actor))
        return len(self.entries) - 1


def good_rows(n: int = 12) -> list[str]:
    return [
        f"{IDS[i].lower()},{'east' if i % 2 else 'west'},{100 * i},Person{i},n{i}" for i in range(n)
    ]


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def add(
    catalogue: Catalogue,
    csv_path: Path,
    *,
    name: str = "benefits",
    columns: list[ColumnRule] | None = None,
    audit: Recorder | None = None,
    grade: Grade | str = Grade.GENERAL,
    sharing_type: SharingType = SharingType.CONDITIONAL,
    legal_basis: str = "",
    skip_invalid: bool = False,
    allowed_jurisdictions: tuple[str, ...] | list[str] = (),
    min_group_size: int = 0,
) -> ImportReport:
    return catalogue.add(
        csv_path,
        name=name,
        grade=grade,
        sharing_type=sharing_type,
        legal_basis=legal_basis,
        owner=OWNER,
        columns=columns if columns is not None else RULES,
        description="monthly benefits",
        skip_invalid=skip_invalid,
        actor="operator:social",
        audit=audit,
        allowed_jurisdictions=allowed_jurisdictions,
        min_group_size=min_group_size,
    )


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    return Catalogue(tmp_path / "node.db")


def test_add_imports_rows_normalised_and_records_audit(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    audit = Recorder()
    report = add(catalogue, write_csv(tmp_path / "b.csv", good_rows()), audit=audit)
    assert report.imported == 12
    assert report.rejected == 0
    info = catalogue.get("benefits")
    assert info.row_count == 12
    assert info.grade is Grade.GENERAL
    assert info.column("name") == ColumnRule("name", ColumnKind.MASKED, mask="keep_last:1")
    # Keys come back upper-cased (normalised), distinct and sorted.
    assert catalogue.keys("benefits", "id_number") == sorted(IDS)
    [(kind, fields, actor)] = audit.entries
    assert (kind, actor) == ("dataset.added", "operator:social")
    assert fields["name"] == "benefits" and fields["row_count"] == 12
    assert not any(isinstance(v, float) for v in fields.values())
    assert [d.name for d in catalogue.list()] == ["benefits"]


def test_catalogue_survives_reopening(catalogue: Catalogue, tmp_path: Path) -> None:
    add(catalogue, write_csv(tmp_path / "b.csv", good_rows()), allowed_jurisdictions=["CN"])
    again = Catalogue(catalogue.path)
    assert again.get("benefits") == catalogue.get("benefits")
    assert again.get("benefits").allowed_jurisdictions == ("CN",)


def test_bad_row_refuses_whole_file_with_row_number(catalogue: Catalogue, tmp_path: Path) -> None:
    rows = good_rows()
    rows[6] = rows[6].replace(",600,", ",6.5,")  # row 7: not an integer
    audit = Recorder()
    with pytest.raises(MalformedInput, match=r"^row 7 \(line 8\): column amount: not an integer"):
        add(catalogue, write_csv(tmp_path / "b.csv", rows), audit=audit)
    with pytest.raises(NotFound):
        catalogue.get("benefits")
    assert "ds_benefits" not in tables(catalogue.path)  # nothing half-imported
    assert audit.entries == []


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (f"{IDS[0]},east,1,A", "has 4 cells, the header has 5"),
        (
            f"{IDS[0][:17]}0,east,1,A,n" if IDS[0][17] != "0" else f"{IDS[0][:17]}1,east,1,A,n",
            "column id_number: resident id check character is wrong",
        ),
        (",east,1,A,n", "column id_number: empty join key"),
        (f"{IDS[0]},north,1,A,n", "column district: value outside the declared domain"),
        (f"{IDS[0]},east,,A,n", "column amount: not an integer"),
        (f"{IDS[0]},east,1_000,A,n", "column amount: not an integer"),
        (f"{IDS[0]},east,99999999999999999999,A,n", "column amount: not an integer"),
    ],
)
def test_each_bad_row_kind_is_refused(
    catalogue: Catalogue, tmp_path: Path, row: str, reason: str
) -> None:
    rows = good_rows(3)
    rows.insert(2, row)
    with pytest.raises(MalformedInput, match=f"^row 3 .*{reason}") as info:
        add(catalogue, write_csv(tmp_path / "b.csv", rows))
    assert info.value.field == "row 3"
    assert tables(catalogue.path) == {"datasets"}


def test_skip_invalid_imports_good_rows_and_reports(catalogue: Catalogue, tmp_path: Path) -> None:
    rows = good_rows()
    for i in (1, 3, 5, 7, 9, 11):
        rows[i] = rows[i].replace(",east,", ",north,")  # six bad rows
    audit = Recorder()
    report = add(catalogue, write_csv(tmp_path / "b.csv", rows), skip_invalid=True, audit=audit)
    assert report.imported == 6
    assert report.rejected == 6
    first = report.first_rejections
    assert len(first) == REASONS_KEPT
    assert [r.row for r in first] == [2, 4, 6, 8, 10]
    assert "outside the declared domain" in first[0].reason
    assert catalogue.get("benefits").row_count == 6
    assert audit.entries[0][1]["rejected_rows"] == 6


def test_skip_invalid_with_no_good_row_imports_nothing(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    rows = [r.replace(",east,", ",north,").replace(",west,", ",north,") for r in good_rows(3)]
    with pytest.raises(MalformedInput, match="no valid row"):
        add(catalogue, write_csv(tmp_path / "b.csv", rows), skip_invalid=True)
    assert tables(catalogue.path) == {"datasets"}


def test_audit_failure_rolls_back_the_import(catalogue: Catalogue, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        add(catalogue, write_csv(tmp_path / "b.csv", good_rows()), audit=Recorder(fail=True))
    assert catalogue.list() == []
    assert tables(catalogue.path) == {"datasets"}


def test_duplicate_name_is_refused(catalogue: Catalogue, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "b.csv", good_rows())
    add(catalogue, path)
    with pytest.raises(AlreadyExists):
        add(catalogue, path)
    assert catalogue.get("benefits").row_count == 12


@pytest.mark.parametrize(
    ("columns", "extra", "message"),
    [
        (RULES, {"sharing_type": SharingType.NONE}, "legal_basis must not be empty"),
        (RULES[:4], {}, "'notes' have no rule"),
        ([*RULES, ColumnRule("extra", ColumnKind.PLAINTEXT)], {}, "does not have"),
        (
            [ColumnRule("district", ColumnKind.GROUP_KEY), *RULES[:1], *RULES[2:]],
            {},
            "needs a declared domain",
        ),
        ([*RULES[:3], ColumnRule("name", ColumnKind.MASKED), RULES[4]], {}, "needs a masking"),
        (
            [*RULES[:3], ColumnRule("name", ColumnKind.MASKED, mask="shuffle"), RULES[4]],
            {},
            "unknown masking rule",
        ),
        ([ColumnRule("id_number", ColumnKind.JOIN_KEY), *RULES[1:]], {}, "needs a key type"),
        (
            [ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="dna"), *RULES[1:]],
            {},
            "unknown key type",
        ),
        (
            [*RULES[:2], ColumnRule("amount", ColumnKind.AGGREGATE, mask="redact"), *RULES[3:]],
            {},
            "takes a masking rule",
        ),
        ([*RULES, RULES[0]], {}, "has two rules"),
        (RULES, {"min_group_size": 3}, "below the general floor 5"),
        (RULES, {"grade": Grade.IMPORTANT, "min_group_size": 9}, "below the important floor 10"),
        (RULES, {"allowed_jurisdictions": ["China"]}, "ISO 3166-1"),
        (RULES, {"grade": "secret"}, "secret"),
    ],
)
def test_registration_rules(
    catalogue: Catalogue,
    tmp_path: Path,
    columns: list[ColumnRule],
    extra: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(MalformedInput, match=message):
        add(
            catalogue,
            write_csv(tmp_path / "b.csv", good_rows()),
            columns=columns,
            **extra,  # type: ignore[arg-type]
        )
    assert catalogue.list() == []


def test_none_sharing_with_legal_basis_is_registered(catalogue: Catalogue, tmp_path: Path) -> None:
    add(
        catalogue,
        write_csv(tmp_path / "b.csv", good_rows()),
        sharing_type=SharingType.NONE,
        legal_basis="Personal Information Protection Law art. 28",
    )
    assert catalogue.get("benefits").legal_basis.startswith("Personal Information")


@pytest.mark.parametrize("name", ["Benefits", "1st", "drop table", "a;b", "x" * 64, "ds-x"])
def test_dataset_names_are_strict_identifiers(
    catalogue: Catalogue, tmp_path: Path, name: str
) -> None:
    with pytest.raises(MalformedInput, match="lower-case identifier"):
        add(catalogue, write_csv(tmp_path / "b.csv", good_rows()), name=name)


def test_unreadable_files_are_malformed(catalogue: Catalogue, tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes(HEADER.encode() + b"\n" + good_rows(1)[0].encode() + b"\xe9\n")
    with pytest.raises(MalformedInput):
        add(catalogue, latin)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(MalformedInput, match="no header"):
        add(catalogue, empty)
    with pytest.raises(NotFound):
        add(catalogue, tmp_path / "missing.csv")
    assert tables(catalogue.path) == {"datasets"}


def test_bom_and_blank_lines_are_tolerated(catalogue: Catalogue, tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text("\ufeff" + HEADER + "\n" + "\n".join(good_rows(3)) + "\n\n", encoding="utf-8")
    assert add(catalogue, path).imported == 3


def test_reads_filter_and_refuse_deny(catalogue: Catalogue, tmp_path: Path) -> None:
    add(catalogue, write_csv(tmp_path / "b.csv", good_rows()))
    east = [Condition("district", "=", "east")]
    assert catalogue.count("benefits", where=east) == 6
    assert catalogue.keys("benefits", "id_number", where=east) == sorted(IDS[1::2])
    big = [Condition("amount", ">=", "900"), Condition("district", "in", ("east", "west"))]
    assert list(catalogue.rows("benefits", ["amount", "name"], where=big)) == [
        (900, "Person9"),
        (1000, "Person10"),
        (1100, "Person11"),
    ]
    # A join-key filter is normalised like the stored keys.
    assert catalogue.count("benefits", where=[Condition("id_number", "=", IDS[0].lower())]) == 1
    with pytest.raises(PolicyRefused) as info:
        catalogue.rows("benefits", ["notes"])
    assert info.value.rule == "column.deny"
    with pytest.raises(PolicyRefused):
        catalogue.count("benefits", where=[Condition("notes", "=", "n1")])
    with pytest.raises(MalformedInput, match="not a join key"):
        catalogue.keys("benefits", "district")
    with pytest.raises(MalformedInput, match="operator"):
        catalogue.count("benefits", where=[Condition("amount", "LIKE", "1")])
    with pytest.raises(MalformedInput, match="integers"):
        catalogue.count("benefits", where=[Condition("amount", "=", "1 OR 1=1")])
    with pytest.raises(NotFound):
        catalogue.rows("benefits", ["nope"])


def test_remove_drops_rows_and_records(catalogue: Catalogue, tmp_path: Path) -> None:
    add(catalogue, write_csv(tmp_path / "b.csv", good_rows()))
    audit = Recorder()
    removed = catalogue.remove("benefits", actor="operator:social", audit=audit)
    assert removed.row_count == 12
    assert audit.entries[0] == (
        "dataset.removed",
        {"name": "benefits", "row_count": 12},
        "operator:social",
    )
    # Then the destruction record (tests/node/data/test_at_rest.py checks what it says).
    assert [(kind, actor) for kind, _, actor in audit.entries[1:]] == [
        ("dataset.destroyed", "operator:social")
    ]
    assert audit.entries[1][1]["rows"] == 12
    assert catalogue.list() == []
    assert tables(catalogue.path) == {"datasets"}
    with pytest.raises(NotFound):
        catalogue.remove("benefits", actor="operator:social", audit=None)
    with pytest.raises(NotFound):
        catalogue.get("benefits")
