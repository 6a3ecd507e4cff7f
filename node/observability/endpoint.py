"""Plain HTTP on a local port: ``GET /metrics`` (Prometheus) and ``GET /healthz``.

Neither needs a federation certificate and neither touches the audit log: a health probe from
Docker, systemd, a load balancer or Prometheus is not a federation call, so it must not land
in the evidence auditors verify. That is also why this port should stay local (the default
address is ``127.0.0.1``): it tells anyone who reaches it the node's query counts by kind and
outcome and the ε spent per dataset, never a row or a key. The gRPC health service stays
behind mutual TLS.

``/healthz`` answers ``200 serving`` while the node serves and ``503`` with the one-line reason
while it refuses to (its audit log is broken) or is stopping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from govshare.protocols.errors import MalformedInput, Unavailable

TEXT = "text/plain; charset=utf-8"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port).

    Raises:
        MalformedInput: not of that form.
    """
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise MalformedInput(f"address {address!r} is not host:port", field="metrics")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class ServiceEndpoint:
    """The HTTP server, on a daemon thread of its own, from :meth:`start` to :meth:`stop`."""

    def __init__(
        self,
        address: str,
        *,
        metrics: Callable[[], bytes],
        refusal: Callable[[], str | None],
    ) -> None:
        """``metrics`` renders the exposition; ``refusal`` is None while the node serves, else
        why it does not."""
        self._host, self._port = parse_address(address)
        self._metrics = metrics
        self._refusal = refusal
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one picked for port 0)."""
        if self._server is None:
            raise TypeError("the endpoint is not started")
        return int(self._server.server_address[1])

    def start(self) -> ServiceEndpoint:
        """Listen and serve.

        Raises:
            Unavailable: the address cannot be bound.
        """
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, endpoint._metrics(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    refusal = endpoint._refusal()
                    if refusal is None:
                        self._reply(200, b"serving\n", TEXT)
                    else:
                        self._reply(503, refusal.encode() + b"\n", TEXT)
                else:
                    self._reply(404, b"not found: try /metrics or /healthz\n", TEXT)

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds are not worth a line each

        try:
            self._server = _Server((self._host, self._port), Handler)
        except OSError as exc:
            raise Unavailable(
                f"cannot listen for metrics on {self._host}:{self._port}: {exc}"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="govshare-metrics", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
