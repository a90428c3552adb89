"""Re-sync between two real GossipNodes in one process: their peer links joined by
``iosim`` on one ``MemoryReactorClock``, every node object real (link table,
framing, codec, core, re-sync answers through the cooperator), no sockets.

Pins that a node which lost half of a large log catches up in one session,
without its link being dropped for asking too much at once (issue 12, defect 2).
"""

from __future__ import annotations

import random
import string

from twisted.internet.address import IPv4Address
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from gossip.core.message import Message, message_id
from gossip.net.links import UP
from gossip.node import TICK_SECONDS, GossipNode
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config

TOTAL = 100_000
STEP = 0.01  # simulated seconds per pump round
DEADLINE = 60.0  # simulated seconds: well under the 120 s in which nothing arrived before
_ALPHABET = (string.ascii_letters + string.digits).encode()


def store_of(bodies: list[bytes]) -> MemoryStore:
    store = MemoryStore()
    for body in bodies:
        store.add(Message(message_id(body), body, 0.0, (3,)))
    return store


def test_node_missing_half_of_100000_messages_catches_up_without_a_link_drop() -> None:
    """Node 2 holds 100,000 messages of 100 bytes, node 1 every other one (as after its
    log was cut). Once their link is up, node 1 holds all 100,000 within 60 simulated
    seconds; the link stays up the whole time (never dropped, never re-established),
    and node 1's re-sync ran one session, completed, none aborted. (Before the want
    window and the responder's queue, node 2 dropped the link as soon as the wants
    came, and the next session repeated that forever.)"""
    rng = random.Random(12)
    bodies = [bytes(rng.choices(_ALPHABET, k=100)) for _ in range(TOTAL)]
    config = generate_config(4, name="test")  # K4: nodes 1 and 2 are neighbours
    reactor = MemoryReactorClock()
    reactor.advance(1000.0)
    lagging = GossipNode(config, 1, store_of(bodies[::2]), reactor, incarnation=11)
    full = GossipNode(config, 2, store_of(bodies), reactor, incarnation=22)
    for node in (lagging, full):  # as gossip.tap's TimerService does
        ticker = LoopingCall(node.tick)
        ticker.clock = reactor
        ticker.start(TICK_SECONDS, now=False)
    client = lagging.links.links[2].factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 17002))
    server = full.links.server_factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert server is not None
    pump = iosim.connect(
        server,
        iosim.makeFakeServer(server),
        client,
        iosim.makeFakeClient(client),
        greet=False,
        clock=reactor,
    )
    start = reactor.seconds()
    while len(lagging.store) < TOTAL and reactor.seconds() - start < DEADLINE:
        pump.pump()
        reactor.advance(STEP)
        if lagging.links.links[2].times_up and not lagging.links.is_up(2):
            break  # the link was dropped: iosim does not redial, so it stays down
    took = reactor.seconds() - start
    print(f"\ncaught up {len(lagging.store) - TOTAL // 2} messages in {took:.2f} simulated s")
    for node, peer in ((lagging, 2), (full, 1)):
        link = node.links.links[peer]
        assert (link.state, link.times_up, link.last_error) == (UP, 1, "")
    assert len(lagging.store) == TOTAL
    counters = lagging.core.sync.counters
    assert counters.sessions_aborted == 0
    assert counters.messages_pulled == TOTAL // 2
    assert full.sync_streams.queued(1) == 0
