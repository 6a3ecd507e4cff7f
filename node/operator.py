"""The operator's façade: a node home opened for the commands its department operator runs.

``govshare dataset|grant|crossborder|approvals|node`` reach the node's stores only through
:class:`Operator` (``tests/test_layers.py`` holds the CLI to it): each method opens the stores it
needs, and the audit log when it writes, and closes them before it returns, so a command works
while the node serves (the stores are SQLite files shared with the serving process).

Every write is an act of a named operator: the façade is built with that person's ``signer``
(``govshare.model.operator_act``; the CLI makes it from ``--identity``), has the act signed
over the exact parameters it performs, and checks it against the roster and the person's duties
(``govshare.node.policy.operator_acts``) before it touches a store. An act without a valid
operator identity is refused, and the refusal logged. The log names the person as the actor of
every entry the act writes; grants and assessment records are still signed with the node's key,
which also signs the log's checkpoints.

The types the operations return are re-exported here, so that the CLI can name them without
importing a store module.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

from govshare.model.crossborder import Assessment
from govshare.model.digests import digests_for
from govshare.model.governance import (
    ColumnRule,
    DatasetInfo,
    Grade,
    Owner,
    OwnerKind,
    Role,
    SharingType,
)
from govshare.model.identity import Identity
from govshare.model.operator_act import Duty, NoSigner
from govshare.node.audit.auditlog import AuditLog
from govshare.node.config import NodeConfig, write_default
from govshare.node.data.at_rest import AtRest, open_at_rest
from govshare.node.data.catalog import (
    Catalogue,
    DatasetRecord,
    Destruction,
    ImportReport,
    Restatement,
    dataset_to_json,
    record_to_json,
)
from govshare.node.data.column_format import ColumnFormat, NullPolicy
from govshare.node.data.source_file import ProgressCallback, SourceFormat
from govshare.node.data.sources import LiveSource, parse_source
from govshare.node.policy import approvals
from govshare.node.policy.alerts import LoggedAlert, Suspension, SuspensionStore, logged_alerts
from govshare.node.policy.applications import PENDING as APPLICATION_PENDING
from govshare.node.policy.applications import Application, ApplicationStore
from govshare.node.policy.applications import check_reason as check_application_reason
from govshare.node.policy.approvals import Party, PendingQuery, QueryDetails
from govshare.node.policy.controls import WHOLE_NODE, ControlStore, Freeze, check_reason
from govshare.node.policy.crossborder import CrossBorderStore
from govshare.node.policy.decision import (
    GRANT_EXPIRED,
    GRANT_REVOKED,
    GrantUsage,
    grant_standing,
)
from govshare.node.policy.grants import Grant, GrantStore
from govshare.node.policy.operator_acts import Signer, authorise
from govshare.node.stores.query_store import QueryRecord, QueryStore, ledger_view
from govshare.protocols.errors import Conflict, NotFound

__all__ = [
    "GRANT_EXPIRED",
    "GRANT_REVOKED",
    "Application",
    "Assessment",
    "ColumnFormat",
    "DatasetRecord",
    "Destruction",
    "Freeze",
    "Grant",
    "GrantUsage",
    "ImportReport",
    "LiveSource",
    "LoggedAlert",
    "NullPolicy",
    "Operator",
    "Party",
    "PendingQuery",
    "ProgressCallback",
    "QueryDetails",
    "QueryRecord",
    "Restatement",
    "SourceFormat",
    "Suspension",
    "dataset_to_json",
    "initialise",
    "parse_source",
    "record_to_json",
]


def initialise(home: Path, *, listen: str, identity: str = ".") -> tuple[str, Path]:
    """Write the node's ``node.toml`` with documented defaults and create its stores.

    The node's identity bundle (``identity``, relative to ``home``) is checked first, so a
    home not yet enrolled is left as it was; and the config is removed again if the stores
    cannot be made, so that a rerun starts afresh. Returns the node's name and the config's
    path.
    """
    # The whole node (its query kinds, HE libraries) loads only here: the façade's other
    # methods read the stores, and the CLI commands that call them start without it.
    from govshare.node.node import Node

    Identity.load_as(home / identity, Role.NODE)
    path = write_default(home, listen=listen, identity=identity)
    try:
        node = Node.from_home(home)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        return node.name, path
    finally:
        node.close()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _origin(csv_file: Path | LiveSource) -> dict[str, str]:
    """What an act registering a dataset names as where its rows come from."""
    if isinstance(csv_file, Path):
        return {"file": csv_file.name, "sha256": _file_digest(csv_file)}
    return {"source": csv_file.describe()}


def _rules_json(columns: Sequence[ColumnRule]) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "kind": c.kind.value, "key_type": c.key_type, "domain": list(c.domain),
         "mask": c.mask}
        for c in columns
    ]  # fmt: skip


class Operator:
    """A node home, opened for its operator (see the module docstring).

    ``signer`` signs the person's acts (None, or a :class:`NoSigner` saying why there is none:
    every write is then refused and the refusal logged); reads need no signer.
    """

    def __init__(
        self,
        home: Path,
        *,
        signer: Signer | NoSigner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = NodeConfig.load(home)
        self._signer = signer
        self._clock = clock

    @contextmanager
    def _acting(
        self, log: AuditLog, action: str, duty: Duty, body: Mapping[str, Any]
    ) -> Iterator[str]:
        """Have the person sign ``action`` over ``body`` and check it, then yield their name to
        act as; once the block succeeds, log the act (``operator.act``).

        Raises:
            PolicyRefused: no valid operator identity, or not the duty (logged).
        """
        me = self.identity()
        verified = authorise(
            self._signer, node=me.name, action=action, duty=duty.value, body=body,
            roster=me.roster, audit=log, nonces=self.config.database_path,
            now=int(self._clock()),
        )  # fmt: skip
        yield verified.operator
        verified.record(log)

    @property
    def home(self) -> Path:
        return self.config.home

    def identity(self) -> Identity:
        """The node's identity bundle (its name, signing key and roster)."""
        return Identity.load(self.config.identity_dir)

    def _at_rest(self) -> AtRest:
        """The node's data key with its federation's suite, what rows and results are sealed
        under (govshare.node.data.at_rest; a home without a key gets one)."""
        return open_at_rest(
            self.config.home, self.config.database_path, self.identity().roster.crypto
        )

    def _audit_log(self) -> AuditLog:
        """The node's audit log, on its federation's suite."""
        return AuditLog.open(self.config.audit_database_path, suite=self.identity().roster.crypto)

    # ------------------------------------------------------------------------ datasets

    def add_dataset(
        self,
        csv_file: Path | LiveSource,
        *,
        name: str,
        grade: Grade,
        sharing_type: SharingType,
        legal_basis: str,
        owner_kind: OwnerKind,
        owner: str,
        holder: str | None,
        columns: Sequence[ColumnRule],
        description: str,
        skip_invalid: bool,
        allowed_jurisdictions: Sequence[str],
        min_group_size: int,
        min_set_size: int,
        require_dp: bool,
        require_approval: bool,
        formats: Mapping[str, ColumnFormat] | None = None,
        source: SourceFormat | None = None,
        check: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        """Register ``csv_file`` as a dataset held by this node (``holder`` default: the node),
        or a live table or view (``csv_file`` a :class:`LiveSource`; nothing is copied).

        With ``check`` nothing is written or logged: the store is read read-only and the audit
        log is not opened.
        """
        me = self.identity()
        path = self.config.database_path
        catalogue = Catalogue.read_only(path) if check else Catalogue(path, at_rest=self._at_rest())
        actor = ""

        def add(audit: AuditLog | None) -> ImportReport:
            return catalogue.add(
                csv_file,
                name=name,
                grade=grade,
                sharing_type=sharing_type,
                legal_basis=legal_basis,
                owner=Owner(owner_kind, owner, holder or me.name),
                columns=columns,
                description=description,
                skip_invalid=skip_invalid,
                actor=actor,
                audit=audit,
                allowed_jurisdictions=allowed_jurisdictions,
                min_group_size=min_group_size,
                min_set_size=min_set_size,
                require_dp=require_dp,
                require_approval=require_approval,
                formats=formats,
                source=source,
                check=check,
                progress=progress,
            )

        if check:
            return add(None)
        body = {
            "dataset": name, **_origin(csv_file),
            "grade": grade.value, "sharing_type": sharing_type.value, "legal_basis": legal_basis,
            "owner_kind": owner_kind.value, "owner": owner, "holder": holder or me.name,
            "columns": _rules_json(columns),
        }  # fmt: skip
        with self._audit_log() as log:
            with self._acting(log, "dataset.add", Duty.REGISTER, body) as actor:
                return add(log)

    def replace_dataset(
        self,
        csv_file: Path,
        *,
        name: str,
        stated: Restatement,
        source: SourceFormat | None,
        skip_invalid: bool,
        check: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        """Refresh a dataset's rows as its next version; its registration and grants stay.

        With ``check`` nothing is written or logged (as :meth:`add_dataset`).
        """
        if check:
            return Catalogue.read_only(self.config.database_path).replace(
                csv_file, name=name, stated=stated, source=source, skip_invalid=skip_invalid,
                actor="", audit=None, check=True, progress=progress,
            )  # fmt: skip
        catalogue = Catalogue(self.config.database_path, at_rest=self._at_rest())
        body = {"dataset": name, "file": csv_file.name, "sha256": _file_digest(csv_file)}
        with self._audit_log() as log:
            with self._acting(log, "dataset.replace", Duty.REGISTER, body) as actor:
                return catalogue.replace(
                    csv_file, name=name, stated=stated, source=source, skip_invalid=skip_invalid,
                    actor=actor, audit=log, progress=progress,
                )  # fmt: skip

    def datasets(self) -> list[DatasetInfo]:
        return Catalogue(self.config.database_path).list()

    def dataset(self, name: str) -> DatasetInfo:
        return Catalogue(self.config.database_path).get(name)

    def dataset_records(self) -> list[DatasetRecord]:
        """Every dataset with its column formats, version and source file."""
        return Catalogue(self.config.database_path).records()

    def dataset_record(self, name: str) -> DatasetRecord:
        return Catalogue(self.config.database_path).record(name)

    def remove_dataset(self, name: str) -> Destruction:
        """Remove a dataset and destroy its rows (overwritten, key shredded, logged)."""
        catalogue = Catalogue(self.config.database_path, at_rest=self._at_rest())
        with self._audit_log() as log:
            with self._acting(log, "dataset.remove", Duty.REGISTER, {"dataset": name}) as actor:
                return catalogue.destroy(name, actor=actor, audit=log)

    # ------------------------------------------------------------------------ grants

    def issue_grant(
        self,
        *,
        dataset: str,
        grantee: str,
        purpose: str,
        columns: Sequence[str],
        query_kinds: Sequence[str],
        expires_at: int,
        epsilon: str,
        max_queries: int,
    ) -> Grant:
        """Sign and store a grant with the node's key; the grantee must be a roster member."""
        me = self.identity()
        me.roster.member(grantee)
        info = Catalogue(self.config.database_path).get(dataset)
        body = {
            "dataset": dataset, "grantee": grantee, "purpose": purpose,
            "columns": sorted(set(columns)), "query_kinds": sorted(set(query_kinds)),
            "expires_at": expires_at, "epsilon": epsilon, "max_queries": max_queries,
        }  # fmt: skip
        with self._audit_log() as log:
            with self._acting(log, "grant.add", Duty.GRANT, body) as actor:
                return GrantStore(self.config.database_path).issue(
                    me.signing_key,
                    issuer=me.name,
                    dataset=info,
                    grantee=grantee,
                    purpose=purpose,
                    columns=columns,
                    query_kinds=query_kinds,
                    expires_at=expires_at,
                    epsilon=epsilon,
                    max_queries=max_queries,
                    actor=actor,
                    audit=log,
                    granted_by=actor,
                )

    def grants(
        self, *, grantee: str | None, dataset: str | None, include_revoked: bool
    ) -> list[tuple[Grant, GrantUsage]]:
        """The grants, each with what it has used (the node's reservations)."""
        path = self.config.database_path
        grants = GrantStore(path).list(
            grantee=grantee, dataset=dataset, include_revoked=include_revoked
        )
        queries = QueryStore(path)
        try:
            return [(g, _usage(queries, g)) for g in grants]
        finally:
            queries.close()

    def grant(self, grant_id: str) -> tuple[Grant, GrantUsage]:
        path = self.config.database_path
        grant = GrantStore(path).get(grant_id)
        queries = QueryStore(path)
        try:
            return grant, _usage(queries, grant)
        finally:
            queries.close()

    def standing(self, grants: Sequence[Grant]) -> dict[str, tuple[str, str] | None]:
        """Grant id -> (rule, why) of a grant no longer in force (revoked, expired, or void
        because its dataset was removed or registered again since), None while in force."""
        registered = {d.name: d for d in self.datasets()}
        now = int(time.time())
        return {g.grant_id: grant_standing(g, registered.get(g.dataset), now=now) for g in grants}

    def ledgers(self, dataset: str | None) -> list[tuple[str, str, Fraction, Fraction, Fraction]]:
        """Each analyst's ε on each dataset over all its grants: (analyst, dataset, spent,
        reserved, left)."""
        path = self.config.database_path
        store, grants = QueryStore(path), GrantStore(path)
        now = int(time.time())
        try:
            return [
                (
                    analyst,
                    name,
                    *ledger_view(store, grants.list(dataset=name), analyst, name, now=now),
                )
                for analyst, name, _ in store.ledger(dataset)
            ]
        finally:
            store.close()

    def revoke_grant(self, grant_id: str, *, reason: str) -> Grant:
        body = {"grant_id": grant_id, "reason": reason}
        with self._audit_log() as log:
            with self._acting(log, "grant.revoke", Duty.GRANT, body) as actor:
                return GrantStore(self.config.database_path).revoke(
                    grant_id, actor=actor, audit=log, reason=reason
                )

    # ------------------------------------------------------------------------ cross-border

    def approve_assessment(
        self, *, dataset: str, destination: str, assessment: str, basis: str, expires_at: int
    ) -> tuple[Assessment, DatasetInfo]:
        """Sign and store a cross-border assessment record; also returns the dataset."""
        me = self.identity()
        info = Catalogue(self.config.database_path).get(dataset)
        body = {
            "dataset": dataset, "destination": destination, "assessment": assessment,
            "basis": basis, "expires_at": expires_at,
        }  # fmt: skip
        with self._audit_log() as log:
            with self._acting(log, "crossborder.approve", Duty.CROSSBORDER, body) as actor:
                record = CrossBorderStore(self.config.database_path).approve(
                    me.signing_key,
                    issuer=me.name,
                    dataset=info,
                    destination=destination,
                    assessment=assessment,
                    basis=basis,
                    expires_at=expires_at,
                    actor=actor,
                    audit=log,
                    home_jurisdiction=me.jurisdiction,
                )
        return record, info

    def assessments(self, dataset: str | None) -> list[Assessment]:
        return CrossBorderStore(self.config.database_path).list(dataset)

    def revoke_assessment(self, record_id: str, *, reason: str) -> Assessment:
        body = {"record_id": record_id, "reason": reason}
        with self._audit_log() as log:
            with self._acting(log, "crossborder.revoke", Duty.CROSSBORDER, body) as actor:
                return CrossBorderStore(self.config.database_path).revoke(
                    record_id, actor=actor, reason=reason, audit=log
                )

    # ------------------------------------------------------------------------ approvals

    def pending(self) -> list[PendingQuery]:
        store = QueryStore(self.config.database_path)
        try:
            return approvals.pending(store, suite=self.identity().roster.crypto)
        finally:
            store.close()

    def query_details(self, query_id: str) -> QueryDetails:
        """What a query asks, from the signed request this node holds (a unique id prefix
        will do)."""
        store = QueryStore(self.config.database_path)
        try:
            return approvals.details(store, query_id, suite=self.identity().roster.crypto)
        finally:
            store.close()

    def decide(self, query_id: str, *, approve: bool, reason: str) -> QueryRecord:
        """Approve or deny a pending query (a unique id prefix will do); the decision is
        logged."""
        store = QueryStore(self.config.database_path)
        try:
            full_id = store.resolve(query_id)
            suite = self.identity().roster.crypto
            body = {
                "query_id": full_id,
                "request_digest": digests_for(suite).request_digest(store.get(full_id).request),
                "reason": reason,
            }
            action = "approval.approve" if approve else "approval.deny"
            duties = self._duties(store.get(full_id))
            with self._audit_log() as audit:
                with self._acting(audit, action, Duty.APPROVE, body) as operator:
                    return approvals.decide(
                        store, audit, full_id, approve=approve, operator=operator,
                        reason=reason, duties=duties, suite=suite,
                    )  # fmt: skip
        finally:
            store.close()

    def _duties(self, record: QueryRecord) -> approvals.Duties:
        """The separation of duties for approving ``record`` (``govshare.node.policy
        .approvals``): the dataset's grade, who issued the query's grant, approvers required."""
        path = self.config.database_path
        try:
            important = Catalogue(path).get(record.dataset).grade is Grade.IMPORTANT
        except NotFound:
            important = False
        issuer = ""
        if record.grant_id:
            try:
                issuer = GrantStore(path).get(record.grant_id).granted_by
            except NotFound:
                issuer = ""
        required = ControlStore(path).approvers(record.dataset)
        return approvals.Duties(important, issuer, required, path)

    def set_approvers(self, dataset: str, count: int) -> None:
        """Require ``count`` different operators to approve each query on ``dataset``."""
        Catalogue(self.config.database_path).get(dataset)
        body = {"dataset": dataset, "approvers": count}
        with self._audit_log() as log:
            with self._acting(log, "dataset.approvers", Duty.REGISTER, body) as actor:
                ControlStore(self.config.database_path).set_approvers(
                    dataset, count, actor=actor, audit=log
                )

    def approvers(self, dataset: str) -> int:
        return ControlStore(self.config.database_path).approvers(dataset)

    # ------------------------------------------------------------------------ applications

    def applications(self, *, state: str | None = None) -> list[Application]:
        """Access applications received here (``state``: pending, approved, refused)."""
        return ApplicationStore(self.config.database_path).list(state=state)

    def application(self, request_id: str) -> Application:
        return ApplicationStore(self.config.database_path).get(request_id)

    def approve_application(
        self, request_id: str, *, epsilon: str, expires_at: int, max_queries: int
    ) -> tuple[Application, Grant]:
        """Issue the grant an application asked for (the node's key signs it; the person is
        its ``granted_by``) and record the answer; one signed act of duty ``grant``."""
        store = ApplicationStore(self.config.database_path)
        asked = store.get(request_id)
        if asked.state != APPLICATION_PENDING:
            raise Conflict(
                f"application {asked.request_id} was {asked.state} by {asked.answered_by}; it "
                "cannot be answered again"
            )
        me = self.identity()
        info = Catalogue(self.config.database_path).get(asked.dataset)
        body = {
            "request_id": asked.request_id, "epsilon": epsilon, "expires_at": expires_at,
            "max_queries": max_queries,
        }  # fmt: skip
        with self._audit_log() as log:
            with self._acting(log, "application.approve", Duty.GRANT, body) as actor:
                grant = GrantStore(self.config.database_path).issue(
                    me.signing_key, issuer=me.name, dataset=info, grantee=asked.applicant,
                    purpose=asked.purpose, columns=asked.columns, query_kinds=asked.query_kinds,
                    expires_at=expires_at, epsilon=epsilon, max_queries=max_queries,
                    actor=actor, audit=log, granted_by=actor,
                )  # fmt: skip
                answered = store.answer(
                    asked.request_id, approve=True, person=actor, reason="",
                    grant_id=grant.grant_id, audit=log, now=int(self._clock()),
                )  # fmt: skip
        return answered, grant

    def refuse_application(self, request_id: str, *, reason: str) -> Application:
        """Refuse an application; a reason is required (told to the analyst, logged)."""
        reason = check_application_reason(reason)
        store = ApplicationStore(self.config.database_path)
        asked = store.get(request_id)
        body = {"request_id": asked.request_id, "reason": reason}
        with self._audit_log() as log:
            with self._acting(log, "application.refuse", Duty.GRANT, body) as actor:
                return store.answer(
                    asked.request_id, approve=False, person=actor, reason=reason, grant_id="",
                    audit=log, now=int(self._clock()),
                )  # fmt: skip

    # ------------------------------------------------------------------------ incidents

    def freezes(self) -> list[Freeze]:
        """The freezes in force: the node's, and each dataset's."""
        return ControlStore(self.config.database_path).freezes()

    def freeze(self, dataset: str | None, *, reason: str) -> tuple[Freeze, list[str]]:
        """Freeze the node (``dataset`` None) or one dataset: every query on it is refused
        (rule ``node.frozen`` / ``dataset.frozen``), those waiting too. Returns the freeze and
        the queries it stopped."""
        if dataset is not None:
            Catalogue(self.config.database_path).get(dataset)
        check_reason(reason)
        scope = WHOLE_NODE if dataset is None else dataset
        action = "node.freeze" if dataset is None else "dataset.freeze"
        body = {"scope": scope, "reason": reason}
        store = QueryStore(self.config.database_path)
        try:
            with self._audit_log() as log:
                with self._acting(log, action, Duty.INCIDENT, body) as actor:
                    return ControlStore(self.config.database_path).freeze(
                        scope, reason=reason, actor=actor, audit=log, queries=store,
                        node=self.identity().name, now=int(self._clock()),
                    )  # fmt: skip
        finally:
            store.close()

    def unfreeze(self, dataset: str | None, *, reason: str) -> Freeze:
        """Lift the node's freeze (``dataset`` None) or one dataset's."""
        check_reason(reason)
        scope = WHOLE_NODE if dataset is None else dataset
        action = "node.unfreeze" if dataset is None else "dataset.unfreeze"
        body = {"scope": scope, "reason": reason}
        with self._audit_log() as log:
            with self._acting(log, action, Duty.INCIDENT, body) as actor:
                return ControlStore(self.config.database_path).unfreeze(
                    scope, reason=reason, actor=actor, audit=log
                )

    # ------------------------------------------------------------------------ the node's own

    def matches(self, query_id: str) -> list[str]:
        """This node's own keys that matched a membership query it received."""
        store = QueryStore(self.config.database_path, at_rest=self._at_rest())
        try:
            return store.matches(store.resolve(query_id))
        finally:
            store.close()

    def alerts(self) -> tuple[list[LoggedAlert], list[Suspension]]:
        """The node's risk alerts (its ``risk.alert`` entries) and the analysts suspended here."""
        with self._audit_log() as audit:
            found = list(logged_alerts(audit))
        store = SuspensionStore(self.config.database_path)
        try:
            return found, store.list()
        finally:
            store.close()

    def clear_suspension(self, analyst: str, *, reason: str) -> tuple[Suspension, str]:
        """Lift an analyst's suspension (logged as ``risk.cleared``); also returns the actor."""
        store = SuspensionStore(self.config.database_path)
        body = {"analyst": analyst, "reason": reason}
        try:
            with self._audit_log() as audit:
                with self._acting(audit, "alerts.clear", Duty.INCIDENT, body) as operator:
                    held = store.clear(
                        analyst, operator=operator, reason=reason, audit=audit, now=int(time.time())
                    )
        finally:
            store.close()
        return held, operator


def _usage(store: QueryStore, grant: Grant) -> GrantUsage:
    return store.usage(grant.grantee).get(grant.grant_id, GrantUsage())
