"""Real node servers over mutual TLS on loopback: who gets in, who is refused."""

from __future__ import annotations

import datetime as dt
import re
import shutil

import grpc
import pytest
from conftest import FederationFixture
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from govshare.model.governance import Role
from govshare.model.identity import Identity, _issue_member_cert
from govshare.node.api.server import RunningNode
from govshare.node.node import Node
from govshare.protocols.errors import PermissionDenied, Unavailable, VerificationFailed
from govshare.rpc.client import NodeClient
from govshare.rpc.status import error_info
from govshare.v1 import catalog_pb2, catalog_pb2_grpc, peer_pb2, peer_pb2_grpc

NodeFixture = tuple[Node, RunningNode]


def channel_with(address: str, *, ca: bytes, key: bytes | None, cert: bytes | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "tax")]
    )


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status  # type: ignore[no-any-return]


def still_serving(fed: FederationFixture) -> bool:
    with NodeClient.to(fed.identity("civil"), "tax") as client:
        return client.ping().node == "tax"


def address(fed: FederationFixture) -> str:
    return fed.federation.roster.member("tax").address


def test_member_node_pings_over_mtls(fed: FederationFixture, tax_node: NodeFixture) -> None:
    with NodeClient.to(fed.identity("civil"), "tax") as client:
        reply = client.ping()
    assert (reply.node, reply.jurisdiction) == ("tax", "CN")
    assert reply.roster_version == fed.federation.roster.version


def test_health_reports_serving(fed: FederationFixture, tax_node: NodeFixture) -> None:
    alice = fed.identity("alice")
    with channel_with(
        address(fed), ca=alice.ca_cert_pem, key=alice.tls_key_pem, cert=alice.tls_cert_pem
    ) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_client_without_certificate_is_refused(
    fed: FederationFixture, tax_node: NodeFixture
) -> None:
    ca = fed.identity("alice").ca_cert_pem
    with channel_with(address(fed), ca=ca, key=None, cert=None) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            health_status(channel)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    assert still_serving(fed)


def test_certificate_from_another_ca_is_refused(
    fed: FederationFixture, foreign: FederationFixture, tax_node: NodeFixture
) -> None:
    impostor = foreign.identity("alice")  # same name, other federation's CA
    ca = fed.identity("alice").ca_cert_pem
    with channel_with(
        address(fed), ca=ca, key=impostor.tls_key_pem, cert=impostor.tls_cert_pem
    ) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            health_status(channel)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    assert still_serving(fed)


def test_expired_certificate_is_refused(fed: FederationFixture, tax_node: NodeFixture) -> None:
    expired = fed.identity("expired")
    with channel_with(
        address(fed), ca=expired.ca_cert_pem, key=expired.tls_key_pem, cert=expired.tls_cert_pem
    ) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            health_status(channel)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    assert still_serving(fed)


def test_certificate_not_in_roster_is_unauthenticated(
    fed: FederationFixture, tax_node: NodeFixture
) -> None:
    """Signed by our CA but not the certificate the roster lists (a re-issued or stolen CA key
    path): TLS accepts it, the interceptor refuses it."""
    alice = fed.identity("alice")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue_member_cert(
        fed.federation.ca_key,
        fed.federation.ca_cert,
        key,
        "alice",
        Role.NODE,  # claims a stronger role than the roster gives alice
        "CN",
        dt.datetime.now(dt.UTC),
        dt.timedelta(days=1),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    with channel_with(address(fed), ca=alice.ca_cert_pem, key=key_pem, cert=cert_pem) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Ping(peer_pb2.PingRequest(), timeout=5)
    assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "roster" in (failure.value.details() or "")
    assert still_serving(fed)


def test_analyst_calling_node_method_is_permission_denied(
    fed: FederationFixture, tax_node: NodeFixture
) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        with pytest.raises(
            PermissionDenied, match=re.escape("role analyst may not call /govshare.v1.Peer/Ping")
        ):
            client.ping()
    assert still_serving(fed)


def test_auditor_calling_analyst_method_is_permission_denied(
    fed: FederationFixture, tax_node: NodeFixture
) -> None:
    with NodeClient.to(fed.identity("audra"), "tax") as client:
        with pytest.raises(PermissionDenied, match="role auditor may not call"):
            client.list_datasets()


def test_malformed_request_names_the_field(fed: FederationFixture, tax_node: NodeFixture) -> None:
    alice = fed.identity("alice")
    with NodeClient.to(alice, "tax") as client:
        stub = catalog_pb2_grpc.CatalogStub(client.channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.DescribeDataset(
                catalog_pb2.DescribeDatasetRequest(name="Robert'); DROP"), timeout=5
            )
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'name'" in (failure.value.details() or "")
    info = error_info(failure.value)
    assert info is not None and dict(info.metadata) == {"field": "name"}


def test_unknown_dataset_is_not_found(fed: FederationFixture, tax_node: NodeFixture) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        stub = catalog_pb2_grpc.CatalogStub(client.channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.DescribeDataset(
                catalog_pb2.DescribeDatasetRequest(name="no_such_table"), timeout=5
            )
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND


def test_unreachable_node_is_unavailable(fed: FederationFixture) -> None:
    with NodeClient.to(fed.identity("alice"), "ghost", timeout=2) as client:
        with pytest.raises(Unavailable, match="node ghost"):
            client.list_datasets()


def test_identity_bundle_rejects_foreign_roster(
    fed: FederationFixture, foreign: FederationFixture
) -> None:
    bundle = fed.root / "tampered-bundle"
    shutil.copytree(fed.bundles["alice"], bundle)
    shutil.copyfile(foreign.bundles["alice"] / "roster.json", bundle / "roster.json")
    with pytest.raises(VerificationFailed):
        Identity.load(bundle)
