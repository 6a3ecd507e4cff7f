"""Generate the DP PSI-CA known answers into this folder (or the folder given).

    .venv/bin/python tests/vectors/dp_psi/generate.py [OUTPUT_DIR]

Independent of ``govshare.protocols.dp``: this script imports nothing from govshare and
computes every answer straight from its definition in 100-digit decimal arithmetic (the
library uses rational series bounds and closed forms instead).
``tests/protocols/test_dp_psi.py`` re-runs it into a temporary folder and requires byte-identical
output, then checks the library against the files.

- ``truncation_shift.json``: the least integer ``t`` with ``exp(-epsilon t) <= delta``, i.e.
  ``ceil(ln(1/delta) / epsilon)``; each ratio is at least 10^-40 away from an integer, so the
  100-digit value decides the ceiling. Cases the library must refuse say ``MalformedInput``.
- ``truncated_laplace.json``: for ``Z`` discrete Laplace of scale ``1/epsilon`` conditioned on
  ``|Z| <= shift``, the exact delta ``P(Z = shift)`` (by summing the pmf, not the closed form)
  and the least ``h`` with ``P(|Z| <= h) >= 95/100`` (by accumulating the pmf).
"""

from __future__ import annotations

import decimal
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

DIGITS = 100
MAX_SHIFT = 10**6  # the library's MAX_PSI_SHIFT; a larger shift must be refused
DEFAULT_DELTA = "1/1073741824"  # 2^-30, the library's PSI_DELTA
CONFIDENCE = Fraction(95, 100)

# (epsilon, delta). Boundary pairs: 30 ln 2 / 21 = 0.99021025794277..., so ".943" needs 21 and
# ".942" needs 22; 30 ln 2 / 208 = 0.0999731510423..., likewise. A crude upper bound of ln 2
# (one that is off by more than 10^-12) gets one of each pair wrong.
SHIFT_CASES = [
    ("0.1", DEFAULT_DELTA),
    ("0.5", DEFAULT_DELTA),
    ("1", DEFAULT_DELTA),
    ("2", DEFAULT_DELTA),
    ("0.01", DEFAULT_DELTA),
    ("0.001", DEFAULT_DELTA),
    ("10", DEFAULT_DELTA),
    ("1000", DEFAULT_DELTA),
    ("1/3", DEFAULT_DELTA),
    ("0.990210257943", DEFAULT_DELTA),
    ("0.990210257942", DEFAULT_DELTA),
    ("0.099973151043", DEFAULT_DELTA),
    ("0.099973151042", DEFAULT_DELTA),
    ("0.0000208", DEFAULT_DELTA),
    ("1", "1/1000000000"),
    ("1", "1/1099511627776"),
    ("1", "1/2"),
    ("1", "1/3"),
    ("0.25", "7/1000"),
    # Refused: shift beyond MAX_SHIFT.
    ("0.0000207", DEFAULT_DELTA),
    ("1/100000", DEFAULT_DELTA),
]
# Refused whatever the arithmetic: epsilon <= 0, delta outside (0, 1/2].
INVALID_SHIFT_CASES = [
    ("0", DEFAULT_DELTA, "epsilon_zero"),
    ("-1", DEFAULT_DELTA, "epsilon_negative"),
    ("1", "0", "delta_zero"),
    ("1", "3/4", "delta_above_half"),
    ("1", "1", "delta_one"),
]
# (epsilon, shift): the shifts of truncation_shift, and small shifts where truncation matters.
TRUNCATED_CASES = [
    ("0.1", 208),
    ("0.5", 42),
    ("1", 21),
    ("2", 11),
    ("0.1", 5),
    ("0.1", 20),
    ("0.5", 1),
    ("0.5", 3),
    ("1", 1),
    ("1/3", 7),
]


def _decimal(value: Fraction) -> decimal.Decimal:
    return decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)


def shift_case(epsilon: str, delta: str) -> dict[str, object]:
    ratio = (1 / _decimal(Fraction(delta))).ln() / _decimal(Fraction(epsilon))
    nearest = ratio.to_integral_value()
    if abs(ratio - nearest) < decimal.Decimal(10) ** -40:
        raise SystemExit(f"epsilon {epsilon}: ratio too close to an integer to decide here")
    shift = math.ceil(ratio)
    case: dict[str, object] = {
        "epsilon": epsilon,
        "delta": delta,
        "ln_inverse_delta_over_epsilon": format(ratio, ".20f"),
    }
    if shift > MAX_SHIFT:
        case["expect"] = "MalformedInput"
    else:
        case["expect"] = "ok"
        case["shift"] = shift
    return case


def truncated_case(epsilon: str, shift: int) -> dict[str, object]:
    q = (-_decimal(Fraction(epsilon))).exp()
    pmf = {z: q ** abs(z) for z in range(-shift, shift + 1)}
    total = sum(pmf.values())
    conf = _decimal(CONFIDENCE)
    covered = pmf[0] / total
    h = 0
    while covered < conf:
        h += 1
        covered += 2 * pmf[h] / total
    return {
        "epsilon": epsilon,
        "shift": shift,
        "delta": format(pmf[shift] / total, ".6e"),
        "interval_95": h,
    }


def main(out: Path) -> None:
    decimal.getcontext().prec = DIGITS
    shifts = [shift_case(e, d) for e, d in SHIFT_CASES]
    shifts += [
        {"epsilon": e, "delta": d, "defect": why, "expect": "MalformedInput"}
        for e, d, why in INVALID_SHIFT_CASES
    ]
    truncated = [truncated_case(e, t) for e, t in TRUNCATED_CASES]
    for name, cases in (("truncation_shift", shifts), ("truncated_laplace", truncated)):
        text = json.dumps({"cases": cases}, indent=2, ensure_ascii=False) + "\n"
        (out / f"{name}.json").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
