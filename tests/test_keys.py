"""Key files: identities, recipients and the manifest-signing key."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from drtool import keys
from drtool.errors import ConfigError, IntegrityError, WrongKey
from drtool.pipeline import age


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_identity_is_private_and_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "id.txt"
    recipient = keys.write_identity(path, passphrase=None)
    assert mode(path) == 0o600
    text = path.read_text()
    assert f"# public key: {recipient}\n" in text
    [identity] = keys.load_identities(path, None)
    assert age.recipient_of(identity) == recipient
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keys.write_identity(path, passphrase=None)
    assert path.read_text() == text


def test_identity_file_loads_in_age_keygen_format(tmp_path: Path) -> None:
    path = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    path.chmod(0o600)
    second, _ = age.generate_identity()
    path.write_text(path.read_text() + "\n# escrow\n" + second + "\n")
    loaded = keys.load_identities(path, None)
    assert len(loaded) == 2
    assert loaded[1] == second


def test_group_readable_identity_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "id.txt"
    keys.write_identity(path, passphrase=None)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=f"{path}: .*chmod 600 {path}"):
        keys.load_identities(path, None)


@pytest.mark.slow
def test_passphrase_identity_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "id.age"
    recipient = keys.write_identity(path, passphrase="open sesame")
    raw = path.read_bytes()
    assert raw.startswith(b"age-encryption.org/v1\n-> scrypt ")
    assert b"AGE-SECRET-KEY" not in raw
    [identity] = keys.load_identities(path, "open sesame")
    assert age.recipient_of(identity) == recipient
    with pytest.raises(ConfigError, match="passphrase-protected"):
        keys.load_identities(path, None)
    with pytest.raises(WrongKey, match="wrong passphrase"):
        keys.load_identities(path, "open says me")


def test_malformed_identity_line_is_reported_without_its_text(tmp_path: Path) -> None:
    path = tmp_path / "id.txt"
    identity, _ = age.generate_identity()
    broken = identity[:-1] + ("Q" if identity[-1] != "Q" else "P")
    path.write_text(f"# comment\n{broken}\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="line 2: malformed age identity") as err:
        keys.load_identities(path, None)
    assert broken not in str(err.value)
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no identities"):
        keys.load_identities(path, None)


def test_load_recipients_validates() -> None:
    first, second = age.generate_identity()[1], age.generate_identity()[1]
    assert keys.load_recipients([first, f" {second} ", first]) == [first, second]
    with pytest.raises(ConfigError, match="malformed age X25519 recipient"):
        # Change the last character to a different bech32 one: the checksum then fails.
        # (Always "x" made this pass 1 time in 32, when the key already ended in x.)
        keys.load_recipients([first, first[:-1] + ("q" if first[-1] != "q" else "p")])
    with pytest.raises(ConfigError, match="not an age1"):
        keys.load_recipients(["hunter2-password"])
    with pytest.raises(
        ConfigError, match=r"keys\.recipients: no age recipient configured \(got none\)"
    ):
        keys.load_recipients([])


def test_identity_as_recipient_is_refused_without_echoing_it() -> None:
    identity, _ = age.generate_identity()
    with pytest.raises(ConfigError, match="must not be on the backup host") as err:
        keys.load_recipients([identity])
    assert identity not in str(err.value)
    assert identity[16:] not in str(err.value)


def test_contains_identity() -> None:
    identity, recipient = age.generate_identity()
    assert keys.contains_identity(f"DRTOOL_X={identity}")
    assert keys.contains_identity(identity.lower())
    assert not keys.contains_identity(f"recipients = ['{recipient}']")


def test_signing_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sign.key"
    verify_text = keys.write_signing_key(path)
    assert mode(path) == 0o600
    assert verify_text.startswith("drtool-verify-1:")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keys.write_signing_key(path)
    key = keys.load_signing_key(path)
    verify_key = keys.parse_verify_key(verify_text)
    signature = keys.sign(key, b"manifest bytes")
    keys.verify_signature(verify_key, b"manifest bytes", signature)
    with pytest.raises(IntegrityError, match="signature does not verify"):
        keys.verify_signature(verify_key, b"manifest bytez", signature)
    # a changed first byte (replacing the last two characters flaked: they may already be AA)
    damaged = ("B" if signature[0] == "A" else "A") + signature[1:]
    with pytest.raises(IntegrityError):
        keys.verify_signature(verify_key, b"manifest bytes", damaged)
    with pytest.raises(IntegrityError):
        keys.verify_signature(verify_key, b"manifest bytes", "not base64!")
    other = keys.parse_verify_key(keys.write_signing_key(tmp_path / "other.key"))
    with pytest.raises(IntegrityError):
        keys.verify_signature(other, b"manifest bytes", signature)


def test_signing_key_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "sign.key"
    keys.write_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keys.load_signing_key(path)
    path.chmod(0o600)
    path.write_text("drtool-sign-1:short\n")
    with pytest.raises(ConfigError, match="malformed signing key"):
        keys.load_signing_key(path)
    with pytest.raises(WrongKey, match="not found") as missing:  # a missing key: exit 12
        keys.load_signing_key(tmp_path / "missing.key")
    assert missing.value.exit_code == 12


@pytest.mark.parametrize(
    "text", ["", "drtool-verify-1:", "drtool-verify-1:AAAA", "ssh-ed25519 AAAA"]
)
def test_malformed_verify_key(text: str) -> None:
    with pytest.raises(ConfigError, match="malformed verify key"):
        keys.parse_verify_key(text)
