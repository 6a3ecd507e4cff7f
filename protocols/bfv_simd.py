"""SIMD-packed BFV sums for the intersection aggregate (issue 15; DESIGN.md protocol 2).

The value holder V encrypts its shuffled keys' values in the slots of BFV ciphertexts (Fan and
Vercauteren 2012, via Microsoft SEAL 4 in TenSEAL's ``sealapi``) instead of one Paillier
ciphertext per key; the matcher M, who learns which shuffled positions are in the intersection
exactly as under Paillier, multiplies each ciphertext by a plaintext **selection mask**, adds
the products, **folds** the slots with rotations under the analyst's Galois keys, adds its DP
noise, re-randomises and **floods** the noise before anything leaves it.

**Layout.** A figure cell is one (group, figure) of the plan, so a key carries ``cells`` values
(one-hot over V's groups, as in the Paillier packing). Each key takes a block of ``block``
slots (``cells`` rounded up to a power of two); a ciphertext holds ``N / block`` keys (256 at
N = 8192 and 32 cells). The mask is 1 over a matched key's block, 0 elsewhere. Folding adds the
ciphertext to its rotations by ``block * 2^j`` (``j < log2(N / 2 / block)``) and then to its
column swap, so that every block holds the cell totals; the DP noise is added to every block
alike (an unnoised copy would otherwise be readable in another block).

**The matcher's products** are taken in NTT form (``Evaluator.transform_to_ntt``): each
received ciphertext is transformed once, each mask's plaintext once, and the running sums stay
in NTT form until :meth:`SimdSum.result` transforms them back to fold; the same integer
products as ``multiply_plain`` on coefficient forms, which transforms both operands and the
product back for every mask (with 16 groups, 35 ms a ciphertext instead of 104 ms).

**Groups on the matcher's side.** When the GROUP BY column is M's, V packs only the figures
of each key (``cells`` = count and sums) and M keeps one running sum per group and modulus
(``SimdShape.groups``, at most :data:`MAX_GROUPS`): for group g it multiplies each ciphertext by
the mask of the matched positions whose key is in its group g (selection AND group g), adds,
and folds, noises, re-randomises and floods each group's sum as above; the result lists the
groups in turn. The noise bound per sum is unchanged (each still sums at most K masked
ciphertexts), so :func:`max_ciphertexts` holds per group; the cost is one product per group and
ciphertext at M and ``groups`` times the result's size.

**Sums at the value holder** (:func:`selection_shape`; every plan without M's groups). The
ciphertexts go the other way: V streams its masked keys alone, M learns which shuffled
positions match exactly as above and encrypts that **selection** (a bit a key, repeated over
the key's block of ``b`` slots; :meth:`SimdPublic.encrypt_selection`), and V multiplies each
selection ciphertext by plaintexts of its own values (:func:`value_slots`: group ``h`` of
``b`` cells holds cell ``h * b + j`` of key ``r`` at slot ``r * b + j``), adds the products
(:meth:`SimdSum.add_values`), and folds, adds its DP noise, re-randomises and floods each
group's sum as M does above; V releases them to the analyst. ``b`` is the least power of two
that leaves at most :data:`MAX_GROUPS` groups (one result each, per modulus): 32 cells give
``b = 2``, 16 results a modulus, and 4,096 keys a selection ciphertext. The circuit and its
noise bounds are the ones above with the factors swapped (a fresh encryption of 0/1 times a
plaintext in [0, t)), K the selection ciphertexts summed. The point is the cost: V's values
are never encrypted. With V's 16 groups and 2 figures, V encrypted 32 cells a key (7,814
ciphertexts at 1M keys, 2.9 GB to M); now M encrypts 2 slots a key (490) and V computes the
same number of products as plaintext-ciphertext products in NTT form (about 1.3 ms each
against 5.4 ms to encrypt and save one, and M's load and product after it).

**Sums beyond one plaintext modulus: CRT.** Each plaintext modulus t_i is a 24-bit batching
prime (``PlainModulus.Batching(N, 24)``: prime, t_i = 1 mod 2N); V encrypts its values modulo
every t_i under its own key set, M computes the same circuit under each, and the analyst
combines the per-modulus totals by the CRT modulo T = prod t_i and reads them centred in
(-T/2, T/2). :func:`moduli_for` picks the fewest moduli with T > 2 * (the largest possible
|total + noise|): ``MAX_KEYS * MAX_ROWS_PER_KEY * sensitivity + noise bound`` per cell (the
plan's bounds, so every party derives the same count without a message; checked in tests
against a sum that overflows one modulus).

**Parameters (128-bit security).** N = 8192 and a coefficient modulus of 54 + 54 + 55 + 55 =
218 bits (three data primes and SEAL's special key-switching prime): the largest log2(q) that
the Homomorphic Encryption Standard (Albrecht et al., homomorphicencryption.org, 2018, Table
1, classical, ternary secret) allows at N = 8192 for 128-bit security; SEAL's ``TC128`` check
refuses more. Every party builds this context itself from the constants here and loads the
analyst's keys into it, so keys or ciphertexts for other parameters fail to load
(:class:`~govshare.protocols.errors.MalformedInput`).

**Noise, flooding and the statistical parameter.** Circuit privacy (the analyst, holding the
secret key, learns only the totals — nothing of V's unselected rows or of M's mask) needs the
released ciphertext's noise to be independent of the inputs: after ``c * p`` the noise carries
a term ``-(q mod t) * floor(m * p / t)`` that depends on *every* slot of m, selected or not.
Worst-case bounds in the infinity norm (:func:`noise_bounds`; B_e = 21 bounds SEAL's fresh
error, N = 8192, t < 2^24, K ciphertexts summed, R fold steps):

- fresh: E0 = B_e (2N + 1);
- times a mask (coefficients in [0, t)): E1 = N t (E0 + t);
- sum of K products: E2 = K (E1 + t);
- R fold steps (each adds a rotation, key switching adds at most E_ks = 2 * 3 * N * B_e + N,
  the special prime being at least every data prime): E3 = 2^R (E2 + E_ks).

M then adds a fresh encryption of zero (so the second component is fresh too) and a
*transparent* ciphertext ``(e, 0)`` whose coefficients are uniform on [-F, F], F =
2^STATISTICAL_BITS * N * E3: for any two inputs the flooded noises are within statistical
distance N * E3 / F = 2^-40 (:data:`STATISTICAL_BITS`). Decryption stays correct while
t (E3 + F + E0) < q / 4; :func:`max_ciphertexts` is the largest K for which that holds (32,109
ciphertexts at 32 cells, i.e. 8.2M keys), and M refuses a stream that would exceed it.

TenSEAL has no flooding and no way to set a ciphertext's polynomials, and ``sealapi`` saves
and loads only through files: the flooding ciphertext is written in SEAL's own uncompressed
serialisation (header, parms_id, size, polynomials in RNS form) and loaded with SEAL's checks;
:func:`_transparent` documents the layout. Galois keys are made for the fold's rotations only
(``KeyGenerator.create_galois_keys`` with explicit Galois elements 3^step mod 2N and 2N - 1).

**Bytes.** The encrypted direction is nearly all of them (V's stream under M's groups, M's selection
otherwise): per ciphertext of ``N / block`` keys, one BFV ciphertext per modulus of 2 x 3 x N
coefficients, about 370 kB as SEAL writes it (zstd; 393 kB raw). Modulus switching
(``Evaluator.mod_switch_to_next``, exposed by ``sealapi``) cannot cut it: with the flooding,
decryption needs log2(q) > log2(4 t (E3 + F)) = 160 of the 163 bits of the three data primes (K =
3,907 ciphertexts, R = 8; :func:`noise_bounds`), so no prime can go, before the sum or after the
flooding. The nodes encrypt under the analyst's public key, so SEAL's seeded (half-size)
ciphertexts, which need the secret key, do not apply; packing each 54-55-bit coefficient tightly
would save another ~10% at a Python pass over 49,152 coefficients per ciphertext on each side. What
does cut them is the layout: with the groups on M's side V packs only the figures (2 cells a key
instead of 32 for 16 groups by district: 13 x fewer bytes), and with V's groups M's selection takes
``b`` slots a key (2 instead of 32).

**Who learns what, beside Private Join and Compute** (semi-honest, as today):

=====================  ====================================  ====================================
party                  PJC / ``paillier``                      ``bfv-simd``
=====================  ====================================  ====================================
matcher M              |V's keys|, |M ∩ V| (which shuffled    the same; |V's keys| rounded up to a
                       masked pairs match, not whose)         ciphertext of N / block keys
value holder V         |M's keys|                             the same (sums at V: also M's
                                                              selection, encrypted under the
                                                              analyst's key)
analyst                the noisy figures                      the same (flooded, re-randomised
                                                              noise: 2^-40 statistical distance)
=====================  ====================================  ====================================

With the sums at the value holder the table's rows are the same for M (it sees points, not
ciphertexts) and for the analyst (the flooding is V's, with the same statistical distance); V
receives M's selection as fresh encryptions under the analyst's key, so it learns nothing of
it under RLWE (not even |M ∩ V|), and V, not M, adds the DP noise. Should the analyst and V
collude, they would read which of V's shuffled positions matched (V knows whose they are),
as the analyst and M colluding read V's values under the other direction: neither direction
holds against a node that colludes with the analyst, and govshare assumes no such collusion.

With the groups on M's side (either scheme; ``govshare.node.queries.kinds.aggregate``) M masks
every key under a common scalar and each group's keys again under a scalar of the group's, and
sends both as one shuffled set, so V learns |M's keys in the groups| and nothing of the groups
(the points are indistinguishable and unlinkable under DDH). M learns, for each of V's shuffled
positions, whether it matched and *in which of M's groups*: the sizes |M_g ∩ V|, which the
analyst could have had M learn anyway by G queries with a WHERE on M's column, and still not
which of its keys matched. The analyst learns the noisy figures per group, as with V's groups:
the flooding hides which positions M put in which group beyond the totals (tested by a
distinguisher holding the secret key).

Only public material leaves the analyst: per modulus the public key and the fold's Galois keys
(:meth:`SimdSecretKeys.public_bundle`), fresh per query; the plan carries its SHA-256. No
party decrypts a ciphertext another party multiplied by a private plaintext other than the
analyst after flooding, which is what DESIGN.md protocol 5 asks of a released number.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import numpy as np
import tenseal.sealapi as seal

from govshare.protocols.errors import MalformedInput

POLY_DEGREE: Final = 8192
SLOTS: Final = POLY_DEGREE
# HE Standard, Table 1 (128-bit classical, ternary secret): log2(q) <= 218 at N = 8192.
COEFF_BITS: Final = (54, 54, 55, 55)
PLAIN_BITS: Final = 24
STATISTICAL_BITS: Final = 40
# SEAL's fresh error: a centred binomial / clipped normal of sigma 3.2, never beyond 21.
FRESH_ERROR_BOUND: Final = 21
MAX_MODULI: Final = 8
MAX_GROUPS: Final = 16
# A key the matcher leaves out of every group (not in the intersection, or outside its groups).
UNSELECTED: Final = -1
_BUNDLE_MAGIC: Final = b"GSSIMD1\n"
_U32: Final = struct.Struct(">I")
_SEAL_ERRORS: Final = (ValueError, RuntimeError, TypeError, OSError)
_SHM: Final = "/dev/shm"


def _tmpdir() -> str:
    return _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else tempfile.gettempdir()


class _Files:
    """SEAL objects to and from bytes (``sealapi`` saves and loads through paths only)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gs-simd-", dir=_tmpdir())
        self._path = os.path.join(self._dir.name, "obj")
        self._lock = threading.Lock()  # one file: one object at a time

    def dump(self, obj: Any) -> bytes:
        with self._lock:
            obj.save(self._path)
            with open(self._path, "rb") as handle:
                return handle.read()

    def load(self, obj: Any, context: Any, data: bytes) -> Any:
        with self._lock:
            with open(self._path, "wb") as handle:
                handle.write(data)
            obj.load(context, self._path)
        return obj


@dataclass(frozen=True)
class SimdShape:
    """What every party derives from the plan: cells per key, block, the CRT moduli, and the
    matcher's groups (one masked sum and one result per group and modulus)."""

    cells: int
    moduli: int
    groups: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.cells <= SLOTS // 2:
            raise MalformedInput(f"1 to {SLOTS // 2} cells per key", field="cells")
        if not 1 <= self.moduli <= MAX_MODULI:
            raise MalformedInput(f"1 to {MAX_MODULI} plaintext moduli", field="moduli")
        if not 1 <= self.groups <= MAX_GROUPS:
            raise MalformedInput(f"1 to {MAX_GROUPS} matcher groups", field="groups")

    @property
    def block(self) -> int:
        return 1 << (self.cells - 1).bit_length()

    @property
    def keys_per_ciphertext(self) -> int:
        return SLOTS // self.block

    @property
    def fold_steps(self) -> tuple[int, ...]:
        """Row rotations of the fold (the column swap follows them)."""
        steps, step = [], self.block
        while step < SLOTS // 2:
            steps.append(step)
            step *= 2
        return tuple(steps)

    @property
    def galois_elements(self) -> list[int]:
        return [pow(3, s, 2 * POLY_DEGREE) for s in self.fold_steps] + [2 * POLY_DEGREE - 1]

    @cached_property
    def plain_moduli(self) -> tuple[int, ...]:
        return tuple(
            m.value() for m in seal.PlainModulus.Batching(POLY_DEGREE, [PLAIN_BITS] * self.moduli)
        )

    def ciphertexts_for(self, keys: int) -> int:
        return max(1, -(-keys // self.keys_per_ciphertext))


def selection_shape(cells: int, moduli: int) -> SimdShape:
    """The layout of sums at the value holder for ``cells`` cells a key: the matcher's
    selection bit of a key repeated over a block of ``b`` slots, ``b`` the least power of two
    that leaves at most :data:`MAX_GROUPS` groups of ``b`` cells; the value holder's plaintext
    of group ``h`` holds cell ``h * b + j`` of key ``r`` at slot ``r * b + j``
    (:func:`value_slots`), and each group's sum is one result per modulus. As a
    :class:`SimdShape`: ``b`` cells a key in ``ceil(cells / b)`` groups."""
    if not 1 <= cells <= SLOTS // 2:
        raise MalformedInput(f"1 to {SLOTS // 2} cells per key", field="cells")
    block = 1
    while -(-cells // block) > MAX_GROUPS:
        block *= 2
    return SimdShape(block, moduli, -(-cells // block))


def value_slots(shape: SimdShape, rows: Sequence[Sequence[int]] | Any) -> Any:
    """The value holder's plaintexts for one selection ciphertext of up to
    ``shape.keys_per_ciphertext`` keys (a list of rows, or a 2-D integer array): an array of
    one row of :data:`SLOTS` values per group ``h``, key ``r``'s cell ``h * cells + j`` at slot
    ``r * block + j`` (cells past the last are 0)."""
    per, cells, groups = shape.keys_per_ciphertext, shape.cells, shape.groups
    if len(rows) > per:
        raise TypeError("more keys than one ciphertext holds")
    table = np.zeros((per, groups * cells), dtype=np.int64)
    if len(rows):
        try:
            values = np.asarray(rows, dtype=np.int64)
        except ValueError:
            raise TypeError("one row of values a key, all of one length") from None
        if values.ndim != 2 or values.shape[1] > groups * cells:
            raise TypeError("at most groups x cells values a key")
        table[: len(rows), : values.shape[1]] = values
    # (key, group, cell) -> (group, key, slot of the key's block): each group's row is its plane.
    planes = np.zeros((groups, per, shape.block), dtype=np.int64)
    planes[:, :, :cells] = table.reshape(per, groups, cells).transpose(1, 0, 2)
    return planes.reshape(groups, SLOTS)


def moduli_for(max_abs_total: int) -> int:
    """The fewest 24-bit plaintext moduli whose product exceeds 2 * ``max_abs_total``."""
    for count in range(1, MAX_MODULI + 1):
        moduli = SimdShape(1, count).plain_moduli
        if math.prod(moduli) > 2 * max_abs_total:
            return count
    raise MalformedInput("the sums' bound needs too many plaintext moduli", field="sums")


def _data_primes() -> list[int]:
    return [m.value() for m in seal.CoeffModulus.Create(POLY_DEGREE, list(COEFF_BITS))][:-1]


def noise_bounds(ciphertexts: int, fold_steps: int) -> tuple[int, int]:
    """(E3, F): the worst-case noise before flooding and the flooding half-width (docstring)."""
    n, t, b = POLY_DEGREE, 1 << PLAIN_BITS, FRESH_ERROR_BOUND
    e0 = b * (2 * n + 1)
    e1 = n * t * (e0 + t)
    e2 = ciphertexts * (e1 + t)
    e_ks = 2 * len(COEFF_BITS[:-1]) * n * b + n
    e3 = (1 << fold_steps) * (e2 + e_ks)
    return e3, (1 << STATISTICAL_BITS) * n * e3


def max_ciphertexts(fold_steps: int) -> int:
    """The most ciphertexts one modulus may sum with flooding and correct decryption."""
    q, t = math.prod(_data_primes()), 1 << PLAIN_BITS
    e0 = FRESH_ERROR_BOUND * (2 * POLY_DEGREE + 1)
    low, high = 0, 1 << 30
    while low < high:
        mid = (low + high + 1) // 2
        e3, flood = noise_bounds(mid, fold_steps)
        if 4 * t * (e3 + flood + e0) < q:
            low = mid
        else:
            high = mid - 1
    return low


class _Modulus:
    """One plaintext modulus: its SEAL context, built here from the constants, never received."""

    def __init__(self, plain: int) -> None:
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(POLY_DEGREE)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(POLY_DEGREE, list(COEFF_BITS)))
        parms.set_plain_modulus(seal.Modulus(plain))
        self.context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():  # pragma: no cover - constants are checked
            raise MalformedInput("BFV parameters refused by SEAL", field="parameters")
        self.plain = plain
        self.encoder = seal.BatchEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.primes = [m.value() for m in self.context.first_context_data().parms().coeff_modulus()]

    def encode(self, slots: Sequence[int] | Any, *, reduced: bool = False) -> Any:
        """The batch encoding of ``slots``, a list or an integer array (``reduced``: every value
        already in [0, t))."""
        plaintext = seal.Plaintext()
        if isinstance(slots, np.ndarray):
            slots = (slots if reduced else np.mod(slots, self.plain)).tolist()
        elif not reduced:
            slots = [v % self.plain for v in slots]
        self.encoder.encode(slots, plaintext)
        return plaintext


class SimdPublic:
    """The analyst's public material for one query, as V and M hold it."""

    def __init__(
        self, shape: SimdShape, moduli: list[_Modulus], public: list[Any], galois: list[Any]
    ) -> None:
        self.shape = shape
        self._moduli = moduli
        self._public = public
        self._galois = galois
        self._files = _Files()
        self._encryptors = [
            seal.Encryptor(m.context, pk) for m, pk in zip(moduli, public, strict=True)
        ]

    @classmethod
    def from_bundle(cls, shape: SimdShape, bundle: bytes, *, galois: bool = True) -> SimdPublic:
        """Load :meth:`SimdSecretKeys.public_bundle` into contexts built from the constants.

        Raises:
            MalformedInput: a bad encoding, or keys for other parameters or other rotations.
        """
        parts = _split_bundle(bundle, shape.moduli)
        moduli = [_Modulus(t) for t in shape.plain_moduli]
        files = _Files()
        public, keys = [], []
        try:
            for modulus, (pk_bytes, gk_bytes) in zip(moduli, parts, strict=True):
                public.append(files.load(seal.PublicKey(), modulus.context, pk_bytes))
                if galois:
                    gk = files.load(seal.GaloisKeys(), modulus.context, gk_bytes)
                    if not all(gk.has_key(e) for e in shape.galois_elements):
                        raise MalformedInput(
                            "the Galois keys lack a fold rotation", field="public_context"
                        )
                    keys.append(gk)
        except _SEAL_ERRORS:
            raise MalformedInput(
                "the BFV keys do not load under the query's parameters", field="public_context"
            ) from None
        return cls(shape, moduli, public, keys)

    # --- value holder ---------------------------------------------------------------------

    def encrypt_keys(self, rows: Sequence[Sequence[int]] | Any) -> list[bytes]:
        """One ciphertext per modulus holding up to ``keys_per_ciphertext`` keys' cell values
        (a list of rows, or a 2-D integer array: one row of ``cells`` values a key)."""
        shape = self.shape
        if len(rows) > shape.keys_per_ciphertext:
            raise TypeError("more keys than one ciphertext holds")
        table = np.zeros((shape.keys_per_ciphertext, shape.block), dtype=np.int64)
        if len(rows):
            try:
                values = np.asarray(rows, dtype=np.int64)
            except ValueError:
                raise TypeError("one value per cell") from None
            if values.ndim != 2 or values.shape[1] != shape.cells:
                raise TypeError("one value per cell")
            table[: len(values), : shape.cells] = values
        # Counts and clipped sums are mostly below every modulus: then no reduction is needed.
        reduced = int(table.min()) >= 0 and int(table.max()) < min(m.plain for m in self._moduli)
        slots = table.ravel().tolist()
        out = []
        for modulus, encryptor in zip(self._moduli, self._encryptors, strict=True):
            ciphertext = seal.Ciphertext(modulus.context)
            encryptor.encrypt(modulus.encode(slots, reduced=reduced), ciphertext)
            out.append(self._files.dump(ciphertext))
        return out

    def encrypt_selection(self, selected: Sequence[bool]) -> list[bytes]:
        """Sums at the value holder: the matcher's selection bits of up to
        ``keys_per_ciphertext`` keys, each over its key's block, one ciphertext per modulus."""
        bits = np.asarray(selected, dtype=bool).reshape(-1, 1).astype(np.int64)
        return self.encrypt_keys(np.repeat(bits, self.shape.cells, axis=1))

    # --- matcher --------------------------------------------------------------------------

    def load_ciphertext(self, index: int, data: bytes) -> Any:
        """A fresh ciphertext of modulus ``index``, checked.

        Raises:
            MalformedInput: not a size-2, coefficient-form, non-transparent ciphertext at the
                first data level of the query's parameters.
        """
        modulus = self._moduli[index]
        try:
            ciphertext = self._files.load(seal.Ciphertext(modulus.context), modulus.context, data)
        except _SEAL_ERRORS:
            raise MalformedInput(
                "not a BFV ciphertext under the query's parameters", field="items"
            ) from None
        if (
            ciphertext.size() != 2
            or ciphertext.is_ntt_form()
            or ciphertext.is_transparent()
            or list(ciphertext.parms_id()) != list(modulus.context.first_parms_id())
        ):
            raise MalformedInput(
                "not a fresh BFV ciphertext under the query's parameters", field="items"
            )
        return ciphertext

    def accumulator(self) -> SimdSum:
        return SimdSum(self)


class SimdSum:
    """The matcher's running masked sums: one ciphertext per group and plaintext modulus."""

    def __init__(self, public: SimdPublic) -> None:
        self._public = public
        shape = public.shape
        self._sums: list[list[Any | None]] = [[None] * shape.moduli for _ in range(shape.groups)]
        self.ciphertexts = 0
        self._done = False
        self._limit = max_ciphertexts(len(shape.fold_steps) + 1)

    def add(self, ciphertexts: Sequence[Any], selected: Sequence[bool | int]) -> None:
        """Add one position's ciphertexts (one per modulus; encodings, or ciphertexts that
        :meth:`SimdPublic.load_ciphertext` checked) times the selection masks.

        ``selected`` has one entry per key of the position: its group (``0 <= g < groups``)
        or :data:`UNSELECTED`; with one group, True and False say the same.

        Raises:
            MalformedInput: a bad ciphertext, the wrong count, or more positions than the
                noise budget allows (:func:`max_ciphertexts`).
        """
        shape = self._public.shape
        if len(selected) > shape.keys_per_ciphertext:
            raise MalformedInput(
                f"at most {shape.keys_per_ciphertext} keys a ciphertext", field="selected"
            )
        loaded = self._counted(ciphertexts)
        groups = np.full(shape.keys_per_ciphertext, UNSELECTED, dtype=np.int64)
        groups[: len(selected)] = [_group_of(s, shape.groups) for s in selected]
        blocks = np.repeat(groups, shape.block)  # each key's group over its block of slots
        masks = [(int(g), (blocks == g).astype(np.int64)) for g in np.unique(groups) if g >= 0]
        self._products(loaded, masks, reduced=True)  # 0 and 1

    def add_values(self, ciphertexts: Sequence[Any], slots: Sequence[Sequence[int]] | Any) -> None:
        """Sums at the value holder: add one position's *selection* ciphertexts (the matcher's
        encrypted bits, one per modulus, loaded or as bytes) times the value holder's
        plaintexts, ``slots`` per group (:func:`value_slots`).

        Raises:
            MalformedInput: a bad ciphertext, the wrong count, or more positions than the
                noise budget allows (:func:`max_ciphertexts`).
        """
        try:
            planes = np.asarray(slots, dtype=np.int64)
        except ValueError:
            raise TypeError("one plaintext of SLOTS values per group") from None
        if planes.shape != (self._public.shape.groups, SLOTS):
            raise TypeError("one plaintext of SLOTS values per group")
        loaded = self._counted(ciphertexts)
        plaintexts = [(g, plane) for g, plane in enumerate(planes) if plane.any()]
        least = min(m.plain for m in self._public._moduli)
        small = bool(plaintexts) and int(planes.min()) >= 0 and int(planes.max()) < least
        self._products(loaded, plaintexts, reduced=small)

    def partial(self) -> tuple[int, list[bytes]]:
        """This sum as a part of another's (:meth:`merge`): its count of positions and its
        running sums (group-major, then modulus; NTT form; ``b""`` where nothing was added).
        For a pool worker that sums some of the positions; the sums are not released."""
        out = [b"" if c is None else self._public._files.dump(c) for g in self._sums for c in g]
        return self.ciphertexts, out

    def merge(self, count: int, parts: Sequence[bytes]) -> None:
        """Add a :meth:`partial` of a sum over other positions of the same query (from this
        node's own pool, never from a peer: NTT-form sums are not checked as fresh).

        Raises:
            MalformedInput: more positions in all than the noise budget allows.
        """
        public = self._public
        shape = public.shape
        if len(parts) != shape.groups * shape.moduli:
            raise TypeError("one part per group and modulus")
        self.ciphertexts += count
        if self.ciphertexts > self._limit:
            raise MalformedInput(
                f"more than {self._limit} ciphertexts: beyond the noise budget", field="items"
            )
        for at, data in enumerate(parts):
            if not data:
                continue
            group, i = divmod(at, shape.moduli)
            modulus = public._moduli[i]
            part = public._files.load(seal.Ciphertext(modulus.context), modulus.context, data)
            sums = self._sums[group]
            if sums[i] is None:
                sums[i] = part
            else:
                modulus.evaluator.add_inplace(sums[i], part)

    def _counted(self, ciphertexts: Sequence[Any]) -> list[Any]:
        public = self._public
        if len(ciphertexts) != public.shape.moduli:
            raise MalformedInput("one ciphertext per plaintext modulus", field="items")
        self.ciphertexts += 1
        if self.ciphertexts > self._limit:
            raise MalformedInput(
                f"more than {self._limit} ciphertexts: beyond the noise budget", field="items"
            )
        loaded = [
            public.load_ciphertext(i, c) if isinstance(c, bytes) else c
            for i, c in enumerate(ciphertexts)
        ]
        for modulus, ciphertext in zip(public._moduli, loaded, strict=True):
            if list(ciphertext.parms_id()) != list(modulus.context.first_parms_id()):
                raise MalformedInput("the ciphertexts are not in modulus order", field="items")
        return loaded

    def _products(
        self,
        loaded: Sequence[Any],
        plaintexts: Sequence[tuple[int, Any]],
        *,
        reduced: bool,
    ) -> None:
        """Add each ciphertext times each (group, slots) plaintext to that group's sums.

        The products are taken in NTT form: the ciphertext is transformed once for all its
        plaintexts, and the sums stay in NTT form until :meth:`result` (the same integer
        products as Evaluator.multiply_plain on coefficient forms, which transforms both
        operands and the product back for every plaintext). ``reduced``: every slot value is
        already in [0, t) of every modulus.
        """
        if not plaintexts:
            return
        for i, (modulus, ciphertext) in enumerate(zip(self._public._moduli, loaded, strict=True)):
            evaluator = modulus.evaluator
            transformed = seal.Ciphertext(modulus.context)
            evaluator.transform_to_ntt(ciphertext, transformed)
            product = None  # one buffer for the products added to a sum already there
            for group, slots in plaintexts:
                plaintext = modulus.encode(slots, reduced=reduced)
                evaluator.transform_to_ntt_inplace(plaintext, modulus.context.first_parms_id())
                sums = self._sums[group]
                if sums[i] is None:
                    sums[i] = seal.Ciphertext(modulus.context)
                    evaluator.multiply_plain(transformed, plaintext, sums[i])
                    continue
                if product is None:
                    product = seal.Ciphertext(modulus.context)
                evaluator.multiply_plain(transformed, plaintext, product)
                evaluator.add_inplace(sums[i], product)

    def result(
        self,
        noise: Sequence[int],
        *,
        unsafe_without_flooding: bool = False,
    ) -> list[bytes]:
        """Per group, fold, add that group's ``noise`` (one value per cell; ``noise`` lists the
        groups' in turn) to every block, re-randomise, flood; group-major, then modulus.

        The flooding's draws come from ``os.urandom`` (:func:`_uniform_below`);
        ``unsafe_without_flooding`` skips the fresh zero and the flooding (the distinguishing
        test's control: never in a node).
        """
        public = self._public
        shape = public.shape
        if len(noise) != shape.cells * shape.groups:
            raise TypeError("one noise value per cell and group")
        if self._done:
            raise TypeError("a sum's result is taken once (its ciphertexts are folded in place)")
        self._done = True
        _, flood = noise_bounds(max(self.ciphertexts, 1), len(shape.fold_steps) + 1)
        out = []
        for group, sums in enumerate(self._sums):
            cells = noise[group * shape.cells : (group + 1) * shape.cells]
            tiled = [0] * SLOTS
            for start in range(0, SLOTS, shape.block):
                tiled[start : start + shape.cells] = cells
            for i, modulus in enumerate(public._moduli):
                evaluator, galois = modulus.evaluator, public._galois[i]
                total = sums[i]
                if total is None:  # nothing matched: an encryption of zero, flooded like any sum
                    total = seal.Ciphertext(modulus.context)
                    public._encryptors[i].encrypt(modulus.encode([0] * SLOTS), total)
                else:
                    evaluator.transform_from_ntt_inplace(total)  # :meth:`add` sums in NTT form
                rotated = seal.Ciphertext(modulus.context)
                for step in shape.fold_steps:
                    evaluator.rotate_rows(total, step, galois, rotated)
                    evaluator.add_inplace(total, rotated)
                evaluator.rotate_columns(total, galois, rotated)
                evaluator.add_inplace(total, rotated)
                evaluator.add_plain_inplace(total, modulus.encode(tiled))
                if not unsafe_without_flooding:
                    zero = seal.Ciphertext(modulus.context)
                    public._encryptors[i].encrypt(modulus.encode([0] * SLOTS), zero)
                    evaluator.add_inplace(total, zero)
                    evaluator.add_inplace(total, self._flooding(modulus, flood))
                out.append(public._files.dump(total))
                sums[i] = None
        return out

    def _flooding(self, modulus: _Modulus, half_width: int) -> Any:
        draws = _uniform_below(2 * half_width + 1, POLY_DEGREE)
        coefficients = [x - half_width for x in draws]
        data = _transparent(modulus, coefficients)
        return self._public._files.load(seal.Ciphertext(modulus.context), modulus.context, data)


def _uniform_below(span: int, count: int) -> list[int]:
    """``count`` integers uniform on [0, ``span``), by rejection of ``span.bit_length()``-bit
    draws (each accepted with probability above 1/2), cut from one ``os.urandom`` buffer a round
    rather than a system call a draw (the flooding's 8,192 coefficients of 136 bits: 32 of them
    for 16 groups took 0.95 s in ``getrandbits`` calls)."""
    bits = span.bit_length()
    size = (bits + 7) // 8
    excess = 8 * size - bits
    out: list[int] = []
    while len(out) < count:
        need = count - len(out)
        buffer = os.urandom(size * (2 * need + 16))  # expected draws: under 2 * need
        for at in range(0, len(buffer), size):
            x = int.from_bytes(buffer[at : at + size], "little") >> excess
            if x < span:
                out.append(x)
                if len(out) == count:
                    break
    return out


def _group_of(selected: bool | int, groups: int) -> int:
    if isinstance(selected, bool):
        return 0 if selected else UNSELECTED
    if not UNSELECTED <= selected < groups:
        raise TypeError("a key's group is UNSELECTED or one of the matcher's groups")
    return selected


_VERSION: list[bytes] = []


def _seal_version() -> bytes:
    """The (major, minor) bytes SEAL writes in its headers, read off one of its own files."""
    if not _VERSION:
        files = _Files()
        _VERSION.append(files.dump(seal.EncryptionParameters(seal.SCHEME_TYPE.BFV))[3:5])
    return _VERSION[0]


def _seal_header(total: int) -> bytes:
    """SEAL's 16-byte SEALHeader: magic 0xA15E, header size 16, SEAL's version, compression
    none (0), reserved, the total size including the header (little-endian)."""
    return struct.pack("<HB", 0xA15E, 16) + _seal_version() + struct.pack("<BHQ", 0, 0, total)


def _transparent(modulus: _Modulus, coefficients: Sequence[int]) -> bytes:
    """The SEAL serialisation of the ciphertext ``(e, 0)`` with ``e`` the given polynomial.

    ``Ciphertext::save`` (SEAL 4.1, compression none): header; parms_id (4 x u64);
    is_ntt_form (1 byte); size, poly_modulus_degree, coeff_modulus_size (u64 each); scale
    (f64); correction_factor (u64); then the data ``DynArray`` as its own header, its length
    (u64) and ``size x coeff_modulus_size x N`` u64 coefficients, polynomial-major then
    prime-major, in coefficient form (BFV). SEAL's ``load`` checks all of it.
    """
    primes, n = modulus.primes, POLY_DEGREE
    data = b"".join(struct.pack(f"<{n}Q", *(c % q for c in coefficients)) for q in primes)
    data += bytes(8 * n * len(primes))
    array = struct.pack("<Q", 2 * len(primes) * n) + data
    array = _seal_header(16 + len(array)) + array
    members = (
        struct.pack("<4Q", *modulus.context.first_parms_id())
        + b"\x00"
        + struct.pack("<QQQdQ", 2, n, len(primes), 1.0, 1)
        + array
    )
    return _seal_header(16 + len(members)) + members


def _split_bundle(bundle: bytes, moduli: int) -> list[tuple[bytes, bytes]]:
    if not isinstance(bundle, bytes):
        raise TypeError("bundle must be bytes")
    if not bundle.startswith(_BUNDLE_MAGIC):
        raise MalformedInput("not a govshare BFV-SIMD key bundle", field="public_context")
    at, parts = len(_BUNDLE_MAGIC), []
    try:
        (count,) = _U32.unpack_from(bundle, at)
        at += 4
        if count != moduli:
            raise MalformedInput(
                "the key bundle has the wrong number of moduli", field="public_context"
            )
        for _ in range(count):
            pair = []
            for _ in range(2):
                (size,) = _U32.unpack_from(bundle, at)
                at += 4
                if at + size > len(bundle):
                    raise MalformedInput("the key bundle is truncated", field="public_context")
                pair.append(bundle[at : at + size])
                at += size
            parts.append((pair[0], pair[1]))
    except struct.error:
        raise MalformedInput("the key bundle is truncated", field="public_context") from None
    if at != len(bundle):
        raise MalformedInput("trailing bytes after the key bundle", field="public_context")
    return parts


def _join_bundle(parts: Sequence[tuple[bytes, bytes]]) -> bytes:
    out = [_BUNDLE_MAGIC, _U32.pack(len(parts))]
    for public, galois in parts:
        out += [_U32.pack(len(public)), public, _U32.pack(len(galois)), galois]
    return b"".join(out)


def encryption_bundle(bundle: bytes, moduli: int) -> bytes:
    """``bundle`` with its Galois keys left out: the public keys alone, all that encrypting
    needs (:meth:`SimdPublic.from_bundle` with ``galois=False``), and about a seventeenth of
    the bundle's bytes at 16 groups. For a value holder's pool jobs, which would otherwise
    copy the Galois keys to a worker with every batch.

    Raises:
        MalformedInput: ``bundle`` does not split into ``moduli`` key sets.
    """
    return _join_bundle([(public, b"") for public, _ in _split_bundle(bundle, moduli)])


class SimdSecretKeys:
    """The analyst's fresh keys for one query: one key set per plaintext modulus."""

    def __init__(self, shape: SimdShape) -> None:
        self.shape = shape
        self._moduli = [_Modulus(t) for t in shape.plain_moduli]
        self._files = _Files()
        self._bundle_parts: list[tuple[bytes, bytes]] = []
        self._decryptors = []
        self._secrets: list[Any] = []
        for modulus in self._moduli:
            keygen = seal.KeyGenerator(modulus.context)
            public = seal.PublicKey()
            keygen.create_public_key(public)
            galois = keygen.create_galois_keys(shape.galois_elements)  # seeded: half the size
            self._bundle_parts.append((self._files.dump(public), self._files.dump(galois)))
            self._decryptors.append(seal.Decryptor(modulus.context, keygen.secret_key()))
            self._secrets.append(keygen.secret_key())

    def public_bundle(self) -> bytes:
        """Public keys and the fold's Galois keys: all that leaves the analyst."""
        return _join_bundle(self._bundle_parts)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(self.public_bundle()).digest()

    def decrypt(self, ciphertexts: Sequence[bytes], *, cells: int | None = None) -> list[int]:
        """Cell totals, CRT-combined and centred in (-T/2, T/2); with several groups the
        groups' cells in turn (group-major, as :meth:`SimdSum.result` lists them). ``cells``:
        the first that many (a :func:`selection_shape`'s groups end in padding cells, which
        must decrypt to 0).

        Raises:
            MalformedInput: the wrong count, a bad ciphertext, blocks that disagree (the
                fold did not run as the protocol says), or padding that is not 0.
        """
        shape = self.shape
        if len(ciphertexts) != shape.moduli * shape.groups:
            raise MalformedInput(
                "one result ciphertext per matcher group and plaintext modulus",
                field="ciphertexts",
            )
        out: list[int] = []
        for group in range(shape.groups):
            out += self._decrypt_group(
                ciphertexts[group * shape.moduli : (group + 1) * shape.moduli]
            )
        if cells is not None:
            if not 0 < cells <= len(out):
                raise TypeError(f"1 to {len(out)} cells")
            if any(out[cells:]):
                raise MalformedInput("the result's padding cells are not 0", field="ciphertexts")
            out = out[:cells]
        return out

    def _decrypt_group(self, ciphertexts: Sequence[bytes]) -> list[int]:
        shape = self.shape
        residues = []
        for modulus, decryptor, data in zip(
            self._moduli, self._decryptors, ciphertexts, strict=True
        ):
            try:
                ciphertext = self._files.load(
                    seal.Ciphertext(modulus.context), modulus.context, data
                )
                plaintext = seal.Plaintext()
                decryptor.decrypt(ciphertext, plaintext)
                slots = modulus.encoder.decode_uint64(plaintext)
            except _SEAL_ERRORS:
                raise MalformedInput(
                    "not a BFV ciphertext under the query's keys", field="ciphertexts"
                ) from None
            first = slots[: shape.cells]
            for start in range(0, SLOTS, shape.block):
                if slots[start : start + shape.cells] != first:
                    raise MalformedInput("the result's blocks disagree", field="ciphertexts")
            residues.append(first)
        moduli = shape.plain_moduli
        total = math.prod(moduli)
        out = []
        for cell in range(shape.cells):
            x = 0
            for t, r in zip(moduli, residues, strict=True):
                rest = total // t
                x += r[cell] * rest * pow(rest, -1, t)
            x %= total
            out.append(x - total if x > total // 2 else x)
        return out

    def unsafe_secret_key(self, index: int) -> Any:
        """The SEAL secret key of modulus ``index``, for the distinguishing tests only."""
        return self._secrets[index]

    def unsafe_modulus(self, index: int) -> Any:
        """The SEAL context of modulus ``index`` and its data primes, for tests only."""
        return self._moduli[index]

    def unsafe_noise_budgets(self, ciphertexts: Sequence[bytes]) -> list[int]:
        """SEAL's invariant noise budget of each result (bits): for tests and benchmarks."""
        out = []
        for modulus, decryptor, data in zip(
            self._moduli, self._decryptors, ciphertexts, strict=True
        ):
            ciphertext = self._files.load(seal.Ciphertext(modulus.context), modulus.context, data)
            out.append(decryptor.invariant_noise_budget(ciphertext))
        return out
