"""Shared options and rendering for govshare's click commands.

The CLI only parses and renders: every command calls the client or node API and prints the
result as a rich table, or as JSON with ``--json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from govshare.protocols.suite import STANDARD, SUITE_NAMES

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


def home_option(func: F) -> F:
    """``--home``: a node's home folder (default ``$GOVSHARE_HOME`` or the current folder)."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: Path(os.environ.get("GOVSHARE_HOME", ".")),
        show_default="$GOVSHARE_HOME or .",
        help="The node's home folder.",
    )(func)


def identity_option(func: F) -> F:
    """``--identity``: a member's identity bundle (default ``$GOVSHARE_IDENTITY`` or ``.``)."""
    return click.option(
        "--identity",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: Path(os.environ.get("GOVSHARE_IDENTITY", ".")),
        show_default="$GOVSHARE_IDENTITY or .",
        help="Your identity bundle from 'govshare federation enrol'.",
    )(func)


def json_option(func: F) -> F:
    """``--json``: print machine-readable JSON instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def suite_option(help_text: str) -> Callable[[F], F]:
    """``--suite standard|sm``: a federation's crypto suite (govshare.protocols.suite)."""
    return click.option(
        "--suite", type=click.Choice(SUITE_NAMES), default=STANDARD.name, show_default=True,
        help=help_text,
    )  # fmt: skip


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def render_table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    whole: Sequence[str] = (),
    plain_when_piped: bool = False,
) -> None:
    """Print rows as a rich table; no cell is ever cut short (long cells fold).

    Args:
        whole: columns (ids) kept whole on one line however narrow the terminal: the other
            columns fold around them.
        plain_when_piped: when stdout is not a terminal, print tab-separated lines instead
            (a header line, then one line per row; no title), for ``cut`` and ``grep``.
    """
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    if plain_when_piped and not console.is_terminal:
        for line in (list(columns), *cells):
            click.echo("\t".join(_plain(cell) for cell in line))
        return
    table = Table(title=title, header_style="bold")
    for index, column in enumerate(columns):
        if column in whole:
            width = max((len(row[index]) for row in cells), default=0)
            table.add_column(column, no_wrap=True, min_width=max(width, len(column)))
        else:
            table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console.print(table)


def _plain(cell: str) -> str:
    """A cell on one tab-separated line: tabs and line breaks become spaces."""
    return " ".join(cell.replace("\t", " ").splitlines())


def grouped_fingerprint(hex_digest: str) -> str:
    """A hex fingerprint in groups of four, to read out over the telephone."""
    return " ".join(hex_digest[i : i + 4] for i in range(0, len(hex_digest), 4))
