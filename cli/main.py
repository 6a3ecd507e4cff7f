"""The ``govshare`` command: one click group per user.

federation (administrator), node / dataset / grant / crossborder / approvals (department
operator), catalog / query (analyst), audit (auditor). Errors become one line and exit code 1;
``--verbose`` shows the trace.
"""

from __future__ import annotations

import sys
import traceback

import click

from govshare.protocols.errors import GovshareError

EXIT_ERROR = 1


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
        approvals,
        audit,
        catalog,
        crossborder,
        dataset,
        federation,
        grant,
        node,
        query,
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
    ):
        cli.add_command(module.group)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        code = cli.main(args=argv, prog_name="govshare", standalone_mode=False)
    except click.exceptions.Abort:
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
