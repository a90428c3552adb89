"""Keep what strangers send from flooding or forging our log lines and replies.

A peer or client chooses the strings it sends (a cluster name, a Reject
reason) and how often it fails a handshake. Echoed as they are, one hostile
handshake costs a megabyte of log and reply, a newline forges a log line, and a
loop of refused handshakes fills the disk. ``shorten`` bounds and escapes such
a string; ``LogRateLimit`` bounds how many lines a kind of event may write.
"""

from __future__ import annotations

from collections.abc import Callable

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

    Twisted has no rate limiter; this is the smallest one that bounds a log an
    attacker can write to. A dropped line is counted, so the next allowed line
    says how many similar lines were left out.
    """

    def __init__(self, now: Callable[[], float], per_second: float, burst: int) -> None:
        self._now = now
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._at = now()
        self.suppressed = 0

    def allow(self) -> int | None:
        """None if this line must be dropped; else how many were dropped before it."""
        now = self._now()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens < 1:
            self.suppressed += 1
            return None
        self._tokens -= 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped
