"""Noticing that the reactor stood still, so timers do not judge a silence it caused.

A process stopped with SIGSTOP (or a paused VM, or a reactor blocked in a long
call) resumes with every timer that came due meanwhile firing at once, and on
Linux ``epoll_wait`` returns EINTR after SIGCONT, so the reactor runs those
timers *before* it reads the frames its neighbours kept sending into the
sockets. An idle timer would then drop a link whose pings are waiting to be
read, a handshake timer would cut a Hello that arrived, and a stalled-link
check would drop a link whose transport never had a chance to drain.

``PauseWatch`` beats every ``beat`` seconds on the reactor's clock; a gap of
more than ``pause_after`` seconds between two moments it saw the reactor run
means the reactor stood still, and ``running_since`` moves the start of any
silence to the moment it ran again. A timer that judges silence from there
(instead of from the last frame) re-arms when the reactor resumed within its
period: by the time it fires again, the pending input has been read. While
the watch is not started (no beat, so an idle reactor cannot be told from a
paused one) nothing is adjusted.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

# Seconds between beats: the reactor is seen running at least this often.
BEAT_SECONDS = 0.25
# A gap longer than this between two moments the reactor was seen running is a pause
# (well above the lateness of a busy reactor's timers, well below any link timeout).
PAUSE_AFTER = 1.0


class PauseWatch:
    def __init__(
        self, clock: IReactorTime, beat: float = BEAT_SECONDS, pause_after: float = PAUSE_AFTER
    ) -> None:
        self.clock = clock
        self.beat = beat
        self.pause_after = pause_after
        self.pauses = 0  # pauses noticed (for status and tests)
        self._seen = clock.seconds()  # the last moment the reactor was seen running
        self._resumed = float("-inf")  # when it last ran again after a pause
        self._beat = LoopingCall(self.look)
        self._beat.clock = clock

    def start(self) -> None:
        if not self._beat.running:
            self._seen = self.clock.seconds()
            self._beat.start(self.beat, now=False)

    def stop(self) -> None:
        if self._beat.running:
            self._beat.stop()

    def look(self) -> float:
        """The time now; a pause is recorded if the reactor was not seen for a while."""
        now = self.clock.seconds()
        if self._beat.running and now - self._seen > self.pause_after:
            self._resumed = now
            self.pauses += 1
        self._seen = now
        return now

    def running_since(self, moment: float) -> float:
        """The later of ``moment`` and when the reactor last ran again after a pause."""
        self.look()
        return max(moment, self._resumed)
