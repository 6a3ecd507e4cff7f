"""The node's process pool, whose processes die with the node, ``kill -9`` included.

Why a pool of our own: a plain ``forkserver`` :class:`~concurrent.futures.ProcessPoolExecutor`
outlives a node killed without its ``close()``. Its workers block in ``call_queue.get()`` on a
pipe whose write end they hold themselves, so they never see EOF; the forkserver exits only when
every holder of its "alive" pipe is gone, and CPython hands that pipe's write end to every worker
(``multiprocessing.forkserver.connect_to_new_process``). So the node dies, and the forkserver,
its workers and the resource tracker wait for one another forever.

The fix is in the workers, which are the only processes that hold the others up:

- each worker opens a pidfd on the node (:func:`os.pidfd_open`, Linux 5.3) and a daemon thread
  waits on it; when the node exits, for any reason, the kernel wakes the thread, which ends the
  worker at once (``os._exit``: mid-task, no cleanup to wait for);
- each worker also asks for ``SIGKILL`` when its parent, the forkserver, dies
  (``prctl(PR_SET_PDEATHSIG)``), so killing the forkserver does not orphan them either;
- a worker started after the node already died (or whose forkserver did) sees that its parent
  is no longer the node's forkserver and exits before taking work.

Once the workers are gone, CPython's own rules end the rest: the forkserver exits when its
"alive" pipe reaches EOF, the resource tracker when its pipe does. A clean stop
(``Node.close()``) shuts the pool down as before; the forkserver then exits with the node.

Linux in full: where pidfds are missing (kernels before 5.3, other systems) the watchdog polls
the process tree in ``/proc`` instead, every :data:`POLL_SECONDS`, or without ``/proc`` whether
the node's pid exists; where there is no prctl, a killed forkserver can orphan its workers.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# prctl option from <linux/prctl.h>: deliver a signal to this process when its parent dies.
PR_SET_PDEATHSIG = 1

# Fallback poll interval of the watchdog where pidfd_open is unavailable: how long a worker may
# outlive its node there.
POLL_SECONDS = 0.5

# The exit status of a worker that ends because its node did (128 + SIGKILL, as a shell shows a
# process killed by SIGKILL).
ORPHAN_EXIT = 128 + signal.SIGKILL


def make_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """The node's process pool (``forkserver``: safe beside gRPC's threads).

    Every worker ends when the calling process ends, however it ends (see the module docstring).
    ``workers`` defaults to the number of CPUs.
    """
    return ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=die_with_node,
        initargs=(os.getpid(),),
    )


def die_with_node(node_pid: int) -> None:
    """Worker initializer: end this worker when the process ``node_pid`` ends.

    Runs in the worker, whose parent is the node's forkserver, itself a child of the node.
    """
    _set_parent_death_signal(signal.SIGKILL)
    try:
        pidfd: int | None = os.pidfd_open(node_pid)
    except ProcessLookupError:
        os._exit(ORPHAN_EXIT)
    except (AttributeError, OSError):
        pidfd = None  # no pidfds here: poll instead
    # Checked after the two above, so that a node or forkserver that died before them is seen
    # here: a dead node's forkserver is re-parented, and so is a dead forkserver's worker. While
    # the check holds, node_pid is the live node, so the pidfd opened before names it and not a
    # process that reused its pid.
    if not _under(node_pid):
        os._exit(ORPHAN_EXIT)
    threading.Thread(
        target=_watch, args=(node_pid, pidfd), name="govshare-node-watchdog", daemon=True
    ).start()


def _under(node_pid: int) -> bool:
    """Whether this process is the node's child or grandchild (through its forkserver).

    Without ``/proc`` (not Linux): whether a process ``node_pid`` exists, which a pid reused
    after the node died would also pass.
    """
    parent = os.getppid()
    if parent == node_pid:
        return True
    if Path("/proc/self/stat").exists():
        return parent_of(parent) == node_pid
    try:
        os.kill(node_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(node_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():  # readable once the process has exited
            pass
    else:
        while _under(node_pid):
            time.sleep(POLL_SECONDS)
    os._exit(ORPHAN_EXIT)


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (from ``/proc``), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last.
    return int(stat.rpartition(")")[2].split()[1])


def _set_parent_death_signal(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)``: the kernel sends ``signum`` when the parent dies.

    A no-op where libc has no prctl (not Linux).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
