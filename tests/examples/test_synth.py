"""The synthetic four-department generator: reproducible bytes, exact manifest, valid keys."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.examples import synth
from govshare.examples.synth import CIVIL, DATASETS, HEALTH, POLICE, TAX
from govshare.node.data.resident_id import is_valid, make, normalise
from govshare.protocols.errors import MalformedInput

SIZE = 2_000


def _rows(folder: Path, dataset: str) -> list[dict[str, str]]:
    with (folder / f"{dataset}.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("synth")
    manifest = synth.generate(folder, size=SIZE, seed=20250101)
    yield folder, manifest


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    synth.generate(tmp_path / "a", size=300, seed=5)
    synth.generate(tmp_path / "b", size=300, seed=5)
    synth.generate(tmp_path / "c", size=300, seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(a) == sorted([*(f"{d}.csv" for d in DATASETS), synth.MANIFEST_NAME])
    assert a == b
    for name in a:
        if name.endswith(".csv"):
            assert a[name] != c[name], name


def test_manifest_file_matches_return_value(generated: tuple[Path, dict[str, Any]]) -> None:
    folder, manifest = generated
    assert json.loads((folder / synth.MANIFEST_NAME).read_text(encoding="utf-8")) == manifest


def test_every_dataset_has_size_distinct_valid_keys(
    generated: tuple[Path, dict[str, Any]],
) -> None:
    folder, manifest = generated
    for dataset in DATASETS:
        rows = _rows(folder, dataset)
        keys = [r["id_number"] for r in rows]
        assert len(rows) == SIZE == manifest["datasets"][dataset]["rows"]
        assert len(set(keys)) == SIZE == manifest["datasets"][dataset]["distinct_valid_keys"]
        assert all(normalise(k) == k for k in keys)
        assert list(rows[0]) == list(synth.COLUMNS[dataset])
    assert manifest["injected"] == {d: [] for d in DATASETS}


def test_intersections_match_plain_python(generated: tuple[Path, dict[str, Any]]) -> None:
    folder, manifest = generated
    keys = {d: {r["id_number"] for r in _rows(folder, d)} for d in DATASETS}
    expected: dict[str, int] = {}
    for r in range(2, 5):
        for combo in combinations(DATASETS, r):
            expected[synth.intersection_name(*combo)] = len(
                set.intersection(*(keys[d] for d in combo))
            )
    assert manifest["intersections"] == expected
    # The per-mille design proportions hold exactly at this size.
    assert expected[synth.intersection_name(POLICE, TAX)] == 600 * SIZE // 1000
    assert expected[synth.intersection_name(TAX, CIVIL)] == 210 * SIZE // 1000
    assert len(keys[POLICE] | keys[TAX] | keys[CIVIL] | keys[HEALTH]) == sum(
        synth.pattern_counts(SIZE).values()
    )


def test_filtered_and_aggregates_match_plain_python(
    generated: tuple[Path, dict[str, Any]],
) -> None:
    folder, manifest = generated
    rows = {d: {r["id_number"]: r for r in _rows(folder, d)} for d in DATASETS}

    def select(side: dict[str, Any]) -> set[str]:
        where = side["where"]
        return {
            k for k, r in rows[side["dataset"]].items() if all(r[c] == v for c, v in where.items())
        }

    assert set(manifest["filtered"]) == {name for name, _, _ in synth.FILTERED}
    for name, spec in manifest["filtered"].items():
        count = len(select(spec["left"]) & select(spec["right"]))
        assert spec["count"] == count, name
        assert count > 0, name  # each filter is non-trivial at this size
    assert manifest["filtered"]["tax_high & civil_current_year"]["right"]["where"] == {
        "year": "2025"
    }

    def by_district(income_band: str | None) -> dict[str, dict[str, int]]:
        groups = {d: {"count": 0, "sum_amount": 0} for d in synth.DISTRICTS}
        for key, b in rows[CIVIL].items():
            t = rows[TAX].get(key)
            if t is None or b["year"] != "2025":
                continue
            if income_band is not None and t["income_band"] != income_band:
                continue
            groups[b["district"]]["count"] += 1
            groups[b["district"]]["sum_amount"] += int(b["amount"])
        return groups

    aggregates = manifest["aggregates"]
    assert aggregates["civil_current_year_join_tax_high_by_district"]["groups"] == by_district(
        "high"
    )
    assert aggregates["civil_current_year_join_tax_by_district"]["groups"] == by_district(None)


def test_values_are_in_declared_domains_and_consistent(
    generated: tuple[Path, dict[str, Any]],
) -> None:
    folder, _ = generated
    people: dict[str, dict[str, str]] = {}
    for dataset in DATASETS:
        for row in _rows(folder, dataset):
            assert row["district"] in synth.DISTRICTS
            number = row["id_number"]
            born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
            assert make(number[:6], born, int(number[14:17])) == number
            assert number[:6] in synth.DISTRICT_CODES.values()
            age = 2025 - born.year
            assert 0 <= age <= 90
            if "age_band" in row:
                assert row["age_band"] in synth.AGE_BANDS
                band = synth.AGE_BANDS.index(row["age_band"])
                assert synth._AGE_BAND_LOWER[band] <= age
                if band + 1 < len(synth.AGE_BANDS):
                    assert age < synth._AGE_BAND_LOWER[band + 1]
            if "year" in row:
                assert row["year"] in (("2024", "2025") if dataset == CIVIL else ("2025",))
            # A person's district and age band agree across departments.
            seen = people.setdefault(number, {})
            for column in ("district", "age_band"):
                if column in row:
                    assert seen.setdefault(column, row[column]) == row[column]
            if dataset == POLICE:
                assert row["gender"] == synth.GENDERS[int(number[16]) % 2]
                assert row["hukou_type"] in synth.HUKOU_TYPES
                assert row["name"].count(" ") == 1
            elif dataset == TAX:
                assert age >= 18
                low, high = synth.INCOME_BOUNDS[row["income_band"]]
                assert low <= int(row["annual_income"]) <= high
            elif dataset == CIVIL:
                assert row["assistance_type"] in synth.ASSISTANCE_TYPES
                assert int(row["amount"]) > 0
            else:
                assert int(row["visits"]) >= 1


def test_injected_faults(tmp_path: Path) -> None:
    clean = synth.generate(tmp_path / "clean", size=400, seed=9)
    dirty = synth.generate(tmp_path / "dirty", size=400, seed=9, inject_faults=True)
    assert dirty["intersections"] == clean["intersections"]
    assert dirty["filtered"] == clean["filtered"]
    per_dataset = len(synth.INVALID_KINDS) + synth.DUPLICATES
    for dataset in DATASETS:
        lines = (tmp_path / "dirty" / f"{dataset}.csv").read_text(encoding="utf-8").splitlines()
        clean_lines = (tmp_path / "clean" / f"{dataset}.csv").read_text(encoding="utf-8")
        injected = dirty["injected"][dataset]
        assert len(injected) == per_dataset
        assert dirty["datasets"][dataset]["rows"] == 400 + per_dataset
        assert sorted(i["kind"] for i in injected) == sorted(
            [*synth.INVALID_KINDS, *["duplicate"] * synth.DUPLICATES]
        )
        bad_lines = {i["line"] for i in injected}
        seen: set[str] = set()
        for number, line in enumerate(lines, start=1):
            key = line.split(",", 1)[0]
            if number == 1:
                continue
            if number in bad_lines:
                kind = next(i["kind"] for i in injected if i["line"] == number)
                if kind == "duplicate":
                    assert is_valid(key) and key in seen
                else:
                    assert not is_valid(key), kind
                    with pytest.raises(MalformedInput):
                        normalise(key)
            else:
                assert is_valid(key) and key not in seen
                seen.add(key)
        # Removing the injected lines gives back the clean file exactly.
        kept = [line for n, line in enumerate(lines, start=1) if n not in bad_lines]
        assert "\n".join(kept) + "\n" == clean_lines


@given(st.integers(min_value=synth.MIN_SIZE, max_value=synth.MAX_SIZE))
def test_pattern_counts_give_every_dataset_exactly_size(size: int) -> None:
    counts = synth.pattern_counts(size)
    assert all(c >= 0 for c in counts.values())
    for bit in (1, 2, 4, 8):
        assert sum(c for mask, c in counts.items() if mask & bit) == size


def test_tiny_size(tmp_path: Path) -> None:
    manifest = synth.generate(tmp_path, size=1, seed=0, inject_faults=True)
    for dataset in DATASETS:
        assert manifest["datasets"][dataset]["distinct_valid_keys"] == 1
    assert all(v == 0 for v in manifest["intersections"].values())


@pytest.mark.parametrize("size", [0, -1, synth.MAX_SIZE + 1])
def test_size_out_of_range(tmp_path: Path, size: int) -> None:
    with pytest.raises(MalformedInput) as info:
        synth.generate(tmp_path, size=size, seed=1)
    assert info.value.field == "size"


def test_bad_argument_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        synth.generate(tmp_path, size="10", seed=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        synth.generate(tmp_path, size=10, seed=True)


def test_cli_writes_the_same_bytes_as_the_api(tmp_path: Path) -> None:
    synth.generate(tmp_path / "api", size=200, seed=42)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "govshare.examples.synth",
            "--out",
            str(tmp_path / "cli"),
            "--size",
            "200",
            "--seed",
            "42",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "tax.residents: 200 rows" in result.stdout
    assert _files(tmp_path / "api") == _files(tmp_path / "cli")


def test_cli_refuses_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synth.main(["--out", str(tmp_path), "--size", "0", "--seed", "1"]) == 1
    assert "size must be" in capsys.readouterr().err
