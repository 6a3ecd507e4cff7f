"""Shared pieces of the benchmarks: a federation of node homes, node processes, peak memory.

Every benchmark runs the real path (DESIGN.md "Performance"): each node is a separate
``govshare node serve`` process with its own store, reached over gRPC with mutual TLS on
loopback.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from govshare.model.governance import Role
from govshare.model.identity import Federation, init_federation
from govshare.node.config import DEFAULT_PROTOCOL_TIMEOUT, write_default
from govshare.protocols.suite import STANDARD, Suite

ANALYST = "alice"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_federation(
    root: Path,
    nodes: Sequence[str],
    analyst: str = ANALYST,
    *,
    protocol_timeout: float = DEFAULT_PROTOCOL_TIMEOUT,
    suite: Suite = STANDARD,
) -> Federation:
    """A federation under ``root``: one home per node (with its config) and the analyst's.

    ``protocol_timeout`` is how long a node waits for its peer's part: a large run's longest
    step (the value holder encrypting every row) must fit in it. ``suite``: the federation's
    crypto suite.
    """
    init_federation(root / "federation", "bench", suite=suite)
    federation = Federation.load(root / "federation")
    for name in nodes:
        federation, _ = federation.enrol(
            role=Role.NODE, name=name, jurisdiction="CN",
            address=f"127.0.0.1:{free_port()}", out=root / name,
        )  # fmt: skip
    federation, _ = federation.enrol(
        role=Role.ANALYST, name=analyst, jurisdiction="CN", out=root / analyst
    )
    for bundle in (*nodes, analyst):
        federation.publish_roster(root / bundle)
    for name in nodes:
        config = write_default(root / name, listen=federation.roster.member(name).address)
        config.write_text(
            config.read_text().replace(
                f"protocol_timeout = {DEFAULT_PROTOCOL_TIMEOUT}",
                f"protocol_timeout = {float(protocol_timeout)}",
            )
        )
    return federation


@contextmanager
def node_processes(root: Path, nodes: Sequence[str]) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Start ``govshare node serve`` for each node home under ``root``; stop them on exit."""
    processes: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in nodes:
            process = subprocess.Popen(
                [sys.executable, "-m", "govshare.cli", "node", "serve", "--home", str(root / name)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            processes[name] = process
            assert process.stdout is not None
            if "serving on" not in process.stdout.readline():
                raise SystemExit(f"node {name} did not start")
        yield processes
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.wait(timeout=60)


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over ``pid`` and its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def enrol_analysts(
    root: Path, federation: Federation, names: Sequence[str], *, jurisdiction: str = "CN"
) -> Federation:
    """Enrol more analysts into ``make_federation``'s federation (each with a home under
    ``root``) and publish the new roster to every member's bundle; before the nodes start."""
    for name in names:
        federation, _ = federation.enrol(
            role=Role.ANALYST, name=name, jurisdiction=jurisdiction, out=root / name
        )
    for member in federation.roster.members:
        federation.publish_roster(root / member.name)
    return federation


def set_node_options(home: Path, **values: int | float) -> None:
    """Rewrite ``key = value`` lines of the ``[node]`` table in ``home/node.toml`` (as
    ``write_default`` wrote them), such as ``rate_limit_per_minute`` or ``max_queued``."""
    path = home / "node.toml"
    text = path.read_text()
    for key, value in values.items():
        text, found = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
        if found != 1:
            raise SystemExit(f"{path} has no single '{key} = ...' line")
    path.write_text(text)
