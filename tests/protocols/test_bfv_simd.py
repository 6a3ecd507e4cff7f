"""SIMD-packed BFV sums (govshare.protocols.bfv_simd): exact CRT sums, the noise flooding
against a distinguisher holding the secret key, and refusals of bad keys and ciphertexts."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections import Counter
from typing import Any

import pytest
import tenseal.sealapi as seal

from govshare.protocols import bfv_simd
from govshare.protocols.bfv_simd import SimdPublic, SimdSecretKeys, SimdShape
from govshare.protocols.errors import MalformedInput

SHAPE = SimdShape(cells=2, moduli=1)


@pytest.fixture(scope="module")
def keys() -> SimdSecretKeys:
    return SimdSecretKeys(SHAPE)


@pytest.fixture(scope="module")
def public(keys: SimdSecretKeys) -> SimdPublic:
    return SimdPublic.from_bundle(SHAPE, keys.public_bundle())


def test_parameters_are_the_he_standards_128_bit_bound_and_batching_primes() -> None:
    assert sum(bfv_simd.COEFF_BITS) == 218  # HE Standard, N = 8192, 128-bit classical
    shape = SimdShape(cells=32, moduli=3)
    assert shape.block == 32 and shape.keys_per_ciphertext == 256
    for t in shape.plain_moduli:
        assert t % (2 * bfv_simd.POLY_DEGREE) == 1 and t < 1 << bfv_simd.PLAIN_BITS
    assert len(set(shape.plain_moduli)) == 3
    # The flooding leaves decryption correct up to the stated count, and not beyond it.
    steps = len(shape.fold_steps) + 1
    limit = bfv_simd.max_ciphertexts(steps)
    assert limit >= 4096  # a 1M-key stream of 32 cells is 3,907 ciphertexts
    q = math.prod(bfv_simd._data_primes())
    e3, flood = bfv_simd.noise_bounds(limit + 1, steps)
    assert 4 * (1 << bfv_simd.PLAIN_BITS) * (e3 + flood) >= q
    assert flood == (1 << bfv_simd.STATISTICAL_BITS) * bfv_simd.POLY_DEGREE * e3


@pytest.mark.parametrize("rows", [1, 300, 9000])
def test_masked_sums_are_exact_across_crt_moduli(rows: int) -> None:
    rng = random.Random(rows)
    bound = 1 << 30  # totals far beyond one 24-bit modulus
    shape = SimdShape(cells=3, moduli=bfv_simd.moduli_for(rows * bound + 1000))
    assert shape.moduli >= 2
    secret = SimdSecretKeys(shape)
    public = SimdPublic.from_bundle(shape, secret.public_bundle())
    values = [[rng.randrange(bound) for _ in range(3)] for _ in range(rows)]
    selected = [rng.random() < 0.5 for _ in range(rows)]
    total = public.accumulator()
    per = shape.keys_per_ciphertext
    for start in range(0, rows, per):
        total.add(public.encrypt_keys(values[start : start + per]), selected[start : start + per])
    noise = [-7, 0, 1000]
    got = secret.decrypt(total.result(noise))
    want = [
        sum(v[c] for v, s in zip(values, selected, strict=True) if s) + noise[c] for c in range(3)
    ]
    assert got == want
    assert max(want) >= shape.plain_moduli[0]  # one modulus alone would have wrapped


def _load(keys: SimdSecretKeys, data: bytes) -> Any:
    modulus = keys.unsafe_modulus(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "c")
        with open(path, "wb") as handle:
            handle.write(data)
        ciphertext = seal.Ciphertext(modulus.context)
        ciphertext.load(modulus.context, path)
    return ciphertext


def _residual_budget(keys: SimdSecretKeys, result: bytes, guess: bytes) -> int:
    """Noise budget of ``result - guess`` (both encrypt the same totals): how far the released
    noise is from what the guessed input gives without flooding; 10^6 for an exact match."""
    modulus = keys.unsafe_modulus(0)
    difference = seal.Ciphertext(modulus.context)
    try:
        modulus.evaluator.sub(_load(keys, result), _load(keys, guess), difference)
    except RuntimeError:  # "result ciphertext is transparent": identical ciphertexts
        return 10**6
    decryptor = seal.Decryptor(modulus.context, keys.unsafe_secret_key(0))
    return int(decryptor.invariant_noise_budget(difference))


def test_flooding_hides_an_unselected_row_from_the_key_holder(
    keys: SimdSecretKeys, public: SimdPublic
) -> None:
    """The analyst holds the secret key and both candidate inputs' ciphertexts (they differ
    only in an unselected row); it sees the matcher's result for one of them and guesses which
    by the noise left after subtracting each candidate's unflooded evaluation. Without the
    flooding (the control) it is right every time; with it the two residuals are alike."""
    selected = [True] * 6 + [False] * 2
    base = [[1, 500 + i] for i in range(8)]
    changed = [row[:] for row in base]
    changed[7] = [1, (1 << 23) + 12345]  # the unselected row
    inputs = {"A": public.encrypt_keys(base), "B": public.encrypt_keys(changed)}

    def evaluate(ciphertexts: list[bytes], *, flood: bool) -> bytes:
        total = public.accumulator()
        total.add(ciphertexts, selected)
        (out,) = total.result([0, 0], unsafe_without_flooding=not flood)
        return out

    unflooded = {name: evaluate(c, flood=False) for name, c in inputs.items()}
    want = [6, sum(500 + i for i in range(6))]
    assert keys.decrypt([unflooded["A"]]) == keys.decrypt([unflooded["B"]]) == want
    # The control: the unflooded ciphertexts differ, and the distinguisher always wins.
    assert unflooded["A"] != unflooded["B"]
    for secret_input in ("A", "B", "B", "A"):
        seen = evaluate(inputs[secret_input], flood=False)
        budgets = {name: _residual_budget(keys, seen, u) for name, u in unflooded.items()}
        assert max(budgets, key=lambda name: budgets[name]) == secret_input
        assert abs(budgets["A"] - budgets["B"]) > 10
    # Flooded: each residual is the flooding noise itself, the same size whichever input.
    q = math.prod(bfv_simd._data_primes())
    _, flood = bfv_simd.noise_bounds(1, len(SHAPE.fold_steps) + 1)
    expected = math.log2(q / (2 * (1 << bfv_simd.PLAIN_BITS) * flood))
    for secret_input in ("A", "B", "A", "B", "B", "A"):
        seen = evaluate(inputs[secret_input], flood=True)
        assert keys.decrypt([seen]) == want
        budgets = {name: _residual_budget(keys, seen, u) for name, u in unflooded.items()}
        assert budgets["A"] == budgets["B"]
        assert abs(budgets["A"] - expected) <= 2


def test_bad_keys_and_ciphertexts_are_refused(keys: SimdSecretKeys, public: SimdPublic) -> None:
    (good,) = public.encrypt_keys([[1, 2]])
    with pytest.raises(MalformedInput):
        public.load_ciphertext(0, good[:-10])  # truncated
    # A flipped bit inside the coefficients that still decodes is a valid ciphertext (integrity
    # is mTLS's); a broken header or size is refused.
    for at in (0, 3, 9):
        tampered = bytearray(good)
        tampered[at] ^= 0x55
        with pytest.raises(MalformedInput):
            public.load_ciphertext(0, bytes(tampered))
    # Other parameters: a ciphertext under another plaintext modulus.
    other = SimdShape(cells=2, moduli=2)
    other_secret = SimdSecretKeys(other)
    foreign = SimdPublic.from_bundle(other, other_secret.public_bundle()).encrypt_keys([[1, 2]])
    with pytest.raises(MalformedInput, match="parameters"):
        public.load_ciphertext(
            0,
            next(
                c
                for c, t in zip(foreign, other.plain_moduli, strict=True)
                if t not in SHAPE.plain_moduli
            ),
        )
    # A transparent ciphertext (no secret-key part) is not a fresh encryption.
    transparent = bfv_simd._transparent(keys.unsafe_modulus(0), [5] * bfv_simd.POLY_DEGREE)
    with pytest.raises(MalformedInput, match="fresh"):
        public.load_ciphertext(0, transparent)
    # Key bundles: another shape's, truncated, or without the fold's Galois keys.
    with pytest.raises(MalformedInput, match="number of moduli"):
        SimdPublic.from_bundle(SHAPE, other_secret.public_bundle())
    with pytest.raises(MalformedInput, match="truncated"):
        SimdPublic.from_bundle(SHAPE, keys.public_bundle()[:-5])
    wide = SimdShape(cells=300, moduli=1)  # block 512: other rotations
    with pytest.raises(MalformedInput, match="Galois"):
        SimdPublic.from_bundle(SimdShape(cells=2, moduli=1), _bundle_for(wide))
    # The analyst refuses a result whose blocks disagree (not a fold of the protocol).
    total = public.accumulator()
    total.add([good], [True])
    unfolded = public.encrypt_keys([[1, 2], [3, 4]])
    with pytest.raises(MalformedInput, match="disagree"):
        keys.decrypt(unfolded)
    assert keys.decrypt(total.result([0, 0])) == [1, 2]


def _bundle_for(shape: SimdShape) -> bytes:
    return SimdSecretKeys(shape).public_bundle()


@pytest.mark.parametrize("rows", [5, 5000])
def test_matcher_groups_sum_apart_and_exact_across_crt_moduli(rows: int) -> None:
    """Groups on the matcher's side: one masked sum per group (its keys' positions), each
    folded with its own noise; the analyst reads the groups' cells in turn."""
    rng = random.Random(rows)
    bound, groups = 1 << 28, 5
    shape = SimdShape(cells=2, moduli=bfv_simd.moduli_for(rows * bound + 1000), groups=groups)
    assert shape.moduli >= 2
    secret = SimdSecretKeys(shape)
    public = SimdPublic.from_bundle(shape, secret.public_bundle())
    values = [[1, rng.randrange(bound)] for _ in range(rows)]
    chosen = [rng.choice([bfv_simd.UNSELECTED, *range(groups - 1)]) for _ in range(rows)]
    total = public.accumulator()
    per = shape.keys_per_ciphertext
    for start in range(0, rows, per):
        total.add(public.encrypt_keys(values[start : start + per]), chosen[start : start + per])
    noise = [g * 10 + c for g in range(groups) for c in range(2)]
    result = total.result(noise)
    assert len(result) == groups * shape.moduli
    got = secret.decrypt(result)
    want = [
        sum(v[c] for v, g in zip(values, chosen, strict=True) if g == group) + noise[group * 2 + c]
        for group in range(groups)
        for c in range(2)
    ]
    assert got == want
    assert want[-2:] == noise[-2:]  # the last group had no key: its noise alone
    with pytest.raises(MalformedInput, match="per matcher group"):
        secret.decrypt(result[:-1])
    with pytest.raises(TypeError, match="group"):
        public.accumulator().add(public.encrypt_keys(values[:1]), [groups])


def test_flooding_hides_which_keys_the_matcher_put_in_which_group() -> None:
    """Two group assignments of the matcher with the same totals per group: unflooded, the
    key holder tells them apart by the noise; flooded, the residuals are alike."""
    shape = SimdShape(cells=1, moduli=1, groups=2)
    secret = SimdSecretKeys(shape)
    public = SimdPublic.from_bundle(shape, secret.public_bundle())
    ciphertexts = public.encrypt_keys([[7], [7], [(1 << 21) + 99], [(1 << 21) + 99]])
    assignments = {"A": [0, 1, 0, 1], "B": [1, 0, 1, 0]}  # per group: 7 + (2^21 + 99) alike

    def evaluate(groups: list[int], *, flood: bool) -> list[bytes]:
        total = public.accumulator()
        total.add(ciphertexts, groups)
        return total.result([0, 0], unsafe_without_flooding=not flood)

    unflooded = {name: evaluate(g, flood=False) for name, g in assignments.items()}
    assert secret.decrypt(unflooded["A"]) == secret.decrypt(unflooded["B"]) == [(1 << 21) + 106] * 2
    assert unflooded["A"] != unflooded["B"]
    keys = secret
    for secret_input in ("A", "B", "B", "A"):
        seen = evaluate(assignments[secret_input], flood=True)[0]
        budgets = {n: _residual_budget(keys, seen, u[0]) for n, u in unflooded.items()}
        assert budgets["A"] == budgets["B"]


def test_flooding_draws_are_uniform_below_their_span() -> None:
    """The flooding's draws (``_uniform_below``, one ``os.urandom`` buffer a round): in range,
    every value of a small span reached about equally, and a wide span's draws spread over it."""
    counts = Counter(bfv_simd._uniform_below(5, 25_000))
    assert set(counts) == set(range(5))
    assert all(4_600 < c < 5_400 for c in counts.values()), counts  # sd ~63
    _, flood = bfv_simd.noise_bounds(3907, 9)
    span = 2 * flood + 1
    wide = bfv_simd._uniform_below(span, 8192)
    assert len(wide) == 8192 and all(0 <= x < span for x in wide)
    assert sum(x < span // 2 for x in wide) in range(3900, 4300)  # sd ~45
    assert len(set(wide)) == 8192
