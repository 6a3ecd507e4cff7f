"""The default backend: the node's own process pool on its machine (govshare.node.workers)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from govshare.node.workers import make_pool


def open_pool(workers: int | None) -> ProcessPoolExecutor:
    """``workers`` processes (None: one per CPU) that end with the node, however it ends."""
    return make_pool(workers)
