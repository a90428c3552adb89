"""At most one log line per interval for an event a remote party can repeat at will.

A hostile or broken client can make the node refuse a connection or a request
thousands of times a second; logging each would flood the log. The first
occurrence is logged at once, later ones within ``interval`` seconds are only
counted, and the next line says how many were not logged.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class LogThrottle:
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


def shown(text: object, limit: int = 120) -> str:
    """A remote party's text as it may go into one log line: printable and bounded."""
    out = repr(text) if not isinstance(text, str) else text
    out = out.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if c.isprintable() else "?" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."
