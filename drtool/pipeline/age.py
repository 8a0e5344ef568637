"""The age v1 file format (https://age-encryption.org/v1) on ``cryptography`` primitives.

Supported: X25519 recipients and identities, the scrypt (passphrase) stanza, binary (not
armored) files. Files written here decrypt with the stock ``age`` CLI and vice versa.

Decryption reads and authenticates the header eagerly (when :func:`decrypt` is called) and
authenticates every 64 KiB payload chunk before yielding its plaintext. Errors name the
object and the stored-byte offset; they never contain key material.

Fingerprints (:func:`recipient_fingerprint`) are the recipient string shortened to its first
12 and last 6 characters (``age1`` + 8 key characters ... the 6-character bech32 checksum,
which covers the whole key): stable, non-secret, and recognisable next to
``age-keygen -y`` output.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha256

from bech32 import bech32_decode, bech32_encode, convertbits
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from drtool.errors import ConfigError, IntegrityError, WrongKey
from drtool.pipeline.reader import ByteReader, rechunk

VERSION_LINE = b"age-encryption.org/v1\n"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
MAX_LOG_N = 22  # scrypt work-factor cap when decrypting (age's own default limit)
DEFAULT_LOG_N = 18  # what `age -p` uses

_RECIPIENT_HRP = "age"
_IDENTITY_HRP = "age-secret-key-"
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
_ZERO_NONCE = bytes(12)
_MAX_LINE = 4096
_MAX_HEADER = 1 << 20
_B64_RE = re.compile(rb"[A-Za-z0-9+/]*")
_VCHAR_RE = re.compile(rb"[\x21-\x7e]+")
_LOG_N_RE = re.compile(r"[1-9][0-9]*")


def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes) -> bytes | None:
    """Strict unpadded canonical base64, or None."""
    if not _B64_RE.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None
    return data if _b64encode(data) == text else None


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _bech32(hrp: str, data: bytes) -> str:
    words = convertbits(data, 8, 5)
    assert words is not None  # 8-to-5 with padding always converts
    return bech32_encode(hrp, words)


def _unbech32(text: str, hrp: str) -> bytes | None:
    found, words = bech32_decode(text)
    if found != hrp or words is None:
        return None
    data = convertbits(words, 5, 8, False)
    return bytes(data) if data is not None and len(data) == 32 else None


@dataclass(frozen=True)
class _Stanza:
    args: tuple[str, ...]
    body: bytes
    offset: int = 0  # stored offset of the stanza's "->" line, for error messages

    def encode(self) -> bytes:
        text = _b64encode(self.body)
        lines = [text[i : i + 64] for i in range(0, len(text), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append(b"")
        return b"-> " + " ".join(self.args).encode() + b"\n" + b"".join(x + b"\n" for x in lines)


@dataclass(frozen=True)
class X25519Recipient:
    """An age X25519 recipient (public key), ``age1...``."""

    public_key: bytes

    def __str__(self) -> str:
        return _bech32(_RECIPIENT_HRP, self.public_key)

    def _wrap(self, file_key: bytes) -> _Stanza:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(self.public_key))
        wrap_key = _hkdf(shared, share + self.public_key, _X25519_LABEL)
        body = ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None)
        return _Stanza(("X25519", _b64encode(share).decode()), body)


@dataclass(frozen=True)
class X25519Identity:
    """An age X25519 identity (private key), ``AGE-SECRET-KEY-1...``. Never log it."""

    private_key: X25519PrivateKey

    def __str__(self) -> str:
        return _bech32(_IDENTITY_HRP, self.private_key.private_bytes_raw()).upper()

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self.recipient})"

    @property
    def recipient(self) -> X25519Recipient:
        """The matching public recipient."""
        return X25519Recipient(self.private_key.public_key().public_bytes_raw())

    def _unwrap(self, share: bytes, body: bytes, name: str, offset: int) -> bytes | None:
        try:
            shared = self.private_key.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:  # cryptography refuses the all-zero shared secret
            raise _corrupt(name, offset, "low-order X25519 share") from None
        own = self.recipient.public_key
        wrap_key = _hkdf(shared, share + own, _X25519_LABEL)
        try:
            return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, body, None)
        except InvalidTag:
            return None


def generate_identity() -> tuple[str, str]:
    """Return a new ``(identity, recipient)`` pair as age strings."""
    identity = X25519Identity(X25519PrivateKey.generate())
    return str(identity), str(identity.recipient)


def parse_recipient(text: str) -> X25519Recipient:
    """Parse an ``age1...`` recipient; ConfigError if malformed."""
    key = _unbech32(text, _RECIPIENT_HRP) if text == text.lower() else None
    if key is None:
        shown = repr(_shorten(text)) if text.startswith("age1") else "(not an age1... string)"
        raise ConfigError(f"malformed age X25519 recipient {shown}")
    return X25519Recipient(key)


def parse_identity(text: str) -> X25519Identity:
    """Parse an ``AGE-SECRET-KEY-1...`` identity; ConfigError (without the text) if malformed."""
    key = _unbech32(text, _IDENTITY_HRP) if text == text.upper() else None
    if key is None:
        raise ConfigError("malformed age identity (expected AGE-SECRET-KEY-1...)")
    return X25519Identity(X25519PrivateKey.from_private_bytes(key))


def recipient_of(identity: str) -> str:
    """Return the ``age1...`` recipient of an identity string."""
    return str(parse_identity(identity).recipient)


def recipient_fingerprint(recipient: str) -> str:
    """Short non-secret form of a recipient: its first 12 and last 6 characters."""
    return _shorten(str(parse_recipient(recipient)))


def _shorten(text: str) -> str:
    return text if len(text) <= 21 else f"{text[:12]}...{text[-6:]}"


def _corrupt(name: str, offset: int, detail: str = "") -> IntegrityError:
    suffix = f" ({detail})" if detail else ""
    return IntegrityError(f"{name}: authentication failed at offset {offset}{suffix}")


# ---------------------------------------------------------------------------------------
# Encryption


def encrypt(chunks: Iterable[bytes], recipients: Sequence[str]) -> Iterator[bytes]:
    """Encrypt a stream to one or more ``age1...`` recipients (one stanza each)."""
    if not recipients:
        raise ConfigError("encrypt: at least one recipient is required")
    parsed = [parse_recipient(r) for r in recipients]
    file_key = os.urandom(16)
    return _encrypt_payload(chunks, file_key, [r._wrap(file_key) for r in parsed])


def encrypt_with_passphrase(
    chunks: Iterable[bytes], passphrase: str, log_n: int = DEFAULT_LOG_N
) -> Iterator[bytes]:
    """Encrypt a stream with a passphrase (a single scrypt stanza, like ``age -p``)."""
    if not passphrase:
        raise ConfigError("encrypt: the passphrase is empty")
    if not 1 <= log_n <= MAX_LOG_N:
        raise ConfigError(f"encrypt: scrypt log_n must be 1..{MAX_LOG_N} (got {log_n})")
    file_key = os.urandom(16)
    salt = os.urandom(16)
    wrap_key = _scrypt(passphrase, salt, log_n)
    body = ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None)
    stanza = _Stanza(("scrypt", _b64encode(salt).decode(), str(log_n)), body)
    return _encrypt_payload(chunks, file_key, [stanza])


def _scrypt(passphrase: str, salt: bytes, log_n: int) -> bytes:
    kdf = Scrypt(salt=_SCRYPT_LABEL + salt, length=32, n=1 << log_n, r=8, p=1)
    return kdf.derive(passphrase.encode())


def _chunk_nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _encrypt_payload(
    chunks: Iterable[bytes], file_key: bytes, stanzas: list[_Stanza]
) -> Iterator[bytes]:
    header = VERSION_LINE + b"".join(s.encode() for s in stanzas) + b"---"
    mac = hmac.new(_hkdf(file_key, None, b"header"), header, sha256).digest()
    nonce = os.urandom(16)
    yield header + b" " + _b64encode(mac) + b"\n" + nonce
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    for index, (block, last) in enumerate(rechunk(chunks, CHUNK_SIZE)):
        yield aead.encrypt(_chunk_nonce(index, last), block, None)


# ---------------------------------------------------------------------------------------
# Decryption


@dataclass(frozen=True)
class _Header:
    stanzas: list[_Stanza]
    mac_input: bytes
    mac: bytes
    mac_offset: int


def _read_header(reader: ByteReader, name: str) -> _Header:
    """Parse the textual header strictly (age v1 ABNF); IntegrityError if malformed."""
    raw = bytearray()

    def line() -> tuple[bytes, int]:
        offset = reader.offset
        text = reader.readline(_MAX_LINE)
        if not text.endswith(b"\n"):
            if len(text) < _MAX_LINE:
                raise IntegrityError(f"{name}: truncated: incomplete age header")
            raise _corrupt(name, offset, "header line too long")
        if len(raw) + len(text) > _MAX_HEADER:
            raise _corrupt(name, offset, "header too large")
        raw.extend(text)
        return text[:-1], offset

    first, _ = line()
    if first + b"\n" != VERSION_LINE:
        raise _corrupt(name, 0, "not an age v1 file")
    stanzas: list[_Stanza] = []
    text, offset = line()
    while text.startswith(b"-> "):
        args = text[3:].split(b" ")
        if not all(_VCHAR_RE.fullmatch(a) for a in args):
            raise _corrupt(name, offset, "malformed stanza line")
        body = bytearray()
        while True:
            piece, piece_offset = line()
            decoded = _b64decode(piece) if len(piece) <= 64 else None
            if decoded is None:
                raise _corrupt(name, piece_offset, "malformed stanza body")
            body += decoded
            if len(piece) < 64:
                break
        stanzas.append(_Stanza(tuple(a.decode() for a in args), bytes(body), offset))
        text, offset = line()
    if not stanzas or not text.startswith(b"--- "):
        raise _corrupt(name, offset, "malformed header")
    mac = _b64decode(text[4:])
    if mac is None or len(mac) != 32:
        raise _corrupt(name, offset, "malformed header MAC")
    return _Header(stanzas, bytes(raw[: len(raw) - len(text) + 2]), mac, offset)


def decrypt(
    chunks: Iterable[bytes],
    identities: Sequence[str],
    *,
    name: str = "object",
    recipients_hint: Sequence[str] = (),
) -> Iterator[bytes]:
    """Decrypt an age stream with X25519 identities.

    The header is read, unwrapped and authenticated now; the payload as it is iterated.
    ``recipients_hint`` names the recipients the object is known to be encrypted to: it fills
    the WrongKey message, and when one of ``identities`` matches it, a stanza that fails to
    unwrap is reported as corruption (IntegrityError) rather than as a wrong key.
    """
    parsed = [parse_identity(i) for i in identities]
    reader = ByteReader(chunks)
    header = _read_header(reader, name)
    file_key = None
    x25519 = [s for s in header.stanzas if s.args[0] == "X25519"]
    for stanza in x25519:
        share = _b64decode(stanza.args[1].encode()) if len(stanza.args) == 2 else None
        if share is None or len(share) != 32 or len(stanza.body) != 32:
            raise _corrupt(name, stanza.offset, "malformed X25519 stanza")
        for identity in parsed:
            file_key = identity._unwrap(share, stanza.body, name, stanza.offset)
            if file_key is not None:
                break
        if file_key is not None:
            break
    if file_key is None:
        ours = {str(i.recipient) for i in parsed}
        if ours & set(recipients_hint):
            offset = (x25519 or header.stanzas)[0].offset
            raise _corrupt(name, offset, "no stanza unwraps for a listed recipient")
        described = _describe(header, recipients_hint)
        raise WrongKey(f"{name}: no identity matches; encrypted to {described}")
    return _decrypt_payload(reader, header, file_key, name)


def decrypt_with_passphrase(
    chunks: Iterable[bytes], passphrase: str, *, name: str = "object", max_log_n: int = MAX_LOG_N
) -> Iterator[bytes]:
    """Decrypt a passphrase-encrypted (scrypt) age stream; refuses logN above ``max_log_n``."""
    reader = ByteReader(chunks)
    header = _read_header(reader, name)
    scrypt = [s for s in header.stanzas if s.args[0] == "scrypt"]
    if not scrypt:
        raise WrongKey(f"{name}: not passphrase-encrypted; encrypted to {_describe(header, ())}")
    stanza = scrypt[0]
    if len(header.stanzas) != 1:
        raise _corrupt(name, stanza.offset, "an scrypt stanza must be the only stanza")
    args = stanza.args
    salt = _b64decode(args[1].encode()) if len(args) == 3 else None
    if salt is None or len(salt) != 16 or not _LOG_N_RE.fullmatch(args[2]):
        raise _corrupt(name, stanza.offset, "malformed scrypt stanza")
    if len(stanza.body) != 32:
        raise _corrupt(name, stanza.offset, "malformed scrypt stanza")
    log_n = int(args[2])
    if log_n > max_log_n:
        raise IntegrityError(
            f"{name}: scrypt work factor 2^{log_n} exceeds the limit 2^{max_log_n}; refusing"
        )
    try:
        file_key = ChaCha20Poly1305(_scrypt(passphrase, salt, log_n)).decrypt(
            _ZERO_NONCE, stanza.body, None
        )
    except InvalidTag:
        raise WrongKey(f"{name}: wrong passphrase") from None
    return _decrypt_payload(reader, header, file_key, name)


def _describe(header: _Header, hint: Sequence[str]) -> str:
    """Who a file was encrypted to, for the "no identity matches" message.

    age stanzas do not name their recipient, so without a hint only the kinds can be counted.
    """
    if hint:
        return ", ".join(_shorten(r) for r in hint)
    kinds = [s.args[0] for s in header.stanzas]
    count = kinds.count("X25519")
    parts = [f"{count} X25519 recipient(s) (fingerprints unknown)"] if count else []
    if "scrypt" in kinds:
        parts.append("a passphrase")
    others = len(kinds) - count - kinds.count("scrypt")
    if others:
        parts.append(f"{others} other stanza(s)")
    return ", ".join(parts)


def _decrypt_payload(
    reader: ByteReader, header: _Header, file_key: bytes, name: str
) -> Iterator[bytes]:
    """Check the header MAC now, then return the authenticated-plaintext generator."""
    expected = hmac.new(_hkdf(file_key, None, b"header"), header.mac_input, sha256).digest()
    if not hmac.compare_digest(expected, header.mac):
        raise _corrupt(name, header.mac_offset, "header MAC mismatch")
    nonce = reader.read(16)
    if len(nonce) < 16:
        raise IntegrityError(f"{name}: truncated: missing final chunk")
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    return _open_chunks(aead, reader.rest(), reader.offset, name)


def _open_chunks(
    aead: ChaCha20Poly1305, chunks: Iterable[bytes], start: int, name: str
) -> Iterator[bytes]:
    """Decrypt the STREAM chunks, proving the end is the real end.

    Each chunk's nonce says whether it is the last one: a last-flagged chunk followed by more
    data, a stream that stops without one (truncation) and an empty final chunk after others
    are all refused, with the byte offset of the damage.
    """
    enc_size = CHUNK_SIZE + TAG_SIZE

    def attempt(index: int, block: bytes, last: bool) -> bytes | None:
        try:
            return aead.decrypt(_chunk_nonce(index, last), block, None)
        except InvalidTag:
            return None

    for index, (block, last) in enumerate(rechunk(chunks, enc_size)):
        offset = start + index * enc_size
        if not last:
            plain = attempt(index, block, False)
            if plain is None:
                if attempt(index, block, True) is not None:
                    raise _corrupt(name, offset + enc_size, "trailing data after final chunk")
                raise _corrupt(name, offset)
            yield plain
            continue
        if not block and index == 0:
            raise IntegrityError(f"{name}: truncated: missing final chunk")
        plain = attempt(index, block, True)
        if plain is None:
            if len(block) == enc_size and attempt(index, block, False) is not None:
                raise IntegrityError(f"{name}: truncated: missing final chunk")
            raise _corrupt(name, offset)
        if not plain and index > 0:
            raise _corrupt(name, offset, "empty final chunk")
        yield plain


# ---------------------------------------------------------------------------------------
# Re-wrapping (key rotation): a new header for the same file key, the payload untouched


@dataclass(frozen=True)
class Rewrapped:
    """A new age header for an existing file: replace the first ``old_size`` bytes by ``header``.

    The payload (16-byte nonce and STREAM chunks) depends only on the file key, which stays
    the same, so it is reused byte for byte.
    """

    old_size: int
    header: bytes


def rewrap(
    head: bytes, identities: Sequence[str], recipients: Sequence[str], *, name: str
) -> Rewrapped:
    """Unwrap the file key of the age file starting with ``head`` and wrap it for ``recipients``.

    ``head`` must hold the whole textual header (a few hundred bytes per recipient). The old
    header MAC is checked with the unwrapped key first, so a damaged or forged header is
    refused (IntegrityError) rather than re-authenticated under a new MAC.
    """
    if not recipients:
        raise ConfigError("rewrap: at least one recipient is required")
    parsed = [parse_recipient(r) for r in recipients]
    reader = ByteReader([head])
    header = _read_header(reader, name)
    old_size = reader.offset
    file_key = _unwrap_file_key(header, [parse_identity(i) for i in identities], name)
    expected = hmac.new(_hkdf(file_key, None, b"header"), header.mac_input, sha256).digest()
    if not hmac.compare_digest(expected, header.mac):
        raise _corrupt(name, header.mac_offset, "header MAC mismatch")
    stanzas = [r._wrap(file_key) for r in parsed]
    text = VERSION_LINE + b"".join(s.encode() for s in stanzas) + b"---"
    mac = hmac.new(_hkdf(file_key, None, b"header"), text, sha256).digest()
    return Rewrapped(old_size, text + b" " + _b64encode(mac) + b"\n")


def _unwrap_file_key(header: _Header, parsed: list[X25519Identity], name: str) -> bytes:
    """The file key from the first X25519 stanza one of ``parsed`` opens; WrongKey if none."""
    for stanza in header.stanzas:
        if stanza.args[0] != "X25519":
            continue
        share = _b64decode(stanza.args[1].encode()) if len(stanza.args) == 2 else None
        if share is None or len(share) != 32 or len(stanza.body) != 32:
            raise _corrupt(name, stanza.offset, "malformed X25519 stanza")
        for identity in parsed:
            file_key = identity._unwrap(share, stanza.body, name, stanza.offset)
            if file_key is not None:
                return file_key
    raise WrongKey(f"{name}: no identity matches; encrypted to {_describe(header, ())}")


def header_size(head: bytes, *, name: str) -> int:
    """The length of the textual age header at the start of ``head`` (no key needed)."""
    reader = ByteReader([head])
    _read_header(reader, name)
    return reader.offset
