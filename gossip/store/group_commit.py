"""Group commit: the fsyncs that make the log's appends durable, and who waits for them.

Used by ``LogStore`` for the "batch" policy (and, through ``sync_now``, for
"always" and ``close``). Every added record is covered by an fsync soon after,
whether a client waits for it (``wait``: a submit) or not (a relayed message:
a node reports a message as delivered only once it is durable). When an fsync
starts follows ``FsyncPacer`` (``fsync_pacing.py``) on the injected reactor's
clock: at the end of the reactor turn on a quiet node (the last fsync covered
one append, ``add``), else after a gap four times as long as the last fsync
took (at most ``max_delay``), so that under load one fsync covers what arrived
meanwhile; either way only after the
reactor's next I/O pass, so the frames a read made the node forward are sent
before an fsync holds the reactor thread (``_after_io``). One fsync at a time: in the
reactor thread while the disk is fast, else in a thread
(``deferToThreadPool`` on the reactor's pool) so that a slow disk stalls the
reactor for one fsync at most; records written while an fsync is in flight wait
for the next one. A waiter fires once an fsync that *started after* its
records were written has ended.

The store stays the owner of the file: ``prepare`` writes its buffered
records out and hands over a duplicate descriptor to sync (or None: nothing to
do, or the store cannot go on), ``failed`` breaks the store and returns the
error the waiters get, ``appended`` says how many bytes the store has taken.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from gossip.latency import LatencyHistogram
from gossip.store.fsync_pacing import FsyncPacer, timed_sync
from gossip.store.interface import StoreError

# "batch" runs an fsync in the reactor thread while the last one waited less than this
# for the disk.
INLINE_FSYNC_SECONDS = 0.002
# "batch": the longest an fsync waits after the previous one (see fsync_pacing).
BATCH_MAX_DELAY = 0.004


class GroupCommit:
    """The fsyncs of one log; ``durable`` is the byte offset they have covered."""

    def __init__(
        self,
        *,
        reactor: Any,
        fsync_function: Callable[[int], None],
        max_delay: float,
        inline_below: float,
        durable: int,
        prepare: Callable[[], tuple[int, int] | None],
        failed: Callable[[str], StoreError],
        appended: Callable[[], int],
        path: object,
    ) -> None:
        self.path = path  # the file, for messages
        self.durable = durable
        self.fsyncs = 0
        self.last_fsync = 0.0  # for "batch": its wait for the disk
        # Every fsync of appends, timed (gossip_store_fsync_seconds).
        self.latency = LatencyHistogram()
        self._reactor = reactor
        self._fsync_function = fsync_function
        self._pacer = FsyncPacer(max_delay, inline_below)
        self._prepare = prepare
        self._failed = failed
        self._appended = appended
        self._waiters: deque[tuple[int, Deferred[None]]] = deque()
        self._flush_call: Any = None
        self._appends = 0  # appends (``add``) since the last fsync started
        self._in_flight = False
        self._stopped = False

    def wait(self, target: int) -> Deferred[None]:
        """Fires once the bytes up to ``target`` are durable (fails with ``StoreError``)."""
        d: Deferred[None] = Deferred()
        self._waiters.append((target, d))
        self.schedule()
        return d

    def add(self) -> None:
        """The store appended records (one write's worth): an fsync must cover them."""
        self._appends += 1
        self.schedule()

    def schedule(self) -> None:
        """Make sure an fsync starts when the pacer says (or right after the one in flight)."""
        if self._in_flight or self._stopped or self._flush_call is not None:
            return  # _synced starts the next one
        delay = self._pacer.delay(self._reactor.seconds())
        self._flush_call = self._reactor.callLater(delay, self._after_io)

    def sync_now(self, fd: int, target: int) -> None:
        """Fsync ``fd`` in this thread, now ("always", close); ``StoreError`` if it fails."""
        started = time.monotonic()
        try:
            self._fsync_function(fd)
        except OSError as e:
            raise self._failed(f"fsync of {self.path} failed: {e}") from None
        self.fsyncs += 1
        self.last_fsync = time.monotonic() - started
        self.latency.observe(self.last_fsync)
        self.durable = max(self.durable, target)

    def stop(self) -> None:
        """No more fsyncs start (the store is closing); one in flight still ends."""
        self._stopped = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def fire(self, error: StoreError | None) -> None:
        """Fire the waiters now covered; with ``error``, fail every waiter."""
        waiters = self._waiters
        while waiters and (error is not None or waiters[0][0] <= self.durable):
            _target, d = waiters.popleft()
            if error is None:
                d.callback(None)
            else:
                d.errback(StoreError(str(error)))

    # -- internals -----------------------------------------------------------

    def _after_io(self) -> None:
        """Let the reactor do one I/O pass before the fsync starts.

        Twisted's loop runs the timed calls that are due, then polls and does the
        sockets' reads and writes; a ``transport.write`` only queues its bytes for
        that next poll. An fsync due now would run in this timed-call pass, before
        the frames the node queued in the read that appended these records are
        written: an inline fsync (0.1-0.3 ms idle, several ms on a busy disk) would
        hold every forwarded frame for as long as it takes, at every hop. One call
        more puts it after that poll: the frames are on the wire first, then the
        fsync; what is read in that poll is written out and covered as well. The
        same holds for the fsync that follows one which ended with records waiting:
        a thread's fsync ends in the timed-call pass too, right after the poll that
        read those records and queued their frames.
        """
        self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        """Start one fsync covering everything written so far."""
        self._flush_call = None
        if self._in_flight or self._stopped:
            return
        started = self._prepare()
        if started is None:
            return
        fd, target = started
        appends, self._appends = self._appends, 0
        self._in_flight = True
        d: Deferred[tuple[float, float]]
        if self._pacer.inline():
            # The disk is fast: handing the fsync to a thread and back costs more
            # CPU (about 0.5 ms here, in thread switches and the reactor's waker)
            # than the fsync itself (35 us of CPU, 0.18 ms in all).
            d = maybeDeferred(timed_sync, self._fsync_function, fd)
        else:
            pool = self._reactor.getThreadPool()
            d = deferToThreadPool(self._reactor, pool, timed_sync, self._fsync_function, fd)
        d.addCallbacks(self._synced, self._sync_failed, callbackArgs=(target, appends))

    def _synced(self, timing: tuple[float, float], target: int, appends: int) -> None:
        seconds, disk_seconds = timing
        self._in_flight = False
        self.fsyncs += 1
        self.last_fsync = disk_seconds
        self.latency.observe(seconds)
        self._pacer.done(self._reactor.seconds(), seconds, disk_seconds, appends)
        self.durable = max(self.durable, target)
        self.fire(None)
        if not self._stopped and self.durable < self._appended():
            if self._waiters:
                self._after_io()  # acks added meanwhile have waited long enough
            else:
                self.schedule()

    def _sync_failed(self, failure: Failure) -> None:
        self._in_flight = False
        if self._stopped:
            return
        self.fire(self._failed(f"fsync of {self.path} failed: {failure.getErrorMessage()}"))
