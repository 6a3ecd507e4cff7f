"""The node's keystore: its data key, the root of protection at rest (issue 12).

The data key is 32 random bytes (``os.urandom``) in ``<home>/keys/data.key``, mode 0600 in a
0700 folder, written once (``O_EXCL``: never overwritten) and ``fsync``-ed with its folder.
Nothing encrypts with it directly: :func:`at_rest_key` derives the key of the federation's
suite for each purpose (AES-256-GCM under ``standard``, SM4-GCM, 128-bit, under ``sm``), so one
data key serves either suite and every purpose has its own key.

Threat model: protection at rest is against a copy of the node's database or backups without
the key file (a stolen disk image of the data volume, a backup taken from ``node.db``), and
against other local users (modes). It is not against root on a running node, which can read the
key file and the process memory. Recovery of a lost key file is by a k-of-n split among named
officers (:mod:`govshare.protocols.key_shares`); :func:`restore_data_key` writes a recovered key
back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from govshare.protocols.errors import AlreadyExists, MalformedInput, NotFound
from govshare.protocols.key_shares import DATA_KEY_BYTES
from govshare.protocols.suite import Suite

__all__ = [
    "DATA_KEY_BYTES",
    "DATA_KEY_PATH",
    "at_rest_key",
    "create_data_key",
    "data_key_path",
    "read_data_key",
    "restore_data_key",
]

DATA_KEY_PATH: Final = Path("keys") / "data.key"  # relative to the node's home
_PRIVATE_FILE: Final = 0o600
_PRIVATE_DIR: Final = 0o700
_AT_REST_DOMAIN: Final = b"govshare/at-rest/v1/"


def data_key_path(home: Path) -> Path:
    return home / DATA_KEY_PATH


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_key(home: Path, key: bytes) -> Path:
    if len(key) != DATA_KEY_BYTES:
        raise MalformedInput("a data key is 32 bytes", field="key")
    path = data_key_path(home)
    path.parent.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
    os.chmod(path.parent, _PRIVATE_DIR)  # mkdir's mode is masked by the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists; a data key is never overwritten") from None
    try:
        os.fchmod(fd, _PRIVATE_FILE)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return path


def create_data_key(home: Path) -> Path:
    """Make the node's data key (32 random bytes, mode 0600).

    Raises:
        AlreadyExists: the home has a data key already.
    """
    return _write_key(home, os.urandom(DATA_KEY_BYTES))


def restore_data_key(home: Path, key: bytes) -> Path:
    """Write a key recovered from officers' shares; refuses to replace an existing one."""
    return _write_key(home, key)


def read_data_key(home: Path) -> bytes:
    """The node's data key.

    Raises:
        NotFound: no key file (recover it from the officers' shares).
        MalformedInput: the file is not 32 bytes.
    """
    path = data_key_path(home)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no data key at {path}") from None
    if len(key) != DATA_KEY_BYTES:
        raise MalformedInput(f"{path} is not a 32-byte data key", field="key")
    return key


def at_rest_key(suite: Suite, data_key: bytes, purpose: str) -> bytes:
    """The suite's AEAD key for one ``purpose`` (e.g. ``"dataset-rows"``), derived with the
    suite's HKDF so that purposes never share a key."""
    if len(data_key) != DATA_KEY_BYTES:
        raise MalformedInput("a data key is 32 bytes", field="key")
    if not purpose:
        raise TypeError("purpose must name what the key protects")
    return suite.kdf(
        data_key, info=_AT_REST_DOMAIN + purpose.encode("utf-8"), length=suite.cipher_key_size
    )
