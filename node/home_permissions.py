"""File modes of a node's home: every file 0600, the home and every folder in it 0700 (issue 12).

A node's home holds its signing and TLS keys, its data key, its database (datasets in it) and
its audit log; a world-readable file there hands them to every local user. The check is a pure
report, :func:`check_home_permissions`; :func:`refuse_unless_private` turns a non-empty report
into :class:`HomeNotPrivate`, one line naming the first offence, its mode and the ``chmod`` that
fixes it, which the node's start-up raises before it opens anything.

:func:`make_private` sets those modes on a home and everything in it: ``node init`` runs it
(``write_default``), when a folder of keys and certificates handed over by the federation
administrator becomes a node home. After that the node keeps them: everything it creates is
made 0600 (the stores' files before SQLite opens them; SQLite gives a database's ``-wal`` and
``-shm`` the database's own mode).

What counts: permission bits (``mode & 0o7777``, so setuid, setgid and sticky bits offend too)
of the home, of every folder and regular file under it, read with ``lstat``. A symbolic link
offends whatever its target: it can point out of the home, where these modes do not hold. Other
file types (a socket, a FIFO) must be 0600 like files. Ownership is not checked here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final, NamedTuple

from govshare.protocols.errors import NotFound, PermissionDenied

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "HomeNotPrivate",
    "Offence",
    "check_home_permissions",
    "create_private",
    "make_private",
    "refuse_unless_private",
]

FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


class Offence(NamedTuple):
    """A path under the home whose mode is not the one required."""

    path: Path
    mode: int  # permission bits found (mode & 0o7777)
    expected: int | None  # None: a symbolic link, which no mode makes acceptable

    def describe(self) -> str:
        if self.expected is None:
            return f"{self.path}: a symbolic link (not allowed in a node's home)"
        return f"{self.path}: mode {self.mode:04o}, expected {self.expected:04o}"

    def fix(self) -> str:
        """The command that clears this offence."""
        if self.expected is None:
            return f"rm '{self.path}' (and put the file itself there)"
        return f"chmod {self.expected:o} '{self.path}'"


class HomeNotPrivate(PermissionDenied):
    """A node's home, or something in it, is open to other local users."""


def _offence(path: Path) -> Offence | None:
    info = os.lstat(path)
    bits = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return Offence(path, bits, None)
    expected = DIR_MODE if stat.S_ISDIR(info.st_mode) else FILE_MODE
    return None if bits == expected else Offence(path, bits, expected)


def check_home_permissions(home: Path) -> list[Offence]:
    """Every path under ``home`` (itself included) whose mode is wrong, in walk order.

    Symbolic links are reported and not followed.

    Raises:
        NotFound: ``home`` does not exist.
    """
    if not home.exists() and not home.is_symlink():
        raise NotFound(f"node home {home} does not exist")
    found = []
    top = _offence(home)
    if top is not None:
        found.append(top)
        if top.expected is None:
            return found
    for folder, dirs, files in os.walk(home, followlinks=False):
        dirs.sort()
        for name in [*sorted(dirs), *sorted(files)]:
            offence = _offence(Path(folder) / name)
            if offence is not None:
                found.append(offence)
    return found


def refuse_unless_private(home: Path) -> None:
    """Raise unless every path under ``home`` has the required mode.

    Raises:
        HomeNotPrivate: one line: the first offence, the fix, and how many more there are.
        NotFound: ``home`` does not exist.
    """
    found = check_home_permissions(home)
    if not found:
        return
    first = found[0]
    more = ""
    if len(found) > 1:
        more = (
            f"; {len(found) - 1} more path(s) offend (fix them all: find '{home}' -type d "
            "-exec chmod 700 {} + -o -type f -exec chmod 600 {} +)"
        )
    raise HomeNotPrivate(
        f"refusing to start: node home not private: {first.describe()}; fix: {first.fix()}{more}"
    )


def make_private(home: Path) -> None:
    """Give ``home`` and every folder in it 0700 and every file 0600 (symbolic links are left
    for :func:`check_home_permissions` to report)."""
    os.chmod(home, DIR_MODE)
    for folder, dirs, files in os.walk(home, followlinks=False):
        for name in dirs:
            path = Path(folder) / name
            if not path.is_symlink():
                os.chmod(path, DIR_MODE)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                os.chmod(path, FILE_MODE)


def create_private(path: Path | str) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (a store before SQLite first opens
    it: its -wal and -shm files take the database's mode). An existing file is left alone, and
    no descriptor of it is opened (closing one would drop SQLite's POSIX locks on it)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
