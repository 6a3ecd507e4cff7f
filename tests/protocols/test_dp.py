"""Tests for govshare.protocols.dp: exact samplers' statistics, intervals, suppression."""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from govshare.protocols import dp
from govshare.protocols.errors import MalformedInput


class RecordingRandom(random.Random):
    """A seeded source that records every randrange argument (to prove integer-only use)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.stops: list[object] = []

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        self.stops.append(start if stop is None else stop)
        assert stop is None and step == 1, "the samplers only use randrange(stop)"
        return super().randrange(start)


class ScriptedRandom(random.Random):
    """Returns scripted values and records the requested ranges."""

    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = list(values)
        self.stops: list[int] = []

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        self.stops.append(start)
        return self.values.pop(0)


def _laplace_pmf(scale: Fraction, z: int) -> float:
    q = math.exp(-1 / float(scale))
    return (1 - q) / (1 + q) * q ** abs(z)


def _laplace_variance(scale: Fraction) -> float:
    q = math.exp(-1 / float(scale))
    return 2 * q / (1 - q) ** 2


def test_bernoulli_exp_follows_algorithm_1_exactly() -> None:
    # gamma = 1/2: A1 ~ Bern(1/2) via randrange(2) -> 0 (< 1: success), A2 ~ Bern(1/4) via
    # randrange(4) -> 3 (failure). K = 2 is even: result False.
    rng = ScriptedRandom([0, 3])
    assert dp.bernoulli_exp(Fraction(1, 2), rng) is False
    assert rng.stops == [2, 4]
    # First trial fails: K = 1, odd: True.
    rng = ScriptedRandom([1])
    assert dp.bernoulli_exp(Fraction(1, 2), rng) is True
    # gamma = 3/2: one Bern(exp(-1)) first: Bern(1/1) always succeeds -> randrange(1) = 0,
    # then Bern(1/2) fails -> K=2 even: False, and the result is False without more draws.
    rng = ScriptedRandom([0, 1])
    assert dp.bernoulli_exp(Fraction(3, 2), rng) is False
    assert rng.stops == [1, 2]


def test_samplers_use_only_integer_ranges() -> None:
    rng = RecordingRandom(7)
    for _ in range(200):
        dp.discrete_laplace(Fraction(7, 3), rng)
        dp.discrete_gaussian(Fraction(10, 3), rng)
    assert rng.stops
    assert all(type(stop) is int and stop >= 1 for stop in rng.stops)


def test_float_parameters_refused() -> None:
    with pytest.raises(TypeError):
        dp.discrete_laplace(2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.discrete_gaussian(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.bernoulli_exp(0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dp.laplace_scale(epsilon=0.5)  # type: ignore[arg-type]
    with pytest.raises(MalformedInput):
        dp.discrete_laplace(0)
    with pytest.raises(MalformedInput):
        dp.discrete_laplace(Fraction(-1, 2))
    with pytest.raises(MalformedInput):
        dp.bernoulli_exp(Fraction(-1))
    with pytest.raises(MalformedInput):
        dp.bernoulli(Fraction(3, 2))


def test_outputs_are_ints_and_seeded_runs_repeat() -> None:
    a = dp.discrete_laplace_vector(Fraction(5, 2), 50, random.Random(3))
    b = dp.discrete_laplace_vector(Fraction(5, 2), 50, random.Random(3))
    assert a == b
    assert all(type(x) is int for x in a)
    assert all(type(x) is int for x in [dp.discrete_gaussian(4), dp.discrete_laplace(1)])


def test_bernoulli_exp_frequency() -> None:
    rng = random.Random(11)
    n = 20_000
    for gamma in (Fraction(1, 2), Fraction(7, 4)):
        hits = sum(dp.bernoulli_exp(gamma, rng) for _ in range(n))
        p = math.exp(-float(gamma))
        se = math.sqrt(p * (1 - p) / n)
        assert abs(hits / n - p) < 5 * se


@pytest.mark.parametrize("scale", [Fraction(3), Fraction(5, 2)])
def test_discrete_laplace_moments_and_pmf(scale: Fraction) -> None:
    rng = random.Random(2020)
    n = 12_000
    xs = dp.discrete_laplace_vector(scale, n, rng)
    var = _laplace_variance(scale)
    mean = sum(xs) / n
    assert abs(mean) < 5 * math.sqrt(var / n)
    sample_var = sum(x * x for x in xs) / n - mean * mean
    # Var of the sample variance ~ (mu4 - sigma^4)/n; a discrete Laplace has kurtosis <= 6.
    assert abs(sample_var - var) < 5 * var * math.sqrt(5 / n)
    counts = Counter(xs)
    for z in range(-3, 4):
        p = _laplace_pmf(scale, z)
        assert abs(counts[z] / n - p) < 5 * math.sqrt(p * (1 - p) / n), z


def test_discrete_laplace_fractional_scale_below_one() -> None:
    # scale 1/3 (t=1, s=3 in Algorithm 2): mass concentrates at 0.
    rng = random.Random(5)
    n = 5_000
    scale = Fraction(1, 3)
    xs = [dp.discrete_laplace(scale, rng) for _ in range(n)]
    p0 = _laplace_pmf(scale, 0)
    assert abs(xs.count(0) / n - p0) < 5 * math.sqrt(p0 * (1 - p0) / n)


def test_discrete_gaussian_moments() -> None:
    rng = random.Random(99)
    n = 6_000
    sigma2 = Fraction(9)
    xs = [dp.discrete_gaussian(sigma2, rng) for _ in range(n)]
    mean = sum(xs) / n
    assert abs(mean) < 5 * math.sqrt(9 / n)
    sample_var = sum(x * x for x in xs) / n - mean * mean
    # For sigma = 3 the discrete Gaussian's variance equals sigma^2 up to ~e^-(2 pi^2 9).
    assert abs(sample_var - 9) < 5 * 9 * math.sqrt(2 / n)
    norm = sum(math.exp(-(z * z) / 18) for z in range(-60, 61))
    p0 = 1 / norm
    assert abs(xs.count(0) / n - p0) < 5 * math.sqrt(p0 * (1 - p0) / n)


def test_laplace_interval_is_tight() -> None:
    for scale in (Fraction(1, 3), Fraction(1), Fraction(5, 2), Fraction(10), Fraction(1000, 7)):
        k = dp.laplace_interval(scale)
        q = math.exp(-1 / float(scale))

        def covered(j: int, q: float = q) -> float:
            return 1 - 2 * q ** (j + 1) / (1 + q)

        assert covered(k) >= 0.95
        if k > 0:
            assert covered(k - 1) < 0.95
    assert dp.laplace_interval(Fraction(1)) == 3  # P(|Z|>3)=0.0268, P(|Z|>2)=0.0728
    assert dp.laplace_interval(Fraction(1, 10**9)) == 0


def test_laplace_interval_empirical_coverage() -> None:
    rng = random.Random(42)
    scale = Fraction(4)
    k = dp.laplace_interval(scale)
    n = 6_000
    inside = sum(abs(x) <= k for x in dp.discrete_laplace_vector(scale, n, rng))
    q = math.exp(-1 / 4)
    p = 1 - 2 * q ** (k + 1) / (1 + q)
    assert abs(inside / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert inside / n > 0.94


def test_tail_bound() -> None:
    b = dp.laplace_tail_bound(Fraction(10))
    q = math.exp(-0.1)
    assert 2 * q ** (b + 1) / (1 + q) <= 2**-64
    assert 2 * q**b / (1 + q) > 2**-64


def test_laplace_scale() -> None:
    assert dp.laplace_scale(epsilon=Fraction(1, 2)) == 2
    assert dp.laplace_scale(epsilon=Fraction(1, 2), sensitivity=3) == 6
    with pytest.raises(MalformedInput):
        dp.laplace_scale(epsilon=0)
    with pytest.raises(MalformedInput):
        dp.laplace_scale(epsilon=1, sensitivity=0)


def test_noise_share_only_designated_node_adds_noise() -> None:
    nodes = ["tax", "health", "social"]
    designated = dp.designated_node(nodes)
    assert designated == "health"
    rng = random.Random(1)
    shares = {
        node: dp.noise_share(Fraction(50), 8, node=node, designated=designated, rng=rng)
        for node in nodes
    }
    assert shares["tax"] == [0] * 8 and shares["social"] == [0] * 8
    assert any(x != 0 for x in shares["health"])
    with pytest.raises(MalformedInput):
        dp.designated_node(["a", "a"])
    with pytest.raises(MalformedInput):
        dp.designated_node([])


def test_suppression() -> None:
    assert dp.suppressed(9, 10) is True
    assert dp.suppressed(10, 10) is False
    assert dp.suppressed(-3, 10) is True
    assert dp.release(1234, 12, 10) == 1234
    assert dp.release(1234, 4, 10) is None
    with pytest.raises(MalformedInput):
        dp.suppressed(5, 0)
