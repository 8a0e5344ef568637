"""Key files: age identities and recipients, and the Ed25519 manifest-signing key.

Identity files use the ``age-keygen`` format (comments, one ``AGE-SECRET-KEY-1...`` per line)
or that text age-encrypted with a passphrase (exactly what ``age -p`` makes of it). Signing
keys are one line ``drtool-sign-1:<base64>``; verify keys are ``drtool-verify-1:<base64>``
(unpadded standard base64 of the raw 32-byte Ed25519 keys). Every key file is created 0600,
exclusively, and refused when group or others can access it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from drtool.errors import ConfigError, IntegrityError, WrongKey
from drtool.pipeline.age import (
    VERSION_LINE,
    decrypt_with_passphrase,
    encrypt_with_passphrase,
    generate_identity,
    parse_identity,
    parse_recipient,
)

SIGN_PREFIX = "drtool-sign-1:"
VERIFY_PREFIX = "drtool-verify-1:"
_IDENTITY_RE = re.compile(r"AGE-(?:SECRET-KEY-|PLUGIN-)", re.IGNORECASE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str, size: int) -> bytes | None:
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None
    return data if len(data) == size and _b64(data) == text else None


def _create_private(path: Path, content: bytes) -> None:
    """Write a new 0600 file; refuse to replace an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the key file ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def _read_private(path: Path) -> bytes:
    """Read a key file, refusing one that group or others can access."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:  # a missing key: exit 12, as the README's table says
        raise WrongKey(f"{path}: key file not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: key file is accessible by group or others; run: chmod 600 {path}"
        )
    return path.read_bytes()


def contains_identity(text: str) -> bool:
    """True if ``text`` contains an age identity (``AGE-SECRET-KEY-...``/``AGE-PLUGIN-...``)."""
    return _IDENTITY_RE.search(text) is not None


def write_identity(path: str | os.PathLike[str], *, passphrase: str | None) -> str:
    """Create a new identity file (passphrase-encrypted if given); return its recipient."""
    identity, recipient = generate_identity()
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"# created: {created}\n# public key: {recipient}\n{identity}\n".encode()
    if passphrase is not None:
        text = b"".join(encrypt_with_passphrase([text], passphrase))
    _create_private(Path(path), text)
    return recipient


def load_identities(path: str | os.PathLike[str], passphrase: str | None) -> list[str]:
    """Read the identities of an age identity file (plain or passphrase-encrypted)."""
    where = Path(path)
    raw = _read_private(where)
    if raw.startswith(VERSION_LINE):
        if passphrase is None:
            raise ConfigError(f"{where}: identity file is passphrase-protected; no passphrase")
        raw = b"".join(decrypt_with_passphrase([raw], passphrase, name=str(where)))
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not an age identity file") from None
    identities = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(str(parse_identity(line)))
        except ConfigError:
            raise ConfigError(f"{where}: line {number}: malformed age identity") from None
    if not identities:
        raise ConfigError(f"{where}: no identities found")
    return identities


def load_recipients(values: Iterable[str]) -> list[str]:
    """Validate ``age1...`` recipients (deduplicated, in order); ConfigError on a bad one."""
    recipients: list[str] = []
    for number, value in enumerate(values, 1):
        value = value.strip()
        if contains_identity(value):
            raise ConfigError(
                f"recipient {number} is an age identity (AGE-SECRET-KEY-1...): an identity must"
                " not be on the backup host; configure its public key (age-keygen -y)"
            )
        parse_recipient(value)  # ConfigError names the (public) value
        if value not in recipients:
            recipients.append(value)
    if not recipients:
        raise ConfigError(
            "keys.recipients: no age recipient configured (got none); add the operators' keys"
        )
    return recipients


def write_signing_key(path: str | os.PathLike[str]) -> str:
    """Create a new Ed25519 signing key file (0600); return its verify key text."""
    key = Ed25519PrivateKey.generate()
    _create_private(Path(path), f"{SIGN_PREFIX}{_b64(key.private_bytes_raw())}\n".encode())
    return verify_key_text(key.public_key())


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a signing key file written by :func:`write_signing_key`."""
    where = Path(path)
    text = _read_private(where).decode(errors="replace").strip()
    raw = _unb64(text[len(SIGN_PREFIX) :], 32) if text.startswith(SIGN_PREFIX) else None
    if raw is None:
        raise ConfigError(f"{where}: malformed signing key (expected {SIGN_PREFIX}...)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def verify_key_text(key: Ed25519PublicKey) -> str:
    """The ``drtool-verify-1:...`` text form of a public verify key."""
    return f"{VERIFY_PREFIX}{_b64(key.public_bytes_raw())}"


def parse_verify_key(text: str) -> Ed25519PublicKey:
    """Parse a ``drtool-verify-1:...`` verify key; ConfigError if malformed."""
    text = text.strip()
    raw = _unb64(text[len(VERIFY_PREFIX) :], 32) if text.startswith(VERIFY_PREFIX) else None
    if raw is None:
        raise ConfigError(f"malformed verify key {text[:40]!r} (expected {VERIFY_PREFIX}...)")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Sign ``data``; return the signature as unpadded base64."""
    return _b64(key.sign(data))


def verify_signature(
    verify_key: Ed25519PublicKey, data: bytes, signature: str, *, name: str = "manifest"
) -> None:
    """IntegrityError unless ``signature`` is a valid signature of ``data`` by ``verify_key``."""
    raw = _unb64(signature.strip(), 64)
    if raw is not None:
        try:
            verify_key.verify(raw, data)
            return
        except InvalidSignature:
            pass
    raise IntegrityError(f"{name}: signature does not verify against {verify_key_text(verify_key)}")
