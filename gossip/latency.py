"""A fixed-bucket latency histogram cheap enough to observe on every fsync.

No Prometheus import here: the store counts (one ``bisect`` and two additions
per observation, in the reactor thread) and the metrics collector turns the
counts into a ``HistogramMetricFamily`` at scrape time, in the same thread.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds: fsyncs take 0.1 ms on a fast SSD, 10+ ms on a slow disk.
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LatencyHistogram:
    def __init__(self, bounds: tuple[float, ...] = FSYNC_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it) per bucket, ending with "+Inf": the
        exposition format's buckets."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip([*map(repr, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
