"""Crypto suites: the one place that chooses govshare's primitives (issue 12).

A federation runs on one suite, named in its roster; every signature, hash, key derivation,
mask stream and at-rest encryption goes through that suite's object, so nothing else has to name
an algorithm.

======================  =================================  ========================================
operation               ``STANDARD``                       ``SM`` (国密)
======================  =================================  ========================================
signatures              Ed25519 (RFC 8032)                 SM2 with SM3 (GB/T 32918.2-2016,
                                                           GB/T 35276-2017), recommended curve
                                                           (GB/T 32918.5), distinguishing ID
                                                           ``"1234567812345678"`` (GM/T 0009-2012
                                                           §10 / GB/T 35276 default)
hash, Merkle tree       SHA-256                            SM3 (GB/T 32905-2016)
key derivation          HKDF-SHA256 (RFC 5869)             HKDF-SM3 (RFC 5869 with SM3)
mask streams            AES-256-CTR                        SM4-CTR (GB/T 32907-2016)
data at rest            AES-256-GCM                        SM4-GCM (GB/T 36624-2018, RFC 8998)
signed-note type        0x01 (C2SP signed-note)            0xff ‖ ``"govshare-sm2-sm3"``
cosignature type        0x04 (C2SP tlog-cosignature/v1)    0xff ‖ ``"govshare-sm2-sm3-``
                                                           ``cosignature/v1"``
======================  =================================  ========================================

Signed-note signature types (c2sp.org/signed-note; a key ID is an identifier, not security):

- **Ed25519, type 0x01** (assigned by C2SP): signature = 64-byte RFC 8032 signature over the note
  text; ``key ID = SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ 32-byte public key)[:4]``.
- **SM2-with-SM3, type 0xff ‖ "govshare-sm2-sm3"**: C2SP reserves 0xff for types it has not
  assigned and recommends that a longer identifier follow it; this is ours. Signature = ``r ‖ s``,
  each a 32-byte big-endian integer (64 bytes, fixed width, not DER), an SM2 signature over the
  note text with SM3 and the default ID; ``key ID = SM3(key name ‖ 0x0A ‖ 0xff ‖
  "govshare-sm2-sm3" ‖ 65-byte uncompressed public key 0x04 ‖ x ‖ y)[:4]``. The key ID hashes with
  SM3, not with the SHA-256 that C2SP recommends for its assigned types, so that the SM suite uses
  no algorithm outside GB/T; a verifier knows the suite from the roster before it reads a note.
- **SM2 witness cosignatures, type 0xff ‖ "govshare-sm2-sm3-cosignature/v1"**: the shape of
  tlog-cosignature/v1 with SM2 in place of Ed25519: the signed message is ``"cosignature/v1\n"
  "time <t>\n"`` ‖ note text, the signature ``u64 big-endian t ‖ r ‖ s`` (72 bytes); key ID as
  above with this type.

Encodings: :meth:`Suite.public_key` is the raw key (Ed25519: 32 bytes; SM2: 65-byte uncompressed
X9.62/SEC1 point); :meth:`Suite.public_key_der` the stable SubjectPublicKeyInfo DER (Ed25519 OID
1.3.101.112; SM2: id-ecPublicKey with curve 1.2.156.10197.1.301). Both suites' signatures are
64 bytes. A key, a public key or a signature of one suite is refused by the other: a signing key
carries its suite's name (:class:`TypeError` otherwise), a public key of the wrong length or
curve is :class:`MalformedInput`, and a signature that is not the suite's own fails as
:class:`VerificationFailed`.

Libraries, and why:

- ``cryptography`` gives SHA-256, SM3, AES, SM4 and their CTR and GCM modes (``modes.GCM`` takes
  SM4 as well as AES, on the OpenSSL it bundles), HMAC and HKDF over either hash, and Ed25519.
  For SM3 the incremental hasher is ``hashlib``'s where the system OpenSSL has SM3 (cheaper per
  call; the answers are the same, and a test holds the fallback to the standard's vectors).
- SM2 signatures come from ``tongsuopy``, the Python binding of Tongsuo (铜锁, the OpenAtom
  Foundation's OpenSSL fork that carries China's commercial-cryptography algorithms; Apache-2.0).
  ``cryptography`` has no SM2; ``gmssl`` (PyPI) is pure Python, variable-time and has had key
  parsing bugs, so it is only a test cross-check here. tongsuopy signs with ``EVP_DigestSign`` on
  an SM2 key, which computes Z_A with the default ID and SM3: the tests check that against the
  GB/T 32918.5 Annex A signature (recommended curve, default ID), against ``gmssl`` and against
  a test-only reference (``tests/sm2_reference.py``). Caveat: tongsuopy's last release (1.0.1)
  is of February 2023 and bundles a Tongsuo built on OpenSSL 1.1.1; its API is pyca-shaped, so a
  successor binding would replace one class here (``_SM2Signatures``).

Decisions:

- **HKDF-SM3, not the GM/T 0003.4 KDF.** HKDF's extract-then-expand with a salt and an ``info``
  string is how govshare separates domains (masks bind the query id and both node names in
  ``info``); with SM3 in place of SHA-256 the structure and its argument (HMAC as a PRF) carry
  over unchanged, and TLS 1.3's SM suites (RFC 8998) use exactly HKDF with SM3. The GM/T KDF,
  ``SM3(Z ‖ counter)`` blocks, has no extraction step and no ``info``; it is made for SM2
  encryption and key exchange, where Z is a shared point.
- **Randomness.** Ed25519 is deterministic. SM2 draws its nonce ``k`` inside Tongsuo, whose API
  takes none, so the SM suite has no explicit-nonce signing variant (STYLE.md §2): its known
  answers are verifications, and the test reference signs with the standard's ``k``.
  :meth:`Suite.seal` draws a 96-bit GCM nonce from ``os.urandom``; :meth:`Suite.seal_with_nonce`
  takes it (known answers only: a nonce must never repeat under one key).
- **Key sizes.** AES keys are 256-bit; SM4 has 128-bit keys only. Callers derive keys of
  :attr:`Suite.cipher_key_size` with :meth:`Suite.kdf`, never by truncating a key.
- **What stays outside the suite.** ECDH-PSI and the masks' key agreement stay on X25519 in both
  suites: tongsuopy 1.0.1 refuses ECDH on SM2 keys (``EVP_PKEY_derive_init``: "operation not
  supported for this keytype"; a test pins it) and exposes no point arithmetic, and ECDH-PSI
  needs a scalar multiplication of arbitrary points. Under SM, PSI's hashing of items can still
  use SM3. TLS stays ECDSA P-256: gRPC's TLS stack has no TLCP (GB/T 38636). Paillier and BFV
  are not national-standard algorithms and have no SM counterpart.

Leakage: none beyond the primitives'. Security: Ed25519 under EUF-CMA; SM2 signatures under the
ECDLP on the SM2 curve (random-oracle analyses of the SM2 scheme); SM4 and AES as PRPs for CTR
and GCM; HMAC-SM3 / HMAC-SHA256 as PRFs for HKDF.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tongsuopy.crypto import hashes as tongsuo_hashes
from tongsuopy.crypto import serialization as tongsuo_serialization
from tongsuopy.crypto.asymciphers import ec as tongsuo_ec
from tongsuopy.crypto.exceptions import InvalidSignature as TongsuoInvalidSignature
from tongsuopy.crypto.exceptions import UnsupportedAlgorithm as TongsuoUnsupportedAlgorithm

from govshare.protocols.errors import MalformedInput, VerificationFailed

__all__ = [
    "SM",
    "SM2_DEFAULT_ID",
    "STANDARD",
    "SUITE_NAMES",
    "Hasher",
    "SigningKey",
    "Suite",
    "VerifyKey",
    "suite_by_name",
]

# GM/T 0009-2012 §10 and GB/T 35276-2017: the user ID signers use when none is agreed.
SM2_DEFAULT_ID: Final = b"1234567812345678"
# GB/T 32918.5-2017: order n of the recommended curve's base point.
_SM2_ORDER: Final = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123", 16)
_SCALAR_BYTES: Final = 32
_SIGNATURE_BYTES: Final = 64  # Ed25519; SM2 as r ‖ s
_BLOCK_BYTES: Final = 16  # AES and SM4 blocks; CTR counter blocks
_GCM_NONCE_BYTES: Final = 12  # SP 800-38D's recommended IV length
_GCM_TAG_BYTES: Final = 16
# Fixed SubjectPublicKeyInfo prefixes: SEQUENCE { AlgorithmIdentifier, BIT STRING { key } }.
_ED25519_SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
_SM2_SPKI_PREFIX: Final = bytes.fromhex(
    "3059301306072a8648ce3d020106082a811ccf5501822d034200"
)  # id-ecPublicKey, curve sm2p256v1 (1.2.156.10197.1.301)
_SM2_NOTE_TYPE: Final = b"\xff" + b"govshare-sm2-sm3"
_SM2_COSIGNATURE_TYPE: Final = b"\xff" + b"govshare-sm2-sm3-cosignature/v1"


class Hasher(Protocol):
    """An incremental hash (what :func:`hashlib.sha256` returns)."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...

    def copy(self) -> Hasher: ...


class _CryptographyHasher:
    """:class:`Hasher` over ``cryptography``'s ``hashes.Hash`` (for SM3, which ``hashlib`` has
    only when the system OpenSSL does)."""

    __slots__ = ("_hash",)

    def __init__(self, hash_: hashes.Hash) -> None:
        self._hash = hash_

    def update(self, data: bytes, /) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.copy().finalize()

    def copy(self) -> _CryptographyHasher:
        return _CryptographyHasher(self._hash.copy())


@dataclass(frozen=True)
class SigningKey:
    """A member's private signing key, tagged with the name of the suite that made it.

    Shaped like ``cryptography``'s private keys (``sign``, ``public_key``) so that callers hold
    one object and never name the algorithm."""

    suite: str
    _key: Any = field(repr=False)

    def sign(self, message: bytes) -> bytes:
        """64-byte signature under this key's suite."""
        return suite_by_name(self.suite).sign(self, message)

    def public_key(self) -> VerifyKey:
        suite = suite_by_name(self.suite)
        return VerifyKey(self.suite, suite.public_key(self))

    def to_pem(self) -> bytes:
        """PKCS #8 PEM, unencrypted (the identity bundle's ``signing.key``, mode 0600)."""
        return suite_by_name(self.suite)._signatures.private_pem(self._key)


@dataclass(frozen=True)
class VerifyKey:
    """A member's public signing key (raw bytes, see :meth:`Suite.public_key`) with its suite.

    Build it with :meth:`Suite.verify_key`, which checks the encoding."""

    suite: str
    raw: bytes

    def verify(self, signature: bytes, message: bytes) -> None:
        """``cryptography``'s argument order (signature, then message).

        Raises:
            VerificationFailed: the signature does not verify under this key and suite.
        """
        suite_by_name(self.suite).verify(self.raw, message, signature)

    def public_bytes_raw(self) -> bytes:
        return self.raw


class _Signatures(Protocol):
    algorithm: str
    public_key_size: int

    def generate(self) -> Any: ...

    def from_private_bytes(self, raw: bytes) -> Any: ...

    def private_bytes(self, key: Any) -> bytes: ...

    def private_pem(self, key: Any) -> bytes: ...

    def from_private_pem(self, pem: bytes) -> Any: ...

    def public_bytes(self, key: Any) -> bytes: ...

    def public_der(self, public: bytes) -> bytes: ...

    def public_from_der(self, der: bytes) -> bytes: ...

    def sign(self, key: Any, message: bytes) -> bytes: ...

    def verify(self, public: bytes, message: bytes, signature: bytes) -> None: ...


class _Ed25519Signatures:
    algorithm = "Ed25519"
    public_key_size = 32

    def generate(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.generate()

    def from_private_bytes(self, raw: bytes) -> Ed25519PrivateKey:
        if len(raw) != _SCALAR_BYTES:
            raise MalformedInput("an Ed25519 private key is 32 bytes", field="private_key")
        return Ed25519PrivateKey.from_private_bytes(raw)

    def private_bytes(self, key: Ed25519PrivateKey) -> bytes:
        return key.private_bytes_raw()

    def private_pem(self, key: Ed25519PrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def from_private_pem(self, pem: bytes) -> Ed25519PrivateKey:
        try:
            key = serialization.load_pem_private_key(pem, None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise MalformedInput("not a PEM private key of the standard suite") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise MalformedInput("not an Ed25519 private key (the standard suite's)")
        return key

    def public_bytes(self, key: Ed25519PrivateKey) -> bytes:
        return key.public_key().public_bytes_raw()

    def _load(self, public: bytes) -> Ed25519PublicKey:
        if len(public) != self.public_key_size:
            raise MalformedInput("an Ed25519 public key is 32 bytes", field="public_key")
        return Ed25519PublicKey.from_public_bytes(public)

    def public_der(self, public: bytes) -> bytes:
        self._load(public)
        return _ED25519_SPKI_PREFIX + public

    def public_from_der(self, der: bytes) -> bytes:
        if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
            raise MalformedInput("not an Ed25519 SubjectPublicKeyInfo", field="public_key")
        public = der[len(_ED25519_SPKI_PREFIX) :]
        self._load(public)
        return public

    def sign(self, key: Ed25519PrivateKey, message: bytes) -> bytes:
        return key.sign(message)

    def verify(self, public: bytes, message: bytes, signature: bytes) -> None:
        loaded = self._load(public)
        if len(signature) != _SIGNATURE_BYTES:
            raise VerificationFailed("signature verification failed")
        try:
            loaded.verify(signature, message)
        except InvalidSignature:
            raise VerificationFailed("signature verification failed") from None


class _SM2Signatures:
    """SM2 with SM3 and the default ID, through tongsuopy (see the module docstring)."""

    algorithm = "SM2-with-SM3"
    public_key_size = 65

    def generate(self) -> Any:
        return tongsuo_ec.generate_private_key(tongsuo_ec.SM2())

    def from_private_bytes(self, raw: bytes) -> Any:
        d = int.from_bytes(raw, "big")
        # GB/T 32918.1 §6.1: d in [1, n-2] (1 + d must be invertible mod n).
        if len(raw) != _SCALAR_BYTES or not 1 <= d <= _SM2_ORDER - 2:
            raise MalformedInput(
                "an SM2 private key is 32 bytes, 1 <= d <= n-2", field="private_key"
            )
        return tongsuo_ec.derive_private_key(d, tongsuo_ec.SM2())

    def private_bytes(self, key: Any) -> bytes:
        value: int = key.private_numbers().private_value
        return value.to_bytes(_SCALAR_BYTES, "big")

    def private_pem(self, key: Any) -> bytes:
        pem: bytes = key.private_bytes(
            tongsuo_serialization.Encoding.PEM,
            tongsuo_serialization.PrivateFormat.PKCS8,
            tongsuo_serialization.NoEncryption(),
        )
        return pem

    def from_private_pem(self, pem: bytes) -> Any:
        try:
            key = tongsuo_serialization.load_pem_private_key(pem, None)
        except (ValueError, TypeError, TongsuoUnsupportedAlgorithm):
            raise MalformedInput("not an SM2 private key (the SM suite's)") from None
        if not isinstance(key, tongsuo_ec.EllipticCurvePrivateKey) or key.curve.name != "SM2":
            raise MalformedInput("not an SM2 private key (the SM suite's)")
        return key

    def public_bytes(self, key: Any) -> bytes:
        raw: bytes = key.public_key().public_bytes(
            tongsuo_serialization.Encoding.X962,
            tongsuo_serialization.PublicFormat.UncompressedPoint,
        )
        return raw

    def _load(self, public: bytes) -> Any:
        if len(public) != self.public_key_size or public[0] != 0x04:
            raise MalformedInput(
                "an SM2 public key is a 65-byte uncompressed point", field="public_key"
            )
        try:
            return tongsuo_ec.EllipticCurvePublicKey.from_encoded_point(tongsuo_ec.SM2(), public)
        except ValueError:
            raise MalformedInput("not a point on the SM2 curve", field="public_key") from None

    def public_der(self, public: bytes) -> bytes:
        self._load(public)
        return _SM2_SPKI_PREFIX + public

    def public_from_der(self, der: bytes) -> bytes:
        if len(der) != len(_SM2_SPKI_PREFIX) + 65 or not der.startswith(_SM2_SPKI_PREFIX):
            raise MalformedInput("not an SM2 SubjectPublicKeyInfo", field="public_key")
        public = der[len(_SM2_SPKI_PREFIX) :]
        self._load(public)
        return public

    def sign(self, key: Any, message: bytes) -> bytes:
        der = key.sign(message, tongsuo_ec.ECDSA(tongsuo_hashes.SM3()))
        r, s = decode_dss_signature(bytes(der))
        return r.to_bytes(_SCALAR_BYTES, "big") + s.to_bytes(_SCALAR_BYTES, "big")

    def verify(self, public: bytes, message: bytes, signature: bytes) -> None:
        loaded = self._load(public)
        if len(signature) != _SIGNATURE_BYTES:
            raise VerificationFailed("signature verification failed")
        r = int.from_bytes(signature[:_SCALAR_BYTES], "big")
        s = int.from_bytes(signature[_SCALAR_BYTES:], "big")
        # GB/T 32918.2 §7.1 B1-B2: r and s in [1, n-1].
        if not (1 <= r < _SM2_ORDER and 1 <= s < _SM2_ORDER):
            raise VerificationFailed("signature verification failed")
        try:
            loaded.verify(
                encode_dss_signature(r, s), message, tongsuo_ec.ECDSA(tongsuo_hashes.SM3())
            )
        except TongsuoInvalidSignature:
            raise VerificationFailed("signature verification failed") from None


@dataclass(frozen=True, eq=False)
class Suite:
    """One federation's choice of primitives. Use :data:`STANDARD`, :data:`SM` or
    :func:`suite_by_name`; never build one elsewhere."""

    name: str
    hash_name: str
    cipher_name: str
    cipher_key_size: int  # bytes, for stream() and seal()/open()
    note_signature_type: bytes  # type byte(s) of a signed-note signature, see module docstring
    cosignature_type: bytes  # type byte(s) of a witness cosignature (tlog-cosignature/v1 shape)
    _signatures: _Signatures = field(repr=False)
    _hash_algorithm: Callable[[], hashes.HashAlgorithm] = field(repr=False)
    _new_hasher: Callable[[], Hasher] = field(repr=False)
    _cipher: Callable[[bytes], CipherAlgorithm] = field(repr=False)

    digest_size: int = 32
    signature_size: int = _SIGNATURE_BYTES
    nonce_size: int = _GCM_NONCE_BYTES
    tag_size: int = _GCM_TAG_BYTES

    @property
    def signature_algorithm(self) -> str:
        return self._signatures.algorithm

    @property
    def public_key_size(self) -> int:
        return self._signatures.public_key_size

    # -- signatures ----------------------------------------------------------------------

    def generate_signing_key(self) -> SigningKey:
        return SigningKey(self.name, self._signatures.generate())

    def signing_key_from_bytes(self, raw: bytes) -> SigningKey:
        """Load a 32-byte private key (Ed25519 seed; SM2 scalar d, big-endian).

        Raises:
            MalformedInput: wrong length, or an SM2 scalar outside [1, n-2].
        """
        return SigningKey(self.name, self._signatures.from_private_bytes(bytes(raw)))

    def signing_key_from_pem(self, pem: bytes) -> SigningKey:
        """Load a PKCS #8 PEM private key of this suite (what :meth:`SigningKey.to_pem` wrote).

        Raises:
            MalformedInput: not PEM, or a key of another algorithm or suite.
        """
        return SigningKey(self.name, self._signatures.from_private_pem(bytes(pem)))

    def verify_key(self, public_key: bytes) -> VerifyKey:
        """A checked :class:`VerifyKey` from raw public bytes.

        Raises:
            MalformedInput: not a public key of this suite.
        """
        self._signatures.public_der(bytes(public_key))
        return VerifyKey(self.name, bytes(public_key))

    def signing_key_bytes(self, key: SigningKey) -> bytes:
        """The 32 private bytes of ``key``: a secret, for the keystore only."""
        return self._signatures.private_bytes(self._own(key))

    def public_key(self, key: SigningKey) -> bytes:
        """Raw public key: Ed25519 32 bytes, SM2 65-byte uncompressed point."""
        return self._signatures.public_bytes(self._own(key))

    def public_key_der(self, public_key: bytes) -> bytes:
        """SubjectPublicKeyInfo DER of a raw public key (the stable encoding).

        Raises:
            MalformedInput: ``public_key`` is not a key of this suite.
        """
        return self._signatures.public_der(bytes(public_key))

    def public_key_from_der(self, der: bytes) -> bytes:
        """Raw public key from its SubjectPublicKeyInfo DER; other algorithms or curves are
        :class:`MalformedInput`."""
        return self._signatures.public_from_der(bytes(der))

    def sign(self, key: SigningKey, message: bytes) -> bytes:
        """64-byte signature (Ed25519; SM2 ``r ‖ s`` with SM3 and the default ID)."""
        return self._signatures.sign(self._own(key), bytes(message))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> None:
        """Check ``signature`` on ``message`` under ``public_key``.

        Raises:
            MalformedInput: ``public_key`` is not a valid key of this suite.
            VerificationFailed: the signature does not verify (any reason, no detail).
        """
        self._signatures.verify(bytes(public_key), bytes(message), bytes(signature))

    def note_key_id(
        self, key_name: str, public_key: bytes, *, signature_type: bytes | None = None
    ) -> bytes:
        """4-byte signed-note key ID: ``H(name ‖ 0x0A ‖ type ‖ public key)[:4]`` with this
        suite's hash; the type is :attr:`note_signature_type` unless given (a cosigner's is
        :attr:`cosignature_type`). See the module docstring."""
        self._signatures.public_der(bytes(public_key))  # refuses another suite's key
        kind = self.note_signature_type if signature_type is None else signature_type
        return self.hash(key_name.encode("utf-8") + b"\n" + kind + bytes(public_key))[:4]

    def _own(self, key: SigningKey) -> Any:
        if not isinstance(key, SigningKey) or key.suite != self.name:
            raise TypeError(f"not a signing key of suite {self.name!r}")
        return key._key

    # -- hashing and key derivation ------------------------------------------------------

    def hash(self, data: bytes) -> bytes:
        hasher = self._new_hasher()
        hasher.update(data)
        return hasher.digest()

    def new_hasher(self) -> Hasher:
        """An incremental hasher (Merkle leaves and nodes, entry digests)."""
        return self._new_hasher()

    def mac(self, key: bytes, data: bytes) -> bytes:
        """HMAC (RFC 2104) with this suite's hash: HMAC-SHA256 or HMAC-SM3."""
        mac = hmac.HMAC(bytes(key), self._hash_algorithm())
        mac.update(bytes(data))
        return mac.finalize()

    def kdf(self, secret: bytes, *, info: bytes, length: int, salt: bytes | None = None) -> bytes:
        """HKDF (RFC 5869) with this suite's hash: extract with ``salt`` (default: zeros of
        the hash length), expand with ``info`` to ``length`` bytes."""
        return HKDF(algorithm=self._hash_algorithm(), length=length, salt=salt, info=info).derive(
            secret
        )

    # -- symmetric encryption ------------------------------------------------------------

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.cipher_key_size:
            raise TypeError(f"a {self.cipher_name} key is {self.cipher_key_size} bytes")

    def stream(self, key: bytes, nonce: bytes, length: int) -> bytes:
        """``length`` bytes of CTR keystream from the 16-byte initial counter block ``nonce``
        (the counter is the whole block, big-endian, as in SP 800-38A and OpenSSL)."""
        self._check_key(key)
        if len(nonce) != _BLOCK_BYTES:
            raise TypeError("a CTR nonce is a 16-byte initial counter block")
        if length < 0:
            raise TypeError("length must be >= 0")
        encryptor = Cipher(self._cipher(key), modes.CTR(nonce)).encryptor()
        return encryptor.update(bytes(length)) + encryptor.finalize()

    def seal(self, key: bytes, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        """GCM-encrypt with a fresh random nonce; returns ``nonce ‖ ciphertext ‖ tag``."""
        return self.seal_with_nonce(key, os.urandom(_GCM_NONCE_BYTES), plaintext, aad=aad)

    def seal_with_nonce(
        self, key: bytes, nonce: bytes, plaintext: bytes, *, aad: bytes = b""
    ) -> bytes:
        """:meth:`seal` with the caller's 12-byte nonce. Unsafe to reuse a nonce under a key:
        known-answer tests only."""
        self._check_key(key)
        if len(nonce) != _GCM_NONCE_BYTES:
            raise TypeError("a GCM nonce is 12 bytes")
        encryptor = Cipher(self._cipher(key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(aad)
        body = encryptor.update(plaintext) + encryptor.finalize()
        return nonce + body + encryptor.tag

    def open(self, key: bytes, sealed: bytes, *, aad: bytes = b"") -> bytes:
        """Inverse of :meth:`seal`.

        Raises:
            MalformedInput: ``sealed`` is shorter than a nonce and a tag.
            VerificationFailed: wrong key, wrong ``aad`` or altered bytes.
        """
        self._check_key(key)
        if len(sealed) < _GCM_NONCE_BYTES + _GCM_TAG_BYTES:
            raise MalformedInput("sealed data is shorter than its nonce and tag", field="sealed")
        nonce = sealed[:_GCM_NONCE_BYTES]
        body = sealed[_GCM_NONCE_BYTES:-_GCM_TAG_BYTES]
        tag = sealed[-_GCM_TAG_BYTES:]
        decryptor = Cipher(self._cipher(key), modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(aad)
        try:
            return decryptor.update(body) + decryptor.finalize()
        except InvalidTag:
            raise VerificationFailed("authenticated decryption failed") from None


def _cryptography_sm3() -> Hasher:
    return _CryptographyHasher(hashes.Hash(hashes.SM3()))


def _sm3_factory() -> Callable[[], Hasher]:
    """``hashlib``'s SM3 where the system OpenSSL has it (about half the per-call cost of
    ``cryptography``'s, which matters for Merkle nodes), else ``cryptography``'s."""
    try:
        hashlib.new("sm3")
    except ValueError:
        return _cryptography_sm3
    return functools.partial(hashlib.new, "sm3")


STANDARD: Final = Suite(
    name="standard",
    hash_name="SHA-256",
    cipher_name="AES-256",
    cipher_key_size=32,
    note_signature_type=b"\x01",
    cosignature_type=b"\x04",
    _signatures=_Ed25519Signatures(),
    _hash_algorithm=hashes.SHA256,
    _new_hasher=hashlib.sha256,
    _cipher=algorithms.AES,
)

SM: Final = Suite(
    name="sm",
    hash_name="SM3",
    cipher_name="SM4",
    cipher_key_size=16,
    note_signature_type=_SM2_NOTE_TYPE,
    cosignature_type=_SM2_COSIGNATURE_TYPE,
    _signatures=_SM2Signatures(),
    _hash_algorithm=hashes.SM3,
    _new_hasher=_sm3_factory(),
    _cipher=algorithms.SM4,
)

# The registry: one line per suite.
_SUITES: Final = {suite.name: suite for suite in (STANDARD, SM)}
SUITE_NAMES: Final = tuple(_SUITES)


def suite_by_name(name: str) -> Suite:
    """The suite a roster or a config names (``"standard"`` or ``"sm"``).

    Raises:
        MalformedInput: an unknown name.
    """
    try:
        return _SUITES[name]
    except (KeyError, TypeError):
        raise MalformedInput(
            f"unknown crypto suite {name!r}; known: {', '.join(SUITE_NAMES)}", field="suite"
        ) from None
