"""When the "batch" policy's next fsync starts, and whether it runs in the reactor thread.

Two rules, both driven by measurement rather than a fixed wall-clock interval:

* **Pace.** An fsync starts at the end of the reactor turn that made it
  necessary, unless the previous one covered more than one append and ended
  less than ``GAP_FACTOR`` times its own duration ago (and less than
  ``max_delay`` ago); then it waits out the rest of that gap. A loaded node
  thus spends at most about a fifth of its time in fsync (an fsync costs
  about 0.15 ms of CPU here, as much as a dozen relayed messages), each
  covering everything that arrived during the previous fsync and the gap
  after it: the batch grows with the load. A quiet node syncs each record at
  once, however long its last fsync took: an fsync of one append says nothing
  came meanwhile, and a gap after it would batch nothing, only delay the next
  record. (At 50 messages a second on a busy machine, inline fsyncs of 5 to
  30 ms held the next message's frame until they ended, and the gap then made
  about one node in ten wait 3 ms more for that message: often the last one.)

* **Inline or thread.** A thread round trip costs more CPU than a fast fsync,
  so the fsync runs in the reactor thread while the disk is fast. "Fast" is
  judged on the time the fsync spent waiting for the *disk*: its wall time
  less the time its thread sat runnable but without a CPU (Linux's
  ``/proc/thread-self/schedstat``). On a busy machine the wall time of a
  0.2 ms fsync often reaches several milliseconds only because other processes
  held both cores; that must not move fsyncs to a thread (which costs more CPU
  still and makes the machine busier). Without schedstat the wall time is used.
  A disk shared with other work is often fast and now and then slow (0.2 ms,
  then 4 to 16 ms): one slow fsync moves the next ones to a thread, and the
  estimate halves with every fsync after it, so the disk must be fast a few
  times in a row before they come back inline (an inline 16 ms fsync stalls
  every link of the node for that long).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

# Under load, the pause after an fsync is this many times as long as the fsync took.
GAP_FACTOR = 4.0
_SCHEDSTAT = "/proc/thread-self/schedstat"
_local = threading.local()  # per thread: an open descriptor of its schedstat, or -1


def run_queue_seconds() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0.0 when the
    kernel does not say). Keeps one descriptor per calling thread open (the
    reactor's and the thread pool's: a bounded few)."""
    fd = getattr(_local, "fd", None)
    if fd is None:
        try:
            fd = os.open(_SCHEDSTAT, os.O_RDONLY)
        except OSError:
            fd = -1
        _local.fd = fd
    if fd < 0:
        return 0.0
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def timed_sync(fsync_function: Callable[[int], None], fd: int) -> tuple[float, float]:
    """Fsync (and close) ``fd``, a duplicate of the log's descriptor: (seconds it took,
    seconds it waited for the disk: that less the time spent waiting for a CPU)."""
    started, queued = time.monotonic(), run_queue_seconds()
    try:
        fsync_function(fd)
    finally:
        os.close(fd)
    wall = time.monotonic() - started
    return wall, max(0.0, wall - (run_queue_seconds() - queued))


class FsyncPacer:
    """The pacing and placement rules above, on the caller's clock (``now`` passed in)."""

    def __init__(self, max_delay: float, inline_below: float) -> None:
        self.max_delay = max_delay
        self.inline_below = inline_below
        self.last_seconds = 0.0  # disk time of the last fsync
        self.disk_estimate = 0.0  # the last slow one, halved for every fsync since
        self._gap_until = 0.0

    def delay(self, now: float) -> float:
        """How long to wait before starting the next fsync (0: at the end of this turn)."""
        return max(0.0, self._gap_until - now)

    def inline(self) -> bool:
        return self.disk_estimate < self.inline_below

    def done(self, now: float, seconds: float, disk_seconds: float, appends: int) -> None:
        """An fsync that took ``seconds`` (``disk_seconds`` of them waiting for the
        disk) ended at ``now``, covering ``appends`` appends (records, or a frame's
        records written together)."""
        self.last_seconds = disk_seconds
        self.disk_estimate = max(disk_seconds, self.disk_estimate / 2)
        if appends <= 1:
            self._gap_until = now  # a quiet node: no gap
            return
        # The gap ends at most max_delay after this fsync, not after whenever the next
        # record comes: a 10 ms fsync (a busy machine) must not make a record that comes
        # 6 ms later, on a quiet node, wait 4 ms more.
        self._gap_until = now + min(self.max_delay, GAP_FACTOR * seconds)
