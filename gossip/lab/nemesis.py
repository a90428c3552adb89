"""A random nemesis: one fault at a time, held for a few seconds under load, then healed
and checked, until the time is up (every kind once per cycle, in random order).

Faults: kill -9 (one node, or up to a quarter of them) and restart; SIGSTOP and
SIGCONT; cut one node off; split the cluster in two random halves; drop one
link. Every round's fault is logged through ``on_round`` before it is healed,
so a failing round can be replayed from the seed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

from gossip.lab.checker import CheckResult, heal_and_check
from gossip.lab.lab import Lab

FAULTS = ("kill", "kill-many", "pause", "cut", "split", "link")
# Seconds each fault is held: long enough that links time out (idle_timeout).
HOLD_SECONDS = (3.0, 9.0)


def fault_order(rng: random.Random) -> Iterator[str]:
    """Every kind of fault once in a random order, then again in another: a short run
    still meets most kinds."""
    while True:
        yield from rng.sample(FAULTS, len(FAULTS))


async def inject(lab: Lab, rng: random.Random, fault: str) -> str:
    """Inject ``fault`` on random nodes; describe it."""
    ids = lab.ids
    if fault == "kill":
        n = rng.choice(ids)
        await lab.kill([n])
        return f"kill -9 node {n}"
    if fault == "kill-many":
        victims = sorted(rng.sample(ids, max(1, len(ids) // 4)))
        await lab.kill(victims)
        return f"kill -9 nodes {victims}"
    if fault == "pause":
        n = rng.choice(ids)
        lab.pause([n])
        return f"SIGSTOP node {n}"
    if fault == "cut":
        n = rng.choice(ids)
        lab.cut(n)
        return f"cut node {n} off"
    if fault == "split":
        shuffled = rng.sample(ids, len(ids))
        half = len(ids) // 2
        a, b = sorted(shuffled[:half]), sorted(shuffled[half:])
        lab.split(a, b)
        return f"split {a} | {b}"
    x, y = rng.choice(lab.config.edges())
    lab.drop_link(x, y)
    return f"drop link {x}-{y}"


async def run_nemesis(
    lab: Lab,
    duration: float,
    rng: random.Random,
    on_round: Callable[[str, CheckResult], None],
    deadline: float = 60.0,
) -> list[CheckResult]:
    """Faults until ``duration`` seconds have passed (the round under way finishes)."""
    results = []
    end = time.monotonic() + duration
    rounds = 0
    faults = fault_order(rng)
    while time.monotonic() < end:
        rounds += 1
        before = await lab.links()
        what = await inject(lab, rng, next(faults))
        await lab.sleep(rng.uniform(*HOLD_SECONDS))
        result = await heal_and_check(lab, f"round {rounds} ({what})", before, deadline)
        results.append(result)
        on_round(what, result)
    return results
