"""DP PSI-CA: the shifted truncated discrete Laplace, dummy keys, and the local reference flow."""

from __future__ import annotations

import decimal
import json
import math
import random
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from govshare.protocols import dp, ecdh_psi
from govshare.protocols.ecdh_psi import (
    MAX_DUMMY_KEYS,
    P,
    PsiParty,
    check_shared_dummies,
    decode_points,
    dp_cardinality_estimate,
    dp_cardinality_from_dummies,
    dp_cardinality_locally,
    draw_private_dummies,
    draw_shared_dummies,
    dummy_keys,
    encode_points,
    hash_to_point,
    mask,
    pad_with_dummies,
)
from govshare.protocols.errors import MalformedInput

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors" / "dp_psi"
SHIFT_CASES: list[dict[str, Any]] = json.loads(
    (VECTORS / "truncation_shift.json").read_text("utf-8")
)["cases"]
TRUNCATED_CASES: list[dict[str, Any]] = json.loads(
    (VECTORS / "truncated_laplace.json").read_text("utf-8")
)["cases"]
QID = b"query-dp-psi"
SCALAR = bytes(range(32))
LN_INVERSE_PSI_DELTA = 30 * math.log(2)


def _truncated_pmf(epsilon: Fraction, shift: int) -> dict[int, float]:
    """P(Z = z) for Z discrete Laplace of scale 1/epsilon conditioned on |Z| <= shift."""
    q = math.exp(-float(epsilon))
    weights = {z: q ** abs(z) for z in range(-shift, shift + 1)}
    total = sum(weights.values())
    return {z: w / total for z, w in weights.items()}


def _within(observed: int, n: int, p: float) -> bool:
    """Frequency observed / n is within 5 standard errors of probability p."""
    return abs(observed / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


# --- vectors ---------------------------------------------------------------------------------


def test_vectors_are_current(tmp_path: Path) -> None:
    """Re-run the independent generator; its output must match the committed files."""
    subprocess.run(
        [sys.executable, str(VECTORS / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    generated = {p.name for p in tmp_path.iterdir()}
    assert generated == {p.name for p in VECTORS.iterdir() if p.suffix == ".json"}
    for name in generated:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name


def test_vectors_cover_both_outcomes_and_the_constants() -> None:
    assert {case["expect"] for case in SHIFT_CASES} == {"ok", "MalformedInput"}
    assert dp.PSI_DELTA == Fraction(1, 2**30)
    assert dp.MAX_PSI_SHIFT == 10**6  # the generator's MAX_SHIFT
    assert any(case["delta"] == "1/1073741824" for case in SHIFT_CASES)


@pytest.mark.parametrize(
    "case", SHIFT_CASES, ids=[f"{c['epsilon']}|{c['delta']}" for c in SHIFT_CASES]
)
def test_truncation_shift_vectors(case: dict[str, Any]) -> None:
    epsilon, delta = Fraction(case["epsilon"]), Fraction(case["delta"])
    if case["expect"] == "ok":
        assert dp.truncation_shift(epsilon, delta) == case["shift"]
    else:
        with pytest.raises(MalformedInput):
            dp.truncation_shift(epsilon, delta)


@pytest.mark.parametrize(
    "case", TRUNCATED_CASES, ids=[f"{c['epsilon']}|{c['shift']}" for c in TRUNCATED_CASES]
)
def test_truncated_laplace_vectors(case: dict[str, Any]) -> None:
    epsilon, shift = Fraction(case["epsilon"]), case["shift"]
    assert dp.truncated_laplace_interval(epsilon, shift) == case["interval_95"]
    assert dp.truncated_delta(epsilon, shift) == pytest.approx(float(case["delta"]), rel=1e-6)


# --- the shift -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "expected"),
    [(Fraction(1, 10), 208), (Fraction(1, 2), 42), (Fraction(1), 21), (Fraction(2), 11)],
)
def test_truncation_shift_known_answers(epsilon: Fraction, expected: int) -> None:
    # Independently: the least t with exp(-epsilon t) <= 2^-30, i.e. epsilon t >= 30 ln 2.
    ratio = LN_INVERSE_PSI_DELTA / float(epsilon)
    assert abs(ratio - round(ratio)) > 1e-6  # far from a boundary, so floats decide it
    assert math.ceil(ratio) == expected
    shift = dp.truncation_shift(epsilon)
    assert shift == expected
    assert math.exp(-float(epsilon) * shift) <= 2**-30 < math.exp(-float(epsilon) * (shift - 1))


@settings(max_examples=200)
@given(
    numerator=st.integers(min_value=1, max_value=10**6),
    denominator=st.integers(min_value=1, max_value=10**6),
)
def test_truncation_shift_is_the_least_solution(numerator: int, denominator: int) -> None:
    epsilon = Fraction(numerator, denominator)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        ratio = decimal.Decimal(2**30).ln() * denominator / numerator
        assume(abs(ratio - ratio.to_integral_value()) > decimal.Decimal(10) ** -40)
        expected = math.ceil(ratio)
    if expected > dp.MAX_PSI_SHIFT:
        with pytest.raises(MalformedInput, match="shift above"):
            dp.truncation_shift(epsilon)
    else:
        assert dp.truncation_shift(epsilon) == expected


def test_truncation_shift_refusals() -> None:
    with pytest.raises(TypeError):
        dp.truncation_shift(0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.truncation_shift(Fraction(1), 0.001)  # type: ignore[arg-type]
    for bad in (Fraction(0), Fraction(-1, 2)):
        with pytest.raises(MalformedInput) as info:
            dp.truncation_shift(bad)
        assert info.value.field == "epsilon"
    with pytest.raises(MalformedInput) as info:
        dp.truncation_shift(Fraction(1, 10**5))  # needs 2,079,442
    assert info.value.field == "epsilon"
    with pytest.raises(MalformedInput) as info:
        dp.truncation_shift(Fraction(1), Fraction(3, 4))
    assert info.value.field == "delta"
    assert dp.truncation_shift(10**6) == 1  # int epsilon accepted


def test_truncated_delta_is_below_psi_delta() -> None:
    for epsilon in (Fraction(1, 10), Fraction(1, 2), Fraction(1), Fraction(2), Fraction(7, 3)):
        shift = dp.truncation_shift(epsilon)
        q = math.exp(-float(epsilon))
        # Independently: P(Z = shift) under the truncated pmf.
        assert dp.truncated_delta(epsilon, shift) == pytest.approx(
            _truncated_pmf(epsilon, shift)[shift], rel=1e-9
        )
        assert dp.truncated_delta(epsilon, shift) < q**shift <= float(dp.PSI_DELTA)
        # One less and the target is missed: the shift is the least that works.
        assert q ** (shift - 1) > float(dp.PSI_DELTA)


# --- the sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "shift"),
    [(Fraction(1, 2), 1), (Fraction(1, 10), 5), (Fraction(1), 21), (Fraction(2), 11)],
)
def test_draws_lie_in_zero_to_twice_the_shift(epsilon: Fraction, shift: int) -> None:
    rng = random.Random(17)
    draws = [dp.shifted_truncated_laplace(epsilon, shift, rng) for _ in range(1500)]
    assert all(type(d) is int and 0 <= d <= 2 * shift for d in draws)
    if shift <= 5:  # both ends have probability > 3%: a clipped or shifted range shows
        assert min(draws) == 0 and max(draws) == 2 * shift


def test_seeded_draws_repeat() -> None:
    one = [dp.shifted_truncated_laplace(Fraction(1, 3), 63, random.Random(5)) for _ in range(3)]
    two = [dp.shifted_truncated_laplace(Fraction(1, 3), 63, random.Random(5)) for _ in range(3)]
    assert one == two
    spread = {dp.shifted_truncated_laplace(Fraction(1, 3), 63, random.Random(s)) for s in range(40)}
    assert len(spread) > 5


@pytest.mark.parametrize(
    ("epsilon", "shift"),
    [
        (Fraction(1, 2), 42),  # the real shift: truncation almost never bites
        (Fraction(1, 10), 20),  # truncation matters: P(|Z| > 20) = 0.12 untruncated
        (Fraction(1, 10), 5),  # truncation dominates: P(Z = 0) is 0.113, not 0.050
    ],
)
def test_empirical_distribution_matches_the_truncated_pmf(epsilon: Fraction, shift: int) -> None:
    n = 4000
    rng = random.Random(2024)
    zs = [dp.shifted_truncated_laplace(epsilon, shift, rng) - shift for _ in range(n)]
    pmf = _truncated_pmf(epsilon, shift)
    variance = sum(p * z * z for z, p in pmf.items())  # the mean is 0 by symmetry
    assert abs(sum(zs) / n) <= 5 * math.sqrt(variance / n)
    counts = Counter(zs)
    assert _within(counts[0], n, pmf[0])
    scale = math.floor(1 / epsilon)
    near = sum(p for z, p in pmf.items() if abs(z) <= scale)
    assert _within(sum(abs(z) <= scale for z in zs), n, near)
    ends = pmf[shift] + pmf[-shift]
    assert _within(counts[shift] + counts[-shift], n, ends)
    # The 95% interval covers at least 95% (minus 5 standard errors) of the draws.
    h = dp.truncated_laplace_interval(epsilon, shift)
    covered = sum(p for z, p in pmf.items() if abs(z) <= h)
    assert covered >= 0.95
    inside = sum(abs(z) <= h for z in zs)
    assert inside / n >= 0.95 - 5 * math.sqrt(0.95 * 0.05 / n)
    assert _within(inside, n, covered)


def test_truncated_interval_is_tight_and_capped() -> None:
    for epsilon, shift in [
        (Fraction(1, 10), 208),
        (Fraction(1, 10), 20),
        (Fraction(1, 3), 7),
        (Fraction(1), 21),
        (Fraction(3), 1),
    ]:
        h = dp.truncated_laplace_interval(epsilon, shift)
        pmf = _truncated_pmf(epsilon, shift)

        def covered(j: int, pmf: dict[int, float] = pmf) -> float:
            return sum(p for z, p in pmf.items() if abs(z) <= j)

        assert 0 <= h <= shift
        assert covered(h) >= 0.95
        if h > 0:
            assert covered(h - 1) < 0.95
    # Capped: with so little room every point but the ends is needed.
    assert dp.truncated_laplace_interval(Fraction(1, 10), 5) == 5
    # Truncation narrows the interval below the untruncated one.
    assert dp.truncated_laplace_interval(Fraction(1, 10), 20) < dp.laplace_interval(10)
    assert dp.truncated_laplace_interval(Fraction(1, 10), 20, Fraction(1, 2)) == 6
    with pytest.raises(MalformedInput):
        dp.truncated_laplace_interval(Fraction(1), 21, Fraction(1))


def test_sampler_refusals() -> None:
    with pytest.raises(TypeError):
        dp.shifted_truncated_laplace(0.5, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.shifted_truncated_laplace(Fraction(1, 2), 42.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.shifted_truncated_laplace(Fraction(1, 2), True)
    for bad_shift in (0, -1, dp.MAX_PSI_SHIFT + 1):
        with pytest.raises(MalformedInput) as info:
            dp.shifted_truncated_laplace(Fraction(1, 2), bad_shift)
        assert info.value.field == "shift"
    # Below half the scale 1/epsilon the rejection loop would mostly reject: refused.
    with pytest.raises(MalformedInput, match="half the scale"):
        dp.shifted_truncated_laplace(Fraction(1, 10), 4)
    with pytest.raises(MalformedInput):
        dp.shifted_truncated_laplace(Fraction(0), 4)
    with pytest.raises(MalformedInput):
        dp.truncated_delta(Fraction(1, 10), 4)


# --- dummy keys ------------------------------------------------------------------------------


class ScriptedBytes(random.Random):
    """Returns scripted 32-byte strings from randbytes."""

    def __init__(self, values: list[bytes]) -> None:
        super().__init__(0)
        self.values = list(values)

    def randbytes(self, n: int) -> bytes:
        assert n == 32
        return self.values.pop(0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=0, max_value=60), seed=st.integers(min_value=0, max_value=2**32))
def test_dummy_keys_are_distinct_canonical_points(n: int, seed: int) -> None:
    keys = dummy_keys(n, random.Random(seed))
    assert len(keys) == n == len(set(keys))
    assert all(len(k) == 32 and int.from_bytes(k, "little") < P for k in keys)
    assert decode_points(encode_points(keys)) == keys
    for key in keys[:3]:  # they are keys: hashed and masked like any other
        assert len(mask(SCALAR, hash_to_point(QID, key))) == 32
    assert dummy_keys(n, random.Random(seed)) == keys


def test_dummy_keys_redraw_non_canonical_and_repeated_values() -> None:
    top_bit = bytes(31) + b"\x80"  # bit 255 set: cleared, giving u = 0 (fine as a key)
    at_p = P.to_bytes(32, "little")  # u = p: not canonical, redrawn
    all_ones = b"\xff" * 32  # bit 255 cleared gives 2^255 - 1 >= p: redrawn
    first, second = bytes(range(32)), bytes(range(1, 33))
    rng = ScriptedBytes([at_p, all_ones, first, first, top_bit, second])
    assert dummy_keys(3, rng) == [first, bytes(32), second]
    assert rng.values == []


def test_dummy_keys_default_source_and_refusals() -> None:
    assert dummy_keys(4) != dummy_keys(4)
    assert dummy_keys(0) == []
    with pytest.raises(TypeError):
        dummy_keys(-1)
    with pytest.raises(TypeError):
        dummy_keys(True)
    with pytest.raises(MalformedInput):
        dummy_keys(MAX_DUMMY_KEYS + 1)


def test_drawn_dummies_follow_the_sampler() -> None:
    epsilon = Fraction(1, 2)
    shift = dp.truncation_shift(epsilon)
    sizes = set()
    for seed in range(30):
        shared = draw_shared_dummies(epsilon, random.Random(seed))
        expected = dp.shifted_truncated_laplace(epsilon, shift, random.Random(seed))
        assert len(shared) == expected <= 2 * shift
        assert len(set(shared)) == len(shared)
        private = draw_private_dummies(epsilon, random.Random(seed))
        assert len(private) == expected  # same distribution and same draws from one seed
        sizes.add(len(shared))
    assert len(sizes) > 3
    assert draw_shared_dummies(epsilon) != draw_shared_dummies(epsilon)
    with pytest.raises(MalformedInput):
        draw_shared_dummies(Fraction(0))


def test_check_shared_dummies() -> None:
    epsilon = Fraction(2)  # shift 11: at most 22 shared dummies
    keys = dummy_keys(22, random.Random(1))
    assert check_shared_dummies(keys, epsilon=epsilon) == keys
    assert check_shared_dummies([], epsilon=epsilon) == []
    with pytest.raises(MalformedInput, match="at most 22"):
        check_shared_dummies(dummy_keys(23, random.Random(1)), epsilon=epsilon)
    with pytest.raises(MalformedInput, match="repeated"):
        check_shared_dummies([keys[0], keys[1], keys[0]], epsilon=epsilon)
    with pytest.raises(MalformedInput, match="canonical"):
        check_shared_dummies([keys[0], bytes(31) + b"\x80"], epsilon=epsilon)
    with pytest.raises(MalformedInput, match="32 bytes"):
        check_shared_dummies([keys[0], bytes(31)], epsilon=epsilon)
    with pytest.raises(TypeError):
        check_shared_dummies(keys, epsilon=2.0)  # type: ignore[arg-type]


def test_pad_with_dummies_mixes_and_keeps_real_order() -> None:
    real = [f"{i:018d}".encode() for i in range(40)]
    shared, private = dummy_keys(5, random.Random(2)), dummy_keys(6, random.Random(3))
    dummy_set = set(shared) | set(private)
    layouts = set()
    for seed in range(20):
        padded = pad_with_dummies(real, shared, private, rng=random.Random(seed))
        assert sorted(padded) == sorted(real + shared + private)
        assert [k for k in padded if k not in dummy_set] == real
        layouts.add(tuple(i for i, k in enumerate(padded) if k in dummy_set))
    assert len(layouts) == 20  # positions vary...
    tail = tuple(range(40, 51))
    assert tail not in layouts  # ...and are not simply appended
    assert len(pad_with_dummies(real, shared, private)) == 51
    with pytest.raises(MalformedInput, match="distinct"):
        pad_with_dummies(real, [real[3]], private)
    with pytest.raises(MalformedInput, match="distinct"):
        pad_with_dummies(real, shared, [shared[0]])


# --- the DP flow -----------------------------------------------------------------------------

LEFT_KEYS = [f"11010119900101{i:04d}".encode() for i in range(18)]
RIGHT_KEYS = LEFT_KEYS[:7] + [f"22010119900101{i:04d}".encode() for i in range(9)]
TRUE_COUNT = 7
LEFT_ONLY = len(LEFT_KEYS) - TRUE_COUNT  # |A \ B| = 11


def test_flow_with_explicit_dummies() -> None:
    shared = dummy_keys(4, random.Random(1))
    left_private, right_private = dummy_keys(3, random.Random(2)), dummy_keys(6, random.Random(3))
    view = dp_cardinality_from_dummies(
        PsiParty.fresh(QID),
        LEFT_KEYS,
        PsiParty.fresh(QID),
        RIGHT_KEYS,
        shared=shared,
        left_private=left_private,
        right_private=right_private,
    )
    assert view.count == TRUE_COUNT + 4
    assert view.left_size == len(LEFT_KEYS) + 4 + 3
    assert view.right_size == len(RIGHT_KEYS) + 4 + 6
    # Without dummies it is the exact PSI-CA.
    exact = dp_cardinality_from_dummies(
        PsiParty.fresh(QID),
        LEFT_KEYS,
        PsiParty.fresh(QID),
        RIGHT_KEYS,
        shared=[],
        left_private=[],
        right_private=[],
    )
    assert (exact.count, exact.left_size, exact.right_size) == (7, 18, 16)


def test_local_flow_over_seeded_runs() -> None:
    epsilon = Fraction(2)
    shift = dp.truncation_shift(epsilon)  # 11
    left_minus_count = set()
    for seed in range(25):
        view = dp_cardinality_locally(
            PsiParty.fresh(QID),
            LEFT_KEYS,
            PsiParty.fresh(QID),
            RIGHT_KEYS,
            epsilon=epsilon,
            rng=random.Random(seed),
        )
        assert 0 <= view.count - TRUE_COUNT <= 2 * shift
        # Replay the documented draw order: shared, the left's private, the right's private.
        replay = random.Random(seed)
        d = len(draw_shared_dummies(epsilon, replay))
        e_left = len(draw_private_dummies(epsilon, replay))
        e_right = len(draw_private_dummies(epsilon, replay))
        assert view.count == TRUE_COUNT + d
        assert view.left_size == len(LEFT_KEYS) + d + e_left
        assert view.right_size == len(RIGHT_KEYS) + d + e_right
        assert 0 <= view.left_size - view.count - LEFT_ONLY <= 2 * shift
        left_minus_count.add(view.left_size - view.count)
    # The sets never changed, yet size - count (= |A \ B| + e_L) varies: the private dummies
    # keep the analyst from reading |A \ B| off the sizes.
    assert len(left_minus_count) > 1


@settings(max_examples=12, deadline=None)
@given(
    a_only=st.sets(st.binary(min_size=1, max_size=8), max_size=10),
    b_only=st.sets(st.binary(min_size=9, max_size=12), max_size=10),
    common=st.sets(st.binary(min_size=13, max_size=16), max_size=10),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_local_flow_count_within_the_hard_bound(
    a_only: set[bytes], b_only: set[bytes], common: set[bytes], seed: int
) -> None:
    epsilon = Fraction(3)  # shift 7
    left_keys, right_keys = sorted(a_only | common), sorted(b_only | common)
    view = dp_cardinality_locally(
        PsiParty.fresh(QID),
        left_keys,
        PsiParty.fresh(QID),
        right_keys,
        epsilon=epsilon,
        rng=random.Random(seed),
    )
    assert 0 <= view.count - len(common) <= 14
    assert 0 <= view.left_size - view.count - len(a_only) <= 14
    assert 0 <= view.right_size - view.count - len(b_only) <= 14


def test_local_flow_refusals() -> None:
    with pytest.raises(MalformedInput, match="query id"):
        dp_cardinality_locally(
            PsiParty.fresh(b"q1"), [b"k"], PsiParty.fresh(b"q2"), [b"k"], epsilon=Fraction(1)
        )
    with pytest.raises(TypeError):
        dp_cardinality_locally(
            PsiParty.fresh(QID),
            [b"k"],
            PsiParty.fresh(QID),
            [b"k"],
            epsilon=1.0,  # type: ignore[arg-type]
        )


# --- the analyst's reading -------------------------------------------------------------------


def test_estimate_and_interval() -> None:
    epsilon = Fraction(1)  # shift 21, 95% half-width 3
    reading = dp_cardinality_estimate(100, epsilon=epsilon)
    assert (reading.estimate, reading.low, reading.high, reading.shift) == (79, 76, 82, 21)
    for count in range(0, 60):
        r = dp_cardinality_estimate(count, epsilon=epsilon)
        assert r.estimate == count - 21
        assert max(0, count - 42) <= r.low <= r.high <= count
    small = dp_cardinality_estimate(5, epsilon=epsilon)
    assert (small.low, small.high) == (0, 0)
    with pytest.raises(MalformedInput):
        dp_cardinality_estimate(-1, epsilon=epsilon)
    with pytest.raises(TypeError):
        dp_cardinality_estimate(5.0, epsilon=epsilon)  # type: ignore[arg-type]


def test_estimate_interval_coverage() -> None:
    epsilon, true = Fraction(1, 2), 30
    shift = dp.truncation_shift(epsilon)
    rng = random.Random(7)
    n = 4000
    inside = 0
    for _ in range(n):
        count = true + dp.shifted_truncated_laplace(epsilon, shift, rng)
        reading = dp_cardinality_estimate(count, epsilon=epsilon)
        assert count - 2 * shift <= true <= count  # the hard bound always holds
        inside += reading.low <= true <= reading.high
    assert inside / n >= 0.95 - 5 * math.sqrt(0.95 * 0.05 / n)


def test_module_docstring_states_the_dp_variant() -> None:
    doc = ecdh_psi.__doc__ or ""
    assert "DP PSI-CA" in doc
    for shift in (208, 42, 21, 11):
        assert str(shift) in doc
