"""The client side of scripts/container-test: runs in a client container on the cluster's
network (or on a node's volume) and checks one thing per call, within a deadline.

    python probe.py ready DEADLINE                 every node up, every link of the graph up
    python probe.py submit NODE TEXT...            submit each TEXT to NODE, print the ids
    python probe.py holds NODES DEADLINE TEXT...   every node in NODES ("1-16", "1-6,8-16")
                                                   lists every TEXT
    python probe.py on-disk DIR TEXT...            the message log in DIR (a stopped node's
                                                   volume) recovers with every TEXT in it

Nodes are found in $GOSSIP_CONFIG. Each check prints one line with what it measured
and exits 0, or prints why it failed and exits 1.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from gossip.client.api import GossipClient
from gossip.config import load_config
from gossip.locations import default_config

POLL_SECONDS = 0.25
CALL_TIMEOUT_SECONDS = 5.0


class Failed(Exception):
    pass


def node_set(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


async def call(reactor: Any, node: int, op: Callable[[GossipClient], Awaitable[Any]]) -> Any:
    """One request to one node with a timeout; the connection is closed afterwards."""
    d = defer.Deferred.fromCoroutine(GossipClient.connect_node(reactor, node))
    d.addTimeout(CALL_TIMEOUT_SECONDS, reactor)
    client = await d
    try:
        r = defer.Deferred.fromCoroutine(_await(op(client)))
        r.addTimeout(CALL_TIMEOUT_SECONDS, reactor)
        return await r
    finally:
        client.close()


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


async def each(
    reactor: Any, nodes: list[int], op: Callable[[GossipClient], Awaitable[Any]]
) -> dict[int, Any]:
    """``op`` on every node at once: node -> its answer, or the exception it raised."""

    async def one(node: int) -> Any:
        try:
            return await call(reactor, node, op)
        except Exception as e:
            return e

    results = await defer.gatherResults([defer.Deferred.fromCoroutine(one(n)) for n in nodes])
    return dict(zip(nodes, results, strict=True))


def unreachable(results: dict[int, Any]) -> list[str]:
    return [
        f"node {n}: {type(r).__name__}: {r}" for n, r in results.items() if isinstance(r, Exception)
    ]


async def poll(
    reactor: Any, deadline: float, what: str, attempt: Callable[[], Awaitable[str | None]]
) -> float:
    """Call ``attempt`` until it returns None (done); returns the seconds it took.
    Otherwise it returns what is still missing, which the failure reports."""
    start = time.monotonic()
    missing: str | None = "not tried"
    while time.monotonic() - start < deadline:
        try:
            missing = await attempt()
        except Exception as e:
            missing = f"{type(e).__name__}: {e}"
        if missing is None:
            return time.monotonic() - start
        await task.deferLater(reactor, POLL_SECONDS, lambda: None)
    raise Failed(f"{what}: not after {deadline:.0f} s: {missing}")


async def ready(reactor: Any, deadline: float) -> None:
    config = load_config(default_config())
    edges = len(config.edges())

    async def attempt() -> str | None:
        statuses = await each(reactor, list(config.nodes), lambda c: c.status())
        if bad := unreachable(statuses):
            return "; ".join(bad)
        down = [
            f"{n}-{link['peer']}"
            for n, s in statuses.items()
            for link in s["links"]
            if link["state"] != "up"
        ]
        return f"links not up: {', '.join(down)}" if down else None

    took = await poll(reactor, deadline, "every link up", attempt)
    print(f"{len(config.nodes)} nodes answer, all {edges} links up after {took:.1f} s")


async def submit(reactor: Any, node: int, texts: list[str]) -> None:
    for text in texts:
        print(await call(reactor, node, lambda c, t=text: c.submit_message(t)))


async def holds(reactor: Any, nodes: list[int], deadline: float, texts: list[str]) -> None:
    want = set(texts)

    async def attempt() -> str | None:
        held = await each(reactor, nodes, lambda c: c.get_messages())
        if bad := unreachable(held):
            return "; ".join(bad)
        lacking = [
            f"node {n} lacks {len(want - set(bodies))}"
            for n, bodies in held.items()
            if not want <= set(bodies)
        ]
        return ", ".join(lacking) if lacking else None

    took = await poll(reactor, deadline, f"{len(want)} messages on {len(nodes)} nodes", attempt)
    who = f"node {nodes[0]} lists" if len(nodes) == 1 else f"all {len(nodes)} nodes list"
    print(f"{who} all {len(want)} messages after {took:.1f} s")


def on_disk(directory: Path, texts: list[str]) -> None:
    """Recover a copy of the log (never the volume itself) with the node's own code."""
    from gossip.store.log import LogStore

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "data"
        shutil.copytree(directory, copy)
        store = LogStore.open(copy, fsync="never", reactor=task.Clock())
        try:
            bodies = {m.text for m in store.scan(0)}
        finally:
            store.close()
    missing = set(texts) - bodies
    if missing:
        raise Failed(f"{directory}: {len(missing)} of {len(texts)} messages not in the log")
    print(f"{directory}: the log recovers {len(bodies)} messages, all {len(texts)} expected")


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "on-disk":
        try:
            on_disk(Path(args[0]), args[1:])
        except Failed as e:
            print(f"FAILED: {e}")
            return 1
        return 0

    async def run(reactor: Any) -> None:
        if cmd == "ready":
            await ready(reactor, float(args[0]))
        elif cmd == "submit":
            await submit(reactor, int(args[0]), args[1:])
        elif cmd == "holds":
            await holds(reactor, node_set(args[0]), float(args[1]), args[2:])
        else:
            raise Failed(f"unknown check {cmd!r}")

    def failed(f: Any) -> None:
        print(f"FAILED: {f.getErrorMessage()}")
        raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)).addErrback(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
