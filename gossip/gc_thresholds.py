"""The cyclic garbage collector's pace for a node process.

A node allocates a few short-lived container objects (tuples, lists, frames,
effects) per message, nearly all freed by reference counting, and holds its
messages' ids in a few very long lists and sets. With CPython's default
thresholds (a young collection every 700 net allocations) the collector runs
hundreds of times per second under load and finds almost nothing to free; its
older passes walk those long containers item by item. On the relay benchmark
(``gossip-bench-hotpath``, 16 nodes, 10,000 messages) collections took about
0.15 s of CPU with the defaults and 0.03 s with the young threshold below:
about 5% of the nodes' CPU. What it costs: cyclic garbage (rare here: a failed
Deferred's traceback, a closed connection) waits up to ``YOUNG_THRESHOLD``
allocations longer to be freed, a few megabytes at most.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def pace_collector() -> None:
    """Collect young objects every ``YOUNG_THRESHOLD`` net allocations (process-wide;
    the older generations keep their default ratios)."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
