"""A ``govshare`` command imports what it uses: the command modules load lazily (cli/main.py).

Each check runs the real entry point in a fresh interpreter, which writes the names in its
``sys.modules`` to a file as it exits (``-X importtime`` would miss the modules click's group
imports with ``importlib``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import govshare.cli.main as main_module
from govshare.cli.aggregate import outcome_to_json
from govshare.cli.main import COMMANDS
from govshare.client.analyst_aggregate import AggregateOutcome, Figure, GroupResult
from govshare.client.results import ResultsStore
from govshare.model.aggregate_plan import BFV_SIMD
from govshare.model.governance import QueryKind

TIMEOUT = 120
# The console script's entry point; what was imported is written however it exits.
ENTRY = """
import json, os, sys
from govshare.cli.main import main
try:
    main()
finally:
    with open(os.environ["GOVSHARE_TEST_MODULES"], "w") as out:
        json.dump(sorted(sys.modules), out)
"""
# What only the node and the aggregate kinds need: the node's façade loads them all.
NODE = {
    "tenseal",
    "numpy",
    "govshare.node.node",
    "govshare.node.operator",
    "govshare.protocols.bfv_simd",
}
# What only a command that talks to a node (grpc) or parses SQL (sqlglot) needs.
CLIENT = {"grpc", "sqlglot", "govshare.client.analyst", "govshare.client.analyst_aggregate"}
# The modules that define commands: every one in cli/ but the entry point itself.
COMMAND_MODULES = {
    f"govshare.cli.{path.stem}" for path in Path(main_module.__file__).parent.glob("*.py")
} - {"govshare.cli.main", "govshare.cli.__init__", "govshare.cli.__main__"}


def govshare_imports(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``govshare ARGS``; its result and the modules it imported."""
    modules = cwd / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
        env={**(env or os.environ), "GOVSHARE_TEST_MODULES": str(modules)},
    )  # fmt: skip
    return done, set(json.loads(modules.read_text()))


def test_help_lists_every_command_and_imports_none(tmp_path: Path) -> None:
    done, imported = govshare_imports("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == sorted(COMMANDS)
    assert imported & COMMAND_MODULES == set()
    assert imported & (NODE | {"govshare.client.auditor", "grpc"}) == set()


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (["audit", "verify", "--help"], "govshare.cli.accountability"),
        (["federation", "init", "--help"], "govshare.cli.federation"),
        (["dataset", "--help"], "govshare.cli.dataset_controls"),
        (["dataset", "add", "--help"], "govshare.cli.dataset"),
        (["grant", "--help"], "govshare.cli.rights"),
        (["approvals", "list", "--help"], "govshare.cli.approvals"),
        (["crossborder", "--help"], "govshare.cli.crossborder"),
        (["catalog", "list", "--help"], "govshare.cli.catalog"),
        (["node", "--help"], "govshare.cli.node"),
        (["node", "alerts", "clear", "--help"], "govshare.cli.node"),
        (["query", "--help"], "govshare.cli.query"),
        (["query", "psi", "--help"], "govshare.cli.query"),
        (["query", "sql", "--help"], "govshare.cli.aggregate"),
    ],
)
def test_a_commands_help_loads_its_module_and_not_the_node(
    args: list[str], module: str, tmp_path: Path
) -> None:
    done, imported = govshare_imports(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: govshare {' '.join(args[:-1])} ")
    assert module in imported
    assert sorted(imported & NODE) == []


@pytest.mark.parametrize("args", [["query"], ["query", "psi"], ["query", "sql"]])
def test_the_analysts_help_loads_neither_grpc_nor_sqlglot(args: list[str], tmp_path: Path) -> None:
    # The analyst's options show the aggregate defaults (client/aggregate_defaults.py); the
    # clients that talk to nodes and parse SQL load in the commands that ask a query.
    done, imported = govshare_imports(*args, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "govshare.cli.query" in imported
    assert sorted(imported & CLIENT) == []


def test_asking_a_query_loads_the_client(tmp_path: Path) -> None:
    # The counterpart: 'query psi' imports the PSI client (and grpc) in the command, and
    # reaches it: with no identity bundle the client's Identity.load is what fails.
    done, imported = govshare_imports(
        "query", "psi", "--identity", "nobody", "--left", "tax.residents.id_number",
        "--right", "civil.assistance.id_number", "--purpose", "audit", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: "), done.stderr
    assert {"grpc", "govshare.client.analyst", "sqlglot"} <= imported


def test_keygen_runs_without_the_node(tmp_path: Path) -> None:
    done, imported = govshare_imports(
        "node", "keygen", "--home", "home", "--name", "tax", "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "tax"
    assert (tmp_path / "home" / "tax.csr").is_file()
    assert sorted(imported & NODE) == []


def test_an_analysts_saved_aggregate_is_shown_without_the_he_libraries(tmp_path: Path) -> None:
    # 'query result' and 'query results' read the results folder: no node, no HE library, no
    # grpc or sqlglot, even for a bfv-simd aggregate's result (saved as 'query sql' saves it).
    query_id = "ab" * 16
    outcome = AggregateOutcome(
        query_id, QueryKind.INTERSECTION_AGGREGATE,
        (GroupResult("Dongcheng", Figure(42, Fraction(6), 18), {}, {}, False),),
        Fraction(1, 2), 5, {}, BFV_SIMD, None,
    )  # fmt: skip
    ResultsStore(tmp_path / "kept").save(
        query_id, kind=outcome.kind.value, plan={}, result=outcome_to_json(outcome), receipt=None
    )
    args = ("--identity", "me", "--results", "kept")
    shown, imported = govshare_imports("query", "result", "abab", *args, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    # The table (its title wraps to the table's width), then the line naming the query.
    assert "(bfv-simd)" in shown.stdout and "Dongcheng" in shown.stdout
    assert f"query {query_id} (intersection_aggregate), saved " in shown.stdout
    assert "42 ±18" in shown.stdout
    assert sorted(imported & (NODE | CLIENT)) == []
    listed, imported = govshare_imports("query", "results", *args, "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [r["query_id"] for r in json.loads(listed.stdout)] == [query_id]
    assert sorted(imported & (NODE | CLIENT)) == []


def test_a_command_that_opens_the_node_loads_it(tmp_path: Path) -> None:
    # The façade is imported in the command that calls it, and the probe sees that import:
    # 'dataset list' on a home with no node fails in the façade.
    done, imported = govshare_imports("dataset", "list", "--home", "nowhere", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: "), done.stderr
    assert "govshare.node.operator" in imported


def test_an_operator_command_reads_the_node_without_its_query_engine(tmp_path: Path) -> None:
    # The façade opens the node's stores; the node itself (query kinds, HE libraries) loads
    # only to initialise a home or serve it.
    for setup in (
        ["federation", "init", "--name", "demo"],
        ["federation", "enrol", "--role", "node", "--name", "tax", "--jurisdiction", "CN",
         "--address", "127.0.0.1:7101", "--out", "tax"],
        ["node", "init", "--home", "tax", "--listen", "127.0.0.1:7101"],
    ):  # fmt: skip
        done, _ = govshare_imports(*setup, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    done, imported = govshare_imports("dataset", "list", "--home", "tax", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert "govshare.node.operator" in imported
    assert sorted(imported & (NODE - {"govshare.node.operator"})) == []


def test_completing_a_command_name_imports_no_command(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "_GOVSHARE_COMPLETE": "zsh_complete",
        "COMP_WORDS": "govshare ",
        "COMP_CWORD": "1",
    }
    done, imported = govshare_imports(cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    # zsh_complete: type, value and help, one a line, for each candidate.
    lines = done.stdout.splitlines()
    assert lines[1::3] == sorted(COMMANDS)
    for name, text in zip(lines[1::3], lines[2::3], strict=True):
        # click shortens the help it offers to 45 characters.
        assert text and COMMANDS[name].summary.startswith(text.removesuffix("...")), name
    assert imported & COMMAND_MODULES == set()


def test_an_unknown_command_is_clicks_usage_error(tmp_path: Path) -> None:
    done, imported = govshare_imports("nosuch", cwd=tmp_path)
    assert done.returncode == 2
    assert "Error: No such command 'nosuch'." in done.stderr
    assert imported & COMMAND_MODULES == set()


# The listing from the summaries, then from the commands themselves once all are imported, at
# several widths (click shortens each line to fit): printed as JSON by a fresh interpreter.
LISTINGS = """
import json, sys
import click
from click.testing import CliRunner
from govshare.cli.main import COMMANDS, cli

def listings():
    widths = (40, 62, 80, 120)
    return {w: CliRunner().invoke(cli, ["--help"], terminal_width=w).output for w in widths}

lazy = listings()
before = sorted(m for m in sys.modules if m.startswith("govshare.cli."))
ctx = click.Context(cli)
loaded = {name: cli.get_command(ctx, name) is not None for name in COMMANDS}
print(json.dumps({"lazy": lazy, "before": before, "loaded": loaded, "real": listings()}))
"""


def test_the_summaries_are_the_commands_own_short_help(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LISTINGS],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["before"] == ["govshare.cli.main"]
    assert all(seen["loaded"].values()) and set(seen["loaded"]) == set(COMMANDS)
    for width, lazy in seen["lazy"].items():
        assert lazy == seen["real"][width], width
    # A line click shortened, from the summary.
    assert "  approvals       List, show, approve and deny queries...\n" in seen["lazy"]["62"]
