"""PSI engines beside ECDH-PSI, each run by a node for a query whose signed plan names it.

- ``rr22``: RR22 (OPRF over VOLE/OT extension) from SecretFlow's libpsi, for membership
  (``govshare.node.queries.engines.rr22``), in a separate interpreter the node is configured
  with (``[engines]`` in node.toml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineSettings:
    """The ``[engines]`` table of node.toml."""

    # The Python of a virtual environment with spu (``make secretflow``); None: not offered.
    rr22_python: Path | None = None
    # libpsi's RR22 low-communication mode (less traffic, more computation).
    rr22_low_comm: bool = False
    # Where this node's engine listens for its peer's: the host of ``[node] listen``.
    link_host: str = "127.0.0.1"
