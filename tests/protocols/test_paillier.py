"""Tests for govshare.protocols.paillier: KATs, homomorphism, packing, strict encodings."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import EncryptedNumber, PaillierPrivateKey, PaillierPublicKey

from govshare.protocols import paillier
from govshare.protocols.errors import MalformedInput
from govshare.protocols.paillier import DjnPublicKey, PackingLayout, Slot

# Known-answer key: two 16-bit primes, h chosen by hand. hs and the ciphertext below were computed
# with Python's built-in pow (no table), independently of the module.
KAT_P = 65519
KAT_Q = 65521
KAT_N = KAT_P * KAT_Q  # 4292870399, 32 bits
KAT_H = 12345
KAT_HS = 14764910282868153326  # pow(KAT_H, KAT_N, KAT_N**2)
KAT_M = 424242
KAT_X = 0xBEEF
KAT_C = 6064524020863900827  # pow(KAT_N + 1, KAT_M, N2) * pow(KAT_HS, KAT_X, N2) % N2
KAT_KEY_HEX = "4753504b0100040010ffe000ffcce77faca6de5bee"

SMALL_BITS = 256


@pytest.fixture(scope="module")
def kat_key() -> tuple[DjnPublicKey, PaillierPrivateKey]:
    return paillier.keypair_from_primes(KAT_P, KAT_Q, KAT_H, unsafe_allow_short_modulus=True)


@pytest.fixture(scope="module")
def small_key() -> tuple[DjnPublicKey, PaillierPrivateKey]:
    return paillier.generate_keypair(SMALL_BITS, unsafe_allow_short_modulus=True)


@pytest.fixture(scope="session")
def real_key() -> Iterator[tuple[DjnPublicKey, PaillierPrivateKey]]:
    yield paillier.generate_keypair()  # 3072 bits, the default


# -- known answers ---------------------------------------------------------------------------


def test_kat_hs_and_ciphertext(kat_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = kat_key
    assert pk.n == KAT_N
    assert pk.hs == KAT_HS
    assert pk.exponent_bits == 16  # ceil(32 / 2)
    assert pk.raw_encrypt(KAT_M, x=KAT_X) == KAT_C
    assert paillier.decrypt_raw(sk, EncryptedNumber(pk.phe, KAT_C)) == KAT_M


def test_kat_public_key_encoding(kat_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, _ = kat_key
    assert pk.to_bytes().hex() == KAT_KEY_HEX
    parsed = DjnPublicKey.from_bytes(bytes.fromhex(KAT_KEY_HEX), unsafe_allow_short_modulus=True)
    assert parsed == pk


@settings(max_examples=50, deadline=None)
@given(m=st.integers(0, KAT_N - 1), x=st.integers(0, 2**16 - 1))
def test_fast_encryption_equals_phe_with_r_equal_h_to_x(m: int, x: int) -> None:
    # hs^x = (h^x)^n mod n^2, so phe's r^n encryption with r = h^x mod n is the same ciphertext.
    pk, _ = paillier.keypair_from_primes(KAT_P, KAT_Q, KAT_H, unsafe_allow_short_modulus=True)
    r = pow(KAT_H, x, KAT_N)
    assert pk.raw_encrypt(m, x=x) == pk.phe.raw_encrypt(m, r_value=r)
    n2 = KAT_N * KAT_N
    assert pk.raw_obfuscator(x) == pow(KAT_HS, x, n2)


def test_rerandomize_with_explicit_exponent(
    kat_key: tuple[DjnPublicKey, PaillierPrivateKey],
) -> None:
    pk, sk = kat_key
    c = pk.encrypt_with_exponent(KAT_M, KAT_X)
    again = pk.rerandomize(c, x=7)
    n2 = KAT_N * KAT_N
    assert again.ciphertext(be_secure=False) == KAT_C * pow(KAT_HS, 7, n2) % n2
    assert paillier.decrypt_raw(sk, again) == KAT_M


def test_exponent_and_plaintext_ranges(kat_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, _ = kat_key
    with pytest.raises(MalformedInput):
        pk.raw_encrypt(KAT_N)
    with pytest.raises(MalformedInput):
        pk.raw_encrypt(-1)
    with pytest.raises(MalformedInput):
        pk.raw_encrypt(1, x=2**16)
    with pytest.raises(TypeError):
        pk.raw_encrypt(1.5)  # type: ignore[arg-type]


# -- homomorphism ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(0, 2**64), min_size=1, max_size=12))
def test_decrypt_of_sum_is_sum(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey], values: list[int]
) -> None:
    pk, sk = small_key
    total = pk.sum_ciphertexts(pk.encrypt(v) for v in values)
    assert paillier.decrypt_raw(sk, total) == sum(values) % pk.n
    # phe agrees with our raw decryption for small non-negative totals.
    assert sk.decrypt(total) == sum(values)


def test_sum_with_phe_addition_agrees(small_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = small_key
    a, b = pk.encrypt(1000), pk.encrypt(234)
    assert sk.decrypt(a + b) == 1234
    assert pk.sum_ciphertexts([a, b]).ciphertext(be_secure=False) == (a + b).ciphertext(
        be_secure=False
    )


def test_sum_refuses_empty_and_too_many(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey],
) -> None:
    pk, _ = small_key
    with pytest.raises(MalformedInput):
        pk.sum_ciphertexts([])
    cs = [pk.encrypt(1) for _ in range(3)]
    assert pk.sum_ciphertexts(cs, max_terms=3) is not None
    with pytest.raises(MalformedInput):
        pk.sum_ciphertexts(cs, max_terms=2)


def test_fresh_encryptions_differ_and_rerandomize_changes_ciphertext(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey],
) -> None:
    pk, sk = small_key
    a, b = pk.encrypt(5), pk.encrypt(5)
    assert a.ciphertext(be_secure=False) != b.ciphertext(be_secure=False)
    c = pk.rerandomize(a)
    assert c.ciphertext(be_secure=False) != a.ciphertext(be_secure=False)
    assert paillier.decrypt_raw(sk, c) == 5


def test_to_bytes_rerandomizes_sums_but_not_fresh_ciphertexts(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey],
) -> None:
    # Pins our use of phe's obfuscation flag: a sum leaves the party re-randomised.
    pk, sk = small_key
    fresh = pk.encrypt(3)
    assert pk.ciphertext_to_bytes(fresh) == fresh.ciphertext(be_secure=False).to_bytes(
        pk.ciphertext_bytes, "big"
    )
    total = pk.sum_ciphertexts([fresh, pk.encrypt(4)])
    raw_sum = total.ciphertext(be_secure=False).to_bytes(pk.ciphertext_bytes, "big")
    assert pk.ciphertext_to_bytes(total, be_secure=False) == raw_sum
    sent = pk.ciphertext_to_bytes(total)
    assert sent != raw_sum
    assert paillier.decrypt_raw(sk, pk.ciphertext_from_bytes(sent)) == 7
    # phe itself would not add a slow r^n to a fresh encryption of ours.
    assert fresh.ciphertext() == fresh.ciphertext(be_secure=False)


def test_other_key_ciphertext_refused(small_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = small_key
    other, _ = paillier.generate_keypair(SMALL_BITS, unsafe_allow_short_modulus=True)
    with pytest.raises(TypeError):
        pk.sum_ciphertexts([pk.encrypt(1), other.encrypt(1)])
    with pytest.raises(TypeError):
        paillier.decrypt_raw(sk, other.encrypt(1))


# -- ciphertext encoding -----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 2**200))
def test_ciphertext_bytes_round_trip(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey], m: int
) -> None:
    pk, sk = small_key
    data = pk.ciphertext_to_bytes(pk.encrypt(m))
    assert len(data) == pk.ciphertext_bytes == 2 * SMALL_BITS // 8
    assert paillier.decrypt_raw(sk, pk.ciphertext_from_bytes(data)) == m


def test_malformed_ciphertexts_refused(small_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = small_key
    width = pk.ciphertext_bytes
    good = pk.ciphertext_to_bytes(pk.encrypt(1))
    bad = {
        "truncated": good[:-1],
        "extended": good + b"\x00",
        "empty": b"",
        "zero": bytes(width),
        "n_squared": pk.nsquare.to_bytes(width, "big"),
        "all_ones": b"\xff" * width,
        "multiple_of_p": (sk.p * 12345).to_bytes(width, "big"),
        "multiple_of_n": (pk.n * 3).to_bytes(width, "big"),
    }
    for name, data in bad.items():
        with pytest.raises(MalformedInput):
            pk.ciphertext_from_bytes(data)
            pytest.fail(name)


# -- public key encoding and checks ------------------------------------------------------------


def _kat_bytes() -> bytes:
    return bytes.fromhex(KAT_KEY_HEX)


def _parse(data: bytes) -> DjnPublicKey:
    return DjnPublicKey.from_bytes(data, unsafe_allow_short_modulus=True)


def test_public_key_round_trip(small_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = small_key
    parsed = _parse(pk.to_bytes())
    assert parsed == pk and parsed.fingerprint() == pk.fingerprint()
    # A node encrypting under the parsed key reaches the analyst's private key.
    assert paillier.decrypt_raw(sk, parsed.encrypt(99)) == 99


def test_malformed_public_keys_refused() -> None:
    good = _kat_bytes()
    n2 = KAT_N * KAT_N
    header = good[:4] + good[4:5] + good[5:7] + good[7:9]
    n_bytes = good[9:13]

    def with_hs(hs: int) -> bytes:
        return header + n_bytes + hs.to_bytes(8, "big")

    bad = {
        "truncated_header": good[:5],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "bad_magic": b"XSPK" + good[4:],
        "bad_version": good[:4] + b"\x02" + good[5:],
        "zero_n_length": good[:5] + b"\x00\x00" + good[7:],
        "huge_n_length": good[:5] + b"\xff\xff" + good[7:],
        "non_minimal_n": good[:5] + b"\x00\x05" + good[7:9] + b"\x00" + n_bytes + good[13:],
        "exponent_too_short": good[:7] + b"\x00\x0f" + good[9:],
        "exponent_too_long": good[:7] + b"\x00\x21" + good[9:],
        "hs_one": with_hs(1),
        "hs_zero": with_hs(0),
        "hs_not_unit": with_hs(KAT_P * 3),
        "hs_minus_one_mod_n": with_hs(n2 - 1),
        "hs_one_mod_n": with_hs(KAT_N + 1),
        "hs_at_least_n2": with_hs(n2),
        "even_n": header + (KAT_N + 1).to_bytes(4, "big") + good[13:],
        "square_n": header + (65521 * 65521).to_bytes(4, "big") + good[13:],
        "small_factor_n": header + (3 * 1431623471).to_bytes(4, "big") + good[13:],
    }
    for name, data in bad.items():
        with pytest.raises(MalformedInput):
            _parse(data)
            pytest.fail(name)


def test_public_key_pickles_for_process_pools(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey],
) -> None:
    pk, sk = small_key
    pk.precompute()
    copy = pickle.loads(pickle.dumps(pk))
    assert copy == pk and copy.window_bits == pk.window_bits
    assert paillier.decrypt_raw(sk, copy.encrypt(31337)) == 31337


def test_short_modulus_refused_without_unsafe_flag(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey],
) -> None:
    pk, _ = small_key
    with pytest.raises(MalformedInput):
        DjnPublicKey.from_bytes(pk.to_bytes())
    with pytest.raises(MalformedInput):
        paillier.generate_keypair(1024)
    with pytest.raises(MalformedInput):
        paillier.generate_keypair(16, unsafe_allow_short_modulus=True)
    with pytest.raises(MalformedInput):
        paillier.generate_keypair(paillier.MAX_N_BITS + 8)
    with pytest.raises(MalformedInput):
        DjnPublicKey(PaillierPublicKey(pk.n), pk.hs)


def test_validate_modulus() -> None:
    paillier.validate_modulus(KAT_N, unsafe_allow_short_modulus=True)
    for n in (KAT_N + 1, 65521 * 65521, 997 * 4306791):
        with pytest.raises(MalformedInput):
            paillier.validate_modulus(n, unsafe_allow_short_modulus=True)
    with pytest.raises(TypeError):
        paillier.validate_modulus(True)


def test_keypair_from_primes_checks() -> None:
    with pytest.raises(MalformedInput):
        paillier.keypair_from_primes(KAT_P, KAT_P, KAT_H, unsafe_allow_short_modulus=True)
    with pytest.raises(MalformedInput):
        paillier.keypair_from_primes(KAT_P, 65520, KAT_H, unsafe_allow_short_modulus=True)
    with pytest.raises(MalformedInput):
        paillier.keypair_from_primes(KAT_P, KAT_Q, KAT_P, unsafe_allow_short_modulus=True)
    with pytest.raises(MalformedInput):  # h = 1 gives hs = 1
        paillier.keypair_from_primes(KAT_P, KAT_Q, 1, unsafe_allow_short_modulus=True)


# -- packing -----------------------------------------------------------------------------------


def _layout(modulus_bits: int = SMALL_BITS) -> PackingLayout:
    return PackingLayout(
        [Slot("count", 1), Slot("amount", 10**6), Slot("days", 366)],
        max_rows=1000,
        modulus_bits=modulus_bits,
        noise_bound=2**20,
        noise_shares=1,
    )


def test_layout_widths_follow_the_bound() -> None:
    layout = _layout()
    # count: 1*1000 + 2*2^20 < 2^22; amount: 10^9 + 2^21 < 2^30; days: 366000 + 2^21 < 2^22
    assert layout.slot_bounds == (1000 + 2**21, 10**9 + 2**21, 366_000 + 2**21)
    assert layout.widths == (22, 30, 22)
    assert layout.offsets == (0, 22, 52)
    assert layout.total_bits == 74


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_pack_unpack_round_trip(data: st.DataObject) -> None:
    maxima = data.draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=6))
    max_rows = data.draw(st.integers(1, 2**16))
    noise_bound = data.draw(st.integers(0, 2**30))
    slots = [Slot(f"s{i}", m) for i, m in enumerate(maxima)]
    layout = PackingLayout(
        slots, max_rows=max_rows, modulus_bits=3072, noise_bound=noise_bound, noise_shares=0
    )
    values = [data.draw(st.integers(0, m)) for m in maxima]
    assert layout.unpack(layout.pack(values)) == {
        s.name: v for s, v in zip(slots, values, strict=True)
    }


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.just(1), st.integers(0, 10**6), st.integers(0, 366)), min_size=1, max_size=8
    ),
    noise=st.tuples(*(st.integers(-(2**20), 2**20) for _ in range(3))),
)
def test_packed_encrypted_sum_with_signed_noise(
    small_key: tuple[DjnPublicKey, PaillierPrivateKey],
    rows: list[tuple[int, int, int]],
    noise: tuple[int, int, int],
) -> None:
    pk, sk = small_key
    layout = _layout(pk.n_bits)
    cts = [pk.encrypt(layout.pack(list(row))) for row in rows]
    cts.append(pk.encrypt(layout.pack_noise(list(noise))))
    total = pk.rerandomize(pk.sum_ciphertexts(cts, max_terms=layout.max_rows + 1))
    result = paillier.decrypt_unpack(sk, total, layout)
    assert result == {
        "count": len(rows) + noise[0],
        "amount": sum(r[1] for r in rows) + noise[1],
        "days": sum(r[2] for r in rows) + noise[2],
    }


def test_worst_case_sum_does_not_carry(small_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = small_key
    layout = PackingLayout(
        [Slot("a", 255), Slot("b", 255)],
        max_rows=4,
        modulus_bits=pk.n_bits,
        noise_bound=3,
        noise_shares=2,
    )
    top = layout.pack([255, 255])
    cts = [pk.encrypt(top) for _ in range(4)]
    cts += [pk.encrypt(layout.pack_noise([3, 3])) for _ in range(2)]
    assert paillier.decrypt_unpack(sk, pk.sum_ciphertexts(cts), layout) == {
        "a": 4 * 255 + 6,
        "b": 4 * 255 + 6,
    }
    cts = [pk.encrypt(layout.pack([0, 0])) for _ in range(4)]
    cts += [pk.encrypt(layout.pack_noise([-3, -3])) for _ in range(2)]
    assert paillier.decrypt_unpack(sk, pk.sum_ciphertexts(cts), layout) == {"a": -6, "b": -6}


def test_layout_refuses_overflowing_the_modulus() -> None:
    slots = [Slot(f"s{i}", 2**64 - 1) for i in range(47)]
    # 47 slots of 64 + 10 (1000 rows) bits = 3478 bits > 3071
    with pytest.raises(MalformedInput):
        PackingLayout(slots, max_rows=1000, modulus_bits=3072)
    layout = PackingLayout(slots[:41], max_rows=1000, modulus_bits=3072)  # 41 * 74 = 3034
    assert layout.total_bits == 3034 <= layout.capacity_bits
    with pytest.raises(MalformedInput):
        PackingLayout(slots[:42], max_rows=1000, modulus_bits=3072)  # 3108


def test_split_layouts() -> None:
    slots = [Slot(f"s{i}", 2**64 - 1) for i in range(100)]
    layouts = PackingLayout.split(slots, max_rows=1000, modulus_bits=3072)
    assert [len(layout.slots) for layout in layouts] == [41, 41, 18]
    assert [s for layout in layouts for s in layout.slots] == slots
    with pytest.raises(MalformedInput):
        PackingLayout.split([Slot("huge", 2**4000)], max_rows=1, modulus_bits=3072)


def test_pack_refuses_out_of_range_values() -> None:
    layout = _layout()
    with pytest.raises(MalformedInput):
        layout.pack([2, 0, 0])
    with pytest.raises(MalformedInput):
        layout.pack([0, -1, 0])
    with pytest.raises(MalformedInput):
        layout.pack([1, 1])
    with pytest.raises(MalformedInput):
        layout.pack_noise([0, 2**20 + 1, 0])
    with pytest.raises(MalformedInput):
        layout.pack_named({"nope": 1})
    assert layout.pack_named({"amount": 5}) == layout.pack([0, 5, 0])
    no_noise = PackingLayout([Slot("a", 1)], max_rows=1, modulus_bits=64)
    with pytest.raises(MalformedInput):
        no_noise.pack_noise([0])


def test_unpack_detects_overflowed_slot() -> None:
    layout = PackingLayout([Slot("a", 10), Slot("b", 10)], max_rows=2, modulus_bits=64)
    assert layout.widths == (5, 5)  # bound 20 < 32
    with pytest.raises(MalformedInput):
        layout.unpack(21)  # slot a above its bound of 20
    with pytest.raises(MalformedInput):
        layout.unpack(1 << 10)  # beyond the layout
    with pytest.raises(MalformedInput):
        PackingLayout([Slot("a", 1), Slot("a", 1)], max_rows=1, modulus_bits=64)
    with pytest.raises(MalformedInput):
        PackingLayout([], max_rows=1, modulus_bits=64)
    with pytest.raises(MalformedInput):
        PackingLayout([Slot("a", 1)], max_rows=0, modulus_bits=64)


# -- real key size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_3072_bit_key(real_key: tuple[DjnPublicKey, PaillierPrivateKey]) -> None:
    pk, sk = real_key
    assert pk.n_bits == 3072 and pk.exponent_bits == 1536
    assert pk.ciphertext_bytes == 768
    parsed = DjnPublicKey.from_bytes(pk.to_bytes())  # no unsafe flag needed
    assert parsed == pk
    slots = [Slot("count", 1), Slot("sum_amount", 2**40), Slot("sum_days", 366)]
    layout = PackingLayout(
        slots, max_rows=10**6, modulus_bits=pk.n_bits, noise_bound=2**40, noise_shares=1
    )
    rows = [[1, 123456789, 30], [1, 2**40, 366], [1, 0, 0]]
    cts = [
        pk.ciphertext_from_bytes(pk.ciphertext_to_bytes(pk.encrypt(layout.pack(r)))) for r in rows
    ]
    cts.append(pk.encrypt(layout.pack_noise([-5, 17, 0])))
    total = pk.ciphertext_from_bytes(pk.ciphertext_to_bytes(pk.sum_ciphertexts(cts)))
    assert paillier.decrypt_unpack(sk, total, layout) == {
        "count": 3 - 5,
        "sum_amount": 123456789 + 2**40 + 17,
        "sum_days": 396,
    }
    x = pk.random_exponent()
    assert 0 <= x < 2**1536
    assert pk.raw_obfuscator(x) == pow(pk.hs, x, pk.nsquare)
    assert math.gcd(pk.hs, pk.n) == 1
