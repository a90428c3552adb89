"""The reference: a minimal Twisted + protobuf flooding relay, without storage.

Benchmarks quote the node's figures as ratios to this relay, measured in the
same session (issue 11): it is what the stack itself (Twisted's reactor, TCP,
``Int32StringReceiver`` framing, protobuf parse and serialize) costs per
message, with none of the node's work (checks, storage, fsync, re-sync,
Plumtree). It speaks the node's wire schema (``Frame``: ``Hello`` first, then
``Gossip``) and floods: every message new to it (an id not in a set) is
delivered and sent on, in one frame per frame received, to every neighbour
but the one it came from. It trusts ids and paths, keeps nothing but the set
of ids, and has no reconnects, keep-alives or bounds: a bench tool, never a
node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

from gossip.core.message import ID_BYTES
from gossip.net.peer_protocol import set_no_delay
from gossip.wire import peer_pb2

# Frames from a neighbour longer than this drop the link (a Gossip frame of 8,000
# 100-byte messages fits).
MAX_FRAME = 1 << 20

Deliver = Callable[[int, bytes], object]


class RelayLink(Int32StringReceiver):
    """One connection to a neighbour; ``peer`` is known at once when this side dialed,
    else from the neighbour's Hello."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, relay: RelayNode, peer: int | None = None) -> None:
        self.relay = relay
        self.peer = peer

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        if self.peer is not None:
            hello = peer_pb2.Frame()
            hello.hello.node_id = self.relay.node_id
            self.sendString(hello.SerializeToString())
            self.relay.link_up(self.peer, self)

    def stringReceived(self, data: bytes) -> None:
        frame = peer_pb2.Frame()
        frame.ParseFromString(data)
        if self.peer is None:
            self.peer = frame.hello.node_id
            self.relay.link_up(self.peer, self)
        elif frame.HasField("gossip"):
            self.relay.received(self.peer, frame.gossip.messages)

    def connectionLost(self, reason: object = None) -> None:
        if self.peer is not None:
            self.relay.link_down(self.peer, self)


class RelayNode:
    """One relay: listens on ``listen`` (``start_relays``), dials the neighbours with a
    higher id, floods, and calls ``deliver(node_id, id)`` for every message
    it sees first."""

    def __init__(
        self,
        node_id: int,
        listen: str,
        neighbours: Mapping[int, str],
        reactor: Any,
        deliver: Deliver,
    ) -> None:
        self.node_id = node_id
        self.listen_on = listen
        self.neighbours = dict(neighbours)  # id -> client endpoint description
        self.reactor = reactor
        self.deliver = deliver
        self.links: dict[int, RelayLink] = {}
        self.seen: set[bytes] = set()
        self.port: IListeningPort | None = None
        self._submitted: peer_pb2.Frame | None = None  # this turn's submits
        self.frames_out = 0  # Gossip frames written, one per link
        self.messages_out = 0  # messages in them

    async def dial(self) -> None:
        """Connect to the neighbours with a higher id (each link is made once)."""
        for peer, address in self.neighbours.items():
            if peer > self.node_id:
                endpoint = clientFromString(self.reactor, address)
                await connectProtocol(endpoint, RelayLink(self, peer))

    def all_up(self) -> bool:
        return len(self.links) == len(self.neighbours)

    async def stop(self) -> None:
        for link in list(self.links.values()):
            if link.transport is not None:
                link.transport.loseConnection()
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)

    def link_up(self, peer: int, link: RelayLink) -> None:
        self.links[peer] = link

    def link_down(self, peer: int, link: RelayLink) -> None:
        if self.links.get(peer) is link:
            del self.links[peer]

    def submit(self, body: bytes) -> bytes:
        """Broadcast ``body`` from here (with the other submits of this reactor turn,
        in one frame); its id."""
        mid = hashlib.sha256(body).digest()[:ID_BYTES]
        if mid not in self.seen:
            self.seen.add(mid)
            self.deliver(self.node_id, mid)
            if self._submitted is None:
                self._submitted = peer_pb2.Frame()
                self.reactor.callLater(0, self._send_submitted)
            env = self._submitted.gossip.messages.add()
            env.id = mid
            env.body = body
        return mid

    def _send_submitted(self) -> None:
        frame, self._submitted = self._submitted, None
        if frame is not None:
            self._send(frame.SerializeToString(), None, len(frame.gossip.messages))

    def received(self, sender: int, messages: Iterable[peer_pb2.Envelope]) -> None:
        out = peer_pb2.Frame()
        fresh = out.gossip.messages
        seen = self.seen
        for env in messages:
            mid = env.id
            if mid not in seen:
                seen.add(mid)
                self.deliver(self.node_id, mid)
                fresh.append(env)
        if fresh:
            self._send(out.SerializeToString(), sender, len(fresh))

    def _send(self, data: bytes, sender: int | None, count: int) -> None:
        for peer, link in self.links.items():
            if peer != sender:
                link.sendString(data)
                self.frames_out += 1
                self.messages_out += count


async def start_relays(config: Any, reactor: Any, deliver: Deliver) -> list[RelayNode]:
    """One relay per node of ``config`` (a ``ClusterConfig``) on its peer endpoints,
    every one listening before any dials."""
    relays = [
        RelayNode(
            n,
            spec.peer_listen,
            {m: config.nodes[m].peer_address for m in spec.neighbours},
            reactor,
            deliver,
        )
        for n, spec in sorted(config.nodes.items())
    ]
    for r in relays:
        factory = Factory.forProtocol(lambda r=r: RelayLink(r))  # type: ignore[misc]
        r.port = await serverFromString(reactor, r.listen_on).listen(factory)
    for r in relays:
        await r.dial()
    return relays
