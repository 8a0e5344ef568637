"""The composition every stored object uses: age(header frame + zstd(data)).

``seal`` measures the plaintext and the stored bytes as they pass; ``unseal`` authenticates,
checks the inner header against the slot, then decompresses.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from drtool.pipeline.age import decrypt, encrypt
from drtool.pipeline.header import InnerHeader, check_header, read_header
from drtool.pipeline.meter import Meter


@dataclass
class Sealed:
    """A sealing in progress: iterate ``stream``; afterwards read ``plain`` and ``stored``."""

    stream: Iterator[bytes]
    _plain: Meter
    _stored: Meter

    @property
    def plain(self) -> Meter:
        """Size and SHA-256 of the input data (only once ``stream`` is exhausted)."""
        return _finished(self._plain)

    @property
    def stored(self) -> Meter:
        """Size and SHA-256 of the stored bytes (only once ``stream`` is exhausted)."""
        return _finished(self._stored)


def _finished(meter: Meter) -> Meter:
    if not meter.finished:
        raise RuntimeError("Sealed: the stream has not been fully consumed")
    return meter


def seal(
    chunks: Iterable[bytes],
    *,
    header: InnerHeader,
    recipients: Sequence[str],
    level: int = 3,
    threads: int = 0,
    probe: bool = False,
) -> Sealed:
    """Compress and encrypt a stream, the inner header leading the plaintext.

    ``probe``: data whose first 64 KiB do not compress is stored in raw zstd blocks
    (:func:`drtool.pipeline.compress.compress`).
    """
    # zstd is imported by the first object sealed or unsealed, not at start-up: a backup's
    # first byte (pg_dump running) does not wait for it (ADR 0032)
    from drtool.pipeline.compress import compress

    plain, stored = Meter(), Meter()
    packed = compress(plain.wrap(chunks), level, threads, probe=probe)
    body = itertools.chain([header.to_frame()], packed)
    return Sealed(stored.wrap(encrypt(body, recipients)), plain, stored)


def unseal(
    chunks: Iterable[bytes],
    *,
    identities: Sequence[str],
    expected: InnerHeader,
    name: str,
    recipients_hint: Sequence[str] = (),
) -> Iterator[bytes]:
    """Decrypt, check the inner header (now), and return the decompressed plaintext stream."""
    from drtool.pipeline.compress import decompress

    plaintext = decrypt(chunks, identities, name=name, recipients_hint=recipients_hint)
    found, rest = read_header(plaintext, name=name)
    check_header(found, expected, name=name)
    return decompress(rest, name=name)


def seal_bytes(
    data: bytes, *, header: InnerHeader, recipients: Sequence[str], level: int = 3
) -> bytes:
    """Seal a small object (e.g. a JSON document) in memory."""
    return b"".join(seal([data], header=header, recipients=recipients, level=level).stream)


def unseal_bytes(
    blob: bytes,
    *,
    identities: Sequence[str],
    expected: InnerHeader,
    name: str,
    recipients_hint: Sequence[str] = (),
) -> bytes:
    """Unseal a small object in memory."""
    stream = unseal(
        [blob],
        identities=identities,
        expected=expected,
        name=name,
        recipients_hint=recipients_hint,
    )
    return b"".join(stream)
