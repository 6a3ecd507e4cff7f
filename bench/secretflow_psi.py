"""SecretFlow's PSI (``spu``'s libpsi) between two local processes: the anchor of bench/psi.py.

Runs under the Python of a virtual environment that has ``spu`` (``make secretflow`` builds
.venv/secretflow, the RR22 engine's): its dependencies (numpy < 2, jax) clash with govshare's,
so this script imports no govshare code and bench/psi.py starts it with that interpreter.
Both parties read a one-column CSV of keys; party 0 receives the intersection (written to
``--dir``, not read).
With ``--cert-dir`` the parties' link runs over mutual TLS (``ca.pem``, ``party{0,1}.pem`` and
``party{0,1}.key`` there).

    PY=.venv/secretflow/bin/python
    $PY bench/secretflow_psi.py --protocol rr22 --inputs a.csv b.csv --key id_number --dir out

Prints one line, ``secretflow-result:`` and JSON (libpsi logs to stdout too): the protocol, the
wall seconds from both parties ready (spu imported) to both finishing (link set-up, reading the
CSV, the protocol and writing the result), the intersection count party 0
reported, and each party's sizes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import time
from queue import Empty
from typing import Any

PROTOCOLS = ("ecdh", "rr22")
RESULT_PREFIX = "secretflow-result:"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _party(
    rank: int,
    protocol: str,
    inputs: list[str],
    key: str,
    out_dir: str,
    ports: list[int],
    cert_dir: str | None,
    queue: Any,
    leave: Any,
) -> None:
    # The spu environment only: not installed beside govshare, so mypy does not see it.
    import spu.libspu.link as link  # type: ignore[import-not-found]
    import spu.psi as psi  # type: ignore[import-not-found]

    desc = link.Desc()
    desc.id = f"govshare-bench-{protocol}"
    for i, port in enumerate(ports):
        desc.add_party(f"party{i}", f"127.0.0.1:{port}")
    desc.recv_timeout_ms = 30 * 60 * 1000
    desc.http_timeout_ms = 30 * 60 * 1000
    if cert_dir is not None:
        desc.enable_ssl = True
        for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
            opts.cert.certificate_path = os.path.join(cert_dir, f"party{rank}.pem")
            opts.cert.private_key_path = os.path.join(cert_dir, f"party{rank}.key")
            opts.verify.ca_file_path = os.path.join(cert_dir, "ca.pem")
            opts.verify.verify_depth = 1
    ready = time.perf_counter()  # spu imported (jax is slow to import): not protocol time
    lctx = link.create_brpc(desc, rank)
    config = psi.PsiExecuteConfig()
    if protocol == "ecdh":
        config.protocol_conf.protocol = psi.PsiProtocol.PROTOCOL_ECDH
        config.protocol_conf.ecdh_params.curve = psi.EllipticCurveType.CURVE_25519
    else:
        config.protocol_conf.protocol = psi.PsiProtocol.PROTOCOL_RR22
    config.protocol_conf.receiver_rank = 0
    config.protocol_conf.broadcast_result = False
    config.input_params.type = psi.SourceType.SOURCE_TYPE_FILE_CSV
    config.input_params.path = inputs[rank]
    config.input_params.selected_keys = [key]
    config.input_params.keys_unique = True
    config.output_params.type = psi.SourceType.SOURCE_TYPE_FILE_CSV
    config.output_params.path = os.path.join(out_dir, f"{protocol}-party{rank}.csv")
    config.output_params.disable_alignment = True
    report = psi.psi_execute(config, lctx)
    queue.put(
        {
            "rank": rank,
            "intersection": report.intersection_count,
            "size": report.original_count,
            "ready": ready,
            "end": time.perf_counter(),
        }
    )
    queue.close()
    queue.join_thread()
    # Both parties done before either leaves (as govshare's RR22 driver does): psi_execute may
    # return while the peer still sends its last messages, and a party leaving then left its
    # peer waiting for the link's timeout (a 100k run). Then at once: tearing down the link's
    # threads can take minutes.
    leave.wait()
    os._exit(0)


def run(
    protocol: str, inputs: list[str], key: str, out_dir: str, cert_dir: str | None
) -> dict[str, Any]:
    """Both parties in their own processes; returns the JSON-able outcome."""
    # libpsi creates the parent folder of every path it writes: relative paths fail.
    inputs = [os.path.abspath(path) for path in inputs]
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ports = [_free_port(), _free_port()]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    leave = context.Event()
    parties = [
        context.Process(
            target=_party,
            args=(rank, protocol, inputs, key, out_dir, ports, cert_dir, queue, leave),
            daemon=True,  # ended with this process on a normal exit
        )
        for rank in (0, 1)
    ]
    for process in parties:
        process.start()
    results: list[dict[str, Any]] = []
    while len(results) < len(parties):
        try:
            results.append(queue.get(timeout=1))
        except Empty:
            failed = [p.exitcode for p in parties if p.exitcode not in (None, 0)]
            if failed:
                for process in parties:
                    process.kill()
                raise SystemExit(f"a SecretFlow party failed (exit {failed[0]})") from None
    # From both parties ready to both done; perf_counter is the system's monotonic clock,
    # shared by the parties' processes.
    wall = max(r["end"] for r in results) - max(r["ready"] for r in results)
    leave.set()
    for process in parties:
        process.join(timeout=60)
        if process.exitcode != 0:
            raise SystemExit(f"a SecretFlow party failed (exit {process.exitcode})")
    by_rank = {r["rank"]: r for r in results}
    return {
        "protocol": protocol,
        "wall": wall,
        "intersection": by_rank[0]["intersection"],
        "sizes": [by_rank[0]["size"], by_rank[1]["size"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--inputs", nargs=2, required=True, help="party 0's and party 1's CSV")
    parser.add_argument("--key", required=True, help="the key column")
    parser.add_argument("--dir", required=True, help="where the parties write their output")
    parser.add_argument("--cert-dir", help="mutual TLS on the link (see the docstring)")
    options = parser.parse_args()
    outcome = run(options.protocol, options.inputs, options.key, options.dir, options.cert_dir)
    print(f"{RESULT_PREFIX} {json.dumps(outcome)}", flush=True)


if __name__ == "__main__":
    main()
