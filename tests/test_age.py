"""age v1: interop with the stock age CLI, and tamper resistance (RELIABILITY C1-C3)."""

from __future__ import annotations

import os
import pty
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drtool import keys
from drtool.errors import ConfigError, IntegrityError, WrongKey
from drtool.pipeline import age

# locally a missing CLI skips; in CI (DRTOOL_REQUIRE_SERVERS=1) the tests run and fail
pytestmark = pytest.mark.skipif(
    shutil.which("age") is None and os.environ.get("DRTOOL_REQUIRE_SERVERS") != "1",
    reason="needs the age CLI",
)

CHUNK = age.CHUNK_SIZE
ENC = age.CHUNK_SIZE + age.TAG_SIZE
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5_000_003]


def run_with_tty(argv: list[str], answers: list[str]) -> int:
    """Run a command on a pseudo-terminal, typing each answer after a prompt ending in ':'."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execvp(argv[0], argv)
    seen = b""
    try:
        while True:
            try:
                data = os.read(fd, 1024)
            except OSError:  # EIO once the child has exited
                break
            if not data:
                break
            seen += data
            if answers and seen.rstrip().endswith(b":"):
                os.write(fd, answers.pop(0).encode() + b"\n")
                seen = b""
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def pieces(data: bytes, seed: int = 1) -> Iterator[bytes]:
    """Split data at irregular points, to exercise re-chunking."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 1000, CHUNK - 3, CHUNK, 200_000])
        yield data[pos : pos + step]
        pos += step


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An identity made by age-keygen: (key file, identity, recipient)."""
    path = tmp_path_factory.mktemp("keys") / "key.txt"
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    identity = next(x for x in path.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-1"))
    recipient = subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return path, identity, recipient


def seal(data: bytes, recipient: str) -> bytes:
    return b"".join(age.encrypt(pieces(data), [recipient]))


def open_all(blob: bytes, identity: str, recipient: str) -> bytes:
    return b"".join(age.decrypt([blob], [identity], name="obj", recipients_hint=[recipient]))


# --- keys ------------------------------------------------------------------------------


def test_keygen_identity_parses_to_its_recipient(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    assert age.recipient_of(identity) == recipient
    assert str(age.parse_identity(identity)) == identity
    assert repr(age.parse_identity(identity)) == f"X25519Identity(recipient={recipient})"


def test_generated_identity_is_understood_by_age_keygen(tmp_path: Path) -> None:
    identity, recipient = age.generate_identity()
    path = tmp_path / "k"
    path.write_text(identity + "\n")
    shown = subprocess.run(["age-keygen", "-y", str(path)], capture_output=True, text=True)
    assert shown.stdout.strip() == recipient


@pytest.mark.parametrize(
    "bad",
    ["", "age1", "AGE1QQQ", "age1" + "q" * 58, "AGE-SECRET-KEY-1ABC", "ssh-ed25519 AAAA"],
)
def test_malformed_recipients_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        age.parse_recipient(bad)


def test_recipient_in_upper_case_and_identity_in_lower_case_are_refused(
    keypair: tuple[Path, str, str],
) -> None:
    _, identity, recipient = keypair
    with pytest.raises(ConfigError):
        age.parse_recipient(recipient.upper())
    with pytest.raises(ConfigError) as err:
        age.parse_identity(identity.lower())
    assert identity.lower() not in str(err.value)


def test_fingerprint_is_short_stable_and_public(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    fingerprint = age.recipient_fingerprint(recipient)
    assert fingerprint == f"{recipient[:12]}...{recipient[-6:]}"
    assert identity[16:] not in fingerprint


# --- interop ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_drtool_encrypts_age_decrypts(size: int, keypair: tuple[Path, str, str]) -> None:
    path, _, recipient = keypair
    data = data_of(size)
    out = subprocess.run(
        ["age", "-d", "-i", str(path)], input=seal(data, recipient), capture_output=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


@pytest.mark.parametrize("size", SIZES)
def test_age_encrypts_drtool_decrypts(size: int, keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    data = data_of(size)
    blob = subprocess.run(["age", "-r", recipient], input=data, capture_output=True).stdout
    assert open_all(blob, identity, recipient) == data


def test_multi_recipient_both_ways(tmp_path: Path) -> None:
    first, second = age.generate_identity(), age.generate_identity()
    recipients_file = tmp_path / "recipients.txt"
    recipients_file.write_text(f"# operators\n{first[1]}\n{second[1]}\n")
    data = data_of(200_000)
    blob = subprocess.run(
        ["age", "-R", str(recipients_file)], input=data, capture_output=True
    ).stdout
    for identity, _ in (first, second):
        assert b"".join(age.decrypt([blob], [identity])) == data

    ours = b"".join(age.encrypt([data], [first[1], second[1]]))
    assert ours.count(b"\n-> X25519 ") == 2
    for identity, _ in (first, second):
        key_file = tmp_path / "id.txt"
        key_file.write_text(identity + "\n")
        out = subprocess.run(["age", "-d", "-i", str(key_file)], input=ours, capture_output=True)
        assert out.stdout == data
        key_file.unlink()


def test_drtool_passphrase_file_decrypts_with_age(tmp_path: Path) -> None:
    data = data_of(70_000)
    (tmp_path / "in.age").write_bytes(
        b"".join(age.encrypt_with_passphrase([data], "correct horse", log_n=12))
    )
    code = run_with_tty(
        ["age", "-d", "-o", str(tmp_path / "out"), str(tmp_path / "in.age")], ["correct horse"]
    )
    assert code == 0
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.slow
def test_age_passphrase_file_decrypts_with_drtool(tmp_path: Path) -> None:
    data = data_of(70_000)
    (tmp_path / "in").write_bytes(data)
    code = run_with_tty(
        ["age", "-p", "-o", str(tmp_path / "out.age"), str(tmp_path / "in")], ["pw 1", "pw 1"]
    )
    assert code == 0
    blob = (tmp_path / "out.age").read_bytes()
    assert b"".join(age.decrypt_with_passphrase([blob], "pw 1")) == data
    with pytest.raises(WrongKey, match="wrong passphrase"):
        age.decrypt_with_passphrase([blob], "pw 2")


def test_age_p_identity_file_loads_in_drtool(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    subprocess.run(["age-keygen", "-o", str(plain)], check=True, capture_output=True)
    protected = tmp_path / "key.age"
    code = run_with_tty(["age", "-p", "-o", str(protected), str(plain)], ["s3cret", "s3cret"])
    assert code == 0
    protected.chmod(0o600)
    identity = next(x for x in plain.read_text().splitlines() if x.startswith("AGE-"))
    assert keys.load_identities(protected, "s3cret") == [identity]


@pytest.mark.slow
def test_drtool_protected_identity_file_works_with_age(tmp_path: Path) -> None:
    key_file = tmp_path / "key.age"
    recipient = keys.write_identity(key_file, passphrase="s3cret")
    data = data_of(1000)
    (tmp_path / "in.age").write_bytes(b"".join(age.encrypt([data], [recipient])))
    argv = ["age", "-d", "-i", str(key_file), "-o", str(tmp_path / "out"), str(tmp_path / "in.age")]
    assert run_with_tty(argv, ["s3cret"]) == 0
    assert (tmp_path / "out").read_bytes() == data


# --- tampering -------------------------------------------------------------------------

TAMPER_DATA = data_of(3 * CHUNK + 1234, seed=7)


@pytest.fixture(scope="module")
def tamper_blob(keypair: tuple[Path, str, str]) -> bytes:
    return seal(TAMPER_DATA, keypair[2])


def payload_start(blob: bytes) -> int:
    return blob.index(b"\n--- ") + len(b"\n--- ") + 43 + 1 + 16


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_bit_flip_fails_authentication(
    data: st.DataObject, tamper_blob: bytes, keypair: tuple[Path, str, str]
) -> None:
    _, identity, recipient = keypair
    start = payload_start(tamper_blob)
    # half the examples in the header and nonce, half anywhere
    upper = data.draw(st.sampled_from([start, len(tamper_blob)]))
    bit = data.draw(st.integers(0, upper * 8 - 1))
    flipped = bytearray(tamper_blob)
    flipped[bit // 8] ^= 1 << (bit % 8)
    seen = bytearray()
    with pytest.raises(IntegrityError, match=r"^obj: authentication failed at offset \d+"):
        for piece in age.decrypt(
            [bytes(flipped)], [identity], name="obj", recipients_hint=[recipient]
        ):
            seen += piece
    # only chunks wholly before the flipped one may have been released, unmodified
    released_chunks = max(0, (bit // 8 - start) // ENC)
    assert bytes(seen) == TAMPER_DATA[: released_chunks * CHUNK]


@pytest.mark.parametrize("size", [CHUNK, 3 * CHUNK, 3 * CHUNK + 5])
def test_truncation_at_each_chunk_boundary(size: int, keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    blob = seal(data_of(size), recipient)
    start = payload_start(blob)
    boundaries = [start - 16, *range(start, len(blob), ENC)]  # before the nonce, each chunk
    assert len(boundaries) == -(-size // CHUNK) + 1
    for cut in boundaries:
        with pytest.raises(IntegrityError, match=r"^obj: truncated: missing final chunk$"):
            open_all(blob[:cut], identity, recipient)


def test_truncation_inside_header_or_chunk(
    tamper_blob: bytes, keypair: tuple[Path, str, str]
) -> None:
    _, identity, recipient = keypair
    with pytest.raises(IntegrityError, match="truncated: incomplete age header"):
        open_all(tamper_blob[:40], identity, recipient)
    with pytest.raises(IntegrityError, match="authentication failed at offset"):
        open_all(tamper_blob[:-1], identity, recipient)


def chunks_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    start = payload_start(blob)
    return blob[:start], [blob[i : i + ENC] for i in range(start, len(blob), ENC)]


@pytest.mark.parametrize(
    "order",
    [[1, 0, 2, 3], [0, 2, 3], [0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 2, 3], [0, 1, 2, 3, 3]],
    ids=["swapped", "dropped", "final-dropped", "duplicated", "dup-before-final", "dup-final"],
)
def test_reordered_chunks_fail(
    order: list[int], tamper_blob: bytes, keypair: tuple[Path, str, str]
) -> None:
    _, identity, recipient = keypair
    head, chunks = chunks_of(tamper_blob)
    assert len(chunks) == 4
    with pytest.raises(IntegrityError) as err:
        open_all(head + b"".join(chunks[i] for i in order), identity, recipient)
    assert "authentication failed at offset" in str(err.value) or "truncated" in str(err.value)


def test_trailing_bytes_fail(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    short_last = seal(data_of(CHUNK + 10), recipient)
    with pytest.raises(IntegrityError, match="authentication failed at offset"):
        open_all(short_last + b"x", identity, recipient)
    full_last = seal(data_of(2 * CHUNK), recipient)
    with pytest.raises(IntegrityError, match="trailing data after final chunk"):
        open_all(full_last + b"xyz", identity, recipient)


def forge(
    recipient: str, blocks: list[tuple[bytes, bool]], stanza: age._Stanza | None = None
) -> bytes:
    """An age file with chosen payload chunks (or a chosen stanza), built from the internals."""
    file_key = os.urandom(16)
    wrapped = stanza or age.parse_recipient(recipient)._wrap(file_key)
    head = next(age._encrypt_payload([], file_key, [wrapped]))
    aead = ChaCha20Poly1305(age._hkdf(file_key, head[-16:], b"payload"))
    body = [aead.encrypt(age._chunk_nonce(i, last), b, None) for i, (b, last) in enumerate(blocks)]
    return head + b"".join(body)


def test_empty_final_chunk_after_data_is_refused(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    blob = forge(recipient, [(b"x" * CHUNK, False), (b"", True)])
    with pytest.raises(IntegrityError, match="empty final chunk"):
        open_all(blob, identity, recipient)


def test_low_order_share_is_refused(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    stanza = age._Stanza(("X25519", age._b64encode(bytes(32)).decode()), os.urandom(32))
    blob = forge(recipient, [(b"data", True)], stanza)
    with pytest.raises(IntegrityError, match="low-order X25519 share"):
        open_all(blob, identity, recipient)


def test_wrong_identity_names_the_recipients(
    tamper_blob: bytes, keypair: tuple[Path, str, str]
) -> None:
    recipient = keypair[2]
    stranger, _ = age.generate_identity()
    fingerprint = age.recipient_fingerprint(recipient)
    expected = f"^obj: no identity matches; encrypted to {re.escape(fingerprint)}$"
    with pytest.raises(WrongKey, match=expected) as err:
        age.decrypt([tamper_blob], [stranger], name="obj", recipients_hint=[recipient])
    assert err.value.exit_code == 12
    with pytest.raises(WrongKey, match="encrypted to 1 X25519 recipient"):
        age.decrypt([tamper_blob], [stranger])
    with pytest.raises(WrongKey):
        age.decrypt([tamper_blob], [])


# --- passphrase rules ------------------------------------------------------------------


def scrypt_blob(log_n: str, extra: list[age._Stanza] | None = None) -> bytes:
    file_key = os.urandom(16)
    stanza = age._Stanza(("scrypt", age._b64encode(os.urandom(16)).decode(), log_n), os.urandom(32))
    return next(age._encrypt_payload([], file_key, [stanza, *(extra or [])]))


def test_scrypt_work_factor_is_capped() -> None:
    with pytest.raises(IntegrityError, match=r"work factor 2\^23 exceeds the limit 2\^22"):
        age.decrypt_with_passphrase([scrypt_blob("23")], "pw")
    with pytest.raises(IntegrityError, match="malformed scrypt stanza"):
        age.decrypt_with_passphrase([scrypt_blob("018")], "pw")


def test_scrypt_stanza_must_be_alone(keypair: tuple[Path, str, str]) -> None:
    other = age.parse_recipient(keypair[2])._wrap(os.urandom(16))
    with pytest.raises(IntegrityError, match="must be the only stanza"):
        age.decrypt_with_passphrase([scrypt_blob("10", [other])], "pw")


def test_passphrase_file_with_identity_and_identity_file_with_passphrase(
    keypair: tuple[Path, str, str],
) -> None:
    _, identity, recipient = keypair
    protected = b"".join(age.encrypt_with_passphrase([b"x"], "pw", log_n=10))
    with pytest.raises(WrongKey, match="encrypted to a passphrase"):
        age.decrypt([protected], [identity])
    with pytest.raises(WrongKey, match="not passphrase-encrypted"):
        age.decrypt_with_passphrase([seal(b"x", recipient)], "pw")
