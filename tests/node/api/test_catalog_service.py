"""The catalogue over gRPC: what analysts and nodes see, and unreachable nodes reported."""

from __future__ import annotations

import grpc
import pytest
from conftest import FederationFixture, PsiData, register
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from govshare.examples import synth
from govshare.model.governance import Grade, SharingType
from govshare.protocols.errors import NotFound
from govshare.rpc.client import NodeClient, federation_catalog


@pytest.fixture(scope="module")
def core_dataset(psi_data: PsiData, tmp_path_factory: pytest.TempPathFactory) -> str:
    data = tmp_path_factory.mktemp("core")
    synth.generate(data, size=50, seed=4)
    register(
        psi_data.tax, data / f"{synth.TAX}.csv", name="taxpayer_core",
        columns=("id_number=join_key:resident_id", "district=deny", "year=deny",
                 "income_band=deny", "annual_income=deny"),
        grade=Grade.CORE, sharing=SharingType.NONE, legal_basis="Tax Collection Law, art. 8",
    )  # fmt: skip
    return "taxpayer_core"


def test_analysts_never_see_core_datasets(
    fed: FederationFixture, psi_data: PsiData, core_dataset: str
) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        names = {d.name for d in client.list_datasets()}
        assert "residents" in names and core_dataset not in names
        with pytest.raises(NotFound):
            client.describe_dataset(core_dataset)
    with NodeClient.to(fed.identity("civil"), "tax") as client:  # a peer node sees it
        assert core_dataset in {d.name for d in client.list_datasets()}


def test_catalogue_shows_metadata_never_rows(fed: FederationFixture, psi_data: PsiData) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        residents = client.describe_dataset("residents")
    assert residents.row_count == 400
    assert residents.grade is Grade.GENERAL
    assert [c.name for c in residents.columns][:2] == ["id_number", "district"]
    assert residents.column("income_band") is not None
    assert residents.column("income_band").domain == ("low", "middle", "high")  # type: ignore[union-attr]


def test_unreachable_node_is_reported_not_fatal(fed: FederationFixture, psi_data: PsiData) -> None:
    answers = {a.node: a for a in federation_catalog(fed.identity("alice"), timeout=2)}
    assert answers["tax"].error is None and answers["tax"].datasets
    assert answers["ghost"].datasets == () and "node ghost" in (answers["ghost"].error or "")


def test_reflection_lists_the_services(fed: FederationFixture, psi_data: PsiData) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as client:
        services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {"govshare.v1.Catalog", "govshare.v1.Query", "grpc.health.v1.Health"} <= services


def test_reflection_needs_a_member_certificate(fed: FederationFixture, psi_data: PsiData) -> None:
    address = fed.federation.roster.member("tax").address
    credentials = grpc.ssl_channel_credentials(root_certificates=fed.identity("alice").ca_cert_pem)
    options = [("grpc.ssl_target_name_override", "tax")]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        with pytest.raises(grpc.RpcError):
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
