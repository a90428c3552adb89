"""Keep what strangers send from flooding or forging our log lines and replies.

A peer or client chooses the strings it sends (a cluster name, a Reject
reason) and how often it fails a handshake. Echoed as they are, one hostile
handshake costs a megabyte of log and reply, a newline forges a log line, and a
loop of refused handshakes fills the disk. ``shorten`` bounds and escapes such
a string; ``LogRateLimit`` bounds how many lines a kind of event may write.
"""

from __future__ import annotations

from collections.abc import Callable

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
