"""The durable message store: an append-only log file, bodies on disk, an index in memory.

This module is the one place that defines the on-disk format.

Files in the data directory
---------------------------
``messages.log``
    The log (format below).
``messages.lock``
    Held with an exclusive ``fcntl.flock`` while a ``LogStore`` is open, so two
    nodes cannot share one data directory. The kernel drops the lock when the
    process dies, however it dies.
``messages.log.damaged-<unix time>``
    A copy of the log as it was found, left by a recovery that had to skip
    damaged bytes in the middle of the file (see Recovery). Never read again;
    kept for the operator.
``identity``
    The cluster name and node id the directory belongs to, written on first
    use and checked on every start (``gossip/store/identity.py``), so a node
    never opens another cluster's log. Not part of the log format.
``node.pid``
    The running node's pid, under twistd (``gossip/pidfile.py``).

Log format
----------
All integers little-endian::

    file    = magic record*
    magic   = b"GSPLOG1\\n"                        (8 bytes)
    record  = crc32 (u32) | length (u32) | payload  (length bytes)
    payload = kind (u8, 1 = message)
            | id (16 bytes)
            | received_at (f64, seconds since the epoch)
            | path count (u16)
            | path entries (u32 each, origin first)
            | body (the rest of the payload: the message's UTF-8 bytes)

``crc32`` is ``zlib.crc32`` over the 4 length bytes followed by the payload, so
a damaged length field is caught by the checksum too. A payload is at least
27 bytes (kind, id, received_at, path count) and at most ``MAX_RECORD_BYTES``
(1 MiB); a length field outside those bounds is corruption. A record is also
corrupt when its kind is not 1, its path entries run past its end, or its id is
not ``message_id(body)`` (the first 16 bytes of SHA-256 over the body). Records
follow each other with no padding. The same id may appear more than once (after
a crash the node can fetch back a message it had already written); the first
record wins and later ones are ignored.

Durability (the ``fsync`` policy)
---------------------------------
``add`` is on every node's path for every message, so it buffers: a record is
readable through the store (``get``, ``scan``) as soon as ``add`` returns, and
the records added in one reactor turn are written together, with one
``os.write``, at the end of the turn (``callLater(0)``), or earlier when a read
needs the file, an fsync starts, ``when_durable`` or ``close`` is called, or
the buffer passes 1 MiB. Once written a record survives the death of the
process; an acknowledged submit waits for ``when_durable``, which writes first.
If that write fails the records in it are lost although ``add`` accepted them,
so the store refuses further appends (``StoreError``), as after a failed fsync.
Surviving a power loss or kernel crash needs ``fsync``:

``"always"``
    ``add`` writes and fsyncs before it returns (one fsync per message: slow,
    simple).
``"batch"`` (the default: group commit)
    Every added record is covered by an fsync soon after, whether a client
    waits for it (``when_durable``: a submit) or not (a message relayed from a
    neighbour: a node reports a message as delivered only once it is durable,
    see ``durable_count``). When it starts adapts to the load
    (``gossip/store/fsync_pacing.py``): at the end of the reactor turn on a
    quiet node, else after a gap four times as long as the last fsync took (at
    most ``batch_interval``, 4 ms), so that under load one fsync covers what
    arrived meanwhile. One fsync at a time: in the reactor thread while the
    disk is fast (the last fsync waited under ``inline_fsync_below``, 2 ms,
    for the disk, not counting time the machine gave the thread no CPU; 0.2 ms
    on our machines, where a round trip through a thread costs more CPU than
    the fsync), else in a thread (``deferToThreadPool`` on the reactor's pool)
    so that a slow disk stalls the reactor for one fsync at most; records
    added while an fsync is in flight wait for the next one.
    ``when_durable()`` returns a Deferred that fires once every record added
    before the call has been covered by an fsync that *started after* the
    record was written.
``"never"``
    No fsync at all (tests and benchmarks); ``when_durable`` fires at once.

If an fsync fails the store refuses further appends (``StoreError``): after a
failed fsync the kernel may have dropped the dirty pages, so retrying would
claim a durability it cannot give.

Recovery (on every open)
------------------------
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

Memory
------
Bodies stay on disk; ``get`` and ``scan`` read records back with
``os.pread`` (checking the checksum again). In memory there is only an index:
a ``dict`` id -> arrival number, an ``array('q')`` of record offsets in arrival
order, a list of the ids in arrival order (for ``ids_from``: following a node
by position) and a ``SortedList`` of ids (for ``ids_between``; ids added since
the last such query wait in a plain list and are folded in by it), all sharing
one bytes object per id. Measured with ``tracemalloc`` after opening a log of
100,000 messages (Python 3.11, 64-bit): 154 bytes per message -- the id object
49, the arrival-number int 28, the dict's share 52 (24-byte entries plus 4-byte
slots, 100,000 entries sit just past a doubling of its table, so this is near
the worst case: 122 at 10,000 and 128 at 300,000 messages), the offset 8, the
arrival-order list slot 8, the SortedList slot ~9. ``gossip-bench-store``
prints the current figure.
tracemalloc counts bytes requested; the allocator's rounding (the id object
takes 64 bytes, the int 32) adds ~19 bytes to the resident cost.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import heapq
import os
import shutil
import struct
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import attrs
from sortedcontainers import SortedList
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from gossip import logs
from gossip.core.message import ID_BYTES, Message
from gossip.latency import LatencyHistogram
from gossip.store.fsync_pacing import FsyncPacer, timed_sync
from gossip.store.interface import StoreError, ids_between

MAGIC = b"GSPLOG1\n"
LOG_NAME = "messages.log"
LOCK_NAME = "messages.lock"
KIND_MESSAGE = 1
MAX_RECORD_BYTES = 1 << 20  # largest payload (length field) accepted
MAX_PATH = 0xFFFF

_HEADER = struct.Struct("<II")  # crc32, length
_FIXED = struct.Struct(f"<B{ID_BYTES}sdH")  # kind, id, received_at, path count
_LEN = struct.Struct("<I")
HEADER_BYTES = _HEADER.size  # 8
MIN_PAYLOAD = _FIXED.size  # 27

_READ_CHUNK = 1 << 20  # recovery reads the file in chunks of this size
_SCAN_CHUNK = 64 << 10  # scan() reads records back in chunks of this size
_GET_GUESS = 512  # get() reads this much first; a second pread if the record is longer
_WRITE_BOUND = 1 << 20  # appends buffered past this many bytes are written at the next add

FsyncPolicy = Literal["always", "batch", "never"]
POLICIES: tuple[str, ...] = ("always", "batch", "never")
# "batch" runs an fsync in the reactor thread while the last one waited less than this
# for the disk.
INLINE_FSYNC_SECONDS = 0.002
# "batch": the longest an fsync waits after the previous one (see fsync_pacing).
BATCH_MAX_DELAY = 0.004


__all__ = ["LogStore", "StoreError"]


# length | kind | id | received_at | path count | path entries: a record after its
# crc and before its body, one Struct per path length (paths are as long as a
# cluster is wide, so there are few), built when first needed.
_HEADS: dict[int, struct.Struct] = {}


def _head(count: int) -> struct.Struct:
    head = _HEADS.get(count)
    if head is None:
        head = _HEADS[count] = struct.Struct(f"<IB{ID_BYTES}sdH{count}I")
    return head


def encode_record(message: Message) -> bytes:
    """The bytes of one log record for ``message`` (header included).

    On the hot path (every received message): one cached ``Struct`` packs
    everything but the crc and the body, one concatenation and one ``crc32``
    over length + payload, one more for the crc in front.
    """
    mid, body, path = message.id, message.body, message.path
    count = len(path)
    if len(mid) != ID_BYTES:
        raise ValueError(f"a message id has {ID_BYTES} bytes, got {len(mid)}")
    if count > MAX_PATH:
        raise ValueError(f"a path has at most {MAX_PATH} entries, got {count}")
    length = MIN_PAYLOAD + 4 * count + len(body)
    if length > MAX_RECORD_BYTES:
        raise ValueError(f"a record has at most {MAX_RECORD_BYTES} bytes, got {length}")
    try:
        rest = _head(count).pack(length, KIND_MESSAGE, mid, message.received_at, count, *path)
    except struct.error as e:
        raise ValueError(f"cannot encode message: {e}") from None
    rest += body
    return _LEN.pack(zlib.crc32(rest)) + rest


def _decode_payload(buf: bytes, start: int, end: int) -> Message:
    """The message in an already checked payload ``buf[start:end]``."""
    _kind, mid, received_at, count = _FIXED.unpack_from(buf, start)
    p = start + MIN_PAYLOAD
    path = struct.unpack_from(f"<{count}I", buf, p) if count else ()
    return Message(mid, buf[p + 4 * count : end], received_at, path)


def _id_of(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:ID_BYTES]


# -- recovery ------------------------------------------------------------------

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
    crc, length = _HEADER.unpack_from(win.buf, i)
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
    kind, mid, _received_at, count = _FIXED.unpack_from(buf, i + HEADER_BYTES)
    body = i + HEADER_BYTES + MIN_PAYLOAD + 4 * count
    if kind != KIND_MESSAGE or body > end or _id_of(buf[body:end]) != mid:
        return _BAD_CONTENT
    return total, mid


# Bytes of a record before its path entries: what _plausible reads.
_FIXED_SPAN = HEADER_BYTES + MIN_PAYLOAD
# Bytes one skip over damage checksums for candidates that had to wait (see _resync)
# before it stops checking those not followed by a plausible header.
_WAITING_CHECK_BYTES = 16 << 20


def _plausible(buf: bytes, i: int) -> int | None:
    """The payload length of the record header at ``buf[i:]`` (``_FIXED_SPAN`` bytes
    there) if its fields are possible -- length in bounds, kind 1, path entries within
    the payload -- else None. A few unpacks: no checksum, no hash."""
    length: int = _LEN.unpack_from(buf, i + 4)[0]
    if length < MIN_PAYLOAD or length > MAX_RECORD_BYTES:
        return None
    kind, _mid, _received_at, count = _FIXED.unpack_from(buf, i + HEADER_BYTES)
    if kind != KIND_MESSAGE or MIN_PAYLOAD + 4 * count > length:
        return None
    return length


def _resync(win: _Window, start: int) -> int | None:
    """The first offset from ``start`` where a valid record begins, if any.

    Any offset may begin a record, and checking one in full costs a checksum over
    up to ``MAX_RECORD_BYTES``; bodies are what clients send, and a body crafted to
    read as record headers at every offset made skipping one damaged record cost
    seconds. So a candidate is checked in full only when cheaper checks leave no
    other choice:

    * its header must be plausible (``_plausible``) and its record fit in the file;
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
    last = size - _FIXED_SPAN
    waiting: list[tuple[int, int]] = []  # (end, offset) of candidates, a heap
    spent = 0

    def waited_valid(c: int, end: int) -> bool:
        nonlocal spent
        tail = _FIXED_SPAN if end + _FIXED_SPAN <= size else 0
        record = _Window.read_at(win.f, c, end - c + tail)
        if spent > _WAITING_CHECK_BYTES and tail and _plausible(record.buf, end - c) is None:
            return False
        spent += end - c
        record.size = end  # the successor's bytes are not part of the record
        return isinstance(_parse(record, c), tuple)

    kind_byte = bytes([KIND_MESSAGE])
    q = start
    while q <= last:
        # Only an offset whose kind byte is right can begin a record: find the next
        # one in the window at C speed instead of trying every offset.
        i = win.get(q, _FIXED_SPAN)
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
        i = win.get(q, _FIXED_SPAN)
        length = None if i is None else _plausible(win.buf, i)
        q += 1
        if length is None:
            continue
        c = q - 1
        end = c + HEADER_BYTES + length
        if end > size:
            continue
        if not waiting or end <= waiting[0][0]:
            followed = True  # end of file, or a torn header right before it
            if end + _FIXED_SPAN <= size:
                j = win.get(c, end + _FIXED_SPAN - c)  # from c: the window never goes back
                followed = j is not None and _plausible(win.buf, j + end - c) is not None
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


@attrs.define
class _Recovered:
    by_id: dict[bytes, int]
    offsets: array[int]
    ids: list[bytes]
    good_end: int  # end of the last valid record
    size: int  # file size as found
    torn: tuple[int, int] | None = None  # (offset, bytes) of a torn tail
    damaged: list[tuple[int, int, str]] = attrs.Factory(list)  # (offset, bytes, why)
    duplicates: int = 0


def _scan_log(f: BinaryIO, size: int) -> _Recovered:
    by_id: dict[bytes, int] = {}
    offsets = array("q")
    ids: list[bytes] = []
    rec = _Recovered(by_id, offsets, ids, len(MAGIC), size)
    win = _Window(f, size, len(MAGIC))
    pos = len(MAGIC)
    unpack_header, unpack_fixed, crc32, sha256 = (
        _HEADER.unpack_from,
        _FIXED.unpack_from,
        zlib.crc32,
        hashlib.sha256,
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
            if kind != KIND_MESSAGE or body > end or sha256(buf[body:end]).digest()[:16] != mid:
                break
            if mid in by_id:
                rec.duplicates += 1
            else:
                by_id[mid] = len(offsets)
                offsets.append(base + i)
                ids.append(mid)
            i = end
        if i != start:
            pos = rec.good_end = base + i
            continue
        got = _parse(win, pos)
        if isinstance(got, tuple):
            total, mid = got
            if mid in by_id:
                rec.duplicates += 1
            else:
                by_id[mid] = len(offsets)
                offsets.append(pos)
                ids.append(mid)
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, chunks: Iterator[bytes]) -> int:
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
    _fsync_dir(path.parent)
    return size


# -- the store -----------------------------------------------------------------


class LogStore:
    """Messages in an append-only log file; see the module docstring.

    Build one with ``LogStore.open``. Not thread-safe: call it from the reactor
    thread (only the batch-policy fsyncs run in a worker thread, on a private
    duplicate of the file descriptor).

    Offsets are logical: ``_end`` counts every appended byte, ``_written`` those
    in the file; the records in between wait in ``_pending`` for one
    ``os.write`` (``_write_out``).
    """

    def __init__(
        self,
        *,
        directory: Path,
        fd: int,
        lock_fd: int,
        recovered: _Recovered,
        end: int,
        policy: FsyncPolicy,
        reactor: Any,
        batch_interval: float,
        inline_fsync_below: float,
        log: Logger,
        fsync_function: Callable[[int], None],
    ) -> None:
        self.directory = directory
        self.path = directory / LOG_NAME
        self.policy: FsyncPolicy = policy
        self.log = log
        self._fd = fd
        self._lock_fd = lock_fd
        self._by_id = recovered.by_id
        self._offsets = recovered.offsets
        self._order = recovered.ids  # position -> id (arrival order)
        self._sorted: Any = SortedList(self._order)
        self._unsorted: list[bytes] = []  # added since the last ids_between (see there)
        self._end = end
        self._written = end
        self._durable = end
        self._pending: list[bytes] = []
        self._write_call: Any = None
        self._reactor = reactor
        self._pacer = FsyncPacer(batch_interval, inline_fsync_below)
        self._fsync_function = fsync_function
        self._flush_call: Any = None
        self._in_flight = False
        self._waiters: deque[tuple[int, Deferred[None]]] = deque()
        self._broken: str | None = None
        self._on_broken: list[Deferred[StoreError]] = []
        self._closed = False
        self._fsyncs = 0
        self._last_fsync = 0.0
        # Every fsync of appends, timed (gossip_store_fsync_seconds).
        self.fsync_latency = LatencyHistogram()
        self._duplicates_at_open = recovered.duplicates

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        fsync: str = "batch",
        reactor: Any = None,
        batch_interval: float = BATCH_MAX_DELAY,
        inline_fsync_below: float = INLINE_FSYNC_SECONDS,
        log: Logger | None = None,
        fsync_function: Callable[[int], None] = os.fsync,
    ) -> LogStore:
        """Open (creating if needed) the log in ``directory``, recover it, lock the directory.

        ``fsync_function`` is what syncs the file after appends (``os.fsync``;
        tests inject slow or failing ones); recovery always uses ``os.fsync``.
        ``reactor`` (default: the global reactor) writes buffered appends at the end
        of its turn and runs the "batch" policy's fsyncs; "always" needs none.
        """
        if fsync not in POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(POLICIES)}, got {fsync!r}")
        policy: FsyncPolicy = fsync  # type: ignore[assignment]
        if log is None:
            log = _log
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open data directory {directory}: {e.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(lock_fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"data directory {directory} is in use by another process"
                ) from None
            raise StoreError(f"cannot lock data directory {directory}: {e.strerror}") from None
        try:
            recovered, end = _open_log(directory, log, policy != "never")
            fd = os.open(directory / LOG_NAME, os.O_RDWR | os.O_APPEND)
        except OSError as e:
            os.close(lock_fd)
            raise StoreError(f"cannot open {directory / LOG_NAME}: {e.strerror}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        if reactor is None and policy != "always":
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        return cls(
            directory=directory,
            fd=fd,
            lock_fd=lock_fd,
            recovered=recovered,
            end=end,
            policy=policy,
            reactor=reactor,
            batch_interval=batch_interval,
            inline_fsync_below=inline_fsync_below,
            log=log,
            fsync_function=fsync_function,
        )

    # -- the MessageStore interface --------------------------------------------

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._by_id

    def __len__(self) -> int:
        return len(self._offsets)

    def add(self, message: Message) -> bool:
        """Append ``message`` unless its id is held; say whether it was new.

        Every node calls this for every message it receives, so it trusts the
        caller (the protocol core) to have checked that the id is the hash of
        the body, as it does for everything it accepts, and does not hash again.

        The record is readable through the store (``get``, ``scan``) at once,
        written to the file (safe from a crash of this process) by the end of
        the reactor turn, with the other records of the turn in one
        ``os.write``, and durable per the policy: with "always" it is written
        and fsynced before this returns. An acknowledged submit waits for
        ``when_durable``, which writes first. Raises ``ValueError`` for a
        message that cannot be encoded (too large, too long a path) and
        ``StoreError`` when the file cannot be written.
        """
        mid = message.id
        if mid in self._by_id:
            return False
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        if self._broken is not None:
            raise StoreError(self._broken)
        record = encode_record(message)
        offset = self._end
        if self.policy == "always":
            try:
                self._write(record)
            except StoreError as e:
                self._break(str(e))  # nothing was lost: the record was not taken
                raise StoreError(self._broken) from None
        else:
            if self._write_call is None:
                self._write_call = self._reactor.callLater(0, self._write_later)
            elif offset - self._written > _WRITE_BOUND:
                self._write_out()
            self._pending.append(record)
        self._end = offset + len(record)
        self._by_id[mid] = len(self._offsets)
        self._offsets.append(offset)
        self._order.append(mid)
        self._unsorted.append(mid)
        if self.policy == "always":
            self._sync_now()
            self._durable = self._end
        elif self.policy == "batch":
            self._schedule()
        return True

    def add_many(self, messages: tuple[Message, ...]) -> int:
        """``add`` for each message, in order, with one buffered write for all of them
        (the new messages of one received frame); returns how many were new. Same
        promises and errors as ``add``: a message that cannot be encoded raises
        ``ValueError`` before any of them is taken."""
        held = self._by_id
        fresh = [m for m in messages if m.id not in held]
        if len(fresh) != len(messages) or len({m.id for m in fresh}) != len(fresh):
            return sum(self.add(m) for m in messages)  # copies among them: one at a time
        if self.policy == "always" or not fresh:
            return sum(self.add(m) for m in fresh)  # an fsync per record, as add promises
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        if self._broken is not None:
            raise StoreError(self._broken)
        records = [encode_record(m) for m in fresh]
        offset = self._end
        if self._write_call is None:
            self._write_call = self._reactor.callLater(0, self._write_later)
        elif offset - self._written > _WRITE_BOUND:
            self._write_out()
        data = b"".join(records)
        self._pending.append(data)
        first = len(self._offsets)
        offsets = self._offsets
        for record in records:
            offsets.append(offset)
            offset += len(record)
        self._end = offset
        ids = [m.id for m in fresh]
        held.update(zip(ids, range(first, first + len(ids)), strict=True))
        self._order.extend(ids)
        self._unsorted.extend(ids)
        if self.policy == "batch":
            self._schedule()
        return len(fresh)

    def durable_count(self) -> int:
        """How many records, in arrival order, are durable under the policy (all of
        them under "never", which promises nothing beyond the process)."""
        if self.policy == "never":
            return len(self._offsets)
        # Fsyncs cover whole records, so _durable is a record boundary.
        return bisect.bisect_left(self._offsets, self._durable)

    def get(self, mid: bytes) -> Message | None:
        """The message, or None if not held (a record lost with a failed write is not)."""
        if self._pending and mid in self._by_id:
            self._write_out_for_read()
        n = self._by_id.get(mid)
        if n is None:
            return None
        offset = self._offsets[n]
        buf = os.pread(self._fd, _GET_GUESS, offset)
        if len(buf) < HEADER_BYTES:
            raise self._damaged(offset)
        _crc, length = _HEADER.unpack_from(buf, 0)
        if HEADER_BYTES + length > len(buf):
            if length > MAX_RECORD_BYTES:
                raise self._damaged(offset)
            buf = os.pread(self._fd, HEADER_BYTES + length, offset)
        return self._decode(buf, 0, offset)

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]:
        return ids_between(self._sorted, self._unsorted, lo, hi, limit)

    def ids_from(self, start: int, limit: int) -> list[bytes]:
        start = max(start, 0)
        return self._order[start : start + max(limit, 0)]

    def scan(self, start: int) -> Iterator[Message]:
        """Messages in arrival order from position ``start`` (those held when iteration starts)."""
        if self._pending:
            self._write_out_for_read()
        offsets = self._offsets
        buf = b""
        base = 0
        for n in range(max(start, 0), len(offsets)):
            offset = offsets[n]
            i = offset - base
            if i < 0 or i + HEADER_BYTES > len(buf):
                buf, base, i = os.pread(self._fd, _SCAN_CHUNK, offset), offset, 0
                if len(buf) < HEADER_BYTES:
                    raise self._damaged(offset)
            _crc, length = _HEADER.unpack_from(buf, i)
            if i + HEADER_BYTES + length > len(buf):
                if length > MAX_RECORD_BYTES:
                    raise self._damaged(offset)
                size = max(_SCAN_CHUNK, HEADER_BYTES + length)
                buf, base, i = os.pread(self._fd, size, offset), offset, 0
            yield self._decode(buf, i, offset)

    # -- more reading --------------------------------------------------------

    def ids(self) -> Iterator[bytes]:
        """Every held id, in arrival order (a snapshot taken at the call)."""
        return iter(self._order[:])

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "records": len(self._offsets),
            "file_bytes": self._end,  # buffered appends included
            "buffered_bytes": self._end - self._written,
            "durable_bytes": self._durable,
            "fsyncs": self._fsyncs,
            "last_fsync_seconds": self._last_fsync,  # for "batch": its wait for the disk
            "duplicates_at_open": self._duplicates_at_open,
        }

    # -- durability ----------------------------------------------------------

    def when_durable(self) -> Deferred[None]:
        """Fires once every record added before this call is durable under the policy.

        Under "never" it writes the buffered records first, so an acknowledged
        submit is in the file; under "batch" the fsync that covers them writes
        them (one write for all submits of a turn). Fails with ``StoreError``
        if the write or the fsync that should cover them fails.
        """
        if self._pending and self.policy != "batch":
            try:
                self._write_out()
            except StoreError as e:
                return fail(e)
        if self._broken is not None and self._durable < self._end:
            return fail(StoreError(self._broken))
        if self.policy != "batch" or self._durable >= self._end:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._end, d))
        self._schedule()
        return d

    def write_buffered(self) -> None:
        """Write the buffered records now; ``StoreError`` if the store has failed (then
        nothing added since the last good write is held any more)."""
        if self._pending:
            self._write_out()
        if self._broken is not None:
            raise StoreError(self._broken)

    def when_broken(self) -> Deferred[StoreError]:
        """Fires with the error once the store fails (at once if it has)."""
        if self._broken is not None:
            return succeed(StoreError(self._broken))
        d: Deferred[StoreError] = Deferred()
        self._on_broken.append(d)
        return d

    def close(self) -> None:
        """Write out and fsync everything (unless "never"), release the directory lock."""
        if self._closed:
            return
        self._closed = True
        for call in (self._flush_call, self._write_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._write_call = None
        error: StoreError | None = None
        try:
            if self._pending:
                self._write_out()
            if self.policy != "never" and self._broken is None and self._durable < self._end:
                self._sync_now()
                self._durable = self._end
        except StoreError as e:
            error = e
        finally:
            os.close(self._fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._fd = -1
        self._fire_waiters(error)
        if error is not None:
            raise error

    # -- internals -----------------------------------------------------------

    def _decode(self, buf: bytes, i: int, offset: int) -> Message:
        crc, length = _HEADER.unpack_from(buf, i)
        end = i + HEADER_BYTES + length
        if (
            length < MIN_PAYLOAD
            or end > len(buf)
            or zlib.crc32(buf[i + 4 : end]) != crc
            or buf[i + HEADER_BYTES] != KIND_MESSAGE
        ):
            raise self._damaged(offset)
        return _decode_payload(buf, i + HEADER_BYTES, end)

    def _damaged(self, offset: int) -> StoreError:
        if self._broken is not None and offset >= self._written:
            return StoreError(self._broken)  # a record lost with a failed write
        return StoreError(
            f"record at offset {offset} of {self.path} was damaged after it was written;"
            " restart the node to recover the log"
        )

    def _write(self, data: bytes) -> None:
        """Append ``data`` to the file, all of it or (``StoreError``) none of it."""
        try:
            n = os.write(self._fd, data)
            if n < len(data):
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as e:
            # Leave no partial record behind for the next append to follow.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._written)
            raise StoreError(f"cannot append to {self.path}: {e.strerror}") from None
        self._written += len(data)

    def _write_out(self) -> None:
        """Write the buffered records with one ``os.write``.

        If that fails they are lost, yet ``add`` has already said they were
        stored (the core counts them as held), so the store breaks: it refuses
        further appends and fails the ``when_durable`` waiters; a restart
        recovers the file and re-sync fetches the lost messages back.
        """
        count = len(self._pending)
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self._write(data)
        except StoreError as e:
            self._forget_unwritten()
            self._break(f"{e}; records lost: {count}")
            self._fire_waiters(StoreError(self._broken))
            raise StoreError(self._broken) from None

    def _write_out_for_read(self) -> None:
        """Write before a read; a failure (the store broke, the lost records are no
        longer held) is the store's to report, not the reader's."""
        with contextlib.suppress(StoreError):
            self._write_out()

    def _forget_unwritten(self) -> None:
        """Drop the records past the end of the file from the index: what a failed
        write lost is not held, so nobody is told it is, nor finds a hole in the file."""
        k = bisect.bisect_left(self._offsets, self._written)
        lost = self._order[k:]
        del self._offsets[k:]
        del self._order[k:]
        for mid in lost:
            del self._by_id[mid]
        gone = set(lost)
        self._unsorted[:] = [m for m in self._unsorted if m not in gone]
        for mid in lost:
            self._sorted.discard(mid)
        self._end = self._written

    def _write_later(self) -> None:
        """The end-of-turn write of what ``add`` buffered."""
        self._write_call = None
        if self._pending:
            with contextlib.suppress(StoreError):  # _write_out broke the store and logged why
                self._write_out()

    def _sync_now(self) -> None:
        started = time.monotonic()
        try:
            self._fsync_function(self._fd)
        except OSError as e:
            self._break(f"fsync of {self.path} failed: {e}")
            raise StoreError(self._broken) from None
        self._fsyncs += 1
        self._last_fsync = time.monotonic() - started
        self.fsync_latency.observe(self._last_fsync)

    def _schedule(self) -> None:
        """Make sure an fsync starts when the pacer says (or right after the one in flight)."""
        if self._in_flight or self._closed or self._flush_call is not None:
            return  # _synced starts the next one
        delay = self._pacer.delay(self._reactor.seconds())
        self._flush_call = self._reactor.callLater(delay, self._flush)

    def _flush(self) -> None:
        """Start one fsync covering everything written so far."""
        self._flush_call = None
        if self._in_flight or self._closed or self._broken is not None:
            return
        if self._pending:
            try:
                self._write_out()
            except StoreError:
                return  # broken, waiters failed
        if self._durable >= self._end:
            return
        self._in_flight = True
        fd = os.dup(self._fd)  # close() may close self._fd while a thread runs the fsync
        d: Deferred[tuple[float, float]]
        if self._pacer.inline():
            # The disk is fast: handing the fsync to a thread and back costs more
            # CPU (about 0.5 ms here, in thread switches and the reactor's waker)
            # than the fsync itself (35 us of CPU, 0.18 ms in all).
            d = maybeDeferred(timed_sync, self._fsync_function, fd)
        else:
            pool = self._reactor.getThreadPool()
            d = deferToThreadPool(self._reactor, pool, timed_sync, self._fsync_function, fd)
        d.addCallbacks(self._synced, self._sync_failed, callbackArgs=(self._written,))

    def _synced(self, timing: tuple[float, float], target: int) -> None:
        seconds, disk_seconds = timing
        self._in_flight = False
        self._fsyncs += 1
        self._last_fsync = disk_seconds
        self.fsync_latency.observe(seconds)
        self._pacer.done(self._reactor.seconds(), seconds, disk_seconds)
        self._durable = max(self._durable, target)
        self._fire_waiters(None)
        if not self._closed and self._durable < self._end:
            if self._waiters:
                self._flush()  # acks added meanwhile have waited long enough
            else:
                self._schedule()

    def _sync_failed(self, failure: Failure) -> None:
        self._in_flight = False
        if self._closed:
            return
        self._break(f"fsync of {self.path} failed: {failure.getErrorMessage()}")
        self._fire_waiters(StoreError(self._broken))

    def _break(self, why: str) -> None:
        if self._broken is not None:
            return
        self._broken = why + "; refusing further appends"
        self.log.critical("{why}", why=self._broken)
        waiting, self._on_broken = self._on_broken, []
        for d in waiting:
            d.callback(StoreError(self._broken))

    def _fire_waiters(self, error: StoreError | None) -> None:
        waiters = self._waiters
        while waiters and (error is not None or waiters[0][0] <= self._durable):
            _target, d = waiters.popleft()
            if error is None:
                d.callback(None)
            else:
                d.errback(StoreError(str(error)))


_log = logs.logger()


def _open_log(directory: Path, log: Logger, sync: bool) -> tuple[_Recovered, int]:
    """Create or recover ``messages.log``; return the index and the end of the good data."""
    path = directory / LOG_NAME
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, on every path)
    except FileNotFoundError:
        _write_new_file(path, iter((MAGIC,)))
        return _Recovered({}, array("q"), [], len(MAGIC), len(MAGIC)), len(MAGIC)
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
                _write_new_file(path, iter((MAGIC,)))
                return _Recovered({}, array("q"), [], len(MAGIC), len(MAGIC)), len(MAGIC)
            raise StoreError(
                f"{path} is not a gossip message log (bad magic {head[:8]!r}); refusing to start"
            )
        rec = _scan_log(f, size)
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


def _rewrite(path: Path, rec: _Recovered, log: Logger) -> int:
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
    new_offsets = array("q")
    src = os.open(path, os.O_RDONLY)
    try:

        def records() -> Iterator[bytes]:
            yield MAGIC
            pos = len(MAGIC)
            for offset in rec.offsets:
                _crc, length = _HEADER.unpack(os.pread(src, HEADER_BYTES, offset))
                data = os.pread(src, HEADER_BYTES + length, offset)
                new_offsets.append(pos)
                pos += len(data)
                yield data

        size = _write_new_file(path, records())
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
