"""``make demo``: a five-node govshare federation on localhost, end to end.

Generates synthetic data for four departments (the clinic visits split between the city health
commission and a district health bureau), creates the federation CA and roster, enrols five
nodes, a named operator for each (a person who signs every act), an analyst and an auditor,
registers each dataset with its governance metadata and
grants the analyst use rights, starts the nodes as separate processes serving gRPC over mutual
TLS, shows the catalogue as the analyst sees it, shows that a refusal reveals nothing about the
rows (the same words for a resident who receives assistance and one who does not), runs a PSI
whose count carries DP noise with its interval, the same question in SQL as an exact release
that waits until both operators approve it, an intersection aggregate and a horizontal aggregate
that waits for the operators' approval, has the auditor verify every receipt and every node's
log and run the risk rules over the five logs (``audit check``: no HIGH alert, or the demo
fails), and stops the nodes cleanly. Every step runs the real ``govshare`` command, and the demo
prints each command before its output.

    python -m govshare.examples.demo [--dir demo-run] [--size 5000] [--seed 7] [--postgres]
                                     [--suite standard|sm]

With ``--postgres`` the tax and civil affairs bureaus keep their records in a PostgreSQL server
the demo starts (``govshare.examples.postgres``; Debian's postgresql package): their nodes
register the live tables and read them at each query, nothing copied. With ``--suite sm`` the
same story runs on a federation made with the national algorithms (SM2 signatures, SM3 logs and
key derivation, SM4 masks and data at rest; ``govshare.protocols.suite``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from govshare.examples import postgres, synth
from govshare.protocols.suite import STANDARD, SUITE_NAMES

console = Console(highlight=False)

# Seconds a node may take to start listening, and to stop after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Department:
    node: str
    title: str
    dataset: str
    csv: str
    grade: str
    sharing: str
    owner_kind: str
    owner: str
    columns: tuple[str, ...]
    legal_basis: str = ""


def _domain(values: Sequence[str]) -> str:
    return "|".join(values)


HEALTH_COLUMNS = (
    "id_number=join_key:resident_id",
    f"district=group_key:domain={_domain(synth.DISTRICTS)}",
    f"age_band=group_key:domain={_domain(synth.AGE_BANDS)}",
    "year=plaintext",
    "visits=aggregate",
)
# The generator's clinic visits, split between two health authorities of the same schema.
CITY_VISITS = "health.city.csv"
DISTRICT_VISITS = "health.haidian.csv"

DEPARTMENTS: tuple[Department, ...] = (
    Department(
        node="police",
        title="Public security bureau — household registry",
        dataset="household",
        csv=f"{synth.POLICE}.csv",
        grade="core",
        sharing="none",
        legal_basis="Household Registration Regulations, art. 3 (registry data is not shared)",
        owner_kind="individual",
        owner="residents (held in trust)",
        columns=(
            "id_number=join_key:resident_id",
            "name=masked:redact",
            "gender=deny",
            f"age_band=group_key:domain={_domain(synth.AGE_BANDS)}",
            f"district=group_key:domain={_domain(synth.DISTRICTS)}",
            f"hukou_type=group_key:domain={_domain(synth.HUKOU_TYPES)}",
        ),
    ),
    Department(
        node="tax",
        title="Tax bureau — resident income registry",
        dataset="residents",
        csv=f"{synth.TAX}.csv",
        grade="general",
        sharing="conditional",
        owner_kind="state",
        owner="State Taxation Administration",
        columns=(
            "id_number=join_key:resident_id",
            f"district=group_key:domain={_domain(synth.DISTRICTS)}",
            "year=plaintext",
            f"income_band=group_key:domain={_domain(synth.INCOME_BANDS)}",
            "annual_income=aggregate",
        ),
    ),
    Department(
        node="civil",
        title="Civil affairs bureau — social assistance",
        dataset="assistance",
        csv=f"{synth.CIVIL}.csv",
        grade="general",
        sharing="conditional",
        owner_kind="state",
        owner="Ministry of Civil Affairs",
        columns=(
            "id_number=join_key:resident_id",
            f"district=group_key:domain={_domain(synth.DISTRICTS)}",
            "year=plaintext",
            f"assistance_type=group_key:domain={_domain(synth.ASSISTANCE_TYPES)}",
            "amount=aggregate",
        ),
    ),
    Department(
        node="health",
        title="Municipal health commission — clinic visits at city hospitals",
        dataset="clinic_visits",
        csv=CITY_VISITS,
        grade="important",
        sharing="conditional",
        owner_kind="individual",
        owner="patients (held in trust)",
        columns=HEALTH_COLUMNS,
    ),
    Department(
        node="haidian",
        title="Haidian district health bureau — clinic visits at district clinics",
        dataset="clinic_visits",
        csv=DISTRICT_VISITS,
        grade="important",
        sharing="conditional",
        owner_kind="individual",
        owner="patients (held in trust)",
        columns=HEALTH_COLUMNS,
    ),
)


PURPOSE = "social assistance targeting review"
HEALTH_PURPOSE = "seasonal clinic load planning"
# (node, dataset, purpose, columns, query kinds) granted to the analyst.
GRANTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("tax", "residents", PURPOSE, "id_number,income_band",
     "psi_cardinality,intersection_aggregate"),
    ("civil", "assistance", PURPOSE, "id_number,assistance_type,amount",
     "psi_cardinality,intersection_aggregate"),
    ("health", "clinic_visits", HEALTH_PURPOSE, "age_band,visits", "horizontal_aggregate"),
    ("haidian", "clinic_visits", HEALTH_PURPOSE, "age_band,visits", "horizontal_aggregate"),
)  # fmt: skip
SQL_AGGREGATE = (
    "SELECT a.assistance_type, COUNT(*), SUM(a.amount), AVG(a.amount) "
    "FROM civil.assistance a JOIN tax.residents t ON a.id_number = t.id_number "
    "WHERE t.income_band = 'high' GROUP BY a.assistance_type"
)
SQL_HORIZONTAL = (
    "SELECT h.age_band, COUNT(*), SUM(h.visits), AVG(h.visits) FROM ("
    "SELECT * FROM health.clinic_visits UNION ALL SELECT * FROM haidian.clinic_visits) AS h "
    "GROUP BY h.age_band"
)
SQL_COUNT = (
    "SELECT COUNT(*) FROM civil.assistance a JOIN tax.residents t "
    "ON a.id_number = t.id_number WHERE t.income_band = 'high'"
)


def split_visits(data: Path) -> None:
    """Split the clinic visits between the city commission and the district bureau."""
    with (data / f"{synth.HEALTH}.csv").open(encoding="utf-8") as source:
        header, *rows = source.readlines()
    for name, share in ((CITY_VISITS, rows[0::2]), (DISTRICT_VISITS, rows[1::2])):
        (data / name).write_text(header + "".join(share), encoding="utf-8")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before in this run: nothing listens on the
    ports until the nodes start, so the kernel may offer the same free port twice."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: dict[str, subprocess.Popen[str]] = {}

    def step(self, title: str) -> None:
        console.print()
        console.print(Rule(f"[bold]{title}"))

    def govshare(self, *args: str, show: bool = True, quiet: bool = False) -> str:
        """Run the real ``govshare`` command in the demo folder; fail loudly if it fails."""
        if show:
            console.print(f"[dim]$ govshare {' '.join(_quote(a) for a in args)}[/]", soft_wrap=True)
        env = {**os.environ, "COLUMNS": str(max(console.width, 120))}
        result = subprocess.run(
            [sys.executable, "-m", "govshare.cli", *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if result.returncode != 0:
            console.print(result.stdout + result.stderr)
            raise SystemExit(f"demo step failed: govshare {' '.join(args)}")
        if not quiet and result.stdout.strip():
            sys.stdout.write(result.stdout.rstrip() + "\n")
            sys.stdout.flush()
        return result.stdout

    def refused(self, *args: str) -> str:
        """Run a ``govshare`` command that must be refused; return its one-line error."""
        console.print(f"[dim]$ govshare {' '.join(_quote(a) for a in args)}[/]", soft_wrap=True)
        result = subprocess.run(
            [sys.executable, "-m", "govshare.cli", *args],
            cwd=self.workdir, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 1:
            raise SystemExit(f"demo step was not refused: govshare {' '.join(args)}")
        line = result.stderr.strip()
        console.print(f"  [red]{line}[/]", soft_wrap=True)
        return line

    def with_approval(self, args: Sequence[str], nodes: Sequence[str], reason: str) -> None:
        """Ask a query that waits for approval; each node's operator approves it."""
        console.print(f"[dim]$ govshare {' '.join(_quote(a) for a in args)} &[/]", soft_wrap=True)
        env = {**os.environ, "COLUMNS": str(max(console.width, 120))}
        query = subprocess.Popen(
            [sys.executable, "-m", "govshare.cli", *args],
            cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env,
        )  # fmt: skip
        try:
            for node in nodes:
                home = f"homes/{node}"
                pending: list[dict[str, str]] = []
                deadline = time.monotonic() + START_TIMEOUT
                while not pending and time.monotonic() < deadline:
                    listed = self.govshare("approvals", "list", "--home", home, "--json",
                                           show=False, quiet=True)  # fmt: skip
                    pending = json.loads(listed)
                    time.sleep(0.2)
                if not pending:
                    raise SystemExit(f"the query never reached {node}'s approval queue")
                self.govshare("approvals", "list", "--home", home)
                self.govshare(
                    "approvals", "approve", pending[0]["query_id"], "--home", home,
                    "--reason", reason, "--identity", approver_of(node),
                )  # fmt: skip
            output, _ = query.communicate(timeout=300)
        finally:
            if query.poll() is None:
                query.kill()
        sys.stdout.write(output)
        if query.returncode != 0:
            raise SystemExit(f"the query failed: govshare {' '.join(args)}")

    def start_node(self, name: str) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "govshare.cli", "node", "serve", "--home", f"homes/{name}"],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.nodes[name] = process
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if "serving on" in line:
                console.print(f"  [green]●[/] {line.strip()}  [dim](pid {process.pid})[/]")
                return
        self.stop_nodes()
        raise SystemExit(f"node {name} did not start")

    def stop_nodes(self) -> dict[str, int]:
        codes: dict[str, int] = {}
        for process in self.nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.nodes.items():
            try:
                codes[name] = process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        self.nodes.clear()
        return codes


RECEIPTS = (
    "receipts/psi.json",
    "receipts/sql.json",
    "receipts/aggregate.json",
    "receipts/horizontal.json",
)


# Each department's named operator (a person: every act they perform is signed by them and
# logged with their name), with the duties the demo needs.
OPERATORS = {
    "police": "wang-fang",
    "tax": "zhang-wei",
    "civil": "li-na",
    "health": "liu-yang",
    "haidian": "chen-jie",
}
OPERATOR_DUTIES = "register,grant,approve"
# On important data the approver of a query must not be the person who issued its grant
# (rule duty.separation): the health authorities have a second person who approves.
APPROVERS = {"health": "zhou-min", "haidian": "sun-li"}


def operator_of(node: str) -> str:
    """The bundle of ``node``'s operator, for ``--identity``."""
    return f"operators/{OPERATORS[node]}"


def approver_of(node: str) -> str:
    """The bundle of the person who approves ``node``'s queries."""
    return f"operators/{APPROVERS[node]}" if node in APPROVERS else operator_of(node)


def _quote(arg: str) -> str:
    return shlex.quote(arg)


# With --postgres: the departments whose records stay in PostgreSQL (node -> table, CSV file,
# column types; the other columns are text).
LIVE = {
    "tax": ("residents", f"{synth.TAX}.csv", {"year": "integer", "annual_income": "bigint"}),
    "civil": ("assistance", f"{synth.CIVIL}.csv", {"year": "integer", "amount": "integer"}),
}


def run(workdir: Path, size: int, seed: int, *, suite: str, live: bool = False) -> None:
    started = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "receipts").mkdir()
    demo = Demo(workdir)
    databases: postgres.Departments | None = None
    try:
        demo.step(f"1. Synthetic data for four departments ({size:,} rows each, seed {seed})")
        manifest = synth.generate(workdir / "data", size=size, seed=seed)
        split_visits(workdir / "data")
        for name, count in sorted(manifest["intersections"].items())[:3]:
            console.print(f"  known overlap {name}: {count:,}")
        if live:
            databases = postgres.start_departments(
                free_port(),
                {n: (t, workdir / "data" / f, types) for n, (t, f, types) in LIVE.items()},
            )
            for node, args in ((n, databases.dataset_args(n)) for n in LIVE):
                console.print(
                    f"  {node} keeps its records in PostgreSQL: {args[1]} {args[3]}",
                    soft_wrap=True,
                )

        demo.step(f"2. Federation administrator: CA, roster, members ({suite} crypto suite)")
        demo.govshare("federation", "init", "--name", "demo", "--suite", suite)
        for department in DEPARTMENTS:
            demo.govshare(
                "federation", "enrol", "--role", "node", "--name", department.node,
                "--jurisdiction", "CN", "--address", f"127.0.0.1:{free_port()}",
                "--out", f"homes/{department.node}",
            )  # fmt: skip
        demo.govshare(
            "federation", "enrol", "--role", "analyst", "--name", "alice",
            "--jurisdiction", "CN", "--out", "alice",
        )  # fmt: skip
        demo.govshare(
            "federation", "enrol", "--role", "analyst", "--name", "mallory",
            "--jurisdiction", "CN", "--out", "mallory",
        )  # fmt: skip
        demo.govshare(
            "federation", "enrol", "--role", "auditor", "--name", "audra",
            "--jurisdiction", "CN", "--out", "audra",
        )  # fmt: skip
        for node, person in OPERATORS.items():
            demo.govshare(
                "federation", "enrol", "--role", "operator", "--name", person, "--node", node,
                "--duties", OPERATOR_DUTIES, "--jurisdiction", "CN", "--out", operator_of(node),
            )  # fmt: skip
        for node, person in APPROVERS.items():
            demo.govshare(
                "federation", "enrol", "--role", "operator", "--name", person, "--node", node,
                "--duties", "approve", "--jurisdiction", "CN", "--out", approver_of(node),
            )  # fmt: skip
        bundles = [f"homes/{d.node}" for d in DEPARTMENTS] + ["alice", "mallory", "audra"]
        demo.govshare("federation", "publish", *bundles)
        demo.govshare("federation", "roster")

        demo.step("3. Department operators: node config and datasets with governance metadata")
        for department in DEPARTMENTS:
            home = f"homes/{department.node}"
            console.print(f"[bold]{department.title}[/]")
            demo.govshare(
                "node", "init", "--home", home, "--listen",
                _address_of(workdir, department.node),
            )  # fmt: skip
            columns = [arg for column in department.columns for arg in ("--column", column)]
            legal = ["--legal-basis", department.legal_basis] if department.legal_basis else []
            rows = (
                databases.dataset_args(department.node)
                if databases is not None and department.node in LIVE
                else [f"data/{department.csv}"]
            )
            demo.govshare(
                "dataset", "add", *rows, "--home", home,
                "--name", department.dataset, "--grade", department.grade,
                "--sharing", department.sharing, *legal,
                "--owner-kind", department.owner_kind, "--owner", department.owner,
                *columns, "--identity", operator_of(department.node),
            )  # fmt: skip

        console.print("[bold]Use-right grants (使用权) to the analyst, signed by each node[/]")
        for node, dataset, purpose, granted, kinds in GRANTS:
            demo.govshare(
                "grant", "add", "--home", f"homes/{node}", "--dataset", dataset,
                "--grantee", "alice", "--purpose", purpose, "--columns", granted,
                "--kinds", kinds, "--expires", "2030-12-31",
                "--epsilon", "5", "--max-queries", "100", "--identity", operator_of(node),
            )  # fmt: skip

        demo.step("4. Five nodes start as separate processes, gRPC over mutual TLS")
        for department in DEPARTMENTS:
            demo.start_node(department.node)

        demo.step("5. Analyst: the federation catalogue (metadata and column rules, never rows)")
        demo.govshare("catalog", "list", "--identity", "alice")
        console.print(
            "[dim]police.household is graded core: it never takes part in a joint query, "
            "so analysts do not see it listed.[/]"
        )

        demo.step("6. A curious analyst without a grant: the refusal reveals nothing")
        member, outsider = _member_and_outsider(workdir / "data")
        lines = []
        for resident in (member, outsider):
            ask = (
                "query", "psi", "--identity", "mallory", "--left", "civil.assistance.id_number",
                "--right", "tax.residents.id_number", "--purpose", "curiosity",
                "--where", f"civil.assistance.id_number = '{resident}'",
            )  # fmt: skip
            lines.append(demo.refused(*ask))
        same = [line.replace(member, "X").replace(outsider, "X") for line in lines]
        if same[0] != same[1]:
            raise SystemExit("the two refusals differ: the refusal leaks the rows")
        console.print(
            "[dim]one of the two receives assistance and the other does not; the nodes decide "
            "the grant before anything reads the rows, so both refusals read the same.[/]"
        )

        expected = manifest["filtered"]["tax_high & civil"]["count"]
        demo.step("7. Analyst: a private set intersection; the count carries DP noise")
        demo.govshare(
            "query", "psi", "--identity", "alice",
            "--left", "civil.assistance.id_number", "--right", "tax.residents.id_number",
            "--where", "tax.residents.income_band = 'high'", "--epsilon", "1",
            "--purpose", PURPOSE, "--receipt", "receipts/psi.json",
        )  # fmt: skip
        console.print(
            f"[dim]the true count (from the generator's manifest) is {expected}; the nodes "
            "added shared dummy keys, so the analyst sees it only through the noise.[/]"
        )

        demo.step("8. The same question in SQL as an exact release: both operators must approve")
        demo.with_approval(
            ("query", "sql", "--identity", "alice", "--purpose", PURPOSE, "--exact",
             "--receipt", "receipts/sql.json", SQL_COUNT),
            ("civil", "tax"), "exact count for the annual targeting report",
        )  # fmt: skip
        console.print(
            f"[dim]exact, as the manifest says ({expected}). Neither department learned the "
            "other's list; each logged the signed request, its policy decision, the approval, "
            "every protocol step and the release.[/]"
        )
        demo.govshare("catalog", "show", "tax.residents", "--identity", "alice")

        demo.step("9. Analyst: an intersection aggregate under SIMD-packed BFV, with DP noise")
        demo.govshare(
            "query", "sql", "--identity", "alice", "--purpose", PURPOSE, "--epsilon", "1",
            "--sum-bound", "30000", "--receipt", "receipts/aggregate.json", SQL_AGGREGATE,
        )  # fmt: skip
        console.print(
            "[dim]civil's amounts never left it: tax found the matches among civil's masked "
            "keys and sent its selection encrypted under the analyst's fresh BFV keys; civil "
            "multiplied it by its amounts in the ciphertexts' slots, summed, added the noise and "
            "flooded it; only the analyst decrypted (--scheme paillier: one ciphertext per "
            "row).[/]"
        )

        demo.step("10. A horizontal aggregate over two health authorities, with approval")
        demo.with_approval(
            ("query", "sql", "--identity", "alice", "--purpose", HEALTH_PURPOSE, "--epsilon", "1",
             "--sum-bound", "30", "--receipt", "receipts/horizontal.json", SQL_HORIZONTAL),
            ("health", "haidian"), "aggregate counts only, DP on",
        )  # fmt: skip

        demo.step("10b. An analyst applies for a right (使用权申请); the named operator answers")
        applied = demo.govshare(
            "grant", "request", "--identity", "alice", "--node", "tax", "--dataset", "residents",
            "--columns", "district,income_band", "--kinds", "psi_cardinality",
            "--purpose", "district income profile",
            "--legal-basis", "Interim Measures on Government Information Sharing, art. 9", "--json",
        )  # fmt: skip
        asked = json.loads(applied)
        demo.govshare("grant", "requests", "--home", "homes/tax")
        demo.govshare(
            "grant", "approve", asked["request_id"], "--home", "homes/tax", "--epsilon", "1",
            "--expires", "2030-12-31", "--identity", operator_of("tax"),
        )  # fmt: skip
        demo.govshare("grant", "mine", "--identity", "alice")

        demo.step("11. Auditor: receipts, then every node's log pulled and verified")
        for receipt in RECEIPTS:
            demo.govshare("audit", "verify-receipt", "--identity", "audra", receipt)
        demo.govshare("audit", "pull", "--all", "--identity", "audra")
        demo.govshare("audit", "verify", "--all", "--identity", "audra")
        query_id = json.loads((workdir / "receipts/aggregate.json").read_text())["query_id"]
        demo.govshare("audit", "show", "--query", query_id, "--identity", "audra")
        # 权利可查 and 谁主管谁负责: who holds which right, and who answers for a dataset.
        demo.govshare("audit", "rights", "--all", "--identity", "audra")
        demo.govshare("responsibility", "show", "tax.residents", "--identity", "audra")
        # Exit 2 on a HIGH alert fails the demo; the exact release is a LOW, informational one.
        demo.govshare("audit", "check", "--all", "--identity", "audra")
        # The periodic assessment (安全评估报告): one self-contained page, readable without a CLI.
        demo.govshare("audit", "report", "--all", "--identity", "audra", "--out", "report.html")
        console.print(f"[bold]Assessment report:[/] {(workdir / 'report.html').resolve().as_uri()}")
    finally:
        demo.step("Stopping the nodes (SIGTERM, graceful)")
        codes = demo.stop_nodes()
        for name, code in codes.items():
            console.print(f"  node {name} exited with code {code}")
        if databases is not None:
            databases.stop()
    if any(codes.values()):
        raise SystemExit("a node did not stop cleanly")
    console.print()
    console.print(f"[bold green]demo finished in {time.monotonic() - started:.1f} s[/]")


def _member_and_outsider(data: Path) -> tuple[str, str]:
    """A resident who receives assistance and a taxpayer who does not (from the CSVs)."""
    with (data / f"{synth.CIVIL}.csv").open(newline="", encoding="utf-8") as handle:
        helped = {row["id_number"].upper() for row in csv.DictReader(handle)}
    with (data / f"{synth.TAX}.csv").open(newline="", encoding="utf-8") as handle:
        taxed = [row["id_number"].upper() for row in csv.DictReader(handle)]
    outsider = next(i for i in taxed if i not in helped)
    return min(helped), outsider


def _address_of(workdir: Path, node: str) -> str:
    roster = json.loads((workdir / "federation" / "roster.json").read_text())["roster"]
    for member in roster["members"]:
        if member["name"] == node:
            return str(member["address"])
    raise SystemExit(f"{node} is not in the roster")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the govshare demo federation.")
    parser.add_argument("--dir", type=Path, default=Path("demo-run"), help="working folder")
    parser.add_argument("--size", type=int, default=5000, help="rows per department")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--postgres", action="store_true",
        help="tax and civil affairs read their records live from a PostgreSQL server it starts",
    )  # fmt: skip
    parser.add_argument(
        "--suite", choices=SUITE_NAMES, default=STANDARD.name,
        help="the federation's crypto suite: standard (Ed25519, SHA-256, AES) or sm (SM2, SM3, "
        "SM4)",
    )  # fmt: skip
    options = parser.parse_args(argv)
    run(
        options.dir.resolve(), options.size, options.seed, live=options.postgres,
        suite=options.suite,
    )  # fmt: skip


if __name__ == "__main__":
    main()
