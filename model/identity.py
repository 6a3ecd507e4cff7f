"""Federation identity: the CA, member enrolment, the signed roster, and identity bundles.

A federation has one X.509 CA (ECDSA P-256). Every member — node, analyst, auditor — gets an
ECDSA P-256 TLS certificate whose subject names the member (CN), its role (OU) and its
jurisdiction (jurisdictionCountryName, ISO 3166-1 alpha-2), with the member name as a DNS
SAN so that a client dialling a node verifies it reached *that* node. gRPC's TLS stack refuses
Ed25519 certificates, so each member also holds an Ed25519 key that signs requests, grants
and log checkpoints.

The roster lists every member (name, role, jurisdiction, address, Ed25519 public key, TLS
certificate fingerprint), carries a version number, and is signed by the CA key over its
canonical JSON encoding. A node accepts a caller only if its verified certificate is the one
the roster names, so re-enrolling a member revokes its old certificate.

Files (private keys are created 0600 and never printed):

    federation/            ca.key  ca.crt  roster.json
    <member bundle>/       tls.key tls.crt signing.key ca.crt roster.json
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from govshare.model.governance import Role
from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import (
    AlreadyExists,
    MalformedInput,
    NotFound,
    VerificationFailed,
)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
ROSTER = "roster.json"
TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"
SIGNING_KEY = "signing.key"

# CA lifetime: the federation outlives any one member certificate.
CA_VALIDITY = dt.timedelta(days=3650)
# Member certificates are re-issued yearly.
MEMBER_VALIDITY = dt.timedelta(days=365)

# Member names become DNS SANs and SQL-free identifiers: one lower-case DNS label.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# ISO 3166-1 alpha-2 code, the form X.509's jurisdictionCountryName requires.
JURISDICTION_PATTERN = re.compile(r"^[A-Z]{2}$")
ADDRESS_PATTERN = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (refusing to overwrite) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise MalformedInput(
            f"member name {name!r} must be one lower-case DNS label (a-z, 0-9, '-')",
            field="name",
        )
    return name


def validate_jurisdiction(code: str) -> str:
    if not JURISDICTION_PATTERN.match(code):
        raise MalformedInput(
            f"jurisdiction {code!r} must be an ISO 3166-1 alpha-2 code such as CN or HK",
            field="jurisdiction",
        )
    return code


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class Member:
    name: str
    role: Role
    jurisdiction: str
    address: str  # host:port for nodes, "" for analysts and auditors
    signing_key: bytes  # raw Ed25519 public key, 32 bytes
    tls_fingerprint: str

    def verify_key(self) -> ed25519.Ed25519PublicKey:
        return ed25519.Ed25519PublicKey.from_public_bytes(self.signing_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "jurisdiction": self.jurisdiction,
            "address": self.address,
            "signing_key": base64.b64encode(self.signing_key).decode(),
            "tls_fingerprint": self.tls_fingerprint,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Member:
        try:
            key = base64.b64decode(raw["signing_key"], validate=True)
            member = cls(
                name=validate_name(raw["name"]),
                role=Role(raw["role"]),
                jurisdiction=validate_jurisdiction(raw["jurisdiction"]),
                address=str(raw["address"]),
                signing_key=key,
                tls_fingerprint=str(raw["tls_fingerprint"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"roster member entry is malformed: {exc}") from None
        if len(key) != 32:
            raise MalformedInput(f"roster member {member.name}: signing key is not 32 bytes")
        return member


@dataclass(frozen=True)
class Roster:
    """The federation's member list at one version, as signed by the CA."""

    federation: str
    version: int
    issued_at: int
    members: tuple[Member, ...]

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise NotFound(f"{name!r} is not a member of federation {self.federation!r}")

    def with_role(self, role: Role) -> list[Member]:
        return [m for m in self.members if m.role is role]

    def to_json(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "version": self.version,
            "issued_at": self.issued_at,
            "members": [m.to_json() for m in self.members],
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def sign(self, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The signed-roster file: the roster and the CA's ECDSA signature over its bytes."""
        signature = ca_key.sign(self.canonical_bytes(), ec.ECDSA(hashes.SHA256()))
        envelope = {"roster": self.to_json(), "signature": base64.b64encode(signature).decode()}
        return json.dumps(envelope, indent=2, sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def verify(cls, data: bytes, ca_cert: x509.Certificate) -> Roster:
        """Parse a signed-roster file and check the CA's signature.

        Raises:
            MalformedInput: not a roster file.
            VerificationFailed: the signature is not the CA's over these bytes.
        """
        try:
            envelope = json.loads(data)
            raw = envelope["roster"]
            signature = base64.b64decode(envelope["signature"], validate=True)
            roster = cls(
                federation=str(raw["federation"]),
                version=int(raw["version"]),
                issued_at=int(raw["issued_at"]),
                members=tuple(Member.from_json(m) for m in raw["members"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"roster file is malformed: {exc}", field="roster") from None
        public_key = ca_cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise MalformedInput("federation CA key is not ECDSA")
        try:
            public_key.verify(signature, roster.canonical_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerificationFailed("roster signature does not verify") from None
        return roster


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise MalformedInput(f"{path} is not a PEM certificate") from None


def _subject_text(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise MalformedInput(f"certificate subject must carry exactly one {oid._name}")
    value = values[0].value
    return value if isinstance(value, str) else value.decode()


@dataclass(frozen=True)
class CertIdentity:
    """What a verified member certificate says about its holder."""

    name: str
    role: Role
    jurisdiction: str
    fingerprint: str

    @classmethod
    def from_cert(cls, cert: x509.Certificate) -> CertIdentity:
        try:
            role = Role(_subject_text(cert, NameOID.ORGANIZATIONAL_UNIT_NAME))
        except ValueError:
            raise MalformedInput("certificate OU is not a govshare role") from None
        return cls(
            name=_subject_text(cert, NameOID.COMMON_NAME),
            role=role,
            jurisdiction=_subject_text(cert, NameOID.JURISDICTION_COUNTRY_NAME),
            fingerprint=fingerprint(cert),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> CertIdentity:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise MalformedInput("peer certificate is not PEM") from None
        return cls.from_cert(cert)


# --------------------------------------------------------------------------- federation


def init_federation(
    directory: Path, name: str, *, now: dt.datetime | None = None
) -> tuple[x509.Certificate, Roster]:
    """Create the federation CA and an empty signed roster (version 1) in ``directory``."""
    validate_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists():
        raise AlreadyExists(f"{directory} already holds a federation CA")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        directory / CA_KEY,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    roster = Roster(federation=name, version=1, issued_at=int(now.timestamp()), members=())
    _write_atomic(directory / ROSTER, roster.sign(key))
    return cert, roster


@dataclass(frozen=True)
class Federation:
    """The administrator's view: the CA key and the current roster."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    roster: Roster

    @classmethod
    def load(cls, directory: Path) -> Federation:
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except FileNotFoundError:
            raise NotFound(
                f"no federation CA in {directory}; run 'govshare federation init' first"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise MalformedInput(f"{directory / CA_KEY} is not an ECDSA key")
        cert = _load_cert(directory / CA_CERT)
        roster = Roster.verify((directory / ROSTER).read_bytes(), cert)
        return cls(directory, key, cert, roster)

    def enrol(
        self,
        *,
        role: Role,
        name: str,
        jurisdiction: str,
        address: str = "",
        out: Path,
        now: dt.datetime | None = None,
        validity: dt.timedelta = MEMBER_VALIDITY,
        reissue: bool = False,
    ) -> tuple[Federation, Member]:
        """Issue a member's keys and certificate into ``out`` and re-sign the roster.

        With ``reissue`` an enrolled member gets new keys and a new certificate (a lost or
        compromised key, a yearly renewal): once the roster is published, nodes refuse the old
        certificate and signing key.

        Returns the federation with the new roster, and the new member.
        """
        validate_name(name)
        validate_jurisdiction(jurisdiction)
        if role is Role.NODE and not ADDRESS_PATTERN.match(address):
            raise MalformedInput("a node needs --address HOST:PORT", field="address")
        enrolled = any(m.name == name for m in self.roster.members)
        if enrolled and not reissue:
            raise AlreadyExists(
                f"{name!r} is already enrolled in {self.roster.federation!r} "
                "(--reissue replaces its keys)"
            )
        if reissue and not enrolled:
            raise NotFound(f"{name!r} is not enrolled in {self.roster.federation!r}")
        now = now or _now()
        out.mkdir(parents=True, exist_ok=True)
        for filename in (TLS_KEY, SIGNING_KEY):
            if (out / filename).exists():
                raise AlreadyExists(f"{out / filename} exists; enrol into an empty folder")

        tls_key = ec.generate_private_key(ec.SECP256R1())
        signing_key = ed25519.Ed25519PrivateKey.generate()
        cert = _issue_member_cert(
            self.ca_key, self.ca_cert, tls_key, name, role, jurisdiction, now, validity
        )
        member = Member(
            name=name,
            role=role,
            jurisdiction=jurisdiction,
            address=address,
            signing_key=signing_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            ),
            tls_fingerprint=fingerprint(cert),
        )
        others = tuple(m for m in self.roster.members if m.name != name)
        roster = replace(
            self.roster,
            version=self.roster.version + 1,
            issued_at=int(now.timestamp()),
            members=(*others, member),
        )
        signed = roster.sign(self.ca_key)
        pkcs8 = serialization.PrivateFormat.PKCS8
        _write_private(
            out / TLS_KEY,
            tls_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()),
        )
        _write_private(
            out / SIGNING_KEY,
            signing_key.private_bytes(
                serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()
            ),
        )
        (out / TLS_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / CA_CERT).write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_atomic(self.directory / ROSTER, signed)
        _write_atomic(out / ROSTER, signed)
        return replace(self, roster=roster), member

    def revoke(self, name: str, *, now: dt.datetime | None = None) -> Federation:
        """Remove a member from the roster and re-sign it; once published, nodes refuse it.

        Raises:
            NotFound: no such member.
        """
        self.roster.member(name)
        roster = replace(
            self.roster,
            version=self.roster.version + 1,
            issued_at=int((now or _now()).timestamp()),
            members=tuple(m for m in self.roster.members if m.name != name),
        )
        _write_atomic(self.directory / ROSTER, roster.sign(self.ca_key))
        return replace(self, roster=roster)

    def publish_roster(self, bundle: Path) -> None:
        """Copy the current signed roster into a member's bundle."""
        if not (bundle / TLS_CERT).exists():
            raise NotFound(f"{bundle} is not a member identity bundle")
        _write_atomic(bundle / ROSTER, (self.directory / ROSTER).read_bytes())


def _issue_member_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    role: Role,
    jurisdiction: str,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.JURISDICTION_COUNTRY_NAME, jurisdiction),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------- member bundle


@dataclass(frozen=True)
class Identity:
    """A member's own credentials and its verified view of the roster."""

    directory: Path
    name: str
    role: Role
    jurisdiction: str
    tls_key_pem: bytes
    tls_cert_pem: bytes
    ca_cert_pem: bytes
    signing_key: ed25519.Ed25519PrivateKey
    roster: Roster

    @classmethod
    def load(cls, directory: Path) -> Identity:
        """Load and check a bundle written by ``Federation.enrol``.

        Raises:
            NotFound: a file of the bundle is missing.
            MalformedInput: a file cannot be parsed, or the certificate disagrees with the roster.
            VerificationFailed: the roster is not signed by the bundle's CA.
        """
        try:
            tls_key_pem = (directory / TLS_KEY).read_bytes()
            tls_cert_pem = (directory / TLS_CERT).read_bytes()
            ca_cert_pem = (directory / CA_CERT).read_bytes()
            signing_pem = (directory / SIGNING_KEY).read_bytes()
            roster_bytes = (directory / ROSTER).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(
                f"identity bundle {directory} lacks {Path(exc.filename).name}; "
                "pass --identity with the folder 'govshare federation enrol' wrote"
            ) from None
        try:
            signing_key = serialization.load_pem_private_key(signing_pem, None)
            cert = x509.load_pem_x509_certificate(tls_cert_pem)
            ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        except ValueError:
            raise MalformedInput(f"identity bundle {directory} holds an unreadable key") from None
        if not isinstance(signing_key, ed25519.Ed25519PrivateKey):
            raise MalformedInput(f"{directory / SIGNING_KEY} is not an Ed25519 key")
        roster = Roster.verify(roster_bytes, ca_cert)
        who = CertIdentity.from_cert(cert)
        member = roster.member(who.name)
        if member.tls_fingerprint != who.fingerprint or member.role is not who.role:
            raise MalformedInput(
                f"the certificate in {directory} is not the one the roster lists for {who.name}"
            )
        public = signing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if public != member.signing_key:
            raise MalformedInput(
                f"the signing key in {directory} is not the one the roster lists for {who.name}"
            )
        return cls(
            directory=directory,
            name=who.name,
            role=who.role,
            jurisdiction=who.jurisdiction,
            tls_key_pem=tls_key_pem,
            tls_cert_pem=tls_cert_pem,
            ca_cert_pem=ca_cert_pem,
            signing_key=signing_key,
            roster=roster,
        )

    @property
    def member(self) -> Member:
        return self.roster.member(self.name)
