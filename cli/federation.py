"""``govshare federation``: the federation administrator's commands."""

from __future__ import annotations

import os
from pathlib import Path

import click

from govshare.cli.common import (
    console,
    emit_json,
    grouped_fingerprint,
    json_option,
    render_table,
    suite_option,
)
from govshare.model.governance import Role
from govshare.model.identity import EnrolmentRequest, Federation, init_federation
from govshare.model.operator_act import Duty, parse_duties
from govshare.protocols.suite import suite_by_name

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
@suite_option(
    "Crypto suite every member signs, hashes and encrypts with: 'standard' (Ed25519, SHA-256, "
    "AES) or 'sm' (SM2, SM3, SM4). Fixed for the federation's life."
)
@json_option
def init(directory: Path, name: str, suite: str, as_json: bool) -> None:
    """Create the federation CA and an empty signed roster."""
    crypto = suite_by_name(suite)
    cert, roster = init_federation(directory, name, suite=crypto)
    if as_json:
        emit_json({
            "federation": name, "directory": str(directory), "roster_version": roster.version,
            "ca_valid_until": cert.not_valid_after_utc.isoformat(), "suite": roster.suite,
        })  # fmt: skip
        return
    console.print(
        f"federation [bold]{name}[/] created in {directory} on the {roster.suite} suite "
        f"({crypto.signature_algorithm}, {crypto.hash_name}, {crypto.cipher_name}; "
        f"CA valid until {cert.not_valid_after_utc:%Y-%m-%d}, roster version {roster.version})"
    )


_role = click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=None,
    help="Member role (required unless --reissue, which keeps the roster's).",
)
_jurisdiction = click.option(
    "--jurisdiction",
    default=None,
    help="ISO 3166-1 alpha-2 code, e.g. CN (required unless --reissue).",
)
_address = click.option(
    "--address",
    default=None,
    help="HOST:PORT where a node listens (nodes only; --reissue keeps the roster's).",
)
_reissue = click.option(
    "--reissue",
    is_flag=True,
    help="Replace an enrolled member's certificate and keys; once the roster is published "
    "nodes refuse the old ones.",
)


def _enrolled_line(action: str, federation: Federation, name: str, out: Path) -> str:
    member = federation.roster.member(name)
    duties = f" for node {member.node} ({', '.join(member.duties)})" if member.node else ""
    return (
        f"{action} {member.role.value} [bold]{member.name}[/]{duties} ({member.jurisdiction}) "
        f"into {out}; roster version {federation.roster.version}"
    )


_node = click.option("--node", default=None, help="Operators: the node the person acts for.")
_duties = click.option(
    "--duties",
    default=None,
    help="Operators: comma-separated duties at the node: "
    + ",".join(d.value for d in Duty)
    + " (a re-issue keeps the roster's unless given).",
)


@group.command("enrol")
@_fed_dir
@_role
@click.option("--name", required=True, help="Member name (one DNS label).")
@_jurisdiction
@_address
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write the member's identity bundle into.",
)
@_reissue
@_node
@_duties
@json_option
def enrol(
    directory: Path,
    role: str | None,
    name: str,
    jurisdiction: str | None,
    address: str | None,
    out: Path,
    reissue: bool,
    node: str | None,
    duties: str | None,
    as_json: bool,
) -> None:
    """Issue a member's TLS certificate and signing key, and re-sign the roster.

    An operator (--role operator) is a named person bound to one node (--node) with duties
    there (--duties); every act they perform at the node is signed with their key and logged
    with their name. Publish the roster to the node for it to know them.

    With --reissue an enrolled member gets new keys and a new certificate in OUT; publish the
    roster (or hand it over with 'roster --out') and nodes refuse the old certificate.
    """
    federation, _ = Federation.load(directory).enrol(
        role=Role(role) if role else None,
        name=name,
        jurisdiction=jurisdiction,
        address=address,
        out=out,
        reissue=reissue,
        node=node,
        duties=parse_duties(duties) if duties else None,
    )
    if as_json:
        emit_json({
            "member": federation.roster.member(name).to_json(), "reissued": reissue,
            "roster_version": federation.roster.version, "out": str(out),
        })  # fmt: skip
        return
    console.print(_enrolled_line("re-issued" if reissue else "enrolled", federation, name, out))


@group.command("sign")
@_fed_dir
@click.argument("request", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_role
@_jurisdiction
@_address
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write the member's public bundle into: tls.crt, ca.crt, roster.json.",
)
@_reissue
@_node
@_duties
@json_option
def sign(
    directory: Path,
    request: Path,
    role: str | None,
    jurisdiction: str | None,
    address: str | None,
    out: Path,
    reissue: bool,
    node: str | None,
    duties: str | None,
    as_json: bool,
) -> None:
    """Enrol a member from its certificate request (REQUEST, from 'govshare node keygen').

    The member made its keys and keeps them: OUT receives only its certificate, the CA
    certificate and the signed roster, to copy into the member's home. Compare the request
    fingerprint printed here with the one the member's keygen printed before handing OUT back.
    """
    parsed = EnrolmentRequest.from_pem(request.read_bytes())
    federation, member, _ = Federation.load(directory).sign_request(
        parsed,
        role=Role(role) if role else None,
        jurisdiction=jurisdiction,
        address=address,
        out=out,
        reissue=reissue,
        node=node,
        duties=parse_duties(duties) if duties else None,
    )
    if as_json:
        emit_json(
            {
                "member": member.to_json(),
                "request_fingerprint": parsed.fingerprint,
                "roster_version": federation.roster.version,
                "out": str(out),
            }
        )
        return
    console.print(f"request fingerprint {grouped_fingerprint(parsed.fingerprint)}", soft_wrap=True)
    console.print(
        _enrolled_line("re-issued" if reissue else "enrolled", federation, member.name, out)
    )
    console.print(
        f"copy {out}/tls.crt, ca.crt and roster.json into {member.name}'s home", soft_wrap=True
    )


@group.command("revoke")
@_fed_dir
@click.argument("name")
@json_option
def revoke(directory: Path, name: str, as_json: bool) -> None:
    """Remove a member from the roster; publish the roster for nodes to refuse it."""
    federation = Federation.load(directory).revoke(name)
    if as_json:
        emit_json({"revoked": name, "roster_version": federation.roster.version})
        return
    console.print(
        f"{name} removed; roster version {federation.roster.version} "
        "(run 'govshare federation publish' to hand it to the nodes)"
    )


@group.command("suspend")
@_fed_dir
@click.argument("name")
@click.option("--reason", required=True, help="Why (signed into the roster; nodes log it).")
@click.option(
    "--by",
    default=lambda: os.environ.get("USER", "administrator"),
    show_default="$USER",
    help="Who suspends (the administrator's name, signed into the roster).",
)
@click.option(
    "--publish",
    "publish_now",
    is_flag=True,
    help="Hand the new roster at once to every bundle this federation folder wrote.",
)
@json_option
def suspend(
    directory: Path, name: str, reason: str, by: str, publish_now: bool, as_json: bool
) -> None:
    """Suspend a member at once (an incident): remove it from the roster with the reason, and
    with --publish hand the new roster to every node this folder enrolled, which refuse the
    member from their next call and log the suspension (roster.updated; audit check reports
    member.suspended)."""
    text = reason.strip()
    if not text:
        raise click.UsageError("--reason must not be empty")
    note = {"kind": "suspend", "member": name, "reason": text, "by": by}
    federation = Federation.load(directory).revoke(name, note=note)
    published: list[Path] = []
    gone: list[Path] = []
    if publish_now:
        published, gone = federation.publish_everywhere()
    if as_json:
        emit_json(
            {
                "suspended": name,
                "reason": text,
                "by": by,
                "roster_version": federation.roster.version,
                "published": [str(p) for p in published],
                "unreachable": [str(p) for p in gone],
            }
        )
        return
    console.print(
        f"{name} suspended by {by}: {text}; roster version {federation.roster.version}"
        + (
            f" published to {len(published)} bundle(s)"
            if publish_now
            else " (run 'govshare federation publish' to hand it to the nodes)"
        ),
        soft_wrap=True,
    )
    for folder in gone:
        console.print(f"[yellow]not published[/] (no bundle any more): {folder}", soft_wrap=True)


@group.command("publish")
@_fed_dir
@click.argument(
    "bundles", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path)
)
@json_option
def publish(directory: Path, bundles: tuple[Path, ...], as_json: bool) -> None:
    """Copy the current signed roster into members' identity bundles."""
    federation = Federation.load(directory)
    for bundle in bundles:
        federation.publish_roster(bundle)
    if as_json:
        emit_json({
            "roster_version": federation.roster.version, "published": [str(b) for b in bundles]
        })  # fmt: skip
        return
    console.print(
        f"roster version {federation.roster.version} published to {len(bundles)} bundle(s)"
    )


@group.command("roster")
@_fed_dir
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the signed roster file here, to hand to nodes on other machines "
    "('govshare node roster install').",
)
@json_option
def roster(directory: Path, out: Path | None, as_json: bool) -> None:
    """Show the signed roster's members, or write the signed roster file (--out)."""
    federation = Federation.load(directory)
    current = federation.roster
    if out is not None:
        federation.export_roster(out)
        if as_json:
            emit_json({"out": str(out), "version": current.version})
        else:
            console.print(f"roster version {current.version} written to {out}")
        return
    if as_json:
        emit_json(current.to_json())
        return
    render_table(
        f"federation {current.federation} — roster version {current.version}",
        ["name", "role", "jurisdiction", "address", "certificate (sha256)"],
        (
            (
                m.name,
                m.role.value,
                m.jurisdiction,
                m.address or (f"{m.node}: {','.join(m.duties)}" if m.node else ""),
                m.tls_fingerprint[:16] + "…",
            )
            for m in current.members
        ),
    )
