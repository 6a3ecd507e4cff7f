"""Paillier encryption with fast fixed-base encryption, slot packing and strict encodings.

Used by protocol 2 (intersection aggregate) and, for short vectors, protocol 3 (horizontal
aggregate) of DESIGN.md. python-paillier (``phe``) stays the key, decryption and ciphertext type:
:class:`phe.PaillierPublicKey`, :class:`phe.PaillierPrivateKey`, :class:`phe.EncryptedNumber`.
This module adds what ``phe`` lacks:

- **Fast encryption** (Damgård, Jurik, Nielsen, "A generalization of Paillier's public-key
  system with applications to electronic voting", Int. J. Inf. Secur. 9(6), 2010). With
  ``g = n + 1`` and a fixed base ``hs = h^n mod n^2`` published with the key, a ciphertext is
  ``E(m; x) = (1 + m*n) * hs^x mod n^2`` where ``x`` is a uniformly random exponent of
  ``exponent_bits`` bits (default ``ceil(|n|/2)``, as in DJN). ``hs^x`` comes from a windowed
  fixed-base table (a product of ``exponent_bits / window_bits`` table entries, no squarings),
  which replaces ``phe``'s full ``r^n mod n^2`` (one exponentiation by a 3072-bit exponent).
  ``h`` is drawn as ``-a^2 mod n`` for a random unit ``a`` (DJN's choice: with safe primes ``h``
  generates, with high probability, the cyclic group of elements of Jacobi symbol +1; with phe's
  ordinary primes it is a random element of ``{+-1} * QR_n``).
- **Re-randomisation** by a fresh ``hs^x``.
- **Slot packing** of several non-negative fixed-width slots into one plaintext, with the
  overflow bound checked (:class:`PackingLayout`).
- **Strict byte encodings** of the public key material and of ciphertexts.

Security assumptions (semi-honest model):

- Decisional composite residuosity (DCR, Paillier 1999), and
- the *short-exponent* assumption of DJN 2010: for ``x`` uniform of ``|n|/2`` bits, ``h^x`` is
  computationally indistinguishable from ``h^r`` with ``r`` uniform in the whole group generated
  by ``h`` (the analogue for Z*_n of the short-exponent discrete-log assumptions of van
  Oorschot-Wiener 1996 and Koshiba-Kurosawa 2004). Under both, ``E(m; x)`` is semantically
  secure; the ciphertexts are still ordinary Paillier ciphertexts, and ``phe`` decrypts them.
- The modulus is generated honestly by the analyst. A receiver checks what can be checked
  without the factors (:func:`validate_modulus`): size bounds, odd, not a square, no prime factor
  below 1000, ``hs`` a unit that is not +-1 modulo ``n``. It cannot check that ``n`` has exactly
  two large prime factors or that ``hs`` is an ``n``-th residue; a dishonest analyst can only
  spoil the correctness of its own result that way, not learn more.

Who learns what:

- The **analyst** creates a fresh keypair per query, sends ``(n, hs, exponent_bits)``, and is the
  only party able to decrypt. It learns exactly the decrypted plaintexts it receives: in protocol 2
  one packed plaintext, i.e. each slot's total over the matched rows plus the noise.
- A **node** holding only the public key learns nothing about plaintexts from ciphertexts. The
  matcher learns how many ciphertexts it adds (the intersection size). The ciphertext it sends is
  re-randomised, so it is unlinkable to the ciphertexts it added up.
- The packing layout (slot names and bounds) is public, and so is the key size.

Never decrypt a ciphertext that another party multiplied by a private plaintext (DESIGN.md
protocol 5): this module offers no scalar multiplication on purpose.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import gmpy2
from phe import EncryptedNumber, PaillierPrivateKey, PaillierPublicKey
from phe.util import getprimeover

from govshare.protocols.errors import MalformedInput

__all__ = [
    "DEFAULT_N_BITS",
    "DEFAULT_WINDOW_BITS",
    "MAX_N_BITS",
    "MIN_N_BITS",
    "UNSAFE_MIN_N_BITS",
    "DjnPublicKey",
    "PackingLayout",
    "Slot",
    "decrypt_raw",
    "decrypt_unpack",
    "generate_keypair",
    "keypair_from_primes",
    "validate_modulus",
]

# NIST SP 800-57 Part 1 Rev. 5, Table 2: a 3072-bit factoring modulus gives 128-bit security.
DEFAULT_N_BITS: Final = 3072
# Same table: 2048 bits gives 112-bit security, the least NIST accepts through 2030.
MIN_N_BITS: Final = 2048
# Bounds the work (table size, exponentiations) that a received key can force on a node.
MAX_N_BITS: Final = 8192
# Tiny keys exist only for fast unit tests and known-answer tests; callers must say
# ``unsafe_allow_short_modulus=True`` to get them. 32 bits keeps both factors above the
# small-prime check (primes below 1000).
UNSAFE_MIN_N_BITS: Final = 32
# At 3072 bits and a 1536-bit exponent: 154 table rows of 1024 entries (about 120 MiB of
# 768-byte numbers), 154 modular multiplications per encryption. 8 bits would need 39 MiB and
# 192 multiplications (about 20% slower); see bench/paillier_encrypt.py.
DEFAULT_WINDOW_BITS: Final = 10
# Encryptions (and re-randomisations) made by plain modular exponentiation before the table is
# built on its own: at 3072 bits one ``powmod`` costs about 15 ms and the table about 1.5 s, so a
# party that encrypts a handful of values (a horizontal contribution, the matcher's noise and
# re-randomisation) never pays for the table; one that calls precompute() uses it at once.
_ONE_OFF_ENCRYPTIONS: Final = 64
# Small exponents (test keys) use a small table.
_SMALL_EXPONENT_WINDOW_BITS: Final = 6
_MAX_WINDOW_BITS: Final = 12

_KEY_MAGIC: Final = b"GSPK"
_KEY_VERSION: Final = 1
# magic, version, byte length of n, exponent bits
_KEY_HEADER: Final = struct.Struct(">4sBHH")

# Primes below 1000: a modulus with such a factor is certainly not an RSA modulus.
_SMALL_PRIMES_PRODUCT: Final = math.prod(p for p in range(2, 1000) if gmpy2.is_prime(p))


def _is_obfuscated(ciphertext: EncryptedNumber) -> bool:
    # phe keeps "already re-randomised" in a name-mangled attribute; ``ciphertext()`` (be_secure)
    # re-randomises with a full r^n unless it is set. tests/protocols/test_paillier.py pins this.
    # (Name mangling applies inside class bodies only, so this reads phe's private flag.)
    return bool(ciphertext._EncryptedNumber__is_obfuscated)


def _mark_obfuscated(ciphertext: EncryptedNumber) -> EncryptedNumber:
    ciphertext._EncryptedNumber__is_obfuscated = True
    return ciphertext


def validate_modulus(n: int, *, unsafe_allow_short_modulus: bool = False) -> None:
    """Check the public modulus as far as is possible without its factors.

    Raises:
        TypeError: ``n`` is not an int.
        MalformedInput: out of the size bounds, even, a perfect square, or with a small factor.
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError("the modulus must be an int")
    low = UNSAFE_MIN_N_BITS if unsafe_allow_short_modulus else MIN_N_BITS
    bits = n.bit_length()
    if not low <= bits <= MAX_N_BITS:
        raise MalformedInput(f"modulus of {bits} bits is outside [{low}, {MAX_N_BITS}]", field="n")
    if n % 2 == 0:
        raise MalformedInput("modulus is even", field="n")
    if gmpy2.is_square(n):
        raise MalformedInput("modulus is a perfect square", field="n")
    if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        raise MalformedInput("modulus has a prime factor below 1000", field="n")


def _default_exponent_bits(n_bits: int) -> int:
    return (n_bits + 1) // 2


def _default_window_bits(exponent_bits: int) -> int:
    return DEFAULT_WINDOW_BITS if exponent_bits >= 1024 else _SMALL_EXPONENT_WINDOW_BITS


class DjnPublicKey:
    """A Paillier public key with DJN fast encryption.

    Wraps phe's :class:`~phe.PaillierPublicKey` (attribute :attr:`phe`) together with the fixed
    base ``hs`` and the short-exponent length. The fixed-base table is built on first use (about
    1.5 s and 120 MiB at 3072 bits with the default window) by :meth:`precompute` or after
    :data:`_ONE_OFF_ENCRYPTIONS` encryptions made by plain exponentiation, so a party that only
    sums, parses or encrypts a few values never pays for it. Thread-safe.

    Args:
        public_key: phe's public key (``g = n + 1``).
        hs: ``h^n mod n^2`` for a unit ``h``.
        exponent_bits: bit length of the random exponents, at least ``ceil(|n|/2)`` and at most
            ``|n|``; defaults to ``ceil(|n|/2)``.
        window_bits: window of the fixed-base table (memory/speed trade-off, local only).
        unsafe_allow_short_modulus: accept moduli below :data:`MIN_N_BITS` (tests only).

    Raises:
        MalformedInput: the key material fails a check.
    """

    __slots__ = (
        "_exponent_bits",
        "_hs",
        "_lock",
        "_n",
        "_nsquare",
        "_one_off",
        "_table",
        "_unsafe",
        "_window_bits",
        "phe",
    )

    def __init__(
        self,
        public_key: PaillierPublicKey,
        hs: int,
        *,
        exponent_bits: int | None = None,
        window_bits: int | None = None,
        unsafe_allow_short_modulus: bool = False,
    ) -> None:
        if not isinstance(public_key, PaillierPublicKey):
            raise TypeError("public_key must be a phe.PaillierPublicKey")
        if not isinstance(hs, int) or isinstance(hs, bool):
            raise TypeError("hs must be an int")
        n = int(public_key.n)
        validate_modulus(n, unsafe_allow_short_modulus=unsafe_allow_short_modulus)
        if int(public_key.g) != n + 1:
            raise MalformedInput("generator must be n + 1", field="g")
        nsquare = n * n
        if not 1 < hs < nsquare:
            raise MalformedInput("hs is outside (1, n^2)", field="hs")
        if math.gcd(hs, n) != 1:
            raise MalformedInput("hs is not a unit modulo n^2", field="hs")
        if hs % n in (1, n - 1):
            # hs = h^n with h = +-1 mod n: a degenerate base, encryption would hide nothing.
            raise MalformedInput("hs is degenerate (+-1 modulo n)", field="hs")
        n_bits = n.bit_length()
        if exponent_bits is None:
            exponent_bits = _default_exponent_bits(n_bits)
        if not isinstance(exponent_bits, int) or isinstance(exponent_bits, bool):
            raise TypeError("exponent_bits must be an int")
        if not _default_exponent_bits(n_bits) <= exponent_bits <= n_bits:
            raise MalformedInput(
                f"exponent length {exponent_bits} is outside "
                f"[{_default_exponent_bits(n_bits)}, {n_bits}] bits",
                field="exponent_bits",
            )
        if window_bits is None:
            window_bits = _default_window_bits(exponent_bits)
        if not isinstance(window_bits, int) or not 1 <= window_bits <= _MAX_WINDOW_BITS:
            raise TypeError(f"window_bits must be an int in [1, {_MAX_WINDOW_BITS}]")
        self.phe = public_key
        self._n = gmpy2.mpz(n)
        self._nsquare = gmpy2.mpz(nsquare)
        self._hs = hs
        self._exponent_bits = exponent_bits
        self._window_bits = window_bits
        self._table: list[list[Any]] | None = None
        self._one_off = 0
        self._lock = threading.Lock()
        self._unsafe = unsafe_allow_short_modulus

    def __reduce__(self) -> tuple[Any, ...]:
        # For process pools: the key travels, the table is rebuilt lazily in the worker (or
        # inherited already built, when the pool forks after precompute()).
        return (
            _restore_public_key,
            (self.n, self._hs, self._exponent_bits, self._window_bits, self._unsafe),
        )

    # -- attributes ---------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return int(self._n)

    @property
    def nsquare(self) -> int:
        return int(self._nsquare)

    @property
    def hs(self) -> int:
        return self._hs

    @property
    def exponent_bits(self) -> int:
        return self._exponent_bits

    @property
    def window_bits(self) -> int:
        return self._window_bits

    @property
    def n_bits(self) -> int:
        return int(self._n.bit_length())

    @property
    def ciphertext_bytes(self) -> int:
        """Width of an encoded ciphertext: the byte length of ``n^2``."""
        return (int(self._nsquare.bit_length()) + 7) // 8

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DjnPublicKey):
            return NotImplemented
        return (
            self._n == other._n
            and self._hs == other._hs
            and self._exponent_bits == other._exponent_bits
        )

    def __hash__(self) -> int:
        return hash((int(self._n), self._hs, self._exponent_bits))

    def __repr__(self) -> str:
        return f"<DjnPublicKey {self.n_bits} bits {self.fingerprint().hex()[:16]}>"

    # -- encoding ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Canonical encoding: ``"GSPK" | version u8 | len(n) u16 | exponent_bits u16 | n | hs``.

        ``n`` is big-endian in its minimal byte length, ``hs`` big-endian in the ciphertext width.
        """
        n_len = (self.n_bits + 7) // 8
        return (
            _KEY_HEADER.pack(_KEY_MAGIC, _KEY_VERSION, n_len, self._exponent_bits)
            + self.n.to_bytes(n_len, "big")
            + self._hs.to_bytes(self.ciphertext_bytes, "big")
        )

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        window_bits: int | None = None,
        unsafe_allow_short_modulus: bool = False,
    ) -> DjnPublicKey:
        """Parse :meth:`to_bytes` output strictly.

        Raises:
            MalformedInput: wrong magic, version, lengths, non-canonical encoding, or key material
                that fails the checks of :class:`DjnPublicKey`.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("public key encoding must be bytes")
        data = bytes(data)
        try:
            magic, version, n_len, exponent_bits = _KEY_HEADER.unpack_from(data)
        except struct.error as exc:
            raise MalformedInput("public key encoding is truncated", field="public_key") from exc
        if magic != _KEY_MAGIC:
            raise MalformedInput("not a govshare Paillier public key", field="public_key")
        if version != _KEY_VERSION:
            raise MalformedInput(f"unknown public key version {version}", field="public_key")
        if n_len == 0 or n_len > (MAX_N_BITS + 7) // 8:
            raise MalformedInput("modulus length out of bounds", field="n")
        offset = _KEY_HEADER.size
        n_raw = data[offset : offset + n_len]
        if len(n_raw) != n_len or n_raw[0] == 0:
            raise MalformedInput("modulus is truncated or not minimally encoded", field="n")
        n = int.from_bytes(n_raw, "big")
        ct_len = ((n * n).bit_length() + 7) // 8
        if len(data) != _KEY_HEADER.size + n_len + ct_len:
            raise MalformedInput("public key encoding has the wrong length", field="public_key")
        hs = int.from_bytes(data[offset + n_len :], "big")
        return cls(
            PaillierPublicKey(n),
            hs,
            exponent_bits=exponent_bits,
            window_bits=window_bits,
            unsafe_allow_short_modulus=unsafe_allow_short_modulus,
        )

    def fingerprint(self) -> bytes:
        """SHA-256 of :meth:`to_bytes`, for logs and for binding the key into signed requests."""
        return hashlib.sha256(self.to_bytes()).digest()

    # -- fast encryption -----------------------------------------------------------------------

    def precompute(self) -> None:
        """Build the fixed-base table now (else on first encryption).

        Call it before forking worker processes so that they share the table.
        """
        self._get_table()

    def _get_table(self) -> list[list[Any]]:
        table = self._table
        if table is not None:
            return table
        with self._lock:
            if self._table is None:
                self._table = self._build_table()
            return self._table

    def _build_table(self) -> list[list[Any]]:
        # Row i holds hs^(d * 2^(w*i)) for every digit d, so that
        # hs^x = prod_i row_i[digit_i(x)]: no squaring at encryption time.
        w = self._window_bits
        nsquare = self._nsquare
        base = gmpy2.mpz(self._hs)
        table: list[list[Any]] = []
        remaining = self._exponent_bits
        while remaining > 0:
            row_len = 1 << min(w, remaining)
            row = [gmpy2.mpz(1), base]
            current = base
            for _ in range(2, row_len):
                current = current * base % nsquare
                row.append(current)
            table.append(row)
            remaining -= w
            if remaining > 0:
                base = current * base % nsquare  # base^(2^w)
        return table

    def _check_exponent(self, x: int) -> None:
        if not isinstance(x, int) or isinstance(x, bool):
            raise TypeError("x must be an int")
        if not 0 <= x < (1 << self._exponent_bits):
            raise MalformedInput(f"x must be in [0, 2^{self._exponent_bits})", field="x")

    def random_exponent(self) -> int:
        """A uniformly random exponent of :attr:`exponent_bits` bits, from ``secrets``."""
        return secrets.randbits(self._exponent_bits)

    def raw_obfuscator(self, x: int) -> int:
        """``hs^x mod n^2`` by the fixed-base table."""
        self._check_exponent(x)
        return int(self._obfuscator(x))

    def _obfuscator(self, x: int) -> Any:
        table = self._table
        if table is None:
            if self._one_off < _ONE_OFF_ENCRYPTIONS:
                self._one_off += 1  # a lost update under threads only builds the table later
                return gmpy2.powmod(self._hs, x, self._nsquare)
            table = self._get_table()
        w = self._window_bits
        mask = (1 << w) - 1
        nsquare = self._nsquare
        digits = [(x >> shift) & mask for shift in range(0, w * len(table), w)]
        acc = table[0][digits[0]]
        for row, digit in zip(table[1:], digits[1:], strict=True):
            acc = acc * row[digit] % nsquare
        return acc

    def raw_encrypt(self, plaintext: int, x: int | None = None) -> int:
        """``(1 + plaintext*n) * hs^x mod n^2`` as an int.

        Args:
            plaintext: in ``[0, n)``.
            x: the random exponent, in ``[0, 2^exponent_bits)``; drawn from ``secrets`` when
                None. Pass it only for known-answer tests: reusing an ``x`` breaks secrecy.

        Raises:
            MalformedInput: plaintext or x out of range.
        """
        if not isinstance(plaintext, int) or isinstance(plaintext, bool):
            raise TypeError("plaintext must be an int")
        if not 0 <= plaintext < self._n:
            raise MalformedInput("plaintext must be in [0, n)", field="plaintext")
        if x is None:
            x = self.random_exponent()
        else:
            self._check_exponent(x)
        n = self._n
        obfuscator = self._obfuscator(x)
        # (1 + m*n) * y = y + n * (m*y mod n)  (mod n^2), cheaper than a full product mod n^2.
        c = obfuscator + n * (plaintext * obfuscator % n)
        if c >= self._nsquare:
            c -= self._nsquare
        return int(c)

    def encrypt_to_bytes(self, plaintexts: Iterable[int]) -> bytes:
        """Encrypt each plaintext (as :meth:`encrypt`) and concatenate the fixed-width encodings.

        The bulk path of protocol 2 (no phe objects per value); call :meth:`precompute` first.

        Raises:
            MalformedInput: a plaintext out of range.
        """
        width = self.ciphertext_bytes
        return b"".join(self.raw_encrypt(p).to_bytes(width, "big") for p in plaintexts)

    def encrypt(self, plaintext: int) -> EncryptedNumber:
        """Encrypt a non-negative integer ``< n`` (e.g. a packed plaintext) with fresh randomness.

        The result counts as re-randomised for phe (``ciphertext()`` will not add an ``r^n``).
        """
        return _mark_obfuscated(EncryptedNumber(self.phe, self.raw_encrypt(plaintext)))

    def encrypt_with_exponent(self, plaintext: int, x: int) -> EncryptedNumber:
        """:meth:`encrypt` with explicit randomness, for known-answer tests only."""
        return _mark_obfuscated(EncryptedNumber(self.phe, self.raw_encrypt(plaintext, x)))

    def rerandomize(self, ciphertext: EncryptedNumber, x: int | None = None) -> EncryptedNumber:
        """Multiply by a fresh ``hs^x``: same plaintext, unlinkable ciphertext.

        Args:
            ciphertext: under this key, with phe exponent 0.
            x: explicit exponent for known-answer tests; drawn from ``secrets`` when None.
        """
        raw = self._raw_ciphertext(ciphertext)
        if x is None:
            x = self.random_exponent()
        else:
            self._check_exponent(x)
        c = gmpy2.mpz(raw) * self._obfuscator(x) % self._nsquare
        return _mark_obfuscated(EncryptedNumber(self.phe, int(c)))

    def sum_ciphertexts(
        self, ciphertexts: Iterable[EncryptedNumber], *, max_terms: int | None = None
    ) -> EncryptedNumber:
        """Homomorphic sum: the product of the ciphertexts modulo ``n^2``.

        The result is *not* re-randomised: call :meth:`rerandomize` before it leaves the party
        (:meth:`ciphertext_to_bytes` does so by default).

        Args:
            ciphertexts: at least one, all under this key.
            max_terms: refuse more terms than this (e.g. a :class:`PackingLayout`'s ``max_rows``,
                beyond which slots could overflow).

        Raises:
            MalformedInput: no terms, or more than ``max_terms``.
        """
        nsquare = self._nsquare
        acc = gmpy2.mpz(1)
        count = 0
        for ciphertext in ciphertexts:
            count += 1
            if max_terms is not None and count > max_terms:
                raise MalformedInput(
                    f"more than {max_terms} ciphertexts to add", field="ciphertexts"
                )
            acc = acc * self._raw_ciphertext(ciphertext) % nsquare
        if count == 0:
            raise MalformedInput("no ciphertexts to add", field="ciphertexts")
        return EncryptedNumber(self.phe, int(acc))

    def _raw_ciphertext(self, ciphertext: EncryptedNumber) -> int:
        if not isinstance(ciphertext, EncryptedNumber):
            raise TypeError("expected a phe.EncryptedNumber")
        if ciphertext.public_key != self.phe:
            raise TypeError("ciphertext is under another key")
        if ciphertext.exponent != 0:
            raise TypeError("only raw integer ciphertexts (phe exponent 0) are supported")
        return int(ciphertext.ciphertext(be_secure=False))

    # -- ciphertext encoding -------------------------------------------------------------------

    def ciphertext_to_bytes(self, ciphertext: EncryptedNumber, *, be_secure: bool = True) -> bytes:
        """Fixed-width big-endian encoding (:attr:`ciphertext_bytes` bytes).

        Like phe's ``ciphertext(be_secure=True)``, a ciphertext that was not freshly encrypted or
        re-randomised (e.g. a sum) is re-randomised first, with the fast fixed base. Pass
        ``be_secure=False`` only for a ciphertext that stays inside the party.
        """
        if be_secure and not _is_obfuscated(ciphertext):
            ciphertext = self.rerandomize(ciphertext)
        raw = self._raw_ciphertext(ciphertext)
        return raw.to_bytes(self.ciphertext_bytes, "big")

    def check_ciphertexts(self, blobs: Iterable[bytes], *, parts: int = 1) -> None:
        """Check many encodings at once as :meth:`ciphertext_from_bytes` would, without parsing.

        Each blob holds ``parts`` ciphertexts side by side. Every value is in ``[1, n^2)``, and
        all are units together: ``gcd(prod(c mod n) mod n, n) = 1`` holds iff no prime factor of
        ``n`` divides any ``c`` (one gcd instead of one per ciphertext).

        Raises:
            MalformedInput: a wrong width, a value out of range or a non-unit (not saying which).
        """
        width = self.ciphertext_bytes
        n, nsquare = self._n, self._nsquare
        product = gmpy2.mpz(1)
        for blob in blobs:
            if not isinstance(blob, bytes | bytearray | memoryview):
                raise TypeError("ciphertext encoding must be bytes")
            if len(blob) != width * parts:
                raise MalformedInput(
                    f"a ciphertext entry must be {width * parts} bytes", field="ciphertext"
                )
            for j in range(parts):
                value = gmpy2.mpz(int.from_bytes(blob[j * width : (j + 1) * width], "big"))
                if not 0 < value < nsquare:
                    raise MalformedInput("ciphertext is outside [1, n^2)", field="ciphertext")
                product = product * value % n
        if gmpy2.gcd(product, n) != 1:
            raise MalformedInput("ciphertext is not a unit modulo n^2", field="ciphertext")

    def ciphertext_from_bytes(self, data: bytes) -> EncryptedNumber:
        """Parse a ciphertext strictly: exact width, value in ``[1, n^2)``, coprime to ``n``.

        Raises:
            MalformedInput: any of the above fails.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("ciphertext encoding must be bytes")
        if len(data) != self.ciphertext_bytes:
            raise MalformedInput(
                f"ciphertext must be {self.ciphertext_bytes} bytes, got {len(data)}",
                field="ciphertext",
            )
        value = int.from_bytes(data, "big")
        if not 0 < value < self._nsquare:
            raise MalformedInput("ciphertext is outside [1, n^2)", field="ciphertext")
        if gmpy2.gcd(value % self._n, self._n) != 1:
            raise MalformedInput("ciphertext is not a unit modulo n^2", field="ciphertext")
        # It arrived over the wire: re-randomising it again protects nothing.
        return _mark_obfuscated(EncryptedNumber(self.phe, value))


def _restore_public_key(
    n: int, hs: int, exponent_bits: int, window_bits: int, unsafe: bool
) -> DjnPublicKey:
    return DjnPublicKey(
        PaillierPublicKey(n),
        hs,
        exponent_bits=exponent_bits,
        window_bits=window_bits,
        unsafe_allow_short_modulus=unsafe,
    )


def keypair_from_primes(
    p: int,
    q: int,
    h: int,
    *,
    exponent_bits: int | None = None,
    window_bits: int | None = None,
    unsafe_allow_short_modulus: bool = False,
) -> tuple[DjnPublicKey, PaillierPrivateKey]:
    """Explicit variant of :func:`generate_keypair`, for known-answer tests.

    ``hs = h^n mod n^2`` with ``h`` as given (a unit modulo ``n``, not +-1).

    Raises:
        MalformedInput: ``p``, ``q`` not distinct primes, or key checks fail.
    """
    for name, value in (("p", p), ("q", q), ("h", h)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int")
    if p == q or not gmpy2.is_prime(p) or not gmpy2.is_prime(q):
        raise MalformedInput("p and q must be distinct primes", field="p")
    n = p * q
    validate_modulus(n, unsafe_allow_short_modulus=unsafe_allow_short_modulus)
    if not 0 < h < n or math.gcd(h, n) != 1:
        raise MalformedInput("h must be a unit modulo n", field="h")
    public = PaillierPublicKey(n)
    hs = int(gmpy2.powmod(h, n, n * n))
    key = DjnPublicKey(
        public,
        hs,
        exponent_bits=exponent_bits,
        window_bits=window_bits,
        unsafe_allow_short_modulus=unsafe_allow_short_modulus,
    )
    return key, PaillierPrivateKey(public, p, q)


def generate_keypair(
    n_bits: int = DEFAULT_N_BITS,
    *,
    exponent_bits: int | None = None,
    window_bits: int | None = None,
    unsafe_allow_short_modulus: bool = False,
) -> tuple[DjnPublicKey, PaillierPrivateKey]:
    """A fresh analyst keypair (one per query).

    Primes come from phe's generator (``random.SystemRandom``, i.e. ``os.urandom``, and GMP's
    ``next_prime``); ``h = -a^2 mod n`` for a uniformly random unit ``a`` (from ``secrets``).

    Raises:
        MalformedInput: ``n_bits`` outside the bounds (see :data:`MIN_N_BITS`).
    """
    if not isinstance(n_bits, int) or isinstance(n_bits, bool):
        raise TypeError("n_bits must be an int")
    low = UNSAFE_MIN_N_BITS if unsafe_allow_short_modulus else MIN_N_BITS
    if not low <= n_bits <= MAX_N_BITS:
        raise MalformedInput(f"key size must be in [{low}, {MAX_N_BITS}] bits", field="n_bits")
    while True:
        p = int(getprimeover(n_bits // 2))
        q = int(getprimeover(n_bits - n_bits // 2))
        n = p * q
        if p == q or n.bit_length() != n_bits or math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
            continue
        a = secrets.randbelow(n - 2) + 2
        h = (-a * a) % n
        if math.gcd(h, n) != 1 or h in (1, n - 1):  # pragma: no cover - probability ~ 2^-|p|
            continue
        return keypair_from_primes(
            p,
            q,
            h,
            exponent_bits=exponent_bits,
            window_bits=window_bits,
            unsafe_allow_short_modulus=unsafe_allow_short_modulus,
        )


def decrypt_raw(private_key: PaillierPrivateKey, ciphertext: EncryptedNumber) -> int:
    """Decrypt to the raw plaintext in ``[0, n)`` (no phe decoding of signs or floats)."""
    if not isinstance(private_key, PaillierPrivateKey):
        raise TypeError("expected a phe.PaillierPrivateKey")
    if not isinstance(ciphertext, EncryptedNumber):
        raise TypeError("expected a phe.EncryptedNumber")
    if ciphertext.public_key != private_key.public_key:
        raise TypeError("ciphertext is under another key")
    if ciphertext.exponent != 0:
        raise TypeError("only raw integer ciphertexts (phe exponent 0) are supported")
    return int(private_key.raw_decrypt(int(ciphertext.ciphertext(be_secure=False))))


# -- slot packing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slot:
    """One named slot: each row contributes an integer in ``[0, max_value]``."""

    name: str
    max_value: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError("slot name must be a non-empty str")
        if not isinstance(self.max_value, int) or isinstance(self.max_value, bool):
            raise TypeError("slot max_value must be an int")
        if self.max_value < 0:
            raise MalformedInput(f"slot {self.name}: max_value must be >= 0", field=self.name)


class PackingLayout:
    """Fixed-width slots packed into one Paillier plaintext, with a checked overflow bound.

    Slot ``i`` occupies bits ``[offset_i, offset_i + width_i)`` of the plaintext, slot 0 lowest.
    A ciphertext sum adds slot-wise with no carry between slots as long as every slot total stays
    below ``2^width_i``. The layout guarantees it: for each slot

        total_i <= max_value_i * max_rows + noise_shares * 2 * noise_bound  <  2^width_i

    provided that at most ``max_rows`` row plaintexts (from :meth:`pack`) and at most
    ``noise_shares`` noise plaintexts (from :meth:`pack_noise`) are added. The whole layout must
    fit below the modulus: ``sum(width_i) <= |n| - 1`` so every packed total is ``< 2^(|n|-1)
    <= n``; a layout that would not fit is refused (use :meth:`split`).

    Signed noise uses an **offset encoding**: a noise share ``e`` with ``|e| <= noise_bound`` is
    packed as ``e + noise_bound`` (non-negative), and :meth:`unpack` subtracts
    ``noise_shares * noise_bound`` from every slot. ``noise_shares`` is therefore the *exact*
    number of noise plaintexts the protocol adds (0 when none). Discrete Laplace noise is
    unbounded; pick ``noise_bound`` so that exceeding it is negligible (e.g. ``P(|Z| > B) =
    2 q^(B+1) / (1+q)``, ``q = exp(-1/scale)``, see ``govshare.protocols.dp``);
    :meth:`pack_noise` refuses a share beyond it rather than wrap.

    Raises:
        MalformedInput: bounds negative, duplicate slot names, or the layout overflows ``n``.
    """

    __slots__ = (
        "_index",
        "capacity_bits",
        "max_rows",
        "noise_bound",
        "noise_shares",
        "offsets",
        "slot_bounds",
        "slots",
        "total_bits",
        "widths",
    )

    def __init__(
        self,
        slots: Sequence[Slot],
        *,
        max_rows: int,
        modulus_bits: int,
        noise_bound: int = 0,
        noise_shares: int = 0,
    ) -> None:
        for name, value in (
            ("max_rows", max_rows),
            ("modulus_bits", modulus_bits),
            ("noise_bound", noise_bound),
            ("noise_shares", noise_shares),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int")
            if value < 0:
                raise MalformedInput(f"{name} must be >= 0", field=name)
        if max_rows < 1:
            raise MalformedInput("max_rows must be >= 1", field="max_rows")
        slots = tuple(slots)
        if not slots:
            raise MalformedInput("a layout needs at least one slot", field="slots")
        if not all(isinstance(s, Slot) for s in slots):
            raise TypeError("slots must be Slot instances")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise MalformedInput("duplicate slot names", field="slots")
        bounds = tuple(s.max_value * max_rows + noise_shares * 2 * noise_bound for s in slots)
        widths = tuple(max(1, b.bit_length()) for b in bounds)
        offsets = tuple(sum(widths[:i]) for i in range(len(widths)))
        total = sum(widths)
        capacity = modulus_bits - 1
        if total > capacity:
            raise MalformedInput(
                f"packing needs {total} bits but a {modulus_bits}-bit modulus holds {capacity}",
                field="slots",
            )
        self.slots: tuple[Slot, ...] = slots
        self.max_rows = max_rows
        self.noise_bound = noise_bound
        self.noise_shares = noise_shares
        self.slot_bounds: tuple[int, ...] = bounds
        self.widths: tuple[int, ...] = widths
        self.offsets: tuple[int, ...] = offsets
        self.total_bits = total
        self.capacity_bits = capacity
        self._index = {name: i for i, name in enumerate(names)}

    @classmethod
    def split(
        cls,
        slots: Sequence[Slot],
        *,
        max_rows: int,
        modulus_bits: int,
        noise_bound: int = 0,
        noise_shares: int = 0,
    ) -> tuple[PackingLayout, ...]:
        """Greedily cut ``slots`` (in order) into as few layouts as fit one plaintext each.

        Raises:
            MalformedInput: a single slot does not fit a plaintext.
        """
        groups: list[list[Slot]] = []
        current: list[Slot] = []
        for slot in slots:
            candidate = [*current, slot]
            try:
                cls(
                    candidate,
                    max_rows=max_rows,
                    modulus_bits=modulus_bits,
                    noise_bound=noise_bound,
                    noise_shares=noise_shares,
                )
            except MalformedInput:
                if not current:
                    raise
                groups.append(current)
                current = [slot]
                cls(  # raises if this one slot alone does not fit
                    current,
                    max_rows=max_rows,
                    modulus_bits=modulus_bits,
                    noise_bound=noise_bound,
                    noise_shares=noise_shares,
                )
            else:
                current = candidate
        if current:
            groups.append(current)
        return tuple(
            cls(
                group,
                max_rows=max_rows,
                modulus_bits=modulus_bits,
                noise_bound=noise_bound,
                noise_shares=noise_shares,
            )
            for group in groups
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def pack(self, values: Sequence[int]) -> int:
        """One row's values, one per slot in order, each in ``[0, max_value]``.

        Raises:
            MalformedInput: wrong count or a value out of its slot's range.
        """
        if len(values) != len(self.slots):
            raise MalformedInput(
                f"expected {len(self.slots)} values, got {len(values)}", field="values"
            )
        packed = 0
        for slot, offset, value in zip(self.slots, self.offsets, values, strict=True):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"slot {slot.name}: value must be an int")
            if not 0 <= value <= slot.max_value:
                raise MalformedInput(
                    f"slot {slot.name}: value outside [0, {slot.max_value}]", field=slot.name
                )
            packed |= value << offset
        return packed

    def pack_named(self, values: Mapping[str, int]) -> int:
        """Like :meth:`pack`, by slot name; missing slots are 0 (e.g. other groups' slots)."""
        unknown = set(values) - set(self._index)
        if unknown:
            raise MalformedInput(f"unknown slots {sorted(unknown)}", field="values")
        return self.pack([values.get(s.name, 0) for s in self.slots])

    def pack_noise(self, noise: Sequence[int]) -> int:
        """One noise share per slot, each in ``[-noise_bound, noise_bound]``, offset-encoded.

        Raises:
            MalformedInput: the layout plans no noise, wrong count, or a share beyond the bound.
        """
        if self.noise_shares == 0:
            raise MalformedInput("this layout plans no noise shares", field="noise")
        if len(noise) != len(self.slots):
            raise MalformedInput(
                f"expected {len(self.slots)} noise values, got {len(noise)}", field="noise"
            )
        packed = 0
        for slot, offset, value in zip(self.slots, self.offsets, noise, strict=True):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"slot {slot.name}: noise must be an int")
            if not -self.noise_bound <= value <= self.noise_bound:
                raise MalformedInput(
                    f"slot {slot.name}: noise beyond +-{self.noise_bound}", field=slot.name
                )
            packed |= (value + self.noise_bound) << offset
        return packed

    def unpack(self, plaintext: int) -> dict[str, int]:
        """Slot totals of a decrypted sum, with the noise offsets removed (may be negative).

        Raises:
            MalformedInput: the plaintext or a slot exceeds what the layout allows, i.e. more
                terms were added than planned or a party misbehaved.
        """
        if not isinstance(plaintext, int) or isinstance(plaintext, bool):
            raise TypeError("plaintext must be an int")
        if not 0 <= plaintext < (1 << self.total_bits):
            raise MalformedInput("plaintext exceeds the packing layout", field="plaintext")
        offset_total = self.noise_shares * self.noise_bound
        out: dict[str, int] = {}
        for slot, offset, width, bound in zip(
            self.slots, self.offsets, self.widths, self.slot_bounds, strict=True
        ):
            raw = (plaintext >> offset) & ((1 << width) - 1)
            if raw > bound:
                raise MalformedInput(f"slot {slot.name} overflowed its bound", field=slot.name)
            out[slot.name] = raw - offset_total
        return out


def decrypt_unpack(
    private_key: PaillierPrivateKey, ciphertext: EncryptedNumber, layout: PackingLayout
) -> dict[str, int]:
    """Decrypt a packed sum and unpack it (see :meth:`PackingLayout.unpack`)."""
    return layout.unpack(decrypt_raw(private_key, ciphertext))
