"""``drtool keys``: create the operators' identity and the backup host's signing key."""

from __future__ import annotations

from pathlib import Path

import click

from drtool import keys as keyfiles


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
def signing_key(path: Path) -> None:
    """Write a new Ed25519 manifest signing key to PATH and print its verify key."""
    click.echo(keyfiles.write_signing_key(path))


@keys.command(name="verify-key")
@click.argument("path", type=click.Path(path_type=Path))
def verify_key(path: Path) -> None:
    """Print the verify key of the signing key in PATH (to pin as keys.verify_key)."""
    click.echo(keyfiles.verify_key_text(keyfiles.load_signing_key(path).public_key()))
