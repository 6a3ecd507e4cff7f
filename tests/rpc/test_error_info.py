"""govshare errors cross gRPC as data: a ``google.rpc.Status`` with an ErrorInfo in the trailers.

Every error kind goes through ``abort_arguments`` into a real mTLS server (a sync one and a
``grpc.aio`` one, the two ways a node may abort) and back through the real client, which rebuilds
it from the ErrorInfo; a peer that sends no details, or details that cannot be trusted, gets
the code-and-text mapping. Then the real nodes: a refusal arrives as ``PolicyRefused`` with the
rule the node logged, an unknown dataset as ``NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conftest import PSI_EPSILON, PURPOSE, FederationFixture, PsiData
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from govshare.model.governance import QueryKind
from govshare.model.query_plan import PsiPlan, Side
from govshare.protocols.errors import (
    Aborted,
    AlreadyExists,
    Conflict,
    GovshareError,
    MalformedInput,
    NotFound,
    PermissionDenied,
    PolicyRefused,
    ResourceExhausted,
    Unavailable,
    VerificationFailed,
)
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient
from govshare.rpc.status import (
    DOMAIN,
    AbortArguments,
    Reason,
    abort_arguments,
    error_from_call,
    error_info,
    refusal_arguments,
    status_for,
)
from govshare.rpc.tls import server_credentials
from govshare.v1 import catalog_pb2, catalog_pb2_grpc, query_pb2, query_pb2_grpc

SERVICE = "govshare.test.Errors"
RAISE = f"/{SERVICE}/Raise"
# A safety net for a broken server, never a condition a test waits for.
TIMEOUT = 30.0
GRPC_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Case:
    """An error a server aborts with, and what must arrive."""

    sent: AbortArguments
    kind: type[GovshareError]
    reason: str
    metadata: dict[str, str]
    attributes: dict[str, object]
    error: GovshareError | None = None  # what the server raised, if a govshare error


def error_case(
    error: GovshareError, kind: Reason, metadata: dict[str, str], /, **attributes: object
) -> Case:
    """``attributes``: the rebuilt error's own fields (``rule``, ``field``, ``retry_after``)."""
    return Case(abort_arguments(error), type(error), kind, metadata, attributes, error)


# One per govshare error kind (MalformedInput with and without a field).
ERRORS: dict[str, Case] = {
    "malformed_input": error_case(
        MalformedInput("field 'name' is required", field="name"),
        Reason.MALFORMED_INPUT,
        {"field": "name"},
        field="name",
    ),
    "malformed_input_no_field": error_case(
        MalformedInput("the request is not a SignedRequest"),
        Reason.MALFORMED_INPUT,
        {},
        field=None,
    ),
    "not_found": error_case(NotFound("no dataset 'nope'"), Reason.NOT_FOUND, {}),
    "already_exists": error_case(AlreadyExists("replayed request"), Reason.ALREADY_EXISTS, {}),
    "policy_refused": error_case(
        PolicyRefused("grant.missing", "'bob' holds no grant on 'residents'"),
        Reason.POLICY_REFUSED,
        {"rule": "grant.missing"},
        rule="grant.missing",
        reason="'bob' holds no grant on 'residents'",
    ),
    "permission_denied": error_case(
        PermissionDenied("signed for 'alice' but sent by 'bob'"), Reason.PERMISSION_DENIED, {}
    ),
    "verification_failed": error_case(
        VerificationFailed("signature check failed"), Reason.VERIFICATION_FAILED, {}
    ),
    "conflict": error_case(Conflict("the witness holds size 12"), Reason.CONFLICT, {}),
    "unavailable": error_case(Unavailable("peer civil went away"), Reason.UNAVAILABLE, {}),
    "aborted": error_case(Aborted("query abandoned, nothing released"), Reason.ABORTED, {}),
    "resource_exhausted": error_case(
        ResourceExhausted("node tax is busy (8 queued); retry in 3 s", retry_after=2.5),
        Reason.RESOURCE_EXHAUSTED,
        {"retry_after_seconds": "2.5"},
        retry_after=2.5,
    ),
    "internal": error_case(GovshareError("something of no kind"), Reason.INTERNAL, {}),
}

# The auth interceptor's own refusals, which are no govshare error on the server.
REFUSALS: dict[str, Case] = {
    "not_a_member": Case(
        refusal_arguments(
            grpc.StatusCode.UNAUTHENTICATED,
            "not a federation member: certificate of 'alice' is not the one the roster lists",
            Reason.NOT_A_MEMBER,
        ),
        VerificationFailed,
        Reason.NOT_A_MEMBER,
        {},
        {},
    ),
    "role_not_allowed": Case(
        refusal_arguments(
            grpc.StatusCode.PERMISSION_DENIED,
            "role analyst may not call /govshare.v1.Peer/Ping",
            Reason.ROLE_NOT_ALLOWED,
        ),
        PermissionDenied,
        Reason.ROLE_NOT_ALLOWED,
        {},
        {},
    ),
    "log_broken": Case(
        refusal_arguments(
            grpc.StatusCode.FAILED_PRECONDITION,
            "node tax refuses: its audit log is broken at entry 7",
            Reason.LOG_BROKEN,
            metadata={"entry": "7"},
        ),
        Conflict,
        Reason.LOG_BROKEN,
        {"entry": "7"},
        {},
    ),
}


def _packed(*details: Any) -> list[any_pb2.Any]:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return packed


def _trailers(rich: status_pb2.Status) -> tuple[tuple[str, str | bytes], ...]:
    return ((GRPC_DETAILS_KEY, rich.SerializeToString()),)


def _bare(code: grpc.StatusCode, message: str) -> AbortArguments:
    return AbortArguments(code, message, ())


def _foreign(reason: str, metadata: dict[str, str]) -> AbortArguments:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="example.org", metadata=metadata)
    code = grpc.StatusCode.PERMISSION_DENIED
    message = "refused by rule grant.missing: no grant"
    rich = status_pb2.Status(code=code.value[0], message=message, details=_packed(info))
    return AbortArguments(code, message, _trailers(rich))


def _retry_info_only(seconds: int) -> AbortArguments:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo(reason=Reason.RESOURCE_EXHAUSTED, domain=DOMAIN)
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromSeconds(seconds)
    rich = status_pb2.Status(code=code.value[0], message="busy", details=_packed(info, retry))
    return AbortArguments(code, "busy", _trailers(rich))


_mismatched = abort_arguments(PolicyRefused("grant.missing", "no grant"))

# What a server sends, and the error the client must make of it: no details, or details it
# must not trust, give the code-and-text mapping.
FALLBACKS: dict[str, tuple[AbortArguments, type[GovshareError], dict[str, object]]] = {
    # The rule in the text is never parsed out: without ErrorInfo it is a PermissionDenied.
    "bare_refusal": (
        _bare(grpc.StatusCode.PERMISSION_DENIED, "refused by rule grant.missing: no grant"),
        PermissionDenied,
        {},
    ),
    "bare_not_found": (_bare(grpc.StatusCode.NOT_FOUND, "no such thing"), NotFound, {}),
    "bare_invalid": (_bare(grpc.StatusCode.INVALID_ARGUMENT, "bad"), MalformedInput, {}),
    "bare_unavailable": (_bare(grpc.StatusCode.UNAVAILABLE, "down"), Unavailable, {}),
    "bare_unauthenticated": (
        _bare(grpc.StatusCode.UNAUTHENTICATED, "who"),
        VerificationFailed,
        {},
    ),
    "bare_failed_precondition": (_bare(grpc.StatusCode.FAILED_PRECONDITION, "no"), Conflict, {}),
    "bare_aborted": (_bare(grpc.StatusCode.ABORTED, "gone"), Aborted, {}),
    "bare_already_exists": (_bare(grpc.StatusCode.ALREADY_EXISTS, "twice"), AlreadyExists, {}),
    # A RESOURCE_EXHAUSTED without a delay (the channel's own: a message over the size limit)
    # is no ResourceExhausted: waiting would not help.
    "bare_resource_exhausted": (
        _bare(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large"),
        GovshareError,
        {},
    ),
    "bare_internal": (_bare(grpc.StatusCode.INTERNAL, "oops"), GovshareError, {}),
    # The status in the trailers names another code than the call's: trust neither detail.
    "code_mismatch": (
        _mismatched._replace(code=grpc.StatusCode.NOT_FOUND),
        NotFound,
        {},
    ),
    # Trailers that do not decode as a google.rpc.Status.
    "undecodable": (
        AbortArguments(
            grpc.StatusCode.PERMISSION_DENIED, "refused", ((GRPC_DETAILS_KEY, b"\xff\xff\xff"),)
        ),
        PermissionDenied,
        {},
    ),
    # Another domain's ErrorInfo names no govshare error, whatever its reason says.
    "foreign_domain": (
        _foreign(Reason.POLICY_REFUSED, {"rule": "grant.missing"}),
        PermissionDenied,
        {},
    ),
    # A govshare refusal that names no rule is not a PolicyRefused.
    "refusal_without_rule": (
        refusal_arguments(grpc.StatusCode.PERMISSION_DENIED, "refused", Reason.POLICY_REFUSED),
        PermissionDenied,
        {},
    ),
    # An unknown reason: the code decides.
    "unknown_reason": (
        refusal_arguments(grpc.StatusCode.NOT_FOUND, "gone", "SOMETHING_NEW"),  # type: ignore[arg-type]
        NotFound,
        {},
    ),
    # A busy node without a delay in ErrorInfo: RetryInfo's delay.
    "retry_info_only": (_retry_info_only(4), ResourceExhausted, {"retry_after": 4.0}),
    # ... and with neither, there is nothing to wait for.
    "resource_exhausted_no_delay": (
        refusal_arguments(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", Reason.RESOURCE_EXHAUSTED),
        GovshareError,
        {},
    ),
    "bad_retry_after": (
        refusal_arguments(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "busy",
            Reason.RESOURCE_EXHAUSTED,
            metadata={"retry_after_seconds": "-1"},
        ),
        GovshareError,
        {},
    ),
}

# Delays a busy node may ask for, from none to a day; each must arrive exactly.
RETRY_DELAYS = (0.0, 1e-9, 0.001, 1.0, 2.5, 59.999, 3600.0, 86400.25)

SENT: dict[str, AbortArguments] = {
    **{name: case.sent for name, case in {**ERRORS, **REFUSALS}.items()},
    **{name: sent for name, (sent, _, _) in FALLBACKS.items()},
    **{
        f"retry_{delay!r}": abort_arguments(ResourceExhausted("busy", retry_after=delay))
        for delay in RETRY_DELAYS
    },
    # The text names one rule, ErrorInfo another: the client believes ErrorInfo.
    "rule_not_in_text": abort_arguments(
        PolicyRefused("grant.purpose", "x", text="refused by rule grant.missing: x")
    ),
}


# --------------------------------------------------------------------------- the servers


def _sync_raise(request: bytes, context: grpc.ServicerContext) -> bytes:
    sent = SENT[request.decode()]
    # A sync context's abort() takes no trailing metadata; abort_with_status does.
    context.abort_with_status(sent.status())


async def _aio_raise(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await context.abort(*SENT[request.decode()])


def _handler(behaviour: Callable[..., Any]) -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Raise": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


@pytest.fixture(scope="module")
def sync_port(fed: FederationFixture) -> Iterator[int]:
    """A sync mTLS server with the tax node's certificate that aborts as each request says."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handler(_sync_raise),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(fed.identity("tax")))
    server.start()
    yield port
    server.stop(None).wait()


@pytest.fixture(scope="module")
def aio_port(fed: FederationFixture) -> Iterator[int]:
    """The same as a ``grpc.aio`` server, on an event loop of its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="aio-errors", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(_aio_raise),))
        port = server.add_secure_port("127.0.0.1:0", server_credentials(fed.identity("tax")))
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
    yield port
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(TIMEOUT)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(TIMEOUT)
    loop.close()


@pytest.fixture(params=["sync", "aio"])
def client(
    request: pytest.FixtureRequest, fed: FederationFixture, sync_port: int, aio_port: int
) -> Iterator[NodeClient]:
    """The real client, as alice, to a server that holds tax's certificate."""
    port = sync_port if request.param == "sync" else aio_port
    alice = fed.identity("alice")
    member = dataclasses.replace(alice.roster.member("tax"), address=f"127.0.0.1:{port}")
    with NodeClient(alice, member, timeout=TIMEOUT) as node_client:
        yield node_client


def raise_through(client: NodeClient, name: str) -> GovshareError:
    """What the real client raises when the server aborts with ``SENT[name]``."""
    stub = client.channel.unary_unary(RAISE, None, None)
    with pytest.raises(GovshareError) as failure:
        client.call(lambda: stub(name.encode(), timeout=TIMEOUT))
    return failure.value


def raw_failure(client: NodeClient, name: str) -> grpc.RpcError:
    stub = client.channel.unary_unary(RAISE, None, None)
    with pytest.raises(grpc.RpcError) as failure:
        stub(name.encode(), timeout=TIMEOUT)
    return failure.value


def error_info_of(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo in a failed call's trailers, read with grpc_status itself."""
    assert isinstance(error, grpc.Call)
    rich = rpc_status.from_call(error)
    assert isinstance(rich, status_pb2.Status), "the call carried no google.rpc.Status"
    assert rich.code == error.code().value[0] and rich.message == error.details()
    infos = []
    for detail in rich.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, rich
    return infos[0]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted({**ERRORS, **REFUSALS}))
def test_every_kind_round_trips_through_a_real_server(client: NodeClient, name: str) -> None:
    case = {**ERRORS, **REFUSALS}[name]

    raw = raw_failure(client, name)
    assert isinstance(raw, grpc.Call)
    assert raw.code() is case.sent.code
    assert raw.details() == case.sent.details  # the one-line text, unchanged
    info = error_info_of(raw)
    assert (info.reason, info.domain, dict(info.metadata)) == (case.reason, DOMAIN, case.metadata)

    error = raise_through(client, name)
    assert type(error) is case.kind
    assert str(error) == f"node tax: {case.sent.details}"
    for attribute, value in case.attributes.items():
        assert getattr(error, attribute) == value, attribute


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_abort_arguments_keep_the_code_and_text(name: str) -> None:
    case = ERRORS[name]
    assert case.error is not None
    assert case.sent.code is status_for(case.error)
    assert case.sent.details == str(case.error)
    assert case.sent.status().code is case.sent.code
    assert case.sent.status().details == case.sent.details
    assert case.sent.status().trailing_metadata == case.sent.trailing_metadata


def test_refusal_keeps_the_rule_out_of_the_text(client: NodeClient) -> None:
    """The rule comes from ErrorInfo: a refusal whose text names another rule keeps its own."""
    error = raise_through(client, "policy_refused")
    assert isinstance(error, PolicyRefused) and isinstance(error, PermissionDenied)
    assert error.rule == "grant.missing"
    assert str(error) == (
        "node tax: refused by rule grant.missing: 'bob' holds no grant on 'residents'"
    )
    assert error.reason == "'bob' holds no grant on 'residents'"

    error = raise_through(client, "rule_not_in_text")
    assert isinstance(error, PolicyRefused)
    assert error.rule == "grant.purpose"
    assert str(error) == "node tax: refused by rule grant.missing: x"


def test_resource_exhausted_carries_retry_info(client: NodeClient) -> None:
    raw = raw_failure(client, "resource_exhausted")
    assert isinstance(raw, grpc.Call)
    assert raw.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    rich = rpc_status.from_call(raw)
    assert isinstance(rich, status_pb2.Status)
    delays = []
    for detail in rich.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            delays.append(retry.retry_delay.ToNanoseconds())
    assert delays == [2_500_000_000]

    error = raise_through(client, "resource_exhausted")
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after == 2.5


@pytest.mark.parametrize("delay", RETRY_DELAYS)
def test_retry_after_round_trips_exactly(client: NodeClient, delay: float) -> None:
    error = raise_through(client, f"retry_{delay!r}")
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after == delay


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_resource_exhausted_refuses_a_meaningless_delay(bad: float) -> None:
    with pytest.raises(TypeError):
        ResourceExhausted("busy", retry_after=bad)


def test_a_refusal_cannot_be_ok() -> None:
    with pytest.raises(TypeError):
        refusal_arguments(grpc.StatusCode.OK, "fine", Reason.INTERNAL)


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_without_trusted_details_the_code_decides(client: NodeClient, name: str) -> None:
    sent, kind, attributes = FALLBACKS[name]
    error = raise_through(client, name)
    assert type(error) is kind
    assert str(error) == f"node tax: {sent.details}"
    for attribute, value in attributes.items():
        assert getattr(error, attribute) == value, attribute


def test_unreachable_node_is_unavailable_without_details(fed: FederationFixture) -> None:
    """The channel's own failure (the ghost node never started) carries no ErrorInfo."""
    with NodeClient.to(fed.identity("alice"), "ghost", timeout=TIMEOUT) as ghost:
        stub = ghost.channel.unary_unary(RAISE, None, None)
        with pytest.raises(grpc.RpcError) as failure:
            stub(b"not_found", timeout=TIMEOUT)
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_info(failure.value) is None
        assert isinstance(error_from_call(failure.value), Unavailable)
        with pytest.raises(Unavailable, match=r"^node ghost: "):
            ghost.ping()


def test_deadline_exceeded_is_unavailable(fed: FederationFixture, sync_port: int) -> None:
    """A deadline that has passed before the call starts: DEADLINE_EXCEEDED from the channel."""
    alice = fed.identity("alice")
    member = dataclasses.replace(alice.roster.member("tax"), address=f"127.0.0.1:{sync_port}")
    with NodeClient(alice, member) as node_client:
        stub = node_client.channel.unary_unary(RAISE, None, None)
        with pytest.raises(grpc.RpcError) as failure:
            stub(b"not_found", timeout=-1.0)
        assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(Unavailable):
            node_client.call(lambda: stub(b"not_found", timeout=-1.0))


def test_an_rpc_error_that_is_no_call_is_a_plain_error() -> None:
    error = error_from_call(grpc.RpcError("no call behind it"), prefix="node tax: ")
    assert type(error) is GovshareError
    assert str(error) == "node tax: no call behind it"


# --------------------------------------------------------------------------- the real nodes


def _plan() -> PsiPlan:
    return PsiPlan(
        kind=QueryKind.PSI_CARDINALITY,
        purpose=PURPOSE,
        left=Side("tax", "residents", "id_number"),
        right=Side("civil", "assistance", "id_number"),
        epsilon=PSI_EPSILON,
    )


def _decided_rules(psi_data: PsiData, query_id: str) -> list[str]:
    return [
        str(entry.fields["rule"])
        for entry in (e.decode() for e in psi_data.tax.audit.entries_for_query(query_id))
        if entry.kind == "policy.decision"
    ]


def test_a_nodes_refusal_arrives_with_its_rule(fed: FederationFixture, psi_data: PsiData) -> None:
    """hkana holds no grant on tax.residents: the node refuses by grant.missing, logs that rule,
    and the client reads the same rule from ErrorInfo, not from the text."""
    hkana = fed.identity("hkana")
    signed = sign_request(
        hkana.signing_key, analyst="hkana", kind="psi_cardinality", body=_plan().to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with NodeClient.to(hkana, "tax") as node_client:
        stub = query_pb2_grpc.QueryStub(node_client.channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Submit(query_pb2.SubmitRequest(signed_request=signed.encode()), timeout=TIMEOUT)
    raw = failure.value
    assert raw.code() is grpc.StatusCode.PERMISSION_DENIED
    info = error_info_of(raw)
    assert (info.reason, info.domain) == ("POLICY_REFUSED", "govshare")
    assert dict(info.metadata) == {"rule": "grant.missing"}
    assert _decided_rules(psi_data, signed.query_id_hex) == ["grant.missing"]

    again = sign_request(
        hkana.signing_key, analyst="hkana", kind="psi_cardinality", body=_plan().to_json(),
        now=int(time.time()),
    )  # fmt: skip
    with NodeClient.to(hkana, "tax") as node_client:
        with pytest.raises(PolicyRefused) as refused:
            node_client.submit(again.encode())
    assert refused.value.rule == "grant.missing"
    assert refused.value.rule == _decided_rules(psi_data, again.query_id_hex)[0]
    assert str(refused.value).startswith("node tax: refused by rule grant.missing: ")


def test_an_unknown_dataset_is_not_found(fed: FederationFixture, psi_data: PsiData) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as node_client:
        stub = catalog_pb2_grpc.CatalogStub(node_client.channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.DescribeDataset(
                catalog_pb2.DescribeDatasetRequest(name="no_such_dataset"), timeout=TIMEOUT
            )
        info = error_info_of(failure.value)
        assert (info.reason, info.domain, dict(info.metadata)) == ("NOT_FOUND", "govshare", {})
        with pytest.raises(NotFound, match=r"^node tax: "):
            node_client.describe_dataset("no_such_dataset")


def test_a_malformed_request_names_its_field(fed: FederationFixture, psi_data: PsiData) -> None:
    with NodeClient.to(fed.identity("alice"), "tax") as node_client:
        with pytest.raises(MalformedInput) as malformed:
            node_client.describe_dataset("Robert'); DROP")
    assert malformed.value.field == "name"
