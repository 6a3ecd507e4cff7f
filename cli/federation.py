"""``govshare federation``: the federation administrator's commands."""

from __future__ import annotations

import os
from pathlib import Path

import click

from govshare.cli.common import console, emit_json, json_option, render_table
from govshare.model.governance import Role
from govshare.model.identity import Federation, init_federation

_fed_dir = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: Path(os.environ.get("GOVSHARE_FEDERATION", "federation")),
    show_default="$GOVSHARE_FEDERATION or ./federation",
    help="The federation folder holding the CA and the roster.",
)


@click.group("federation")
def group() -> None:
    """Create the federation trust root and enrol its members (administrator)."""


@group.command("init")
@_fed_dir
@click.option("--name", required=True, help="Federation name (one DNS label).")
def init(directory: Path, name: str) -> None:
    """Create the federation CA and an empty signed roster."""
    cert, roster = init_federation(directory, name)
    console.print(
        f"federation [bold]{name}[/] created in {directory} "
        f"(CA valid until {cert.not_valid_after_utc:%Y-%m-%d}, roster version {roster.version})"
    )


@group.command("enrol")
@_fed_dir
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), required=True, help="Member role."
)
@click.option("--name", required=True, help="Member name (one DNS label).")
@click.option("--jurisdiction", required=True, help="ISO 3166-1 alpha-2 code, e.g. CN.")
@click.option("--address", default="", help="HOST:PORT where a node listens (nodes only).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write the member's identity bundle into.",
)
def enrol(
    directory: Path, role: str, name: str, jurisdiction: str, address: str, out: Path
) -> None:
    """Issue a member's TLS certificate and signing key, and re-sign the roster."""
    federation = Federation.load(directory)
    federation, member = federation.enrol(
        role=Role(role), name=name, jurisdiction=jurisdiction, address=address, out=out
    )
    console.print(
        f"enrolled {member.role.value} [bold]{member.name}[/] ({member.jurisdiction}) "
        f"into {out}; roster version {federation.roster.version}"
    )


@group.command("revoke")
@_fed_dir
@click.argument("name")
def revoke(directory: Path, name: str) -> None:
    """Remove a member from the roster; publish the roster for nodes to refuse it."""
    federation = Federation.load(directory).revoke(name)
    console.print(
        f"{name} removed; roster version {federation.roster.version} "
        "(run 'govshare federation publish' to hand it to the nodes)"
    )


@group.command("publish")
@_fed_dir
@click.argument(
    "bundles", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path)
)
def publish(directory: Path, bundles: tuple[Path, ...]) -> None:
    """Copy the current signed roster into members' identity bundles."""
    federation = Federation.load(directory)
    for bundle in bundles:
        federation.publish_roster(bundle)
    console.print(
        f"roster version {federation.roster.version} published to {len(bundles)} bundle(s)"
    )


@group.command("roster")
@_fed_dir
@json_option
def roster(directory: Path, as_json: bool) -> None:
    """Show the signed roster's members."""
    current = Federation.load(directory).roster
    if as_json:
        emit_json(current.to_json())
        return
    render_table(
        f"federation {current.federation} — roster version {current.version}",
        ["name", "role", "jurisdiction", "address", "certificate (sha256)"],
        (
            (m.name, m.role.value, m.jurisdiction, m.address, m.tls_fingerprint[:16] + "…")
            for m in current.members
        ),
    )
