"""Joint aggregates under HE over real mTLS nodes: exact figures, DP, budgets, refusals, aborts."""

from __future__ import annotations

import csv
import inspect
import random
import sqlite3
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AMOUNT_BOUND,
    CIVIL_COLUMNS,
    EXACT,
    PURPOSE,
    TAX_COLUMNS,
    FederationFixture,
    assert_ended_cleanly,
    build_federation,
    grant,
    intersection_plan,
    register,
    served,
)

from govshare.client.analyst import StatusCallback
from govshare.client.analyst_aggregate import run_horizontal_aggregate, run_intersection_aggregate
from govshare.client.auditor import Auditor
from govshare.examples import synth
from govshare.model.aggregate_plan import (
    BFV,
    BFV_SIMD,
    MAX_ROWS_PER_KEY,
    PAILLIER,
    Figures,
    GroupSpec,
    HorizontalPlan,
    IntersectionPlan,
    Part,
    SumSpec,
)
from govshare.model.conditions import Condition
from govshare.model.governance import Grade, QueryKind
from govshare.model.query_plan import Side
from govshare.model.states import PENDING
from govshare.node.node import Node
from govshare.node.policy import approvals
from govshare.node.queries.kinds import aggregate as aggregate_kind
from govshare.node.queries.kinds.aggregate import (
    AggregateEngine,
    AggregateOptions,
    _figures,
    _KeyValues,
)
from govshare.node.queries.session import Send
from govshare.protocols import bfv_simd, dp
from govshare.protocols.bfv_simd import SimdPublic, SimdSecretKeys
from govshare.protocols.errors import Aborted, MalformedInput, PermissionDenied, PolicyRefused
from govshare.protocols.paillier import generate_keypair
from govshare.protocols.receipt import verify_receipt
from govshare.protocols.signed_request import sign_request
from govshare.rpc.client import NodeClient

KEY_BITS = 1024  # small test keys (two plaintexts per row here); one test runs 3072
VISITS_BOUND = 100
# Seconds a node waits for its peer. Generous on purpose: a 3072-bit step is tens of seconds
# of work on one worker, and a loaded CI machine stretches it; only the dropout test, which
# waits for a peer that never comes, sets a short one.
TIMEOUT = 600.0
KINDS = [QueryKind.INTERSECTION_AGGREGATE, QueryKind.HORIZONTAL_AGGREGATE]
HEALTH_COLUMNS = (
    "id_number=join_key:resident_id",
    "district=group_key:domain={districts}",
    "age_band=group_key:domain=" + "|".join(synth.AGE_BANDS),
    "year=plaintext",
    "visits=aggregate",
)


@dataclass
class Agg:
    fed: FederationFixture
    nodes: dict[str, Node]
    manifest: dict[str, Any]
    visits: dict[str, tuple[int, int]]  # age band -> (count, sum) over all parts
    data: Path


def set_options(
    node: Node, options: AggregateOptions, timeout: float = TIMEOUT, send: Send | None = None
) -> None:
    """Rebuild a test node's aggregate engine with other test-only switches."""
    node.aggregates = AggregateEngine(
        queries=node.queries, identity=node.identity, catalogue=node.catalogue,
        grants=node.grants, store=node.query_store, audit=node.audit,
        send=send or node.send, executor=node.executor, protocol_timeout=timeout,
        options=options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agg]:
    fed = build_federation(tmp_path_factory.mktemp("aggfed"), "aggfed")
    data = tmp_path_factory.mktemp("aggdata")
    # 12,000 rows: enough that at least three districts of civil's 2025 rows joined to tax's high
    # band reach k = 5 (nine do), and that all years' amounts exceed one 24-bit SIMD plaintext
    # modulus (SIMD_PLANS); every query here encrypts each of civil's rows it reads.
    manifest = synth.generate(data, size=12000, seed=3)
    names = ("tax", "civil", "ghost")
    with served(fed, names, protocol_timeout=TIMEOUT) as nodes:
        tax, civil = nodes["tax"], nodes["civil"]
        register(tax, data / f"{synth.TAX}.csv", name="residents", columns=TAX_COLUMNS)
        register(civil, data / f"{synth.CIVIL}.csv", name="assistance", columns=CIVIL_COLUMNS)
        grant(tax, "residents", "alice", ["id_number", "income_band", "year"], KINDS)
        grant(
            civil, "assistance", "alice",
            ["id_number", "year", "district", "amount", "assistance_type"], KINDS,
        )  # fmt: skip
        register(
            civil, data / f"{synth.CIVIL}.csv", name="assistance_imp", columns=CIVIL_COLUMNS,
            grade=Grade.IMPORTANT,
        )  # fmt: skip
        grant(civil, "assistance_imp", "alice", ["id_number", "year", "district", "amount"], KINDS)
        # The health dataset cut in three same-schema parts, one per node.
        with open(data / f"{synth.HEALTH}.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], rows[1:]
        visits: dict[str, tuple[int, int]] = {}
        for row in body:
            band, value = row[header.index("age_band")], int(row[header.index("visits")])
            count, total = visits.get(band, (0, 0))
            visits[band] = (count + 1, total + value)
        for i, name in enumerate(names):
            part = data / f"visits_{name}.csv"
            with open(part, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                writer.writerows(body[i :: len(names)])
            register(nodes[name], part, name="visits", columns=HEALTH_COLUMNS)
            grant(nodes[name], "visits", "alice", ["age_band", "visits"], KINDS)
        yield Agg(fed, nodes, manifest, visits, data)


def district_plan(
    epsilon: Fraction | None = Fraction(1), dataset: str = "assistance"
) -> IntersectionPlan:
    """civil's 2025 amounts per district over the residents tax's high band holds."""
    return intersection_plan(
        dataset, matcher_where=(Condition("income_band", "=", "high"),), epsilon=epsilon
    )


def visits_plan(epsilon: Fraction | None = Fraction(1), scheme: str = PAILLIER) -> HorizontalPlan:
    return HorizontalPlan(
        QueryKind.HORIZONTAL_AGGREGATE,
        PURPOSE,
        parts=tuple(Part(n, "visits") for n in ("tax", "civil", "ghost")),
        figures=Figures(
            GroupSpec("age_band", synth.AGE_BANDS), (SumSpec("visits", VISITS_BOUND),), epsilon
        ),
        aggregator="civil",
        scheme=scheme,
        public_key=b"",
    )


def approve_when_pending(agg: Agg) -> StatusCallback:
    """An on_status callback: each node's operator approves what waits for approval."""

    def on_status(node: str, state: str, message: str) -> None:
        if state == PENDING:
            store, suite = agg.nodes[node].query_store, agg.nodes[node].identity.roster.crypto
            for waiting in approvals.pending(store, suite=suite):
                approvals.decide(
                    store, agg.nodes[node].audit, waiting.record.query_id, approve=True,
                    operator=f"operator:{node}", reason="checked: exact total for a review",
                    suite=suite,
                )  # fmt: skip

    return on_status


def expected_districts(agg: Agg) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = agg.manifest["aggregates"][
        "civil_current_year_join_tax_high_by_district"
    ]["groups"]
    assert agg.manifest["year"] == 2025
    return groups


def test_intersection_aggregate_is_exact_without_noise(agg: Agg) -> None:
    outcome = run_intersection_aggregate(
        agg.fed.identity("alice"), district_plan(Fraction(1)), key_bits=KEY_BITS,
        unsafe_allow_short_modulus=True,
    )  # fmt: skip
    expected = expected_districts(agg)
    k = outcome.min_group_size
    assert k == 5
    reconciled = Auditor(agg.fed.identity("audra"), agg.data / "audit").show_query(outcome.query_id)
    assert reconciled.ok, reconciled.disagreements
    for group in outcome.groups:
        want = expected[group.label]
        if want["count"] < k:
            assert group.suppressed and group.count.value is None
            continue
        assert group.count.value == want["count"]
        assert group.sums["amount"].value == want["sum_amount"]
        assert group.averages["amount"] == Fraction(want["sum_amount"], want["count"])
        assert group.count.noise_scale == 2  # ε = 1 split over count and one sum
        assert group.sums["amount"].noise_scale == 2 * AMOUNT_BOUND
        assert group.count.interval == dp.laplace_interval(Fraction(2))
    assert sum(not g.suppressed for g in outcome.groups) >= 3
    assert set(outcome.budgets) == {"civil", "tax"}
    assert all(b.epsilon_spent == 1 for b in outcome.budgets.values())
    assert outcome.receipt is not None
    verified = verify_receipt(outcome.receipt, _log_keys(agg))
    assert all(p.entry.kind == "result.released" for p in verified)
    tax_log = [e.decode() for e in agg.nodes["tax"].audit.entries_for_query(outcome.query_id)]
    steps = [e.fields["phase"] for e in tax_log if e.kind == "protocol.step"]
    assert steps == ["matcher_keys", "matcher_again", "values"]
    released = next(e for e in reversed(tax_log) if e.kind == "result.released")
    assert released.kind == "result.released" and released.fields["recipient"] == "alice"


def _log_keys(agg: Agg) -> Any:
    from govshare.client.analyst import log_keys

    return log_keys(agg.fed.federation.roster)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_intersection_aggregate_at_3072_bits_matches_plain_sql_over_the_csvs(agg: Agg) -> None:
    kind = "extreme_poverty"
    base = district_plan()
    values = Side(
        "civil", "assistance", "id_number",
        (Condition("year", "=", 2025), Condition("assistance_type", "=", kind)),
    )  # fmt: skip
    # An exact release (no GROUP BY): it runs only once both operators approve it.
    plan = IntersectionPlan(
        base.kind, base.purpose, values, base.matcher,
        Figures(None, base.figures.sums, None, exact=True), b"",
    )  # fmt: skip
    outcome = run_intersection_aggregate(
        agg.fed.identity("alice"), plan, on_status=approve_when_pending(agg), poll=0.05
    )  # 3072 bits
    high = {r["id_number"].upper() for r in _csv(agg.data / f"{synth.TAX}.csv")
            if r["income_band"] == "high"}  # fmt: skip
    rows = [
        r for r in _csv(agg.data / f"{synth.CIVIL}.csv")
        if r["year"] == "2025" and r["assistance_type"] == kind and r["id_number"].upper() in high
    ]  # fmt: skip
    (group,) = outcome.groups
    assert group.count.value == len(rows) > 0
    assert group.sums["amount"].value == sum(int(r["amount"]) for r in rows)
    assert group.count.noise_scale is None and outcome.epsilon is None
    for node in ("tax", "civil"):
        kinds = [e.decode().kind for e in agg.nodes[node].audit.entries_for_query(outcome.query_id)]
        assert "approval.granted" in kinds and "result.released" in kinds


@pytest.mark.parametrize("scheme", [PAILLIER, BFV])
def test_horizontal_aggregate_is_exact_and_masks_cancel(agg: Agg, scheme: str) -> None:
    outcome = run_horizontal_aggregate(
        agg.fed.identity("alice"), visits_plan(Fraction(1), scheme), key_bits=KEY_BITS,
        unsafe_allow_short_modulus=True,
    )  # fmt: skip
    assert outcome.scheme == scheme
    reconciled = Auditor(agg.fed.identity("audra"), agg.data / f"audit-{scheme}").show_query(
        outcome.query_id
    )
    assert reconciled.ok, reconciled.disagreements  # every hand-off logged on both sides
    for group in outcome.groups:
        count, total = agg.visits.get(group.label, (0, 0))
        if count < outcome.min_group_size:
            assert group.suppressed
            continue
        assert (group.count.value, group.sums["visits"].value) == (count, total)
    assert set(outcome.budgets) == {"tax", "civil", "ghost"}
    civil_log = [e.decode() for e in agg.nodes["civil"].audit.entries_for_query(outcome.query_id)]
    received = [
        e for e in civil_log if e.kind == "protocol.step" and e.fields["direction"] == "received"
    ]
    assert len(received) == 2  # the two other nodes' contributions
    for name in ("tax", "ghost"):
        log = [e.decode() for e in agg.nodes[name].audit.entries_for_query(outcome.query_id)]
        released = [e for e in log if e.kind == "result.released"]
        assert [e.fields["recipient"] for e in released] == ["civil"]


def test_noisy_release_within_its_stated_interval_and_seeded_coverage(agg: Agg) -> None:
    for node in agg.nodes.values():
        set_options(node, AggregateOptions(unsafe_allow_short_modulus=True))
    try:
        outcome = run_horizontal_aggregate(
            agg.fed.identity("alice"), visits_plan(Fraction(2)), key_bits=KEY_BITS,
            unsafe_allow_short_modulus=True,
        )  # fmt: skip
    finally:
        for node in agg.nodes.values():
            set_options(node, EXACT)
    bound = dp.laplace_tail_bound(Fraction(VISITS_BOUND), failure_bits=30)
    for group in outcome.groups:
        count, _ = agg.visits.get(group.label, (0, 0))
        if group.count.value is not None:
            assert abs(group.count.value - count) <= bound
            assert group.count.interval == dp.laplace_interval(Fraction(1))
    # Coverage: the stated 95% interval holds the noise the engine adds (seeded, 2000 draws).
    rng = random.Random(7)
    scales = visits_plan(Fraction(2)).figures.noise_scales()
    for scale in scales.values():
        half = dp.laplace_interval(scale)
        inside = sum(abs(dp.discrete_laplace(scale, rng)) <= half for _ in range(2000))
        assert inside / 2000 >= 0.93


def test_budget_exhaustion_is_refused_and_logged(agg: Agg) -> None:
    civil = agg.nodes["civil"]
    civil.grants.issue(
        civil.identity.signing_key, issuer="civil", dataset=civil.catalogue.get("visits"),
        grantee="hkana", purpose=PURPOSE, columns=["age_band", "visits"], query_kinds=KINDS,
        expires_at=int(time.time()) + 3600, epsilon=Fraction(1), max_queries=10,
        actor="operator:civil", audit=civil.audit,
    )  # fmt: skip
    for name in ("tax", "ghost"):
        grant(agg.nodes[name], "visits", "hkana", ["age_band", "visits"], KINDS)
    hkana = agg.fed.identity("hkana")
    plan = visits_plan(Fraction("0.6"))
    first = run_horizontal_aggregate(
        hkana, plan, key_bits=KEY_BITS, unsafe_allow_short_modulus=True
    )
    assert first.budgets["civil"].epsilon_remaining == Fraction("0.4")
    before = civil.audit.size
    with pytest.raises(PolicyRefused) as refused:
        run_horizontal_aggregate(hkana, plan, key_bits=KEY_BITS, unsafe_allow_short_modulus=True)
    assert refused.value.rule == "grant.budget"
    decisions = [
        e.decode() for e in civil.audit.entries(before, civil.audit.size)
        if e.decode().kind == "policy.decision"
    ]  # fmt: skip
    assert decisions[-1].fields["rule"] == "grant.budget"


def _signed(agg: Agg, plan: IntersectionPlan | HorizontalPlan) -> tuple[str, bytes]:
    alice = agg.fed.identity("alice")
    request = sign_request(
        alice.signing_key, analyst="alice", kind=plan.kind.value, body=plan.to_json(),
        now=int(time.time()),
    )  # fmt: skip
    return request.query_id_hex, request.encode()


def _keyed(plan: IntersectionPlan, bits: int = KEY_BITS) -> IntersectionPlan:
    public, _ = generate_keypair(bits, unsafe_allow_short_modulus=True)
    return IntersectionPlan(
        plan.kind, plan.purpose, plan.values, plan.matcher, plan.figures, public.to_bytes()
    )


def test_important_dataset_requires_dp_and_approval(agg: Agg) -> None:
    alice = agg.fed.identity("alice")
    with NodeClient.to(alice, "civil") as client:
        _, signed = _signed(agg, _keyed(district_plan(None, "assistance_imp")))
        with pytest.raises(PolicyRefused) as refused:
            client.submit(signed)
        assert refused.value.rule == "grade.important.requires_dp"
        _, signed = _signed(agg, _keyed(district_plan(Fraction(1), "assistance_imp")))
        assert client.submit(signed).state == "pending_approval"


def test_foreign_and_wrong_size_keys_are_refused(agg: Agg) -> None:
    alice = agg.fed.identity("alice")
    plan = _keyed(district_plan())
    garbage = IntersectionPlan(
        plan.kind, plan.purpose, plan.values, plan.matcher, plan.figures, b"GSPK" + bytes(40)
    )
    with NodeClient.to(alice, "tax") as client:
        with pytest.raises(MalformedInput):
            client.submit(_signed(agg, garbage)[1])
        set_options(agg.nodes["tax"], AggregateOptions())  # production: no short keys
        try:
            with pytest.raises(MalformedInput, match="outside"):
                client.submit(_signed(agg, plan)[1])
        finally:
            set_options(agg.nodes["tax"], EXACT)


def test_tampered_ciphertexts_are_refused_and_a_dropout_aborts(agg: Agg) -> None:
    alice = agg.fed.identity("alice")
    plan = _keyed(district_plan())
    query_id, signed = _signed(agg, plan)
    set_options(agg.nodes["tax"], EXACT, timeout=2.0)  # before submit: the session lives there
    clients = {n: NodeClient.to(alice, n) for n in ("tax", "civil")}
    for client in clients.values():
        assert client.submit(signed).state == "approved"
    point = bytes.fromhex("09" + "00" * 31)
    with NodeClient.to(agg.fed.identity("civil"), "tax") as peer:
        with pytest.raises(MalformedInput, match="bytes"):
            peer.deliver(query_id, "values:0:1", [point], [b"\x01" * 10])
    with NodeClient.to(agg.fed.identity("civil"), "tax") as peer:
        with pytest.raises(MalformedInput, match=r"\[1, n\^2\)|unit"):
            peer.deliver(query_id, "values:0:1", [point], [b"\xff" * 512])
    with NodeClient.to(agg.fed.identity("ghost"), "tax") as peer:
        with pytest.raises(PermissionDenied):
            peer.deliver(query_id, "matcher_again", [point], [])
    # civil never runs its part: tax waits for the values, aborts, releases nothing.
    try:
        with pytest.raises(Aborted, match="nothing released"):
            clients["tax"].aggregate_run(query_id, timeout=30)
    finally:
        set_options(agg.nodes["tax"], EXACT)
    entries = [e.decode() for e in agg.nodes["tax"].audit.entries_for_query(query_id)]
    kinds = [e.kind for e in entries]
    assert "result.released" not in kinds and kinds[-2:] == ["query.failed", "budget.settled"]
    assert agg.nodes["tax"].query_store.reservation(query_id) == "returned"
    assert clients["tax"].status(query_id).state == "failed"
    for client in clients.values():
        client.close()


# Small batches and a window of two: the 2025 rows of civil make well over a hundred batches
# (under bfv-simd, one ciphertext of keys a batch: eight).
STREAMED = replace(EXACT, stream_batch_keys=16, simd_stream_batch_keys=16, stream_window=2)


def test_stream_keeps_at_most_its_window_of_batches_in_flight(agg: Agg) -> None:
    for name in ("tax", "civil"):
        set_options(agg.nodes[name], STREAMED)
    try:
        outcome = run_intersection_aggregate(
            agg.fed.identity("alice"), district_plan(Fraction(1)), key_bits=KEY_BITS,
            unsafe_allow_short_modulus=True,
        )  # fmt: skip
        sent = agg.nodes["civil"].aggregates.streams[outcome.query_id]
        taken = agg.nodes["tax"].aggregates.streams[outcome.query_id]
    finally:
        for name in ("tax", "civil"):
            set_options(agg.nodes[name], EXACT)
    expected = expected_districts(agg)
    shown = [g for g in outcome.groups if not g.suppressed]
    assert len(shown) >= 3
    for group in shown:
        assert group.count.value == expected[group.label]["count"]
        assert group.sums["amount"].value == expected[group.label]["sum_amount"]
    assert sent.batches == taken.batches >= 50 * STREAMED.stream_window
    # The value holder filled its window (the pool encrypted ahead) and never went beyond it;
    # the matcher's queue, which holds back the value holder's sends, never held more.
    assert sent.window == taken.window == 2
    assert sent.peak_in_flight == 2
    assert 1 <= taken.peak_in_flight <= 2


def _simd_keyed(plan: IntersectionPlan) -> tuple[IntersectionPlan, SimdSecretKeys]:
    simd = replace(plan, scheme=BFV_SIMD)
    secret = SimdSecretKeys(simd.simd_shape())
    return replace(simd, public_key=secret.fingerprint()), secret


def _part_in_thread(
    client: NodeClient, query_id: str, bundle: bytes
) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``client``'s node's part of ``query_id`` in a started thread; what it raised is
    appended to the list."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            client.aggregate_run(query_id, public_context=bundle, timeout=TIMEOUT)
        except Exception as error:
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failures


@pytest.mark.parametrize("scheme", [PAILLIER, BFV_SIMD])
def test_value_holder_falling_silent_mid_stream_aborts_with_nothing_released(
    agg: Agg, scheme: str
) -> None:
    alice = agg.fed.identity("alice")
    bundle = b""
    if scheme == BFV_SIMD:
        plan, secret = _simd_keyed(district_plan())
        bundle = secret.public_bundle()
    else:
        plan = _keyed(district_plan())
    query_id, signed = _signed(agg, plan)
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    release = threading.Event()
    batches: list[str] = []

    def silent_after_three(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase.startswith("values:"):
            # Past the single messages, every wait of tax is one batch's: make it short.
            tax.aggregates.protocol_timeout = 2.0
            batches.append(phase)
            if len(batches) > 3:  # the node hangs mid-stream, then its connection drops
                release.wait(TIMEOUT)
                raise ConnectionError("value holder gone")
        civil.send(peer, qid, phase, points, items)

    set_options(civil, STREAMED, send=silent_after_three)
    set_options(tax, STREAMED)
    clients = {n: NodeClient.to(alice, n) for n in ("tax", "civil")}
    try:
        for client in clients.values():
            assert client.submit(signed).state == "approved"
        thread, failures = _part_in_thread(clients["civil"], query_id, bundle)
        with pytest.raises(Aborted, match=r"values batch 3 within 2 s; .*nothing released"):
            clients["tax"].aggregate_run(query_id, public_context=bundle, timeout=TIMEOUT)
        release.set()
        thread.join()
    finally:
        release.set()
        for name in ("tax", "civil"):
            set_options(agg.nodes[name], EXACT)
    assert len(failures) == 1 and isinstance(failures[0], Aborted)
    assert batches[:4] == [f"values:{i}:{batches[0].split(':')[2]}" for i in range(4)]
    for node in (tax, civil):
        kinds = [e.decode().kind for e in node.audit.entries_for_query(query_id)]
        assert "result.released" not in kinds and "query.failed" in kinds
        assert node.query_store.reservation(query_id) == "returned"
    assert clients["tax"].status(query_id).state == "failed"
    assert _side_threads("civil") == []  # its answer to tax's keys ended with the part
    for client in clients.values():
        client.close()


def _bad_ciphertexts(shape: Any, secret: SimdSecretKeys) -> tuple[list[bytes], dict[str, bytes]]:
    """Fresh ciphertexts of one key under the query's keys (one per modulus), and bad ones in
    place of the first: tampered in SEAL's header, under another parameter set, truncated."""
    good = SimdPublic.from_bundle(shape, secret.public_bundle(), galois=False)
    fresh = good.encrypt_keys([[1] * shape.cells])
    tampered = bytearray(fresh[0])
    tampered[9] ^= 0x55  # the SEAL header's size
    foreign_shape = bfv_simd.SimdShape(shape.cells, shape.moduli + 1)
    foreign = SimdPublic.from_bundle(
        foreign_shape, SimdSecretKeys(foreign_shape).public_bundle(), galois=False
    ).encrypt_keys([[1] * shape.cells])
    wrong_parameters = next(
        c for c, t in zip(foreign, foreign_shape.plain_moduli, strict=True)
        if t not in shape.plain_moduli
    )  # fmt: skip
    bad = {"tampered": bytes(tampered), "foreign": wrong_parameters, "truncated": fresh[0][:-40]}
    return fresh, bad


def test_bfv_simd_matcher_refuses_tampered_or_foreign_ciphertexts_in_the_stream(
    agg: Agg, two_sums: Path
) -> None:
    """With the groups on the matcher's side the value holder streams BFV ciphertexts: the
    matcher refuses bad ones as they arrive."""
    alice = agg.fed.identity("alice")
    plan, secret = _simd_keyed(_two_sum_plan("matcher", "income_band", ("low", "middle", "high")))
    assert not plan.sums_at_values
    query_id, signed = _signed(agg, plan)
    set_options(agg.nodes["tax"], EXACT, timeout=5.0)  # before submit: the session lives there
    clients = {n: NodeClient.to(alice, n) for n in ("tax", "civil")}
    for client in clients.values():
        assert client.submit(signed).state == "approved"
    shape = plan.simd_shape()
    outcome: list[BaseException] = []

    def run_tax() -> None:
        try:
            clients["tax"].aggregate_run(
                query_id, public_context=secret.public_bundle(), timeout=TIMEOUT
            )
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run_tax)
    thread.start()
    try:
        # tax loads the keys before it sends its masked keys to civil; then it takes values.
        civil_session = agg.nodes["civil"].aggregates._session(query_id)
        assert civil_session.mailbox.inboxes["matcher_keys"].done.wait(TIMEOUT)
        point = bytes.fromhex("09" + "00" * 31)
        fresh, bad = _bad_ciphertexts(shape, secret)
        with NodeClient.to(agg.fed.identity("civil"), "tax") as peer:
            for item in bad.values():
                with pytest.raises(MalformedInput, match="BFV ciphertext"):
                    peer.deliver(query_id, "values:0:1", [point], [item, *fresh[1:]])
            with pytest.raises(MalformedInput, match="one ciphertext per modulus"):
                peer.deliver(query_id, "values:0:1", [point], fresh[:1])
        thread.join()  # civil never answers: tax gives up, nothing released
    finally:
        set_options(agg.nodes["tax"], EXACT)
    assert len(outcome) == 1 and isinstance(outcome[0], Aborted)
    kinds = [e.decode().kind for e in agg.nodes["tax"].audit.entries_for_query(query_id)]
    assert "result.released" not in kinds and "query.failed" in kinds
    # Keys other than the ones the signed plan names: refused before anything is read.
    query_id, signed = _signed(agg, plan)
    for client in clients.values():
        assert client.submit(signed).state == "approved"
    other = SimdSecretKeys(shape).public_bundle()
    with pytest.raises(MalformedInput, match="not the ones the signed plan names"):
        clients["civil"].aggregate_run(query_id, public_context=other, timeout=TIMEOUT)
    assert clients["civil"].status(query_id).state == "failed"
    for client in clients.values():
        client.close()


def test_bfv_simd_value_holder_refuses_a_bad_selection_and_takes_the_good_one(agg: Agg) -> None:
    """Sums at the value holder: a matcher patched to send tampered, foreign or truncated
    selection ciphertexts first is refused each time with a precise error; nothing of them is
    kept, so its good selection that follows is summed and the figures are exact."""
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    plan = district_plan(Fraction(1))
    assert replace(plan, scheme=BFV_SIMD).sums_at_values
    refusals: dict[str, BaseException] = {}
    shape = replace(plan, scheme=BFV_SIMD).simd_shape()
    _, bad = _bad_ciphertexts(shape, SimdSecretKeys(shape))  # the same parameters, other keys
    stream_items: list[int] = []

    def hostile(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase.startswith("selection:0:"):
            variants = {name: [item, *items[1:]] for name, item in bad.items()}
            variants["half a position"] = list(items[:-1])
            variants["with points"] = list(items)
            for name, batch in variants.items():
                extra = [bytes.fromhex("09" + "00" * 31)] if name == "with points" else []
                try:
                    tax.send(peer, qid, phase, extra, batch)
                except MalformedInput as error:
                    refusals[name] = error
        tax.send(peer, qid, phase, points, items)

    def counting(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase.startswith("values:"):
            stream_items.append(len(items))
        civil.send(peer, qid, phase, points, items)

    set_options(tax, EXACT, send=hostile)
    set_options(civil, EXACT, send=counting)
    try:
        outcome = run_intersection_aggregate(agg.fed.identity("alice"), plan, scheme=BFV_SIMD)
    finally:
        for name in ("tax", "civil"):
            set_options(agg.nodes[name], EXACT)
    assert sorted(refusals) == sorted([*bad, "half a position", "with points"])
    for name in bad:
        assert "BFV ciphertext" in str(refusals[name])
    assert "whole positions" in str(refusals["half a position"])
    assert "carries no points" in str(refusals["with points"])
    assert all(str(e).startswith("node civil:") for e in refusals.values())
    assert stream_items and set(stream_items) == {0}  # civil's values never left it
    expected = expected_districts(agg)
    shown = [g for g in outcome.groups if not g.suppressed]
    assert len(shown) >= 3
    for group in shown:
        assert group.count.value == expected[group.label]["count"]
        assert group.sums["amount"].value == expected[group.label]["sum_amount"]
    # civil released the sums to alice, tax its selection to civil.
    released = {
        n: [e.decode() for e in agg.nodes[n].audit.entries_for_query(outcome.query_id)]
        for n in ("tax", "civil")
    }
    recipients = {
        n: [e.fields["recipient"] for e in entries if e.kind == "result.released"]
        for n, entries in released.items()
    }
    assert recipients == {"tax": ["civil"], "civil": ["alice"]}
    reconciled = Auditor(agg.fed.identity("audra"), agg.data / "audit").show_query(outcome.query_id)
    assert reconciled.ok, reconciled.disagreements


def test_matcher_falling_silent_mid_selection_aborts_with_nothing_released(agg: Agg) -> None:
    """Sums at the value holder: the matcher announces two selection batches, sends one and
    hangs; the value holder gives up on the second within its timeout and releases nothing."""
    plan, secret = _simd_keyed(district_plan())
    assert plan.sums_at_values
    query_id, signed = _signed(agg, plan)
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    release = threading.Event()
    sent: list[str] = []

    def silent_after_one(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase.startswith("selection:"):
            civil.aggregates.protocol_timeout = 2.0  # civil's wait for the next batch
            sent.append(phase)
            tax.send(peer, qid, "selection:0:2", points, items)
            release.wait(TIMEOUT)
            raise ConnectionError("matcher gone")
        tax.send(peer, qid, phase, points, items)

    failures = _civil_fails_beside_patched_tax(
        agg, query_id, signed, secret.public_bundle(), silent_after_one,
        Aborted, r"selection batch 1 within 2 s; .*nothing released", release=release,
    )  # fmt: skip
    assert sent == ["selection:0:1"]
    assert_ended_cleanly(tax, query_id, None, errors=failures, reservation="returned")
    assert_ended_cleanly(
        civil, query_id, "did not send selection batch 1 within 2 s", reservation="returned"
    )


def _civil_fails_beside_patched_tax(
    agg: Agg, query_id: str, signed: bytes, bundle: bytes, send: Send,
    error: type[Exception], match: str, *, release: threading.Event | None = None,
) -> list[BaseException]:  # fmt: skip
    """Submit ``query_id`` to both nodes and run it with tax's sends patched to ``send``: tax's
    part in a thread, civil's here, which must raise ``error`` found by ``match``. Returns
    what tax's part raised. ``release``, set once civil failed, frees a send that holds."""
    alice = agg.fed.identity("alice")
    set_options(agg.nodes["tax"], EXACT, send=send)
    set_options(agg.nodes["civil"], EXACT)
    clients = {n: NodeClient.to(alice, n) for n in ("tax", "civil")}
    try:
        for client in clients.values():
            assert client.submit(signed).state == "approved"
        thread, failures = _part_in_thread(clients["tax"], query_id, bundle)
        with pytest.raises(error, match=match):
            clients["civil"].aggregate_run(query_id, public_context=bundle, timeout=TIMEOUT)
        if release is not None:
            release.set()
        thread.join()
    finally:
        if release is not None:
            release.set()
        for name in ("tax", "civil"):
            set_options(agg.nodes[name], EXACT)
        for client in clients.values():
            client.close()
    return failures


def _side_threads(node: str) -> list[threading.Thread]:
    """The threads a part runs beside its own (the value holder answering the matcher's keys
    while it reads), joined: each must end with its query's part (within the generous TIMEOUT,
    never by a sleep)."""
    threads = [t for t in threading.enumerate() if t.name == f"govshare-{node}-answer"]
    for thread in threads:
        thread.join(TIMEOUT)
    return [t for t in threads if t.is_alive()]


@pytest.mark.parametrize("groups", ["values", "matcher"])
def test_value_holder_refuses_a_small_order_point_among_the_matchers_keys(
    agg: Agg, two_sums: Path, groups: str
) -> None:
    """A matcher patched to slip a small-order point into its masked keys (the last of them,
    so the refusal names it): the value holder, which answers the keys beside its read of
    its rows, refuses the query with that point named; nothing is released on either side,
    the budget comes back, and the answering thread ends with the part."""
    base = (
        district_plan()
        if groups == "values"
        else _two_sum_plan("matcher", "income_band", ("low", "middle", "high"))
    )
    plan, secret = _simd_keyed(base)
    query_id, signed = _signed(agg, plan)
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    slipped: list[int] = []

    def hostile(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase == "matcher_keys":
            points = [*points[:-1], bytes(32)]  # u = 0: X25519 gives all zeros
            slipped.append(len(points) - 1)
        tax.send(peer, qid, phase, points, items)

    failures = _civil_fails_beside_patched_tax(
        agg, query_id, signed, secret.public_bundle(), hostile,
        MalformedInput, r"point \d+ has small order",
    )  # fmt: skip
    assert len(slipped) == 1
    assert_ended_cleanly(
        civil, query_id, f"point {slipped[0]} has small order", reservation="returned"
    )
    assert_ended_cleanly(tax, query_id, None, errors=failures, reservation="returned")
    assert _side_threads("civil") == []


def test_bfv_simd_selection_of_the_wrong_size_or_values_with_ciphertexts_are_refused(
    agg: Agg,
) -> None:
    """A matcher patched to add a position to its selection fails the query at the value
    holder; a value holder patched to stream ciphertexts beside its points under sums at the
    value holder is refused by the matcher."""
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    plan = district_plan(Fraction(1))
    moduli = replace(plan, scheme=BFV_SIMD).simd_shape().moduli

    def longer(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase.startswith("selection:"):
            items = [*items, *items[:moduli]]  # one position more than civil's keys fill
        tax.send(peer, qid, phase, points, items)

    refused: list[BaseException] = []

    def leaking(
        peer: str, qid: str, phase: str, points: Sequence[bytes], items: Sequence[bytes]
    ) -> None:
        if phase.startswith("values:"):
            try:
                civil.send(peer, qid, phase, points, [b"\x00" * 64] * max(len(points), 1))
            except MalformedInput as error:
                refused.append(error)
        civil.send(peer, qid, phase, points, items)

    for node, send in ((tax, longer), (civil, leaking)):
        set_options(node, EXACT, send=send)
        try:
            if node is tax:
                with pytest.raises(MalformedInput, match=r"selection has more than \d+ ciphert"):
                    run_intersection_aggregate(agg.fed.identity("alice"), plan, scheme=BFV_SIMD)
            else:
                outcome = run_intersection_aggregate(
                    agg.fed.identity("alice"), plan, scheme=BFV_SIMD
                )
        finally:
            set_options(node, EXACT)
    assert refused and all("carry no ciphertexts" in str(e) for e in refused)
    expected = expected_districts(agg)
    shown = [g for g in outcome.groups if not g.suppressed]
    assert len(shown) >= 3
    for group in shown:
        assert group.count.value == expected[group.label]["count"]


def _plain_sql(agg: Agg, plan: IntersectionPlan) -> dict[str, tuple[int, int]]:
    """The plan's figures by plain SQL over the two CSVs (SQLite, in memory): group -> (count,
    SUM(amount)); join keys upper-cased as the resident_id rule normalises them."""
    db = sqlite3.connect(":memory:")
    for name, table in ((synth.CIVIL, "v"), (synth.TAX, "m")):
        rows = _csv(agg.data / f"{name}.csv")
        columns = list(rows[0])
        db.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
        db.executemany(
            f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})",
            [[r[c].upper() if c == "id_number" else r[c] for c in columns] for r in rows],
        )
    where = ["1 = 1"]
    params: list[Any] = []
    for table, side in (("v", plan.values), ("m", plan.matcher)):
        for condition in side.where:
            where.append(f"{table}.{condition.column} {condition.op} ?")
            params.append(str(condition.value))
    group = plan.figures.group_by
    label = f"v.{group.column}" if group else "''"
    query = (
        f"SELECT {label}, COUNT(*), SUM(CAST(v.amount AS INTEGER)) FROM v "
        "WHERE v.id_number IN (SELECT m.id_number FROM m WHERE "
        + " AND ".join(w for w in where if w.startswith("m.") or w == "1 = 1")
        + ") AND "
        + " AND ".join(w for w in where if not w.startswith("m."))
        + f" GROUP BY {label}"
    )
    v_params = [p for w, p in zip(where[1:], params, strict=True) if w.startswith("v.")]
    m_params = [p for w, p in zip(where[1:], params, strict=True) if w.startswith("m.")]
    return {str(g): (c, t) for g, c, t in db.execute(query, m_params + v_params)}


SIMD_PLANS = {
    "by_district_2025_high": district_plan(Fraction(1)),
    # about 1.8e7 in all: beyond one 24-bit plaintext modulus
    "all_years_all_residents_one_total": replace(
        district_plan(Fraction(1)),
        values=Side("civil", "assistance", "id_number"),
        matcher=Side("tax", "residents", "id_number"),
        figures=Figures(None, (SumSpec("amount", AMOUNT_BOUND),), Fraction(1)),
    ),
    "by_district_all_years_low": replace(
        district_plan(Fraction(1)),
        values=Side("civil", "assistance", "id_number"),
        matcher=Side("tax", "residents", "id_number", (Condition("income_band", "=", "low"),)),
    ),
}


@pytest.mark.parametrize("name", sorted(SIMD_PLANS))
def test_bfv_simd_sums_are_exact_against_plain_sql(agg: Agg, name: str) -> None:
    plan = SIMD_PLANS[name]
    outcome = run_intersection_aggregate(agg.fed.identity("alice"), plan, scheme=BFV_SIMD)
    assert outcome.scheme == BFV_SIMD
    want = _plain_sql(agg, plan)
    k = outcome.min_group_size
    moduli = replace(plan, scheme=BFV_SIMD).simd_shape().plain_moduli
    assert len(moduli) >= 2
    overflows = False
    for group in outcome.groups:
        count, total = want.get(group.label, (0, 0))
        if count < k:
            assert group.suppressed
            continue
        assert (group.count.value, group.sums["amount"].value) == (count, total)
        overflows |= total >= moduli[0]
    if name == "all_years_all_residents_one_total":
        assert overflows  # one plaintext modulus alone would have wrapped
    reconciled = Auditor(agg.fed.identity("audra"), agg.data / "audit").show_query(outcome.query_id)
    assert reconciled.ok, reconciled.disagreements


def test_plan_round_trips_and_bad_plans_are_refused() -> None:
    from govshare.model.aggregate_plan import parse_aggregate_plan

    plan = visits_plan(Fraction("0.5"))
    plan = HorizontalPlan(
        plan.kind, plan.purpose, plan.parts, plan.figures, plan.aggregator, plan.scheme, b"\x01"
    )
    assert parse_aggregate_plan(plan.to_json(), kind=plan.kind.value) == plan
    changes: list[dict[str, Any]] = [
        {"aggregator": "nobody"}, {"scheme": "ckks"}, {"epsilon": "-1"},
        {"sums": [{"column": "visits", "bound": 0}]}, {"parts": []},
    ]  # fmt: skip
    for change in changes:
        with pytest.raises(MalformedInput):
            parse_aggregate_plan(plan.to_json() | change, kind=plan.kind.value)
    simd = replace(district_plan(), scheme=BFV_SIMD, public_key=b"\x02" * 32)
    assert parse_aggregate_plan(simd.to_json(), kind=simd.kind.value) == simd
    older = simd.to_json()
    del older["scheme"]  # a plan written before the field: paillier
    assert parse_aggregate_plan(older, kind=simd.kind.value).scheme == PAILLIER
    for change in ({"scheme": "bfv"}, {"scheme": "ckks"}, {"public_key": "02" * 31}):
        with pytest.raises(MalformedInput):
            parse_aggregate_plan(simd.to_json() | change, kind=simd.kind.value)


def test_sql_join_with_group_by_runs_as_an_intersection_aggregate(agg: Agg) -> None:
    from govshare.cli.aggregate import outcome_to_json
    from govshare.client.analyst_aggregate import run_aggregate_sql

    sql = (
        "SELECT b.district, COUNT(*), SUM(b.amount), AVG(b.amount) "
        "FROM civil.assistance AS b JOIN tax.residents AS t ON b.id_number = t.id_number "
        "WHERE b.year = 2025 AND t.income_band = 'high' GROUP BY b.district"
    )
    outcome = run_aggregate_sql(agg.fed.identity("alice"), sql, PURPOSE, Fraction(1))
    expected = expected_districts(agg)
    shown = [g for g in outcome.groups if not g.suppressed]
    assert shown
    for group in shown:
        assert group.count.value == expected[group.label]["count"]
        assert group.sums["amount"].value == expected[group.label]["sum_amount"]
    assert outcome_to_json(outcome)["epsilon"] == "1"


def test_sql_union_all_runs_as_a_horizontal_aggregate(agg: Agg) -> None:
    from govshare.client.analyst_aggregate import run_aggregate_sql

    sql = (
        "SELECT h.age_band, COUNT(*), SUM(h.visits), AVG(h.visits) FROM ("
        "SELECT * FROM tax.visits UNION ALL SELECT * FROM civil.visits "
        "UNION ALL SELECT * FROM ghost.visits) AS h GROUP BY h.age_band"
    )
    outcome = run_aggregate_sql(agg.fed.identity("alice"), sql, PURPOSE, Fraction(1))
    assert outcome.kind is QueryKind.HORIZONTAL_AGGREGATE
    assert set(outcome.budgets) == {"tax", "civil", "ghost"}
    shown = [g for g in outcome.groups if not g.suppressed]
    assert shown
    for group in shown:
        assert (group.count.value, group.sums["visits"].value) == agg.visits[group.label]


# --- groups on the matcher's side (issue 15 item 2) ------------------------------------------

MONTHS_BOUND = 12


@pytest.fixture(scope="module")
def two_sums(agg: Agg) -> Path:
    """civil's assistance with a second SUM column (``months``, 1 to 12, from the key) as
    ``assistance_months``; and tax's residents with one key in two districts as ``split``."""
    rows = _csv(agg.data / f"{synth.CIVIL}.csv")
    path = agg.data / "assistance_months.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, [*rows[0], "months"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row | {"months": 1 + int(row["id_number"][-5:-1]) % MONTHS_BOUND})
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    register(civil, path, name="assistance_months", columns=(*CIVIL_COLUMNS, "months=aggregate"))
    grant(
        civil, "assistance_months", "alice",
        ["id_number", "year", "district", "amount", "months"], KINDS,
    )  # fmt: skip
    grant(tax, "residents", "alice", ["id_number", "income_band", "year", "district"], KINDS)
    residents = _csv(agg.data / f"{synth.TAX}.csv")
    split = agg.data / "split.csv"
    twin = residents[0] | {"district": next(d for d in synth.DISTRICTS
                                            if d != residents[0]["district"])}  # fmt: skip
    with open(split, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(residents[0]))
        writer.writeheader()
        writer.writerows([*residents, twin])
    register(tax, split, name="split", columns=TAX_COLUMNS)
    grant(tax, "split", "alice", ["id_number", "income_band", "year", "district"], KINDS)
    return path


def _two_sum_plan(side: str, column: str, domain: tuple[str, ...]) -> IntersectionPlan:
    """COUNT, SUM(amount) and SUM(months) of civil's 2025 rows over all of tax's residents,
    grouped by ``column`` of civil's (``values``) or of tax's (``matcher``)."""
    sums = (SumSpec("amount", AMOUNT_BOUND), SumSpec("months", MONTHS_BOUND))
    return replace(
        district_plan(),
        values=replace(district_plan().values, dataset="assistance_months"),
        matcher=Side("tax", "residents", "id_number"),
        figures=Figures(GroupSpec(column, domain, side), sums, Fraction(1)),
    )


def _grouped_sql(agg: Agg, months: Path, plan: IntersectionPlan) -> dict[str, tuple[int, ...]]:
    """Plain SQL (SQLite) over the CSVs: group -> (COUNT(*), SUM(amount), SUM(months)) of V's
    2025 rows whose key is in M; the group from whichever table the plan names."""
    db = sqlite3.connect(":memory:")
    for path, table in ((months, "v"), (agg.data / f"{synth.TAX}.csv", "m")):
        rows = _csv(path)
        columns = list(rows[0])
        db.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
        db.executemany(
            f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})",
            [[r[c].upper() if c == "id_number" else r[c] for c in columns] for r in rows],
        )
    group = plan.figures.group_by
    assert group is not None
    table = "m" if group.side == "matcher" else "v"
    query = (
        f"SELECT {table}.{group.column}, COUNT(*), SUM(CAST(v.amount AS INTEGER)),"
        " SUM(CAST(v.months AS INTEGER))"
        " FROM v JOIN (SELECT DISTINCT id_number, district, income_band FROM m) AS m"
        " ON v.id_number = m.id_number WHERE v.year = '2025'"
        f" GROUP BY {table}.{group.column}"
    )
    return {str(g): tuple(rest) for g, *rest in db.execute(query)}


GROUPED = {
    "values_side_two_sums_bfv_simd": ("values", "district", synth.DISTRICTS, BFV_SIMD),
    "matcher_side_income_band_bfv_simd": ("matcher", "income_band", ("low", "middle", "high"),
                                          BFV_SIMD),
    "matcher_side_income_band_paillier": ("matcher", "income_band", ("low", "middle", "high"),
                                          PAILLIER),
    "matcher_side_16_districts_bfv_simd": ("matcher", "district", synth.DISTRICTS, BFV_SIMD),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_groups_on_either_side_are_exact_against_plain_sql(
    agg: Agg, two_sums: Path, name: str
) -> None:
    side, column, domain, scheme = GROUPED[name]
    plan = _two_sum_plan(side, column, domain)
    outcome = run_intersection_aggregate(
        agg.fed.identity("alice"), plan, scheme=scheme, key_bits=KEY_BITS,
        unsafe_allow_short_modulus=True,
    )  # fmt: skip
    assert outcome.scheme == scheme
    want = _grouped_sql(agg, two_sums, plan)
    k = outcome.min_group_size
    shown = 0
    assert [g.label for g in outcome.groups] == list(domain)
    for group in outcome.groups:
        count, amount, months = want.get(group.label, (0, 0, 0))
        if count < k:
            assert group.suppressed
            continue
        shown += 1
        got = (group.count.value, group.sums["amount"].value, group.sums["months"].value)
        assert got == (count, amount, months)
    assert shown >= min(3, len(domain))
    reconciled = Auditor(agg.fed.identity("audra"), agg.data / "audit").show_query(outcome.query_id)
    assert reconciled.ok, reconciled.disagreements


def opened_streams(monkeypatch: pytest.MonkeyPatch, node: Node) -> list[Generator[Any, None, None]]:
    """Every stream of rows ``node``'s catalogue hands out from here on, kept for the test to
    look at (kept: so that only its reader, never the garbage collector, can have closed it)."""
    streams: list[Generator[Any, None, None]] = []
    rows = node.catalogue.rows

    def recorded(*args: Any, **kwargs: Any) -> Generator[Any, None, None]:
        streams.append(rows(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(node.catalogue, "rows", recorded)
    return streams


def assert_closed(streams: list[Generator[Any, None, None]]) -> None:
    """The read stopped midway, and its reader closed the stream then, in the query's thread:
    its connection is not left for the garbage collector to close in another thread."""
    assert streams
    assert [inspect.getgeneratorstate(s) for s in streams] == [inspect.GEN_CLOSED] * len(streams)


@pytest.mark.parametrize("chunk_rows", [16, 1_000_000])
def test_matcher_groups_that_share_a_key_are_refused(
    agg: Agg, two_sums: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    """``split`` repeats its first key, in another district, as its last row: in chunks far
    apart of the matcher's read (16 rows a chunk), or in its one chunk."""
    monkeypatch.setattr(aggregate_kind, "ROWS_PER_CHECK", chunk_rows)
    plan = replace(
        _two_sum_plan("matcher", "district", synth.DISTRICTS),
        matcher=Side("tax", "split", "id_number"),
    )
    streams = opened_streams(monkeypatch, agg.nodes["tax"])
    with pytest.raises(MalformedInput, match="rows in two groups of district"):
        run_intersection_aggregate(agg.fed.identity("alice"), plan, scheme=BFV_SIMD)
    assert_closed(streams)
    # The node keeps serving: the same plan over residents runs.
    outcome = run_intersection_aggregate(
        agg.fed.identity("alice"), _two_sum_plan("matcher", "income_band", ("low", "high")),
        scheme=BFV_SIMD,
    )  # fmt: skip
    assert [g.label for g in outcome.groups] == ["low", "high"]


def test_a_key_with_too_many_rows_at_the_values_holder_is_refused_midway(
    agg: Agg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """civil's ``crowded`` repeats one 2025 row more often than one ciphertext may carry: the
    value holder's read stops there, closing its stream, and the query is refused."""
    rows = _csv(agg.data / f"{synth.CIVIL}.csv")
    crowded = agg.data / "crowded.csv"
    with open(crowded, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        repeated = next(r for r in rows if r["year"] == "2025")
        writer.writerows([*rows, *[repeated] * MAX_ROWS_PER_KEY])
    civil = agg.nodes["civil"]
    register(civil, crowded, name="crowded", columns=CIVIL_COLUMNS)
    grant(civil, "crowded", "alice", ["id_number", "year", "district", "amount"], KINDS)
    streams = opened_streams(monkeypatch, civil)
    with pytest.raises(MalformedInput, match=f"more than {MAX_ROWS_PER_KEY} rows of crowded"):
        run_intersection_aggregate(
            agg.fed.identity("alice"), intersection_plan("crowded"), scheme=BFV_SIMD
        )
    assert_closed(streams)
    assert _side_threads("civil") == []  # its wait for tax's keys ended with the part


def test_sql_groups_by_the_matchers_column_when_the_sums_are_the_other_tables(
    agg: Agg, two_sums: Path
) -> None:
    from govshare.client.analyst_aggregate import run_aggregate_sql

    sql = (
        "SELECT t.income_band, COUNT(*), SUM(b.amount), SUM(b.months) "
        "FROM civil.assistance_months AS b JOIN tax.residents AS t ON b.id_number = t.id_number "
        "WHERE b.year = 2025 GROUP BY t.income_band"
    )
    outcome = run_aggregate_sql(
        agg.fed.identity("alice"), sql, PURPOSE, Fraction(1), sum_bound=AMOUNT_BOUND
    )
    assert outcome.body["group_by"]["side"] == "matcher"
    assert outcome.body["values"]["node"] == "civil"  # the SUMs' table holds the values
    want = _grouped_sql(agg, two_sums, _two_sum_plan("matcher", "income_band", ("low",)))
    assert outcome.scheme == BFV_SIMD
    for group in outcome.groups:
        count, amount, months = want[group.label]
        assert not group.suppressed
        assert (group.count.value, group.sums["amount"].value, group.sums["months"].value) == (
            count, amount, months,
        )  # fmt: skip


def test_matcher_side_groups_in_plans_round_trip_and_are_bounded() -> None:
    from govshare.model.aggregate_plan import MAX_MATCHER_GROUPS, parse_aggregate_plan

    plan = replace(
        _two_sum_plan("matcher", "income_band", ("low", "high")),
        scheme=BFV_SIMD, public_key=b"\x02" * 32,
    )  # fmt: skip
    raw = plan.to_json()
    assert raw["group_by"]["side"] == "matcher"
    assert parse_aggregate_plan(raw, kind=plan.kind.value) == plan
    assert "side" not in district_plan().to_json()["group_by"]  # V's groups read as before
    assert plan.value_cells == (("", "count"), ("", "sum:amount"), ("", "sum:months"))
    assert plan.simd_shape().groups == 2 and plan.simd_shape().cells == 3
    assert any(a.column == "income_band" for a in plan.accesses("tax")[1])
    assert not any(a.column == "income_band" for a in plan.accesses("civil")[1])
    too_many = raw | {"group_by": raw["group_by"] | {
        "domain": [str(i) for i in range(MAX_MATCHER_GROUPS + 1)]}}  # fmt: skip
    for bad in (too_many, raw | {"group_by": raw["group_by"] | {"side": "both"}}):
        with pytest.raises(MalformedInput, match="group_by"):
            parse_aggregate_plan(bad, kind=plan.kind.value)
    horizontal = replace(visits_plan(), public_key=b"\x01").to_json()
    horizontal["group_by"]["side"] = "matcher"
    with pytest.raises(MalformedInput, match="horizontal"):
        parse_aggregate_plan(horizontal, kind=QueryKind.HORIZONTAL_AGGREGATE.value)


def test_matcher_groups_need_the_matchers_grant_of_the_group_column(
    agg: Agg, two_sums: Path
) -> None:
    """The GROUP use moves with the column: an analyst whose tax grant lacks district is
    refused by tax for tax's districts; civil, which reads no group column then, is not asked
    for one (hkana's civil grant names no group column, and the income-band query runs)."""
    civil, tax = agg.nodes["civil"], agg.nodes["tax"]
    grant(civil, "assistance_months", "hkana", ["id_number", "year", "amount", "months"], KINDS)
    grant(tax, "residents", "hkana", ["id_number", "income_band", "year"], KINDS)
    hkana = agg.fed.identity("hkana")
    before = tax.audit.size
    with pytest.raises(PolicyRefused) as refused:
        run_intersection_aggregate(
            hkana, _two_sum_plan("matcher", "district", synth.DISTRICTS), scheme=BFV_SIMD
        )
    assert refused.value.rule == "grant.column"
    decisions = [e.decode() for e in tax.audit.entries(before, tax.audit.size)]
    assert [e.fields["rule"] for e in decisions if e.kind == "policy.decision"] == ["grant.column"]
    # Grouped by tax's income band (granted), the same sums run.
    outcome = run_intersection_aggregate(
        hkana, _two_sum_plan("matcher", "income_band", ("low", "middle", "high")), scheme=BFV_SIMD
    )
    assert [g.label for g in outcome.groups] == ["low", "middle", "high"]


def test_value_holders_cells_are_its_rows_figures_summed_per_key_in_the_shuffled_order() -> None:
    """The value holder's rows, added in chunks as it reads them, come out per key at the key's
    place in the order M sees: the key's rows' figures summed in its group's cells (counted
    here row by row in plain Python); a key past MAX_ROWS_PER_KEY rows is refused."""
    rng = random.Random(7)
    for groups, figures in ((1, 2), (3, 3)):
        table = _KeyValues(groups, figures)
        plain: dict[str, list[int]] = {}
        for _ in range(5):
            chunk = [
                (f"k{rng.randrange(120)}", rng.randrange(groups),
                 [1, *(rng.randrange(0, 1000) for _ in range(figures - 1))])
                for _ in range(100)
            ]  # fmt: skip
            keys, labels, values = zip(*chunk, strict=True)
            assert table.add_rows(list(keys), list(labels), values)
            for key, g, row in chunk:
                cells = plain.setdefault(key, [0] * groups * figures)
                for f, v in enumerate(row):
                    cells[g * figures + f] += v
        order = table.shuffle()
        by_place = table.by_place(order)
        wanted = [plain[table.keys[k]] for k in order]
        assert by_place.cells(0, len(order)).tolist() == wanted
        assert by_place.cells(5, 17).tolist() == wanted[5:17]
        assert by_place.between(5, 17).cells(5, 17).tolist() == wanted[5:17]
        assert int(by_place.cells(0, len(order))[:, 0::figures].sum()) == 500
    crowded = _KeyValues(1, 1)
    full = MAX_ROWS_PER_KEY
    assert crowded.add_rows(["a"] * full, [0] * full, [[1]] * full)
    assert not crowded.add_rows(["b", "a"], [0, 0], [[1], [1]])


def test_row_figures_are_a_count_and_each_sum_clipped_to_its_bound() -> None:
    """(1, clipped sums) per row, read a column at a time: below 0 gives 0, above the bound
    gives the bound, even beyond 64 bits (clipped one by one, then stored)."""
    huge = 1 << 80
    got = _figures(4, [[5, -3, 900, huge], [0, 7, 8, 9]], [100, 8])
    assert got.tolist() == [[1, 5, 0], [1, 0, 7], [1, 100, 8], [1, 100, 8]]
    assert _figures(2, [], []).tolist() == [[1], [1]]  # COUNT alone
