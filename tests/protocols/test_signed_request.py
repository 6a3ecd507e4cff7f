"""Signed analyst requests: round trips, tampering, expiry, strict parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.signed_request import SignedRequest, sign_request, verify_request
from govshare.protocols.suite import STANDARD

KEY = STANDARD.signing_key_from_bytes(bytes(range(32)))
NOW = 1_790_000_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def make(**overrides: object) -> SignedRequest:
    args: dict[str, object] = {
        "analyst": "alice",
        "kind": "psi_cardinality",
        "body": {"left": "tax.residents.id_number", "right": "civil.assistance.id_number"},
        "now": NOW,
        "query_id": bytes(16),
        "nonce": bytes(range(16)),
    }
    args.update(overrides)
    return sign_request(KEY, **args)  # type: ignore[arg-type]


@settings(max_examples=60)
@given(body=json_values, analyst=st.text(min_size=1, max_size=30), kind=st.text(max_size=30))
def test_round_trip_and_verify(body: object, analyst: str, kind: str) -> None:
    request = make(body=body, analyst=analyst, kind=kind)
    decoded = SignedRequest.decode(request.encode())
    assert decoded == request
    assert decoded.body_json() == body
    verify_request(decoded, KEY.public_key(), now=NOW + 1)


def test_known_answer_is_stable() -> None:
    request = make()
    assert request.encode()[:20] == b"govshare/request/v1\n"
    assert request.body == (
        b'{"left":"tax.residents.id_number","right":"civil.assistance.id_number"}'
    )
    # Ed25519 is deterministic: the same key and bytes give the same signature.
    assert make().signature == request.signature


@settings(max_examples=80)
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    encoded = bytearray(make().encode())
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises((VerificationFailed, MalformedInput)):
        verify_request(SignedRequest.decode(bytes(encoded)), KEY.public_key(), now=NOW + 1)


def test_wrong_key_is_refused() -> None:
    other = STANDARD.generate_signing_key().public_key()
    with pytest.raises(VerificationFailed):
        verify_request(make(), other, now=NOW)


def test_expired_request_is_refused() -> None:
    request = make(lifetime=60)
    verify_request(request, KEY.public_key(), now=NOW + 59)
    with pytest.raises(MalformedInput, match="expired"):
        verify_request(request, KEY.public_key(), now=NOW + 60)


def test_request_from_the_future_is_refused() -> None:
    with pytest.raises(MalformedInput, match="future"):
        verify_request(make(now=NOW + 3600), KEY.public_key(), now=NOW)


@pytest.mark.parametrize("cut", [0, 5, 21, 60, -1])
def test_truncated_request_is_malformed(cut: int) -> None:
    encoded = make().encode()
    with pytest.raises(MalformedInput):
        SignedRequest.decode(encoded[:cut])


def test_trailing_bytes_are_malformed() -> None:
    with pytest.raises(MalformedInput, match="trailing"):
        SignedRequest.decode(make().encode() + b"\x00")


def test_floats_have_no_canonical_form() -> None:
    with pytest.raises(TypeError):
        canonical_json({"epsilon": 0.5})
    assert canonical_json({"b": 1, "a": [True, None]}) == b'{"a":[true,null],"b":1}'
