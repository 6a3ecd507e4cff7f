"""A signed request is its signer's alone, at the node: another member who relays it — a
patched client holding alice's bytes — is refused, for a query and for an access application
alike, and the node stores nothing for it."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from conftest import PURPOSE, FederationFixture, PsiData

from govshare.client.rights import APPLICATION_KIND
from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.protocols.errors import NotFound, PermissionDenied
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient


def test_a_request_relayed_by_another_member_is_refused(
    fed: FederationFixture, psi_data: PsiData
) -> None:
    alice, hkana = fed.identity("alice"), fed.identity("hkana")
    plan = PsiPlan(
        kind=QueryKind.PSI_CARDINALITY, purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"), right=Side("civil", "assistance", "id_number"),
        epsilon=Fraction(1),
    )  # fmt: skip
    query = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    application = sign_request(
        alice.signing_key, analyst="alice", kind=APPLICATION_KIND, now=int(time.time()),
        body={"node": "tax", "dataset": "residents", "columns": ["id_number"],
              "query_kinds": ["psi_cardinality"], "purpose": PURPOSE, "legal_basis": "x"},
    )  # fmt: skip
    with NodeClient.to(hkana, "tax") as relay:
        with pytest.raises(PermissionDenied) as refused:
            relay.submit(query.encode())
        assert "request is signed for 'alice' but sent by 'hkana'" in str(refused.value)
        with pytest.raises(PermissionDenied) as refused:
            relay.apply(application.encode())
        assert "application is signed for 'alice' but sent by 'hkana'" in str(refused.value)
    # Nothing was stored under alice's name: the query is unknown to her too.
    with NodeClient.to(alice, "tax") as client, pytest.raises(NotFound):
        client.status(query.query_id_hex)
