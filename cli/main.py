"""The ``govshare`` command: one click group per user.

federation (administrator), node / dataset / grant / crossborder / approvals (department
operator), catalog / query (analyst), audit (auditor). Errors become one line and exit code 1;
``--verbose`` shows the trace. Ctrl-C stops any command with the line ``interrupted`` and exit
code 130, as shells report a command ended by SIGINT (``node serve`` handles SIGINT itself: it
stops gracefully, as on SIGTERM).

Shell completion is click's: ``eval "$(_GOVSHARE_COMPLETE=bash_source govshare)"`` (or
``zsh_source``, ``fish_source``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from types import FrameType

import click

from govshare.protocols.errors import GovshareError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
# Seconds an interrupted command has to unwind (finally blocks, closing channels) before the
# process ends regardless: a call blocked in a worker thread (a catalogue request to a node
# that does not answer) would otherwise hold the exit until the call's own deadline.
INTERRUPT_GRACE = 3.0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show the full trace on errors.")
@click.version_option(package_name="govshare")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """govshare: joint queries across departments over data that never leaves them."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def _register() -> None:
    # Imported here so that each user's commands live in their own module.
    from govshare.cli import (
        accountability,  # noqa: F401  (its commands join the audit group on import)
        approvals,
        audit,
        catalog,
        crossborder,
        dataset,
        dataset_controls,  # noqa: F401  (its commands join the dataset group on import)
        federation,
        grant,
        node,
        query,
        responsibility,
        rights,  # noqa: F401  (its commands join the grant group on import)
    )

    for module in (
        federation,
        node,
        dataset,
        grant,
        crossborder,
        approvals,
        catalog,
        query,
        audit,
        responsibility,
    ):
        cli.add_command(module.group)


_register()


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
