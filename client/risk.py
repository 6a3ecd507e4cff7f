"""The auditor's side of the risk rules: check the logs it pulled and verified (``audit check``).

The rules themselves, the facts they fold and the checker are shared with the nodes' own monitor
(``govshare.model.risk``); this module feeds them the entries of the auditor's state folder.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from govshare.client.auditor import ENTRIES_DB, LocalLog
from govshare.model.risk import (
    DEFAULT_THRESHOLDS,
    RISK_ALERT,
    Alert,
    Checker,
    Thresholds,
    read_entry,
)


class PulledLogs:
    """The logs an auditor pulled and verified (its state folder), checked incrementally:
    each :meth:`update` reads only the entries pulled since the last one (``audit check
    --watch``).

    ``nodes`` are the logs to check; a node not pulled yet is skipped until it is.
    """

    def __init__(
        self,
        state: Path,
        nodes: Sequence[str],
        *,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        rules: Collection[str] | None = None,
    ) -> None:
        self.state = state
        self.nodes = list(nodes)
        self._checker = Checker(thresholds=thresholds, rules=rules, nodes=self.nodes)
        self._cursors = dict.fromkeys(self.nodes, 0)

    def held(self) -> list[str]:
        """The nodes whose logs the auditor holds."""
        return [n for n in self.nodes if (self.state / n / ENTRIES_DB).is_file()]

    def update(self, *, since_ms: int | None = None) -> list[Alert]:
        """Read what was pulled since the last call; return every alert so far (most severe
        first), only those at or after ``since_ms`` if given.

        Raises:
            MalformedInput: the state folder holds an entry that does not decode.
        """
        for node in self.held():
            store = LocalLog.existing(self.state / node)
            if store is None:
                continue
            with store:
                cursor = self._cursors[node]
                for index, data, _ in store.iter_entries():
                    if index < cursor:
                        continue
                    entry = read_entry(data)
                    if entry.kind != RISK_ALERT:
                        self._checker.feed(node, entry)
                    cursor = index + 1
                self._cursors[node] = cursor
        alerts = self._checker.finish()
        return alerts if since_ms is None else [a for a in alerts if a.time_ms >= since_ms]


def check_pulled(
    state: Path,
    nodes: Sequence[str],
    *,
    since_ms: int | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> list[Alert]:
    """:func:`check` over the logs an auditor pulled into ``state`` (``audit check``)."""
    return PulledLogs(state, nodes, thresholds=thresholds).update(since_ms=since_ms)
