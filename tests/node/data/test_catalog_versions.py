"""Dataset versions: a replace refreshes rows and keeps the registration (and so the grants)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from fractions import Fraction
from pathlib import Path

import pytest

from govshare.model.governance import (
    ColumnAccess,
    ColumnKind,
    ColumnRule,
    ColumnUse,
    Grade,
    Owner,
    OwnerKind,
    QueryKind,
    Role,
    SharingType,
)
from govshare.node.data import resident_id
from govshare.node.data.catalog import Catalogue, ImportReport, Restatement
from govshare.node.data.column_format import ColumnFormat, NullPolicy
from govshare.node.data.source_file import ProgressCallback, SourceFormat
from govshare.node.policy.decision import (
    ALLOWED,
    GRANT_PREDATES_DATASET,
    AccessRequest,
    decide,
)
from govshare.node.policy.grants import Grant
from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound

T0 = 1_800_000_000
ACTOR = "operator:social"
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
        self, kind: str, fields: Mapping[str, object], *, actor: str, query_id: str | None = None
    ) -> int:
        if self.fail:
            raise OSError("audit log unavailable")
        self.entries.append((kind, dict(fields), actor))
        return len(self.entries) - 1


def good_rows(n: int = 12) -> list[str]:
    return [f"{IDS[i]},{'east' if i % 2 else 'west'},{100 * i},Person{i},n{i}" for i in range(n)]


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def add(catalogue: Catalogue, path: Path, *, now: int = T0, audit: Recorder | None = None) -> None:
    catalogue.add(
        path,
        name="benefits",
        grade=Grade.GENERAL,
        sharing_type=SharingType.CONDITIONAL,
        owner=OWNER,
        columns=RULES,
        actor=ACTOR,
        audit=audit,
        now=now,
    )


def replace(
    catalogue: Catalogue,
    path: Path,
    *,
    now: int = T0 + 100,
    audit: Recorder | None = None,
    stated: Restatement | None = None,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    return catalogue.replace(
        path, name="benefits", stated=stated or Restatement(), actor=ACTOR, audit=audit,
        now=now, progress=progress,
    )  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    return Catalogue(tmp_path / "node.db")


def grant(created_at: int) -> Grant:
    return Grant(
        grant_id="0123456789abcdef",
        dataset="benefits",
        grantee="alice",
        purpose="review",
        columns=("amount", "id_number"),
        query_kinds=(QueryKind.INTERSECTION_AGGREGATE,),
        expires_at=T0 + 10**6,
        epsilon=Fraction(5),
        max_queries=10,
        created_at=created_at,
        issuer="social",
        signature=b"",
    )


def admitted(catalogue: Catalogue, granted: Grant) -> str:
    request = AccessRequest(
        requester="alice",
        role=Role.ANALYST,
        jurisdiction="CN",
        query_kind=QueryKind.INTERSECTION_AGGREGATE,
        columns=(
            ColumnAccess("id_number", ColumnUse.JOIN),
            ColumnAccess("amount", ColumnUse.AGGREGATE),
        ),
        purpose="review",
        dp_noise=True,
        epsilon=Fraction(1),
    )
    decision = decide(
        request, catalogue.get("benefits"), [granted], now=T0 + 1000, node_jurisdiction="CN"
    )
    return decision.rule


def test_replace_is_a_new_version_of_the_same_registration(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    v1 = write_csv(tmp_path / "v1.csv", good_rows(4))
    add(catalogue, v1)
    granted = grant(T0 + 10)
    assert admitted(catalogue, granted) == ALLOWED
    v2 = write_csv(tmp_path / "v2.csv", good_rows(12))
    audit = Recorder()
    report = replace(catalogue, v2, audit=audit)
    assert (report.imported, report.version, report.previous_row_count) == (12, 2, 4)
    record = catalogue.record("benefits")
    assert (record.version, record.replaced_at, record.info.created_at) == (2, T0 + 100, T0)
    assert record.info.row_count == 12 and record.source_sha256 == sha256(v2)
    assert catalogue.count("benefits") == 12
    # The first version's table is gone; the new one has a name of its own.
    [table] = [t for t in tables(catalogue.path) if t.startswith("ds_")]
    assert table.startswith("ds_benefits@")
    [(kind, fields, actor)] = audit.entries
    assert (kind, actor) == ("dataset.replaced", ACTOR)
    assert fields["previous_row_count"] == 4 and fields["row_count"] == 12
    assert fields["previous_source_sha256"] == sha256(v1)
    assert fields["source_sha256"] == sha256(v2)
    assert (fields["previous_version"], fields["version"]) == (1, 2)
    # The grant issued under version 1 still admits queries on version 2 ...
    assert admitted(catalogue, granted) == ALLOWED
    assert replace(catalogue, v1, now=T0 + 200).version == 3
    assert admitted(catalogue, granted) == ALLOWED
    # ... while a remove and add is a new dataset, which the grant predates.
    catalogue.remove("benefits", actor=ACTOR, audit=None)
    add(catalogue, v2, now=T0 + 300)
    assert admitted(catalogue, granted) == GRANT_PREDATES_DATASET
    assert catalogue.record("benefits").version == 1


def test_add_of_an_existing_name_is_still_refused(catalogue: Catalogue, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "b.csv", good_rows())
    add(catalogue, path)
    with pytest.raises(AlreadyExists, match="dataset replace refreshes its rows"):
        add(catalogue, path)
    with pytest.raises(NotFound):
        catalogue.replace(path, name="other", actor=ACTOR, audit=None)


@pytest.mark.parametrize(
    ("stated", "options"),
    [
        (Restatement(grade=Grade.IMPORTANT), "--grade"),
        (Restatement(description="another"), "--description"),
        (
            Restatement(allowed_jurisdictions=["HK"], require_dp=True),
            "--jurisdiction, --require-dp",
        ),
        (Restatement(columns=[*RULES[:4], ColumnRule("notes", ColumnKind.PLAINTEXT)]), "--column"),
        (
            Restatement(columns=RULES, formats={"amount": ColumnFormat(scale=2)}),
            "--column",
        ),
    ],
)
def test_replace_refuses_a_changed_registration(
    catalogue: Catalogue, tmp_path: Path, stated: Restatement, options: str
) -> None:
    path = write_csv(tmp_path / "b.csv", good_rows())
    add(catalogue, path)
    with pytest.raises(MalformedInput, match=f"this would change {options}: .*remove the dataset"):
        replace(catalogue, path, stated=stated)
    assert catalogue.record("benefits").version == 1


def test_replace_accepts_the_registration_restated(catalogue: Catalogue, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "b.csv", good_rows())
    add(catalogue, path)
    same = Restatement(
        grade=Grade.GENERAL,
        sharing_type=SharingType.CONDITIONAL,
        owner=OWNER.name,
        description="",
        columns=list(reversed(RULES)),  # the order of --column options does not matter
        formats={"amount": ColumnFormat(null=NullPolicy.REFUSE)},  # the default, stated
    )
    assert replace(catalogue, path, stated=same).version == 2


def test_a_failed_replace_leaves_the_current_version(catalogue: Catalogue, tmp_path: Path) -> None:
    v1 = write_csv(tmp_path / "v1.csv", good_rows(4))
    add(catalogue, v1)
    before = tables(catalogue.path)
    rows = good_rows(12)
    rows[9] = rows[9].replace(",east,", ",north,")
    audit = Recorder()
    with pytest.raises(MalformedInput, match=r"^row 10 "):
        replace(catalogue, write_csv(tmp_path / "bad.csv", rows), audit=audit)
    with pytest.raises(OSError):
        replace(catalogue, write_csv(tmp_path / "v2.csv", good_rows()), audit=Recorder(fail=True))
    assert tables(catalogue.path) == before  # no table of the failed imports left behind
    assert audit.entries == []
    assert (catalogue.record("benefits").version, catalogue.count("benefits")) == (1, 4)


def test_a_dataset_changed_during_the_import_is_not_swapped(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    v1 = write_csv(tmp_path / "v1.csv", good_rows(4))
    add(catalogue, v1)
    v2 = write_csv(tmp_path / "v2.csv", good_rows())

    def meanwhile(phase: str, done: int, total: int) -> None:
        if phase == "importing" and done == total:  # rows written, not yet swapped in
            Catalogue(catalogue.path).replace(v1, name="benefits", actor=ACTOR, audit=None)

    with pytest.raises(MalformedInput, match="changed while its new rows were imported"):
        replace(catalogue, v2, progress=meanwhile)
    record = catalogue.record("benefits")
    assert (record.version, record.info.row_count) == (2, 4)  # the other replace's
    assert len([t for t in tables(catalogue.path) if t.startswith("ds_")]) == 1


def test_replace_reads_the_file_as_the_first_was(catalogue: Catalogue, tmp_path: Path) -> None:
    header = "证件号码,区,金额,姓名,备注"
    rules_map = tuple(zip(header.split(","), [r.name for r in RULES], strict=True))
    path = tmp_path / "v1.csv"
    path.write_bytes(("\n".join([header, *good_rows(3)]) + "\n").encode("gbk").replace(b",", b";"))
    catalogue.add(
        path, name="benefits", grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
        owner=OWNER, columns=RULES, actor=ACTOR, audit=None,
        source=SourceFormat(delimiter=";", header_map=rules_map),
    )  # fmt: skip
    v2 = tmp_path / "v2.csv"
    v2.write_bytes(("\n".join([header, *good_rows(5)]) + "\n").encode("gbk").replace(b",", b";"))
    report = replace(catalogue, v2)
    assert (report.imported, report.encoding) == (5, "gbk")
    assert catalogue.record("benefits").source.header_map == rules_map


def test_remove_drops_tables_a_dead_replace_left(catalogue: Catalogue, tmp_path: Path) -> None:
    add(catalogue, write_csv(tmp_path / "b.csv", good_rows()))
    with sqlite3.connect(catalogue.path) as conn:
        conn.execute('CREATE TABLE "ds_benefits@deadbeef" (x)')
        conn.execute('CREATE TABLE "ds_benefits_2" (x)')  # another dataset's, kept
    catalogue.remove("benefits", actor=ACTOR, audit=None)
    assert tables(catalogue.path) == {"datasets", "ds_benefits_2"}


OLD_SCHEMA = """
CREATE TABLE datasets (
    name TEXT PRIMARY KEY, table_name TEXT NOT NULL UNIQUE, grade TEXT NOT NULL,
    sharing_type TEXT NOT NULL, legal_basis TEXT NOT NULL, owner_kind TEXT NOT NULL,
    owner_name TEXT NOT NULL, holder TEXT NOT NULL, columns TEXT NOT NULL,
    row_count INTEGER NOT NULL, description TEXT NOT NULL, created_at INTEGER NOT NULL,
    min_set_size INTEGER NOT NULL, allowed_jurisdictions TEXT NOT NULL,
    min_group_size INTEGER NOT NULL, require_dp INTEGER NOT NULL,
    require_approval INTEGER NOT NULL, source_sha256 TEXT NOT NULL
);
INSERT INTO datasets VALUES ('old', 'ds_old', 'general', 'conditional', '', 'state', 's',
    'social', '[{"name": "amount", "kind": "aggregate"}]', 1, '', 1, 0, '[]', 0, 0, 0, 'ab');
CREATE TABLE ds_old (_row INTEGER PRIMARY KEY, amount INTEGER NOT NULL) STRICT;
INSERT INTO ds_old VALUES (1, 5);
"""


def test_an_older_store_is_read_then_migrated(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    before = path.read_bytes()
    old = Catalogue.read_only(path).record("old")  # read as it is, not migrated
    assert path.read_bytes() == before
    assert (old.version, old.replaced_at, old.encoding) == (1, None, "utf-8")
    assert old.formats == {"amount": ColumnFormat(0, NullPolicy.REFUSE)}
    migrated = Catalogue(path)
    assert migrated.record("old") == old
    csv_path = tmp_path / "new.csv"
    csv_path.write_text("amount\n7\n8\n", encoding="utf-8")
    report = migrated.replace(csv_path, name="old", actor=ACTOR, audit=None)
    assert report.version == 2 and migrated.count("old") == 2


def test_a_check_reads_only(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    csv_path = write_csv(tmp_path / "b.csv", good_rows())
    # No store yet: it reads as empty, and none is created.
    report = Catalogue.read_only(path).add(
        csv_path, name="benefits", grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
        owner=OWNER, columns=RULES, actor=ACTOR, audit=None, check=True,
    )  # fmt: skip
    assert (report.dry_run, report.would_import, report.imported) == (True, True, 12)
    assert not path.exists()
    add(Catalogue(path), csv_path)
    read_only = Catalogue.read_only(path)
    with pytest.raises(AlreadyExists):
        read_only.add(
            csv_path, name="benefits", grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
            owner=OWNER, columns=RULES, actor=ACTOR, audit=None, check=True,
        )  # fmt: skip
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        replace(read_only, csv_path)  # only a check may run on a read-only catalogue
