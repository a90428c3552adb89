"""Keep what strangers send from flooding or forging our log lines and replies.

A peer or client chooses the strings it sends (a cluster name, a Reject
reason, an AMP argument) and how often it fails a handshake or a request.
Echoed as they are, one hostile handshake costs a megabyte of log and reply, a
newline forges a log line, and a loop of refused handshakes fills the disk.
``shorten`` (peer strings) and ``shown`` (client strings) bound and escape such
a string; ``LogRateLimit`` (a burst, then a rate) and ``LogThrottle`` (one
line per interval) bound how many lines a kind of event may write, and the
next line written says how many were left out.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from gossip.core.rate import TokenBucket

# Characters of a stranger's string kept in a log line or a reply.
PEER_TEXT_LIMIT = 100


def shorten(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters plus a
    marker saying how many were left out."""
    cut = text[:limit]
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in cut)
    if len(text) > limit:
        shown += f"...[{len(text) - limit} more characters]"
    return shown


def shown(text: object, limit: int = 120) -> str:
    """A remote party's text as it may go into one log line: printable and bounded."""
    out = repr(text) if not isinstance(text, str) else text
    out = out.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else "?" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."


class LogRateLimit:
    """A token bucket for log lines: ``burst`` lines at once, then ``per_second``.

    The bucket is the core's ``TokenBucket`` (the same one that limits submits per
    origin); this adds the clock and the count of dropped lines, so the next allowed
    line says how many similar lines were left out.
    """

    def __init__(self, now: Callable[[], float], per_second: float, burst: int) -> None:
        self._now = now
        self.per_second = per_second
        self.burst = burst
        self._bucket = TokenBucket(per_second, burst, now())
        self.suppressed = 0

    def allow(self) -> int | None:
        """None if this line must be dropped; else how many were dropped before it."""
        if not self._bucket.take(self._now()):
            self.suppressed += 1
            return None
        dropped, self.suppressed = self.suppressed, 0
        return dropped


class LogThrottle:
    """At most one line per ``interval`` for an event a remote party can repeat at will
    (a client refused, a bad request): the first is logged at once, later ones within
    ``interval`` seconds are only counted."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self._last: float | None = None
        self._skipped = 0

    def due(self) -> int | None:
        """Count one occurrence: None if it must not be logged now, else how many
        occurrences went unlogged since the last line (to say in this one)."""
        now = self.clock.seconds()
        if self._last is not None and now - self._last < self.interval:
            self._skipped += 1
            return None
        self._last = now
        skipped, self._skipped = self._skipped, 0
        return skipped
