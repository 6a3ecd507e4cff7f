"""Membership on RR22: SecretFlow's libpsi in a driver process, its link under federation mTLS.

A membership query whose signed plan says ``"engine": "rr22"`` (``govshare query psi --engine
rr22``) runs its set intersection here instead of on ECDH-PSI; everything before and after is
the PSI kind's as for ECDH (``govshare.node.queries.kinds.psi``): admission, the policy gate,
approvals, the filtered-set floor and the tracker check, and with the matches the same storage
(``govshare node results``) or masked release. Flow at each of the two nodes, once approved:

1. The node starts the driver (``rr22_driver.py``, importing only spu and the standard library)
   under the interpreter of ``[engines] rr22_python``; the driver imports its library and waits.
2. Meanwhile the node reads its distinct, filtered, normalised join keys and runs the data
   checks (the filtered-set floor, the tracker check of an exact release), hashes the keys
   (the suite's hash over a domain tag, the query id and the key, 96 bits in base64) into a
   CSV in a private temporary folder (0700, files 0600, removed when the run ends, however it
   ends). No driver reads a key before its node's checks passed.
3. Once its input is written and its driver ready, the node picks a free port on the host of
   its ``[node] listen`` and a random token, and sends both to the peer node over their gRPC
   channel (``Peer.Deliver``, phase ``link``, logged sent and received like every protocol
   message); with the peer's it tells its driver to go. The offers cross when both nodes are
   ready, so the two drivers start their links within a message's time of each other (a link
   that tries its peer before the peer listens is refused, and brpc holds the peer as down for
   seconds). The drivers connect over libpsi's link (brpc) with mutual TLS: each presents its
   node's federation TLS certificate and key and accepts only a certificate chaining to the
   federation CA; then each sends its token and checks the peer's against the one the peer
   node sent over gRPC. The receiving node (the plan's recipient, else the left node) is rank
   0 and alone gets libpsi's output.
4. The node logs each step (``protocol.step``, direction ``engine``: ``rr22.started``,
   ``rr22.input`` with the digest and size of its input file (its keys in import order, each
   where it first appears, so that an auditor with the node's data can re-derive the digest),
   ``rr22.linked``, ``rr22.done`` with the digest and size of the output), reads the
   receiver's output and maps the hashes back to its keys.

Any failure ends the run with nothing released: the driver killed, the folder removed, the
query failed and the peer told (``query.failed`` names why). A driver that exits non-zero (its
peer vanished, the link broke or timed out, the token did not match), a TLS handshake that
fails on the link (seen on the driver's log at the first attempt, so a wrong certificate is
refused at once rather than after the link's retries), the peer node's abort notice, the
analyst's withdrawal or the node stopping, and the protocol timeout for the whole run. A
driver whose node dies sees its standard input close and exits.

Who learns what (semi-honest model, as ECDH-PSI's; ``govshare.protocols.ecdh_psi``):

- The receiving node learns which of its keys are in the intersection, and the other set's
  size (libpsi's report) — as with ECDH-PSI's membership, which also shows it the peer's set
  size. The sending node learns the receiver's set size and nothing else: no output is
  written for it. The analyst learns what the ECDH path gives: how many matched (noised
  unless exact), or the masked keys.
- RR22 (Raghuraman and Rindal, 2022: an OPRF built from VOLE over OT extension, with an OKVS) is
  secure against semi-honest parties here; libpsi's malicious variant is not offered by
  spu 0.9.5's Python API, so a node that deviates from the protocol is not caught by it (it is
  by ECDH-PSI neither: both are semi-honest). Unlike ECDH-PSI its security rests on OT
  extension and a random-oracle hash rather than on the hardness of X25519's CDH, and no
  doubly-masked points ever leave a node: each node's messages are OKVS encodings and OPRF
  values of hashes.
- The link: TLS with the federation's certificates, so an eavesdropper learns only traffic
  sizes and a party outside the federation cannot join. The link checks the certificate's
  chain, not its name; the token, sent over the nodes' authenticated gRPC channel, makes the
  drivers take only their peer node's driver as the peer.
- The driver process sees its node's hashed keys (never the keys themselves: the hash is keyed
  with the query id, but a guessable key space can be searched by whoever reads the file, as
  with any unkeyed hash), the node's TLS key (it reads the node's own file) and, at the
  receiver, which hashes matched. It runs with the node's user and permissions.
"""

from __future__ import annotations

import binascii
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import Any

from govshare.model.identity import CA_CERT, TLS_CERT, TLS_KEY
from govshare.node.queries.engines import EngineSettings
from govshare.protocols.errors import Aborted, Conflict, MalformedInput
from govshare.protocols.suite import Suite

ENGINE = "rr22"
DRIVER = Path(__file__).resolve().with_name("rr22_driver.py")
KEY_DOMAIN = b"govshare/rr22/key/v1\x00"
# 96 bits of the suite's hash, the CSV's key column in base64: 12 bytes are 16 base64 digits
# exactly, so a whole packed buffer encodes in one call and splits into cells. 17 bytes a line
# (hex of 128 bits took 33) halve what libpsi reads: it reads its input three times (a check,
# its buckets, the result's join), about a second less at a million keys. Two different keys
# of the two sets collide with probability n * m / 2**96, about 1e-17 at a million each.
HASH_BYTES = 12
CELL_CHARS = 16
INPUT, OUTPUT, RESULT, JOB = "keys.csv", "intersection.csv", "result.json", "job.json"
RANK_RECEIVER = 0
# The driver's link: a connection attempt every 100 ms, as long as the protocol timeout allows.
# The two drivers start within moments of each other; the first to listen waits for the other,
# and an attempt a second cost up to a second of every query's link set-up.
CONNECT_RETRY_INTERVAL_MS = 100
# brpc's log line when a TLS handshake on the link fails.
HANDSHAKE_FAILED = "SSL_do_handshake"
# A refused message on the link is tried again after 100 ms, then 1.1 s, then 2.1 s (yacl's
# defaults: 1, 3 and 5 s): the first retry catches a peer link that starts a moment later.
RETRY_INTERVAL_MS, RETRY_INTERVAL_INCREMENT_MS = 100, 1000
# The steps logged (``protocol.step`` phase ``rr22.<word>``), from the driver's status lines.
STARTED, INPUT, LINKED, DONE = "started", "input", "linked", "done"
READY = "ready"  # the driver's first word: its library imported
LINK = "link"  # the node to its driver, on stdin: the job file is written, link to the peer
GO = "go"  # the node to its driver, on stdin: the input is written, run the protocol


def not_configured(node: str) -> Conflict:
    """The refusal of a node that has no RR22 engine configured (FAILED_PRECONDITION)."""
    return Conflict(
        f"node {node} does not offer the rr22 engine: its operator sets [engines] rr22_python "
        "in node.toml to the Python of a virtual environment with spu 0.9.5 "
        "('make secretflow' builds .venv/secretflow)"
    )


def hashed_keys(query_id: str, keys: Sequence[bytes], suite: Suite) -> bytes:
    """The driver's input: each key hashed with the domain tag and the query id, in order, with
    the federation's suite's hash (SHA-256, or SM3 under ``sm``; both nodes hash alike), cut
    to ``HASH_BYTES`` and packed (no Python object per key)."""
    prefix = suite.new_hasher()
    prefix.update(KEY_DOMAIN + query_id.encode() + b"\x00")
    out = bytearray()
    for key in keys:
        h = prefix.copy()
        h.update(key)
        out += h.digest()[:HASH_BYTES]
    return bytes(out)


def cells(hashed: bytes) -> bytes:
    """Packed hashes as the driver's CSV cells: one in base64 (standard alphabet, no padding
    needed) a line, no newline after the last. No Python object per hash: the buffer is
    encoded at once and the cells laid out a line apart, one character column at a time."""
    count = len(hashed) // HASH_BYTES
    if not count:
        return b""
    encoded = binascii.b2a_base64(hashed, newline=False)
    line = CELL_CHARS + 1
    laid_out = bytearray(b"\n" * (count * line - 1))
    for column in range(CELL_CHARS):
        laid_out[column::line] = encoded[column::CELL_CHARS]
    return bytes(laid_out)


def input_file(key_cells: bytes) -> bytes:
    """The driver's input CSV: one column, ``key``, the keys' :func:`cells` in order."""
    return b"key\n" + key_cells + b"\n" if key_cells else b"key\n"


def matched_positions(key_cells: bytes, output: Sequence[bytes]) -> list[int] | None:
    """The positions in ``key_cells`` (this node's :func:`cells`) of the cells the driver's
    output lines name (quoted or not), in order; None when a line names anything that is not
    one of them."""
    found = {line.strip().strip(b'"') for line in output}
    ours = key_cells.split(b"\n") if key_cells else []
    # The cells are distinct (the keys are), so each found cell has at most one position: a
    # cell this node did not hand over leaves one found cell without one.
    matched = list(compress(range(len(ours)), map(found.__contains__, ours)))
    return matched if len(matched) == len(found) else None


@dataclass(frozen=True)
class LinkOffer:
    """What a node sends its peer before the drivers start: its link port and its token."""

    port: int
    token: str

    def encode(self) -> bytes:
        return json.dumps({"port": self.port, "token": self.token}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LinkOffer:
        """Raises: MalformedInput: not an offer (a port and a 32-hex-digit token)."""
        try:
            data = json.loads(raw)
        except ValueError:
            raise MalformedInput("the link offer is not JSON", field="items") from None
        port, token = (data.get("port"), data.get("token")) if isinstance(data, dict) else (0, 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise MalformedInput("the link offer's port is not a TCP port", field="items")
        if not isinstance(token, str) or len(token) != 32 or not _is_hex(token):
            raise MalformedInput("the link offer's token is not 32 hex digits", field="items")
        return cls(port, token)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LinkTls:
    """The files the driver's link presents and checks: this node's TLS certificate and key,
    and the federation CA that the peer's certificate must chain to."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of_identity(cls, directory: Path) -> LinkTls:
        directory = directory.resolve()
        return cls(directory / TLS_CERT, directory / TLS_KEY, directory / CA_CERT)


@dataclass(frozen=True)
class Rr22Run:
    """One node's part of one RR22 run, as the PSI kind hands it over."""

    query_id: str
    # This node's keys, read and checked (it may refuse): called once the driver is starting.
    prepare: Callable[[], Sequence[bytes]]
    receiver: bool
    peer: str
    peer_host: str
    # Send this node's link offer to the peer and return the peer's (logged by the caller).
    exchange: Callable[[bytes], bytes]
    # Set when anything the run waits for happens; also by the query's early end.
    wake: threading.Event
    # Why the query ended early (the peer's abort, a withdrawal, the node stopping), or None.
    ended: Callable[[], str | None]
    # Log one step: (word, the bytes it digests with the federation's suite, size).
    step: Callable[[str, bytes, int], None]
    # The federation's suite: the hash of the keys handed to the driver.
    suite: Suite
    # Tell the peer node this driver finished and wait until the peer's has (over gRPC).
    finish: Callable[[], None]
    # End the part's waits (the peer's link offer) with a reason: the run is over.
    end: Callable[[str], None]


class Rr22Engine:
    """Runs RR22 for this node with the driver under the configured interpreter."""

    def __init__(
        self, *, node: str, settings: EngineSettings, identity_dir: Path, timeout: float
    ) -> None:
        if settings.rr22_python is None:
            raise ValueError("no rr22_python configured")
        self.node = node
        self._python = settings.rr22_python
        self._low_comm = settings.rr22_low_comm
        self.host = settings.link_host
        self.tls = LinkTls.of_identity(identity_dir)
        self.timeout = timeout

    @classmethod
    def configured(
        cls, *, node: str, settings: EngineSettings, identity_dir: Path, timeout: float
    ) -> Rr22Engine | None:
        if settings.rr22_python is None:
            return None
        return cls(node=node, settings=settings, identity_dir=identity_dir, timeout=timeout)

    def run(self, run: Rr22Run) -> list[int]:
        """This node's part; the receiver gets the positions in its prepared keys that matched.

        Raises:
            Aborted: the run failed or was ended; nothing was released, no file is left.
            MalformedInput: the peer's link offer was malformed.
        """
        folder = Path(tempfile.mkdtemp(prefix=f"govshare-rr22-{self.node}-"))
        try:
            return self._run(run, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, run: Rr22Run, folder: Path) -> list[int]:
        try:
            process = subprocess.Popen(
                [str(self._python), str(DRIVER), str(folder / JOB)],
                stdin=subprocess.PIPE,  # "link", "go", then held open: closes when this node dies
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=folder,
            )
        except OSError as exc:
            raise Aborted(
                f"{self.node}: cannot start the rr22 engine with {self._python}: "
                f"{exc.strerror or exc}; query aborted, nothing released"
            ) from None
        linking: _Linking | None = None
        try:
            driver = _Driver(process, run, node=self.node, timeout=self.timeout)
            run.step(STARTED, b"", 0)
            # The driver imports its library and links meanwhile; it reads nothing before "go".
            linking = _Linking(self, run, folder, driver)
            hashed = hashed_keys(run.query_id, run.prepare(), run.suite)
            key_cells = cells(hashed)  # the input's, and what the output is mapped back against
            data = input_file(key_cells)
            _write_private(folder / INPUT, data)
            run.step(INPUT, data, len(hashed) // HASH_BYTES)
            del data
            linking.finish()
            _tell(process, GO)
            driver.wait_for(DONE, finished=(folder / RESULT).exists)
            # Both drivers past the protocol and idle: only now may either leave. A driver that
            # leaves while its peer still awaits the answer to its last message makes brpc's
            # TLS path abort the peer ("Check failed ... error_code is 0").
            run.finish()
            assert process.stdin is not None
            process.stdin.close()  # the driver leaves
            process.wait(timeout=self.timeout)
        finally:
            if linking is not None:
                linking.stop()
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdin is not None and not process.stdin.closed:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        if not run.receiver:
            run.step(DONE, b"", 0)
            return []
        try:
            lines = (folder / OUTPUT).read_bytes().splitlines()
        except OSError as exc:
            raise Aborted(
                f"{self.node}: the rr22 engine wrote no intersection ({exc.strerror}); "
                "nothing released"
            ) from None
        matched = matched_positions(key_cells, lines[1:])
        if matched is None:
            raise Aborted(f"{self.node}: the rr22 engine's output names a key it was not given")
        found = b"".join(hashed[i * HASH_BYTES : (i + 1) * HASH_BYTES] for i in matched)
        run.step(DONE, cells(found), len(matched))
        return matched

    def job(self, run: Rr22Run, folder: Path, offer: LinkOffer, peer: LinkOffer) -> dict[str, Any]:
        """The driver's job file: its rank, the link's parties and TLS files, its files."""
        own_address = f"{self.host}:{offer.port}"
        peer_address = f"{run.peer_host}:{peer.port}"
        parties = [own_address, peer_address] if run.receiver else [peer_address, own_address]
        return {
            "rank": RANK_RECEIVER if run.receiver else 1 - RANK_RECEIVER,
            "link_id": f"govshare-{run.query_id}",
            "parties": parties,
            "tls": {"cert": str(self.tls.cert), "key": str(self.tls.key), "ca": str(self.tls.ca)},
            "input": str(folder / INPUT),
            "output": str(folder / OUTPUT),
            "result": str(folder / RESULT),
            "timeout_ms": int(self.timeout * 1000),
            "connect_retries": max(1, int(self.timeout * 1000 / CONNECT_RETRY_INTERVAL_MS)),
            "connect_retry_interval_ms": CONNECT_RETRY_INTERVAL_MS,
            "retry_interval_ms": RETRY_INTERVAL_MS,
            "retry_interval_incr_ms": RETRY_INTERVAL_INCREMENT_MS,
            "low_comm": self._low_comm,
            "token": offer.token,
            "peer_token": peer.token,
        }


class _Linking(threading.Thread):
    """The link's set-up, beside the node's reading of its keys: once the driver is ready, the
    link offers cross with the peer node's (each node's driver ready by then: the two links
    start within a message's time of each other), the job file is written and the driver told
    to link."""

    def __init__(self, engine: Rr22Engine, run: Rr22Run, folder: Path, driver: _Driver) -> None:
        super().__init__(daemon=True)
        self._engine, self._run, self._folder, self._driver = engine, run, folder, driver
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            if not self._driver.started.wait(self._engine.timeout) or self._stopped.is_set():
                return  # the driver's own wait says what happened
            if self._driver.exited:
                return
            offer = LinkOffer(_free_port(self._engine.host), secrets.token_hex(16))
            peer = LinkOffer.decode(self._run.exchange(offer.encode()))
            job = self._engine.job(self._run, self._folder, offer, peer)
            _write_private(self._folder / JOB, json.dumps(job).encode())
            if not self._stopped.is_set():
                _tell(self._driver.process, LINK)
        except BaseException as exc:  # the node's thread raises it
            self._failure = exc

    def finish(self) -> None:
        """Wait for the set-up; raises what it failed with (Aborted, MalformedInput)."""
        self.join(self._engine.timeout)
        if self._failure is not None:
            raise self._failure
        if self.is_alive():
            raise Aborted(
                f"{self._engine.node}: the rr22 engine's link to node {self._run.peer} was not "
                f"set up within {self._engine.timeout:g} s; query aborted, nothing released"
            )

    def stop(self) -> None:
        """The run is over: no offer after this, and a wait for the peer's offer ends."""
        self._stopped.set()
        if self.is_alive():
            self._run.end("the rr22 engine's run ended")


def _tell(process: subprocess.Popen[str], word: str) -> None:
    """One word to the driver on its stdin; a driver that has ended says why elsewhere."""
    assert process.stdin is not None
    try:
        process.stdin.write(word + "\n")
        process.stdin.flush()
    except (OSError, ValueError):
        pass  # the driver has ended (or its stdin is closed): its exit is waited for


class _Driver:
    """What a running driver says, as its node reads it (from the moment it starts): its
    status words, its errors, a refused TLS handshake on its link, its exit."""

    def __init__(
        self, process: subprocess.Popen[str], run: Rr22Run, *, node: str, timeout: float
    ) -> None:
        self.process, self._run, self.node, self._timeout = process, run, node, timeout
        self.started = threading.Event()  # the driver said "ready", or exited
        self.exited = False
        self._deadline = time.monotonic() + timeout  # for the whole run
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._errors: list[str] = []
        self._last = ""  # libpsi's last log line: what a native failure said
        self._said: set[str] = set()
        self._code: int | None = None
        self._readers = [
            threading.Thread(target=t, daemon=True) for t in (self._stdout, self._stderr)
        ]
        for thread in [*self._readers, threading.Thread(target=self._watch, daemon=True)]:
            thread.start()

    def _tell(self, kind: str, text: str) -> None:
        self._events.put((kind, text))
        self._run.wake.set()

    def _stdout(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:  # closed at the driver's end, by this reader
            for line in self.process.stdout:
                word = line.strip()
                if word == READY:
                    self.started.set()
                if word in (READY, LINKED, DONE):
                    self._tell("status", word)

    def _stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                if line.startswith("error:"):
                    self._errors.append(line[len("error:") :].strip())
                elif HANDSHAKE_FAILED in line:
                    self._tell("tls", line.rsplit(":", 1)[-1].strip())
                elif line.strip():
                    self._last = " ".join(line.split())[:300]

    def _watch(self) -> None:
        code = self.process.wait()
        self.exited = True
        self.started.set()
        self._tell("exit", str(code))

    def wait_for(self, word: str, *, finished: Callable[[], bool] | None = None) -> None:
        """Until the driver has said ``word`` (and, if given, ``finished`` holds: ``done`` with
        its result written). Raises Aborted on anything else: an exit before, a refused
        handshake, the query's end, the run's timeout."""
        run = self._run
        while word not in self._said and self._code is None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise Aborted(
                    f"{self.node}: the rr22 engine did not finish with node {run.peer} within "
                    f"{self._timeout:g} s; query aborted, nothing released"
                )
            run.wake.wait(remaining)
            run.wake.clear()
            self._drain()
            reason = run.ended()
            if reason is not None:
                raise Aborted(f"{self.node}: {reason}; nothing released")
        if word in self._said and (finished is None or finished()):
            return
        for thread in self._readers:  # the pipes close with the driver: its last words are in
            thread.join(timeout=self._timeout)
        self._drain()
        if not (word in self._said and (finished is None or finished())):
            why = (
                self._errors[-1]
                if self._errors
                else f"exit status {self._code} after: {self._last}"
            )
            raise Aborted(
                f"{self.node}: the rr22 engine failed with node {run.peer}: {why}; "
                "query aborted, nothing released"
            )

    def _drain(self) -> None:
        """Log the driver's news and note its words and exit.

        Raises:
            Aborted: a TLS handshake on the link failed."""
        while not self._events.empty():
            kind, text = self._events.get()
            if kind == "status":
                self._said.add(text)
                if text == LINKED:
                    self._run.step(LINKED, b"", 0)
            elif kind == "tls":
                raise Aborted(
                    f"{self.node}: the rr22 engine's link to node {self._run.peer} was "
                    f"refused in the TLS handshake ({text}); query aborted, nothing released"
                )
            elif kind == "exit":
                self._code = int(text)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _free_port(host: str) -> int:
    """A port free on ``host`` now, for the driver to listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port
