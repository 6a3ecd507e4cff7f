"""SIMD-packed BFV sums (govshare.protocols.bfv_simd): exact CRT sums, the noise flooding
against a distinguisher holding the secret key, and refusals of bad keys and ciphertexts."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable
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


def _load(keys: SimdSecretKeys, data: bytes, index: int = 0) -> Any:
    modulus = keys.unsafe_modulus(index)
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


def _distinguish(
    keys: SimdSecretKeys,
    evaluate: Callable[..., bytes],
    inputs: dict[str, Any],
    want: list[int],
    shape: SimdShape,
) -> None:
    """The distinguishing experiment on two candidate inputs "A" and "B" with the same totals
    ``want``: ``evaluate(input, flood=...)`` is the one-ciphertext result of one of them.
    Unflooded (the control) the key holder names the input every time by the residual noise
    budget; flooded, both residuals are the flooding noise itself, alike and of its size."""
    unflooded = {name: evaluate(x, flood=False) for name, x in inputs.items()}
    assert keys.decrypt([unflooded["A"]]) == keys.decrypt([unflooded["B"]]) == want
    # The control: the unflooded ciphertexts differ, and the distinguisher always wins.
    assert unflooded["A"] != unflooded["B"]
    for secret_input in ("A", "B"):  # deterministic: once each is enough
        seen = evaluate(inputs[secret_input], flood=False)
        budgets = {name: _residual_budget(keys, seen, u) for name, u in unflooded.items()}
        assert max(budgets, key=lambda name: budgets[name]) == secret_input
        assert abs(budgets["A"] - budgets["B"]) > 10
    # Flooded: each residual is the flooding noise itself, the same size whichever input.
    q = math.prod(bfv_simd._data_primes())
    _, flood = bfv_simd.noise_bounds(1, len(shape.fold_steps) + 1)
    expected = math.log2(q / (2 * (1 << bfv_simd.PLAIN_BITS) * flood))
    for secret_input in ("A", "B", "B", "A"):
        seen = evaluate(inputs[secret_input], flood=True)
        assert keys.decrypt([seen]) == want
        budgets = {name: _residual_budget(keys, seen, u) for name, u in unflooded.items()}
        assert budgets["A"] == budgets["B"]
        assert abs(budgets["A"] - expected) <= 2


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

    _distinguish(keys, evaluate, inputs, [6, sum(500 + i for i in range(6))], SHAPE)


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


# --- sums at the value holder: M's encrypted selection bits times V's plaintext values ---------

SELECTION_CELLS = 33  # block 4, 9 groups of 4: cells 33-35 are padding
SELECTION_BOUND = 1 << 20
SELECTION_KEYS = 5000  # three selection ciphertexts of 2,048 keys
SELECTION = bfv_simd.selection_shape(
    SELECTION_CELLS, bfv_simd.moduli_for(SELECTION_KEYS * SELECTION_BOUND + 10**6)
)
BITS = bfv_simd.selection_shape(1, 1)  # one cell: the cheapest fold, for the distinguishers


@pytest.fixture(scope="module")
def selection_keys() -> SimdSecretKeys:
    return SimdSecretKeys(SELECTION)


@pytest.fixture(scope="module")
def selection_public(selection_keys: SimdSecretKeys) -> SimdPublic:
    return SimdPublic.from_bundle(SELECTION, selection_keys.public_bundle())


@pytest.fixture(scope="module")
def bit_keys() -> SimdSecretKeys:
    return SimdSecretKeys(BITS)


@pytest.fixture(scope="module")
def bit_public(bit_keys: SimdSecretKeys) -> SimdPublic:
    return SimdPublic.from_bundle(BITS, bit_keys.public_bundle())


@pytest.mark.parametrize(
    ("cells", "block", "groups"),
    [
        (1, 1, 1),
        (2, 1, 2),
        (16, 1, 16),
        (17, 2, 9),
        (32, 2, 16),
        (33, 4, 9),
        (100, 8, 13),
        (bfv_simd.SLOTS // 2, 256, 16),
    ],
)
def test_selection_shape_takes_the_least_block_leaving_at_most_max_groups(
    cells: int, block: int, groups: int
) -> None:
    shape = bfv_simd.selection_shape(cells, 3)
    assert (shape.cells, shape.block, shape.groups, shape.moduli) == (block, block, groups, 3)
    assert shape.keys_per_ciphertext == bfv_simd.SLOTS // block
    assert block * groups >= cells > (block // 2) * bfv_simd.MAX_GROUPS  # least such block
    # The fold starts from the block: its first rotation moves one key's block onto the next.
    assert shape.fold_steps[0] == block
    assert shape.galois_elements[0] == pow(3, block, 2 * bfv_simd.POLY_DEGREE)
    assert shape.galois_elements[-1] == 2 * bfv_simd.POLY_DEGREE - 1  # the column swap
    assert len(shape.galois_elements) == math.log2(bfv_simd.SLOTS // 2 // block) + 1


@pytest.mark.parametrize("cells", [0, -1, bfv_simd.SLOTS // 2 + 1])
def test_selection_shape_refuses_cell_counts_out_of_range(cells: int) -> None:
    with pytest.raises(MalformedInput, match="cells per key"):
        bfv_simd.selection_shape(cells, 1)


def test_value_slots_put_each_keys_cells_in_its_block_of_each_group() -> None:
    shape = bfv_simd.selection_shape(SELECTION_CELLS, 1)
    block, groups, per = shape.block, shape.groups, shape.keys_per_ciphertext
    rows = [[(-1) ** c * (1000 * r + c + 1) for c in range(SELECTION_CELLS)] for r in range(3)]
    planes = bfv_simd.value_slots(shape, rows).tolist()
    assert len(planes) == groups and all(len(p) == bfv_simd.SLOTS for p in planes)
    for h, plane in enumerate(planes):
        want = [0] * bfv_simd.SLOTS
        for r, row in enumerate(rows):
            for j in range(block):
                cell = h * block + j
                want[r * block + j] = row[cell] if cell < SELECTION_CELLS else 0
        assert plane == want, h
    assert planes[-1][1:block] == [0] * (block - 1)  # key 0's padding cells 33-35
    assert planes[-1][0] == rows[0][32]
    # Block 1: key r's cell h at slot r of group h's plaintext; a short row ends in zeros.
    narrow = bfv_simd.selection_shape(5, 1)
    planes = bfv_simd.value_slots(narrow, [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]).tolist()
    assert [p[:3] for p in planes] == [[1, 6, 0], [2, 7, 0], [3, 8, 0], [4, 9, 0], [5, 10, 0]]
    assert [p[0] for p in bfv_simd.value_slots(narrow, [[7, 8]]).tolist()] == [7, 8, 0, 0, 0]
    assert bfv_simd.value_slots(narrow, []).tolist() == [[0] * bfv_simd.SLOTS] * 5
    with pytest.raises(TypeError, match="more keys"):
        bfv_simd.value_slots(shape, [[1] * SELECTION_CELLS] * (per + 1))
    with pytest.raises(TypeError, match="values a key"):
        bfv_simd.value_slots(shape, [[1] * (groups * block + 1)])


def _slots(keys: SimdSecretKeys, index: int, data: bytes) -> list[int]:
    """The raw slots of a ciphertext of modulus ``index`` (no fold check)."""
    modulus = keys.unsafe_modulus(index)
    plaintext = seal.Plaintext()
    decryptor = seal.Decryptor(modulus.context, keys.unsafe_secret_key(index))
    decryptor.decrypt(_load(keys, data, index), plaintext)
    return list(modulus.encoder.decode_uint64(plaintext))


def test_encrypted_selection_repeats_each_bit_over_its_keys_block(
    selection_keys: SimdSecretKeys, selection_public: SimdPublic
) -> None:
    block = SELECTION.block
    ciphertexts = selection_public.encrypt_selection([True, False, True])
    assert len(ciphertexts) == SELECTION.moduli
    for index, data in enumerate(ciphertexts):
        slots = _slots(selection_keys, index, data)
        assert slots[: 4 * block] == [1] * block + [0] * block + [1] * block + [0] * block
        assert not any(slots[3 * block :])
        # Each loads under its own modulus, and under no other.
        loaded = selection_public.load_ciphertext(index, data)
        assert list(loaded.parms_id()) == list(
            selection_keys.unsafe_modulus(index).context.first_parms_id()
        )
        with pytest.raises(MalformedInput, match="parameters"):
            selection_public.load_ciphertext((index + 1) % SELECTION.moduli, data)
    with pytest.raises(TypeError, match="more keys"):
        selection_public.encrypt_selection([True] * (SELECTION.keys_per_ciphertext + 1))


@pytest.mark.parametrize(("keys", "noisy"), [(3, True), (SELECTION_KEYS, False)])
def test_sums_at_the_value_holder_are_exact_across_crt_moduli(
    selection_keys: SimdSecretKeys, selection_public: SimdPublic, keys: int, noisy: bool
) -> None:
    """M encrypts its selection bits, V multiplies them by its values' plaintexts and sums;
    the analyst's totals equal plain Python's, beyond one plaintext modulus, and the padding
    cells are 0. Noisy: the DP noise shows up exactly, and noise put in a padding cell makes
    the analyst refuse the result (one result serves both: each costs 18 folds)."""
    assert SELECTION.moduli >= 2
    rng = random.Random(keys)
    n, bound = SELECTION_CELLS, SELECTION_BOUND
    rows = [
        [1] + [rng.randrange(-bound, bound) for _ in range(n - 2)] + [rng.randrange(bound)]
        for _ in range(keys)
    ]
    selected = [rng.random() < 0.5 for _ in range(keys)]
    selected[:2] = [True, False]
    total = selection_public.accumulator()
    per = SELECTION.keys_per_ciphertext
    for start in range(0, keys, per):
        items = selection_public.encrypt_selection(selected[start : start + per])  # at M
        if start == 0:  # loaded as V's transport checks them; the rest as bytes
            items = [selection_public.load_ciphertext(i, c) for i, c in enumerate(items)]
        total.add_values(items, bfv_simd.value_slots(SELECTION, rows[start : start + per]))
    assert total.ciphertexts == -(-keys // per)
    noise = [(-1) ** c * (1000 * c + 7) if noisy else 0 for c in range(n)]
    padding = [5 if noisy else 0, 0, 0]  # cells 33-35
    assert len(noise + padding) == SELECTION.groups * SELECTION.block
    result = total.result(noise + padding)
    assert len(result) == SELECTION.groups * SELECTION.moduli
    want = [
        sum(row[c] for row, s in zip(rows, selected, strict=True) if s) + noise[c] for c in range(n)
    ]
    assert selection_keys.decrypt(result) == want + padding
    if noisy:
        with pytest.raises(MalformedInput, match="padding"):
            selection_keys.decrypt(result, cells=n)
    else:
        assert selection_keys.decrypt(result, cells=n) == want
        t = min(SELECTION.plain_moduli)
        assert max(want) >= t and min(want) < 0  # one modulus alone would have wrapped
        assert want[0] == sum(selected)


def _at_value_holder(
    public: SimdPublic, selection: list[Any], rows: list[list[int]], *, flood: bool
) -> bytes:
    """V's one-cell result for one encrypted selection of M's (BITS: one ciphertext)."""
    total = public.accumulator()
    total.add_values(selection, bfv_simd.value_slots(BITS, rows))
    (out,) = total.result([0], unsafe_without_flooding=not flood)
    return out


def test_flooding_hides_an_unselected_value_at_the_value_holder(
    bit_keys: SimdSecretKeys, bit_public: SimdPublic
) -> None:
    """Two value-holder inputs differing only in an unselected key's value, under the same
    encrypted selection: the key holder tells them apart without the flooding, not with it."""
    selection = bit_public.encrypt_selection([True] * 6 + [False] * 2)  # M's, sent once
    base = [[500 + i] for i in range(8)]
    changed = [row[:] for row in base]
    changed[7] = [(1 << 23) + 12345]  # the unselected key

    def evaluate(rows: list[list[int]], *, flood: bool) -> bytes:
        return _at_value_holder(bit_public, selection, rows, flood=flood)

    want = [sum(500 + i for i in range(6))]
    _distinguish(bit_keys, evaluate, {"A": base, "B": changed}, want, BITS)


def test_flooding_hides_which_keys_the_matcher_selected_at_the_value_holder(
    bit_keys: SimdSecretKeys, bit_public: SimdPublic
) -> None:
    """Two selections of the matcher with the same total (two keys of equal value, the
    selection swapped between them): distinguishable unflooded, alike flooded."""
    rows = [[7], [7], [(1 << 21) + 99], [12345]]
    selections = {
        "A": bit_public.encrypt_selection([True, False, True, False]),
        "B": bit_public.encrypt_selection([False, True, True, False]),
    }

    def evaluate(selection: list[bytes], *, flood: bool) -> bytes:
        return _at_value_holder(bit_public, selection, rows, flood=flood)

    _distinguish(bit_keys, evaluate, selections, [7 + (1 << 21) + 99], BITS)


def test_sums_at_the_value_holder_refuse_bad_input(
    selection_keys: SimdSecretKeys, selection_public: SimdPublic
) -> None:
    """V refuses plaintexts of the wrong shape (TypeError: its own bug) and M's selection
    ciphertexts that are not fresh encryptions under the query's parameters, in modulus order
    (MalformedInput, as the node reports them)."""
    n = SELECTION_CELLS
    selection = selection_public.encrypt_selection([True, True])
    slots = bfv_simd.value_slots(SELECTION, [[1] * n, [2] * n])
    # V's own plaintexts: one of SLOTS values per group, checked before anything is counted.
    total = selection_public.accumulator()
    with pytest.raises(TypeError, match="per group"):
        total.add_values(selection, slots[:-1])
    with pytest.raises(TypeError, match="per group"):
        total.add_values(selection, [*slots, slots[0]])
    with pytest.raises(TypeError, match="per group"):
        total.add_values(selection, [s[:-1] for s in slots])
    assert total.ciphertexts == 0
    # M's ciphertexts: the wrong count, out of modulus order, tampered, truncated, transparent,
    # or under a plaintext modulus of another parameter set.
    with pytest.raises(MalformedInput, match="per plaintext modulus"):
        total.add_values(selection[:1], slots)
    with pytest.raises(MalformedInput, match="parameters"):
        total.add_values(selection[::-1], slots)
    for at in (0, 3, 9):
        tampered = bytearray(selection[1])
        tampered[at] ^= 0x55
        with pytest.raises(MalformedInput, match="parameters"):
            selection_public.load_ciphertext(1, bytes(tampered))
        with pytest.raises(MalformedInput, match="parameters"):
            total.add_values([selection[0], bytes(tampered)], slots)
    with pytest.raises(MalformedInput, match="parameters"):
        selection_public.load_ciphertext(0, selection[0][:-10])
    transparent = bfv_simd._transparent(
        selection_keys.unsafe_modulus(1), [5] * bfv_simd.POLY_DEGREE
    )
    with pytest.raises(MalformedInput, match="fresh"):
        selection_public.load_ciphertext(1, transparent)
    (t,) = [t for t in SimdShape(1, 3).plain_moduli if t not in SELECTION.plain_moduli]
    foreign = bfv_simd._Modulus(t)
    keygen = seal.KeyGenerator(foreign.context)
    public_key = seal.PublicKey()
    keygen.create_public_key(public_key)
    ciphertext = seal.Ciphertext(foreign.context)
    seal.Encryptor(foreign.context, public_key).encrypt(foreign.encode([1] * 8), ciphertext)
    alien = bfv_simd._Files().dump(ciphertext)
    assert alien[:2] == selection[0][:2]  # a SEAL ciphertext, only its parameters differ
    with pytest.raises(MalformedInput, match="parameters"):
        selection_public.load_ciphertext(0, alien)
    with pytest.raises(MalformedInput, match="parameters"):
        total.add_values([alien, selection[1]], slots)


def test_sums_at_the_value_holder_stop_at_the_noise_budget(
    bit_keys: SimdSecretKeys, bit_public: SimdPublic
) -> None:
    """One bit a key: the longest fold (13 steps) and the smallest budget of ciphertexts, still
    eight million keys; a sum of that many decrypts exactly under the widest flooding, and one
    more ciphertext is refused. (Zero plaintexts add no product: counting them is cheap.)"""
    steps = len(BITS.fold_steps) + 1
    limit = bfv_simd.max_ciphertexts(steps)
    assert limit * BITS.keys_per_ciphertext >= 8_000_000
    q, t = math.prod(bfv_simd._data_primes()), 1 << bfv_simd.PLAIN_BITS
    e0 = bfv_simd.FRESH_ERROR_BOUND * (2 * bfv_simd.POLY_DEGREE + 1)
    e3, flood = bfv_simd.noise_bounds(limit, steps)
    assert 4 * t * (e3 + flood + e0) < q
    e3, flood = bfv_simd.noise_bounds(limit + 1, steps)
    assert 4 * t * (e3 + flood + e0) >= q
    selection = bit_public.encrypt_selection([True, False])
    loaded = [bit_public.load_ciphertext(i, c) for i, c in enumerate(selection)]
    values = bfv_simd.value_slots(BITS, [[3], [4]])
    zeros = bfv_simd.value_slots(BITS, [])
    for refuse_one_more in (False, True):
        total = bit_public.accumulator()
        total.add_values(loaded, values)
        for _ in range(limit - 1):
            total.add_values(loaded, zeros)
        assert total.ciphertexts == limit
        if refuse_one_more:
            with pytest.raises(MalformedInput, match="noise budget"):
                total.add_values(loaded, zeros)
        else:
            result = total.result([0])  # flooded as for `limit` ciphertexts
            assert bit_keys.decrypt(result) == [3]
            assert bit_keys.unsafe_noise_budgets(result)[0] > 0
