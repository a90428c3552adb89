"""Token buckets: how many messages may come from one source per second, with a burst.

Pure: the caller passes ``now`` (any monotonic seconds), so the rules are tested
without a clock. A bucket holds up to ``burst`` tokens and gains ``rate`` per
second; taking more than it holds takes nothing and says no.
"""

from __future__ import annotations

from collections.abc import Hashable


class TokenBucket:
    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)  # a new source may send its burst at once
        self._at = now

    def take(self, now: float, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them (all or nothing)."""
        if self._at is not None and now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now if self._at is None else max(self._at, now)
        if n <= self._tokens:
            self._tokens -= n
            return True
        return False

    def available(self, now: float) -> int:
        """Whole tokens held at ``now`` (nothing is taken)."""
        tokens = self._tokens
        if self._at is not None and now > self._at:
            tokens = min(self.burst, tokens + (now - self._at) * self.rate)
        return int(tokens)


class KeyedBuckets:
    """One bucket per key (per origin node). The caller bounds the keys: the core
    admits only configured node ids as origins, so this map never outgrows the
    cluster."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[Hashable, TokenBucket] = {}

    def take(self, key: Hashable, now: float, n: int = 1) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now, n)

    def available(self, key: Hashable, now: float) -> int:
        """Whole tokens ``key`` may take at ``now`` (nothing is taken)."""
        bucket = self.buckets.get(key)
        return int(self.burst) if bucket is None else bucket.available(now)
