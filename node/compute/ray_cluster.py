"""The Ray backend: the node's per-row work as tasks on a Ray cluster of its department.

:class:`RayExecutor` is a :class:`concurrent.futures.Executor`: ``submit(fn, *args)`` runs
``fn(*args)`` as one Ray task and its future holds what ``fn`` returned or raised, so the query
kinds use it exactly as they use the local process pool, and the answers are the same.

Why the Ray driver is not the node process. A Ray driver (``ray.init``) that loses its cluster
ends its own process: when the cluster's GCS stays unreachable, Ray's core worker logs "Failed
to connect to GCS within 60 seconds ... The program will terminate" and exits (seen with Ray
2.60), and ``ray.init`` against an address where no cluster answers retries forever. A node
must outlive its cluster, abort the query that was running with nothing released, and keep
serving. So the driver lives in a child process of the node (the *driver process*, started
from the node's forkserver, ending with the node like its pool workers: govshare.node.workers):

- the node sends each call to it over a pipe, pickled (functions by reference: every Ray worker
  imports the same govshare version, which the driver checks with one task before it takes
  work), and the driver submits it as a Ray task carrying those bytes, so the driver itself
  never unpickles what a query computes;
- a task's result (or the exception ``fn`` raised, unwrapped from Ray's ``RayTaskError``)
  comes back over the pipe and completes the node's future;
- when the cluster goes away, Ray fails the calls in flight (``RayError``: worker crashed,
  object lost, node died) or ends the driver process (after :data:`CLUSTER_LOST_SECONDS`
  without the GCS); either way every pending future fails with
  :class:`~govshare.protocols.errors.Unavailable` naming the cluster, the query's run raises,
  and the engine's abort path marks it failed with nothing released. The executor is then
  ``broken``; the node opens a new one (a new driver, connecting afresh) for the next query;
- a cluster that does not answer within ``connect_timeout`` seconds fails the same way.

What leaves the node: the task arguments (a query's PSI scalar, join keys, values to encrypt)
travel to the cluster's workers and object store, which may spill them to the cluster's disks.
Ray's own transport is unauthenticated and in clear unless the cluster enables Ray's TLS
(``RAY_USE_TLS``); a department's cluster must sit inside its trust boundary (README, "Heavy
work on a Ray cluster").
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import pickle
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any, ParamSpec, TypeVar

from govshare.node.workers import die_with_node
from govshare.protocols.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")

# Seconds the driver process keeps trying to reach a cluster's GCS it lost before Ray ends it
# (RayConfig gcs_rpc_server_reconnect_timeout_s, 60 by default): how long a query in flight
# may wait for a cluster that is gone before it aborts. Short enough that an analyst sees the
# abort promptly, long enough to ride out a GCS restart on a fault-tolerant cluster.
CLUSTER_LOST_SECONDS = 15

# Seconds a shutdown waits for the driver process to disconnect from the cluster.
STOP_SECONDS = 10.0

# Messages on the pipe. Node -> driver: (TASK, id, pickled call) and (STOP,). Driver -> node:
# (READY,), (FAILED, reason), (DONE, id, OK | RAISED | LOST, payload).
TASK, STOP, READY, FAILED, DONE = "task", "stop", "ready", "failed", "done"
OK, RAISED, LOST = "ok", "raised", "lost"


class RayExecutor(Executor):
    """Run calls as tasks on the Ray cluster at ``address`` (``auto``, ``host:port`` or
    ``ray://host:10001``), each task asking for ``num_cpus`` CPUs.

    Connecting starts at once in the driver process; calls submitted meanwhile wait in the pipe.
    """

    def __init__(
        self,
        address: str,
        *,
        namespace: str = "govshare",
        num_cpus: float = 1.0,
        connect_timeout: float = 120.0,
    ) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count()
        self._broken: str | None = None
        self._closed = False
        self.ready = threading.Event()
        context = multiprocessing.get_context("forkserver")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=_drive,
            args=(theirs, address, namespace, num_cpus, os.getpid(), worker_version()),
            name="govshare-ray-driver",
            daemon=True,  # ended at a clean exit of the node; die_with_node covers the rest
        )
        self._process.start()
        theirs.close()
        self._reader = threading.Thread(target=self._read, name="govshare-ray-results", daemon=True)
        self._reader.start()
        self._timer = threading.Timer(connect_timeout, self._connect_timed_out, (connect_timeout,))
        self._timer.daemon = True
        self._timer.start()

    @property
    def broken(self) -> str | None:
        """Why this executor takes no more work (its cluster is gone), or None."""
        return self._broken

    @property
    def driver_pid(self) -> int | None:
        """The pid of the driver process (the one process of this backend on the node)."""
        return self._process.pid

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` as a Ray task; ``fn`` must be importable by the workers.

        Raises:
            Unavailable: the cluster is gone or never answered.
            RuntimeError: after :meth:`shutdown`.
        """
        payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            if self._broken is not None:
                raise Unavailable(self._broken)
            task = next(self._ids)
            self._pending[task] = future
        try:
            with self._send_lock:
                self._conn.send((TASK, task, payload))
        except (OSError, ValueError):  # the driver process is gone (or the pipe closed)
            self._fail_all(f"the Ray driver for {self.address} is gone")
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Disconnect from the cluster (the cluster keeps running) and end the driver process;
        calls still pending fail (``cancel_futures``: are cancelled)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        self._timer.cancel()
        for future in pending:
            if not (cancel_futures and future.cancel()):
                _set(future, exception=Unavailable(f"Ray executor for {self.address} shut down"))
        try:
            with self._send_lock:
                self._conn.send((STOP,))
        except (OSError, ValueError):
            pass
        if wait:
            self._process.join(STOP_SECONDS)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    # --- the node's side of the pipe ----------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError, ValueError):
                self._fail_all(f"the Ray cluster at {self.address} went away (driver ended)")
                return
            if message[0] == READY:
                self._timer.cancel()
                self.ready.set()
            elif message[0] == FAILED:
                self._fail_all(f"Ray cluster at {self.address}: {message[1]}")
            elif message[0] == DONE:
                self._complete(message[1], message[2], message[3])

    def _complete(self, task: int, outcome: str, payload: Any) -> None:
        with self._lock:
            future = self._pending.pop(task, None)
        if future is None:
            return
        if outcome == OK:
            _set(future, result=payload)
        elif outcome == RAISED:
            _set(future, exception=pickle.loads(payload))
        else:
            reason = f"the Ray cluster at {self.address} lost a task ({payload})"
            self._fail_all(reason)
            _set(future, exception=Unavailable(reason))

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = reason
            pending = list(self._pending.values())
            self._pending.clear()
        self._timer.cancel()
        for future in pending:
            _set(future, exception=Unavailable(reason))
        if self._process.is_alive():
            self._process.kill()  # a driver whose cluster is gone may hang on; end it now

    def _connect_timed_out(self, seconds: float) -> None:
        if not self.ready.is_set():
            self._fail_all(f"no Ray cluster answered at {self.address} within {seconds:g} s")


def _set(
    future: Future[Any], *, result: Any = None, exception: BaseException | None = None
) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled by its caller
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def worker_version() -> str:
    """What must match between the node and the cluster's workers: govshare's version and
    Python's (pickled calls name govshare's functions; Ray needs one Python minor version)."""
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return f"govshare {metadata.version('govshare')}, Python {python}"


def run_pickled(payload: bytes) -> Any:
    """In a Ray worker: the call the node pickled, run."""
    fn, args, kwargs = pickle.loads(payload)
    return fn(*args, **kwargs)


# --- the driver process -----------------------------------------------------------------------


def _drive(
    conn: Connection, address: str, namespace: str, num_cpus: float, node_pid: int, version: str
) -> None:
    """The driver process: connect, check the workers' version, then relay calls until the
    node stops it, the node ends, or Ray ends this process because the cluster is gone."""
    die_with_node(node_pid)
    os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(CLUSTER_LOST_SECONDS)
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        try:
            with send_lock:
                conn.send(message)
        except (OSError, ValueError):
            os._exit(0)  # the node closed its end: nothing left to relay to

    try:
        import ray

        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
        theirs = ray.get(ray.remote(num_cpus=num_cpus)(worker_version).remote())
    except Exception as exc:
        send((FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0]))
        return
    if theirs != version:
        send((FAILED, f"its workers run {theirs}, this node {version}"))
        return
    task = ray.remote(num_cpus=num_cpus)(run_pickled)
    send((READY,))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] == STOP:
            break
        _, number, payload = message
        task.remote(payload).future().add_done_callback(partial(_reply, send, number))
    ray.shutdown()


def _reply(send: Callable[[tuple[Any, ...]], None], number: int, done: Future[Any]) -> None:
    send(_outcome(number, done))


def _outcome(number: int, done: Future[Any]) -> tuple[Any, ...]:
    """The DONE message for a finished task: its result, the exception its call raised, or why
    the cluster could not run it."""
    import ray.exceptions

    try:
        return (DONE, number, OK, done.result())
    except ray.exceptions.RayTaskError as exc:  # the call itself raised: hand that back
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        try:
            return (DONE, number, RAISED, pickle.dumps(cause))
        except Exception:
            return (DONE, number, LOST, f"{type(cause).__name__} (not picklable)")
    except Exception as exc:  # RayError: worker crashed, object lost, node died, ...
        return (DONE, number, LOST, type(exc).__name__)
