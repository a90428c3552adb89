"""How this node got its recent messages: by which route, and how many redundant copies.

Pure and bounded. ``Arrivals`` keeps, for the ``RECENT_ARRIVALS`` most recently
stored messages, how each came (``submit``, ``gossip`` or ``sync``) and how
many more copies of it arrived after the first (redundant receptions). That
is what ``gclient --trace`` and ``--cluster-stats`` report per message; for an
older message the node says it does not know (-1) rather than guess. The
totals since start (``stored``, ``duplicates``) cover every message and feed
the Prometheus counters.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat

# Messages whose route and duplicate count are remembered (about 120 bytes each).
RECENT_ARRIVALS = 8192
VIAS = ("submit", "gossip", "sync")
UNKNOWN = -1


class Arrivals:
    def __init__(self, limit: int = RECENT_ARRIVALS) -> None:
        self.limit = limit
        # id -> via index + 4 * redundant copies (an int: no object per message); oldest first.
        self._recent: OrderedDict[bytes, int] = OrderedDict()
        self.stored: dict[str, int] = dict.fromkeys(VIAS, 0)
        self.duplicates: dict[str, int] = dict.fromkeys(VIAS, 0)

    def stored_new(self, mid: bytes, via: str) -> None:
        self.stored_many((mid,), via)

    def stored_many(self, mids: tuple[bytes, ...], via: str) -> None:
        """``stored_new`` for each of ``mids`` (the new messages of one frame)."""
        self.stored[via] += len(mids)
        recent = self._recent
        recent.update(dict.fromkeys(mids, VIAS.index(via)))
        excess = len(recent) - self.limit
        if excess > 0:  # the oldest go, one per new message once full: consumed in C
            deque(map(recent.popitem, repeat(False, excess)), maxlen=0)

    def duplicate(self, mid: bytes, via: str) -> None:
        """Another copy of a held message arrived (and was dropped). A client's resubmit
        counts in ``duplicates`` but is no redundant copy of the message's spread."""
        self.duplicates[via] += 1
        entry = self._recent.get(mid)
        if entry is not None and via != "submit":
            self._recent[mid] = entry + 4

    def of(self, mid: bytes) -> tuple[str, int]:
        """(how it came, redundant copies since) or ("", UNKNOWN) once forgotten."""
        entry = self._recent.get(mid)
        if entry is None:
            return "", UNKNOWN
        return VIAS[entry & 3], entry >> 2
