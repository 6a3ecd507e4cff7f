"""The layer rules of DESIGN.md: imports point downward only.

    cli/        may import client/, model/, rpc/, protocols/ and, of node/, only the operator's
                façade (govshare.node.operator), the server entry point (node serve) and config
    client/     the analyst's and the auditor's programs: never node/
    node/       the department server: never client/
    rpc/        gRPC plumbing both sides use: never node/ or client/, no storage
    model/      the shared vocabulary: none of node/, client/, rpc/; no transport, no storage
    protocols/  pure: no transport, storage, CLI or higher govshare layer

Every import counts, at module level or inside a function; relative imports are resolved.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

UI = ("click", "rich")
STORAGE = ("sqlite3", "sqlite_utils")
TRANSPORT = ("grpc", "socket", "http", "urllib", "requests", "govshare.v1")


@dataclass(frozen=True)
class Rule:
    """Imports of ``folder`` (package ``govshare.<folder>``) that are refused.

    ``forbidden`` names modules refused with all their submodules; ``allowed`` names the
    submodules of a forbidden package that stay allowed (with their own submodules).
    ``violation`` is an import the rule must refuse: the self-test below writes it into a
    sample file in the folder and checks the rule catches it.
    """

    folder: str
    forbidden: tuple[str, ...]
    violation: str
    allowed: tuple[str, ...] = ()


RULES = (
    Rule(
        "protocols",
        (
            *TRANSPORT,
            *STORAGE,
            "click",
            "govshare.node",
            "govshare.client",
            "govshare.model",
            "govshare.rpc",
            "govshare.cli",
            "govshare.examples",
        ),
        violation="from govshare.model.states import PENDING",
    ),
    Rule(
        "model",
        (
            *TRANSPORT,
            *STORAGE,
            *UI,
            "govshare.node",
            "govshare.client",
            "govshare.rpc",
            "govshare.cli",
            "govshare.examples",
        ),
        violation="from govshare.rpc.client import NodeClient",
    ),
    Rule(
        "rpc",
        (*STORAGE, *UI, "govshare.node", "govshare.client", "govshare.cli", "govshare.examples"),
        violation="from govshare.node.policy.grants import GrantStore",
    ),
    Rule(
        "client",
        (*UI, "govshare.node", "govshare.cli", "govshare.examples"),
        violation="from govshare.node.stores.query_store import QueryStore",
    ),
    Rule(
        "node",
        (*UI, "govshare.client", "govshare.cli", "govshare.examples"),
        violation="import govshare.client.auditor",
    ),
    Rule(
        "cli",
        (*STORAGE, "grpc", "govshare.node"),
        violation="from govshare.node.data.catalog import Catalogue",
        allowed=("govshare.node.operator", "govshare.node.api.server", "govshare.node.config"),
    ),
)


def package_of(path: Path, root: Path) -> str:
    """The dotted package a file belongs to (``node/api/auth.py`` → ``govshare.node.api``)."""
    parts = path.relative_to(root).with_suffix("").parts[:-1]
    return ".".join(("govshare", *parts))


def imported_modules(path: Path, package: str = "") -> set[str]:
    """Every module a file imports; ``from m import n`` gives both ``m`` and ``m.n``.

    ``package`` resolves relative imports (``from . import x``); without it they are skipped.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module
            elif package:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                continue
            if module:
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def refused(name: str, rule: Rule) -> bool:
    if not any(_within(name, f) for f in rule.forbidden):
        return False
    # An allowed module, its submodules, or a package on the way to one (``from govshare.node
    # import operator`` also names ``govshare.node``) stays allowed.
    return not any(_within(name, a) or _within(a, name) for a in rule.allowed)


def offending(rule: Rule, root: Path = REPO) -> list[str]:
    found = []
    for path in sorted((root / rule.folder).rglob("*.py")):
        for name in sorted(imported_modules(path, package_of(path, root))):
            if refused(name, rule):
                found.append(f"{path.relative_to(root)} imports {name}")
    return found


@pytest.mark.parametrize("rule", RULES, ids=[r.folder for r in RULES])
def test_layer_imports_point_downward(rule: Rule) -> None:
    assert (REPO / rule.folder).is_dir()
    assert offending(rule) == []


@pytest.mark.parametrize("rule", RULES, ids=[r.folder for r in RULES])
def test_each_rule_catches_its_violation(rule: Rule, tmp_path: Path) -> None:
    sample = tmp_path / rule.folder / "sub" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(f"def f() -> None:\n    {rule.violation}\n", encoding="utf-8")
    assert offending(rule, tmp_path) == [
        f"{Path(rule.folder, 'sub', 'sample.py')} imports {name}"
        for name in sorted(imported_modules(sample))
        if refused(name, rule)
    ]
    assert offending(rule, tmp_path) != []


def test_the_cli_reaches_the_node_only_through_its_facade(tmp_path: Path) -> None:
    (cli := tmp_path / "cli").mkdir()
    cli_rule = next(r for r in RULES if r.folder == "cli")
    allowed = (
        "from govshare.node.operator import Operator\n"
        "from govshare.node import operator\n"
        "from govshare.node.api.server import serve\n"
        "from govshare.node.config import NodeConfig\n"
        "from govshare.client.analyst import run_psi\n"
        "from govshare.model.states import PENDING\n"
        "from govshare.rpc.client import NodeClient\n"
    )
    (cli / "fine.py").write_text(allowed, encoding="utf-8")
    assert offending(cli_rule, tmp_path) == []
    (cli / "bad.py").write_text(
        "from govshare.node import node\nfrom govshare.node.policy.grants import GrantStore\n",
        encoding="utf-8",
    )
    assert offending(cli_rule, tmp_path) == [
        "cli/bad.py imports govshare.node.node",
        "cli/bad.py imports govshare.node.policy.grants",
        "cli/bad.py imports govshare.node.policy.grants.GrantStore",
    ]


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    sample = tmp_path / "client" / "sample.py"
    sample.parent.mkdir()
    sample.write_text("from ..node.data import catalog\n", encoding="utf-8")
    assert "govshare.node.data.catalog" in imported_modules(sample, package_of(sample, tmp_path))
    client_rule = next(r for r in RULES if r.folder == "client")
    assert offending(client_rule, tmp_path) != []


def test_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import grpc\nfrom sqlite3 import connect\n", encoding="utf-8")
    assert {"grpc", "sqlite3", "sqlite3.connect"} <= imported_modules(sample)
