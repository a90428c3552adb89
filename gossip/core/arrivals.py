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

from collections import deque
from itertools import repeat

# Messages whose route and duplicate count are remembered (about 120 bytes each).
RECENT_ARRIVALS = 8192
VIAS = ("submit", "gossip", "sync")
UNKNOWN = -1


class Arrivals:
    def __init__(self, limit: int = RECENT_ARRIVALS) -> None:
        if limit < 1:
            raise ValueError(f"Arrivals remembers at least one message, not {limit}")
        self.limit = limit
        # id -> via index + 4 * redundant copies (an int: no object per message).
        self._recent: dict[bytes, int] = {}
        # The ids of ``_recent`` by when they were stored: a ring of ``limit`` slots
        # (grown up to it), ``_at`` the next to overwrite (the oldest, once full).
        self._ring: list[bytes] = []
        self._at = 0
        self.stored: dict[str, int] = dict.fromkeys(VIAS, 0)
        self.duplicates: dict[str, int] = dict.fromkeys(VIAS, 0)

    def stored_new(self, mid: bytes, via: str) -> None:
        self.stored[via] += 1
        ring, at, recent = self._ring, self._at, self._recent
        if at < len(ring):
            recent.pop(ring[at], None)  # the oldest, forgotten first
            ring[at] = mid
        else:
            ring.append(mid)
        recent[mid] = VIAS.index(via)
        self._at = (at + 1) % self.limit

    def stored_many(self, mids: tuple[bytes, ...], via: str) -> None:
        """``stored_new`` for each of ``mids`` (the new messages of one frame): a few
        slice and dict operations per frame, at C speed per id, none per id in Python."""
        if len(mids) == 1:
            self.stored_new(mids[0], via)
            return
        self.stored[via] += len(mids)
        limit, ring, recent = self.limit, self._ring, self._recent
        if len(mids) > limit:
            mids = mids[len(mids) - limit :]
        entry = VIAS.index(via)
        while mids:
            at = self._at
            end = min(at + len(mids), limit)
            taken, mids = mids[: end - at], mids[end - at :]
            # Forget the oldest first (an id stored again is then remembered anew).
            deque(map(recent.pop, ring[at:end], repeat(None)), maxlen=0)
            ring[at:end] = taken
            recent.update(dict.fromkeys(taken, entry))
            self._at = end % limit

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
