"""The ``govshare`` command: one click group per user.

federation (administrator), node / dataset / grant / crossborder / approvals (department
operator), catalog / query (analyst), audit (auditor). Errors become one line and exit code 1;
``--verbose`` shows the trace. Ctrl-C stops any command with the line ``interrupted`` and exit
code 130, as shells report a command ended by SIGINT (``node serve`` handles SIGINT itself: it
stops gracefully, as on SIGTERM).

A command's module is imported only when that command is used (``COMMANDS``), so that each
command loads what it needs: ``govshare --help`` and completion of a command's name import none.
The node's façade (``govshare.node.operator``) loads the whole node, its query kinds and HE
libraries with it: the command modules import it inside the functions that call it (and under
``TYPE_CHECKING`` for annotations), so that their --help and the commands that do not open the
node (``node keygen``, ``catalog``) start without it. tests/cli/test_cli_lazy.py checks both.

Shell completion is click's: ``eval "$(_GOVSHARE_COMPLETE=bash_source govshare)"`` (or
``zsh_source``, ``fish_source``).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from gettext import gettext
from types import FrameType
from typing import Any

import click
from click.shell_completion import CompletionItem

from govshare.protocols.errors import GovshareError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
# Seconds an interrupted command has to unwind (finally blocks, closing channels) before the
# process ends regardless: a call blocked in a worker thread (a catalogue request to a node
# that does not answer) would otherwise hold the exit until the call's own deadline.
INTERRUPT_GRACE = 3.0


@dataclass(frozen=True)
class Lazy:
    """A command of the group, imported only when it is used.

    ``target`` is ``"module:attribute"``, the click command; ``extensions`` are modules whose
    commands join that group when they are imported (``cli/accountability.py`` adds ``audit
    rights``). ``summary`` is the one line ``govshare --help`` lists, so that listing the
    commands imports none of them; tests/cli/test_cli_lazy.py checks it is each command's own.
    """

    target: str
    summary: str
    extensions: tuple[str, ...] = ()

    def load(self) -> click.Command:
        module, _, attribute = self.target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.target} is not a click command")
        for extension in self.extensions:
            importlib.import_module(extension)
        return command


# Every command of ``govshare``, by name: the only list of them.
COMMANDS: dict[str, Lazy] = {
    "approvals": Lazy(
        "govshare.cli.approvals:group",
        "List, show, approve and deny queries waiting for this node's approval (operator).",
    ),
    "audit": Lazy(
        "govshare.cli.audit:group",
        "Pull, verify and prove the nodes' signed audit logs (auditor).",
        extensions=("govshare.cli.accountability",),
    ),
    "catalog": Lazy(
        "govshare.cli.catalog:group", "Discover datasets across the federation (analyst)."
    ),
    "crossborder": Lazy(
        "govshare.cli.crossborder:group",
        "Record, list and revoke cross-border assessments of datasets (operator).",
    ),
    "dataset": Lazy(
        "govshare.cli.dataset:group",
        "Register, refresh, list, show and remove the node's datasets (operator).",
        extensions=("govshare.cli.dataset_controls",),
    ),
    "federation": Lazy(
        "govshare.cli.federation:group",
        "Create the federation trust root and enrol its members (administrator).",
    ),
    "grant": Lazy(
        "govshare.cli.grant:group",
        "Grant, list and revoke use rights on the node's datasets (operator).",
        extensions=("govshare.cli.rights",),
    ),
    "node": Lazy("govshare.cli.node:group", "Initialise and run a department node (operator)."),
    "query": Lazy("govshare.cli.query:group", "Ask joint queries across departments (analyst)."),
    "responsibility": Lazy(
        "govshare.cli.responsibility:group",
        "Who answers for what, from the verified logs (auditor).",
    ),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module when that subcommand is used (click's
    "Lazily Loading Subcommands"). Its help and shell completion list the commands from their
    summaries, importing none."""

    def __init__(self, *args: Any, lazy: Mapping[str, Lazy], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(self.lazy[cmd_name].load(), cmd_name)
        return super().get_command(ctx, cmd_name)

    def _visible(self, name: str) -> bool:
        command = self.commands.get(name)
        return command is None or not command.hidden

    def _short_help(self, name: str, limit: int) -> str:
        """The command's line as its ``get_short_help_str(limit)`` gives it, without importing a
        command not yet loaded: click shortens its summary the way it shortens a help text."""
        command = self.commands.get(name) or click.Command(name, help=self.lazy[name].summary)
        return command.get_short_help_str(limit)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = [name for name in self.list_commands(ctx) if self._visible(name)]
        if names:
            # click's layout: three times the default spacing after the longest name.
            limit = formatter.width - 6 - max(len(name) for name in names)
            with formatter.section(gettext("Commands")):
                formatter.write_dl([(name, self._short_help(name, limit)) for name in names])

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        items = [
            CompletionItem(name, help=self._short_help(name, 45))
            for name in self.list_commands(ctx)
            if name.startswith(incomplete) and self._visible(name)
        ]
        # The group's own options, as click's Group.shell_complete adds them.
        return items + click.Command.shell_complete(self, ctx, incomplete)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show the full trace on errors.")
@click.version_option(package_name="govshare")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """govshare: joint queries across departments over data that never leaves them."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


_reported = threading.Lock()


def _report_interrupted() -> None:
    """Print ``interrupted`` once, whichever of the main thread and the grace timer is first."""
    if _reported.acquire(blocking=False):
        click.echo("interrupted", err=True)


def _end_interrupted() -> None:
    _report_interrupted()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    # The first Ctrl-C unwinds the command as Python does (KeyboardInterrupt), bounded by
    # INTERRUPT_GRACE; a second one ends the process at once.
    signal.signal(signal.SIGINT, lambda signum, frame: _end_interrupted())
    timer = threading.Timer(INTERRUPT_GRACE, _end_interrupted)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        code = cli.main(args=argv, prog_name="govshare", standalone_mode=False)
    except KeyboardInterrupt:
        _report_interrupted()
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Abort as exc:
        # click turns a KeyboardInterrupt inside a command into Abort (as it does EOF at a
        # prompt), after echoing a newline that ends the terminal's "^C" line.
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _report_interrupted()
            sys.exit(EXIT_INTERRUPTED)
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (GovshareError, OSError) as exc:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # a bug or an unexpected environment: still one line
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with --verbose for the trace)"
        click.echo(f"error: unexpected {type(exc).__name__}: {exc}{hint}", err=True)
        sys.exit(EXIT_ERROR)
    if isinstance(code, int) and code:
        sys.exit(code)
