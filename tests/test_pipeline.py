"""zstd streaming, the inner header, meters and seal/unseal (with the stock CLIs)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drtool.errors import IntegrityError, WrongKey
from drtool.pipeline import age
from drtool.pipeline.compress import MAX_PIECE, compress, decompress
from drtool.pipeline.header import InnerHeader, check_header, read_header
from drtool.pipeline.meter import Meter
from drtool.pipeline.reader import ByteReader, rechunk
from drtool.pipeline.seal import seal, seal_bytes, unseal, unseal_bytes

# locally a missing CLI skips; in CI (DRTOOL_REQUIRE_SERVERS=1) the tests run and fail
needs_cli = pytest.mark.skipif(
    (shutil.which("zstd") is None or shutil.which("age") is None)
    and os.environ.get("DRTOOL_REQUIRE_SERVERS") != "1",
    reason="needs zstd and age",
)

HEADER = InnerHeader(
    repo_id="r1", snapshot_id="20261125T020000Z-7f3a", component="redis", kind="rdb"
)


def text_rows(size: int, seed: int = 0) -> bytes:
    """Compressible, pg_dump-like text with random parts."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += b"%d\troom-%d\thello %s\n" % (
            len(out),
            rng.randrange(50),
            rng.randbytes(6).hex().encode(),
        )
    return bytes(out[:size])


def split(data: bytes, step: int = 10_000) -> Iterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    identity, recipient = age.generate_identity()
    path = tmp_path_factory.mktemp("k") / "key.txt"
    path.write_text(identity + "\n")
    return path, identity, recipient


# --- reader ----------------------------------------------------------------------------


def test_rechunk_exact_blocks_and_final_flag() -> None:
    assert list(rechunk([], 4)) == [(b"", True)]
    assert list(rechunk([b"ab", b"cd"], 4)) == [(b"abcd", True)]
    assert list(rechunk([b"abcde", b"", b"fghi"], 4)) == [
        (b"abcd", False),
        (b"efgh", False),
        (b"i", True),
    ]


def test_byte_reader_lines_and_rest() -> None:
    reader = ByteReader([b"ab\ncd", b"ef\n", b"xyz"])
    assert reader.readline(100) == b"ab\n"
    assert reader.readline(3) == b"cde"
    assert reader.readline(100) == b"f\n"
    assert reader.offset == 8
    assert b"".join(reader.rest()) == b"xyz"


# --- compress --------------------------------------------------------------------------


def test_compress_round_trip_and_piece_bound() -> None:
    data = text_rows(3_000_000)
    stored = list(compress(split(data)))
    assert max(map(len, stored)) <= MAX_PIECE
    assert b"".join(decompress(stored)) == data
    assert b"".join(decompress(compress([]))) == b""


def test_decompress_output_is_bounded_for_very_compressible_data() -> None:
    stored = b"".join(compress([bytes(MAX_PIECE)] * 64))  # 64 MiB of zeros
    assert len(stored) < 64 * 1024
    sizes = [len(piece) for piece in decompress([stored])]
    assert max(sizes) <= MAX_PIECE
    assert sum(sizes) == 64 * MAX_PIECE


def test_decompress_refuses_truncated_corrupt_and_empty() -> None:
    stored = b"".join(compress([text_rows(200_000)]))
    for cut in (1, 4, 10, len(stored) // 2, len(stored) - 1):
        with pytest.raises(IntegrityError, match=r"^x: truncated zstd data"):
            b"".join(decompress([stored[:cut]], name="x"))
    corrupt = bytearray(stored)
    corrupt[len(stored) // 2] ^= 0x40
    with pytest.raises(IntegrityError, match=r"^x: (corrupt|truncated) zstd data"):
        b"".join(decompress([bytes(corrupt)], name="x"))
    with pytest.raises(IntegrityError, match="truncated"):
        b"".join(decompress([]))


def test_decompress_handles_several_and_skippable_frames() -> None:
    one, two = text_rows(1000, 1), text_rows(2000, 2)
    stream = [HEADER.to_frame(), *compress([one]), HEADER.to_frame(), *compress([two])]
    assert b"".join(decompress(stream)) == one + two


@needs_cli
def test_zstd_cli_interop_both_ways() -> None:
    data = text_rows(2_000_000)
    ours = b"".join(compress(split(data), level=5, threads=2))
    assert subprocess.run(["zstd", "-d", "-c"], input=ours, capture_output=True).stdout == data
    theirs = subprocess.run(["zstd", "-3", "-c"], input=data, capture_output=True).stdout
    assert b"".join(decompress(split(theirs, 777))) == data


@needs_cli
def test_zstd_cli_skips_the_inner_header() -> None:
    data = text_rows(100_000)
    stored = HEADER.to_frame() + b"".join(compress([data]))
    out = subprocess.run(["zstd", "-d", "-c"], input=stored, capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


# --- header ----------------------------------------------------------------------------


def test_header_round_trip_and_rest() -> None:
    frame = HEADER.to_frame()
    assert frame[:4] == bytes.fromhex("502a4d18")
    assert int.from_bytes(frame[4:8], "little") == len(frame) - 8
    found, rest = read_header([frame[:3], frame[3:] + b"abc", b"def"])
    assert found == HEADER
    assert b"".join(rest) == b"abcdef"


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x28\xb5\x2f\xfd" + bytes(10),  # a zstd data frame, no header
        bytes.fromhex("502a4d18") + (5).to_bytes(4, "little") + b"{}",  # short
        bytes.fromhex("502a4d18") + (2).to_bytes(4, "little") + b"{}",
        bytes.fromhex("502a4d18") + (10**6).to_bytes(4, "little") + b"{}",
        InnerHeader("r", "s", "c", "k").to_frame().replace(b"inner-header-1", b"inner-header-9"),
    ],
)
def test_malformed_header_is_refused(frame: bytes) -> None:
    with pytest.raises(IntegrityError, match=r"^obj: (missing|malformed) drtool inner header$"):
        read_header([frame], name="obj")


def test_check_header_names_both_slots() -> None:
    other = InnerHeader("r1", "20261126T020000Z-0000", "postgres", "pg_dump")
    check_header(HEADER, HEADER)
    with pytest.raises(IntegrityError) as err:
        check_header(HEADER, other, name="snapshots/x/redis/dump.rdb.zst.age")
    assert str(err.value) == (
        "snapshots/x/redis/dump.rdb.zst.age: belongs to snapshot 20261125T020000Z-7f3a component"
        " redis (repo r1, kind rdb), expected snapshot 20261126T020000Z-0000 component postgres"
        " (repo r1, kind pg_dump)"
    )


# --- meter and seal --------------------------------------------------------------------


def test_meter_counts_and_hashes() -> None:
    meter = Meter()
    assert b"".join(meter.wrap([b"ab", b"", b"c"])) == b"abc"
    assert meter.finished
    assert (meter.size, meter.sha256) == (3, hashlib.sha256(b"abc").hexdigest())


def test_seal_round_trip_and_meters(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    data = text_rows(1_500_000)
    sealed = seal(split(data), header=HEADER, recipients=[recipient])
    with pytest.raises(RuntimeError):
        _ = sealed.plain
    stored = b"".join(sealed.stream)
    assert (sealed.plain.size, sealed.plain.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (sealed.stored.size, sealed.stored.sha256) == (
        len(stored),
        hashlib.sha256(stored).hexdigest(),
    )
    assert len(stored) < len(data) // 2
    out = unseal(split(stored, 65_000), identities=[identity], expected=HEADER, name="o")
    assert b"".join(out) == data


@needs_cli
def test_stock_tools_recover_a_sealed_object(
    keypair: tuple[Path, str, str], tmp_path: Path
) -> None:
    path, _, recipient = keypair
    data = text_rows(700_000)
    (tmp_path / "obj.zst.age").write_bytes(seal_bytes(data, header=HEADER, recipients=[recipient]))
    out = subprocess.run(
        f"age -d -i {path} {tmp_path / 'obj.zst.age'} | zstd -d -c",
        shell=True,
        capture_output=True,
        check=True,
    )
    assert out.stdout == data


def test_valid_object_in_the_wrong_slot_is_refused(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    blob = seal_bytes(b'{"a": 1}', header=HEADER, recipients=[recipient])
    assert unseal_bytes(blob, identities=[identity], expected=HEADER, name="m") == b'{"a": 1}'
    elsewhere = InnerHeader("r1", "20261126T020000Z-0000", "redis", "rdb")
    with pytest.raises(IntegrityError, match=r"^m: belongs to snapshot 20261125T020000Z-7f3a"):
        unseal_bytes(blob, identities=[identity], expected=elsewhere, name="m")


def test_unseal_errors_come_before_any_plaintext(keypair: tuple[Path, str, str]) -> None:
    _, identity, recipient = keypair
    blob = seal_bytes(text_rows(300_000), header=HEADER, recipients=[recipient])
    stranger, _ = age.generate_identity()
    with pytest.raises(WrongKey):
        unseal([blob], identities=[stranger], expected=HEADER, name="m")
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    with pytest.raises(IntegrityError, match="authentication failed"):
        b"".join(unseal([bytes(flipped)], identities=[identity], expected=HEADER, name="m"))
