"""Recovery of the message log on every open: scan, cut a torn tail, skip damage.

The log is read once from start to end through a buffered reader in chunks
(never the whole file in memory), checking every record as above:

* A wrong magic: ``StoreError`` naming the file; the file is not touched. (A
  file shorter than the magic that is a prefix of it is a log whose creation
  was cut short: it is started afresh, with a warning.)
* Torn tail: the last record is cut short (fewer bytes than a record header,
  or fewer than its length says) or its checksum is bad and it ends exactly at
  end of file, and no valid record follows. This is what a crash in the middle
  of an append leaves. The bytes are truncated away with a warning giving
  their count and offset.
* Damage in the middle: a record with a bad checksum, an impossible length or
  a bad id, with valid records after it. The file is scanned forward for the
  next offset where a record parses with a valid checksum and id; offsets
  whose header is impossible are passed over without a checksum, and one that
  only looks possible is checksummed once the scan has shown it can be the
  next record (``_resync``: a body crafted to look like headers costs no
  checksum per offset); the bytes in between are skipped with a warning giving their offset and
  count, and every valid record after them is kept. The damaged file is copied
  aside (``messages.log.damaged-<unix time>``) and a clean log is written (temp
  file, fsync, ``os.replace``, fsync of the directory). Bytes that cannot be
  explained as one torn append at the end (an impossible length field or a
  bad checksum with more bytes after it, even when no valid record follows)
  are handled the same way.

Skipping is safe here because the log is not the only copy: every message is
broadcast to every node. The node starts with the records it could read, and
re-sync with its neighbours (anti-entropy over the id sets) fetches back
whatever was in the damaged bytes, as it does for anything the node missed
while it was down. What must never happen is serving a wrong message, and the
checksum plus the id check (the id is a hash of the body) rule that out: a
record is believed only when both match. (The one way to read back a record
that was not written is a body that itself contains a complete valid record,
exposed when the header of the record holding it is damaged; that record is
still a correct message, since its id matches its body.)
"""

from __future__ import annotations

import heapq
import os
import shutil
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs
from twisted.logger import Logger

from gossip.core.message import message_id
from gossip.store.id_index import IdIndex
from gossip.store.interface import StoreError
from gossip.store.record import (
    FIXED,
    FIXED_SPAN,
    HEADER,
    HEADER_BYTES,
    KIND_MESSAGE,
    MAGIC,
    MAX_RECORD_BYTES,
    MIN_PAYLOAD,
    plausible,
)

LOG_NAME = "messages.log"
_READ_CHUNK = 1 << 20  # recovery reads the file in chunks of this size


# Why a record at some offset does not parse.
_SHORT = "fewer bytes than a record header before end of file"
_PAST_EOF = "record runs past end of file"
_BAD_LENGTH = "impossible length"
_BAD_CRC = "bad checksum"
_BAD_CRC_AT_EOF = "bad checksum on a record ending at end of file"
_BAD_CONTENT = "bad record contents (kind, path count or id)"
_TORN = (_SHORT, _PAST_EOF, _BAD_CRC_AT_EOF)


class _Window:
    """A forward-only window on the file: ``buf[0]`` is the byte at offset ``base``.

    Reads go through a buffered reader, sequentially, in chunks of at least
    ``_READ_CHUNK``; offsets asked for never go backwards.
    """

    __slots__ = ("base", "buf", "f", "size")

    def __init__(self, f: BinaryIO, size: int, start: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.base = start
        f.seek(start)

    @classmethod
    def read_at(cls, f: BinaryIO, start: int, n: int) -> _Window:
        """A window holding just file bytes [start, start+n), read with ``os.pread``:
        the reader's position, which the forward window relies on, is left alone."""
        win = cls.__new__(cls)
        win.f = f
        win.buf = os.pread(f.fileno(), n, start)
        win.base = start
        win.size = start + len(win.buf)
        return win

    def get(self, offset: int, n: int) -> int | None:
        """Make file bytes [offset, offset+n) available in ``buf``; return their index there.

        None when they run past end of file.
        """
        end = offset + n
        if end > self.size:
            return None
        top = self.base + len(self.buf)
        if end <= top:
            return offset - self.base
        if offset > top:  # not reached by the callers here, which never skip ahead
            self.f.seek(offset)
            self.buf, self.base, top = b"", offset, offset
        keep = self.buf[offset - self.base :]
        more = self.f.read(max(end - top, _READ_CHUNK))
        self.buf = keep + more
        self.base = offset
        return 0


def _parse(win: _Window, pos: int) -> tuple[int, bytes] | str:
    """(record length, id) of a valid record at ``pos``, else why there is none."""
    i = win.get(pos, HEADER_BYTES)
    if i is None:
        return _SHORT
    crc, length = HEADER.unpack_from(win.buf, i)
    if length < MIN_PAYLOAD or length > MAX_RECORD_BYTES:
        return _BAD_LENGTH
    total = HEADER_BYTES + length
    i = win.get(pos, total)
    if i is None:
        return _PAST_EOF
    buf = win.buf
    end = i + total
    if zlib.crc32(buf[i + 4 : end]) != crc:
        return _BAD_CRC_AT_EOF if pos + total == win.size else _BAD_CRC
    kind, mid, _received_at, count = FIXED.unpack_from(buf, i + HEADER_BYTES)
    body = i + HEADER_BYTES + MIN_PAYLOAD + 4 * count
    if kind != KIND_MESSAGE or body > end or message_id(buf[body:end]) != mid:
        return _BAD_CONTENT
    return total, mid


# Bytes one skip over damage checksums for candidates that had to wait (see _resync)
# before it stops checking those not followed by a plausible header.
_WAITING_CHECK_BYTES = 16 << 20


def _resync(win: _Window, start: int) -> int | None:
    """The first offset from ``start`` where a valid record begins, if any.

    Any offset may begin a record, and checking one in full costs a checksum over
    up to ``MAX_RECORD_BYTES``; bodies are what clients send, and a body crafted to
    read as record headers at every offset made skipping one damaged record cost
    seconds. So a candidate is checked in full only when cheaper checks leave no
    other choice:

    * its header must be plausible (``plausible``) and its record fit in the file;
    * a candidate is checked at once only if it ends where another plausible header
      begins (or at, or within a header of, end of file), as a real record does,
      and no candidate seen before it ends sooner. Otherwise it waits (a heap by
      end offset) until the scan reaches its end, so that every candidate starting
      inside it is known, and is checked then.

    A valid record ends the scan, and every waiting candidate overlaps it: such a
    candidate could only be valid by holding that record in its body, so none is
    checked. A forged header claims a length that reaches past the damaged record,
    so it waits and is dropped unchecked once the next real record is found; the
    checksums computed are about one per real record plus those of forged headers
    that end inside the damaged record. A body can hold many of those (short
    forged records inside it), so waiting candidates get ``_WAITING_CHECK_BYTES``
    of checksums per skip; past that, only those followed by a plausible header
    are checked. Every intact record is found unless that budget ran out and the
    record after it is damaged too (re-sync brings such a record back). (Of a
    record whose body holds a complete valid record, the one held may be found
    instead of the holder; both are correct messages.)
    """
    size = win.size
    last = size - FIXED_SPAN
    waiting: list[tuple[int, int]] = []  # (end, offset) of candidates, a heap
    spent = 0

    def waited_valid(c: int, end: int) -> bool:
        nonlocal spent
        tail = FIXED_SPAN if end + FIXED_SPAN <= size else 0
        record = _Window.read_at(win.f, c, end - c + tail)
        if spent > _WAITING_CHECK_BYTES and tail and plausible(record.buf, end - c) is None:
            return False
        spent += end - c
        record.size = end  # the successor's bytes are not part of the record
        return isinstance(_parse(record, c), tuple)

    kind_byte = bytes([KIND_MESSAGE])
    q = start
    while q <= last:
        # Only an offset whose kind byte is right can begin a record: find the next
        # one in the window at C speed instead of trying every offset.
        i = win.get(q, FIXED_SPAN)
        if i is None:
            break
        k = win.buf.find(kind_byte, i + HEADER_BYTES)
        if k < 0:
            q = win.base + len(win.buf) - HEADER_BYTES  # its kind byte is past the window
            continue
        q = win.base + k - HEADER_BYTES
        if q > last:
            break
        while waiting and waiting[0][0] <= q:
            end, c = heapq.heappop(waiting)
            if waited_valid(c, end):
                return c
        i = win.get(q, FIXED_SPAN)
        length = None if i is None else plausible(win.buf, i)
        q += 1
        if length is None:
            continue
        c = q - 1
        end = c + HEADER_BYTES + length
        if end > size:
            continue
        if not waiting or end <= waiting[0][0]:
            followed = True  # end of file, or a torn header right before it
            if end + FIXED_SPAN <= size:
                j = win.get(c, end + FIXED_SPAN - c)  # from c: the window never goes back
                followed = j is not None and plausible(win.buf, j + end - c) is not None
            if followed:
                if isinstance(_parse(win, c), tuple):
                    return c
                continue
        heapq.heappush(waiting, (end, c))
    while waiting:
        end, c = heapq.heappop(waiting)
        if waited_valid(c, end):
            return c
    return None


# Record offsets are kept in 4 bytes each while they fit (a log under 4 GiB), in 8 after.
_NARROW_OFFSETS = "I"
NARROW_END = 0xFFFFFFFF  # the largest end of data whose record offsets all fit in 4 bytes


def offset_array(end: int, offsets: Iterable[int] = ()) -> array[int]:
    """An array for the offsets of records in the first ``end`` bytes of a log: 4 bytes
    per record (a message's share of the store's memory) unless an offset may not fit."""
    return array(_NARROW_OFFSETS if end <= NARROW_END else "q", offsets)


def fit_offsets(offsets: array[int], end: int) -> array[int]:
    """``offsets``, or a wider copy once the log's data reaches past 4 GiB (``end``)."""
    if end > NARROW_END and offsets.typecode == _NARROW_OFFSETS:
        return offset_array(end, offsets)
    return offsets


@attrs.define
class Recovered:
    index: IdIndex  # the ids of the valid records, first copies, in file order
    offsets: array[int]  # their offsets, by position in the index
    good_end: int  # end of the last valid record
    size: int  # file size as found
    torn: tuple[int, int] | None = None  # (offset, bytes) of a torn tail
    damaged: list[tuple[int, int, str]] = attrs.Factory(list)  # (offset, bytes, why)
    duplicates: int = 0


def scan_log(f: BinaryIO, size: int) -> Recovered:
    index = IdIndex()
    add = index.add_id
    offsets = offset_array(size)
    rec = Recovered(index, offsets, len(MAGIC), size)
    win = _Window(f, size, len(MAGIC))
    pos = len(MAGIC)
    unpack_header, unpack_fixed, crc32, hash_id = (
        HEADER.unpack_from,
        FIXED.unpack_from,
        zlib.crc32,
        message_id,
    )
    while pos < size:
        # Fast path: the same checks as _parse, inline, over the records that lie
        # wholly inside the window; anything else (a record crossing the end of the
        # window, or a bad one) goes through _parse below.
        buf, base = win.buf, win.base
        i = start = pos - base
        limit = len(buf)
        while i + HEADER_BYTES <= limit:
            crc, length = unpack_header(buf, i)
            end = i + HEADER_BYTES + length
            if length < MIN_PAYLOAD or length > MAX_RECORD_BYTES or end > limit:
                break
            if crc32(buf[i + 4 : end]) != crc:
                break
            kind, mid, _received_at, count = unpack_fixed(buf, i + HEADER_BYTES)
            body = i + HEADER_BYTES + MIN_PAYLOAD + 4 * count
            if kind != KIND_MESSAGE or body > end or hash_id(buf[body:end]) != mid:
                break
            if add(mid) is None:
                rec.duplicates += 1
            else:
                offsets.append(base + i)
            i = end
        if i != start:
            pos = rec.good_end = base + i
            continue
        got = _parse(win, pos)
        if isinstance(got, tuple):
            total, mid = got
            if add(mid) is None:
                rec.duplicates += 1
            else:
                offsets.append(pos)
            pos += total
            rec.good_end = pos
            continue
        nxt = _resync(win, pos + 1)
        if nxt is None:
            if got in _TORN:
                rec.torn = (pos, size - pos)
            else:
                rec.damaged.append((pos, size - pos, got))
            break
        rec.damaged.append((pos, nxt - pos, got))
        pos = nxt
    return rec


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, chunks: Iterator[bytes]) -> int:
    """Write ``chunks`` to a temp file, fsync it and rename it to ``path``; return its size."""
    tmp = path.with_name(path.name + ".tmp")
    size = 0
    with open(tmp, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size


def open_log(directory: Path, log: Logger, sync: bool) -> tuple[Recovered, int]:
    """Create or recover ``messages.log``; return the index and the end of the good data."""
    path = directory / LOG_NAME
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, on every path)
    except FileNotFoundError:
        write_new_file(path, iter((MAGIC,)))
        return Recovered(IdIndex(), offset_array(0), len(MAGIC), len(MAGIC)), len(MAGIC)
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC))
        if head != MAGIC:
            if len(head) < len(MAGIC) and MAGIC.startswith(head):
                log.warn(
                    "{path} holds {size} bytes, a cut-short creation: starting it afresh",
                    path=str(path),
                    size=size,
                )
                write_new_file(path, iter((MAGIC,)))
                return Recovered(IdIndex(), offset_array(0), len(MAGIC), len(MAGIC)), len(MAGIC)
            raise StoreError(
                f"{path} is not a gossip message log (bad magic {head[:8]!r}); refusing to start"
            )
        rec = scan_log(f, size)
    if rec.duplicates:
        log.info(
            "{path}: ignored {count} duplicate records (first copies kept)",
            path=str(path),
            count=rec.duplicates,
        )
    if rec.torn is not None:
        offset, nbytes = rec.torn
        log.warn(
            "torn tail in {path}: truncated {nbytes} bytes at offset {offset}"
            " (an append cut short by a crash)",
            path=str(path),
            nbytes=nbytes,
            offset=offset,
        )
    if rec.damaged:
        for offset, nbytes, why in rec.damaged:
            log.warn(
                "damaged log {path}: {nbytes} bytes at offset {offset} skipped ({why});"
                " the messages in them come back from neighbours by re-sync",
                path=str(path),
                nbytes=nbytes,
                offset=offset,
                why=why,
            )
        return rec, _rewrite(path, rec, log)
    if rec.torn is not None or sync:
        # Truncate a torn tail; and make the starting point durable before anything
        # is served from it (what a killed process wrote may be only in the page cache).
        fd = os.open(path, os.O_RDWR)
        try:
            if rec.torn is not None:
                os.ftruncate(fd, rec.good_end)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    return rec, rec.good_end


def _rewrite(path: Path, rec: Recovered, log: Logger) -> int:
    """Copy the damaged log aside and replace it by its valid records; return the new size."""
    stamp = int(time.time())
    copy = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while copy.exists():
        n += 1
        copy = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    shutil.copyfile(path, copy)
    fd = os.open(copy, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    new_offsets = array(rec.offsets.typecode)  # the rewritten file is no longer than the old
    src = os.open(path, os.O_RDONLY)
    try:

        def records() -> Iterator[bytes]:
            yield MAGIC
            pos = len(MAGIC)
            for offset in rec.offsets:
                _crc, length = HEADER.unpack(os.pread(src, HEADER_BYTES, offset))
                data = os.pread(src, HEADER_BYTES + length, offset)
                new_offsets.append(pos)
                pos += len(data)
                yield data

        size = write_new_file(path, records())
    finally:
        os.close(src)
    rec.offsets[:] = new_offsets
    log.warn(
        "copied the damaged log to {copy}; rewrote {path} with its {count} valid records",
        copy=str(copy),
        path=str(path),
        count=len(new_offsets),
    )
    return size
