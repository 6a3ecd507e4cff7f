"""One node per home: an advisory lock on ``<home>/node.lock`` held while a node is open.

Two nodes on one home would share its stores and listen address and both fail, late and in
confusing ways (a port in use, interleaved audit entries). :meth:`Node.from_config` therefore
takes this lock first and refuses at once, naming the home and the process holding it.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on an open file: the kernel drops it when the holder's
descriptor closes, which a process that dies (``kill -9`` included) does, so a crashed node
leaves no stale lock behind and the file itself is never deleted (deleting a lock file lets two
processes lock two different files). The file holds the holder's pid only for the message.

The descriptor is not inherited by programs the node starts (Python opens files
close-on-exec); a child made by a bare ``fork`` would share the lock, which the node never does
(its pool uses a forkserver). The lock is advisory: it binds govshare nodes, not other programs;
and like every ``flock`` it may not hold across machines on a network file system.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from govshare.protocols.errors import Conflict

LOCK_NAME = "node.lock"


class HomeInUse(Conflict):
    """Another open node holds this home's lock."""


class HomeLock:
    """The held lock on a home; :meth:`release` (or process exit) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, home: Path) -> HomeLock:
        """Lock ``home`` for this process, writing its pid into the lock file.

        Raises:
            HomeInUse: another process (or another node in this one) holds the lock.
            OSError: the lock file cannot be created.
        """
        path = home / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # a node home is private
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "another process"
            raise HomeInUse(
                f"node home {home} is in use: {who} holds its lock {path}; "
                "stop that node first (one node per home)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no pid of a stopped node left to mislead a reader
        except OSError:
            pass
        os.close(fd)


def holder(home: Path) -> int | None:
    """The pid written by the node holding ``home``'s lock, if any process holds it."""
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None
