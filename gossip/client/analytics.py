"""Cluster-wide figures computed from what every node reports: message traces and
window statistics (``gclient --trace``, ``gclient --cluster-stats``).

Pure: the CLI gathers the data over AMP and these functions summarize it. Times
are the nodes' own clocks (``received_at``), so across hosts the figures are only
as good as the clocks' agreement; on one host they are exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def trace(copies: Mapping[int, Mapping[str, Any] | None], nodes: Sequence[int]) -> dict[str, Any]:
    """One message across the cluster: ``copies`` maps each node to its Get answer
    (received_at, path, via, duplicates) or None where it is missing or the node
    was unreachable. Arrival times are relative to the earliest copy (the origin)."""
    held = {n: c for n, c in copies.items() if c is not None}
    first = min((c["received_at"] for c in held.values()), default=None)
    rows: list[dict[str, Any]] = []
    for n in nodes:
        c = copies.get(n)
        if c is None:
            rows.append({"node": n, "held": False})
            continue
        path = [int(p) for p in c["path"]]
        rows.append(
            {
                "node": n,
                "held": True,
                "received_at": c["received_at"],
                "after_seconds": c["received_at"] - first if first is not None else None,
                "hops": len(path),
                "path": [*path, n],
                "via": c.get("via") or "",
                "redundant_copies": c.get("duplicates", -1),
            }
        )
    known = [r["redundant_copies"] for r in rows if r["held"] and r["redundant_copies"] >= 0]
    full = len(held) == len(nodes) and first is not None
    return {
        "nodes": len(nodes),
        "holding": len(held),
        "full_coverage_seconds": (
            max(c["received_at"] for c in held.values()) - first if full and first else None
        ),
        "redundant_copies": sum(known) if len(known) == len(held) else None,
        "copies": rows,
    }


def window_stats(
    arrivals: Mapping[int, Sequence[Mapping[str, Any]]],
    statuses: Mapping[int, Mapping[str, Any]],
    nodes: Sequence[int],
    since: float,
) -> dict[str, Any]:
    """Cluster figures for messages that first appeared at or after ``since``:
    ``arrivals`` maps each reachable node to its ``Arrivals`` answer, ``statuses``
    to its ``Status``. Link flaps count downs after ``since`` (each link seen from
    both ends counts once per end)."""
    per_message: dict[str, list[Mapping[str, Any]]] = {}
    for rows in arrivals.values():
        for row in rows:
            per_message.setdefault(row["id"], []).append(row)
    n = len(nodes)
    spreads: list[float] = []
    coverage: list[float] = []
    redundant: list[int] = []
    resync_messages = resync_bytes = 0
    counted = 0
    for copies in per_message.values():
        first = min(c["received_at"] for c in copies)
        origin = [c for c in copies if c["via"] == "submit" or not c["path"]]
        if first < since or not origin:
            continue  # older, or its origin's copy is not in the window
        counted += 1
        coverage.append(len(copies) / n)
        if len(copies) == n:
            spreads.append(max(c["received_at"] for c in copies) - first)
        dups = [c["duplicates"] for c in copies]
        if all(d >= 0 for d in dups):
            redundant.append(sum(dups))
        for c in copies:
            if c["via"] == "sync":
                resync_messages += 1
                resync_bytes += c["size"]
    flaps = sum(
        sum(1 for t in link.get("recent_downs") or [] if t >= since)
        for s in statuses.values()
        for link in s["links"]
    )
    return {
        "nodes": n,
        "nodes_reporting": len(arrivals),
        "messages": counted,
        "mean_coverage": sum(coverage) / len(coverage) if coverage else None,
        "fully_covered": len(spreads),
        "full_coverage_seconds_p50": percentile(spreads, 50),
        "full_coverage_seconds_p99": percentile(spreads, 99),
        "redundant_copies_per_message": (sum(redundant) / len(redundant) if redundant else None),
        "link_flaps": flaps,
        "resync_messages": resync_messages,
        "resync_body_bytes": resync_bytes,
    }
