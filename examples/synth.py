"""Seeded synthetic data for a four-department federation, with known intersections.

Four CSV files, one per department, plus ``manifest.json``::

    police.household.csv      id_number,name,gender,age_band,district,hukou_type
    tax.residents.csv         id_number,district,year,income_band,annual_income
    civil.assistance.csv      id_number,district,year,assistance_type,amount
    health.clinic_visits.csv  id_number,district,age_band,year,visits

Every dataset has exactly ``size`` rows (plus the injected faulty rows, when asked for), keyed by
distinct, valid GB 11643 resident identity numbers. The populations overlap by fixed
proportions (:data:`PATTERN_PER_MILLE`), and the manifest gives the *exact* size of every
intersection of two or more datasets, of filtered intersections (e.g. tax rows with
``income_band = 'high'`` ∩ civil assistance rows), and the expected answer of the DESIGN.md
example query (per-district COUNT and SUM of assistance amounts over that join). Tests and demos
compare protocol outputs with these numbers.

How it works: a synthetic city of ``U`` people is laid out in blocks, one per membership pattern
(which subset of the four departments holds the person), adults first, then minors. Person ``i``
sits at position ``(a·i + b) mod U`` — a seeded permutation, so the files are not sorted by
pattern — and every attribute is a pure function of ``(seed, i)`` through SplitMix64, so one
streaming pass writes all four files in constant memory and counts the manifest at the same
time. A person's resident number comes from a second seeded permutation of the space
(district of registration, date of birth, sequence code), which makes numbers distinct by
construction; adults and minors use disjoint date ranges. Numbers are assembled from
precomputed parts of :func:`govshare.node.data.resident_id.make`'s arithmetic (its weights and check
table) because calling ``make`` per person would dominate the run; the tests check every number
against ``make`` and ``normalise``.

The four files list people in the same order (person index), which real extracts would not;
nothing downstream may rely on row order.

Same ``(size, seed, year, inject_faults)`` → the same bytes, on any machine (no floating point
reaches the output, no dict-order or hash-seed dependence).

The region code in a number is the district of *registration*, drawn uniformly; the
``district`` column is the district of *residence*, weighted by the 2020 census populations of
Beijing's 16 districts. As in real data, the two need not agree.

All values are synthetic: no real person's data is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from bisect import bisect_right
from collections.abc import Sequence
from datetime import date, timedelta
from itertools import combinations
from pathlib import Path
from typing import Any, TextIO

from govshare.node.data.resident_id import CHECK_BY_REMAINDER, WEIGHTS
from govshare.protocols.errors import MalformedInput

GENERATOR = "govshare.examples.synth/1"
MANIFEST_NAME = "manifest.json"

POLICE = "police.household"
TAX = "tax.residents"
CIVIL = "civil.assistance"
HEALTH = "health.clinic_visits"
DATASETS: tuple[str, ...] = (POLICE, TAX, CIVIL, HEALTH)

COLUMNS: dict[str, tuple[str, ...]] = {
    POLICE: ("id_number", "name", "gender", "age_band", "district", "hukou_type"),
    TAX: ("id_number", "district", "year", "income_band", "annual_income"),
    CIVIL: ("id_number", "district", "year", "assistance_type", "amount"),
    HEALTH: ("id_number", "district", "age_band", "year", "visits"),
}

# Beijing's 16 districts: pinyin name, GB/T 2260 code, 2020 census population in thousands.
_DISTRICT_TABLE: tuple[tuple[str, str, int], ...] = (
    ("Dongcheng", "110101", 709),
    ("Xicheng", "110102", 1106),
    ("Chaoyang", "110105", 3452),
    ("Fengtai", "110106", 2019),
    ("Shijingshan", "110107", 568),
    ("Haidian", "110108", 3133),
    ("Mentougou", "110109", 393),
    ("Fangshan", "110111", 1313),
    ("Tongzhou", "110112", 1840),
    ("Shunyi", "110113", 1324),
    ("Changping", "110114", 2269),
    ("Daxing", "110115", 1994),
    ("Huairou", "110116", 441),
    ("Pinggu", "110117", 457),
    ("Miyun", "110118", 528),
    ("Yanqing", "110119", 346),
)
DISTRICTS: tuple[str, ...] = tuple(name for name, _, _ in _DISTRICT_TABLE)
DISTRICT_CODES: dict[str, str] = {name: code for name, code, _ in _DISTRICT_TABLE}

# Age in whole years at the data year (year - birth year).
AGE_BANDS: tuple[str, ...] = ("0-17", "18-29", "30-44", "45-59", "60-74", "75+")
_AGE_BAND_LOWER = (0, 18, 30, 45, 60, 75)
GENDERS: tuple[str, ...] = ("female", "male")  # the sequence code's parity: even, odd
HUKOU_TYPES: tuple[str, ...] = ("urban_family", "rural_family", "collective")
# Annual income bands in yuan: low < 60,000 (the IIT annual basic deduction), high ≥ 300,000
# (where the 25% IIT bracket starts on taxable income).
INCOME_BANDS: tuple[str, ...] = ("low", "middle", "high")
INCOME_BOUNDS: dict[str, tuple[int, int]] = {
    "low": (12_000, 59_999),
    "middle": (60_000, 299_999),
    "high": (300_000, 2_000_000),
}
ASSISTANCE_TYPES: tuple[str, ...] = (
    "minimum_living",  # 最低生活保障 (dibao)
    "extreme_poverty",  # 特困人员救助供养 (tekun)
    "temporary",  # 临时救助
    "disability",  # 困难残疾人生活补贴
)
DOMAINS: dict[str, tuple[str, ...]] = {
    "district": DISTRICTS,
    "age_band": AGE_BANDS,
    "gender": GENDERS,
    "hukou_type": HUKOU_TYPES,
    "income_band": INCOME_BANDS,
    "assistance_type": ASSISTANCE_TYPES,
}

_BIT = {POLICE: 1, TAX: 2, CIVIL: 4, HEALTH: 8}
# Share of ``size`` (per mille) held by each membership pattern of two or more departments,
# as a bitmask over _BIT. The single-department patterns take the rest, so every dataset has
# exactly ``size`` rows. Pairwise overlaps, per mille of size: police∩tax 600, police∩civil 280,
# police∩health 600, tax∩civil 210, tax∩health 480, civil∩health 250.
PATTERN_PER_MILLE: dict[int, int] = {
    1 | 2 | 4 | 8: 100,
    1 | 2 | 8: 300,
    1 | 2 | 4: 50,
    1 | 4 | 8: 80,
    2 | 4 | 8: 20,
    1 | 2: 150,
    1 | 8: 120,
    1 | 4: 50,
    2 | 8: 60,
    2 | 4: 40,
    4 | 8: 50,
}
# Per mille of each pattern without tax who are minors (tax rows are adults only).
MINOR_PER_MILLE = 200
ADULT_AGES = (18, 90)
MINOR_AGES = (0, 17)
SEQUENCES = 1000  # the sequence code has three digits

MIN_SIZE = 1
# Upper bound on size: the slot space for minors (16 districts x 18 years x 1000 sequences,
# ~105M) must hold every minor with room to spare; 5M also bounds a run to a few minutes.
MAX_SIZE = 5_000_000

# Faulty rows injected per dataset when ``inject_faults`` is on: one of each invalid kind and
# DUPLICATES repeated keys.
INVALID_KINDS: tuple[str, ...] = ("bad_check", "bad_date", "short", "non_digit")
DUPLICATES = 3

_MASK64 = (1 << 64) - 1
_SURNAMES = (
    "Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou Xu Sun Ma Zhu Hu Guo "
    "He Lin Gao Luo Zheng Liang Xie Song Tang Han Feng Deng Cao Peng Zeng Xiao "
    "Tian Dong Pan Yuan Cai Jiang Yu Du Ye Cheng Wei Su Lyu Ding Ren Lu "
    "Yao Shen Zhong Kong Cui Tan Qin Fan Qian Liao Shi Jin Bai Jia Xia Fu"
).split()
_GIVEN = (
    "wei fang na min jing li qiang lei jun yang yong yan jie tao ming chao "
    "xiu xia ping gang gui hua hong mei lan yun feng bo hao yu xin lin "
    "peng hui ting qian rui zhen kai jia dan lu yi ning shan bin long tian "
    "jian qing wen zhi an hai ying chen ran xuan hang zi yue yao shu di"
).split()


def _mix(z: int) -> int:
    """SplitMix64's output function: a 64-bit bijection with good avalanche."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _derive(seed: int, label: str) -> int:
    digest = hashlib.sha256(f"{GENERATOR}/{seed}/{label}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _permutation(seed: int, label: str, modulus: int) -> tuple[int, int]:
    """(a, b) with gcd(a, modulus) = 1, so x -> (a·x + b) mod modulus is a bijection."""
    if modulus == 1:
        return 1, 0
    a = modulus // 4 + _derive(seed, label + "/a") % max(1, modulus // 2)
    while math.gcd(a, modulus) != 1:
        a += 1
    return a, _derive(seed, label + "/b") % modulus


def _weighted_table(weights: Sequence[int], bits: int) -> list[int]:
    """A lookup table of 2^bits indices in proportion to weights (largest remainder)."""
    n = 1 << bits
    total = sum(weights)
    counts = [w * n // total for w in weights]
    order = sorted(range(len(weights)), key=lambda k: -((weights[k] * n) % total))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return [k for k, c in enumerate(counts) for _ in range(c)]


def pattern_counts(size: int) -> dict[int, int]:
    """Exact number of people per membership pattern (bitmask over the datasets) for ``size``."""
    counts = {mask: size * pm // 1000 for mask, pm in PATTERN_PER_MILLE.items()}
    for bit in _BIT.values():
        held = sum(c for mask, c in counts.items() if mask & bit)
        counts[bit] = size - held
    return counts


def _age_band(age: int) -> int:
    return bisect_right(_AGE_BAND_LOWER, age) - 1


class _Births:
    """Dates of birth for an age range, with their share of the check-digit sum."""

    def __init__(self, year: int, ages: tuple[int, int]) -> None:
        first = date(year - ages[1], 1, 1)
        last = date(year - ages[0], 12, 31)
        days = (last - first).days + 1
        self.text: list[str] = []
        self.weighted: list[int] = []
        self.band: list[int] = []
        for k in range(days):
            born = first + timedelta(days=k)
            text = f"{born.year:04d}{born.month:02d}{born.day:02d}"
            self.text.append(text)
            self.weighted.append(sum(w * int(c) for w, c in zip(WEIGHTS[6:14], text, strict=True)))
            self.band.append(_age_band(year - born.year))
        self.slots = days * len(DISTRICTS) * SEQUENCES


_REGION_TEXT = [code for _, code, _ in _DISTRICT_TABLE]
_REGION_WEIGHTED = [
    sum(w * int(c) for w, c in zip(WEIGHTS[:6], r, strict=True)) for r in _REGION_TEXT
]
_SEQ_TEXT = [f"{s:03d}" for s in range(SEQUENCES)]
_SEQ_WEIGHTED = [sum(w * int(c) for w, c in zip(WEIGHTS[14:], t, strict=True)) for t in _SEQ_TEXT]


def _break_check(number: str) -> str:
    return number[:17] + CHECK_BY_REMAINDER[(CHECK_BY_REMAINDER.index(number[17]) + 1) % 11]


def _bad_date(number: str) -> str:
    first17 = number[:10] + "0230" + number[14:17]  # 30 February never exists
    total = sum(w * int(c) for w, c in zip(WEIGHTS, first17, strict=True))
    return first17 + CHECK_BY_REMAINDER[total % 11]


def _fault(kind: str, number: str) -> str:
    if kind == "bad_check":
        return _break_check(number)
    if kind == "bad_date":
        return _bad_date(number)
    if kind == "short":
        return number[:17]
    if kind == "non_digit":
        return "O" + number[1:]  # letter O for digit 0 or 1, a classic transcription error
    raise AssertionError(kind)


def intersection_name(*datasets: str) -> str:
    """The manifest's key for the intersection of datasets, e.g. ``"civil.assistance & ..."``."""
    return " & ".join(sorted(datasets, key=DATASETS.index))


# Filtered intersections counted in the manifest: (name, (dataset, column, value) per side).
FILTERED: tuple[tuple[str, tuple[str, str, str], tuple[str, str, str]], ...] = (
    ("tax_high & civil", (TAX, "income_band", "high"), (CIVIL, "", "")),
    ("tax_low & civil", (TAX, "income_band", "low"), (CIVIL, "", "")),
    ("tax_high & civil_current_year", (TAX, "income_band", "high"), (CIVIL, "year", "{year}")),
    ("health_75plus & civil", (HEALTH, "age_band", "75+"), (CIVIL, "", "")),
    ("police_collective & health", (POLICE, "hukou_type", "collective"), (HEALTH, "", "")),
)


class _Writer:
    """Buffers CSV lines; every value is from a fixed domain or digits, so no quoting is needed."""

    def __init__(self, handle: TextIO, columns: Sequence[str]) -> None:
        self.handle = handle
        self.buffer: list[str] = [",".join(columns) + "\n"]
        self.rows = 0
        self.lines = 1

    def write(self, line: str) -> None:
        self.buffer.append(line)
        self.lines += 1
        if len(self.buffer) >= 8192:
            self.flush()

    def flush(self) -> None:
        self.handle.write("".join(self.buffer))
        self.buffer.clear()


def generate(
    out_dir: Path | str,
    *,
    size: int,
    seed: int,
    year: int = 2025,
    inject_faults: bool = False,
) -> dict[str, Any]:
    """Write the four department CSVs and ``manifest.json`` into ``out_dir``; return the manifest.

    Args:
        out_dir: created if missing; existing files of the same names are replaced.
        size: rows per dataset (valid, distinct keys), ``MIN_SIZE``..``MAX_SIZE``.
        seed: any integer; the output is a pure function of (size, seed, year, inject_faults).
        year: the data year; ages are ``year - birth year`` and civil assistance rows carry
            ``year`` or ``year - 1``.
        inject_faults: append, to each dataset, one row for each of :data:`INVALID_KINDS` and
            :data:`DUPLICATES` rows repeating an earlier key. The manifest lists their lines.
            Counts in the manifest always refer to the distinct valid keys.

    Manifest keys: ``generator``, ``seed``, ``size``, ``year``, ``inject_faults``, ``domains``,
    ``datasets`` (file, columns, rows written, distinct valid keys, sha256), ``intersections``
    (:func:`intersection_name` → count, for every combination of two or more datasets),
    ``filtered`` (name → {left, right, count}; see :data:`FILTERED`), ``aggregates`` (the
    DESIGN.md example join grouped by civil district), ``injected`` (dataset → [{line, kind}]).

    Raises:
        TypeError: non-int size, seed or year.
        MalformedInput: size or year out of range.
    """
    for name, value in (("size", size), ("seed", seed), ("year", year)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MalformedInput(f"size must be {MIN_SIZE}..{MAX_SIZE}", field="size")
    if not 1960 <= year <= 2100:
        raise MalformedInput("year must be 1960..2100", field="year")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Layout: (start, mask, is_minor) blocks, adults first.
    counts = pattern_counts(size)
    adult_blocks: list[tuple[int, int]] = []
    minor_blocks: list[tuple[int, int]] = []
    for mask in sorted(counts):
        minors = 0 if mask & _BIT[TAX] else counts[mask] * MINOR_PER_MILLE // 1000
        adult_blocks.append((mask, counts[mask] - minors))
        minor_blocks.append((mask, minors))
    starts: list[int] = []
    block_mask: list[int] = []
    position = 0
    for mask, n in adult_blocks + minor_blocks:
        if n:
            starts.append(position)
            block_mask.append(mask)
            position += n
    universe = position
    adults = sum(n for _, n in adult_blocks)

    adult_births = _Births(year, ADULT_AGES)
    minor_births = _Births(year, MINOR_AGES)
    if adults > adult_births.slots or universe - adults > minor_births.slots:
        raise MalformedInput("size too large for the identity number space", field="size")
    perm_a, perm_b = _permutation(seed, "position", universe)
    adult_a, adult_b = _permutation(seed, "adult-id", adult_births.slots)
    minor_a, minor_b = _permutation(seed, "minor-id", minor_births.slots)
    key_person = _derive(seed, "person")
    key_dept = _derive(seed, "department")
    district_table = _weighted_table([pop for _, _, pop in _DISTRICT_TABLE], 12)
    hukou_table = _weighted_table([70, 22, 8], 8)
    n_districts = len(DISTRICTS)

    # Injection plan: after valid row j, emit the listed fault kinds.
    plan: dict[int, list[str]] = {}
    if inject_faults:
        kinds = [*INVALID_KINDS, *(["duplicate"] * DUPLICATES)]
        for k, kind in enumerate(kinds):
            plan.setdefault((k + 1) * size // (len(kinds) + 1), []).append(kind)
    injected: dict[str, list[dict[str, Any]]] = {name: [] for name in DATASETS}

    inter: dict[int, int] = {}
    filtered_counts = {name: 0 for name, _, _ in FILTERED}
    agg_high: dict[str, list[int]] = {d: [0, 0] for d in DISTRICTS}
    agg_all: dict[str, list[int]] = {d: [0, 0] for d in DISTRICTS}
    year_text = str(year)
    prev_year_text = str(year - 1)
    low_lo, low_hi = INCOME_BOUNDS["low"]
    mid_lo, mid_hi = INCOME_BOUNDS["middle"]
    high_lo, high_hi = INCOME_BOUNDS["high"]

    handles = {
        name: (out / f"{name}.csv").open("w", encoding="utf-8", newline="") for name in DATASETS
    }
    try:
        writers = {name: _Writer(handles[name], COLUMNS[name]) for name in DATASETS}
        w_police, w_tax, w_civil, w_health = (writers[n] for n in DATASETS)
        for i in range(universe):
            p = (perm_a * i + perm_b) % universe
            mask = block_mask[bisect_right(starts, p) - 1]
            if p < adults:
                births = adult_births
                slot = (adult_a * p + adult_b) % births.slots
            else:
                births = minor_births
                slot = (minor_a * (p - adults) + minor_b) % births.slots
            slot, seq = divmod(slot, SEQUENCES)
            day, region = divmod(slot, n_districts)
            number = (
                _REGION_TEXT[region]
                + births.text[day]
                + _SEQ_TEXT[seq]
                + CHECK_BY_REMAINDER[
                    (_REGION_WEIGHTED[region] + births.weighted[day] + _SEQ_WEIGHTED[seq]) % 11
                ]
            )
            band = AGE_BANDS[births.band[day]]
            h = _mix(key_person ^ i)
            district = DISTRICTS[district_table[h & 0xFFF]]
            inter[mask] = inter.get(mask, 0) + 1

            lines: list[tuple[_Writer, str, str]] = []
            if mask & 1:
                surname = _SURNAMES[(h >> 12) & 63]
                given = _GIVEN[(h >> 18) & 63]
                if (h >> 24) & 1:
                    given += _GIVEN[(h >> 25) & 63]
                hukou = HUKOU_TYPES[hukou_table[(h >> 31) & 0xFF]]
                line = (
                    f"{number},{surname} {given.capitalize()},{GENDERS[seq & 1]},"
                    f"{band},{district},{hukou}\n"
                )
                lines.append((w_police, number, line))
                if mask & 8 and hukou == "collective":
                    filtered_counts["police_collective & health"] += 1
            g = _mix(key_dept ^ i)
            income_band = ""
            if mask & 2:
                roll = g & 0x3FF  # 0..1023
                # Social assistance recipients are mostly low earners.
                low_cut, high_cut = (716, 972) if mask & 4 else (358, 870)
                if roll < low_cut:
                    income_band, lo, hi = "low", low_lo, low_hi
                elif roll < high_cut:
                    income_band, lo, hi = "middle", mid_lo, mid_hi
                else:
                    income_band, lo, hi = "high", high_lo, high_hi
                r = (g >> 10) & 0xFFFF
                income = lo + (hi - lo) * r * r // (1 << 32)  # skewed to the band's low end
                line = f"{number},{district},{year_text},{income_band},{income}\n"
                lines.append((w_tax, number, line))
            if mask & 4:
                kind = ASSISTANCE_TYPES[(0, 0, 0, 0, 0, 1, 2, 2, 2, 3)[((g >> 26) & 0xFFFF) % 10]]
                months = 1 + ((g >> 42) & 0xFF) % 12
                if kind == "minimum_living":
                    amount = 1_395 * months  # Beijing's 2024 monthly dibao standard
                elif kind == "extreme_poverty":
                    amount = 2_093 * months
                elif kind == "temporary":
                    amount = 500 + 100 * (((g >> 50) & 0x7F) % 96)
                else:
                    amount = 150 * months
                current = ((g >> 57) & 0x1F) % 20 < 13  # ~65% received it in the data year
                line = (
                    f"{number},{district},{year_text if current else prev_year_text},"
                    f"{kind},{amount}\n"
                )
                lines.append((w_civil, number, line))
                if income_band == "high":
                    filtered_counts["tax_high & civil"] += 1
                    if current:
                        filtered_counts["tax_high & civil_current_year"] += 1
                        agg_high[district][0] += 1
                        agg_high[district][1] += amount
                elif income_band == "low":
                    filtered_counts["tax_low & civil"] += 1
                if income_band and current:
                    agg_all[district][0] += 1
                    agg_all[district][1] += amount
                if mask & 8 and band == "75+":
                    filtered_counts["health_75plus & civil"] += 1
            if mask & 8:
                visits = 1 + ((h >> 39) & 7) + births.band[day] * ((h >> 42) & 3)
                line = f"{number},{district},{band},{year_text},{visits}\n"
                lines.append((w_health, number, line))

            for writer, key, line in lines:
                writer.write(line)
                writer.rows += 1
                faults = plan.get(writer.rows - 1)
                if faults is None:
                    continue
                name = DATASETS[(w_police, w_tax, w_civil, w_health).index(writer)]
                rest = line[len(key) :]
                for kind in faults:
                    bad = key if kind == "duplicate" else _fault(kind, key)
                    writer.write(bad + rest)
                    injected[name].append({"line": writer.lines, "kind": kind})
        for writer in writers.values():
            writer.flush()
    finally:
        for handle in handles.values():
            handle.close()

    datasets: dict[str, Any] = {}
    for name in DATASETS:
        path = out / f"{name}.csv"
        datasets[name] = {
            "file": path.name,
            "columns": list(COLUMNS[name]),
            "rows": writers[name].lines - 1,
            "distinct_valid_keys": sum(c for m, c in inter.items() if m & _BIT[name]),
            "sha256": _sha256(path),
        }
    intersections: dict[str, int] = {}
    for r in range(2, len(DATASETS) + 1):
        for combo in combinations(DATASETS, r):
            bits = sum(_BIT[n] for n in combo)
            intersections[intersection_name(*combo)] = sum(
                c for m, c in inter.items() if m & bits == bits
            )
    filtered: dict[str, Any] = {}
    for name, left, right in FILTERED:
        filtered[name] = {
            "left": _side(left, year),
            "right": _side(right, year),
            "count": filtered_counts[name],
        }
    manifest: dict[str, Any] = {
        "generator": GENERATOR,
        "seed": seed,
        "size": size,
        "year": year,
        "inject_faults": inject_faults,
        "domains": {k: list(v) for k, v in DOMAINS.items()},
        "datasets": datasets,
        "intersections": intersections,
        "filtered": filtered,
        "aggregates": {
            "civil_current_year_join_tax_high_by_district": {
                "sql": (
                    f"SELECT b.district, COUNT(*), SUM(b.amount) FROM {CIVIL} AS b "
                    f"JOIN {TAX} AS t ON b.id_number = t.id_number "
                    f"WHERE b.year = {year} AND t.income_band = 'high' GROUP BY b.district"
                ),
                "groups": {d: {"count": c, "sum_amount": s} for d, (c, s) in agg_high.items()},
            },
            "civil_current_year_join_tax_by_district": {
                "sql": (
                    f"SELECT b.district, COUNT(*), SUM(b.amount) FROM {CIVIL} AS b "
                    f"JOIN {TAX} AS t ON b.id_number = t.id_number "
                    f"WHERE b.year = {year} GROUP BY b.district"
                ),
                "groups": {d: {"count": c, "sum_amount": s} for d, (c, s) in agg_all.items()},
            },
        },
        "injected": injected,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return manifest


def _side(spec: tuple[str, str, str], year: int) -> dict[str, Any]:
    dataset, column, value = spec
    where = {column: value.format(year=year)} if column else {}
    return {"dataset": dataset, "where": where}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m govshare.examples.synth --out DIR --size N --seed S``."""
    parser = argparse.ArgumentParser(
        prog="python -m govshare.examples.synth",
        description="Write seeded synthetic CSVs for four departments and manifest.json.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--size", required=True, type=int, help="rows per dataset")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--year", type=int, default=2025, help="data year (default 2025)")
    parser.add_argument(
        "--inject-faults",
        action="store_true",
        help="add invalid and duplicate keys to every dataset (for import tests)",
    )
    args = parser.parse_args(argv)
    try:
        manifest = generate(
            args.out,
            size=args.size,
            seed=args.seed,
            year=args.year,
            inject_faults=args.inject_faults,
        )
    except MalformedInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, info in manifest["datasets"].items():
        print(f"{name}: {info['rows']} rows -> {os.path.join(args.out, info['file'])}")
    for name, count in manifest["intersections"].items():
        if name.count("&") == 1:
            print(f"|{name}| = {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
