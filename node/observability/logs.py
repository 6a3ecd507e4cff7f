"""A serving node's structured logs: JSON lines, one object a line, on stderr or in a file.

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``event`` and ``message``;
query events add ``node``, ``query_id``, ``kind``, ``dataset`` and the step's fields (see
``govshare.node.observability.events``). The human start-up lines ``govshare node serve`` prints
on stdout ("node tax serving on ...", "audit log verified: ...") are not log lines and stay as
they are.

Logging never holds up a query, nor the node's own stdout: lines go through a bounded queue to
a writer thread, and when the destination does not keep up, new lines are dropped and counted;
the writer says how many in its next line. On a pipe the writer never fills more than half of
it: where stdout and stderr share a pipe that a parent reads only up to "serving on" (the demo,
the benchmarks), the node's later stdout lines ("node tax stopping") must still fit, or the
node would hang at its stop. The writer starts only after the node's start-up
lines are out (:meth:`JsonLogs.start`), so a log line never comes before them where stdout
and stderr share one pipe.
"""

from __future__ import annotations

import array
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import stat
import sys
import termios
import threading
from fractions import Fraction
from pathlib import Path

from govshare.node.observability.events import FAILED, QueryEvent

# Lines waiting for the writer; beyond, new lines are dropped (a stalled destination must not
# hold a query's thread or grow the node's memory without bound).
QUEUE_LINES = 10_000
# Seconds a stopping node gives its writer to write what is queued.
CLOSE_TIMEOUT = 2.0
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip

_queries = logging.getLogger("govshare.node.queries")


def _plain(value: object) -> object:
    """A JSON value for a field: ε as its exact text ("1/2"), bytes as hex, a list or tuple as
    a list of such values."""
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Fraction):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def pipe_has_room(fd: int, size: int) -> bool:
    """Whether ``size`` more bytes leave at least half of the pipe ``fd`` unread-free."""
    unread = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, unread)
    return unread[0] + size <= fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // 2


def say(line: str) -> None:
    """Print ``line`` for the operator on stdout, unless stdout is a pipe without room for it
    or is gone: a stopping node must not wait on a reader that stopped reading (the JSON log
    says the same, or counts it dropped)."""
    data = (line + "\n").encode("utf-8")
    try:
        fd = sys.stdout.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and not pipe_has_room(fd, len(data)):
            return
        print(line, flush=True)
    except (OSError, ValueError):  # closed, or not a file
        return


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``event``, ``message`` and its fields.

    A record's fields come from ``extra={"event": ..., "fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, object] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.name),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({str(k): _plain(v) for k, v in fields.items() if k not in line})
        line["message"] = record.getMessage()
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def log_query_event(event: QueryEvent) -> None:
    """Log one query event (a subscriber of ``QueryEvents``): a failure at warning, the rest at
    info."""
    fields: dict[str, object] = {"node": event.node, "query_id": event.query_id}
    if event.kind:
        fields["kind"] = event.kind
    if event.dataset:
        fields["dataset"] = event.dataset
    fields.update(event.fields)
    detail = event.fields.get("reason") or event.fields.get("rule") or ""
    level = logging.WARNING if event.name == FAILED else logging.INFO
    _queries.log(
        level,
        "query %s %s%s",
        event.query_id,
        event.name,
        f": {detail}" if detail else "",
        extra={"event": f"query.{event.name}", "fields": fields},
    )


def level_of(name: str) -> int:
    """The ``logging`` level of ``name`` (debug, info, warning, error).

    Raises:
        ValueError: not one of those.
    """
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}") from None


class JsonLogs(logging.Handler):
    """JSON lines to stderr (``destination`` None) or appended to a file, through a bounded
    queue and a writer thread (see the module docstring). Attach with :meth:`attach`, start
    writing with :meth:`start`, end with :meth:`close`."""

    def __init__(
        self,
        destination: Path | None = None,
        *,
        level: int = logging.INFO,
        capacity: int = QUEUE_LINES,
    ) -> None:
        super().__init__(level)
        self.setFormatter(JsonFormatter())
        self._destination = destination
        self._lines: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self._dropped = 0
        self._reported = 0
        self._count = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._discarded = False
        self._logger: logging.Logger | None = None
        self._previous_level = logging.NOTSET

    @property
    def dropped(self) -> int:
        """Lines dropped so far because the destination did not keep up."""
        return self._dropped

    def attach(self, logger: logging.Logger | None = None) -> JsonLogs:
        """Take the records of ``logger`` (default: ``govshare``) at this handler's level."""
        self._logger = logger or logging.getLogger("govshare")
        self._logger.addHandler(self)
        self._previous_level = self._logger.level
        if self._logger.level == logging.NOTSET or self._logger.level > self.level:
            self._logger.setLevel(self.level)
        return self

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self._drop()

    def start(self) -> None:
        """Start writing the queued lines and those that follow."""
        if self._thread is not None or self._discarded:
            return
        self._thread = threading.Thread(target=self._write, name="govshare-logs", daemon=True)
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Detach, write what is queued (for up to ``timeout`` seconds) and stop."""
        if self._logger is not None:
            self._logger.removeHandler(self)
            self._logger.setLevel(self._previous_level)
            self._logger = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        super().close()

    def discard(self) -> None:
        """Detach and drop whatever was queued, unwritten (the node did not start)."""
        self._discarded = True  # never start after this
        self.close(0)

    def _write(self) -> None:
        # os.write on the descriptor, not sys.stderr: a write blocked on a full pipe then holds
        # no lock that the interpreter needs to exit.
        if self._destination is None:
            fd, owned = sys.stderr.fileno(), False
        else:
            fd = os.open(self._destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            owned = True
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        try:
            while True:
                try:
                    line = self._lines.get(timeout=0.1)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                dropped = self._dropped
                if dropped > self._reported:
                    line = self._dropped_line(dropped - self._reported) + "\n" + line
                data = (line + "\n").encode("utf-8")
                if pipe and not pipe_has_room(fd, len(data)):
                    self._drop()  # reported with the next line written
                    continue
                self._reported = dropped
                while data:
                    data = data[os.write(fd, data) :]
        finally:
            if owned:
                os.close(fd)

    def _drop(self) -> None:
        with self._count:
            self._dropped += 1

    def _dropped_line(self, count: int) -> str:
        record = logging.LogRecord(
            "govshare.node", logging.WARNING, __file__, 0,
            "%d log lines dropped: the log's destination did not keep up", (count,), None,
        )  # fmt: skip
        record.event = "log.dropped"
        record.fields = {"dropped": count}
        return self.format(record)
