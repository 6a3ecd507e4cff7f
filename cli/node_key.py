"""``govshare node key``: split the node's data key among officers, recover it from their shares.

Registered under ``govshare node`` by ``group.add_command(key)`` in ``cli/node.py``. The CLI may
reach the node only through its façade (tests/test_layers.py), so these commands take the key
file's path and use the pure share format (:mod:`govshare.protocols.key_shares`); the files they
write are created 0600 and never overwrite anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from govshare.cli.common import console, emit_json, json_option, render_table
from govshare.protocols.errors import MalformedInput
from govshare.protocols.key_shares import DATA_KEY_BYTES, KeyShare, recover_key, split_key
from govshare.protocols.suite import SUITE_NAMES, suite_by_name

SHARE_SUFFIX = ".share.json"


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 (refusing to overwrite), write and fsync ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != DATA_KEY_BYTES:
        raise MalformedInput(f"{path} is not a 32-byte data key", field="key_file")
    return key


@click.group("key")
def key() -> None:
    """The node's data key: split it among officers, recover it from their shares."""


@key.command("split")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The node's data key (keys/data.key in its home).",
)
@click.option("--node", "node_name", required=True, help="The node's member name.")
@click.option(
    "--officer",
    "officers",
    required=True,
    multiple=True,
    help="An officer who keeps a share; repeat once per officer (share indices follow).",
)
@click.option("-k", "k", required=True, type=int, help="How many officers recover the key.")
@click.option(
    "--suite",
    type=click.Choice(SUITE_NAMES),
    default="standard",
    show_default=True,
    help="The federation's crypto suite (for the key check value and checksums).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A new folder for the share files (0700); hand each officer their file.",
)
@json_option
def split(
    key_file: Path,
    node_name: str,
    officers: tuple[str, ...],
    k: int,
    suite: str,
    out: Path,
    as_json: bool,
) -> None:
    """Split the data key so that any K of the named officers can recover it.

    Writes one file per officer, NODE.INDEX.OFFICER.share.json, each labelled with the
    officer, index, k, n and the key's check value. Fewer than K shares reveal nothing.
    """
    shares = split_key(
        _read_key(key_file), suite=suite_by_name(suite), node=node_name, officers=officers, k=k
    )
    out.mkdir(mode=0o700)
    os.chmod(out, 0o700)
    written = []
    for share in shares:
        path = out / f"{share.node}.{share.index}.{share.officer}{SHARE_SUFFIX}"
        _write_private(path, share.encode())
        written.append((share, path))
    check = shares[0].key_check_value.hex()
    if as_json:
        emit_json(
            {
                "node": node_name,
                "k": k,
                "n": len(shares),
                "suite": suite,
                "key_check_value": check,
                "shares": [
                    {"officer": s.officer, "index": s.index, "file": str(p)} for s, p in written
                ],
            }
        )
        return
    render_table(
        f"{node_name}: data key split {k} of {len(shares)} (check value {check})",
        ["officer", "index", "file"],
        [(s.officer, str(s.index), str(p)) for s, p in written],
    )


@key.command("recover")
@click.argument(
    "share_files",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the recovered key (created 0600; never overwritten).",
)
@json_option
def recover(share_files: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Recover the data key from at least K officers' share files.

    Refuses too few shares, shares of different splits, and altered shares (naming their
    officers when the others recover the key): a wrong key is never written.
    """
    shares = [KeyShare.decode(path.read_bytes()) for path in share_files]
    recovered = recover_key(shares)
    _write_private(out, recovered)
    first = shares[0]
    summary = {
        "node": first.node,
        "k": first.k,
        "n": first.n,
        "officers": [s.officer for s in shares],
        "key_check_value": first.key_check_value.hex(),
        "file": str(out),
    }
    if as_json:
        emit_json(summary)
        return
    console.print(
        f"data key of [bold]{first.node}[/] recovered from {len(shares)} of {first.n} shares "
        f"(check value {summary['key_check_value']}) into {out}",
        soft_wrap=True,
    )
