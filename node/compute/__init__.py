"""Where a node's heavy per-row work runs: the node's own process pool, or a Ray cluster.

The per-row cryptography (X25519 hashing and multiplication batches of ECDH-PSI, Paillier and
BFV encryption batches of the aggregates) reaches a backend through one interface, a
:class:`concurrent.futures.Executor`: the query kinds call ``submit``/``map`` with module-level
functions of ``govshare.protocols`` and ``govshare.node.queries.kinds`` and their arguments, and
get back what the function returns or raises. A backend only decides which process runs the
call, so every backend gives the same answers by construction (tests/node/test_compute_ray.py
checks it on the real protocol functions and through real nodes).

One module per backend and one registry line (:data:`BACKENDS`); ``node.toml`` picks one:

    [compute]
    backend = "local"          # or "ray"
    address = "auto"           # ray: "auto", "host:6379" or "ray://host:10001"

Trust: a backend's processes see what the node's own workers see (the query's PSI scalar,
join keys, plaintext values, the analyst's public key). A Ray cluster must therefore sit inside
the department's own trust boundary, like the node's machine; see the README.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from govshare.node.compute import local, ray_cluster

LOCAL = "local"
RAY = "ray"

# Seconds a node waits for its first contact with a Ray cluster (connect, then one task that
# checks the workers run this govshare version) before the query that needed it fails.
DEFAULT_CONNECT_TIMEOUT = 120.0


@dataclass(frozen=True)
class ComputeSettings:
    """node.toml ``[compute]``: the backend, and for Ray the cluster and each task's CPUs."""

    backend: str = LOCAL
    address: str = "auto"
    namespace: str = "govshare"
    num_cpus: float = 1.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


# backend name -> opens its executor from (settings, local worker count or None for all CPUs).
BACKENDS: dict[str, Callable[[ComputeSettings, int | None], Executor]] = {
    LOCAL: lambda settings, workers: local.open_pool(workers),
    RAY: lambda settings, workers: ray_cluster.RayExecutor(
        settings.address,
        namespace=settings.namespace,
        num_cpus=settings.num_cpus,
        connect_timeout=settings.connect_timeout,
    ),
}


def open_executor(settings: ComputeSettings, workers: int | None = None) -> Executor:
    """The executor of ``settings.backend``; ``workers`` sizes the local pool only.

    Raises:
        TypeError: an unknown backend (``NodeConfig.load`` refuses one first).
    """
    try:
        opener = BACKENDS[settings.backend]
    except KeyError:
        raise TypeError(f"unknown compute backend {settings.backend!r}") from None
    return opener(settings, workers)


def usable(executor: Executor) -> bool:
    """Whether ``executor`` can still take work: a Ray executor whose cluster went away, or a
    process pool one of whose workers died, cannot; the node then opens a new one."""
    if getattr(executor, "broken", None):  # a RayExecutor, or a wrapper saying the same
        return False
    return not getattr(executor, "_broken", False)  # ProcessPoolExecutor's BrokenProcessPool
