"""Crypto suites (govshare.protocols.suite): the standards' known answers, cross-checks of every
operation against a second implementation, round trips, tampering and mixed-suite refusals.

Second implementations: ``gmssl`` (pure-Python SM2/SM3/SM4, a dev dependency) for SM3, SM4 and
SM2 with the default ID; the test-only reference ``tests/sm2_reference.py`` for SM2 on the
standard's test curve and custom IDs; tongsuopy's own SM4-GCM for the at-rest AEAD; a hand-made
HMAC over gmssl's SM3 for HKDF-SM3; the existing masks and checkpoint modules for the standard
suite's stream and note key IDs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac as std_hmac
import json
from pathlib import Path
from typing import Any

import pytest
import sm2_reference as ref
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmssl import sm2 as gm_sm2
from gmssl import sm3 as gm_sm3
from gmssl import sm4 as gm_sm4
from hypothesis import given, settings
from hypothesis import strategies as st
from tongsuopy.crypto import serialization as tongsuo_serialization
from tongsuopy.crypto.ciphers.aead import SM4GCM

from govshare.protocols import checkpoint, masks
from govshare.protocols import suite as suite_module
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import (
    SM,
    SM2_DEFAULT_ID,
    STANDARD,
    SUITE_NAMES,
    SigningKey,
    Suite,
    suite_by_name,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SUITES = (STANDARD, SM)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


SM3_VECTORS = _load("sm3.json")["vectors"]
SM4 = _load("sm4.json")
SM2 = _load("sm2.json")


def _gm_sm3(data: bytes) -> bytes:
    return bytes.fromhex(gm_sm3.sm3_hash(list(data)))


def _gm_sm4_block(key: bytes, block: bytes) -> bytes:
    cipher = gm_sm4.CryptSM4(padding_mode=gm_sm4.ZERO)
    cipher.set_key(key, gm_sm4.SM4_ENCRYPT)
    out: bytes = cipher.crypt_ecb(block)
    return out[:16]  # gmssl pads even a whole block; ECB's first block is E_K(block)


# -- registry ---------------------------------------------------------------------------------


def test_suite_by_name() -> None:
    assert suite_by_name("standard") is STANDARD
    assert suite_by_name("sm") is SM
    assert SUITE_NAMES == ("standard", "sm")
    with pytest.raises(MalformedInput):
        suite_by_name("SM")
    with pytest.raises(MalformedInput):
        suite_by_name("")


def test_suites_name_their_algorithms() -> None:
    assert (STANDARD.signature_algorithm, STANDARD.hash_name, STANDARD.cipher_name) == (
        "Ed25519",
        "SHA-256",
        "AES-256",
    )
    assert (SM.signature_algorithm, SM.hash_name, SM.cipher_name) == ("SM2-with-SM3", "SM3", "SM4")
    assert (STANDARD.cipher_key_size, SM.cipher_key_size) == (32, 16)


# -- SM3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", SM3_VECTORS, ids=lambda v: v["name"])
def test_sm3_known_answers(vector: dict[str, str]) -> None:
    message = bytes.fromhex(vector["message_hex"])
    assert message == vector["message_ascii"].encode("ascii")
    digest = bytes.fromhex(vector["digest"])
    assert SM.hash(message) == digest
    assert _gm_sm3(message) == digest
    hasher = SM.new_hasher()
    for i in range(0, len(message), 5):  # incremental, in odd-sized pieces
        hasher.update(message[i : i + 5])
    copy = hasher.copy()
    assert hasher.digest() == digest
    assert hasher.digest() == digest  # digest() does not finish the hasher
    copy.update(b"x")
    assert copy.digest() != digest


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_sm3_matches_gmssl(data: bytes) -> None:
    assert SM.hash(data) == _gm_sm3(data)


@pytest.mark.parametrize("vector", SM3_VECTORS, ids=lambda v: v["name"])
def test_sm3_fallback_hasher(vector: dict[str, str]) -> None:
    """The ``cryptography`` SM3 used where ``hashlib`` has none gives the same answers."""
    hasher = suite_module._cryptography_sm3()
    hasher.update(bytes.fromhex(vector["message_hex"]))
    assert hasher.copy().digest() == hasher.digest() == bytes.fromhex(vector["digest"])


@given(st.binary(max_size=300))
def test_standard_hash_is_sha256(data: bytes) -> None:
    assert STANDARD.hash(data) == hashlib.sha256(data).digest()
    hasher = STANDARD.new_hasher()
    hasher.update(data)
    assert hasher.digest() == hashlib.sha256(data).digest()


# -- SM4 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", SM4["block"], ids=lambda v: v["name"])
def test_sm4_block_known_answers(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(vector["key"])
    block = bytes.fromhex(vector["plaintext"])
    expected = bytes.fromhex(vector["ciphertext"])
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    for _ in range(vector["iterations"]):
        block = encryptor.update(block)
    assert block == expected
    if vector["iterations"] == 1:
        plaintext = bytes.fromhex(vector["plaintext"])
        # The suite's CTR stream starts with E_K(initial counter block).
        assert SM.stream(key, plaintext, 16) == expected
        assert _gm_sm4_block(key, plaintext) == expected


@pytest.mark.parametrize("vector", SM4["gcm"], ids=lambda v: v["name"])
def test_sm4_gcm_known_answer(vector: dict[str, str]) -> None:
    key, nonce, aad, plaintext, ciphertext, tag = (
        bytes.fromhex(vector[f]) for f in ("key", "nonce", "aad", "plaintext", "ciphertext", "tag")
    )
    sealed = SM.seal_with_nonce(key, nonce, plaintext, aad=aad)
    assert sealed == nonce + ciphertext + tag
    assert SM.open(key, sealed, aad=aad) == plaintext
    assert SM4GCM(key).encrypt(nonce, plaintext, aad) == ciphertext + tag  # tongsuopy


@pytest.mark.parametrize(
    "nonce",
    [bytes(16), bytes.fromhex("00112233445566778899aabbccddeeff"), b"\xff" * 15 + b"\xfe"],
    ids=["zero", "arbitrary", "carry_across_128_bits"],
)
def test_sm4_ctr_stream_matches_gmssl_counter_blocks(nonce: bytes) -> None:
    key = bytes(range(16))
    counter = int.from_bytes(nonce, "big")
    expected = b"".join(
        _gm_sm4_block(key, ((counter + i) % (1 << 128)).to_bytes(16, "big")) for i in range(4)
    )
    assert SM.stream(key, nonce, 64) == expected
    assert SM.stream(key, nonce, 37) == expected[:37]


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=40), st.binary(min_size=12, max_size=12))
def test_sm4_gcm_matches_tongsuo(plaintext: bytes, aad: bytes, nonce: bytes) -> None:
    key = bytes(range(16, 32))
    sealed = SM.seal_with_nonce(key, nonce, plaintext, aad=aad)
    assert sealed[12:] == SM4GCM(key).encrypt(nonce, plaintext, aad)
    assert SM4GCM(key).decrypt(nonce, sealed[12:], aad) == plaintext


def test_standard_stream_is_the_masks_aes_ctr_stream() -> None:
    key = bytes(range(32))
    words = masks.pairwise_stream(key, 10, suite=STANDARD)
    stream = STANDARD.stream(key, bytes(16), 80)
    assert [int.from_bytes(stream[i : i + 8], "little") for i in range(0, 80, 8)] == words


# -- HKDF -------------------------------------------------------------------------------------


def _hand_hkdf(
    hmac_fn: Any, hash_len: int, ikm: bytes, salt: bytes, info: bytes, length: int
) -> bytes:
    """RFC 5869 §2.2-2.3 written out: PRK = HMAC(salt, IKM); T(i) = HMAC(PRK, T(i-1) ‖ info ‖ i)."""
    prk = hmac_fn(salt or bytes(hash_len), ikm)
    okm, block = b"", b""
    for i in range(1, -(-length // hash_len) + 1):
        block = hmac_fn(prk, block + info + bytes([i]))
        okm += block
    return okm[:length]


def _hmac_gm_sm3(key: bytes, message: bytes) -> bytes:
    """HMAC (RFC 2104) by hand over gmssl's SM3 (block size 64 bytes)."""
    key = _gm_sm3(key) if len(key) > 64 else key
    key = key.ljust(64, b"\0")
    inner = _gm_sm3(bytes(b ^ 0x36 for b in key) + message)
    return _gm_sm3(bytes(b ^ 0x5C for b in key) + inner)


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return std_hmac.new(key, message, hashlib.sha256).digest()


def test_hkdf_sha256_rfc5869_case_1() -> None:
    okm = STANDARD.kdf(
        b"\x0b" * 22,
        salt=bytes(range(13)),
        info=bytes(range(0xF0, 0xFA)),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.mark.parametrize("salt", [b"", bytes(range(13)), b"s" * 100], ids=["none", "13", "100"])
@pytest.mark.parametrize("length", [16, 32, 42, 100])
def test_hkdf_sm3_follows_rfc5869_by_hand(salt: bytes, length: int) -> None:
    ikm, info = b"\x0b" * 22, b"govshare/test/hkdf"
    expected = _hand_hkdf(_hmac_gm_sm3, 32, ikm, salt, info, length)
    assert SM.kdf(ikm, salt=salt or None, info=info, length=length) == expected
    # The same construction with SHA-256 gives the standard suite's answer: the hand-made
    # HKDF is the RFC's, so the SM suite differs only in its hash.
    assert STANDARD.kdf(ikm, salt=salt or None, info=info, length=length) == _hand_hkdf(
        _hmac_sha256, 32, ikm, salt, info, length
    )
    assert SM.kdf(ikm, salt=salt or None, info=info, length=length) != STANDARD.kdf(
        ikm, salt=salt or None, info=info, length=length
    )


def test_hmac_sm3_by_hand_matches_cryptography() -> None:
    from cryptography.hazmat.primitives import hmac

    for key in (b"k", b"k" * 64, b"k" * 65):
        mac = hmac.HMAC(key, hashes.SM3())
        mac.update(b"message")
        assert mac.finalize() == _hmac_gm_sm3(key, b"message")


@pytest.mark.parametrize("key", [b"k", b"k" * 64, b"k" * 65], ids=["short", "block", "long"])
def test_suite_mac_is_the_suites_hmac(key: bytes) -> None:
    """The masking pseudonyms' HMAC: HMAC-SM3 (checked against gmssl's SM3 by hand) under sm."""
    assert SM.mac(key, b"110101199003070011") == _hmac_gm_sm3(key, b"110101199003070011")
    assert STANDARD.mac(key, b"x") == std_hmac.new(key, b"x", hashlib.sha256).digest()


# -- SM2 --------------------------------------------------------------------------------------


def _sm2_vector_parts(vector: dict[str, str]) -> tuple[ref.Curve, bytes, ref.Point, bytes]:
    curve = ref.curve_from_json(SM2["curves"][vector["curve"]])
    public = (int(vector["public_x"], 16), int(vector["public_y"], 16))
    user_id = vector["user_id_ascii"].encode("ascii")
    return curve, user_id, public, vector["message_ascii"].encode("ascii")


def _raw_public(vector: dict[str, str]) -> bytes:
    return b"\x04" + bytes.fromhex(vector["public_x"]) + bytes.fromhex(vector["public_y"])


def _raw_signature(vector: dict[str, str]) -> bytes:
    return bytes.fromhex(vector["r"]) + bytes.fromhex(vector["s"])


@pytest.mark.parametrize("vector", SM2["vectors"], ids=lambda v: v["name"])
def test_sm2_vectors_with_reference(vector: dict[str, Any]) -> None:
    curve, user_id, public, message = _sm2_vector_parts(vector)
    d = int(vector["private_key"], 16)
    assert ref.public_key(curve, d) == public
    signature = (int(vector["r"], 16), int(vector["s"], 16))
    assert ref.verify(curve, user_id, public, message, signature) is vector["valid"]
    if vector["valid"]:
        # The standard's intermediate values and its signature from its k.
        assert ref.z_value(curve, user_id, public).hex() == vector["z"]
        assert ref.message_digest(curve, user_id, public, message) == int(vector["e"], 16)
        assert ref.sign_with_k(curve, user_id, d, message, int(vector["k"], 16)) == signature


BINDING_VECTORS = [
    v
    for v in SM2["vectors"]
    if v["curve"] == "recommended" and v["user_id_ascii"].encode() == SM2_DEFAULT_ID
]


def test_binding_vectors_include_valid_and_invalid() -> None:
    assert {v["valid"] for v in BINDING_VECTORS} == {True, False}


@pytest.mark.parametrize("vector", BINDING_VECTORS, ids=lambda v: v["name"])
def test_sm2_vectors_with_suite(vector: dict[str, Any]) -> None:
    """The binding on the standard's recommended-curve, default-ID example: verification only
    (tongsuopy draws k itself)."""
    key = SM.signing_key_from_bytes(bytes.fromhex(vector["private_key"]))
    assert SM.public_key(key) == _raw_public(vector)
    message = vector["message_ascii"].encode("ascii")
    if vector["valid"]:
        SM.verify(_raw_public(vector), message, _raw_signature(vector))
    else:
        with pytest.raises(VerificationFailed):
            SM.verify(_raw_public(vector), message, _raw_signature(vector))


def _sample_key() -> tuple[SigningKey, int, ref.Point]:
    sample = BINDING_VECTORS[0]
    assert sample["valid"]
    d = int(sample["private_key"], 16)
    return SM.signing_key_from_bytes(d.to_bytes(32, "big")), d, ref.public_key(ref.RECOMMENDED, d)


def test_sm2_binding_signature_verified_by_reference_and_gmssl() -> None:
    key, _, public = _sample_key()
    assert public is not None
    for message in (b"", b"message digest", b"\x00" * 1000):
        signature = SM.sign(key, message)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        assert ref.verify(ref.RECOMMENDED, SM2_DEFAULT_ID, public, message, (r, s))
        gm = gm_sm2.CryptSM2(private_key=None, public_key=SM.public_key(key)[1:].hex())
        assert gm.verify_with_sm3(signature.hex(), message)
        # Under another ID the same signature is not valid: the binding uses the default ID.
        assert not ref.verify(ref.RECOMMENDED, b"ALICE123@YAHOO.COM", public, message, (r, s))


def test_sm2_fresh_key_signature_verified_by_reference() -> None:
    key = SM.generate_signing_key()
    raw = SM.public_key(key)
    public = (int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big"))
    d = int.from_bytes(SM.signing_key_bytes(key), "big")
    assert ref.public_key(ref.RECOMMENDED, d) == public
    signature = SM.sign(key, b"fresh")
    rs = (int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    assert ref.verify(ref.RECOMMENDED, SM2_DEFAULT_ID, public, b"fresh", rs)


def test_sm2_other_implementations_signatures_verified_by_suite() -> None:
    key, d, _ = _sample_key()
    public = SM.public_key(key)
    gm = gm_sm2.CryptSM2(private_key=f"{d:064x}", public_key=public[1:].hex())
    for i in range(5):
        message = b"from gmssl %d" % i
        SM.verify(public, message, bytes.fromhex(gm.sign_with_sm3(message)))
        r, s = ref.sign_with_k(ref.RECOMMENDED, SM2_DEFAULT_ID, d, message, 0x1234567 + i)
        SM.verify(public, message, r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        with pytest.raises(VerificationFailed):
            SM.verify(public, message + b"!", r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def test_sm2_private_key_range() -> None:
    n = ref.RECOMMENDED.n
    for bad in (bytes(32), (n - 1).to_bytes(32, "big"), n.to_bytes(32, "big"), bytes(31)):
        with pytest.raises(MalformedInput):
            SM.signing_key_from_bytes(bad)
    SM.signing_key_from_bytes((n - 2).to_bytes(32, "big"))


def test_sm2_public_key_encodings() -> None:
    key = SM.generate_signing_key()
    raw = SM.public_key(key)
    der = SM.public_key_der(raw)
    assert der == key._key.public_key().public_bytes(
        tongsuo_serialization.Encoding.DER,
        tongsuo_serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    assert SM.public_key_from_der(der) == raw
    off_curve = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(MalformedInput):
        SM.public_key_der(off_curve)
    with pytest.raises(MalformedInput):
        SM.verify(off_curve, b"m", SM.sign(key, b"m"))
    compressed = key._key.public_key().public_bytes(
        tongsuo_serialization.Encoding.X962, tongsuo_serialization.PublicFormat.CompressedPoint
    )
    with pytest.raises(MalformedInput):
        SM.verify(compressed, b"m", SM.sign(key, b"m"))


def test_standard_public_key_encodings() -> None:
    from cryptography.hazmat.primitives import serialization

    key = STANDARD.generate_signing_key()
    raw = STANDARD.public_key(key)
    der = STANDARD.public_key_der(raw)
    assert der == key._key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert STANDARD.public_key_from_der(der) == raw


# -- every suite: round trips, tampering, mixing ----------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_sign_verify_round_trip_and_tampering(suite: Suite) -> None:
    key = suite.generate_signing_key()
    public = suite.public_key(key)
    assert len(public) == suite.public_key_size
    message = b"govshare signed request"
    signature = suite.sign(key, message)
    assert len(signature) == suite.signature_size == 64
    suite.verify(public, message, signature)
    for bad_message, bad_signature in (
        (message + b".", signature),
        (message, signature[:-1] + bytes([signature[-1] ^ 1])),
        (message, bytes([signature[0] ^ 0x80]) + signature[1:]),
        (message, signature[:63]),
        (message, signature + b"\0"),
        (message, bytes(64)),
    ):
        with pytest.raises(VerificationFailed):
            suite.verify(public, bad_message, bad_signature)
    other = suite.public_key(suite.generate_signing_key())
    with pytest.raises(VerificationFailed):
        suite.verify(other, message, signature)
    restored = suite.signing_key_from_bytes(suite.signing_key_bytes(key))
    assert suite.public_key(restored) == public
    suite.verify(public, message, suite.sign(restored, message))
    assert "_key" not in repr(key) and suite.signing_key_bytes(key).hex() not in repr(key)


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_key_objects_carry_their_suite(suite: Suite) -> None:
    key = suite.generate_signing_key()
    restored = suite.signing_key_from_pem(key.to_pem())
    public = suite.verify_key(suite.public_key(key))
    assert restored.public_key() == public == key.public_key()
    assert public.public_bytes_raw() == suite.public_key(key)
    message = b"a grant"
    public.verify(restored.sign(message), message)
    with pytest.raises(VerificationFailed):
        public.verify(restored.sign(message), message + b"!")
    other = SM if suite is STANDARD else STANDARD
    with pytest.raises(MalformedInput):
        other.signing_key_from_pem(key.to_pem())
    with pytest.raises(MalformedInput):
        other.verify_key(public.raw)
    with pytest.raises(MalformedInput):
        suite.signing_key_from_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )


def test_mixed_suites_refused() -> None:
    ed_key, sm_key = STANDARD.generate_signing_key(), SM.generate_signing_key()
    ed_public, sm_public = STANDARD.public_key(ed_key), SM.public_key(sm_key)
    message = b"one message"
    ed_signature, sm_signature = STANDARD.sign(ed_key, message), SM.sign(sm_key, message)
    # A signature of one suite under the other suite's key and rules.
    with pytest.raises(VerificationFailed):
        SM.verify(sm_public, message, ed_signature)
    with pytest.raises(VerificationFailed):
        STANDARD.verify(ed_public, message, sm_signature)
    # A key of one suite handed to the other.
    with pytest.raises(MalformedInput):
        SM.verify(ed_public, message, ed_signature)
    with pytest.raises(MalformedInput):
        STANDARD.verify(sm_public, message, sm_signature)
    with pytest.raises(MalformedInput):
        SM.public_key_from_der(STANDARD.public_key_der(ed_public))
    with pytest.raises(MalformedInput):
        STANDARD.public_key_from_der(SM.public_key_der(sm_public))
    with pytest.raises(TypeError):
        SM.sign(ed_key, message)
    with pytest.raises(TypeError):
        STANDARD.sign(sm_key, message)
    with pytest.raises(TypeError):
        STANDARD.public_key(sm_key)
    with pytest.raises(MalformedInput):
        SM.note_key_id("log.example/a", ed_public)
    with pytest.raises(TypeError):
        SM.seal(bytes(32), b"a 32-byte key is AES-256's, not SM4's")


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_seal_open_round_trip_and_tampering(suite: Suite) -> None:
    key = bytes(range(suite.cipher_key_size))
    sealed = suite.seal(key, b"resident 110101199003077777", aad=b"dataset:tax.residents")
    assert b"110101199003077777" not in sealed
    assert len(sealed) == suite.nonce_size + 27 + suite.tag_size
    assert suite.open(key, sealed, aad=b"dataset:tax.residents") == b"resident 110101199003077777"
    assert suite.seal(key, b"x") != suite.seal(key, b"x")  # fresh nonces
    for i in (0, suite.nonce_size, len(sealed) - 1):
        tampered = sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :]
        with pytest.raises(VerificationFailed):
            suite.open(key, tampered, aad=b"dataset:tax.residents")
    with pytest.raises(VerificationFailed):
        suite.open(key, sealed, aad=b"dataset:social.benefits")
    with pytest.raises(VerificationFailed):
        suite.open(bytes(suite.cipher_key_size), sealed, aad=b"dataset:tax.residents")
    with pytest.raises(MalformedInput):
        suite.open(key, sealed[: suite.nonce_size + suite.tag_size - 1])
    assert suite.open(key, suite.seal(key, b"")) == b""


def test_standard_seal_is_aes_256_gcm() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, nonce = bytes(range(32)), bytes(range(12))
    sealed = STANDARD.seal_with_nonce(key, nonce, b"plaintext", aad=b"aad")
    assert sealed == nonce + AESGCM(key).encrypt(nonce, b"plaintext", b"aad")


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_stream_and_kdf_arguments(suite: Suite) -> None:
    key = suite.kdf(b"shared secret", info=b"govshare/test", length=suite.cipher_key_size)
    assert suite.stream(key, bytes(16), 0) == b""
    assert suite.stream(key, bytes(16), 100)[:50] == suite.stream(key, bytes(16), 50)
    assert suite.stream(key, bytes(16), 32) != suite.stream(key, b"\1" + bytes(15), 32)
    with pytest.raises(TypeError):
        suite.stream(key[:-1], bytes(16), 16)
    with pytest.raises(TypeError):
        suite.stream(key, bytes(12), 16)


# -- signed notes -----------------------------------------------------------------------------


def test_standard_note_key_id_is_c2sp_ed25519() -> None:
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    key = STANDARD.signing_key_from_bytes(bytes(range(32)))
    public = STANDARD.public_key(key)
    assert STANDARD.note_signature_type == b"\x01"
    # C2SP signed-note: SHA-256(name || 0x0A || 0x01 || public key)[:4], computed by hand.
    by_hand = hashlib.sha256(
        b"log.example/a\n\x01" + private.public_key().public_bytes_raw()
    ).digest()[:4]
    assert STANDARD.note_key_id("log.example/a", public) == by_hand
    assert checkpoint.signer_key_id("log.example/a", key.public_key()) == by_hand
    # Ed25519 is deterministic: the suite signs exactly as pyca's Ed25519 does.
    note_signature = checkpoint.sign_note(b"text\n", "log.example/a", key)
    assert note_signature.signature == private.sign(b"text\n") == STANDARD.sign(key, b"text\n")


def test_sm_note_key_id() -> None:
    key, _, _ = _sample_key()
    public = SM.public_key(key)
    assert SM.note_signature_type == b"\xffgovshare-sm2-sm3"
    expected = _gm_sm3(b"log.example/a\n\xffgovshare-sm2-sm3" + public)[:4]
    assert SM.note_key_id("log.example/a", public) == expected
    assert SM.note_key_id("log.example/b", public) != expected


def test_binding_has_no_sm2_ecdh() -> None:
    """Why ECDH-PSI stays on X25519 under the SM suite (protocols/suite.py's docstring): the
    binding refuses ECDH on SM2 keys. If this starts to pass, PSI on the SM2 curve is open."""
    from tongsuopy.crypto.asymciphers import ec
    from tongsuopy.crypto.exceptions import InternalError

    ours = ec.generate_private_key(ec.SM2())
    theirs = ec.generate_private_key(ec.SM2()).public_key()
    with pytest.raises(InternalError, match="operation not supported for this keytype"):
        ours.exchange(ec.ECDH(), theirs)


def test_sm2_signed_note_vector() -> None:
    """tests/vectors/sm2_note.json: the SM suite's signed-note signature, every field recomputed."""
    vector = _load("sm2_note.json")
    d, k = int(vector["private_key"], 16), int(vector["k"], 16)
    text = vector["text"].encode("utf-8")
    key = SM.signing_key_from_bytes(d.to_bytes(32, "big"))
    public = SM.public_key(key)
    assert public.hex() == vector["public_key"]
    assert SM.note_signature_type.hex() == vector["signature_type"]
    assert (
        k == int.from_bytes(SM.hash(b"govshare/test-vector/sm2-note/k"), "big") % ref.RECOMMENDED.n
    )
    r, s = ref.sign_with_k(ref.RECOMMENDED, SM2_DEFAULT_ID, d, text, k)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert signature.hex() == vector["signature"]
    SM.verify(public, text, signature)
    key_id = SM.note_key_id(vector["key_name"], public)
    assert key_id.hex() == vector["key_id"]
    blob = base64.b64encode(key_id + signature).decode()
    assert vector["signature_line"] == f"\u2014 {vector['key_name']} {blob}\n"
    assert vector["note"] == vector["text"] + "\n" + vector["signature_line"]
    with pytest.raises(VerificationFailed):
        SM.verify(public, text.replace(b"42", b"43"), signature)
