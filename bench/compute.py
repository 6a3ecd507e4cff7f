"""Compute backends: the same PSI on the local process pool and on a Ray cluster, one run.

For each size n, sets up the federation, stores and grants of ``bench/psi.py`` (n rows per
department) and starts a local Ray head per department (``ray start --head --num-cpus
<cores>``, each in its own process group, stopped at the end). One head per node: every
department runs its own cluster, as every node has its own process pool; two nodes' drivers on
one cluster would be two Ray jobs, whose workers Ray keeps restarting as the CPUs pass from
one job to the other. It then times the exact PSI-cardinality query of ``bench/psi.py`` (two
node processes over mutual TLS on loopback, a warm-up query first: pools start, Ray connects)
with both nodes on ``[compute] backend = "local"`` and on ``backend = "ray"``, in the order
local, ray, ray, local (``--rounds 1``: local, ray), so that drift in the machine's load falls
on both alike. Prints each wall time, the counts (which must agree with the generator), and
the ratio ray / local.

On one machine, Ray brings no cores of its own: the ratio is what the backend costs (the
driver process's pipe, Ray's scheduling and object store) against the process pool. Target
(issue 13): <= 1.15 x. The nodes' CPU and RSS columns of bench/psi.py are left out here: Ray's
workers are not in the nodes' process trees.

    .venv/bin/python bench/compute.py [--sizes 100000] [--dir bench-run/compute]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port
from psi import DATASETS, run_path, setup

RAY = str(Path(sys.executable).parent / "ray")


def start_head(cores: int) -> tuple[subprocess.Popen[str], str]:
    """A local Ray head with ``cores`` CPUs; (its process, its address) once it runs."""
    port = free_port()
    process = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--num-cpus", str(cores), "--port", str(port),
            "--disable-usage-stats", "--include-dashboard", "false",
            "--temp-dir", tempfile.mkdtemp(prefix="gsray", dir="/tmp"),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A process group of its own (killed whole at the end), in this session: with the
        # kernel's autogroup scheduling a new session would be a CPU share of its own, which on
        # a loaded machine hands Ray's workers more of the cores than the nodes' pools get.
        process_group=0,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if "Ray runtime started" in line:
            break
    else:
        raise SystemExit("ray start failed")
    # Keep reading the head's output, so that it never blocks on a full pipe.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, f"127.0.0.1:{port}"


def use_backend(root: Path, backend: str, addresses: dict[str, str]) -> None:
    """Point each node's node.toml at ``backend`` (and its own Ray head's address)."""
    for name in DATASETS:
        config = root / name / "node.toml"
        text = config.read_text(encoding="utf-8")
        text = re.sub(r'(?m)^backend = ".*"$', f'backend = "{backend}"', text)
        text = re.sub(r'(?m)^address = ".*"$', f'address = "{addresses[name]}"', text)
        config.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--dir", type=Path, default=Path("bench-run/compute"))
    parser.add_argument(
        "--rounds", type=int, default=2, help="1: local, ray; 2: local, ray, ray, local"
    )
    options = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"PSI cardinality (exact), two node processes over mTLS, {cores} cores; "
          f"local process pools vs a local Ray head per node, {cores} CPUs each")  # fmt: skip
    heads = {name: start_head(cores) for name in DATASETS}
    addresses = {name: address for name, (_, address) in heads.items()}
    try:
        for n in (int(s) for s in options.sizes.split(",")):
            root = options.dir / str(n)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            expected = setup(root, n)
            walls: dict[str, list[float]] = {"local": [], "ray": []}
            order = ("local", "ray", "ray", "local")[: 2 * options.rounds]
            for backend in order:
                use_backend(root, backend, addresses)
                row = run_path(root, n, expected, math.nan, path="batched", with_dp=False)
                walls[backend].append(row["wall"])
                print(f"{n:>10,} {backend:>6}: wall {row['wall']:7.1f} s, |A∩B| "
                      f"{int(row['count']):,} (expected {expected:,})", flush=True)  # fmt: skip
            local = sum(walls["local"]) / len(walls["local"])
            ray = sum(walls["ray"]) / len(walls["ray"])
            print(
                f"{n:>10,} mean wall: local {local:.1f} s, ray {ray:.1f} s; "
                f"ray / local = {ray / local:.2f} x (target <= 1.15 x)",
                flush=True,
            )
    finally:
        for head, _ in heads.values():
            # Its process group, and every descendant (Ray puts some workers in process
            # groups of their own), found before the kill re-parents them.
            tree = descendants(head.pid)
            os.killpg(head.pid, signal.SIGKILL)
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            head.wait()


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


if __name__ == "__main__":
    main()
