"""The data offsets of a custom-format archive written through a pipe, found as it streams by.

``pg_dump -Fc`` writing to a pipe (as a streaming backup does) cannot seek back to fill in
where each table's data starts, and ``pg_restore -j`` then makes every worker scan the file
for each table (4x slower here). :class:`OffsetIndex` is fed the archive's bytes in order — as
the restore decrypts them into the scratch file — reads the header and the table of contents,
follows the data blocks' framing, and at the end names the fixed-size TOC fields to write in
place: the same fields pg_dump fills when it writes to a file; nothing else changes.

Why while staging and not afterwards: a second pass read the whole staged file again, through
a memory map whose pages counted in the restore's resident size until each data block ended —
the peak grew with the largest table (129 MB at 3 M messages, 194 MB at 10 M). Fed piece by
piece it holds the header and TOC (which grow with the schema, not the data) and a few bytes
of framing that straddle two pieces; the file is never read back.

The archive layout is pg_dump's (pg_backup_archiver.c, pg_backup_custom.c): a data block is
a type byte, the entry's dumpId, then length-prefixed chunks up to a zero length (a blobs
block: per large object its oid, then such chunks; oid 0 ends it).
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"PGDMP"
INDEXED_SINCE = (1, 12, 0)  # archives this parser reads (PostgreSQL 9.5 and later)
OFFSET_NOT_SET, OFFSET_SET, OFFSET_NO_DATA = 1, 2, 3
BLK_DATA, BLK_BLOBS = 1, 3
_FIRST_TRY = 64 * 1024  # bytes buffered before the header and TOC are first parsed
_READ = 1 << 20

# where the walk is: expecting a block's header, a chunk's length, or a large object's oid
_HEAD, _BLOCK, _CHUNK, _BLOB_OID, _DONE, _FAILED = range(6)


class ArchiveCursor:
    """Reads the archive's integers and strings from a buffer (``IndexError`` at its end)."""

    def __init__(self, data: bytes | bytearray, pos: int) -> None:
        self.data, self.pos = data, pos
        self.int_size = 4
        self.offset_size = 8

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self) -> int:
        sign = self.byte()
        end = self.pos + self.int_size
        if end > len(self.data):
            raise IndexError("archive integer past the end of the buffer")
        value = int.from_bytes(self.data[self.pos : end], "little")
        self.pos = end
        return -value if sign else value

    def skip_str(self) -> bool:
        """Skip a string; False when it was NULL."""
        length = self.int()
        if length < 0:
            return False
        self.pos += length
        return True


def toc_offsets(cur: ArchiveCursor, version: tuple[int, int, int]) -> dict[int, tuple[int, int]]:
    """Read the TOC: dumpId -> (offset flag, position of the flag) of each entry."""
    entries: dict[int, tuple[int, int]] = {}
    for _ in range(cur.int()):
        dump_id = cur.int()
        cur.int()  # hadDumper
        for _ in range(4):
            cur.skip_str()  # tableoid, oid, tag, desc
        cur.int()  # section
        for _ in range(5):
            cur.skip_str()  # defn, dropStmt, copyStmt, namespace, tablespace
        if version >= (1, 14, 0):
            cur.skip_str()  # tableam
        if version >= (1, 16, 0):
            cur.int()  # relkind
        cur.skip_str()  # owner
        cur.skip_str()  # "false" (WITH OIDS, >= 1.9)
        while cur.skip_str():  # dependencies, NULL-terminated
            pass
        flag_at = cur.pos
        flag = cur.byte()
        cur.pos += cur.offset_size
        if dump_id <= 0 or dump_id in entries or flag not in (1, 2, 3):  # NOT_SET, SET, NO_DATA
            raise ValueError(f"TOC entry {dump_id}")
        entries[dump_id] = (flag, flag_at)
    return entries


def _parse_head(head: bytes | bytearray) -> tuple[dict[int, tuple[int, int]], int, int, int]:
    """The TOC entries, where the data blocks start, the int and offset sizes.

    IndexError when ``head`` ends before the TOC does; ValueError when it is not an archive
    this parser reads; an empty dict when there is nothing to index (an archive older than
    offsets, or one that has them all).
    """
    if head[: len(MAGIC)] != MAGIC:
        raise ValueError("not a custom-format archive (no PGDMP header)")
    cur = ArchiveCursor(head, len(MAGIC))
    version = (cur.byte(), cur.byte(), cur.byte())
    cur.int_size = cur.byte()
    cur.offset_size = cur.byte()
    if not 1 <= cur.int_size <= 8 or not 1 <= cur.offset_size <= 8:
        raise ValueError(f"integer size {cur.int_size}, offset size {cur.offset_size}")
    cur.byte()  # format
    if version < INDEXED_SINCE:
        return {}, cur.pos, cur.int_size, cur.offset_size
    if version >= (1, 15, 0):
        cur.byte()  # compression algorithm
    else:
        cur.int()  # compression level
    for _ in range(7):
        cur.int()  # creation time
    for _ in range(3):
        cur.skip_str()  # dbname, server version, pg_dump version
    entries = toc_offsets(cur, version)
    if cur.pos > len(head):
        raise IndexError("the TOC runs past the bytes read so far")
    if not any(flag == OFFSET_NOT_SET for flag, _ in entries.values()):
        entries = {}
    return entries, cur.pos, cur.int_size, cur.offset_size


class OffsetIndex:
    """Fed an archive's bytes in order (:meth:`feed`), names the TOC writes (:meth:`patches`).

    It never raises while fed: an archive it does not understand sets :attr:`problem` and is
    then ignored (pg_restore still reads it, only slower) — staging must not fail for it.
    """

    def __init__(self) -> None:
        self._state = _HEAD
        self._head = bytearray()  # the header and TOC, until they parse
        self._next_try = _FIRST_TRY
        self._entries: dict[int, tuple[int, int]] = {}
        self._found: dict[int, int] = {}
        self._int_size = 4
        self._offset_size = 8
        self._int: struct.Struct | None = struct.Struct("<BI")
        self._kind = 0  # the current block's type
        self._pos = 0  # stream offset of the first byte of ``_carry``
        self._carry = b""  # framing bytes that straddle two pieces
        self._skip = 0  # chunk bytes still to pass over
        self.problem = ""  # why the archive cannot be indexed ('' = it can, or need not be)

    def feed(self, piece: bytes) -> None:
        """The next bytes of the archive."""
        if self._state in (_DONE, _FAILED) or not piece:
            return
        if self._state == _HEAD:
            self._head += piece
            if len(self._head) >= self._next_try:
                self._try_head(final=False)
            return
        self._walk(piece)

    def patches(self) -> list[tuple[int, bytes]]:
        """The (position, bytes) writes that fill in each data block's offset in the TOC.

        Call once every byte was fed. Empty when there is nothing to index or :attr:`problem`
        says why it cannot be.
        """
        if self._state == _HEAD:
            self._try_head(final=True)
        if self._state == _DONE and not self._found:
            return []
        if self._state != _FAILED and (self._state != _BLOCK or self._carry or self._skip):
            self._fail("the last data block runs past the end of the file")
        if self._state == _FAILED:
            return []
        out = []
        for dump_id, (flag, flag_at) in self._entries.items():
            if flag == OFFSET_NOT_SET and dump_id in self._found:
                offset = self._found[dump_id].to_bytes(self._offset_size, "little")
                out.append((flag_at, bytes([OFFSET_SET]) + offset))
        return out

    def write_into(self, path: Path) -> int:
        """Write :meth:`patches` into the staged archive ``path``; how many (0: none, logged)."""
        patches = self.patches()
        if self.problem:
            log.warning("%s: data offsets not indexed (%s); pg_restore will scan for them",
                        path, self.problem)  # fmt: skip
            return 0
        if patches:
            fd = os.open(path, os.O_WRONLY)
            try:
                for flag_at, value in patches:
                    os.pwrite(fd, value, flag_at)
            finally:
                os.close(fd)
        return len(patches)

    def _fail(self, why: str) -> None:
        self.problem = why
        self._state = _FAILED
        self._head, self._carry, self._entries = bytearray(), b"", {}

    def _try_head(self, *, final: bool) -> None:
        try:
            entries, start, int_size, offset_size = _parse_head(self._head)
        except (IndexError, struct.error):
            if final:
                self._fail("the archive ends inside its table of contents")
            else:
                self._next_try = 2 * len(self._head)  # parse again once twice as much is here
            return
        except ValueError as exc:
            self._fail(str(exc))
            return
        rest = bytes(self._head[start:])
        self._head = bytearray()
        if not entries:
            self._state = _DONE
            return
        self._entries, self._int_size, self._offset_size = entries, int_size, offset_size
        self._int = struct.Struct("<BI") if int_size == 4 else None
        self._state, self._pos = _BLOCK, start
        self._walk(rest)

    def _read_int(self, data: bytes, i: int) -> tuple[int, int] | None:
        """The archive integer at ``data[i:]`` and the position after it; None: not all here."""
        end = i + 1 + self._int_size
        if end > len(data):
            return None
        if self._int is not None:
            sign, value = self._int.unpack_from(data, i)
        else:
            sign, value = data[i], int.from_bytes(data[i + 1 : end], "little")
        return (-value if sign else value), end

    def _walk(self, piece: bytes) -> None:
        """Follow the blocks' framing through ``piece``; keep what straddles into the next."""
        if self._skip:
            if self._skip >= len(piece):
                self._skip -= len(piece)
                self._pos += len(piece)
                return
            piece = piece[self._skip :]
            self._pos += self._skip
            self._skip = 0
        data = self._carry + piece if self._carry else piece
        base, n, i, state = self._pos, len(data), 0, self._state
        try:
            while i < n:
                if state == _BLOCK:
                    got = self._read_int(data, i + 1)
                    if got is None:
                        break
                    kind, (dump_id, after) = data[i], got
                    entry = self._entries.get(dump_id)
                    if entry is None or dump_id in self._found or entry[0] == OFFSET_NO_DATA:
                        raise ValueError(f"data block for unexpected entry {dump_id} at {base + i}")
                    if kind not in (BLK_DATA, BLK_BLOBS):
                        raise ValueError(f"unknown block type {kind} at {base + i}")
                    self._found[dump_id] = base + i
                    self._kind, i = kind, after
                    state = _CHUNK if kind == BLK_DATA else _BLOB_OID
                elif state == _BLOB_OID:
                    got = self._read_int(data, i)
                    if got is None:
                        break
                    oid, i = got
                    state = _CHUNK if oid != 0 else _BLOCK
                else:  # _CHUNK: the hot loop, one chunk per row of a table's COPY data
                    i, state = self._chunks(data, i, n)
                    if state == _CHUNK:  # the piece ended inside a chunk or its length
                        if i > n:
                            self._skip, i = i - n, n
                        break
        except ValueError as exc:
            self._fail(str(exc))
            return
        self._state = state
        self._carry = bytes(data[i:])
        self._pos = base + i  # with ``_skip`` set, i == n: skipped bytes count as they arrive

    def _chunks(self, data: bytes, i: int, n: int) -> tuple[int, int]:
        """Pass over chunks from ``i``: (where the walk stopped, the state there).

        Stops at a block's end marker, at a chunk running past ``n`` (position > n), or
        when fewer bytes than a length remain (position <= n, still in ``_CHUNK``).
        """
        if self._int is None:
            while True:
                got = self._read_int(data, i)
                if got is None:
                    return i, _CHUNK
                length, i = got
                if length == 0:
                    return i, _BLOCK if self._kind == BLK_DATA else _BLOB_OID
                if length < 0:
                    raise ValueError(f"negative chunk length at {self._pos + i}")
                i += length
                if i > n:
                    return i, _CHUNK
        unpack_from = self._int.unpack_from
        while i + 5 <= n:
            sign, length = unpack_from(data, i)
            i += 5
            if length == 0:
                return i, _BLOCK if self._kind == BLK_DATA else _BLOB_OID
            if sign:
                raise ValueError(f"negative chunk length at {self._pos + i - 5}")
            i += length
            if i > n:
                return i, _CHUNK
        return i, _CHUNK


def index_file(path: Path) -> OffsetIndex:
    """An :class:`OffsetIndex` fed the whole file ``path``, read in 1 MiB pieces (no mapping)."""
    index = OffsetIndex()
    with open(path, "rb") as fh:
        while piece := fh.read(_READ):
            index.feed(piece)
    return index
