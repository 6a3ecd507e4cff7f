"""A node checks its own audit log before it serves, and refuses to serve from a broken one.

Why: an insider who edits ``audit.db`` on disk (triggers dropped, one byte changed) used to find
the node serving as before; only an auditor pulling the log from scratch noticed. Now the node
itself re-reads its log at start (:func:`govshare.node.audit.auditlog.self_check`): every entry's
bytes
against its stored leaf hash, every stored subtree hash against the one recomputed, the latest
checkpoint's Ed25519 signature under the node's key from the roster and its signed root, every
other checkpoint's signature and root, and strict decoding of the entries since the latest
checkpoint. The first broken entry is named.

A broken log puts the node in a refusing state, for good (until an operator deals with it):

- Query, Aggregate, Catalog, and Peer calls get ``FAILED_PRECONDITION`` with one
  line, e.g. ``node tax refuses to serve: its audit log is broken at entry 17 (leaf hash
  mismatch); auditors may still pull it``. No queries, no protocol steps, no witness
  cosigning for other nodes; gRPC health reports those services ``NOT_SERVING``.
- The Audit service still answers, read-only: the evidence can be pulled. ``GetCheckpoint``
  serves the latest stored checkpoint and signs nothing new.
- The log is sealed (:meth:`AuditLog.seal`): nothing is appended to it any more — no rpc-log
  entries for the calls it refuses or answers, no checkpoints, no budget recovery.

When: measured with ``bench/audit.py`` on the 2-core development machine, shared with other
work (load 3-4), opening a log and checking it whole took 0.62-0.79 s at 101,000 entries and
7.2-7.6 s at 1,001,000 (4.3-4.7 s for 1,000,000 when the machine was quieter): 1.7-2.9x a bare
read-and-hash pass over the same rows measured in the same run. Opening it and checking only the
1,000 entries since its latest checkpoint took 0.10 s at 101,000 and 0.74-0.80 s at 1,001,000
(mostly opening: counting the rows, loading the tree's edge). So:

- a log of up to :data:`WHOLE_AT_START_MAX` entries (1,000,000: under the 10 s a start may take
  on 2 cores, even on a busy machine) is checked whole before the node takes its first call:
  nothing is served from a broken log;
- a larger log is checked from its latest checkpoint at start, and whole in a background
  thread. The tail check starts from the stored subtree hashes at the checkpoint's size, and
  accepts them only if they reproduce the root the node signed there, so the tail extends what
  the node committed to. What it cannot see — an older entry edited on disk without the
  stored hashes up to that edge being rewritten to match (a changed byte, or a byte and its
  leaf hash) — the background check finds seconds later, and flips the node into the same
  refusing state (calls already admitted fail at their next log write; nothing more is
  logged). The verified size is not
  stored anywhere else: the latest checkpoint, signed with the node's key and verified under
  the roster's copy of it, is the record of what the node last vouched for, so there is no
  second file to protect, roll back or forget.

What this does not catch alone: a log truncated together with its checkpoints, or replaced by an
older copy — a rollback looks like a shorter healthy log. Witnesses refuse such checkpoints and
auditors keep the last checkpoint they verified (:mod:`govshare.node.audit.witness`,
:mod:`govshare.client.auditor`). Someone holding the node's signing key can rewrite anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from govshare.node.audit.auditlog import AuditLog, LogDamage, SelfCheck
from govshare.protocols.suite import VerifyKey

log = logging.getLogger(__name__)

# Logs up to this many entries are checked whole before the node serves (4.3-7.6 s measured at
# 1,000,000 on 2 cores, see the module docstring); larger ones get the tail at start and the
# whole log in the background.
WHOLE_AT_START_MAX = 1_000_000

# Seconds stop() waits for the background check to reach its next page (a page of entries
# hashed: well under a second, see the module docstring's rates).
STOP_SECONDS = 2.0

# Services a node with a broken log still serves: the read-only evidence, and health.
SERVED_WHEN_BROKEN = frozenset(
    {
        "govshare.v1.Audit",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

Listener = Callable[[SelfCheck], None]


class LogSelfCheck:
    """A node's checks of its own log and the refusing state they may put it in.

    Thread-safe: :meth:`refusal` is read on every call while the background check may set it.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        node: str,
        public_key: VerifyKey,
        origin: str,
        whole_at_start_max: int = WHOLE_AT_START_MAX,
    ) -> None:
        self._audit = audit
        self._node = node
        self._public_key = public_key
        self._origin = origin
        self._whole_at_start_max = whole_at_start_max
        self._lock = threading.Lock()
        self._damage: LogDamage | None = None
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.at_start: SelfCheck | None = None
        self.background: SelfCheck | None = None
        # Set once the whole log has a verdict: at start, or when the background check ends.
        self.whole_checked = threading.Event()

    # --- the checks ---------------------------------------------------------------------------

    def run_at_start(self) -> SelfCheck:
        """Check the whole log, or only its tail when it is large (see the module docstring).

        A broken log is sealed and the node refuses from here on. When the tail check finds
        damage it cannot place, the whole log is checked to name the first broken entry.
        """
        if self._audit.size <= self._whole_at_start_max:
            verdict = self._audit.check_whole(self._public_key, self._origin)
        else:
            verdict = self._audit.check_tail(self._public_key, self._origin)
            if verdict.damage is not None and not verdict.whole:
                located = self._audit.check_whole(self._public_key, self._origin)
                if located.damage is not None:
                    verdict = located
        if verdict.damage is None and self._audit.broken is not None:  # its tree did not load
            verdict = replace(verdict, damage=LogDamage("its stored tree", self._audit.broken))
        self.at_start = verdict
        if verdict.damage is not None:
            self._mark_broken(verdict.damage)
        if verdict.whole or verdict.damage is not None:
            self.whole_checked.set()
        return verdict

    def start_background(self, on_verdict: Listener | None = None) -> None:
        """Check the whole log in a thread when the start only checked its tail.

        ``on_verdict`` is called from that thread with the whole check's verdict.
        """
        with self._lock:
            if self.whole_checked.is_set() or self._thread is not None:
                return
            if on_verdict is not None:
                self._listeners.append(on_verdict)
            self._thread = threading.Thread(
                target=self._run_background, name="govshare-log-self-check", daemon=True
            )
            self._thread.start()

    def _run_background(self) -> None:
        verdict = self._audit.check_whole(self._public_key, self._origin, stop=self._stop)
        if verdict.interrupted:
            return
        self.background = verdict
        if verdict.damage is not None:
            self._mark_broken(verdict.damage)
            log.error("%s", self.line(verdict))
        for listener in list(self._listeners):
            listener(verdict)
        self.whole_checked.set()  # after the listeners: the verdict has been acted on

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """Interrupt the background check (at its next page) and wait up to ``timeout`` seconds
        for it; whether it ended."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _mark_broken(self, damage: LogDamage) -> None:
        with self._lock:
            if self._damage is None:
                self._damage = damage
        refusal = self.refusal()
        if refusal is not None:
            self._audit.seal(refusal)

    # --- the state ----------------------------------------------------------------------------

    @property
    def damage(self) -> LogDamage | None:
        with self._lock:
            return self._damage

    def refusal(self) -> str | None:
        """The one-line refusal every query-side call gets, or None while the log is sound."""
        damage = self.damage
        if damage is None:
            return None
        return (
            f"node {self._node} refuses to serve: its audit log is broken at {damage.where} "
            f"({damage.reason}); auditors may still pull it"
        )

    def line(self, verdict: SelfCheck) -> str:
        """The operator's one line for ``verdict`` (``govshare node serve`` prints it)."""
        if verdict.damage is not None:
            return self.refusal() or f"audit log broken at {verdict.damage.where}"
        checkpoint = "no checkpoint" if verdict.checkpoint is None else (
            f"checkpoint {verdict.checkpoint}"
        )  # fmt: skip
        head = (
            f"audit log verified: {verdict.size} entries, {checkpoint}, in {verdict.seconds:.2f} s"
        )
        if verdict.whole and verdict is self.background:
            return f"{head} (whole log, in the background; {verdict.checkpoints} checkpoints)"
        if verdict.whole:
            return head
        return (
            f"{head} (the {verdict.size - verdict.checked_from} entries since the checkpoint; "
            "the whole log is being checked in the background)"
        )
