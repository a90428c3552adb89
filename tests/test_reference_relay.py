"""The benchmark's reference relay (``gossip.bench.relay``): a functional check, not timed."""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet import task

from gossip.bench.relay import start_relays
from gossip.cluster import free_port_base
from gossip.core.message import message_id
from gossip.topology import generate_config

DEADLINE = 20.0


async def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await task.deferLater(global_reactor, 0.005, lambda: None)


@pytest_twisted.ensureDeferred
async def test_relay_floods_every_message_to_every_node_once() -> None:
    """Six relays on loopback, the project's 3-regular graph: each message submitted at
    any relay is delivered exactly once at every relay, under its own id."""
    config = generate_config(6, base_peer_port=free_port_base(6))
    got: dict[int, list[bytes]] = {n: [] for n in config.nodes}
    relays = await start_relays(config, global_reactor, lambda n, mid: got[n].append(mid))
    try:
        await _until(lambda: all(r.all_up() for r in relays), "every link up")
        bodies = [f"message {i}".encode() for i in range(60)]
        ids = [relays[i % len(relays)].submit(b) for i, b in enumerate(bodies)]
        assert ids == [message_id(b) for b in bodies]
        await _until(lambda: all(len(v) >= len(ids) for v in got.values()), "delivery")
        await task.deferLater(global_reactor, 0.05, lambda: None)  # late duplicates show up
        for node, delivered in got.items():
            assert sorted(delivered) == sorted(ids), node
    finally:
        for r in relays:
            await r.stop()
