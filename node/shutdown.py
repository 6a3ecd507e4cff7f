"""A node's stop after SIGTERM is bounded: what does not end in time is abandoned, and named.

Each step of a stop waits at most a stated time, so a node told to stop exits within their sum
whatever its peers do (gone, blackholed, or accepting connections and never answering):

=============================  ===================================================================
step                           bound
=============================  ===================================================================
noticing SIGTERM               ``api.server.SIGNAL_POLL`` (0.5 s): the main thread's wait is timed
the server (``RunningNode``)   ``grace`` (``node.toml``, 5 s by default) + :data:`SERVER_MARGIN`
                               to refuse new calls, interrupt the queries and let calls finish;
                               then :data:`STEP_SECONDS` for its event loop to end, and its
                               HTTP endpoint's accept loop (0.5 s, its poll) if it has one
background services            :data:`STEP_SECONDS` together (log check, checkpoint publisher,
                               risk monitor, results retention); a witnessing round is cut at
                               once: its channels are closed
the process pool               :data:`POOL_SECONDS` for running jobs, then their workers are
                               killed (they only compute: nothing of theirs is logged)
query threads                  :data:`STEP_SECONDS` to log how they ended (``query.failed``)
threads left at exit           :data:`LINGER_SECONDS`, then the process ends without them
the JSON logs                  2 s to write what is queued (``observability.logs.CLOSE_TIMEOUT``)
=============================  ===================================================================

That is ``grace`` + 14 s: 19 s with the default grace. What was abandoned is printed and
logged in one line (``node.abandoned``). The waits kept whole are the stores' own closes: the
audit log's waits for the entry being written, if any, to commit (a write is never cut in half).
That is one SQLite transaction, longer only while another process holds the file's write lock
(up to ``stores.sqlite.LOCK_TIMEOUT``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor

log = logging.getLogger(__name__)

# Seconds beyond the grace for the server's stop to interrupt the queries and drain the gate.
SERVER_MARGIN = 1.0
# Seconds one step of a stop may take once told to end (a thread's next page, a closed channel).
STEP_SECONDS = 2.0
# Seconds for the threads still running once the stores are closed (they would hold the exit).
LINGER_SECONDS = 1.0
# Seconds running pool jobs (a chunk of X25519 or Paillier work) may take to finish.
POOL_SECONDS = 3.0


def within(seconds: float, stops: Mapping[str, Callable[[], object]]) -> list[str]:
    """Run each of ``stops`` in a thread of its own and wait up to ``seconds`` for them all.

    Returns the names of those still running then, which are left to end on their own (their
    threads are daemons: they do not hold the process's exit). A stop that raised is logged
    and counts as ended.
    """
    threads: dict[str, threading.Thread] = {}
    for name, stop in stops.items():

        def run(stop: Callable[[], object] = stop, name: str = name) -> None:
            try:
                stop()
            except Exception:
                log.warning("stopping %s failed", name, exc_info=True)

        thread = threading.Thread(target=run, name=f"govshare-stop-{name}", daemon=True)
        thread.start()
        threads[name] = thread
    return joined(threads, seconds)


def joined(threads: Mapping[str, threading.Thread], seconds: float) -> list[str]:
    """Wait up to ``seconds`` in all for ``threads``; the names of those still alive then."""
    deadline = time.monotonic() + seconds
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    return [name for name, thread in threads.items() if thread.is_alive()]


def stop_pool(pool: Executor, seconds: float = POOL_SECONDS) -> str | None:
    """Shut ``pool`` down: queued jobs are cancelled, running ones get ``seconds`` to finish.

    The workers of a process pool still running a job then are killed, and the futures of
    their jobs fail (``BrokenProcessPool``). Returns what was abandoned, or None.
    """
    # The workers, taken before the shutdown forgets them (CPython's ProcessPoolExecutor).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    left = within(seconds, {"pool": lambda: pool.shutdown(wait=True, cancel_futures=True)})
    if not left:
        return None
    if not isinstance(pool, ProcessPoolExecutor):
        return f"the {type(pool).__name__}'s shutdown, after {seconds:g} s"
    running = [process for process in processes if process.is_alive()]
    for process in running:
        process.kill()
    return f"{len(running)} pool worker(s) still computing after {seconds:g} s (killed)"


def lingering(seconds: float = LINGER_SECONDS) -> list[str]:
    """Wait up to ``seconds`` for the threads that would hold the interpreter's exit; the names
    of those still running then.

    Those are the non-daemon threads and the workers of the node's thread pools (named
    ``govshare-…``), which ``concurrent.futures`` joins at exit whatever their daemon flag.
    """
    current = threading.current_thread()
    threads = {
        thread.name: thread
        for thread in threading.enumerate()
        if thread is not current
        and thread is not threading.main_thread()
        and (not thread.daemon or _pool_worker(thread))
    }
    return joined(threads, seconds)


def _pool_worker(thread: threading.Thread) -> bool:
    return thread.name.startswith("govshare-") and _WORKER_SUFFIX.search(thread.name) is not None


# ThreadPoolExecutor names its threads "<thread_name_prefix>_<n>".
_WORKER_SUFFIX = re.compile(r"_\d+$")
