"""Joint aggregate benchmarks: node processes over mutual TLS (DESIGN.md protocols 2 and 3).

**Intersection aggregate** (protocol 2). ``--rows`` rows per side from the synthetic generator:
the value holder civil (``assistance``: SUM(amount) and COUNT by district, 16 groups, every row
encrypted) and the matcher tax (``residents`` filtered on ``income_band = 'high'``), two node
processes. Times one ``run_intersection_aggregate`` at 3072 bits end to end (fresh analyst key,
sign, submit, policy, encryption and masking on the nodes' process pools, exchange, matching,
sum, decryption, receipt) and checks every figure against a plain join of the CSVs. Printed
with it, from the same run on the same cores:

- rows per second (value-holder rows through the protocol);
- the raw cost of the same number of fast encryptions (``DjnPublicKey.raw_encrypt`` with a
  built table, all cores at once), its share of the wall time, and the ratio wall / raw;
- the ratio wall / (raw encryptions + raw X25519 cost of the protocol's 2n + 2m scalar
  multiplications, m the matcher's filtered set), i.e. the overhead over the crypto floor;
- under ``bfv-simd``, the raw X25519 cost of the run's scalar multiplications (the native
  batch loop over OpenSSL, as the nodes mask, all cores at once; :func:`simd_scalar_mults`
  counts them) and the ratio wall / raw X25519: the PSI under the sums is most of the floor;
- peak RSS per node, its process tree summed;
- with ``--baseline REV`` (default: the last commit before the streaming path), the same query
  on the same stores with the nodes run from that revision's code (``git archive`` into the run
  directory, imported ahead of the editable install), for the streaming/non-streaming ratio of
  wall time and each node's peak RSS; ``--baseline none`` skips it. The streaming nodes run
  with the default ``protocol_timeout``; the baseline needs it raised for large runs;
- a 1,000,000-row figure: measured when ``--rows`` is 1,000,000, else extrapolated linearly from
  the measured per-row cost (and labelled so).

**Horizontal aggregate** (protocol 3). ``--nodes`` node processes with ``--horizontal-rows``
health-like rows each (``visits`` by ``district``, 16 groups); COUNT, SUM and AVG by district,
Paillier 3072, aggregator the first node. Timed end to end like the above and checked against
the plain SQLite query ``SELECT district, COUNT(*), SUM(visits), AVG(visits) ... GROUP BY
district`` run directly on each node's store in the same run. Two ratios:

- **vs one node's plain query** (the target, <= 2): the nodes run their local GROUP BY in
  parallel, each over its own rows, so the protocol's floor is one node's query;
- **vs all nodes' plain queries run one after another** (what one database holding every row
  would pay);
- vs the parallel floor of this machine: with more nodes than cores, the nodes' queries share
  the cores, so one node's query x nodes / cores is the least any protocol could take here.

    .venv/bin/python bench/aggregate.py [--rows 100000] [--nodes 5] [--horizontal-rows 1000000]
        [--only intersection|horizontal] [--scheme paillier|bfv-simd|both]
        [--group-side values|matcher|both] [--baseline REV|none] [--dir bench-run/aggregate]

``--group-side matcher`` groups by the matcher's (tax's) district instead of the value
holder's: the value holder then packs 2 cells a key instead of 32 (16 times fewer BFV
ciphertexts and bytes), and the matcher masks each streamed key under up to 16 groups' scalars.

Quick run: ``--rows 10000 --horizontal-rows 10000``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ANALYST, make_federation, node_processes, tree_peak_rss_mb
from x25519_raw import raw_native_ops_per_second, raw_x25519_ops_per_second

from govshare.cli.dataset import parse_column
from govshare.client.analyst_aggregate import (
    AggregateOutcome,
    run_horizontal_aggregate,
    run_intersection_aggregate,
)
from govshare.examples import synth
from govshare.model.aggregate_plan import (
    BFV_SIMD,
    MATCHER_SIDE,
    PAILLIER,
    VALUES_SIDE,
    Figures,
    GroupSpec,
    HorizontalPlan,
    IntersectionPlan,
    Part,
    SumSpec,
)
from govshare.model.conditions import Condition
from govshare.model.governance import Grade, Owner, OwnerKind, QueryKind, SharingType
from govshare.model.identity import Identity
from govshare.model.query_plan import Side
from govshare.node.config import NodeConfig
from govshare.node.data.at_rest import open_at_rest
from govshare.node.data.catalog import Catalogue
from govshare.node.node import Node
from govshare.node.queries.kinds.aggregate import WIDE_WINDOW_BITS, WIDE_WINDOW_MIN_ROWS
from govshare.protocols import ecdh_psi
from govshare.protocols.bfv_simd import SimdPublic, SimdSecretKeys
from govshare.protocols.paillier import DEFAULT_N_BITS, DjnPublicKey, generate_keypair
from govshare.protocols.suite import STANDARD, Suite

PURPOSE = "benchmark"
GROUP_SIDES = (VALUES_SIDE, MATCHER_SIDE)
MILLION = 1_000_000
DISTRICTS = "|".join(synth.DISTRICTS)
AMOUNT_BOUND = 30_000  # above every synthetic amount: SUM is exact
VISITS_BOUND = 100  # above every generated visit count
CIVIL_COLUMNS = (
    "id_number=join_key:resident_id",
    f"district=group_key:domain={DISTRICTS}",
    "year=plaintext",
    "assistance_type=group_key:domain=" + "|".join(synth.ASSISTANCE_TYPES),
    "amount=aggregate",
)
TAX_COLUMNS = (
    "id_number=join_key:resident_id",
    f"district=group_key:domain={DISTRICTS}",
    "year=plaintext",
    "income_band=group_key:domain=" + "|".join(synth.INCOME_BANDS),
    "annual_income=aggregate",
)
VISITS_COLUMNS = (
    f"district=group_key:domain={DISTRICTS}",
    "age_band=group_key:domain=" + "|".join(synth.AGE_BANDS),
    "year=plaintext",
    "visits=aggregate",
)
# ε of each intersection query (a release needs DP noise or an approved exact release, and an
# exact one takes no GROUP BY); large, so the figures stay close to the plain join's.
INTERSECTION_EPSILON = Fraction(8)
# The last commit whose intersection aggregate did not stream (the baseline of --baseline).
NON_STREAMING_REV = "4decafd"
# Raw encryptions timed per core for the same-run rate (about 3 s of work per core).
RAW_ENCRYPTIONS_PER_CORE = 2000


def register(
    home: Path, csv_path: Path, *, dataset: str, columns: Sequence[str], granted: list[str],
    kind: QueryKind,
) -> None:  # fmt: skip
    node = Node.from_home(home)
    try:
        node.catalogue.add(
            csv_path, name=dataset, grade=Grade.GENERAL, sharing_type=SharingType.CONDITIONAL,
            owner=Owner(OwnerKind.STATE, "state", node.name),
            columns=[parse_column(c) for c in columns],
            actor=f"operator:{node.name}", audit=node.audit,
        )  # fmt: skip
        node.grants.issue(
            node.identity.signing_key, issuer=node.name, dataset=node.catalogue.get(dataset),
            grantee=ANALYST, purpose=PURPOSE, columns=granted, query_kinds=[kind],
            expires_at=int(time.time()) + 86400, epsilon=Fraction(1000), max_queries=100,
            actor=f"operator:{node.name}", audit=node.audit,
        )  # fmt: skip
    finally:
        node.close()


def check(outcome: AggregateOutcome, expected: dict[str, tuple[int, int]], column: str) -> None:
    """The released figures must equal the plain computation, group by group: exactly when
    noise-free, else within three times their stated 95% half-width plus 16 noise scales (a
    chance miss per figure below 1e-6 for discrete Laplace noise; the half-width alone is 0 at
    small scales, where a noise of 1 is still common)."""
    for group in outcome.groups:
        count, total = expected.get(group.label, (0, 0))
        if group.suppressed:
            if count >= 2 * outcome.min_group_size:
                raise SystemExit(f"group {group.label} of {count} rows was suppressed")
            continue
        for figure, want in ((group.count, count), (group.sums[column], total)):
            slack = 3 * (figure.interval or 0) + math.ceil(16 * (figure.noise_scale or 0))
            if figure.value is None or abs(figure.value - want) > slack:
                raise SystemExit(
                    f"group {group.label}: got {figure.value}, expected {want} "
                    f"(95% half-width {figure.interval})"
                )


# --- raw costs measured in the same run ----------------------------------------------------------


def _raw_encrypt_worker(
    key_bytes: bytes, window: int | None, count: int, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    key = DjnPublicKey.from_bytes(key_bytes, window_bits=window)
    key.precompute()
    plaintexts = [secrets.randbits(1024) for _ in range(count)]
    barrier.wait()
    start = time.perf_counter()
    for plaintext in plaintexts:
        key.raw_encrypt(plaintext)
    results.put(time.perf_counter() - start)


def raw_encryptions_per_second(
    workers: int, window: int | None, per_worker: int = RAW_ENCRYPTIONS_PER_CORE
) -> float:
    """Fast 3072-bit encryptions per second with every core encrypting at once (tables built,
    of the window the node's workers use for this many rows)."""
    public, _ = generate_keypair(DEFAULT_N_BITS)
    context = multiprocessing.get_context("forkserver")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(
            target=_raw_encrypt_worker,
            args=(public.to_bytes(), window, per_worker, barrier, results),
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    elapsed: list[float] = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return workers * per_worker / max(elapsed)


def raw_x25519_rate(n: int, workers: int) -> float:
    with ecdh_psi.make_pool(workers) as pool:
        return raw_x25519_ops_per_second(min(n, 400_000), executor=pool, workers=workers)


def raw_native_rate(n: int, workers: int) -> float:
    with ecdh_psi.make_pool(workers) as pool:
        return raw_native_ops_per_second(min(n, 400_000), executor=pool, workers=workers)


def simd_scalar_mults(
    keys: int, m: int, expected: dict[str, tuple[int, int]], side: str
) -> tuple[int, str]:
    """The X25519 scalar multiplications of one bfv-simd run, and how they are counted: each
    side's keys masked by each party (2n + 2m); with the matcher's groups, its keys once more
    under their group's scalar, masked again by the value holder (2m more), and each matched
    position tried under the groups' scalars in domain order until one lands (g + 1 for a key
    of group g; counted per matched row, as ``expected`` counts them)."""
    if side == VALUES_SIDE:
        return 2 * keys + 2 * m, "2n + 2m"
    trials = sum((g + 1) * expected.get(d, (0, 0))[0] for g, d in enumerate(synth.DISTRICTS))
    return 2 * keys + 4 * m + trials, "2n + 4m + group trials"


# --- intersection aggregate ----------------------------------------------------------------------


Expected = dict[str, dict[str, tuple[int, int]]]


def intersection_setup(root: Path, n: int, *, suite: Suite = STANDARD) -> tuple[Expected, int, int]:
    """Stores and grants for ``n`` rows per side; returns the expected figures by district (per
    group side: the value holder's district, or the matcher's), the size of the matcher's
    filtered set and the value holder's distinct keys."""
    data = root / "data"
    synth.generate(data, size=n, seed=11)
    make_federation(root, ["civil", "tax"], suite=suite)  # the default protocol_timeout
    register(
        root / "civil", data / f"{synth.CIVIL}.csv", dataset="assistance", columns=CIVIL_COLUMNS,
        granted=["id_number", "district", "amount"], kind=QueryKind.INTERSECTION_AGGREGATE,
    )  # fmt: skip
    register(
        root / "tax", data / f"{synth.TAX}.csv", dataset="residents", columns=TAX_COLUMNS,
        granted=["id_number", "income_band", "district"], kind=QueryKind.INTERSECTION_AGGREGATE,
    )  # fmt: skip
    with (data / f"{synth.TAX}.csv").open(newline="", encoding="utf-8") as handle:
        high = {
            r["id_number"]: r["district"]
            for r in csv.DictReader(handle)
            if r["income_band"] == "high"
        }
    expected: Expected = {side: {d: (0, 0) for d in synth.DISTRICTS} for side in GROUP_SIDES}
    keys: set[str] = set()
    with (data / f"{synth.CIVIL}.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            keys.add(row["id_number"].upper())
            if row["id_number"] in high:
                amount = min(max(int(row["amount"]), 0), AMOUNT_BOUND)
                for side, district in zip(
                    GROUP_SIDES, (row["district"], high[row["id_number"]]), strict=True
                ):
                    count, total = expected[side][district]
                    expected[side][district] = (count + 1, total + amount)
    return expected, len(high), len(keys)


def step_timeout(rows: int) -> float:
    """Seconds one protocol step of the non-streaming baseline may take: its value holder
    encrypts every row at ~1.5 ms on one core before it sends (the default 300 s would abort a
    1M-row run mid-way). The streaming path needs no such raise."""
    return max(300.0, rows * 0.003)


def baseline_tree(root: Path, rev: str) -> Path:
    """``rev``'s code unpacked under ``root``, laid out as the ``govshare`` package."""
    tree, shim = root / "baseline-src", root / "baseline-pkg"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", rev], check=True, capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    package = shim / "govshare"
    package.mkdir(parents=True)
    for name in ("cli", "client", "examples", "model", "node", "protocols", "rpc"):
        (package / name).symlink_to(tree / name)
    (package / "v1").symlink_to(tree / "protos" / "govshare" / "v1")
    return shim


def set_protocol_timeout(home: Path, seconds: float) -> None:
    config = home / "node.toml"
    lines = [
        f"protocol_timeout = {float(seconds)}" if ln.startswith("protocol_timeout =") else ln
        for ln in config.read_text().splitlines()
    ]
    config.write_text("\n".join(lines) + "\n")


@contextmanager
def baseline_processes(
    root: Path, nodes: Sequence[str], shim: Path
) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Like ``common.node_processes``, with the nodes importing ``shim``'s ``govshare``."""
    env = os.environ | {"PYTHONPATH": str(shim)}
    processes: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in nodes:
            process = subprocess.Popen(
                [sys.executable, "-m", "govshare.cli", "node", "serve", "--home",
                 str(root / name)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            )  # fmt: skip
            processes[name] = process
            assert process.stdout is not None
            if "serving on" not in process.stdout.readline():
                raise SystemExit(f"baseline node {name} did not start")
        yield processes
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.wait(timeout=60)


def intersection_plan(side: str = VALUES_SIDE) -> IntersectionPlan:
    """COUNT and SUM(amount) by district: civil's district, or (``matcher``) tax's."""
    return IntersectionPlan(
        QueryKind.INTERSECTION_AGGREGATE,
        PURPOSE,
        values=Side("civil", "assistance", "id_number"),
        matcher=Side("tax", "residents", "id_number", (Condition("income_band", "=", "high"),)),
        figures=Figures(
            GroupSpec("district", synth.DISTRICTS, side),
            (SumSpec("amount", AMOUNT_BOUND),),
            INTERSECTION_EPSILON,
        ),
        public_key=b"",
    )


def timed_intersection(
    root: Path, scheme: str, expected: dict[str, tuple[int, int]], shim: Path | None = None,
    timeout: float = 300.0, side: str = VALUES_SIDE,
) -> tuple[float, dict[str, float]]:  # fmt: skip
    """One intersection aggregate under ``scheme`` on fresh node processes (``shim``: the
    baseline revision's code), grouped on ``side``: wall seconds and each node's peak RSS
    (MB)."""
    alice = Identity.load(root / ANALYST)
    starting = node_processes(root, ["civil", "tax"]) if shim is None else (
        baseline_processes(root, ["civil", "tax"], shim))  # fmt: skip
    with starting as processes:
        start = time.perf_counter()
        outcome = run_intersection_aggregate(
            alice, replace(intersection_plan(side), scheme=scheme), run_timeout=timeout
        )
        wall = time.perf_counter() - start
        rss = {name: tree_peak_rss_mb(p.pid) for name, p in processes.items()}
    check(outcome, expected, "amount")
    return wall, rss


def message_bytes(scheme: str, keys: int, m: int, side: str = VALUES_SIDE) -> dict[str, int]:
    """Bytes of points and ciphertexts each side sends (gRPC framing aside): the matcher its
    m masked keys and the result, the value holder m points back and per key a point and its
    ciphertexts (Paillier: one per plaintext of the packing; bfv-simd: whole BFV ciphertexts of
    keys_per_ciphertext keys, one per CRT modulus, sized by encrypting one here); with the
    groups on the matcher's side its result is one per group. Under bfv-simd with the value
    holder's groups (sums at the value holder) the ciphertexts go the other way: the matcher
    sends its encrypted selection, and the value holder the result."""
    plan = replace(intersection_plan(side), scheme=scheme)
    if scheme == BFV_SIMD:
        shape = plan.simd_shape()
        secret = SimdSecretKeys(shape)
        sample = SimdPublic.from_bundle(shape, secret.public_bundle(), galois=False)
        size = max(len(c) for c in sample.encrypt_keys([[1] * shape.cells]))
        values = shape.ciphertexts_for(keys) * shape.moduli * size
        result = shape.groups * shape.moduli * size
        analyst = len(secret.public_bundle())
    else:
        layouts = plan.layouts(DEFAULT_N_BITS)
        size = 2 * DEFAULT_N_BITS // 8
        groups = len(plan.matcher_groups)
        values, result = keys * len(layouts) * size, groups * len(layouts) * size
        analyst = DEFAULT_N_BITS // 8
    # With the matcher's groups its keys go twice (common scalar, group scalar) each way.
    twice = 2 if side == MATCHER_SIDE else 1
    if plan.sums_at_values:
        return {
            "civil": 32 * m + 32 * keys + result,
            "tax": 32 * m + values,
            "analyst keys to each node": analyst,
        }
    return {
        "civil": 32 * twice * m + 32 * keys + values,
        "tax": 32 * twice * m + result,
        "analyst keys to each node": analyst,
    }


def run_intersection(
    root: Path, n: int, workers: int, baseline: str | None, schemes: Sequence[str],
    sides: Sequence[str] = (VALUES_SIDE,),
) -> None:  # fmt: skip
    everything, m, keys = intersection_setup(root, n)
    scalar_mults = 2 * n + 2 * m  # each side's set is masked once by each party
    matched = sum(c for c, _ in everything[VALUES_SIDE].values())
    print(f"\nIntersection aggregate, {n:,} x {n:,} rows, 2 node processes over mTLS, "
          f"{workers} cores; matcher's filtered set m = {m:,}, |A ∩ B| = {matched:,}")  # fmt: skip
    walls: dict[str, float] = {}
    native_rate: list[float] = []  # measured once, when the first bfv-simd run is printed
    for scheme, side in ((scheme, side) for side in sides for scheme in schemes):
        expected = everything[side]
        wall, rss = timed_intersection(
            root, scheme, expected, timeout=2 * step_timeout(n), side=side
        )
        walls[scheme if side == VALUES_SIDE else f"{scheme}, {side}"] = wall
        sent = message_bytes(scheme, keys, m, side)
        print(f"  {scheme}" + (f" (DJN-Paillier {DEFAULT_N_BITS})" if scheme == PAILLIER else
              " (BFV N=8192, CRT, flooded)") + f", groups on the {side} side")  # fmt: skip
        line("wall", f"{wall:.1f} s", f"{n / wall:,.0f} value rows/s")
        line("peak RSS civil; tax", f"{rss['civil']:,.0f} MB; {rss['tax']:,.0f} MB", "streaming")
        keys_mb = sent["analyst keys to each node"] / 1e6
        line("bytes sent civil; tax",
             f"{sent['civil'] / 1e6:,.1f} MB; {sent['tax'] / 1e6:,.2f} MB",
             f"analyst's keys to each node {keys_mb:.2f} MB")  # fmt: skip
        if scheme == BFV_SIMD:
            mults, what = simd_scalar_mults(keys, m, expected, side)
            if not native_rate:
                native_rate.append(raw_native_rate(mults, workers))
            raw_x = mults / native_rate[0]
            line(f"raw X25519 ({what} = {mults:,})", f"{raw_x:.1f} s",
                 f"{native_rate[0]:,.0f}/s on all cores, batch loop as on the nodes")  # fmt: skip
            line("ratio wall / raw X25519", f"{wall / raw_x:.2f}", "the rest over PSI's floor")
        if scheme == PAILLIER and side == VALUES_SIDE:
            window = WIDE_WINDOW_BITS if n >= WIDE_WINDOW_MIN_ROWS else None
            enc_rate = raw_encryptions_per_second(workers, window)
            x_rate = raw_x25519_rate(scalar_mults, workers)
            raw_enc, raw_x = n / enc_rate, scalar_mults / x_rate
            line(f"raw encryptions ({n:,})", f"{raw_enc:.1f} s", f"{enc_rate:,.0f}/s on all cores")
            line(f"raw X25519 (2n + 2m = {scalar_mults:,})", f"{raw_x:.1f} s",
                 f"{x_rate:,.0f}/s on all cores")  # fmt: skip
            line("ratio wall / (raw encryptions + X25519)", f"{wall / (raw_enc + raw_x):.2f}")
            if baseline is not None:
                shim = baseline_tree(root, baseline)
                for name in ("civil", "tax"):  # generous: the whole encryption is one step there
                    set_protocol_timeout(root / name, 6 * step_timeout(n))
                old_wall, old_rss = timed_intersection(
                    root, PAILLIER, expected, shim, timeout=12 * step_timeout(n)
                )
                for name in ("civil", "tax"):
                    set_protocol_timeout(root / name, 300.0)
                line(f"non-streaming ({baseline}) wall", f"{old_wall:.1f} s", "same stores")
                line("ratio wall streaming / non-streaming", f"{wall / old_wall:.2f}")
                line("non-streaming peak RSS civil; tax",
                     f"{old_rss['civil']:,.0f} MB; {old_rss['tax']:,.0f} MB")  # fmt: skip
                line("ratio peak RSS civil; tax",
                     f"{rss['civil'] / old_rss['civil']:.2f}; {rss['tax'] / old_rss['tax']:.2f}",
                     "streaming / non-streaming")  # fmt: skip
        scale = MILLION / n
        line("1,000,000 x 1,000,000", f"{wall:.1f} s" if n == MILLION else f"~{wall * scale:.0f} s",
             "measured" if n == MILLION else "EXTRAPOLATED linearly, not measured")  # fmt: skip
    if PAILLIER in walls and BFV_SIMD in walls:
        line("ratio paillier / bfv-simd wall", f"{walls[PAILLIER] / walls[BFV_SIMD]:.1f} x",
             "same stores, same run")  # fmt: skip
    for scheme in schemes:
        if scheme in walls and f"{scheme}, {MATCHER_SIDE}" in walls:
            ratio = walls[f"{scheme}, {MATCHER_SIDE}"] / walls[scheme]
            line(f"ratio {scheme} wall matcher / values groups", f"{ratio:.2f} x",
                 "same stores, same run")  # fmt: skip


def line(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>14}" + (f"   ({note})" if note else ""))


# --- horizontal aggregate ------------------------------------------------------------------------


def write_visits(path: Path, rows: int, seed: int) -> None:
    """Health-like rows: district (population-weighted), age band, year, visits in 0..30."""
    rng = random.Random(seed)
    weights = [population for _, _, population in synth._DISTRICT_TABLE]
    districts = rng.choices(synth.DISTRICTS, weights=weights, k=rows)
    bands = rng.choices(synth.AGE_BANDS, k=rows)
    visits = rng.choices(range(31), weights=[31 - v for v in range(31)], k=rows)
    with path.open("w", encoding="utf-8") as handle:
        handle.write("district,age_band,year,visits\n")
        handle.writelines(
            f"{d},{b},2025,{v}\n" for d, b, v in zip(districts, bands, visits, strict=True)
        )


def plain_query(home: Path) -> tuple[float, dict[str, tuple[int, int]]]:
    """Seconds for the plain grouped count and sum on one node's store (the rows sealed at rest,
    as the node keeps them: read through its data key, the node's own local step), and its
    result. Read from this process while the node serves: a store opened here never shares a
    process with the node's own connections."""
    config = NodeConfig.load(home)
    suite = Identity.load(config.identity_dir).roster.crypto
    start = time.perf_counter()
    at_rest = open_at_rest(config.home, config.database_path, suite)
    sums = Catalogue(config.database_path, at_rest=at_rest).group_sums(
        "visits", group_by="district", sums=[("visits", VISITS_BOUND)]
    )
    seconds = time.perf_counter() - start
    return seconds, {label: (count, total) for label, (count, total) in sums.items()}


def run_horizontal(root: Path, nodes: int, rows: int, workers: int) -> None:
    names = [f"health{i + 1}" for i in range(nodes)]
    make_federation(root, names)
    for i, name in enumerate(names):
        path = root / f"visits_{name}.csv"
        write_visits(path, rows, seed=100 + i)
        register(
            root / name, path, dataset="visits", columns=VISITS_COLUMNS,
            granted=["district", "visits"], kind=QueryKind.HORIZONTAL_AGGREGATE,
        )  # fmt: skip
    for name in names:  # warm the page cache for both sides alike
        plain_query(root / name)
    single: list[float] = []
    expected: dict[str, tuple[int, int]] = {}
    for name in names:
        seconds, result = plain_query(root / name)
        single.append(seconds)
        for district, (count, total) in result.items():
            c, t = expected.get(district, (0, 0))
            expected[district] = (c + count, t + total)
    plan = HorizontalPlan(
        QueryKind.HORIZONTAL_AGGREGATE,
        PURPOSE,
        parts=tuple(Part(name, "visits") for name in names),
        # DP noise (ε 1): an exact release would wait for every operator's approval.
        figures=Figures(
            GroupSpec("district", synth.DISTRICTS),
            (SumSpec("visits", VISITS_BOUND),),
            Fraction(1),
        ),
        aggregator=names[0],
        scheme=PAILLIER,
        public_key=b"",
    )
    with node_processes(root, names) as processes:
        alice = Identity.load(root / ANALYST)
        start = time.perf_counter()
        outcome = run_horizontal_aggregate(alice, plan)
        wall = time.perf_counter() - start
        rss = max(tree_peak_rss_mb(p.pid) for p in processes.values())
    check(outcome, expected, "visits")
    one = statistics.median(single)
    sequential = sum(single)
    print(f"\nHorizontal aggregate, Paillier {DEFAULT_N_BITS}, {nodes} nodes x {rows:,} rows, "
          f"COUNT/SUM/AVG by district (16 groups), {nodes} node processes over mTLS")  # fmt: skip
    line("wall", f"{wall:.2f} s", f"{nodes * rows / wall:,.0f} rows/s")
    line(
        f"plain GROUP BY, one node's {rows:,} rows (sealed, read through its key)",
        f"{one:.2f} s",
        f"median of {nodes}",
    )
    line(f"plain GROUP BY, all {nodes * rows:,} rows in turn", f"{sequential:.2f} s")
    line("ratio wall / one node's plain query", f"{wall / one:.2f}", "target <= 2")
    line("ratio wall / all plain queries in turn", f"{wall / sequential:.2f}")
    floor = one * max(1.0, nodes / workers)
    line(f"ratio wall / ({nodes} queries on {workers} cores)", f"{wall / floor:.2f}",
         f"one node's query x {nodes}/{workers}: the parallel floor on this machine")  # fmt: skip
    line("peak RSS per node (largest)", f"{rss:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="intersection rows per side")
    parser.add_argument("--nodes", type=int, default=5, help="horizontal nodes")
    parser.add_argument(
        "--horizontal-rows", type=int, default=MILLION, help="horizontal rows per node"
    )
    parser.add_argument("--only", choices=("intersection", "horizontal"))
    parser.add_argument("--dir", type=Path, default=Path("bench-run/aggregate"))
    parser.add_argument(
        "--scheme", choices=(PAILLIER, BFV_SIMD, "both"), default="both",
        help="intersection scheme(s); both: each on the same stores, with their ratio",
    )  # fmt: skip
    parser.add_argument(
        "--group-side", choices=(*GROUP_SIDES, "both"), default=VALUES_SIDE,
        help="whose district groups the intersection: the value holder's (civil), the "
        "matcher's (tax), or both in turn on the same stores",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", default=NON_STREAMING_REV,
        help="revision of the non-streaming path to compare with, or 'none'",
    )  # fmt: skip
    options = parser.parse_args()
    workers = os.cpu_count() or 1
    if options.only != "horizontal":
        root = options.dir / f"intersection-{options.rows}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        baseline = None if options.baseline == "none" else options.baseline
        schemes = (PAILLIER, BFV_SIMD) if options.scheme == "both" else (options.scheme,)
        sides = GROUP_SIDES if options.group_side == "both" else (options.group_side,)
        run_intersection(root, options.rows, workers, baseline, schemes, sides)
    if options.only != "intersection":
        root = options.dir / f"horizontal-{options.nodes}x{options.horizontal_rows}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        run_horizontal(root, options.nodes, options.horizontal_rows, workers)


if __name__ == "__main__":
    main()
