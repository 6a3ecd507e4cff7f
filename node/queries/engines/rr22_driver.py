"""One party of an RR22 PSI run, started by a node under its configured engine interpreter.

Imports only ``spu`` (SecretFlow's libpsi, Apache-2.0) and the standard library: it runs under
the Python of the engine's own virtual environment (``[engines] rr22_python`` in node.toml;
``make secretflow`` builds one), never beside govshare, whose dependencies clash with spu's.
``govshare.node.queries.engines.rr22`` writes its job file and reads what it writes; who learns
what is stated there.

    PYTHON rr22_driver.py JOB.json

The job file (JSON, private to the node) names this party's rank (0 receives), the two link
addresses, the TLS files (this node's certificate and key, the federation CA), the input CSV
(one column ``key``: the node's hashed keys), where rank 0 writes the intersection, where the
result JSON goes, the link timeout, and two tokens: this node's, and the one the peer node sent
over the nodes' gRPC channel. After the link is up each driver sends its token and checks the
peer's against the expected one, so only the peer node's own driver is taken as the peer.

Prints one status word a line on stdout, which the node logs: ``ready`` (spu imported),
``linked`` (the link is up and the peer's token checked), ``done`` (the result written). It
waits, imported, until the node writes ``link`` on its stdin: its job file is then written, and
the peer node's driver is told to link at the same moment (the two nodes exchange their link
offers just before, once both drivers are ready), so that the two links start within
milliseconds of each other. A link that tries its peer before the peer listens is refused, and
brpc then holds the peer as down for seconds. It runs the protocol when the node writes ``go``
(its input is then written). After ``done`` it waits, idle, until the node closes its stdin
(both nodes' drivers done); it leaves at once (os._exit: tearing down the link's threads can
take minutes). Its stdin closing before ``done`` (the node died) ends it. On any failure it
prints ``error: <one line>`` on stderr and exits 1.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import os
import sys
import threading
import types
from typing import Any

RANK_RECEIVER = 0
TOKEN_MISMATCH = "the peer on the link did not present the token its node sent"


def _status(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def _spu() -> tuple[Any, Any]:
    """spu's link and libpsi extension modules, without running spu's package ``__init__``:
    it imports jax (1.5 s and more per driver here), which PSI does not use."""
    spec = importlib.util.find_spec("spu")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"spu is not installed for {sys.executable}")
    package = types.ModuleType("spu")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("spu", package)
    # The engine's environment only: not installed beside govshare, so mypy does not see it.
    import spu.libpsi as libpsi  # type: ignore[import-not-found]
    import spu.libspu as libspu  # type: ignore[import-not-found]

    return libspu.link, libpsi


def _link(link: Any, job: dict[str, Any]) -> Any:
    desc = link.Desc()
    desc.id = str(job["link_id"])
    for rank, address in enumerate(job["parties"]):
        desc.add_party(f"party{rank}", str(address))
    timeout_ms = int(job["timeout_ms"])
    desc.recv_timeout_ms = timeout_ms
    desc.http_timeout_ms = timeout_ms
    desc.connect_retry_times = int(job["connect_retries"])
    desc.connect_retry_interval_ms = int(job["connect_retry_interval_ms"])
    # A refused message is first tried again soon (the peer's link may start a few
    # milliseconds after this one), then with growing pauses, as many times as by default.
    desc.retry_opts.retry_interval_ms = int(job["retry_interval_ms"])
    desc.retry_opts.retry_interval_incr_ms = int(job["retry_interval_incr_ms"])
    desc.brpc_channel_protocol = "baidu_std"
    desc.enable_ssl = True
    tls = job["tls"]
    for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
        opts.cert.certificate_path = str(tls["cert"])
        opts.cert.private_key_path = str(tls["key"])
        opts.verify.ca_file_path = str(tls["ca"])
        opts.verify.verify_depth = 1
    return link.create_brpc(desc, int(job["rank"]))


def _check_peer(lctx: Any, job: dict[str, Any]) -> None:
    """Exchange tokens over the link; the peer's must be the one its node sent us."""
    rank = int(job["rank"])
    lctx.send(1 - rank, str(job["token"]))
    got = lctx.recv(1 - rank)
    got = got.decode() if isinstance(got, bytes) else str(got)
    if not hmac.compare_digest(got.encode(), str(job["peer_token"]).encode()):
        raise RuntimeError(TOKEN_MISMATCH)


def run(job_path: str) -> dict[str, int]:
    link, psi = _spu()
    _status("ready")
    LINK.wait()  # the node ends this process if it gives up first
    with open(job_path, encoding="utf-8") as file:
        job = json.load(file)
    lctx = _link(link, job)
    _check_peer(lctx, job)
    _status("linked")
    GO.wait()
    rank = int(job["rank"])
    config = psi.PsiExecuteConfig()
    config.protocol_conf.protocol = psi.PsiProtocol.PROTOCOL_RR22
    config.protocol_conf.rr22_params.low_comm_mode = bool(job.get("low_comm", False))
    config.protocol_conf.receiver_rank = RANK_RECEIVER
    config.protocol_conf.broadcast_result = False
    config.input_params.type = psi.SourceType.SOURCE_TYPE_FILE_CSV
    config.input_params.path = str(job["input"])
    config.input_params.selected_keys = ["key"]
    config.input_params.keys_unique = True
    config.output_params.type = psi.SourceType.SOURCE_TYPE_FILE_CSV
    config.output_params.path = str(job["output"])
    config.output_params.disable_alignment = True
    report = psi.psi_execute(config, lctx)
    outcome = {"rank": rank, "intersection": int(report.intersection_count),
               "size": int(report.original_count)}  # fmt: skip
    fd = os.open(str(job["result"]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(outcome, out)
    FINISHED.set()
    _status("done")
    return outcome


LINK = threading.Event()
GO = threading.Event()
FINISHED = threading.Event()


def _listen_to_node() -> None:
    """The node says "link" on our standard input once our job file is written, "go" once our
    input is, and holds it open while it runs: at its end (the node died, or killed us), leave
    at once."""
    for line in sys.stdin:
        if line.strip() == "link":
            LINK.set()
        elif line.strip() == "go":
            GO.set()
    if FINISHED.is_set():  # both nodes saw their drivers finish: leave
        os._exit(0)
    sys.stderr.write("error: the node that started this driver has gone\n")
    sys.stderr.flush()
    os._exit(1)


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("error: usage: rr22_driver.py JOB.json\n")
        sys.exit(2)
    threading.Thread(target=_listen_to_node, daemon=True).start()
    try:
        run(sys.argv[1])
        # Idle, the link still up, until the node closes our stdin once its peer's driver has
        # finished too: psi_execute may return while the peer still sends its last messages,
        # and a driver leaving then leaves its peer waiting for the link's timeout, or makes
        # brpc's TLS path abort it.
        threading.Event().wait()
    except BaseException as exc:  # one line for the node's log, whatever failed
        # libpsi's errors carry a native stack trace: the first words say what failed.
        message = " ".join(str(exc).split(" stacktrace:")[0].split()) or type(exc).__name__
        sys.stderr.write(f"error: {message[:400]}\n")
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
