"""The node's masking secret, and the ``hash_prefix`` key of each of its columns.

``hash_prefix`` (see ``govshare.node.data.masking``) releases HMAC pseudonyms (HMAC-SHA256, or
HMAC-SM3 in a federation on the ``sm`` suite), so the node needs a key no one else holds. Each
node keeps one secret, 32 random bytes in the file ``mask.secret`` of its home (mode 0600, never
printed, logged or sent), and derives from it one key per (dataset, column) with HKDF over the
suite's hash (RFC 5869; HKDF-SHA256 or HKDF-SM3)::

    key = HKDF(ikm=secret, salt=none, info=INFO_PREFIX || u16 len(dataset) || dataset
                                            || u16 len(column) || column, L=32)

Consequences:

- pseudonyms released from one column of one dataset are linkable to each other, across
  queries and analysts (that is what ``hash_prefix`` is for: a recipient can count repeats);
- they are linkable to nothing else: another column, another dataset, another node, or anyone
  hashing candidate IDs without the secret (HKDF outputs for distinct ``info`` are independent
  under HKDF's PRF assumption on the HMAC);
- a dataset removed and registered again under the same name keeps its pseudonyms;
- losing or replacing the secret file changes every pseudonym the node releases from then on
  (nothing else depends on it; no released value can be recomputed without it).

Creation: :meth:`MaskSecret.load_or_create` makes the file the first time a node is built from
its home (``Node.from_config``), so ``govshare node init`` creates it, and a home made before
this file existed gets one the first time the node starts. Creation is atomic (written to a
private temporary file, then hard-linked into place, which never overwrites), so two processes
opening a fresh home at once end up with one secret.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound
from govshare.protocols.suite import Suite

MASK_SECRET = "mask.secret"
# 256 bits of secret: HKDF-SHA256's full strength.
SECRET_BYTES = 32
# One SHA-256 output; masking.MIN_HASH_KEY_BYTES asks for at least 16.
KEY_BYTES = 32
# Domain separation: no other govshare HKDF use can produce the same key.
INFO_PREFIX = b"govshare/v1/mask-key/hash_prefix"


def derive_mask_key(secret: bytes, dataset: str, column: str, suite: Suite) -> bytes:
    """The ``hash_prefix`` HMAC key of ``dataset.column`` under a node's masking secret, with
    HKDF of the federation ``suite``'s hash (HKDF-SHA256, or HKDF-SM3 under ``sm``).

    Raises:
        TypeError: ``secret`` is not 32 bytes, or a name is not a non-empty str.
    """
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise TypeError(f"a masking secret is {SECRET_BYTES} bytes")
    info = INFO_PREFIX + _length_prefixed(dataset, "dataset") + _length_prefixed(column, "column")
    return suite.kdf(secret, info=info, length=KEY_BYTES)


def _length_prefixed(name: str, what: str) -> bytes:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart whatever the names hold.
    if not isinstance(name, str) or not name:
        raise TypeError(f"the {what} name must be a non-empty str")
    data = name.encode("utf-8")
    if len(data) > 0xFFFF:
        raise TypeError(f"the {what} name is too long")
    return struct.pack(">H", len(data)) + data


class MaskSecret:
    """A node's masking secret, held in memory; its repr never shows the bytes."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise TypeError(f"a masking secret is {SECRET_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "MaskSecret(<hidden>)"

    def key(self, dataset: str, column: str, suite: Suite) -> bytes:
        """The ``hash_prefix`` key of ``dataset.column`` (see :func:`derive_mask_key`)."""
        return derive_mask_key(self._secret, dataset, column, suite)

    @classmethod
    def load(cls, path: Path) -> MaskSecret:
        """Read a secret file.

        Raises:
            NotFound: no such file.
            MalformedInput: the file does not hold exactly 32 bytes (truncated, or not ours).
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no masking secret at {path}") from None
        if len(data) != SECRET_BYTES:
            raise MalformedInput(
                f"masking secret {path} holds {len(data)} bytes, not {SECRET_BYTES}; "
                "restore it from a backup, or move it away to start a new one (every "
                "hash_prefix pseudonym then changes)",
                field=MASK_SECRET,
            )
        return cls(data)

    @classmethod
    def create(cls, path: Path, *, secret: bytes | None = None) -> MaskSecret:
        """Write a new secret file (mode 0600) from ``secret``, or from ``os.urandom``.

        Raises:
            AlreadyExists: the file exists (a secret is never overwritten).
            TypeError: ``secret`` is given and is not 32 bytes.
        """
        value = os.urandom(SECRET_BYTES) if secret is None else secret
        made = cls(value)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                # A hard link never replaces an existing file, and the file it exposes is
                # already complete: a concurrent reader sees all 32 bytes or no file.
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(f"{path} exists; a masking secret is never replaced") from None
        finally:
            tmp.unlink(missing_ok=True)
        return made

    @classmethod
    def load_or_create(cls, home: Path) -> MaskSecret:
        """The secret in ``home/mask.secret``, created first if the home has none.

        Raises:
            MalformedInput: the file exists and is not 32 bytes (never silently replaced).
        """
        path = home / MASK_SECRET
        try:
            return cls.load(path)
        except NotFound:
            pass
        try:
            return cls.create(path)
        except AlreadyExists:  # another process created it first
            return cls.load(path)
