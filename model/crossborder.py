"""Cross-border assessment records (数据出境安全评估) as every party reads them.

The signed record, its canonical encoding and signature check, and the catalogue's view of the
records in force. The node's store of them is ``govshare.node.policy.crossborder``, whose
docstring gives the encoding and the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

from govshare.model.governance import DatasetInfo
from govshare.model.identity import JURISDICTION_PATTERN
from govshare.protocols.canonical import canonical_json
from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import VerifyKey

DOMAIN_TAG = b"govshare/crossborder/v1\n"
ENCODING_VERSION = 1


@dataclass(frozen=True)
class Assessment:
    """A signed cross-border assessment record. ``revoked_*`` fields are local state."""

    record_id: str
    dataset: str
    destination: str
    assessment: str
    basis: str
    expires_at: int
    created_at: int
    issuer: str
    signature: bytes
    revoked_at: int | None = None
    revoked_by: str | None = None
    revoke_reason: str = ""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def in_force_at(self, now: int) -> bool:
        """Unrevoked, approved at or before ``now`` and not yet expired (expiry is exclusive).

        The signature is not checked here; see :meth:`CrossBorderStore.in_force`.
        """
        return not self.revoked and self.created_at <= now < self.expires_at

    def canonical_bytes(self) -> bytes:
        """The bytes the issuer's signature covers (see the module docstring)."""
        return canonical_bytes(self)

    def public_record(self) -> CrossBorderRecord:
        """What the catalogue shows of this record."""
        return CrossBorderRecord(self.destination, self.assessment, self.expires_at)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready view for ``--json`` output and audit entries (signature in hex)."""
        return {
            "record_id": self.record_id,
            "dataset": self.dataset,
            "destination": self.destination,
            "assessment": self.assessment,
            "basis": self.basis,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "issuer": self.issuer,
            "signature": self.signature.hex(),
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
        }


@dataclass(frozen=True)
class CrossBorderRecord:
    """The catalogue's view of an assessment in force: where to, under which reference, until."""

    destination: str
    assessment: str
    expires_at: int


@dataclass(frozen=True)
class CatalogEntry:
    """A dataset as a node's catalogue describes it: its metadata and the assessments in force.

    Kept beside :class:`DatasetInfo` rather than inside it: the records are the node's local
    state at the time of asking, not part of the dataset's registration.
    """

    info: DatasetInfo
    crossborder: tuple[CrossBorderRecord, ...] = ()
    # The asking analyst's ε on the dataset: (spent, reserved, left), when the node told it.
    ledger: tuple[Fraction, Fraction, Fraction] | None = None
    # Decimal places of its columns kept at a scale (a stored v reads v / 10^scale).
    scales: Mapping[str, int] = field(default_factory=dict)


def canonical_bytes(record: Assessment) -> bytes:
    body = {
        "v": ENCODING_VERSION,
        "record_id": record.record_id,
        "dataset": record.dataset,
        "destination": record.destination,
        "assessment": record.assessment,
        "basis": record.basis,
        "expires_at": record.expires_at,
        "created_at": record.created_at,
        "issuer": record.issuer,
    }
    return DOMAIN_TAG + canonical_json(body)


def verify_assessment(record: Assessment, public_key: VerifyKey) -> None:
    """Check the issuer's signature over the record's canonical encoding.

    Raises:
        VerificationFailed: the signature does not match (tampered record or wrong key).
    """
    try:
        public_key.verify(record.signature, canonical_bytes(record))
    except (VerificationFailed, MalformedInput):
        raise VerificationFailed() from None


def validate_destination(code: str) -> str:
    """An ISO 3166-1 alpha-2 code (``HK``, ``SG``); surrounding blanks and case are forgiven.

    Raises:
        MalformedInput: anything else (field ``destination``).
    """
    normalised = code.strip().upper() if isinstance(code, str) else ""
    if not JURISDICTION_PATTERN.match(normalised):
        raise MalformedInput(
            f"destination {code!r} must be an ISO 3166-1 alpha-2 code such as HK or SG",
            field="destination",
        )
    return normalised
