"""A throwaway PostgreSQL server: Debian's initdb and pg_ctl in a temporary directory.

What the department's database is to a node, for the tests
(``tests/node/data/test_source_postgresql.py``), ``python -m govshare.examples.demo
--postgres`` and ``bench/source.py``; never a production set-up. ``make pytest`` installs
Debian's ``postgresql`` package when it is missing (the Makefile's ``postgresql`` step).

PostgreSQL refuses to run as root, so when its caller is root the cluster belongs to ``nobody``
and its programs run under ``runuser``; otherwise they run as the current user. The server
listens on 127.0.0.1 at the given port (password authentication, SCRAM) and on a Unix socket in
its own directory (trust, for the superuser's own SQL). Nothing waits on a timer: ``pg_ctl -w``
returns once the server accepts connections.

The password is written to a libpq password file (:attr:`PgServer.passfile`, for
``PGPASSFILE``), the way a department gives its node a credential; :meth:`PgServer.location`
is the ``postgresql://`` location without it.
"""

from __future__ import annotations

import csv
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import psycopg
from psycopg import sql

# The tests' superuser and the department's database.
SUPERUSER = "govshare"
DATABASE = "dept"
# Unprivileged account for the cluster when the tests run as root.
CLUSTER_USER = "nobody"


def binaries() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name.split(".")[0]),
    )
    if not found:
        raise RuntimeError(
            "a throwaway PostgreSQL server needs Debian's postgresql package (initdb, "
            "pg_ctl): run 'make postgresql' as root, or 'sudo apt-get install postgresql'"
        )
    return Path(found[-1]).parent


class PgServer:
    """One PostgreSQL cluster, started by :meth:`start` and stopped by :meth:`stop`."""

    def __init__(self, port: int, password: str) -> None:
        self.port, self.password = port, password
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="govshare-pg-"))
        self.data = self.root / "data"
        self.passfile = self.root / "pgpass"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            account = pwd.getpwnam(CLUSTER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", CLUSTER_USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.root, text=True)

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            account = pwd.getpwnam(CLUSTER_USER)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        pwfile.unlink()
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{SUPERUSER}:{self.password}\n")
        self.passfile.chmod(0o600)

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def location(self, database: str = DATABASE) -> str:
        """The department's ``--source``: TCP, no password (libpq finds it in PGPASSFILE)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self, database: str = DATABASE) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the Unix socket (autocommit), for the tests' own SQL."""
        return psycopg.connect(
            host=str(self.root), port=self.port, user=SUPERUSER, dbname=database, autocommit=True
        )

    def create_database(self, database: str = DATABASE) -> None:
        with self.admin("postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def load_csv(
    conn: psycopg.Connection[tuple[object, ...]],
    table: str,
    csv_path: Path,
    types: Mapping[str, str] = MappingProxyType({}),
) -> None:
    """Create ``table`` with the CSV's header as its columns (``types`` by name, else
    ``text``) and copy the file's rows into it."""
    with csv_path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(types.get(name, "text")))
        for name in header
    )
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(table), columns))
    copy = sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv, HEADER true)").format(
        sql.Identifier(table)
    )
    with conn.cursor().copy(copy) as target, csv_path.open("rb") as source:
        while block := source.read(1 << 20):
            target.write(block)


@dataclass
class Departments:
    """The demo's departments that keep their records in PostgreSQL: one database each on one
    server, and where each node's dataset is (node -> (database, table))."""

    server: PgServer
    tables: dict[str, tuple[str, str]]

    def dataset_args(self, node: str) -> list[str]:
        """``dataset add`` arguments naming the node's live table (no password)."""
        database, table = self.tables[node]
        return ["--source", self.server.location(database), "--table", f"public.{table}"]

    def stop(self) -> None:
        self.server.stop()
        self.server.remove()


def start_departments(
    port: int, datasets: Mapping[str, tuple[str, Path, Mapping[str, str]]]
) -> Departments:
    """Start a server, and for each node a database of its name holding its CSV as a table
    (node -> (table, CSV file, column types)). The credential goes where libpq looks for it,
    ``PGPASSFILE`` in this process's environment, which the nodes it starts inherit."""
    server = PgServer(port, secrets.token_hex(16))
    server.init()
    server.start()
    os.environ["PGPASSFILE"] = str(server.passfile)
    try:
        for node, (table, csv_path, types) in datasets.items():
            server.create_database(node)
            with server.admin(node) as conn:
                load_csv(conn, table, csv_path, types)
    except BaseException:
        server.stop()
        server.remove()
        raise
    return Departments(server, {node: (node, table) for node, (table, _, _) in datasets.items()})
