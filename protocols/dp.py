"""Exact discrete differential-privacy noise (DESIGN.md protocol 4).

Samplers follow Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy"
(NeurIPS 2020, arXiv:2004.00010): Algorithm 1 (Bernoulli(exp(-gamma)) for rational gamma),
Algorithm 2 (discrete Laplace with rational scale) and Algorithm 3 (discrete Gaussian with
rational variance). Every step uses only ``int`` and :class:`fractions.Fraction` arithmetic and
uniform integers from the random source, so the output distribution is exactly the stated one:
no floating-point noise and none of its attacks (Mironov, "On Significance of the Least
Significant Bits for Differential Privacy", CCS 2012). The default random source is
:class:`secrets.SystemRandom` (``os.urandom``); tests inject a seeded :class:`random.Random`.

Mechanism: a count or sum with L1 sensitivity ``Delta`` plus discrete Laplace noise of scale
``Delta / epsilon`` (``P[Z = z]`` proportional to ``exp(-|z| / scale)``) is ``epsilon``-DP
(Ghosh, Roughgarden, Sundararajan 2009, "geometric mechanism"). The per (grantee, dataset)
epsilon ledger lives in the node, not here.

Who adds the noise (distributed setting) -- **one designated node adds the whole noise**; every
other node adds zeros (:func:`noise_share`). Reasons and trade-offs:

- The noise is exactly discrete Laplace (or discrete Gaussian) of the intended scale, at the
  least variance for the privacy target. It is added under encryption (and under the pairwise
  masks in the horizontal aggregate), so no party other than its designated sampler sees it.
- Weakness: if the designated node colludes with the analyst, the analyst can subtract the noise
  and the release loses its DP guarantee (the cryptography still hides every node's own input).
  The semi-honest, non-colluding model of DESIGN.md accepts this; the query plan records which
  node was designated, so the audit log names it.
- Rejected alternative 1: each of ``N`` nodes adds the difference of two Polya(1/N) samples, whose
  sum is exactly discrete Laplace and which tolerates colluders (each removes only its share).
  Polya with a fractional shape is a Poisson-Gamma mixture; no exact integer-arithmetic sampler
  in the CKS style is standard, and a floating-point one would bring back the attacks above.
- Rejected alternative 2: every node adds full-scale noise: robust to collusion, but ``N`` times
  the variance.
- In protocol 2 (intersection aggregate) only the matcher adds noise, so it is the designated
  node there by construction.

Suppression: a figure whose *noisy* count is below ``k`` is withheld (:func:`suppressed`).
Deciding on the noisy count, never the true one, keeps suppression a post-processing of the DP
output.

Shifted, truncated discrete Laplace (for DP PSI-CA, see ``ecdh_psi``'s "DP PSI-CA"): noise
realised as a number of *dummy keys* must be a non-negative count, so the noise is
``d = t + Z`` with ``Z`` discrete Laplace of scale ``1/epsilon`` conditioned on ``|Z| <= t``
(:func:`shifted_truncated_laplace`, rejection sampling over the exact sampler), ``d`` in
``[0, 2t]``. ``x + d`` for a count ``x`` of sensitivity 1 is ``(epsilon, delta(t))``-DP with
``delta(t) = e^{-epsilon t} (1 - e^{-epsilon}) / (1 + e^{-epsilon} - 2 e^{-epsilon (t+1)})``
(:func:`truncated_delta`): the likelihood ratio of neighbouring outputs stays within
``e^epsilon`` except at the two ends of the support, each of mass ``P(Z = t)``. Since
``delta(t) < e^{-epsilon t}``, the shift :func:`truncation_shift` -- the least integer ``t``
with ``e^{-epsilon t} <= delta``, decided exactly from the rational ``epsilon`` -- bounds the
true delta by ``delta`` (default :data:`PSI_DELTA` = 2^-30).
"""

from __future__ import annotations

import decimal
import functools
import math
import random
import secrets
from collections.abc import Sequence
from fractions import Fraction
from typing import Final, TypeVar

from govshare.protocols.errors import MalformedInput

__all__ = [
    "DEFAULT_CONFIDENCE",
    "MAX_PSI_SHIFT",
    "PSI_DELTA",
    "bernoulli",
    "bernoulli_exp",
    "designated_node",
    "discrete_gaussian",
    "discrete_laplace",
    "discrete_laplace_vector",
    "laplace_interval",
    "laplace_scale",
    "laplace_tail_bound",
    "noise_share",
    "release",
    "shifted_truncated_laplace",
    "suppressed",
    "truncated_delta",
    "truncated_laplace_interval",
    "truncation_shift",
]

DEFAULT_CONFIDENCE: Final = Fraction(95, 100)
# Scales beyond this are a mistake (noise larger than any 64-bit figure); refusing bounds the
# bignum work a bad parameter can cause.
_MAX_SCALE: Final = Fraction(2**64)
_DECIMAL_DIGITS: Final = 60
# delta of the DP PSI-CA release (truncated noise): 2^-30 ~ 9.3e-10, below 1/n for sets under
# 10^9 rows. The usual rule asks delta << 1/n, so a much larger register deserves a smaller
# delta (truncation_shift takes one; every party must then use the same).
PSI_DELTA: Final = Fraction(1, 2**30)
# Largest truncation shift: a node adds up to 4 * shift dummy keys (two X25519 multiplications
# each), so 10^6 caps the overhead at about 8 * 10^6 multiplications per node (~5 core-minutes
# here). PSI_DELTA reaches it at epsilon ~ 2.08e-5, far below any budget a grant would allow.
MAX_PSI_SHIFT: Final = 10**6
# ln bounds from the atanh series: 40 terms bound ln 2 within 2 * 3^-81 < 2^-127; doubled until
# the shift is decided, up to 2^12 terms (width below 2^-12000). In practice the first step
# decides: ln(1/delta)/epsilon would have to lie within ~2^-120 of an integer.
_LN_FIRST_TERMS: Final = 40
_LN_MAX_TERMS: Final = 2**12

T = TypeVar("T")


def _rng(rng: random.Random | None) -> random.Random:
    return rng if rng is not None else secrets.SystemRandom()


def _fraction(value: Fraction | int, name: str) -> Fraction:
    # Floats are refused on purpose: a float parameter is already inexact.
    if isinstance(value, bool) or not isinstance(value, Fraction | int):
        raise TypeError(f"{name} must be a Fraction or an int, not {type(value).__name__}")
    return Fraction(value)


def bernoulli(p: Fraction, rng: random.Random | None = None) -> bool:
    """Exact Bernoulli(p) for rational ``p`` in [0, 1]: ``randrange(denominator) < numerator``."""
    p = _fraction(p, "p")
    if not 0 <= p <= 1:
        raise MalformedInput("p must be in [0, 1]", field="p")
    return _rng(rng).randrange(p.denominator) < p.numerator


def _bernoulli_exp_at_most_one(gamma: Fraction, rng: random.Random) -> bool:
    # CKS20 Algorithm 1, gamma in [0, 1]: the number of successive successes of
    # Bernoulli(gamma / k) is odd with probability exp(-gamma).
    k = 1
    while True:
        p = gamma / k
        if rng.randrange(p.denominator) >= p.numerator:
            return k % 2 == 1
        k += 1


def bernoulli_exp(gamma: Fraction, rng: random.Random | None = None) -> bool:
    """Exact Bernoulli(exp(-gamma)) for rational ``gamma >= 0`` (CKS20 Algorithm 1)."""
    gamma = _fraction(gamma, "gamma")
    if gamma < 0:
        raise MalformedInput("gamma must be >= 0", field="gamma")
    source = _rng(rng)
    whole = math.floor(gamma)
    for _ in range(whole):
        if not _bernoulli_exp_at_most_one(Fraction(1), source):
            return False
    return _bernoulli_exp_at_most_one(gamma - whole, source)


def _check_scale(scale: Fraction | int) -> Fraction:
    scale = _fraction(scale, "scale")
    if not 0 < scale <= _MAX_SCALE:
        raise MalformedInput(f"scale must be in (0, {_MAX_SCALE}]", field="scale")
    return scale


def _discrete_laplace(scale: Fraction, rng: random.Random) -> int:
    # CKS20 Algorithm 2 with scale = t / s.
    t, s = scale.numerator, scale.denominator
    while True:
        u = rng.randrange(t)
        if not bernoulli_exp(Fraction(u, t), rng):
            continue
        v = 0
        while bernoulli_exp(Fraction(1), rng):
            v += 1
        y = (u + t * v) // s
        negative = rng.randrange(2) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def discrete_laplace(scale: Fraction | int, rng: random.Random | None = None) -> int:
    """One exact sample with ``P[Z = z]`` proportional to ``exp(-|z| / scale)``.

    Args:
        scale: positive rational, e.g. ``laplace_scale(epsilon=Fraction(1, 2))``.
        rng: random source; ``secrets.SystemRandom()`` when None.
    """
    return _discrete_laplace(_check_scale(scale), _rng(rng))


def discrete_laplace_vector(
    scale: Fraction | int, length: int, rng: random.Random | None = None
) -> list[int]:
    """``length`` independent :func:`discrete_laplace` samples."""
    checked = _check_scale(scale)
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise TypeError("length must be a non-negative int")
    source = _rng(rng)
    return [_discrete_laplace(checked, source) for _ in range(length)]


def discrete_gaussian(sigma2: Fraction | int, rng: random.Random | None = None) -> int:
    """One exact sample with ``P[Z = z]`` proportional to ``exp(-z^2 / (2 sigma2))`` (CKS20
    Algorithm 3).

    Args:
        sigma2: the variance parameter ``sigma^2``, a positive rational.
    """
    sigma2 = _fraction(sigma2, "sigma2")
    if not 0 < sigma2 <= _MAX_SCALE**2:
        raise MalformedInput("sigma2 out of range", field="sigma2")
    source = _rng(rng)
    # floor(sqrt(a/b)) == isqrt(floor(a/b)) for a, b > 0.
    t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1
    while True:
        y = _discrete_laplace(Fraction(t), source)
        gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
        if bernoulli_exp(gamma, source):
            return y


def laplace_scale(*, epsilon: Fraction | int, sensitivity: int = 1) -> Fraction:
    """Scale ``sensitivity / epsilon`` for an ``epsilon``-DP discrete Laplace mechanism."""
    eps = _fraction(epsilon, "epsilon")
    if eps <= 0:
        raise MalformedInput("epsilon must be > 0", field="epsilon")
    if not isinstance(sensitivity, int) or isinstance(sensitivity, bool) or sensitivity < 1:
        raise MalformedInput("sensitivity must be a positive int", field="sensitivity")
    return _check_scale(Fraction(sensitivity) / eps)


def designated_node(nodes: Sequence[str]) -> str:
    """The node that adds the whole noise: the first name in UTF-8 byte order.

    A fixed public rule, so every node and the auditor agree on it without a message.
    """
    if not nodes or len(set(nodes)) != len(nodes):
        raise MalformedInput("need distinct node names", field="nodes")
    return min(nodes, key=lambda name: name.encode("utf-8"))


def noise_share(
    scale: Fraction | int,
    length: int,
    *,
    node: str,
    designated: str,
    rng: random.Random | None = None,
) -> list[int]:
    """This node's noise share: full discrete Laplace noise if it is ``designated``, else zeros.

    The sum of all shares is therefore exactly discrete Laplace of ``scale`` per element.
    """
    checked = _check_scale(scale)
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise TypeError("length must be a non-negative int")
    if node != designated:
        return [0] * length
    return discrete_laplace_vector(checked, length, rng)


# -- intervals --------------------------------------------------------------------------------


def _tail_probability(q: decimal.Decimal, k: int) -> decimal.Decimal:
    # P(|Z| > k) = 2 q^(k+1) / (1 + q) for P[Z = z] = (1-q)/(1+q) q^|z|.
    return 2 * q ** (k + 1) / (1 + q)


def laplace_interval(scale: Fraction | int, confidence: Fraction = DEFAULT_CONFIDENCE) -> int:
    """The least ``k >= 0`` with ``P(|Z| <= k) >= confidence`` for discrete Laplace ``Z``.

    The noise lies in ``[-k, k]`` with at least that probability (default 95%). Computed in
    60-digit decimal arithmetic and checked at ``k`` and ``k - 1``; it is a reporting figure,
    the sampler never uses it.
    """
    checked = _check_scale(scale)
    conf = _fraction(confidence, "confidence")
    if not 0 < conf < 1:
        raise MalformedInput("confidence must be in (0, 1)", field="confidence")
    with decimal.localcontext() as ctx:
        ctx.prec = _DECIMAL_DIGITS
        q = (-decimal.Decimal(checked.denominator) / decimal.Decimal(checked.numerator)).exp()
        if q == 0:  # scale so small that P(Z = 0) rounds to 1
            return 0
        alpha = decimal.Decimal(conf.denominator - conf.numerator) / conf.denominator
        # 2 q^(k+1) / (1+q) <= alpha  <=>  k + 1 >= ln(alpha (1+q) / 2) / ln q
        ratio = (alpha * (1 + q) / 2).ln() / q.ln()
        k = max(0, math.ceil(ratio) - 1)
        while _tail_probability(q, k) > alpha:
            k += 1
        while k > 0 and _tail_probability(q, k - 1) <= alpha:
            k -= 1
        return k


def laplace_tail_bound(scale: Fraction | int, *, failure_bits: int = 64) -> int:
    """A bound ``B`` with ``P(|Z| > B) <= 2^-failure_bits``, e.g. a packing ``noise_bound``."""
    if not isinstance(failure_bits, int) or not 1 <= failure_bits <= 256:
        raise TypeError("failure_bits must be an int in [1, 256]")
    return laplace_interval(scale, 1 - Fraction(1, 2**failure_bits))


# -- suppression ------------------------------------------------------------------------------


def suppressed(noisy_count: int, k: int) -> bool:
    """True when a figure must be withheld: its noisy count is below ``k``."""
    if not isinstance(noisy_count, int) or isinstance(noisy_count, bool):
        raise TypeError("noisy_count must be an int")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MalformedInput("k must be a positive int", field="k")
    return noisy_count < k


def release(value: T, noisy_count: int, k: int) -> T | None:
    """``value`` if its group's noisy count reaches ``k``, else None (suppressed)."""
    return None if suppressed(noisy_count, k) else value


# -- shifted, truncated discrete Laplace (DP PSI-CA) --------------------------------------------


def _atanh_bounds(y: Fraction, terms: int) -> tuple[Fraction, Fraction]:
    # atanh(y) = sum_{n>=0} y^(2n+1) / (2n+1) for 0 <= y < 1; every term is positive and the
    # tail after `terms` terms is at most y^(2 terms + 1) / ((2 terms + 1) (1 - y^2)).
    total = Fraction(0)
    power = y
    y2 = y * y
    for n in range(terms):
        total += power / (2 * n + 1)
        power *= y2
    return total, total + power / ((2 * terms + 1) * (1 - y2))


@functools.lru_cache(maxsize=64)
def _ln_bounds(x: Fraction, terms: int) -> tuple[Fraction, Fraction]:
    """Rational ``lo <= ln(x) <= hi`` for rational ``x >= 1``.

    ``x = 2^k m`` with ``1 <= m < 2``; ``ln x = 2k atanh(1/3) + 2 atanh((m-1)/(m+1))``
    (``ln 2 = 2 atanh(1/3)``), each series bounded as in :func:`_atanh_bounds`.
    """
    k = x.numerator.bit_length() - x.denominator.bit_length()
    if x < Fraction(2) ** k:
        k -= 1
    m = x / Fraction(2) ** k
    ln2_lo, ln2_hi = _atanh_bounds(Fraction(1, 3), terms)
    m_lo, m_hi = _atanh_bounds((m - 1) / (m + 1), terms)
    return 2 * (k * ln2_lo + m_lo), 2 * (k * ln2_hi + m_hi)


def _positive_epsilon(epsilon: Fraction | int) -> Fraction:
    eps = _fraction(epsilon, "epsilon")
    if eps <= 0:
        raise MalformedInput("epsilon must be > 0", field="epsilon")
    return eps


def truncation_shift(epsilon: Fraction | int, delta: Fraction = PSI_DELTA) -> int:
    """The least integer ``t`` with ``exp(-epsilon * t) <= delta``: ``ceil(ln(1/delta) / epsilon)``.

    Decided exactly, never in floating point, so that the analyst and both nodes always agree:
    ``ln(1/delta)`` is enclosed in rational bounds (:func:`_ln_bounds`; for the default delta,
    ``30 ln 2`` within ``2^-128``) that are tightened until both give the same ceiling.
    ``ln(1/delta) / epsilon`` is never an integer (``ln`` of a rational other than 1 is
    transcendental, Hermite-Lindemann), so the refinement ends; an epsilon whose fraction is so
    long that 2^12 series terms cannot decide it is refused.

    The truncated mechanism's true delta, :func:`truncated_delta`, is then below ``delta``.

    Raises:
        TypeError: a float (or other non-rational) epsilon or delta.
        MalformedInput: ``epsilon <= 0``; ``delta`` outside ``(0, 1/2]``; or the shift would
            exceed :data:`MAX_PSI_SHIFT` (epsilon too small).
    """
    eps = _positive_epsilon(epsilon)
    target = _fraction(delta, "delta")
    if not 0 < target <= Fraction(1, 2):
        raise MalformedInput("delta must be in (0, 1/2]", field="delta")
    terms = _LN_FIRST_TERMS
    while True:
        lo, hi = _ln_bounds(1 / target, terms)
        shift = math.ceil(lo / eps)
        if shift > MAX_PSI_SHIFT:
            raise MalformedInput(
                f"epsilon {eps} needs a truncation shift above {MAX_PSI_SHIFT}", field="epsilon"
            )
        if math.ceil(hi / eps) == shift:
            return shift
        terms *= 2
        if terms > _LN_MAX_TERMS:
            raise MalformedInput(
                "epsilon's fraction is too long to decide its truncation shift", field="epsilon"
            )


def _check_shift(eps: Fraction, shift: int) -> int:
    if not isinstance(shift, int) or isinstance(shift, bool):
        raise TypeError("shift must be an int")
    if not 1 <= shift <= MAX_PSI_SHIFT:
        raise MalformedInput(f"shift must be in [1, {MAX_PSI_SHIFT}]", field="shift")
    # 2 epsilon shift >= 1 keeps the rejection sampler's acceptance probability above
    # 1 - e^(-1/2) > 0.39; every truncation_shift (delta <= 1/2) satisfies it.
    if 2 * eps * shift < 1:
        raise MalformedInput("shift must be at least half the scale 1/epsilon", field="shift")
    return shift


def shifted_truncated_laplace(
    epsilon: Fraction | int, shift: int, rng: random.Random | None = None
) -> int:
    """``shift + Z``: ``Z`` discrete Laplace of scale ``1/epsilon`` conditioned on
    ``|Z| <= shift``, so the result lies in ``[0, 2 * shift]``.

    Exact: draws of :func:`discrete_laplace` outside ``[-shift, shift]`` are rejected and
    redrawn (with ``shift = truncation_shift(epsilon)`` a rejection has probability below
    ``2 * PSI_DELTA``). Adding it to a count of sensitivity 1 is
    ``(epsilon, truncated_delta(epsilon, shift))``-DP.

    Args:
        epsilon: positive rational; the scale is ``1/epsilon`` (sensitivity 1).
        shift: normally :func:`truncation_shift` of ``epsilon``; at least ``1/(2 epsilon)``.
        rng: random source; ``secrets.SystemRandom()`` when None.

    Raises:
        TypeError: a float epsilon or a non-int shift.
        MalformedInput: ``epsilon <= 0``, or ``shift`` out of range.
    """
    eps = _positive_epsilon(epsilon)
    checked = _check_shift(eps, shift)
    scale = _check_scale(1 / eps)
    source = _rng(rng)
    while True:
        z = _discrete_laplace(scale, source)
        if -checked <= z <= checked:
            return checked + z


def _exp_minus(eps: Fraction) -> decimal.Decimal:
    return (-decimal.Decimal(eps.numerator) / decimal.Decimal(eps.denominator)).exp()


def truncated_delta(epsilon: Fraction | int, shift: int) -> float:
    """The exact delta of the shifted truncated mechanism, ``P(Z = shift)`` under truncation:
    ``q^t (1 - q) / (1 + q - 2 q^(t+1))`` with ``q = e^-epsilon``, ``t = shift``.

    A reporting figure (60-digit decimal, returned as a float); the sampler never uses it.
    Always below ``q^t``, hence below ``delta`` for ``shift = truncation_shift(epsilon, delta)``.
    """
    eps = _positive_epsilon(epsilon)
    t = _check_shift(eps, shift)
    with decimal.localcontext() as ctx:
        ctx.prec = _DECIMAL_DIGITS
        q = _exp_minus(eps)
        return float(q**t * (1 - q) / (1 + q - 2 * q ** (t + 1)))


def truncated_laplace_interval(
    epsilon: Fraction | int, shift: int, confidence: Fraction = DEFAULT_CONFIDENCE
) -> int:
    """The least ``h`` in ``[0, shift]`` with ``P(|Z| <= h) >= confidence`` for the truncated
    noise ``Z`` of :func:`shifted_truncated_laplace` (``d - shift``).

    The analyst's interval for a noisy count ``c = x + d`` is ``x`` in
    ``[c - shift - h, c - shift + h]`` with at least that probability (default 95%), inside the
    hard bounds ``[c - 2 shift, c]``. Computed like :func:`laplace_interval` in 60-digit decimal
    and checked at ``h`` and ``h - 1``; capped at ``shift``, where the probability is 1.
    """
    eps = _positive_epsilon(epsilon)
    t = _check_shift(eps, shift)
    conf = _fraction(confidence, "confidence")
    if not 0 < conf < 1:
        raise MalformedInput("confidence must be in (0, 1)", field="confidence")
    with decimal.localcontext() as ctx:
        ctx.prec = _DECIMAL_DIGITS
        q = _exp_minus(eps)
        if q == 0:  # epsilon so large that P(Z = 0) rounds to 1
            return 0
        alpha = decimal.Decimal(conf.denominator - conf.numerator) / conf.denominator
        beyond_shift = _tail_probability(q, t)

        def tail(h: int) -> decimal.Decimal:
            # P(|Z| > h | |Z| <= t) for the untruncated tail P(|Z| > k) = 2 q^(k+1) / (1+q).
            return (_tail_probability(q, h) - beyond_shift) / (1 - beyond_shift)

        # Truncation only shrinks the tails, so the untruncated interval (or t, where the tail
        # is 0) is an upper end; bisect for the least h with tail(h) <= alpha (tail decreases).
        low, high = 0, min(t, laplace_interval(1 / eps, conf))
        while low < high:
            middle = (low + high) // 2
            if tail(middle) <= alpha:
                high = middle
            else:
                low = middle + 1
        return high
