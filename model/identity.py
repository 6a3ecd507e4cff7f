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

An operator (role ``operator``) is a named person bound to one node, with duties there
(``govshare.model.operator_act``); the roster lists both, and only for operators.

A member is enrolled in one of two ways. ``Federation.enrol`` makes its keys on the
administrator's machine and writes the whole bundle. Or the member makes its own keys
(:func:`create_request`, ``govshare node keygen``) and hands the administrator a certificate
signing request (PKCS #10) that also carries its Ed25519 public key; ``Federation.sign_request``
checks it and returns only public files, so the private keys never leave the member. The
request proves possession of both keys: the CSR is signed by the TLS key, and the Ed25519 key
signs the TLS key's SubjectPublicKeyInfo and the member name (:data:`REQUEST_CONTEXT`). What it
cannot prove is *who* made it: the administrator compares the request's fingerprint with the
department's over another channel before signing.

A signed roster travels to nodes on other machines as a file (``govshare federation roster
--out``); :func:`install_roster` installs it into a bundle only if the bundle's own CA signed
it, it belongs to the same federation, it is not older than the roster held, and it still
lists the bundle's certificate.

Files (private keys are created 0600 and never printed):

    federation/            ca.key  ca.crt  roster.json
    <member bundle>/       tls.key tls.crt signing.key ca.crt roster.json
    <keygen home>/         tls.key signing.key <name>.csr   (until the signed files are copied in)
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from govshare.model.governance import Role
from govshare.model.operator_act import parse_duties
from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import (
    AlreadyExists,
    Conflict,
    MalformedInput,
    NotFound,
    VerificationFailed,
)
from govshare.protocols.suite import SM, STANDARD, SigningKey, Suite, VerifyKey, suite_by_name

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
ROSTER = "roster.json"
BUNDLES = "bundles.json"
TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"
SIGNING_KEY = "signing.key"
REQUEST_SUFFIX = ".csr"

# The member's public signing key travels in its CSR as a private extension under the UUID arc
# 2.25 (ITU-T X.667: an OID anyone may mint without registration). Its value is a DER OCTET
# STRING of the raw public key (Ed25519: 32 bytes; SM2: the 65-byte uncompressed point) followed
# by the suite's 64-byte signature over REQUEST_CONTEXT, the member name, a zero byte and the TLS
# key's DER SubjectPublicKeyInfo. The key's length tells the suite the member chose.
SIGNING_KEY_EXTENSION = x509.ObjectIdentifier("2.25.2239641521776467427014717858674256279")
# A federation on a suite other than the standard one signs its roster with that suite's key
# (SM2 under ``sm``), not with the CA's ECDSA P-256 key, which stays for X.509 and TLS. The
# roster key's public half is bound to the CA in the CA certificate, as a private extension
# under the same UUID arc: the suite's name, a zero byte, the raw public key. Members trust
# ca.crt (checked by its fingerprint), so they trust the roster key in it.
ROSTER_KEY_EXTENSION = x509.ObjectIdentifier("2.25.224022967085304946810465934841850645718")
ROSTER_KEY = "roster.key"
REQUEST_CONTEXT = b"govshare enrolment request v1\x00"
# A CSR is well under 2 KiB; the bound keeps a hostile file from being parsed at all.
MAX_REQUEST_BYTES = 64 * 1024
# Roster files grow by about 300 bytes a member; 16 MiB is tens of thousands of members.
MAX_ROSTER_BYTES = 16 * 1024 * 1024

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
    """Replace ``path`` with ``data`` at once; the file is 0600, as everything in a node's home
    must be (govshare.node.home_permissions), public as a roster or a certificate is."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)
    os.replace(tmp, path)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _signing_key_suite(raw: bytes) -> Suite:
    """The suite a raw public signing key is of, by its encoding (32 bytes: Ed25519; a 65-byte
    uncompressed point: SM2), or MalformedInput."""
    for suite in (STANDARD, SM):
        if len(raw) == suite.public_key_size:
            suite.verify_key(raw)
            return suite
    raise MalformedInput("the signing key is of no known crypto suite", field="signing_key")


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
    signing_key: bytes  # raw public key of the roster's suite (Ed25519 32 bytes, SM2 65)
    tls_fingerprint: str
    # Operators only (a named person, govshare.model.operator_act): the node they act for and
    # their duties there. Listed in the roster only for operators, so that the signed bytes of
    # every other member stay as they were.
    node: str = ""
    duties: tuple[str, ...] = ()
    # The roster's crypto suite (govshare.protocols.suite), which its signing key is of; set by
    # the roster, not serialised per member.
    suite: str = field(kw_only=True, compare=False)

    def verify_key(self) -> VerifyKey:
        """The member's public signing key under the roster's suite."""
        return suite_by_name(self.suite).verify_key(self.signing_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "jurisdiction": self.jurisdiction,
            "address": self.address,
            "signing_key": base64.b64encode(self.signing_key).decode(),
            "tls_fingerprint": self.tls_fingerprint,
        } | ({"node": self.node, "duties": list(self.duties)} if self.role is Role.OPERATOR else {})

    @classmethod
    def from_json(cls, raw: Any, suite: Suite) -> Member:
        try:
            key = base64.b64decode(raw["signing_key"], validate=True)
            member = cls(
                name=validate_name(raw["name"]),
                role=Role(raw["role"]),
                jurisdiction=validate_jurisdiction(raw["jurisdiction"]),
                address=str(raw["address"]),
                signing_key=key,
                tls_fingerprint=str(raw["tls_fingerprint"]),
                node=str(raw.get("node", "")),
                duties=tuple(str(d) for d in raw.get("duties", ())),
                suite=suite.name,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"roster member entry is malformed: {exc}") from None
        if member.role is Role.OPERATOR and not (member.node and member.duties):
            raise MalformedInput(f"roster operator {member.name}: no node or no duties")
        try:
            suite.verify_key(key)
        except MalformedInput:
            raise MalformedInput(
                f"roster member {member.name}: signing key is not a {suite.signature_algorithm} "
                f"key (the federation's suite is {suite.name!r})"
            ) from None
        return member


@dataclass(frozen=True)
class Roster:
    """The federation's member list at one version, as signed by the CA."""

    federation: str
    version: int
    issued_at: int
    members: tuple[Member, ...]
    # Why this version was issued, when the administrator said (a suspension: member, reason,
    # by whom); signed with the roster, listed only when present.
    note: dict[str, str] | None = None
    # The federation's crypto suite (govshare.protocols.suite.SUITE_NAMES), chosen at
    # `federation init --suite` and fixed for the federation's life.
    suite: str = field(kw_only=True)

    @property
    def crypto(self) -> Suite:
        """The suite object every member signs, hashes and encrypts with."""
        return suite_by_name(self.suite)

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
            "suite": self.suite,
            "members": [m.to_json() for m in self.members],
        } | ({"note": dict(self.note)} if self.note else {})

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def sign(
        self, ca_key: ec.EllipticCurvePrivateKey, roster_key: SigningKey | None = None
    ) -> bytes:
        """The signed-roster file: the roster and the federation's signature over its bytes —
        the CA's ECDSA signature, or, in a federation on another suite, the signature of the
        roster key its CA certificate names (:data:`ROSTER_KEY_EXTENSION`)."""
        if roster_key is not None:
            signature = roster_key.sign(self.canonical_bytes())
        else:
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
            # A roster written before suites were recorded is the standard suite's.
            suite = suite_by_name(str(raw.get("suite", STANDARD.name)))
            roster = cls(
                federation=str(raw["federation"]),
                version=int(raw["version"]),
                issued_at=int(raw["issued_at"]),
                members=tuple(Member.from_json(m, suite) for m in raw["members"]),
                note={str(k): str(v) for k, v in raw["note"].items()} if "note" in raw else None,
                suite=suite.name,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedInput(f"roster file is malformed: {exc}", field="roster") from None
        # The CA certificate, not the roster, says which key signs: a roster cannot pick the
        # weaker check by naming another suite.
        roster_key = roster_key_of(ca_cert)
        expected = STANDARD.name if roster_key is None else roster_key.suite
        if roster.suite != expected:
            raise VerificationFailed(
                f"roster names the {roster.suite!r} suite but the federation CA signs rosters "
                f"on {expected!r}"
            )
        if roster_key is not None:
            try:
                roster_key.verify(signature, roster.canonical_bytes())
            except VerificationFailed:
                raise VerificationFailed("roster signature does not verify") from None
            return roster
        public_key = ca_cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise MalformedInput("federation CA key is not ECDSA")
        try:
            public_key.verify(signature, roster.canonical_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerificationFailed("roster signature does not verify") from None
        return roster


def roster_key_of(ca_cert: x509.Certificate) -> VerifyKey | None:
    """The roster key a federation CA certificate names (None: the CA's ECDSA key signs).

    Raises:
        MalformedInput: the extension is malformed, names an unknown suite or a bad key.
    """
    try:
        value = ca_cert.extensions.get_extension_for_oid(ROSTER_KEY_EXTENSION).value
    except x509.ExtensionNotFound:
        return None
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    name, sep, public = raw.partition(b"\x00")
    if not sep:
        raise MalformedInput("the CA certificate's roster key is malformed", field="ca")
    return suite_by_name(name.decode("ascii", "replace")).verify_key(public)


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
    directory: Path, name: str, *, suite: Suite, now: dt.datetime | None = None
) -> tuple[x509.Certificate, Roster]:
    """Create the federation CA and an empty signed roster (version 1) in ``directory``, on the
    crypto ``suite`` every member will sign and hash with (fixed for the federation's life)."""
    validate_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists():
        raise AlreadyExists(f"{directory} already holds a federation CA")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    roster_key = None if suite is STANDARD else suite.generate_signing_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA"),
        ]
    )
    builder = (
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
    )
    if roster_key is not None:
        value = suite.name.encode("ascii") + b"\x00" + roster_key.public_key().raw
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ROSTER_KEY_EXTENSION, value), critical=False
        )
        _write_private(directory / ROSTER_KEY, roster_key.to_pem())
    cert = builder.sign(key, hashes.SHA256())
    _write_private(
        directory / CA_KEY,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    roster = Roster(
        federation=name, version=1, issued_at=int(now.timestamp()), members=(), suite=suite.name
    )
    _write_atomic(directory / ROSTER, roster.sign(key, roster_key))
    return cert, roster


@dataclass(frozen=True)
class Federation:
    """The administrator's view: the CA key and the current roster."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    roster: Roster
    # The roster's signing key when the federation is on a suite other than the standard one.
    roster_key: SigningKey | None = None

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
        roster_key = None
        if roster_key_of(cert) is not None:
            roster_key = roster.crypto.signing_key_from_pem((directory / ROSTER_KEY).read_bytes())
            if roster_key.public_key() != roster_key_of(cert):
                raise MalformedInput(f"{directory / ROSTER_KEY} is not the key ca.crt names")
        return cls(directory, key, cert, roster, roster_key)

    def enrol(
        self,
        *,
        role: Role | None = None,
        name: str,
        jurisdiction: str | None = None,
        address: str | None = None,
        out: Path,
        now: dt.datetime | None = None,
        validity: dt.timedelta = MEMBER_VALIDITY,
        reissue: bool = False,
        node: str | None = None,
        duties: tuple[str, ...] | None = None,
    ) -> tuple[Federation, Member]:
        """Issue a member's keys and certificate into ``out`` and re-sign the roster.

        With ``reissue`` an enrolled member gets new keys and a new certificate (a lost or
        compromised key, a yearly renewal): once the roster is published, nodes refuse the old
        certificate and signing key. A re-issue keeps the role, jurisdiction and address the
        roster lists unless they are given.

        Returns the federation with the new roster, and the new member.

        Raises:
            AlreadyExists: ``name`` is enrolled (without ``reissue``), or ``out`` holds keys.
            NotFound: ``reissue`` of a name that is not enrolled.
            MalformedInput: a bad name, jurisdiction or node address, or no role.
        """
        role, jurisdiction, address = self._admission(name, role, jurisdiction, address, reissue)
        node, duties = self._operator_binding(name, role, node, duties)
        now = now or _now()
        out.mkdir(parents=True, exist_ok=True)
        for filename in (TLS_KEY, SIGNING_KEY):
            if (out / filename).exists():
                raise AlreadyExists(f"{out / filename} exists; enrol into an empty folder")

        tls_key = ec.generate_private_key(ec.SECP256R1())
        signing_key = self.roster.crypto.generate_signing_key()
        roster, cert, member = self._issue(
            name=name,
            role=role,
            jurisdiction=jurisdiction,
            address=address,
            tls_public=tls_key.public_key(),
            signing_public=signing_key.public_key().raw,
            now=now,
            validity=validity,
            node=node,
            duties=duties,
        )
        signed = roster.sign(self.ca_key, self.roster_key)
        _write_private(out / TLS_KEY, _pem_private(tls_key))
        _write_private(out / SIGNING_KEY, signing_key.to_pem())
        self._write_public(out, cert, signed)
        return replace(self, roster=roster), member

    def sign_request(
        self,
        request: EnrolmentRequest,
        *,
        role: Role | None = None,
        jurisdiction: str | None = None,
        address: str | None = None,
        out: Path,
        now: dt.datetime | None = None,
        validity: dt.timedelta = MEMBER_VALIDITY,
        reissue: bool = False,
        node: str | None = None,
        duties: tuple[str, ...] | None = None,
    ) -> tuple[Federation, Member, x509.Certificate]:
        """Issue a certificate for the keys of a member's request and re-sign the roster.

        Writes the member's public files into ``out`` — its certificate, the CA certificate and
        the signed roster — never a private key: the member made its keys and keeps them. The
        request's name is the member's name; role and jurisdiction are the administrator's
        (as :meth:`enrol`, a re-issue keeps what the roster lists unless they are given).

        Returns the federation with the new roster, the new member and its certificate.

        Raises:
            AlreadyExists: the name is enrolled (without ``reissue``), or another member
                holds the request's signing key.
            NotFound: ``reissue`` of a name that is not enrolled.
            MalformedInput: a bad jurisdiction or node address, or no role.
        """
        name = request.name
        if request.suite is not self.roster.crypto:
            raise MalformedInput(
                f"the request's signing key is of the {request.suite.name!r} suite but federation "
                f"{self.roster.federation!r} runs on {self.roster.suite!r}; make the keys again "
                f"with 'govshare node keygen --suite {self.roster.suite}'",
                field="request",
            )
        role, jurisdiction, address = self._admission(name, role, jurisdiction, address, reissue)
        node, duties = self._operator_binding(name, role, node, duties)
        roster, cert, member = self._issue(
            name=name,
            role=role,
            jurisdiction=jurisdiction,
            address=address,
            tls_public=request.tls_public_key,
            signing_public=request.signing_key,
            now=now or _now(),
            validity=validity,
            node=node,
            duties=duties,
        )
        out.mkdir(parents=True, exist_ok=True)
        self._write_public(out, cert, roster.sign(self.ca_key, self.roster_key))
        return replace(self, roster=roster), member, cert

    def _admission(
        self,
        name: str,
        role: Role | None,
        jurisdiction: str | None,
        address: str | None,
        reissue: bool,
    ) -> tuple[Role, str, str]:
        """Check that ``name`` may be enrolled (or re-issued); fill a re-issue's unset role,
        jurisdiction and address from the roster."""
        validate_name(name)
        held = next((m for m in self.roster.members if m.name == name), None)
        if held is not None and not reissue:
            raise AlreadyExists(
                f"{name!r} is already enrolled in {self.roster.federation!r} "
                "(--reissue replaces its keys)"
            )
        if reissue and held is None:
            raise NotFound(f"{name!r} is not enrolled in {self.roster.federation!r}")
        if held is not None:
            role = role or held.role
            jurisdiction = jurisdiction or held.jurisdiction
            address = held.address if address is None and role is held.role else address
        if role is None:
            raise MalformedInput("a new member needs --role", field="role")
        if jurisdiction is None:
            raise MalformedInput("a new member needs --jurisdiction", field="jurisdiction")
        validate_jurisdiction(jurisdiction)
        address = address or ""
        if role is Role.NODE and not ADDRESS_PATTERN.match(address):
            raise MalformedInput("a node needs --address HOST:PORT", field="address")
        return role, jurisdiction, address

    def _operator_binding(
        self, name: str, role: Role, node: str | None, duties: tuple[str, ...] | None
    ) -> tuple[str, tuple[str, ...]]:
        """An operator's node and duties (a re-issue keeps the roster's unless given); nothing
        for other roles.

        Raises:
            MalformedInput: an operator without a node of the roster or without duties, or a
                node or duties given for another role.
        """
        if role is not Role.OPERATOR:
            if node or duties:
                raise MalformedInput("--node and --duties are for operators", field="node")
            return "", ()
        held = next((m for m in self.roster.members if m.name == name), None)
        if held is not None and held.role is Role.OPERATOR:
            node = node or held.node
            duties = duties or held.duties
        if not node:
            raise MalformedInput("an operator needs --node (the node they act for)", field="node")
        bound = next((m for m in self.roster.members if m.name == node), None)
        if bound is None or bound.role is not Role.NODE:
            raise MalformedInput(f"{node!r} is not a node of the roster", field="node")
        return node, parse_duties(list(duties or ()))

    def _issue(
        self,
        *,
        name: str,
        role: Role,
        jurisdiction: str,
        address: str,
        tls_public: ec.EllipticCurvePublicKey,
        signing_public: bytes,
        now: dt.datetime,
        validity: dt.timedelta,
        node: str = "",
        duties: tuple[str, ...] = (),
    ) -> tuple[Roster, x509.Certificate, Member]:
        """The member's certificate and the next roster, which lists it in place of any
        earlier certificate of the same name."""
        others = tuple(m for m in self.roster.members if m.name != name)
        for other in others:
            if other.signing_key == signing_public:
                raise AlreadyExists(f"{other.name!r} already holds this signing key")
        cert = _issue_member_cert(
            self.ca_key, self.ca_cert, tls_public, name, role, jurisdiction, now, validity
        )
        member = Member(
            name=name,
            role=role,
            jurisdiction=jurisdiction,
            address=address,
            signing_key=signing_public,
            tls_fingerprint=fingerprint(cert),
            node=node,
            duties=duties,
            suite=self.roster.suite,
        )
        roster = replace(
            self.roster,
            version=self.roster.version + 1,
            issued_at=int(now.timestamp()),
            members=(*others, member),
            note=None,
        )
        return roster, cert, member

    def _write_public(self, out: Path, cert: x509.Certificate, signed: bytes) -> None:
        _write_atomic(out / TLS_CERT, cert.public_bytes(serialization.Encoding.PEM))
        _write_atomic(out / CA_CERT, self.ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_atomic(self.directory / ROSTER, signed)
        _write_atomic(out / ROSTER, signed)
        self._remember_bundle(out)

    def _remember_bundle(self, out: Path) -> None:
        """Note where a bundle was written (``bundles.json``), for :meth:`publish_everywhere`."""
        path = self.directory / BUNDLES
        known = self.bundles()
        known.append(str(out.resolve()))
        _write_atomic(path, json.dumps(sorted(set(known)), indent=2).encode())

    def bundles(self) -> list[str]:
        """The bundle folders this federation folder wrote (enrol, sign)."""
        try:
            raw = json.loads((self.directory / BUNDLES).read_bytes())
        except FileNotFoundError:
            return []
        except ValueError:
            raise MalformedInput(f"{self.directory / BUNDLES} is not JSON") from None
        return [str(p) for p in raw] if isinstance(raw, list) else []

    def publish_everywhere(self) -> tuple[list[Path], list[Path]]:
        """Copy the current signed roster into every bundle this folder wrote that still holds
        a member certificate; returns (published, gone)."""
        published, gone = [], []
        for folder in map(Path, self.bundles()):
            if (folder / TLS_CERT).exists():
                self.publish_roster(folder)
                published.append(folder)
            else:
                gone.append(folder)
        return published, gone

    def revoke(
        self, name: str, *, now: dt.datetime | None = None, note: dict[str, str] | None = None
    ) -> Federation:
        """Remove a member from the roster and re-sign it; once published, nodes refuse it.
        ``note`` says why (a suspension's reason), signed with the roster.

        Raises:
            NotFound: no such member.
        """
        self.roster.member(name)
        roster = replace(
            self.roster,
            version=self.roster.version + 1,
            issued_at=int((now or _now()).timestamp()),
            members=tuple(m for m in self.roster.members if m.name != name),
            note=note,
        )
        _write_atomic(self.directory / ROSTER, roster.sign(self.ca_key, self.roster_key))
        return replace(self, roster=roster)

    def publish_roster(self, bundle: Path) -> None:
        """Copy the current signed roster into a member's bundle."""
        if not (bundle / TLS_CERT).exists():
            raise NotFound(f"{bundle} is not a member identity bundle")
        _write_atomic(bundle / ROSTER, (self.directory / ROSTER).read_bytes())

    def export_roster(self, path: Path) -> None:
        """Write the current signed roster to ``path``, to hand to members on other machines
        (they install it with :func:`install_roster`, which checks the CA's signature)."""
        _write_atomic(path, (self.directory / ROSTER).read_bytes())


def _issue_member_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey,
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
        .public_key(key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key)
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


# --------------------------------------------------------------------------- enrolment request


def _request_message(name: str, tls_public: ec.EllipticCurvePublicKey) -> bytes:
    spki = tls_public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return REQUEST_CONTEXT + name.encode("ascii") + b"\x00" + spki


@dataclass(frozen=True)
class EnrolmentRequest:
    """A member's certificate signing request, carrying its public signing key (module
    docstring). Holds no private key: :func:`create_request` keeps those in the member's home."""

    name: str
    csr: x509.CertificateSigningRequest
    tls_public_key: ec.EllipticCurvePublicKey
    signing_key: bytes  # raw public key of ``suite``
    suite: Suite

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the request's DER encoding: read out over another channel, it tells
        the administrator the request is the department's own."""
        return hashlib.sha256(self.csr.public_bytes(serialization.Encoding.DER)).hexdigest()

    def to_pem(self) -> bytes:
        return self.csr.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def from_pem(cls, data: bytes) -> EnrolmentRequest:
        """Parse a request and check both of its proofs of possession.

        Raises:
            MalformedInput: not a PEM CSR, a name that is not one DNS label, a TLS key that is
                not ECDSA P-256, or no govshare signing key (not made by ``node keygen``).
            VerificationFailed: the CSR's signature or the signing key's does not verify.
        """
        if len(data) > MAX_REQUEST_BYTES:
            raise MalformedInput("certificate request is too large", field="request")
        try:
            csr = x509.load_pem_x509_csr(data)
            public = csr.public_key()
            extensions = csr.extensions
        except ValueError:
            raise MalformedInput("not a PEM certificate signing request", field="request") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, ec.SECP256R1
        ):
            raise MalformedInput(
                "the request's TLS key must be ECDSA P-256 (gRPC's TLS refuses Ed25519)",
                field="request",
            )
        if not csr.is_signature_valid:
            raise VerificationFailed("certificate request signature does not verify")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or not isinstance(names[0].value, str):
            raise MalformedInput("the request's subject must carry one CN", field="request")
        name = validate_name(names[0].value)
        try:
            value = extensions.get_extension_for_oid(SIGNING_KEY_EXTENSION).value
        except x509.ExtensionNotFound:
            raise MalformedInput(
                "the request carries no govshare signing key; make it with 'govshare node keygen'",
                field="request",
            ) from None
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        body = raw[2:]
        if len(raw) < 2 or raw[:2] != bytes([0x04, len(body)]) or len(body) <= 64:
            raise MalformedInput("the request's signing key is malformed", field="request")
        key, signature = body[:-64], body[-64:]
        try:
            suite = _signing_key_suite(key)
        except MalformedInput:
            raise MalformedInput(
                "the request's signing key is malformed", field="request"
            ) from None
        try:
            suite.verify_key(key).verify(signature, _request_message(name, public))
        except VerificationFailed:
            raise VerificationFailed("the request's signing-key proof does not verify") from None
        return cls(name=name, csr=csr, tls_public_key=public, signing_key=key, suite=suite)


def create_request(home: Path, name: str, suite: Suite) -> tuple[EnrolmentRequest, Path]:
    """Make a member's TLS and ``suite`` signing keys in ``home`` (0600) and its request beside
    them (the suite is the federation's: its administrator says which).

    Writes ``tls.key``, ``signing.key`` and ``<name>.csr``; the request is what the member
    hands to the administrator (``Federation.sign_request``), the keys stay. Returns the
    request and the path of its file.

    Raises:
        MalformedInput: ``name`` is not one lower-case DNS label.
        AlreadyExists: ``home`` already holds keys (never overwritten).
    """
    validate_name(name)
    home.mkdir(parents=True, exist_ok=True)
    for filename in (TLS_KEY, SIGNING_KEY):
        if (home / filename).exists():
            raise AlreadyExists(
                f"{home / filename} exists; a home's keys are never overwritten "
                "(make new keys in an empty folder)"
            )
    tls_key = ec.generate_private_key(ec.SECP256R1())
    signing_key = suite.generate_signing_key()
    proof = signing_key.sign(_request_message(name, tls_key.public_key()))
    body = signing_key.public_key().raw + proof
    extension = x509.UnrecognizedExtension(SIGNING_KEY_EXTENSION, bytes([0x04, len(body)]) + body)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(extension, critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    _write_private(home / TLS_KEY, _pem_private(tls_key))
    _write_private(home / SIGNING_KEY, signing_key.to_pem())
    request = EnrolmentRequest.from_pem(csr.public_bytes(serialization.Encoding.PEM))
    path = home / f"{name}{REQUEST_SUFFIX}"
    _write_atomic(path, request.to_pem())
    return request, path


def install_roster(bundle: Path, data: bytes) -> tuple[Roster | None, Roster]:
    """Install a signed roster file into a member's bundle (a node's identity folder).

    Returns the roster the bundle held (None if it held none) and the one installed. A serving
    node adopts the installed roster at its next call.

    Raises:
        NotFound: ``bundle`` holds no CA certificate or member certificate.
        MalformedInput: not a roster file, another federation's, or one that does not list the
            bundle's certificate (the member was revoked or re-issued).
        VerificationFailed: the roster is not signed by the bundle's CA.
        Conflict: the roster is older than the one the bundle holds (a rollback).
    """
    if len(data) > MAX_ROSTER_BYTES:
        raise MalformedInput("roster file is too large", field="roster")
    try:
        ca_cert = _load_cert(bundle / CA_CERT)
        who = CertIdentity.from_cert(_load_cert(bundle / TLS_CERT))
    except FileNotFoundError as exc:
        raise NotFound(
            f"{bundle} lacks {Path(exc.filename).name}; install the roster into the folder "
            "holding the member's certificate"
        ) from None
    candidate = Roster.verify(data, ca_cert)
    held: Roster | None = None
    if (bundle / ROSTER).exists():
        held = Roster.verify((bundle / ROSTER).read_bytes(), ca_cert)
        if candidate.federation != held.federation:
            raise MalformedInput(
                f"roster of federation {candidate.federation!r}; {bundle} belongs to "
                f"{held.federation!r}",
                field="roster",
            )
        if candidate.version < held.version:
            raise Conflict(
                f"roster version {candidate.version} is older than version {held.version} "
                f"held in {bundle}; refusing a rollback"
            )
    listed = next((m for m in candidate.members if m.name == who.name), None)
    if listed is None or listed.tls_fingerprint != who.fingerprint:
        raise MalformedInput(
            f"roster version {candidate.version} does not list the certificate in {bundle} "
            f"for {who.name} (revoked or re-issued)",
            field="roster",
        )
    _write_atomic(bundle / ROSTER, data)
    return held, candidate


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
    signing_key: SigningKey  # of the roster's suite
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
            tls_key = serialization.load_pem_private_key(tls_key_pem, None)
            cert = x509.load_pem_x509_certificate(tls_cert_pem)
            ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        except ValueError:
            raise MalformedInput(f"identity bundle {directory} holds an unreadable key") from None
        if not isinstance(tls_key, ec.EllipticCurvePrivateKey) or tls_key.public_key() != (
            cert.public_key()
        ):
            raise MalformedInput(f"the TLS key in {directory} does not match its certificate")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise VerificationFailed(
                f"the certificate in {directory} is not issued by its federation CA"
            ) from None
        roster = Roster.verify(roster_bytes, ca_cert)
        try:
            signing_key = roster.crypto.signing_key_from_pem(signing_pem)
        except MalformedInput:
            raise MalformedInput(
                f"{directory / SIGNING_KEY} is not a {roster.crypto.signature_algorithm} key: "
                f"federation {roster.federation!r} runs on the {roster.suite!r} crypto suite"
            ) from None
        who = CertIdentity.from_cert(cert)
        member = roster.member(who.name)
        if member.tls_fingerprint != who.fingerprint or member.role is not who.role:
            raise MalformedInput(
                f"the certificate in {directory} is not the one the roster lists for {who.name}"
            )
        if signing_key.public_key().raw != member.signing_key:
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

    @classmethod
    def load_as(cls, directory: Path, role: Role) -> Identity:
        """Load a bundle that must be a ``role``'s, saying what to do when it is not made yet.

        Raises:
            NotFound: no certificate in ``directory`` (not enrolled, or a request not yet
                signed), or as :meth:`load`.
            MalformedInput: the bundle is another role's, or as :meth:`load`.
            VerificationFailed: as :meth:`load`.
        """
        if not (directory / TLS_CERT).exists():
            if (directory / TLS_KEY).exists():
                raise NotFound(
                    f"{directory} holds keys but no certificate yet: hand its request "
                    f"(*{REQUEST_SUFFIX}) to the federation administrator ('govshare federation "
                    f"sign'), copy the tls.crt, ca.crt and roster.json returned into {directory}, "
                    "then rerun"
                )
            keygen = ""
            if role is Role.NODE:
                keygen = " or 'govshare node keygen' then 'federation sign'"
            raise NotFound(
                f"{directory} holds no {role.value} identity: enrol it first ('govshare "
                f"federation enrol --role {role.value} ... --out {directory}'{keygen}), then rerun"
            )
        identity = cls.load(directory)
        if identity.role is not role:
            raise MalformedInput(
                f"{identity.name} is enrolled as {identity.role.value}, not {role.value}",
                field="identity",
            )
        return identity

    @property
    def member(self) -> Member:
        return self.roster.member(self.name)
