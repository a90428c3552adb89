"""The durable message store: an append-only log file, bodies on disk, an index in memory.

The log's parts, one module each:

* ``record.py``: the on-disk record format (the one place that defines it).
* ``recovery.py``: what every open does: scan, cut a torn tail, skip damage.
* ``group_commit.py``: the fsyncs of the "batch" policy, paced on the reactor's clock.
* ``id_index.py``: the ids held, by arrival position (shared with ``MemoryStore``).

This module holds the store itself: the data directory, buffered appends, reads.

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


Durability (the ``fsync`` policy)
---------------------------------
``add`` is on every node's path for every message, so it buffers: a record is
readable through the store (``get``, ``scan``) as soon as ``add`` returns, and
the records added in one reactor turn are written together, with one
``os.write``, at the end of the turn (``callLater(0)``), or earlier when a read
needs the file, an fsync starts, ``when_durable`` or ``close`` is called, or
the buffer passes 1 MiB. ``add_many`` appends a batch as one buffer entry.
Once written a record survives the death of the process; an acknowledged
submit waits for ``when_durable``, which writes first. If that write fails the
records in it are lost although ``add`` accepted them, so the store refuses
further appends (``StoreError``), as after a failed fsync. Surviving a power
loss or kernel crash needs ``fsync``:

``"always"``
    ``add`` writes and fsyncs before it returns (one fsync per message: slow,
    simple).
``"batch"`` (the default: group commit, ``group_commit.py``)
    Every added record is covered by an fsync soon after, whether a client
    waits for it (``when_durable``: a submit) or not (a message relayed from a
    neighbour: a node reports a message as delivered only once it is durable,
    see ``durable_count``); when it starts adapts to the load (at most
    ``batch_interval``, 4 ms, after the previous one), and it runs in the
    reactor thread while the disk is fast (the last fsync waited under
    ``inline_fsync_below``, 2 ms, for the disk), else in a thread.
    ``when_durable()`` returns a Deferred that fires once every record added
    before the call has been covered by an fsync that *started after* the
    record was written.
``"never"``
    No fsync at all (tests and benchmarks); ``when_durable`` fires at once.

If an fsync fails the store refuses further appends (``StoreError``): after a
failed fsync the kernel may have dropped the dirty pages, so retrying would
claim a durability it cannot give.

Memory
------
Bodies stay on disk; ``get`` and ``scan`` read records back with
``os.pread`` (checking the checksum again). In memory there is the id index
(``id_index.py``: each id once, as a ``bytes`` object in a ``set`` and an
arrival-order ``list``, and id-order buckets of positions) and the record
offsets in an ``array``, by arrival position (4 bytes each while the log is
under 4 GiB). ``gossip-bench-store --memory N``
measures the resident memory per message.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from gossip import logs
from gossip.core.message import Message
from gossip.latency import LatencyHistogram
from gossip.store.group_commit import BATCH_MAX_DELAY, INLINE_FSYNC_SECONDS, GroupCommit
from gossip.store.id_index import IdIndex
from gossip.store.interface import StoreError
from gossip.store.record import (
    HEADER,
    HEADER_BYTES,
    MAGIC,
    MAX_PATH,
    MAX_RECORD_BYTES,
    decode_record,
    encode_record,
    encode_records,
)
from gossip.store.recovery import (
    _WAITING_CHECK_BYTES,
    LOG_NAME,
    NARROW_END,
    Recovered,
    fit_offsets,
    open_log,
)

LOCK_NAME = "messages.lock"
_SCAN_CHUNK = 64 << 10  # scan() reads records back in chunks of this size
_GET_GUESS = 512  # get() reads this much first; a second pread if the record is longer
_WRITE_BOUND = 1 << 20  # appends buffered past this many bytes are written at the next add
_ONE_RECORD = (0,)  # ``add``'s record starts where its data does

FsyncPolicy = Literal["always", "batch", "never"]
POLICIES: tuple[str, ...] = ("always", "batch", "never")

__all__ = [
    "BATCH_MAX_DELAY",
    "INLINE_FSYNC_SECONDS",
    "LOG_NAME",
    "MAGIC",
    "MAX_PATH",
    "MAX_RECORD_BYTES",
    "POLICIES",
    "_WAITING_CHECK_BYTES",
    "LogStore",
    "StoreError",
    "encode_record",
]

_log = logs.logger()


class LogStore(IdIndex):
    """Messages in an append-only log file; see the module docstring.

    Build one with ``LogStore.open``. Not thread-safe: call it from the reactor
    thread (only the batch-policy fsyncs run in a worker thread, on a private
    duplicate of the file descriptor).

    The ids are held by the ``IdIndex`` it extends (``in``, ``len``, ``ids``,
    ``ids_from``, ``ids_between`` are the index's); ``_offsets`` gives each
    position's record. Offsets are logical: ``_end`` counts every appended byte, ``_written`` those
    in the file; the records in between wait in ``_pending`` for one
    ``os.write`` (``_write_out``).
    """

    def __init__(
        self,
        *,
        directory: Path,
        fd: int,
        lock_fd: int,
        recovered: Recovered,
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
        IdIndex.__init__(self, recovered.index)
        self._offsets = recovered.offsets  # position -> offset of its record
        self._end = end
        self._written = end
        self._pending: list[bytes] = []
        self._write_call: Any = None
        self._reactor = reactor
        self._commit = GroupCommit(
            reactor=reactor,
            fsync_function=fsync_function,
            max_delay=batch_interval,
            inline_below=inline_fsync_below,
            durable=end,
            prepare=self._start_sync,
            failed=self._sync_failed,
            appended=lambda: self._end,
            path=self.path,
        )
        self._broken: str | None = None
        self._on_broken: list[Deferred[StoreError]] = []
        self._closed = False
        self._duplicates_at_open = recovered.duplicates

    @property
    def fsync_latency(self) -> LatencyHistogram:
        """Every fsync of appends, timed (gossip_store_fsync_seconds)."""
        return self._commit.latency

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
            recovered, end = open_log(directory, log, policy != "never")
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
        pos = self.add_id(message.id)
        if pos is None:
            return False
        try:
            self._check_open()
            record = encode_record(message)
        except BaseException:
            self.truncate_ids(pos)  # not taken after all
            raise
        self._append(record, _ONE_RECORD)
        return True

    def add_many(
        self,
        ids: Sequence[bytes],
        bodies: Sequence[bytes],
        paths: Sequence[tuple[int, ...]],
        received_at: float,
    ) -> int:
        """``add`` for each message of a batch received together (the new messages of
        one frame, as its columns: the effect ``PersistBatch``), in order, with one
        encoding pass (``encode_records``) and one buffer entry (one write; under
        "always" one write and one fsync before it returns) for all the new ones;
        returns how many were new (a repeat within the batch is not).

        All or nothing: a message that cannot be encoded (``ValueError``) or a
        store that cannot append (``StoreError``) leaves none of them added.
        """
        first = len(self)
        try:
            rows = self.add_ids(ids)
            taken = len(self) - first
            if not taken:
                return 0
            self._check_open()
            if rows is not None and taken < len(ids):  # some held already, or repeated
                ids = [ids[row] for row in rows]
                bodies = [bodies[row] for row in rows]
                paths = [paths[row] for row in rows]
            data, starts = encode_records(ids, bodies, paths, received_at)
        except BaseException:
            self.truncate_ids(first)
            raise
        self._append(data, starts)
        return taken

    def durable_count(self) -> int:
        """How many records, in arrival order, are durable under the policy (all of
        them under "never", which promises nothing beyond the process)."""
        if self.policy == "never":
            return len(self._offsets)
        # Fsyncs cover whole records, so the durable offset is a record boundary.
        return bisect.bisect_left(self._offsets, self._commit.durable)

    def get(self, mid: bytes) -> Message | None:
        """The message, or None if not held (a record lost with a failed write is not)."""
        n = self.position(mid)
        if n is None:
            return None
        offset = self._offsets[n]
        if offset >= self._written:
            self._write_out_for_read()
            if n >= len(self._offsets):
                return None  # lost with a failed write
        buf = os.pread(self._fd, _GET_GUESS, offset)
        if len(buf) < HEADER_BYTES:
            raise self._damaged(offset)
        _crc, length = HEADER.unpack_from(buf, 0)
        if HEADER_BYTES + length > len(buf):
            if length > MAX_RECORD_BYTES:
                raise self._damaged(offset)
            buf = os.pread(self._fd, HEADER_BYTES + length, offset)
        return self._decode(buf, 0, offset)

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
            _crc, length = HEADER.unpack_from(buf, i)
            if i + HEADER_BYTES + length > len(buf):
                if length > MAX_RECORD_BYTES:
                    raise self._damaged(offset)
                size = max(_SCAN_CHUNK, HEADER_BYTES + length)
                buf, base, i = os.pread(self._fd, size, offset), offset, 0
            yield self._decode(buf, i, offset)

    # -- more reading --------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "records": len(self._offsets),
            "file_bytes": self._end,  # buffered appends included
            "buffered_bytes": self._end - self._written,
            "durable_bytes": self._commit.durable,
            "fsyncs": self._commit.fsyncs,
            "last_fsync_seconds": self._commit.last_fsync,  # "batch": its wait for the disk
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
        durable = self._commit.durable
        if self._broken is not None and durable < self._end:
            return fail(StoreError(self._broken))
        if self.policy != "batch" or durable >= self._end:
            return succeed(None)
        return self._commit.wait(self._end)

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
        self._commit.stop()
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        self._write_call = None
        error: StoreError | None = None
        try:
            if self._pending:
                self._write_out()
            if self.policy != "never" and self._broken is None and self._commit.durable < self._end:
                self._commit.sync_now(self._fd, self._end)
        except StoreError as e:
            error = e
        finally:
            os.close(self._fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._fd = -1
        self._commit.fire(error)
        if error is not None:
            raise error

    # -- internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path} is closed")
        if self._broken is not None:
            raise StoreError(self._broken)

    def _append(self, data: bytes, starts: Sequence[int]) -> None:
        """Take ``data``: the records of the ids the index numbered last, each at its
        ``starts`` within it (``add``: one, ``add_many``: a frame's)."""
        offset = self._end
        first = len(self._offsets)
        if self.policy == "always":
            try:
                self._write(data)
            except StoreError as e:
                self.truncate_ids(first)
                self._break(str(e))  # nothing was lost: the records were not taken
                raise StoreError(self._broken) from None
        else:
            if self._write_call is None:
                self._write_call = self._reactor.callLater(0, self._write_later)
            elif offset - self._written > _WRITE_BOUND:
                self._write_out()  # if it fails, it forgets the ids taken for ``data`` too
            self._pending.append(data)
        self._end = offset + len(data)
        if self._end > NARROW_END:
            self._offsets = fit_offsets(self._offsets, self._end)
        self._offsets.extend(map(offset.__add__, starts))
        if self.policy == "always":
            self._commit.sync_now(self._fd, self._end)
        elif self.policy == "batch":
            self._commit.add()

    def _decode(self, buf: bytes, i: int, offset: int) -> Message:
        message = decode_record(buf, i)
        if message is None:
            raise self._damaged(offset)
        return message

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
        count = len(self._offsets) - bisect.bisect_left(self._offsets, self._written)
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self._write(data)
        except StoreError as e:
            self._forget_unwritten()
            self._break(f"{e}; records lost: {count}")
            self._commit.fire(StoreError(self._broken))
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
        del self._offsets[k:]
        self.truncate_ids(k)
        self._end = self._written

    def _write_later(self) -> None:
        """The end-of-turn write of what ``add`` buffered."""
        self._write_call = None
        if self._pending:
            with contextlib.suppress(StoreError):  # _write_out broke the store and logged why
                self._write_out()

    def _start_sync(self) -> tuple[int, int] | None:
        """For the group commit: write out, then what to fsync (the log's descriptor,
        valid during the caller's call: a thread must sync a duplicate) and the offset
        it covers; None when there is nothing to cover or the store is broken."""
        if self._closed or self._broken is not None:
            return None
        if self._pending:
            try:
                self._write_out()
            except StoreError:
                return None  # broken, waiters failed
        if self._commit.durable >= self._end:
            return None
        return self._fd, self._written

    def _sync_failed(self, why: str) -> StoreError:
        self._break(why)
        assert self._broken is not None
        return StoreError(self._broken)

    def _break(self, why: str) -> None:
        if self._broken is not None:
            return
        self._broken = why + "; refusing further appends"
        self.log.critical("{why}", why=self._broken)
        waiting, self._on_broken = self._on_broken, []
        for d in waiting:
            d.callback(StoreError(self._broken))
