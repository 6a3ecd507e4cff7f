"""Conversions between govshare's domain types and their protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction

from govshare.model.crossborder import (
    Assessment,
    CatalogEntry,
    CrossBorderRecord,
    validate_destination,
)
from govshare.model.epsilon import format_epsilon, parse_epsilon
from govshare.model.governance import (
    ColumnKind,
    ColumnRule,
    DatasetInfo,
    Grade,
    Owner,
    OwnerKind,
    SharingType,
    column_scales,
)
from govshare.protocols.errors import MalformedInput
from govshare.v1 import catalog_pb2


def dataset_to_proto(
    node: str,
    info: DatasetInfo,
    *,
    crossborder: Iterable[Assessment] = (),
    ledger: tuple[Fraction, Fraction, Fraction] | None = None,
    scales: Mapping[str, int] | None = None,
) -> catalog_pb2.Dataset:
    """The catalogue entry of ``info``; ``crossborder`` are its assessments in force, of which
    only destination, reference and expiry are shown (never the basis or the signature);
    ``ledger`` the asking analyst's (spent, reserved, left) ε on it; ``scales`` the decimal
    places of its columns kept at a scale."""
    scales = scales or {}
    message = catalog_pb2.Dataset(
        node=node,
        name=info.name,
        grade=info.grade.value,
        sharing_type=info.sharing_type.value,
        legal_basis=info.legal_basis,
        owner=catalog_pb2.Owner(
            kind=info.owner.kind.value, name=info.owner.name, holder=info.owner.holder
        ),
        columns=[
            catalog_pb2.ColumnRule(
                name=c.name,
                kind=c.kind.value,
                key_type=c.key_type or "",
                domain=list(c.domain),
                mask=c.mask or "",
                scale=scales.get(c.name, 0),
            )
            for c in info.columns
        ],
        row_count=info.row_count,
        description=info.description,
        created_at=info.created_at,
        min_set_size=info.min_set_size,
        allowed_jurisdictions=list(info.allowed_jurisdictions),
        min_group_size=info.min_group_size,
        require_dp=info.require_dp,
        require_approval=info.require_approval,
        crossborder=[
            catalog_pb2.CrossBorderRecord(
                destination=a.destination, assessment=a.assessment, expires_at=a.expires_at
            )
            for a in crossborder
        ],
    )
    if ledger is not None:
        spent, reserved, left = (format_epsilon(v) for v in ledger)
        message.ledger.CopyFrom(
            catalog_pb2.EpsilonLedger(spent=spent, reserved=reserved, left=left)
        )
    return message


def dataset_from_proto(message: catalog_pb2.Dataset) -> DatasetInfo:
    """Parse a peer's catalogue entry; unknown enum values raise MalformedInput."""
    try:
        return DatasetInfo(
            name=message.name,
            grade=Grade(message.grade),
            sharing_type=SharingType(message.sharing_type),
            legal_basis=message.legal_basis,
            owner=Owner(
                kind=OwnerKind(message.owner.kind),
                name=message.owner.name,
                holder=message.owner.holder,
            ),
            columns=tuple(
                ColumnRule(
                    name=c.name,
                    kind=ColumnKind(c.kind),
                    key_type=c.key_type or None,
                    domain=tuple(c.domain),
                    mask=c.mask or None,
                )
                for c in message.columns
            ),
            row_count=message.row_count,
            description=message.description,
            created_at=message.created_at,
            min_set_size=message.min_set_size,
            allowed_jurisdictions=tuple(message.allowed_jurisdictions),
            min_group_size=message.min_group_size,
            require_dp=message.require_dp,
            require_approval=message.require_approval,
        )
    except ValueError as exc:
        raise MalformedInput(f"catalogue entry {message.name!r}: {exc}") from None


def catalog_entry_from_proto(message: catalog_pb2.Dataset) -> CatalogEntry:
    """Parse a peer's catalogue entry with its cross-border records.

    Raises:
        MalformedInput: an unknown enum value, or a record without an alpha-2 destination or
            reference.
    """
    records = []
    for record in message.crossborder:
        if not record.assessment:
            raise MalformedInput(
                f"catalogue entry {message.name!r}: a cross-border record without its reference",
                field="crossborder",
            )
        records.append(
            CrossBorderRecord(
                destination=validate_destination(record.destination),
                assessment=record.assessment,
                expires_at=record.expires_at,
            )
        )
    ledger = None
    if message.HasField("ledger"):
        entry = message.ledger
        ledger = (
            parse_epsilon(entry.spent),
            parse_epsilon(entry.reserved),
            parse_epsilon(entry.left),
        )
    scales = column_scales(
        {c.name: c.scale for c in message.columns if c.scale},
        where=f"catalogue entry {message.name!r}",
    )
    return CatalogEntry(dataset_from_proto(message), tuple(records), ledger, scales)
