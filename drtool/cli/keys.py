"""``drtool keys``: create the operators' identity and the backup host's signing key."""

from __future__ import annotations

from pathlib import Path

import click

from drtool import keys as keyfiles
from drtool.cli.context import CliState, emit_json
from drtool.services import rotate as rotate_svc


@click.group()
def keys() -> None:
    """Create key files (mode 0600; never overwritten).

    \b
    The backup host (the NAS) holds only public recipients and a signing key:
      drtool keys generate ops.key          on an operator's machine; keep it OFF the NAS
      drtool keys signing-key signing.key   on the NAS
    Put the printed recipient in keys.recipients and the verify key in keys.verify_key
    (every config that reads the repository must pin it: the keys listed in the repository
    header are never trusted; `drtool keys verify-key signing.key` prints it again).

    \b
    Later (docs/OPERATIONS.md, "Key runbooks"):
      drtool keys rotate --add-recipient age1... --remove-recipient age1...
      drtool keys signing-key --rotate new-signing.key     on the NAS
    """


@keys.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--passphrase",
    is_flag=True,
    help="Protect the file with a passphrase (age scrypt; asked on the terminal).",
)
def generate(path: Path, passphrase: bool) -> None:
    """Write a new age identity to PATH and print its public recipient (age1...)."""
    secret = (
        click.prompt("passphrase", hide_input=True, confirmation_prompt=True)
        if passphrase
        else None
    )
    recipient = keyfiles.write_identity(path, passphrase=secret)
    click.echo(recipient)


@keys.command(name="signing-key")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--rotate",
    is_flag=True,
    help="Replace the configured keys.signing_key_file by the new key in the repository.",
)
@click.pass_obj
def signing_key(state: CliState, path: Path, rotate: bool) -> None:
    """Write a new Ed25519 manifest signing key to PATH and print its verify key.

    \b
    With --rotate (on the backup host): the current key (keys.signing_key_file) signs the
    hand-over to the new one in drtool-repo.json, and the new key vouches for the old one's
    period. Manifests signed by the old key stay valid up to now; one it signs later is
    INVALID. Readers pinning either verify key keep working. Then set
    keys.signing_key_file to PATH and keys.verify_key to the printed key.
    """
    if not rotate:
        click.echo(keyfiles.write_signing_key(path))
        return
    done = rotate_svc.rotate_signing_key(state.config(), str(path))
    click.echo(done.new_verify_key)
    click.echo(
        f"signing key rotated at {done.at}: set keys.signing_key_file = {path} and "
        f"keys.verify_key = {done.new_verify_key} (backup host and every reader)",
        err=True,
    )


@keys.command(name="verify-key")
@click.argument("path", type=click.Path(path_type=Path))
def verify_key(path: Path) -> None:
    """Print the verify key of the signing key in PATH (to pin as keys.verify_key)."""
    click.echo(keyfiles.verify_key_text(keyfiles.load_signing_key(path).public_key()))


@keys.command()
@click.option(
    "--add-recipient",
    "add",
    multiple=True,
    metavar="AGE1...",
    help="A public age recipient to add (repeatable).",
)
@click.option(
    "--remove-recipient",
    "remove",
    multiple=True,
    metavar="AGE1...",
    help="A recipient to remove (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def rotate(state: CliState, add: tuple[str, ...], remove: tuple[str, ...], as_json: bool) -> None:
    """Re-wrap every stored object for a new recipient set; the payloads stay as they are.

    \b
    Run it where the operators' identity is (keys.identity_file decrypts the current
    headers) with the signing key whose verify key is pinned (records of the new object
    hashes are signed, ADR 0023). Resumable: after a kill, run it again (with the same
    options or none). The repository header's recipients change last. Then set
    keys.recipients on the backup host to the new list. With Object Lock the old object
    versions (old header) stay until their retention ends: a removed key stays useful to
    whoever holds it and can read the bucket until then (the date is printed).
    """
    result = rotate_svc.rotate(state.config(), list(add), list(remove))
    if as_json:
        emit_json(result.__dict__)
        return
    verb = "resumed and finished" if result.resumed else "finished"
    click.echo(
        f"rotation {result.rotation_id} {verb}: {result.rewritten} objects re-wrapped, "
        f"{result.recognised} recognised from an interrupted run, {result.already} done before"
    )
    click.echo("recipients now: " + ", ".join(result.recipients_after))
    click.echo("set keys.recipients on the backup host to exactly these recipients")
    if result.skipped_invalid:
        click.echo(
            f"not rotated: the objects of {len(result.skipped_invalid)} snapshot(s) whose "
            f"manifest is not authentic ({', '.join(result.skipped_invalid[:3])})"
        )
    if result.unreferenced:
        click.echo(
            f"not rotated: {result.unreferenced} sealed object(s) no manifest or WAL index names "
            "(incomplete backups; `drtool prune` removes them)"
        )
    if result.old_versions_until:
        click.echo(
            "Object Lock: the old object versions (old headers) stay until "
            f"{result.old_versions_until}; the removed key opens them until then and is "
            "useless after (with a NoncurrentVersionExpiration rule removing them)"
        )
    elif result.versioned:
        click.echo(
            "the bucket is versioned: the old versions (old headers) stay until a "
            "NoncurrentVersionExpiration rule removes them; the removed key opens them until then"
        )
    else:
        click.echo("no old versions are kept: the removed key opens no stored object now")
