"""The checker run after every heal, and the figures it reports.

After a heal: every acknowledged message must be on every node before a
deadline, no node may list a message twice, no node process may have died
except those the lab killed, and no node log may hold a traceback. The
figures: acknowledged, lost (must be 0), seconds from the heal until every
node held every acknowledged message, and link flaps after the heal: from each
link end's ``times_up`` in ``Status``, compared with a snapshot taken before the
fault, one re-connection per link end is the fault and its heal; every further
one is a flap, and so is a link end that is down at the end of the window
(``FLAP_WINDOW`` seconds after the heal: longer than the idle timeout, so a link
that comes up on the heal and dies of a stale connection is seen).
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from gossip.lab.lab import Lab, LinkCount

# Seconds after the heal (at least) before the links are counted again.
FLAP_WINDOW = 10.0


@attrs.frozen
class CheckResult:
    label: str
    acknowledged: int
    lost: int
    converged: bool
    converge_seconds: float
    flaps: int
    link_ups: int
    links_up: bool
    duplicates: dict[str, int]
    wrong_bodies: int
    wrong_ids: int
    deaths: str
    tracebacks: tuple[int, ...]
    missing_by_node: dict[str, int]
    unlisted: tuple[int, ...] = ()

    def problems(self) -> list[str]:
        out = []
        if self.lost or not self.converged:
            out.append(
                f"{self.lost} acknowledged messages lost"
                f" (missing per node at the deadline: {self.missing_by_node})"
            )
        if self.unlisted:
            out.append(f"nodes {list(self.unlisted)} could not be listed before the deadline")
        if self.duplicates:
            out.append(f"messages listed twice, per node: {self.duplicates}")
        if self.wrong_bodies or self.wrong_ids:
            out.append(f"{self.wrong_bodies} wrong bodies, {self.wrong_ids} wrong ids")
        if self.deaths:
            out.append(f"unbidden exits: {self.deaths}")
        if self.tracebacks:
            out.append(f"tracebacks in the logs of nodes {list(self.tracebacks)}")
        if not self.links_up:
            out.append("not every link came back up before the deadline")
        return out

    def line(self) -> str:
        return (
            f"{self.label}: acknowledged {self.acknowledged}, lost {self.lost},"
            f" converged {self.converge_seconds:.1f} s after the heal,"
            f" link flaps after the heal {self.flaps} ({self.link_ups} link ups)"
        )


async def check_after_heal(
    lab: Lab,
    label: str,
    healed_at: float,
    before: dict[tuple[int, int], LinkCount],
    deadline: float = 60.0,
) -> CheckResult:
    """Check the lab after a heal done at ``healed_at`` (``time.monotonic()``);
    ``before`` is ``lab.links()`` taken before the fault."""
    r = await lab.request("converge", nodes=lab.ids, deadline=deadline)
    converge_seconds = r["converged_at"] - healed_at
    links = await lab.wait_links(lab.ids, up=True, timeout=max(1.0, deadline - converge_seconds))
    await lab.sleep(max(0.0, healed_at + FLAP_WINDOW - time.monotonic()))
    flaps, ups = count_flaps(before, await lab.links())
    return CheckResult(
        label=label,
        acknowledged=r["acknowledged"],
        lost=r["lost"],
        converged=r["converged"],
        converge_seconds=converge_seconds,
        flaps=flaps,
        link_ups=ups,
        links_up=bool(links["done"]),
        duplicates=r["duplicates"],
        wrong_bodies=r["wrong_bodies"],
        wrong_ids=r["wrong_ids"],
        deaths=lab.describe_deaths(),
        tracebacks=tuple(lab.tracebacks()),
        missing_by_node=r["missing_by_node"],
        unlisted=tuple(r.get("unlisted", ())),
    )


def count_flaps(
    before: dict[tuple[int, int], LinkCount], after: dict[tuple[int, int], LinkCount]
) -> tuple[int, int]:
    """(flaps, link ups) between two ``Lab.links()`` snapshots: each link end may come
    up once; every further up is a flap, and so is an end that is down in ``after``."""
    flaps = 0
    ups = 0
    for key, now in after.items():
        then = before.get(key)
        # A restarted node's counters begin again from 0.
        delta = now.times_up - (then.times_up if then and then.generation == now.generation else 0)
        ups += delta
        flaps += max(0, delta - 1) + (not now.up)
    return flaps, ups


async def heal_and_check(
    lab: Lab, label: str, before: dict[tuple[int, int], LinkCount], deadline: float = 60.0
) -> CheckResult:
    """Heal every fault, then run the checker; ``before`` is ``lab.links()`` taken
    before the fault."""
    healed_at = lab.heal()
    return await check_after_heal(lab, label, healed_at, before, deadline)


def summary(results: list[CheckResult]) -> dict[str, Any]:
    """Totals over several checks (the soak command's figures)."""
    return {
        "heals": len(results),
        "acknowledged": max((r.acknowledged for r in results), default=0),
        "lost": sum(r.lost for r in results),
        "converge_max": max((r.converge_seconds for r in results), default=0.0),
        "converge_mean": (
            sum(r.converge_seconds for r in results) / len(results) if results else 0.0
        ),
        "flaps": sum(r.flaps for r in results),
        "problems": sum(len(r.problems()) for r in results),
    }
