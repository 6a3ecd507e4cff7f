"""Enrolment requests, re-issue and roster installation (govshare.model.identity)."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from govshare.model.governance import Role
from govshare.model.identity import (
    REQUEST_CONTEXT,
    SIGNING_KEY_EXTENSION,
    EnrolmentRequest,
    Federation,
    Identity,
    Member,
    Roster,
    create_request,
    init_federation,
    install_roster,
    roster_key_of,
)
from govshare.protocols.errors import (
    AlreadyExists,
    Conflict,
    MalformedInput,
    NotFound,
    VerificationFailed,
)
from govshare.protocols.suite import SM, STANDARD

ADDRESS = "127.0.0.1:7102"


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    init_federation(tmp_path / "federation", "cityfed", suite=STANDARD)
    return Federation.load(tmp_path / "federation")


def _request_pem(
    name: str,
    *,
    tls_key: ec.EllipticCurvePrivateKey | None = None,
    signing_key: ed25519.Ed25519PrivateKey | None = None,
    proof_over: bytes | None = None,
) -> bytes:
    """A request built by hand, so that each proof can be made wrong on purpose."""
    tls_key = tls_key or ec.generate_private_key(ec.SECP256R1())
    signing_key = signing_key or ed25519.Ed25519PrivateKey.generate()
    spki = tls_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    message = (
        proof_over if proof_over is not None else REQUEST_CONTEXT + name.encode() + b"\0" + spki
    )
    public = signing_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    value = b"\x04\x60" + public + signing_key.sign(message)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.UnrecognizedExtension(SIGNING_KEY_EXTENSION, value), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_request_round_trip_and_signed_bundle_loads(federation: Federation, tmp_path: Path) -> None:
    home = tmp_path / "tax"
    request, path = create_request(home, "tax", STANDARD)
    assert path == home / "tax.csr"
    for private in ("tls.key", "signing.key"):
        assert (home / private).stat().st_mode & 0o777 == 0o600
    parsed = EnrolmentRequest.from_pem(path.read_bytes())
    assert parsed.fingerprint == request.fingerprint and parsed.name == "tax"
    federation, member, cert = federation.sign_request(
        parsed, role=Role.NODE, jurisdiction="CN", address=ADDRESS, out=tmp_path / "public"
    )
    assert sorted(p.name for p in (tmp_path / "public").iterdir()) == [
        "ca.crt", "roster.json", "tls.crt",
    ]  # fmt: skip
    for name in ("tls.crt", "ca.crt", "roster.json"):
        shutil.copy(tmp_path / "public" / name, home / name)
    identity = Identity.load(home)
    assert identity.member == member and federation.roster.version == 2
    assert cert.public_key() == parsed.tls_public_key


def test_request_with_a_proof_over_other_bytes_is_refused() -> None:
    tls_key = ec.generate_private_key(ec.SECP256R1())
    # A signing-key proof made for another TLS key (someone else's signing key, claimed).
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stolen = _request_pem("tax", tls_key=tls_key, proof_over=REQUEST_CONTEXT + b"tax\0" + spki)
    with pytest.raises(VerificationFailed):
        EnrolmentRequest.from_pem(stolen)
    renamed = _request_pem("tax", proof_over=REQUEST_CONTEXT + b"civil\0" + spki)
    with pytest.raises(VerificationFailed):
        EnrolmentRequest.from_pem(renamed)
    assert EnrolmentRequest.from_pem(_request_pem("tax", tls_key=tls_key)).name == "tax"


def test_request_refusals_name_what_is_wrong() -> None:
    with pytest.raises(MalformedInput, match="not a PEM certificate signing request"):
        EnrolmentRequest.from_pem(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    with pytest.raises(MalformedInput, match="too large"):
        EnrolmentRequest.from_pem(b"x" * (64 * 1024 + 1))
    with pytest.raises(MalformedInput, match="one lower-case DNS label"):
        EnrolmentRequest.from_pem(_request_pem("Tax"))
    rsa_like = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(MalformedInput, match="P-256"):
        EnrolmentRequest.from_pem(
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tax")]))
            .sign(rsa_like, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
    plain = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tax")]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(MalformedInput, match="node keygen"):
        EnrolmentRequest.from_pem(plain)


def test_create_request_never_overwrites_keys(tmp_path: Path) -> None:
    create_request(tmp_path, "tax", STANDARD)
    key = (tmp_path / "tls.key").read_bytes()
    with pytest.raises(AlreadyExists):
        create_request(tmp_path, "tax", STANDARD)
    assert (tmp_path / "tls.key").read_bytes() == key


def test_sign_refuses_a_duplicate_name_or_a_signing_key_held_by_another(
    federation: Federation, tmp_path: Path
) -> None:
    signing_key = ed25519.Ed25519PrivateKey.generate()
    first = EnrolmentRequest.from_pem(_request_pem("tax", signing_key=signing_key))
    federation, _, _ = federation.sign_request(
        first, role=Role.NODE, jurisdiction="CN", address=ADDRESS, out=tmp_path / "a"
    )
    with pytest.raises(AlreadyExists, match="--reissue"):
        federation.sign_request(
            first, role=Role.NODE, jurisdiction="CN", address=ADDRESS, out=tmp_path / "b"
        )
    copied = EnrolmentRequest.from_pem(_request_pem("civil", signing_key=signing_key))
    with pytest.raises(AlreadyExists, match="already holds this signing key"):
        federation.sign_request(
            copied, role=Role.NODE, jurisdiction="CN", address=ADDRESS, out=tmp_path / "c"
        )
    assert Federation.load(federation.directory).roster.version == 2


def test_reissue_keeps_the_roster_entry_and_replaces_the_keys(
    federation: Federation, tmp_path: Path
) -> None:
    federation, old = federation.enrol(
        role=Role.NODE, name="tax", jurisdiction="CN", address=ADDRESS, out=tmp_path / "tax"
    )
    with pytest.raises(MalformedInput, match="--role"):
        federation.enrol(name="alice", jurisdiction="CN", out=tmp_path / "alice")
    with pytest.raises(NotFound):
        federation.enrol(name="alice", out=tmp_path / "alice", reissue=True)
    federation, new = federation.enrol(name="tax", out=tmp_path / "tax-2", reissue=True)
    assert (new.role, new.jurisdiction, new.address) == (old.role, old.jurisdiction, old.address)
    assert new.tls_fingerprint != old.tls_fingerprint and new.signing_key != old.signing_key
    assert federation.roster.version == 3 and federation.roster.members == (new,)
    # The old bundle, handed the new roster, no longer loads: its certificate is not listed.
    federation.publish_roster(tmp_path / "tax")
    with pytest.raises(MalformedInput, match="not the one the roster lists"):
        Identity.load(tmp_path / "tax")
    assert Identity.load(tmp_path / "tax-2").member == new


def test_install_roster_checks_signature_federation_version_and_listing(
    federation: Federation, tmp_path: Path
) -> None:
    federation, _ = federation.enrol(
        role=Role.NODE, name="tax", jurisdiction="CN", address=ADDRESS, out=tmp_path / "tax"
    )
    federation.export_roster(tmp_path / "v2.json")
    federation, _ = federation.enrol(
        role=Role.ANALYST, name="alice", jurisdiction="CN", out=tmp_path / "alice"
    )
    federation.export_roster(tmp_path / "v3.json")
    bundle = tmp_path / "tax"
    held, installed = install_roster(bundle, (tmp_path / "v3.json").read_bytes())
    assert held is not None and (held.version, installed.version) == (2, 3)
    with pytest.raises(Conflict, match="rollback"):
        install_roster(bundle, (tmp_path / "v2.json").read_bytes())
    init_federation(tmp_path / "impostor", "cityfed", suite=STANDARD)
    with pytest.raises(VerificationFailed):
        install_roster(bundle, (tmp_path / "impostor" / "roster.json").read_bytes())
    with pytest.raises(MalformedInput):
        install_roster(bundle, b"{}")
    # tax revoked: the roster no longer lists its certificate, so it is not installed.
    federation.revoke("tax").export_roster(tmp_path / "v4.json")
    with pytest.raises(MalformedInput, match="does not list the certificate"):
        install_roster(bundle, (tmp_path / "v4.json").read_bytes())
    assert Identity.load(bundle).roster.version == 3
    with pytest.raises(NotFound, match=r"lacks ca\.crt"):
        install_roster(tmp_path / "nowhere", (tmp_path / "v3.json").read_bytes())


def test_identity_refuses_a_tls_key_that_is_not_its_certificates(
    federation: Federation, tmp_path: Path
) -> None:
    federation, _ = federation.enrol(
        role=Role.ANALYST, name="alice", jurisdiction="CN", out=tmp_path / "alice"
    )
    federation, _ = federation.enrol(
        role=Role.ANALYST, name="bob", jurisdiction="CN", out=tmp_path / "bob"
    )
    (tmp_path / "alice" / "tls.key").chmod(0o600)
    (tmp_path / "alice" / "tls.key").write_bytes((tmp_path / "bob" / "tls.key").read_bytes())
    with pytest.raises(MalformedInput, match="does not match its certificate"):
        Identity.load(tmp_path / "alice")


def test_load_as_says_what_to_do_before_enrolment(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"holds no node identity.*node keygen"):
        Identity.load_as(tmp_path, Role.NODE)
    with pytest.raises(NotFound, match="holds no analyst identity") as caught:
        Identity.load_as(tmp_path, Role.ANALYST)
    assert "keygen" not in str(caught.value)
    create_request(tmp_path, "tax", STANDARD)
    with pytest.raises(NotFound, match="keys but no certificate yet"):
        Identity.load_as(tmp_path, Role.NODE)


def test_roster_records_its_suite_and_refuses_keys_of_another(tmp_path: Path) -> None:
    init_federation(tmp_path / "sm", "smfed", suite=SM)
    sm_fed = Federation.load(tmp_path / "sm")
    init_federation(tmp_path / "std", "stdfed", suite=STANDARD)
    std_fed = Federation.load(tmp_path / "std")
    sm_member = Member(
        name="tax",
        role=Role.NODE,
        jurisdiction="CN",
        address="localhost:1",
        signing_key=SM.public_key(SM.generate_signing_key()),
        tls_fingerprint="00",
        suite="sm",
    )
    roster = Roster(federation="f", version=1, issued_at=1, members=(sm_member,), suite="sm")
    back = Roster.verify(roster.sign(sm_fed.ca_key, sm_fed.roster_key), sm_fed.ca_cert)
    assert back.suite == "sm" and back.crypto is SM
    assert back.member("tax").suite == "sm"
    ed_member = replace(sm_member, signing_key=STANDARD.public_key(STANDARD.generate_signing_key()))
    mixed = Roster(federation="f", version=1, issued_at=1, members=(ed_member,), suite="sm")
    with pytest.raises(MalformedInput, match="not a SM2-with-SM3 key"):
        Roster.verify(mixed.sign(sm_fed.ca_key, sm_fed.roster_key), sm_fed.ca_cert)
    unknown = Roster(federation="f", version=1, issued_at=1, members=(), suite="rot13")
    with pytest.raises(MalformedInput, match="unknown crypto suite"):
        Roster.verify(unknown.sign(std_fed.ca_key), std_fed.ca_cert)


def test_an_sm_roster_is_signed_with_sm2_by_the_key_the_ca_certificate_names(
    tmp_path: Path,
) -> None:
    init_federation(tmp_path / "sm", "smfed", suite=SM)
    fed = Federation.load(tmp_path / "sm")
    assert fed.roster_key is not None and fed.roster_key.suite == "sm"
    assert (tmp_path / "sm" / "roster.key").stat().st_mode & 0o777 == 0o600
    assert roster_key_of(fed.ca_cert) == fed.roster_key.public_key()
    signed = (tmp_path / "sm" / "roster.json").read_bytes()
    envelope = json.loads(signed)
    signature = base64.b64decode(envelope["signature"])
    # SM2 r || s under the CA certificate's roster key, not the CA's ECDSA signature.
    fed.roster_key.public_key().verify(signature, fed.roster.canonical_bytes())
    # The CA's ECDSA key cannot sign an SM federation's roster, nor can a roster claim to be
    # a standard one to be checked under the CA's key.
    with pytest.raises(VerificationFailed):
        Roster.verify(fed.roster.sign(fed.ca_key), fed.ca_cert)
    downgraded = replace(fed.roster, suite="standard")
    with pytest.raises(VerificationFailed, match="federation CA signs rosters on 'sm'"):
        Roster.verify(downgraded.sign(fed.ca_key), fed.ca_cert)
    # An SM roster presented to a standard federation's members is refused as well.
    init_federation(tmp_path / "std", "stdfed", suite=STANDARD)
    std = Federation.load(tmp_path / "std")
    with pytest.raises(VerificationFailed, match="signs rosters on 'standard'"):
        Roster.verify(replace(std.roster, suite="sm").sign(std.ca_key), std.ca_cert)
    # Tampering after signing is caught.
    envelope["roster"]["version"] = 99
    with pytest.raises(VerificationFailed):
        Roster.verify(json.dumps(envelope).encode(), fed.ca_cert)
    # Enrolment re-signs with the roster key: the new roster still verifies.
    fed, _ = fed.enrol(role=Role.ANALYST, name="alice", jurisdiction="CN", out=tmp_path / "alice")
    assert Identity.load(tmp_path / "alice").roster.version == fed.roster.version
