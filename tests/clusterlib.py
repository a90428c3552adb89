"""Helpers for tests that run real node processes on loopback."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from gossip.client.api import GossipClient
from gossip.cluster import LocalCluster, free_port_base
from gossip.config import ClusterConfig, dump_config
from gossip.topology import generate_config


def write_cluster(tmp: Path, n: int, **overrides: Any) -> tuple[Path, ClusterConfig]:
    base = free_port_base(2 * n + 1)  # peer ports base+1..base+n, clients up to base+2n
    config = generate_config(n, base_peer_port=base, base_client_port=base + n, **overrides)
    path = tmp / "cluster.toml"
    path.write_text(dump_config(config))
    return path, config


async def wait_for(
    reactor: Any, check: Any, timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll the async ``check()`` until it returns a truthy value or ``timeout`` passes."""
    deadline = reactor.seconds() + timeout
    while True:
        result = await check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await task.deferLater(reactor, interval)


async def connect_all(cluster: LocalCluster) -> dict[int, GossipClient]:
    clients = {}
    for n in sorted(cluster.config.nodes):
        clients[n] = await GossipClient.connect_node(cluster.reactor, n, cluster.config)
    return clients


async def message_counts(cluster: LocalCluster) -> dict[int, int]:
    out = {}
    for n in cluster.config.nodes:
        s = await cluster.node_status(n)
        out[n] = -1 if s is None else s["message_count"]
    return out


def gather(*coros: Any) -> defer.Deferred[list[Any]]:
    return defer.gatherResults([defer.Deferred.fromCoroutine(c) for c in coros])


async def submit_many(
    clients: dict[int, GossipClient],
    bodies: list[str],
    rng: random.Random,
    window: int = 64,
) -> dict[str, str]:
    """Submit every body at a random node, ``window`` calls in flight; body -> id.

    A failed submit raises: callers that expect failures use ``submit_tolerant``.
    """
    ids: dict[str, str] = {}
    targets = sorted(clients)
    pending = list(bodies)

    async def worker() -> None:
        while pending:
            body = pending.pop()
            ids[body] = await clients[rng.choice(targets)].submit_message(body)

    await gather(*(worker() for _ in range(window)))
    return ids


def random_bodies(rng: random.Random, count: int, size: int = 100) -> list[str]:
    """Unique printable bodies of ``size`` characters."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    out = []
    for i in range(count):
        head = f"{i}:"
        out.append(head + "".join(rng.choice(alphabet) for _ in range(size - len(head))))
    return out


async def node_bodies(cluster: LocalCluster, node: int) -> list[str]:
    client = await GossipClient.connect_node(cluster.reactor, node, cluster.config)
    try:
        return await client.get_messages()
    finally:
        client.close()


def traffic(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {row["kind"]: row for row in status["traffic"]}
