"""The one reader of pg_dump's custom-format archive: header, TOC and data blocks, incremental.

A backup reads the archive as it streams from pg_dump (:class:`ArchiveStream` fed chunk by
chunk) and takes, per ``TABLE DATA`` entry, the number of COPY lines, their bytes and a
sha256 of their text: the fingerprints of format 5 (ADR 0033), with no second scan of the
database. A restore feeds the same reader the dump as it stages it, and writes the data
offsets a piped dump lacks (:func:`write_offsets`; :func:`index_archive` does both from a
file); it reads the header to check versions.

Layout (PostgreSQL's pg_backup_archiver.c and pg_backup_custom.c): ``PGDMP``, version, int and
offset sizes, format, compression, creation time, database name and versions; the TOC (when
pg_dump writes to a pipe it comes first, with every data offset "not set"); then one data
block per entry with data: a block type byte, the entry's dumpId, and length-prefixed chunks
up to a zero length. With ``-Z0`` a ``TABLE DATA`` block's chunks are plain COPY text, one
row per chunk, and pg_dump ends the text with ``\\.`` and two blank lines.

No per-row Python: a chunk header is a zero sign byte and a 4-byte length, and COPY text holds
no NUL byte, so on an aligned stream a regular expression removes every header in one C call
(``\\x00....`` consumes each header whole, zero length bytes included), and the block's end,
a zero-length chunk, is the only place five NUL bytes meet. Memory is bounded by the TOC and
one fed chunk; a block is never held whole. Anything unexpected (a truncated stream, an
unknown block type, a compressed archive, data for an unknown entry) raises
:class:`ArchiveError`, never a wrong figure.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drtool.errors import SourceError

log = logging.getLogger(__name__)

DUMP_MAGIC = b"PGDMP"
COPY_END = b"\\.\n\n\n"  # what pg_dump writes after a table's COPY rows
_ARCH_CUSTOM = 1
_HEADER_READ = 64 * 1024
# the TOC is buffered whole until it parses; it is bounded by the schema, not the data (an
# 8 MB TOC holds ~9,000 tables), so this only stops a stream that is no archive at all
_MAX_TOC = 4 << 30
OFFSET_NOT_SET, OFFSET_SET, OFFSET_NO_DATA = 1, 2, 3
BLK_DATA, BLK_BLOBS = 1, 3
INDEXED_SINCE = (1, 12, 0)  # archives whose TOC this reader parses (PostgreSQL 9.5 and later)
_CHUNK_HEADER = re.compile(rb"\x00....", re.DOTALL)
_BLOCK_END = b"\x00" * 5  # a zero-length chunk (sign byte and a 4-byte zero)
_READ = 1 << 20
# pieces the COPY text is worked on in: 64 KiB stay in the CPU cache between the header
# removal, the hash and the newline count (1 MiB pieces cost 2x the CPU here: 0.55 s vs
# 0.27 s per 1 M rows)
_PIECE = 64 << 10


class ArchiveError(ValueError):
    """The stream is not an archive this reader understands (its message says why)."""


@dataclass(frozen=True)
class ArchiveHeader:
    """What a ``pg_dump -Fc`` archive says about itself."""

    format_version: tuple[int, int, int]
    dbname: str
    server_version: str
    dump_version: str
    int_size: int = 4
    offset_size: int = 8
    compressed: bool = False


@dataclass(frozen=True)
class TocEntry:
    """One TOC entry: its id, what it is, and where its data offset is written."""

    dump_id: int
    desc: str
    namespace: str
    tag: str
    offset_flag: int
    flag_at: int  # position of the offset flag in the archive
    #: the catalog object's oid (catalogId.oid: of a TABLE DATA entry, the table's pg_class
    #: oid): names are written in pg_dump's client encoding, an oid matches whatever it is
    oid: int = 0
    #: the COPY statement pg_restore runs for a TABLE DATA entry (names the partition root
    #: instead of the entry's table under --load-via-partition-root)
    copy_stmt: str = ""


@dataclass(frozen=True)
class TableData:
    """A ``TABLE DATA`` block's COPY text: lines, bytes, sha256 (the terminator left out)."""

    rows: int
    size: int
    sha256: str
    #: the order-independent sum of :class:`LineSum`, for the entries asked for (else None)
    line_sum: int | None = None


class LineSum:
    """Sum mod 2**64 of each line's 8-byte blake2b: a figure of a table's COPY lines that does
    not depend on their order (rows re-routed among partitions on restore keep it, summed
    over the tree). Per-line Python: used only for the rare trees that need it."""

    def __init__(self) -> None:
        self.value = 0
        self._partial = b""

    def feed(self, text: bytes) -> None:
        """More COPY text, cut anywhere."""
        lines = (self._partial + text).split(b"\n")
        self._partial = lines.pop()
        total = self.value
        for line in lines:
            total += int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little")
        self.value = total & 0xFFFFFFFFFFFFFFFF

    def done(self) -> int:
        """The sum (a last line without its newline counts as a line)."""
        if self._partial:
            self.feed(b"\n")
        return self.value


class _ArchiveCursor:
    """Reads the archive's integers and strings from a buffer (``IndexError`` at its end)."""

    def __init__(self, data: bytes | bytearray | mmap.mmap, pos: int = 0) -> None:
        self.data, self.pos = data, pos
        self.int_size = 4
        self._int: struct.Struct | None = struct.Struct("<BI")

    def set_int_size(self, size: int) -> None:
        self.int_size = size
        self._int = struct.Struct("<BI") if size == 4 else None

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise IndexError("end of buffer")

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self) -> int:
        if self._int is not None:
            sign, value = self._int.unpack_from(self.data, self.pos)
            self.pos += 5
        else:
            self.need(1 + self.int_size)
            sign = self.byte()
            value = int.from_bytes(self.data[self.pos : self.pos + self.int_size], "little")
            self.pos += self.int_size
        return -value if sign else value

    def str(self) -> str | None:
        """A string; None when it was NULL."""
        length = self.int()
        if length < 0:
            return None
        self.need(length)
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", "replace")


def _parse_header(cur: _ArchiveCursor) -> ArchiveHeader:
    """The header at the cursor (``IndexError``/``struct.error`` when the buffer is short)."""
    cur.need(len(DUMP_MAGIC))
    if bytes(cur.data[: len(DUMP_MAGIC)]) != DUMP_MAGIC:
        raise ArchiveError("not a pg_dump custom-format archive (no PGDMP header)")
    cur.pos = len(DUMP_MAGIC)
    cur.need(6)
    version = (cur.byte(), cur.byte(), cur.byte())
    int_size = cur.byte()
    offset_size = cur.byte()
    if version < (1, 10, 0) or cur.byte() != _ARCH_CUSTOM or not 1 <= int_size <= 8:
        raise ArchiveError(f"unsupported archive (format {version}, not custom or too old)")
    cur.set_int_size(int_size)
    compressed = cur.byte() != 0 if version >= (1, 15, 0) else cur.int() != 0
    for _ in range(7):
        cur.int()  # creation time fields
    dbname, server, dump = cur.str(), cur.str(), cur.str()
    return ArchiveHeader(
        version, dbname or "", server or "", dump or "", int_size, offset_size, compressed
    )


def _parse_toc(cur: _ArchiveCursor, header: ArchiveHeader) -> dict[int, TocEntry]:
    """The TOC at the cursor, by dumpId."""
    version = header.format_version
    entries: dict[int, TocEntry] = {}
    count = cur.int()
    if count < 0:
        raise ArchiveError(f"TOC of {count} entries")
    for _ in range(count):
        dump_id = cur.int()
        cur.int()  # hadDumper
        cur.str()  # catalogId.tableoid
        oid = cur.str()  # catalogId.oid
        tag, desc = cur.str(), cur.str()
        cur.int()  # section
        cur.str()  # defn
        cur.str()  # dropStmt
        copy_stmt = cur.str()
        namespace = cur.str()
        cur.str()  # tablespace
        if version >= (1, 14, 0):
            cur.str()  # tableam
        if version >= (1, 16, 0):
            cur.int()  # relkind
        cur.str()  # owner
        cur.str()  # "false" (WITH OIDS, >= 1.9)
        while cur.str() is not None:  # dependencies, NULL-terminated
            pass
        flag_at = cur.pos
        cur.need(1 + header.offset_size)
        flag = cur.byte()
        cur.pos += header.offset_size
        if dump_id <= 0 or dump_id in entries or flag not in (1, 2, 3):  # NOT_SET, SET, NO_DATA
            raise ArchiveError(f"malformed TOC entry {dump_id}")
        entries[dump_id] = TocEntry(
            dump_id, desc or "", namespace or "", tag or "", flag, flag_at,
            int(oid) if oid and oid.isdigit() else 0, copy_stmt or "",
        )  # fmt: skip
    return entries


def read_archive_header(path: Path) -> ArchiveHeader:
    """Parse the header of a custom-format archive file (``SourceError`` if it is not one)."""
    with open(path, "rb") as fh:
        data = fh.read(_HEADER_READ)
    try:
        return _parse_header(_ArchiveCursor(data))
    except ArchiveError as exc:
        raise SourceError(f"{path}: {exc}") from None
    except (IndexError, struct.error):
        raise SourceError(f"{path}: truncated pg_dump archive header") from None


_TOC, _BLOCK, _COPY, _CHUNK, _SKIP, _BLOB = range(6)


class ArchiveStream:
    """Feed an archive's bytes in order (:meth:`feed`), then :meth:`finish`.

    ``digest``: figure every ``TABLE DATA`` block (:attr:`tables`, by dumpId); a compressed
    archive is refused then. Without it only the blocks' positions are found
    (:attr:`blocks`, by dumpId), as :func:`index_archive` needs.
    """

    def __init__(
        self, *, digest: bool = True, per_line: Callable[[TocEntry], bool] | None = None
    ) -> None:
        self.digest = digest
        self._per_line = per_line  # which TABLE DATA entries also get a LineSum
        self._lines: LineSum | None = None
        self.header: ArchiveHeader | None = None
        self.entries: dict[int, TocEntry] = {}
        self.blocks: dict[int, int] = {}
        self.tables: dict[int, TableData] = {}
        self._state = _TOC
        self._toc = bytearray()
        self._toc_tried = 0  # buffered TOC bytes at the last parse attempt that fell short
        self._pos = 0  # archive offset of the next byte fed
        self._pend = bytearray()  # a field split across feeds (a few bytes)
        self._skip = 0  # bytes of the current chunk still to skip
        self._in_blob = False
        self._dump_id = 0
        self._carry = b""  # raw bytes of a COPY block held for the next feed (< 5)
        self._tail = b""  # the last COPY text bytes, held back: the terminator is not hashed
        self._hash = hashlib.sha256()
        self._rows = self._size = 0

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """The next bytes of the archive (any size)."""
        if len(data) <= _PIECE:
            self._feed(data)
            return
        for i in range(0, len(data), _PIECE):
            self._feed(data[i : i + _PIECE])

    def _feed(self, data: bytes) -> None:
        if self._state == _TOC:
            self._toc += data
            self._pos += len(data)
            # a parse attempt reads the whole buffer again: only when it has doubled since
            # the last one fell short, so a TOC of n bytes costs O(n) however it is fed
            # (each 64 KiB feed re-parsing it was quadratic: 2.2 CPU-s for an 8 MB TOC)
            if len(self._toc) < 2 * self._toc_tried:
                return
            self._after_toc()
            return
        self._data(data)

    def _after_toc(self, final: bool = False) -> None:
        """Parse the buffered header and TOC; once whole, read the data bytes buffered after."""
        end = self._parse_toc()
        if end is None:
            self._toc_tried = len(self._toc)
            if final:
                raise ArchiveError("truncated archive: it ends inside its header or TOC")
            return
        rest = bytes(self._toc[end:])
        self._pos = end
        self._toc = bytearray()
        self._data(rest)

    def _data(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._state == _COPY:
                i = self._copy(data, i)
            elif self._state == _SKIP:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                if not self._skip:
                    self._state = _CHUNK
            else:
                i = self._field(data, i)
        self._pos += n

    def finish(self) -> None:
        """The stream ended: ``ArchiveError`` unless it ended after a whole last block."""
        if self._state == _TOC:
            self._after_toc(final=True)
        if self._state != _BLOCK or self._pend:
            raise ArchiveError(
                f"truncated archive: it ends inside the data of entry {self._dump_id}"
            )
        if self.digest:
            missing = [e for e in self.entries.values()
                       if e.desc == "TABLE DATA" and e.offset_flag != OFFSET_NO_DATA
                       and e.dump_id not in self.tables]  # fmt: skip
            if missing:
                raise ArchiveError(
                    f"no data block for table {missing[0].namespace}.{missing[0].tag}"
                )

    # -- header and TOC --------------------------------------------------------------------

    def _parse_toc(self) -> int | None:
        """Where the data starts, once header and TOC are all here; None: not yet."""
        cur = _ArchiveCursor(self._toc)
        try:
            header = _parse_header(cur)
            entries = _parse_toc(cur, header)
        except (IndexError, struct.error):
            if len(self._toc) > _MAX_TOC:
                raise ArchiveError(f"archive TOC larger than {_MAX_TOC >> 20} MiB") from None
            return None
        if header.format_version < INDEXED_SINCE:
            raise ArchiveError(f"archive format {header.format_version} is too old to read")
        if self.digest and header.compressed:
            raise ArchiveError("compressed archive (pg_dump -Z > 0): its data cannot be read")
        if header.int_size != 4:
            raise ArchiveError(f"archive int size {header.int_size} (only 4 is read)")
        self.header, self.entries = header, entries
        self._state = _BLOCK
        return cur.pos

    # -- small fields: block headers, chunk lengths, blob oids -----------------------------

    def _field(self, data: bytes, i: int) -> int:
        need = 6 if self._state == _BLOCK else 5
        if not self._pend and len(data) - i >= need:
            raw = data[i : i + need]
        else:
            take = min(need - len(self._pend), len(data) - i)
            self._pend += data[i : i + take]
            if len(self._pend) < need:
                return i + take
            raw, self._pend = bytes(self._pend), bytearray()
            i += take - need  # so that i + need is past the field
        start = self._pos + i
        i += need
        if self._state == _BLOCK:
            self._block(raw[0], _int(raw[1:]), start)
        elif self._state == _BLOB:
            oid = _int(raw)
            self._state = _BLOCK if oid == 0 else _CHUNK
            self._in_blob = oid != 0
        else:  # a chunk's length
            length = _int(raw)
            if length < 0:
                raise ArchiveError(f"negative chunk length at {start}")
            if length:
                self._skip, self._state = length, _SKIP
            else:
                self._state = _BLOB if self._in_blob else _BLOCK
        return i

    def _block(self, kind: int, dump_id: int, start: int) -> None:
        entry = self.entries.get(dump_id)
        if entry is None or dump_id in self.blocks or entry.offset_flag == OFFSET_NO_DATA:
            raise ArchiveError(f"data block for unexpected entry {dump_id} at {start}")
        self.blocks[dump_id] = start
        self._dump_id = dump_id
        if kind == BLK_BLOBS:
            self._state, self._in_blob = _BLOB, True
        elif kind != BLK_DATA:
            raise ArchiveError(f"unknown block type {kind} at {start}")
        elif entry.desc == "TABLE DATA" and not (self.header and self.header.compressed):
            self._state, self._in_blob = _COPY, False
            self._carry, self._tail = b"", b""
            self._hash, self._rows, self._size = hashlib.sha256(), 0, 0
            self._lines = LineSum() if self._per_line and self._per_line(entry) else None
        else:
            self._state, self._in_blob = _CHUNK, False

    # -- COPY text, at C speed -------------------------------------------------------------

    def _copy(self, data: bytes, i: int) -> int:
        """Consume COPY chunks from ``data[i:]``; where the block ended, or ``len(data)``."""
        carried = len(self._carry)
        buf = self._carry + data[i:] if carried else data[i:] if i else data
        end = buf.find(_BLOCK_END)
        seg = buf if end < 0 else buf[:end]
        if not self.digest:
            self._carry = b"" if end >= 0 else seg[-4:]
        else:
            text = _CHUNK_HEADER.sub(b"", seg)
            # a NUL left is the start of a header (or of the end) cut by the feed: keep it raw
            cut = text.find(b"\x00")
            if cut >= 0:
                if end >= 0 or len(text) - cut > 4:
                    raise ArchiveError(f"malformed COPY data in entry {self._dump_id}")
                self._carry, text = text[cut:], text[:cut]
            else:
                self._carry = b""
            text = self._tail + text
            self._tail, text = text[-len(COPY_END) :], text[: -len(COPY_END)]
            self._hash.update(text)
            self._rows += text.count(b"\n")
            self._size += len(text)
            if self._lines is not None:
                self._lines.feed(text)
        if end < 0:
            return len(data)
        if self.digest:
            if self._tail != COPY_END:  # pg_dump always ends with it; still, count what is
                self._hash.update(self._tail)
                self._rows += self._tail.count(b"\n")
                self._size += len(self._tail)
                if self._lines is not None:
                    self._lines.feed(self._tail)
            line_sum = None if self._lines is None else self._lines.done()
            self.tables[self._dump_id] = TableData(
                self._rows, self._size, self._hash.hexdigest(), line_sum
            )
        self._carry, self._state = b"", _BLOCK
        return i + end + len(_BLOCK_END) - carried


def _int(raw: bytes) -> int:
    value = int.from_bytes(raw[1:5], "little")
    return -value if raw[0] else value


def index_archive(path: Path) -> int:
    """Record the data offsets in a custom-format archive that lacks them; return how many.

    ``pg_dump -Fc`` writing to a pipe (as a streaming backup does) cannot seek back to fill in
    where each table's data starts, and ``pg_restore -j`` then makes every worker scan the file
    for each table (4x slower here). This walks the data blocks once and writes each one's
    position into its TOC entry, in place: the same fixed-size fields pg_dump fills when it
    writes to a file; nothing else changes. An archive that already has its offsets, or one
    this reader does not understand, is left as it is (0) — pg_restore still reads it; a
    file that is not a custom-format archive at all raises SourceError.
    """
    header = read_archive_header(path)
    if header.format_version < INDEXED_SINCE:
        return 0
    reader = ArchiveStream(digest=False)
    try:
        with open(path, "rb") as fh:
            while reader.header is None and (piece := fh.read(_READ)):
                reader.feed(piece)
            if reader.header is None:  # the file ended before a parse attempt was due
                reader.finish()
            if not any(e.offset_flag == OFFSET_NOT_SET for e in reader.entries.values()):
                return 0
            while piece := fh.read(_READ):
                reader.feed(piece)
            # the pages read would stay in the page cache; this process needs none of them
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        reader.finish()
    except ArchiveError as exc:
        log.warning("%s: data offsets not indexed (%s); pg_restore will scan for them", path, exc)
        return 0
    return write_offsets(path, reader)


def write_offsets(path: Path, reader: ArchiveStream) -> int:
    """Write the data offsets ``reader`` found into the archive file it read; return how many.

    ``reader`` was fed the whole of ``path`` and finished without error: by
    :func:`index_archive` from the file, or by a restore while it staged the file (one pass,
    the file never read back). Only the TOC entries whose offset is "not set" are written.
    """
    assert reader.header is not None
    size = reader.header.offset_size
    patches = [
        (e.flag_at, bytes([OFFSET_SET]) + reader.blocks[e.dump_id].to_bytes(size, "little"))
        for e in reader.entries.values()
        if e.offset_flag == OFFSET_NOT_SET and e.dump_id in reader.blocks
    ]
    if not patches:
        return 0
    with open(path, "r+b") as fh:
        for flag_at, value in patches:
            os.pwrite(fh.fileno(), value, flag_at)
    return len(patches)
