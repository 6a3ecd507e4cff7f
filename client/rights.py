"""The analyst's use rights: apply to a node for a right, and read the answers across nodes.

An application is a signed request of kind ``grant_application`` (nonce, expiry, the analyst's
Ed25519 signature; ``govshare.protocols.signed_request``) naming the node, dataset, columns,
query kinds, purpose and legal basis; the node keeps it in its audit log
(``govshare.node.policy.applications``). :func:`rights_everywhere` asks every node of the
roster for the caller's applications and grants (``Rights.Mine``); a node that does not answer
is reported by name, never silently left out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from govshare.model.governance import Role
from govshare.model.identity import Identity
from govshare.protocols.errors import GovshareError
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient
from govshare.v1 import rights_pb2

APPLICATION_KIND = "grant_application"
# An application is answered over days; its signature only has to outlive its delivery.
APPLICATION_LIFETIME_SECONDS = 600


def apply_for(
    identity: Identity,
    *,
    node: str,
    dataset: str,
    columns: Sequence[str],
    query_kinds: Sequence[str],
    purpose: str,
    legal_basis: str,
    now: int | None = None,
) -> rights_pb2.Application:
    """Sign an access application and send it to ``node``; returns what the node stored."""
    body = {
        "node": node,
        "dataset": dataset,
        "columns": sorted(set(columns)),
        "query_kinds": sorted(set(query_kinds)),
        "purpose": purpose,
        "legal_basis": legal_basis,
    }
    request = sign_request(
        identity.signing_key, analyst=identity.name, kind=APPLICATION_KIND, body=body,
        now=int(time.time()) if now is None else now, lifetime=APPLICATION_LIFETIME_SECONDS,
    )  # fmt: skip
    with NodeClient.to(identity, node) as client:
        return client.apply(request.encode())


@dataclass
class Rights:
    """Every node's answer: applications and grants; nodes that did not answer, with why."""

    applications: list[rights_pb2.Application] = field(default_factory=list)
    grants: list[rights_pb2.HeldGrant] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)


def rights_everywhere(identity: Identity) -> Rights:
    """The caller's applications and grants at every node of the roster."""
    nodes = [m.name for m in identity.roster.with_role(Role.NODE)]

    def ask(node: str) -> rights_pb2.MineResponse | str:
        try:
            with NodeClient.to(identity, node) as client:
                return client.mine()
        except GovshareError as exc:
            return str(exc)

    found = Rights()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(nodes)))) as pool:
        for node, answer in zip(nodes, pool.map(ask, nodes), strict=True):
            if isinstance(answer, str):
                found.unreachable[node] = answer
                continue
            found.applications.extend(answer.applications)
            found.grants.extend(answer.grants)
    found.applications.sort(key=lambda a: (a.received_at, a.node, a.request_id))
    found.grants.sort(key=lambda g: (g.node, g.dataset, g.grant_id))
    return found
