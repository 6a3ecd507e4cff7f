"""The layer rules of DESIGN.md: imports point downward only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# protocols/ is pure: no transport, storage, CLI, or higher govshare layer.
PROTOCOLS_FORBIDDEN = (
    "grpc",
    "sqlite3",
    "sqlite_utils",
    "click",
    "socket",
    "http",
    "urllib",
    "requests",
    "govshare.node",
    "govshare.cli",
    "govshare.v1",
)
NODE_FORBIDDEN = ("click", "rich", "govshare.cli")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"), [("protocols", PROTOCOLS_FORBIDDEN), ("node", NODE_FORBIDDEN)]
)
def test_layer_imports_point_downward(folder: str, forbidden: tuple[str, ...]) -> None:
    assert offending(folder, forbidden) == []


def test_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import grpc\nfrom sqlite3 import connect\n", encoding="utf-8")
    assert {"grpc", "sqlite3", "sqlite3.connect"} <= imported_modules(sample)
