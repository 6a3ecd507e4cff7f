"""The analyst's side of a joint PSI query: sign, submit, wait for approvals, run, count, prove.

The analyst signs the plan once, submits the same signed request to both nodes, waits while a
node reports ``pending_approval`` (the operator decides), then runs both nodes' parts at once.
For cardinality the analyst counts matches between the two doubly masked, shuffled sets it
receives (``govshare.protocols.ecdh_psi``); for membership it receives the releasing node's
matching keys through their masking rule. Finally each node's ``result.released`` entry with
its inclusion proof under a signed checkpoint makes the receipt, verified here against the
roster before it is returned.

If a node refuses, is denied, or fails mid-protocol, nothing is counted and the error names
the node; partial output from the other node is discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Generic, TypeVar

from govshare.model.events import log_origin
from govshare.model.governance import QueryKind
from govshare.model.identity import Identity, Roster
from govshare.model.query_plan import PsiPlan
from govshare.model.states import APPROVED, DENIED, PENDING, REFUSED
from govshare.protocols import dp, ecdh_psi
from govshare.protocols.errors import (
    Aborted,
    Conflict,
    GovshareError,
    PolicyRefused,
    ResourceExhausted,
    Unavailable,
)
from govshare.protocols.receipt import LogKey, Receipt, make_receipt, verify_receipt
from govshare.protocols.signed_request import DEFAULT_LIFETIME_SECONDS, sign_request
from govshare.rpc.client import DEFAULT_TIMEOUT, NodeClient
from govshare.v1 import query_pb2

# Seconds to wait for operators' approvals before giving up.
DEFAULT_APPROVAL_TIMEOUT = 600.0
# Seconds between status polls while a query waits for approval.
POLL_SECONDS = 1.0
# Times a busy node is asked to take a submission, and the longest wait between two asks.
SUBMIT_ATTEMPTS = 8
MAX_SUBMIT_WAIT = 10.0
# Seconds a protocol run may take at most (both nodes' parts).
DEFAULT_RUN_TIMEOUT = 900.0

StatusCallback = Callable[[str, str, str], None]
"""``on_status(node, state, message)``: what each node says while the query waits or runs."""


@dataclass(frozen=True)
class PsiOutcome:
    """A PSI's verified outcome.

    With DP (``epsilon`` set), ``count`` is the estimate ``max(0, noisy count - shift)`` with
    ``interval`` its range at 95% confidence, and ``sizes`` are likewise estimates (each set
    carries about ``2 * shift`` dummy keys). Without, the figures are exact.
    """

    query_id: str
    kind: QueryKind
    count: int
    sizes: dict[str, int]
    records: tuple[str, ...]
    receipt: Receipt | None  # None: see receipt_error (the result stands)
    epsilon: Fraction | None = None
    interval: tuple[int, int] | None = None
    body: dict[str, Any] = field(default_factory=dict)  # the signed plan (and its SQL)
    receipt_error: str | None = None


def log_keys(roster: Roster) -> dict[str, LogKey]:
    """Every node's log origin and roster key, to verify receipts."""
    return {
        m.name: LogKey(log_origin(roster.federation, m.name), m.verify_key())
        for m in roster.members
        if m.address
    }


def signed_body(plan: dict[str, Any], sql: str | None) -> dict[str, Any]:
    """A plan's signed body, carrying the SQL it came from (when it did) for the operators
    who judge it; the nodes read the plan's own fields and ignore ``sql``."""
    return plan if sql is None else {**plan, "sql": sql}


def release_mask(identity: Identity, plan: PsiPlan, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The masking rule the releasing (left) side's catalogue gives its join key."""
    with NodeClient.to(identity, plan.left.node, timeout=timeout) as client:
        rule = client.describe_dataset(plan.left.dataset).column(plan.left.column)
    if rule is None or rule.mask is None:
        raise PolicyRefused(
            "column.join_key_release",
            f"{plan.left.label} has no masking rule, so its keys are never released",
        )
    return rule.mask


T = TypeVar("T")


@dataclass(frozen=True)
class Asked(Generic[T]):
    """A query every node ran: each node's output and the verified receipt.

    The nodes have released ``outputs`` (and spent the budget) before the receipt is asked
    for, so a receipt that cannot be fetched or does not verify never costs the result:
    ``receipt`` is then None and ``receipt_error`` says why."""

    query_id: str
    outputs: dict[str, T]
    receipt: Receipt | None
    receipt_error: str | None = None


def ask(
    identity: Identity,
    *,
    kind: str,
    body: Any,
    nodes: Sequence[str],
    run: Callable[[NodeClient, str], T],
    prepare: Callable[[dict[str, NodeClient], str], None] | None = None,
    on_status: StatusCallback | None = None,
    running: str = "running",
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
    lifetime: int = DEFAULT_LIFETIME_SECONDS,
    poll: float = POLL_SECONDS,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> Asked[T]:
    """The analyst's side of any joint query.

    Signs ``body`` once, submits the signed request to every node, waits while any node holds
    it for approval, calls ``prepare`` (if given) then ``run`` on every node at once, and
    collects each node's receipt part into a receipt verified against the roster.
    ``call_timeout`` is the deadline of each call but the run (submit, status, prepare,
    cancel, receipt): past it the node counts as unreachable.

    Raises:
        PermissionDenied: a node refused (the message names the node and the rule).
        Aborted: a node was denied approval, approval timed out, or a run failed.
        Unavailable: a node could not be reached.

    A receipt part that cannot be fetched or does not verify is not raised: the outputs are
    returned with ``receipt_error`` saying what went wrong.
    """
    report = on_status or (lambda node, state, message: None)
    request = sign_request(
        identity.signing_key,
        analyst=identity.name,
        kind=kind,
        body=body,
        now=int(time.time()),
        lifetime=lifetime,
    )
    query_id = request.query_id_hex
    signed = request.encode()
    clients = {n: NodeClient.to(identity, n, timeout=call_timeout) for n in nodes}
    try:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            submitted = {n: pool.submit(_submit, clients[n], signed) for n in nodes}
            statuses = _collect(
                submitted, withdraw=lambda admitted: _withdraw(clients, query_id, admitted)
            )
        for node, status in statuses.items():
            report(node, status.state, status.message)
        try:
            _await_approval(clients, query_id, statuses, report, approval_timeout, poll)
        except (GovshareError, KeyboardInterrupt):
            # Refused or denied elsewhere, timed out, or abandoned (Ctrl-C): withdrawn
            # everywhere, so no operator is left a query to approve that will never run.
            _withdraw(clients, query_id, list(nodes))
            raise
        if prepare is not None:
            prepare(clients, query_id)
        for node in nodes:
            report(node, "running", running)
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            futures = {n: pool.submit(run, clients[n], query_id) for n in nodes}
            # A node whose part fails (a refusal on the data, RESOURCE_EXHAUSTED) ends the
            # query: the others are told at once rather than left waiting for its set.
            wait(futures.values(), return_when=FIRST_EXCEPTION)
            failed = [n for n, f in futures.items() if f.done() and f.exception() is not None]
            if failed:
                _withdraw(clients, query_id, [n for n in nodes if n not in failed])
            outputs = _collect(futures)
        receipt, problem = _receipt(clients, query_id, nodes, identity)
    finally:
        for client in clients.values():
            client.close()
    for node in nodes:
        report(node, "done", "result released")
    return Asked(query_id, outputs, receipt, problem)


def _receipt(
    clients: Mapping[str, NodeClient], query_id: str, nodes: Sequence[str], identity: Identity
) -> tuple[Receipt | None, str | None]:
    """Each node's receipt part, made into a receipt verified against the roster; or None and
    what went wrong (a node unreachable after it released, a part that does not verify)."""
    parts = []
    for node in nodes:
        try:
            part = clients[node].receipt(query_id)
        except GovshareError as exc:
            return None, f"node {node} gave no receipt: {exc}"
        parts.append((part.node, part.entry, part.index, list(part.proof), part.checkpoint))
    try:
        receipt = make_receipt(query_id, parts)
        verify_receipt(receipt, log_keys(identity.roster))
    except GovshareError as exc:
        return None, f"the receipt does not verify: {exc}"
    return receipt, None


def _submit(client: NodeClient, signed: bytes) -> query_pb2.QueryStatus:
    """Submit to one node, waiting out its retry hint while it is busy taking submissions.

    A node refuses a submission beyond its intake before it looks at the request (nothing
    stored, the nonce unused), so the same signed request may be sent again."""
    for _ in range(SUBMIT_ATTEMPTS - 1):
        try:
            return client.submit(signed)
        except ResourceExhausted as exc:
            time.sleep(min(exc.retry_after, MAX_SUBMIT_WAIT))
    return client.submit(signed)


def _collect(
    futures: Mapping[str, Future[T]], *, withdraw: Callable[[list[str]], None] | None = None
) -> dict[str, T]:
    """Every node's output; if any failed, the error that says why: a node's refusal rather
    than the others' "ended the query" that it caused. ``withdraw`` is first told the nodes
    that did answer (at submission: they hold a reservation for a query that will not run)."""
    outputs: dict[str, T] = {}
    errors: list[Exception] = []
    for node, future in futures.items():
        try:
            outputs[node] = future.result()
        except GovshareError as exc:
            errors.append(exc)
    if errors:
        if withdraw is not None:
            withdraw(list(outputs))
        # The cause first: a node's refusal or capacity limit, not what it caused elsewhere
        # (another node's "withdrew", "ended the query" or a state conflict).
        causes = [e for e in errors if isinstance(e, PolicyRefused | ResourceExhausted)]
        refusals = [e for e in errors if not isinstance(e, Aborted | Unavailable | Conflict)]
        raise (causes or refusals or errors)[0]
    return outputs


def _withdraw(clients: Mapping[str, NodeClient], query_id: str, nodes: Sequence[str]) -> None:
    """Withdraw a query that will not run (or not finish) from ``nodes``, so they return its
    reservation and a running part stops waiting; best effort (a node that already ended it,
    or cannot be reached, keeps its own record, and releases the reservation when the signed
    request expires)."""
    for node in nodes:
        try:
            clients[node].cancel(query_id)
        except GovshareError:
            continue


def run_psi(
    identity: Identity,
    plan: PsiPlan,
    *,
    on_status: StatusCallback | None = None,
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    lifetime: int = DEFAULT_LIFETIME_SECONDS,
    poll: float = POLL_SECONDS,
    sql: str | None = None,
    call_timeout: float = DEFAULT_TIMEOUT,
) -> PsiOutcome:
    """Ask a PSI query of its two nodes and return the verified outcome.

    ``sql``: the statement the plan came from, signed with it so that operators see it.
    ``call_timeout``: the deadline of each call to a node but the run (:func:`ask`).

    Raises: as :func:`ask`.
    """
    if plan.kind is QueryKind.PSI_MEMBERSHIP and plan.recipient is None and plan.mask is None:
        plan = replace(plan, mask=release_mask(identity, plan, timeout=call_timeout))
    nodes = plan.nodes
    body = signed_body(plan.to_json(), sql)
    asked = ask(
        identity,
        kind=plan.kind.value,
        body=body,
        nodes=nodes,
        run=lambda client, query_id: client.run(query_id, timeout=run_timeout),
        on_status=on_status,
        running="masking and exchanging sets",
        approval_timeout=approval_timeout,
        lifetime=lifetime,
        poll=poll,
        call_timeout=call_timeout,
    )
    query_id, outputs, receipt = asked.query_id, asked.outputs, asked.receipt
    sets = {n: [c.points for c in outputs[n]] for n in nodes}
    points = {n: ecdh_psi.decode_points(b"".join(sets[n]), max_points=2**31) for n in nodes}
    records = tuple(r for n in nodes for c in outputs[n] for r in c.records)
    interval: tuple[int, int] | None = None
    if plan.kind is QueryKind.PSI_CARDINALITY:
        count = ecdh_psi.count_matches(points[plan.left.node], points[plan.right.node])
        # Each node hands over the *other* node's set, masked twice.
        left, right = plan.left.node, plan.right.node
        sizes = {left: len(points[right]), right: len(points[left])}
        if plan.epsilon is not None:
            estimate = ecdh_psi.dp_cardinality_estimate(count, epsilon=plan.epsilon)
            count, interval = max(estimate.estimate, 0), (estimate.low, estimate.high)
            # Each set also carries the shared and its private dummies: 2t on average.
            sizes = {n: max(size - 2 * estimate.shift, 0) for n, size in sizes.items()}
    elif plan.recipient is not None:
        count = sum(c.matched for n in nodes for c in outputs[n])  # the recipient kept which
        if plan.epsilon is not None:
            scale = dp.laplace_scale(epsilon=plan.epsilon, sensitivity=1)
            half = dp.laplace_interval(scale)
            count, interval = max(count, 0), (max(count - half, 0), count + half)
        sizes = {}
    else:
        count = len(records)
        sizes = {}
    return PsiOutcome(
        query_id, plan.kind, count, sizes, records, receipt, plan.epsilon, interval, body,
        asked.receipt_error,
    )  # fmt: skip


def _await_approval(
    clients: dict[str, NodeClient],
    query_id: str,
    statuses: dict[str, query_pb2.QueryStatus],
    report: StatusCallback,
    timeout: float,
    poll: float,
) -> None:
    deadline = time.monotonic() + timeout
    states = {n: s.state for n, s in statuses.items()}
    while True:
        for node, state in states.items():
            if state in (DENIED, REFUSED):
                message, rule = statuses[node].message, statuses[node].rule
                if state == REFUSED:
                    raise PolicyRefused(rule, f"node {node}: {message}")
                raise Aborted(f"node {node}: the operator denied the query: {message}")
        if all(state == APPROVED for state in states.values()):
            return
        if time.monotonic() > deadline:
            waiting = ", ".join(n for n, s in states.items() if s == PENDING)
            raise Aborted(f"approval timed out after {timeout:g} s waiting for {waiting}")
        time.sleep(poll)
        for node, state in list(states.items()):
            if state == PENDING:
                try:
                    status = clients[node].status(query_id)
                except Unavailable:
                    continue
                statuses[node] = status
                if status.state != state:
                    report(node, status.state, status.message)
                states[node] = status.state
