"""Rows sealed at rest (node/data/at_rest.py) over real SQLite files: the same answers as rows
in the clear, no plaintext in any file, a wrong key refused, and destruction that leaves nothing.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest

from govshare.model.conditions import Condition
from govshare.model.governance import ColumnKind, ColumnRule, Owner, OwnerKind
from govshare.node.audit.auditlog import AuditLog
from govshare.node.data import resident_id
from govshare.node.data.at_rest import AtRest, WrongDataKey, open_at_rest
from govshare.node.data.catalog import BATCH_ROWS, Catalogue, Restatement
from govshare.node.keystore import create_data_key, data_key_path, read_data_key
from govshare.protocols.errors import MalformedInput
from govshare.protocols.suite import SM, STANDARD, Suite

# More rows than one chunk, so that reads cross chunk boundaries.
ROWS = 2 * BATCH_ROWS + 517
DISTRICTS = ("east", "west", "北区")
IDS = [  # distinct: (i // 1000, i % 1000) gives back i
    resident_id.make("110101", date(1950 + i // 1000, 1 + i % 12, 1 + i % 28), i % 1000)
    for i in range(ROWS)
]
RULES = [
    ColumnRule("id_number", ColumnKind.JOIN_KEY, key_type="resident_id"),
    ColumnRule("district", ColumnKind.GROUP_KEY, domain=DISTRICTS),
    ColumnRule("amount", ColumnKind.AGGREGATE),
    ColumnRule("name", ColumnKind.MASKED, mask="keep_last:1"),
    ColumnRule("year", ColumnKind.PLAINTEXT),
]
OWNER = Owner(OwnerKind.INDIVIDUAL, "residents (in trust)", "social")
ACTOR = "op-social"


def logged(log: AuditLog) -> list[tuple[str, dict[str, object], str]]:
    """(kind, fields, actor) of every entry of a real audit log."""
    return [
        (e.kind, dict(e.fields), e.actor) for e in (x.decode() for x in log.entries(0, log.size))
    ]


def write_csv(path: Path, count: int = ROWS) -> Path:
    rng = random.Random(7)
    lines = ["id_number,district,amount,name,year"]
    for i in range(count):
        # Names with CJK and Latin letters, so ordering compares code points across scripts.
        name = rng.choice(["张", "李", "Wang", "Ōtsuka", "zed"]) + str(rng.randrange(100))
        lines.append(
            f"{IDS[i]},{DISTRICTS[i % 3]},{rng.randrange(-500, 5000)},{name},"
            f"{2015 + rng.randrange(10)}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def add(catalogue: Catalogue, csv: Path, name: str = "benefits") -> None:
    catalogue.add(
        csv, name=name, grade="general", sharing_type="conditional", owner=OWNER, columns=RULES,
        actor=ACTOR, audit=None,
    )  # fmt: skip


def files_under(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file()]


def holding(folder: Path, needle: bytes) -> list[str]:
    """The files under ``folder`` whose bytes contain ``needle`` (a grep -r of the home)."""
    return [p.name for p in files_under(folder) if needle in p.read_bytes()]


def at_rest_in(home: Path, suite: Suite = STANDARD) -> AtRest:
    home.mkdir(exist_ok=True)
    return open_at_rest(home, home / "node.db", suite)


@pytest.fixture(scope="module", params=[STANDARD, SM], ids=lambda s: s.name)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Catalogue, Catalogue]:
    """The same file imported in the clear and sealed under the suite."""
    root = tmp_path_factory.mktemp("pair")
    csv = write_csv(root / "rows.csv")
    (root / "clear").mkdir()
    clear = Catalogue(root / "clear" / "node.db")
    add(clear, csv)
    sealed = Catalogue(
        root / "sealed" / "node.db", at_rest=at_rest_in(root / "sealed", request.param)
    )
    add(sealed, csv)
    return clear, sealed


def conditions(seed: int) -> list[Condition]:
    rng = random.Random(seed)
    samplers: dict[str, Callable[[], str | int]] = {
        "id_number": lambda: rng.choice(IDS).lower(),  # normalised as a filter value too
        "district": lambda: rng.choice(DISTRICTS),
        "amount": lambda: rng.randrange(-600, 5100),
        "name": lambda: rng.choice(["张", "Wang5", "Ōtsuka", "zed9", "李50"]),
        "year": lambda: str(2015 + rng.randrange(10)),
    }
    picked: list[Condition] = []
    for _ in range(rng.randrange(0, 4)):
        column = rng.choice(sorted(samplers))
        op = rng.choice(["=", "!=", "<", "<=", ">", ">=", "in"])
        sample = samplers[column]
        value: str | int | tuple[str | int, ...] = (
            tuple(sample() for _ in range(rng.randrange(1, 5))) if op == "in" else sample()
        )
        picked.append(Condition(column, op, value))
    return picked


@pytest.mark.parametrize("seed", range(10))
def test_sealed_reads_give_the_same_answers_as_rows_in_the_clear(
    pair: tuple[Catalogue, Catalogue], seed: int
) -> None:
    clear, sealed = pair
    where = conditions(seed)
    assert sealed.count("benefits", where=where) == clear.count("benefits", where=where)
    assert sealed.keys("benefits", "id_number", where=where) == clear.keys(
        "benefits", "id_number", where=where
    )
    # In import order: each key where its first row is, sealed or not.
    imported = [row[0] for row in clear.rows("benefits", ["id_number"], where=where)]
    first_seen = list(dict.fromkeys(imported))
    assert sealed.keys("benefits", "id_number", where=where, import_order=True) == first_seen
    assert clear.keys("benefits", "id_number", where=where, import_order=True) == first_seen
    columns = ["name", "amount", "id_number", "year"]
    assert list(sealed.rows("benefits", columns, where=where)) == list(
        clear.rows("benefits", columns, where=where)
    )
    # A set (SQLite returns it in the order of whichever index it used; sealed: import order).
    assert sorted(sealed.row_ids("benefits", where=where)) == sorted(
        clear.row_ids("benefits", where=where)
    )
    for group_by in ("district", "year", None):
        sums = [("amount", 1000)]
        assert sealed.group_sums("benefits", group_by=group_by, sums=sums, where=where) == (
            clear.group_sums("benefits", group_by=group_by, sums=sums, where=where)
        )


def test_repeated_keys_come_once_each_where_first_seen_across_chunks(tmp_path: Path) -> None:
    # Each resident on several rows, the repeats chunks apart (the rows of one ID are
    # BATCH_ROWS + 1 apart): the distinct keys in import order, sealed as in the clear.
    lines = ["id_number,district,amount,name,year"]
    order = [i % 5 for i in range(2 * BATCH_ROWS + 10)][::-1]
    lines += [f"{IDS[i]},east,{n},zed,2020" for n, i in enumerate(order)]
    csv = tmp_path / "repeats.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    clear = Catalogue(tmp_path / "clear.db")
    sealed = Catalogue(tmp_path / "sealed" / "node.db", at_rest=at_rest_in(tmp_path / "sealed"))
    add(clear, csv)
    add(sealed, csv)
    first_seen = [IDS[i] for i in dict.fromkeys(order)]
    assert len(first_seen) == 5
    for catalogue in (clear, sealed):
        assert catalogue.keys("benefits", "id_number", import_order=True) == first_seen
        assert catalogue.keys("benefits", "id_number") == sorted(first_seen)


def test_the_filters_still_refuse_what_they_refused(pair: tuple[Catalogue, Catalogue]) -> None:
    _, sealed = pair
    with pytest.raises(MalformedInput, match="holds integers"):
        sealed.count("benefits", where=[Condition("amount", "=", "1 OR 1=1")])


def test_no_file_of_the_store_holds_an_id_or_a_name(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "rows.csv", 300)
    home = tmp_path / "home"
    sealed = Catalogue(home / "node.db", at_rest=at_rest_in(home))
    add(sealed, csv)
    # The control: the same rows in the clear are found by the same grep.
    (tmp_path / "clear").mkdir()
    add(Catalogue(tmp_path / "clear" / "node.db"), csv)
    for needle in (IDS[0], IDS[299], "Ōtsuka"):
        assert holding(tmp_path / "clear", needle.encode()), needle
        assert holding(home, needle.encode()) == [], needle
    assert {p.name for p in files_under(home)} >= {"node.db", "data.key"}
    assert sealed.keys("benefits", "id_number")[:1] == [min(IDS[:300])]


def test_a_wrong_or_missing_data_key_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    add(Catalogue(home / "node.db", at_rest=at_rest_in(home)), write_csv(tmp_path / "r.csv", 50))
    right = read_data_key(home)
    other = tmp_path / "other"
    other.mkdir()
    create_data_key(other)
    wrong = AtRest(STANDARD, read_data_key(other))
    with pytest.raises(WrongDataKey, match=r"does not open .*node.db.*govshare node key recover"):
        wrong.bind(home / "node.db")
    with pytest.raises(WrongDataKey, match="'ds_benefits' does not open"):
        Catalogue(home / "node.db", at_rest=wrong).count("benefits")
    with pytest.raises(WrongDataKey, match="sealed at rest"):
        Catalogue(home / "node.db").keys("benefits", "id_number")
    with pytest.raises(MalformedInput, match="suite 'standard'"):
        AtRest(SM, right).bind(home / "node.db")
    data_key_path(home).unlink()
    with pytest.raises(WrongDataKey, match=r"no data key .* recover it"):
        open_at_rest(home, home / "node.db", STANDARD)
    assert not data_key_path(home).exists()  # never replaced by a fresh key


def test_rows_stored_in_the_clear_are_sealed_when_the_key_comes(tmp_path: Path) -> None:
    """A home made before protection at rest: its first start seals what it holds."""
    home = tmp_path / "home"
    home.mkdir()
    clear = Catalogue(home / "node.db")
    add(clear, write_csv(tmp_path / "r.csv", 2 * BATCH_ROWS + 3))
    before = clear.group_sums("benefits", group_by="district", sums=[("amount", 900)])
    keys = clear.keys("benefits", "id_number", where=[Condition("district", "=", "west")])
    assert holding(home, IDS[5].encode())
    sealed = Catalogue(home / "node.db", at_rest=at_rest_in(home))
    assert holding(home, IDS[5].encode()) == []
    assert sealed.group_sums("benefits", group_by="district", sums=[("amount", 900)]) == before
    assert sealed.keys("benefits", "id_number", where=[Condition("district", "=", "west")]) == keys
    assert sealed.get("benefits").row_count == 2 * BATCH_ROWS + 3


def _bytes_of(db: Path, sql: str) -> list[bytes]:
    with sqlite3.connect(db) as conn:
        return [bytes(row[0]) for row in conn.execute(sql)]


def test_remove_destroys_rows_stored_in_the_clear(tmp_path: Path) -> None:
    """Without a key (a store before issue 12): secure_delete, VACUUM and the WAL cut leave no
    removed ID in any file, while the dataset kept beside it stays whole."""
    home = tmp_path / "home"
    home.mkdir()
    catalogue = Catalogue(home / "node.db")
    add(catalogue, write_csv(tmp_path / "gone.csv", 400), name="gone")
    kept = tmp_path / "kept.csv"
    kept.write_text(
        "id_number,district,amount,name,year\n"
        + "".join(f"{IDS[i]},east,1,Kept{i},2020\n" for i in range(500, 520)),
        encoding="utf-8",
    )
    add(catalogue, kept, name="kept")
    assert holding(home, IDS[3].encode())
    audit = AuditLog.open(tmp_path / "audit.db", suite=STANDARD)
    destroyed = catalogue.destroy("gone", actor=ACTOR, audit=audit)
    for i in (0, 3, 399):
        assert holding(home, IDS[i].encode()) == [], IDS[i]
    assert catalogue.count("kept") == 20
    assert (destroyed.rows, destroyed.digest_of, destroyed.key_shredded) == (400, "rows", False)
    assert destroyed.wal_truncated
    wal = home / "node.db-wal"  # cut to zero bytes, or gone with the last connection
    assert not wal.exists() or os.path.getsize(wal) == 0
    [removed, record] = logged(audit)
    assert removed == ("dataset.removed", {"name": "gone", "row_count": 400}, ACTOR)
    assert record[0] == "dataset.destroyed" and record[2] == ACTOR
    assert record[1]["rows"] == 400 and record[1]["digest"] == destroyed.digest


def test_remove_shreds_a_sealed_dataset_and_logs_its_digest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    at_rest = at_rest_in(home)
    catalogue = Catalogue(home / "node.db", at_rest=at_rest)
    add(catalogue, write_csv(tmp_path / "r.csv", 1200))
    expected = STANDARD.new_hasher()
    for i, values in enumerate(catalogue.rows("benefits", ["id_number", "district", "amount",
                                                            "name", "year"]), start=1):  # fmt: skip
        expected.update(json.dumps([i, *values], ensure_ascii=False).encode() + b"\n")
    db = home / "node.db"
    [wrapped] = _bytes_of(db, "SELECT wrapped_key FROM sealed_tables")
    [table] = [
        r[0] for r in sqlite3.connect(db).execute("SELECT table_name FROM datasets").fetchall()
    ]
    chunk = _bytes_of(db, f'SELECT sealed FROM "{table}" ORDER BY chunk LIMIT 1')
    assert holding(home, wrapped[-16:]) and holding(home, chunk[0][100:132])
    audit = AuditLog.open(tmp_path / "audit.db", suite=STANDARD)
    destroyed = catalogue.destroy("benefits", actor=ACTOR, audit=audit)
    assert holding(home, wrapped[-16:]) == []  # the key is gone: the rows are shredded
    assert holding(home, chunk[0][100:132]) == []  # and their ciphertext overwritten too
    assert (destroyed.rows, destroyed.key_shredded, destroyed.digest_of) == (1200, True, "rows")
    assert destroyed.digest == expected.digest().hex()
    kinds = [(kind, actor) for kind, _, actor in logged(audit)]
    assert kinds == [("dataset.removed", ACTOR), ("dataset.destroyed", ACTOR)]
    assert logged(audit)[1][1]["hash"] == "SHA-256"


def test_a_replace_seals_the_new_version_and_shreds_the_old(tmp_path: Path) -> None:
    home = tmp_path / "home"
    catalogue = Catalogue(home / "node.db", at_rest=at_rest_in(home, SM))
    add(catalogue, write_csv(tmp_path / "v1.csv", 30))
    [(old_table, old_key)] = (
        sqlite3.connect(home / "node.db")
        .execute("SELECT table_name, wrapped_key FROM sealed_tables")
        .fetchall()
    )
    v2 = tmp_path / "v2.csv"
    v2.write_text(
        "id_number,district,amount,name,year\n"
        + "".join(f"{IDS[i]},west,{i},New{i},2024\n" for i in range(100, 140)),
        encoding="utf-8",
    )
    report = catalogue.replace(v2, name="benefits", stated=Restatement(), source=None,
                               skip_invalid=False, actor=ACTOR, audit=None)  # fmt: skip
    assert (report.version, report.imported) == (2, 40)
    assert catalogue.keys("benefits", "id_number") == sorted(IDS[100:140])
    [(table, _)] = (
        sqlite3.connect(home / "node.db")
        .execute("SELECT table_name, wrapped_key FROM sealed_tables")
        .fetchall()
    )
    assert table != old_table  # the old version's key went with its table
    assert holding(home, bytes(old_key)[-16:]) == []
    for needle in (IDS[0], IDS[100], "New101"):
        assert holding(home, needle.encode()) == [], needle
