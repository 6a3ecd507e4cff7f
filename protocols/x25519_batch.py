"""Batch X25519 for ECDH-PSI: whole chunks of points through OpenSSL in one native call.

:mod:`govshare.protocols.ecdh_psi` masks a chunk of points with one X25519 scalar
multiplication per point. Point by point through pyca/cryptography, each call builds Python
objects (a public key, a result) around the curve operation; here a chunk goes to native code
once, as packed bytes, and comes back packed: no Python object per point.

The native code (``x25519_batch.c``, built with cffi at install time by setup.py into
``govshare.protocols.x25519_batch_native``, linked to the system's OpenSSL 3 ``libcrypto``) is
glue only: a loop over OpenSSL's X25519 derivation (RFC 7748 X25519, the scalar clamped as RFC
7748 section 5 says) and SHA-256, the same library that pyca/cryptography wraps, so both paths
run one implementation of each. One peer key object serves a whole chunk: its value is replaced
point by point (``EVP_PKEY_set1_encoded_public_key``), since building a key object per point
costs about a tenth of the ladder (measured: 36,400 against 33,000 multiplications a second on
one core, where libsodium's ladder, used here before, did 31,600). It computes the same
functions as the point-by-point path, byte for byte:

- :func:`mask_batch`: ``X25519(scalar, u)`` for each point after the strict chunk parse of
  ``ecdh_psi.decode_points`` (bit 255 clear, ``u < p``), refusing the first non-canonical point,
  then the first point whose output is all zero (small order: OpenSSL's derivation fails);
- :func:`hash_and_mask_batch`: ``X25519(scalar, H(q, k))`` for each key, with ``H`` the
  SHA-256 of ``prefix || k``, bit 255 cleared and reduced mod p (``ecdh_psi.canonical_u``).

Who learns what is unchanged: the same points are computed by the same party, in its own
process, by the same library. The scalar is secret: it crosses to native code as bytes, lives
in an OpenSSL key object for the length of one chunk, and is cleared as that object is freed.

Fallback: where the extension was not built (OpenSSL's headers missing at install time) or
does not load, :func:`available` is false and ``ecdh_psi`` masks point by point as before,
warning (``RuntimeWarning``, :func:`warn_fallback`) once per process when it first does so. The
warning waits for that first use, never import time: a node's first output line must be its
"serving on" line, which the demo and the benchmarks read from a pipe shared with stderr.
Setting ``GOVSHARE_X25519_BATCH=off`` in the environment forces the fallback without a warning
(for benchmarks and tests; the node's masking workers inherit it).

Pure: no transport or storage code.
"""

from __future__ import annotations

import importlib
import os
import warnings
from array import array
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

NATIVE_MODULE = "govshare.protocols.x25519_batch_native"
# Environment switch: one of these values turns the batch path off in this process and in the
# processes it starts.
DISABLE_ENV = "GOVSHARE_X25519_BATCH"
DISABLE_VALUES = frozenset({"0", "off", "no", "false"})

_POINT_SIZE = 32
_SCALAR_SIZE = 32
# Status codes of x25519_batch.c.
_OK, _NOT_CANONICAL, _SMALL_ORDER, _LIBRARY_FAILED = 0, 1, 2, 3


class RefusedPointError(Exception):
    """A point of the batch was refused: ``index`` is the first such point, ``small_order``
    tells the all-zero output (true) from a non-canonical encoding (false).

    ``ecdh_psi`` turns it into its ``MalformedInput``; it never leaves the protocols package.
    """

    def __init__(self, index: int, *, small_order: bool) -> None:
        super().__init__(index, small_order)
        self.index = index
        self.small_order = small_order


def _load() -> tuple[Any, Any, str | None]:
    """(ffi, lib, None) when the native module is usable, else (None, None, the reason)."""
    if _turned_off():
        return None, None, f"turned off by {DISABLE_ENV}"
    try:
        native = importlib.import_module(NATIVE_MODULE)
    except ImportError as error:
        return None, None, f"{NATIVE_MODULE} could not be imported ({error})"
    if native.lib.govshare_x25519_batch_init() != _OK:
        return None, None, "OpenSSL has no X25519 or SHA-256 in its default provider"
    return native.ffi, native.lib, None


def _turned_off() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in DISABLE_VALUES


_ffi, _lib, _unavailable_reason = _load()
# Whether this process has warned about the fallback (once is enough).
_warned = False


def warn_fallback() -> None:
    """Warn, once per process, that masking runs point by point because the extension is
    missing or broken; silent when the batch path is available or turned off on purpose."""
    global _warned
    if _warned or _lib is not None or _turned_off():
        return
    _warned = True
    warnings.warn(
        f"govshare: ECDH-PSI's native batch path is unavailable: {_unavailable_reason}. "
        "Masking falls back to pyca/cryptography point by point (same results, slower). "
        "Install OpenSSL's headers (Debian: libssl-dev; `make` does it as root) and "
        "reinstall govshare.",
        RuntimeWarning,
        stacklevel=3,
    )


def available() -> bool:
    """Whether the batch path is usable in this process."""
    return _lib is not None


def unavailable_reason() -> str | None:
    """Why the batch path is off (None when :func:`available`)."""
    return _unavailable_reason


def _native() -> tuple[Any, Any]:
    if _lib is None:
        raise RuntimeError(f"the native batch path is unavailable: {_unavailable_reason}")
    return _ffi, _lib


def mask_batch(scalar: bytes, packed: bytes) -> bytes:
    """``X25519(scalar, u)`` for each 32-byte point of ``packed``, packed in the same order.

    The caller checks the types, the scalar's length and that ``len(packed)`` is a multiple of
    32 (``ecdh_psi`` does, with its own messages).

    Raises:
        RefusedPointError: the first non-canonical point, or else the first of small order.
        RuntimeError: the batch path is unavailable, or OpenSSL failed in it.
    """
    ffi, lib = _native()
    count = len(packed) // _POINT_SIZE
    if not count:
        return b""
    out = ffi.new("unsigned char[]", count * _POINT_SIZE)
    bad = ffi.new("size_t *")
    status = lib.govshare_x25519_mask_batch(
        ffi.from_buffer("unsigned char[]", scalar),
        ffi.from_buffer("unsigned char[]", packed),
        count,
        out,
        bad,
    )
    _check(status, int(bad[0]))
    return bytes(ffi.buffer(out))


def hash_and_mask_batch(scalar: bytes, prefix: bytes, keys: Sequence[bytes]) -> bytes:
    """``X25519(scalar, canonical_u(SHA-256(prefix || k)))`` for each key, packed in order.

    The caller checks that every key is bytes (``ecdh_psi`` does).

    Raises:
        RefusedPointError: a hashed point of small order (probability about 2^-250 per key).
        RuntimeError: the batch path is unavailable, or OpenSSL failed in it.
    """
    ffi, lib = _native()
    count = len(keys)
    if not count:
        return b""
    joined = b"".join(keys)
    # End offset of each key in ``joined``: one C array, not a Python int per key handed over.
    ends = array("Q", accumulate(map(len, keys)))
    out = ffi.new("unsigned char[]", count * _POINT_SIZE)
    bad = ffi.new("size_t *")
    status = lib.govshare_x25519_hash_and_mask_batch(
        ffi.from_buffer("unsigned char[]", scalar),
        ffi.from_buffer("unsigned char[]", prefix),
        len(prefix),
        # An empty join (every key empty) is still a valid pointer for C: never read.
        ffi.from_buffer("unsigned char[]", joined or b"\0"),
        ffi.from_buffer("uint64_t[]", ends),
        count,
        out,
        bad,
    )
    _check(status, int(bad[0]))
    return bytes(ffi.buffer(out))


def _check(status: int, bad: int) -> None:
    if status == _LIBRARY_FAILED:
        raise RuntimeError("OpenSSL failed inside the batch path (not a refused point)")
    if status != _OK:
        raise RefusedPointError(bad, small_order=status == _SMALL_ORDER)


def canonical_u(u: bytes) -> bytes:
    """The native ``canonical_u`` (bit 255 cleared, reduced mod p) of 32 bytes; the tests
    hold it to ``ecdh_psi.canonical_u`` on inputs SHA-256 practically never produces."""
    ffi, lib = _native()
    if len(u) != _POINT_SIZE:
        raise ValueError("u must have 32 bytes")
    buffer = ffi.new("unsigned char[]", list(u))
    lib.govshare_x25519_canonical_u(buffer)
    return bytes(ffi.buffer(buffer))
