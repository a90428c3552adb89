"""Fuzz target: a node's peer port fed an arbitrary byte stream.

A real ``GossipNode`` (memory store, fake clock, never started) accepts or dials
one connection (a ``StringTransport``); the input is what the other end sends,
in chunks, before or after a valid handshake, then the clock runs past every
timeout. Whatever arrives, the node may only close that connection with a
logged reason: nothing escapes ``dataReceived``, nothing is logged as a failure,
the framing buffer stays within one frame, nothing is stored before a
handshake and nothing stored is other than it claims, and afterwards another
neighbour still links up and delivers a message.
"""

from __future__ import annotations

import struct

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gossip.core.frames import Envelope, GossipFrame
from gossip.core.message import message_id
from gossip.core.state import check_body
from gossip.fuzz.harness import FuzzFailure, captured_log, check_log, warnings
from gossip.net.links import UP
from gossip.net.peer_protocol import PeerProtocol
from gossip.node import GossipNode
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config
from gossip.wire import codec

NODE = 1
ITS_PEER = 2  # whom the fuzzed connection claims to be, in the handshake scenarios
INCARNATION = 77
PEER_INCARNATION = 5
_BASE = generate_config(4, name="fuzz")
CONFIGS = {
    "flood": attrs.evolve(_BASE, dissemination="flood"),
    "plumtree": attrs.evolve(_BASE, dissemination="plumtree"),
}
# Chunk sizes the stream is delivered in (the second byte of the input picks one).
CHUNKS = (1, 2, 3, 5, 8, 13, 64, 512, 4096, 1 << 20)
SCENARIOS = ("inbound", "inbound after Hello", "outbound", "outbound after Hello")
# Seconds the clock runs after the stream: past the Hello, idle and close timeouts.
AFTERWARDS = 40.0


def framed(frame: codec.AnyFrame) -> bytes:
    payload = codec.encode(frame)
    return struct.pack("!I", len(payload)) + payload


def peer_hello(node_id: int = ITS_PEER, incarnation: int = PEER_INCARNATION) -> codec.Hello:
    return codec.Hello(codec.PROTOCOL_VERSION, "fuzz", node_id, incarnation)


def stream_input(
    scenario: int, chunk: int, stream: bytes, plumtree: bool = True, not_reading: bool = False
) -> bytes:
    """The target input for ``stream`` in ``SCENARIOS[scenario]``, in ``CHUNKS[chunk]``."""
    return bytes([scenario | (4 if plumtree else 0) | (8 if not_reading else 0), chunk]) + stream


class PeerRun:
    def __init__(self, dissemination: str) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000.0)
        self.store = MemoryStore()
        self.node = GossipNode(
            CONFIGS[dissemination], NODE, self.store, self.reactor, incarnation=INCARNATION
        )
        self.lost: set[PeerProtocol] = set()

    def inbound(self, host: str = "192.0.2.7") -> tuple[PeerProtocol, StringTransport]:
        addr = IPv4Address("TCP", host, 40000)
        proto = self.node.links.server_factory().buildProtocol(addr)
        if not isinstance(proto, PeerProtocol):
            raise FuzzFailure(f"the peer port refused a connection: {proto!r}")
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def outbound(self, peer: int) -> tuple[PeerProtocol, StringTransport]:
        addr = IPv4Address("TCP", "192.0.2.8", 17000 + peer)
        proto = self.node.links.links[peer].factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def settle(self, proto: PeerProtocol, transport: StringTransport, seconds: float) -> None:
        """Run the clock (and the node's ticks); a closed connection is lost as TCP would."""
        step = 0.5
        t = 0.0
        while True:
            self.lose_if_closed(proto, transport)
            if t >= seconds:
                break
            self.reactor.advance(step if seconds > 0 else 0)
            self.node.tick()
            t += step

    def lose_if_closed(self, proto: PeerProtocol, transport: StringTransport) -> None:
        if transport.disconnecting and proto not in self.lost:
            self.lost.add(proto)
            proto.connectionLost(Failure(ConnectionDone()))


def peer_stream(data: bytes) -> None:
    """``data``: scenario byte (bits 0-1: ``SCENARIOS``; bit 2: plumtree, else flood;
    bit 3: the other end reads nothing, so the transport stays full), chunk-size byte
    (``CHUNKS``), then the bytes the other end sends."""
    if len(data) < 2:
        return
    scenario = data[0] & 3
    run = PeerRun("plumtree" if data[0] & 4 else "flood")
    chunk = CHUNKS[data[1] % len(CHUNKS)]
    stream = data[2:]
    with captured_log() as events:
        if scenario < 2:
            proto, transport = run.inbound()
        else:
            proto, transport = run.outbound(ITS_PEER)
        if scenario in (1, 3):
            proto.dataReceived(framed(peer_hello()))
            if not proto.established:
                raise FuzzFailure(f"valid handshake refused: {proto.closing_reason}")
        if data[0] & 8 and proto._gate is not None:
            proto._gate.pauseProducing()  # what a full TCP transport does
        limit = proto.prefixLength + proto.MAX_LENGTH
        for i in range(0, len(stream), chunk):
            if transport.disconnecting:
                break  # a closing TCP transport reads no more
            proto.dataReceived(stream[i : i + chunk])
            if not transport.disconnecting and len(proto._unprocessed) > limit:
                raise FuzzFailure(
                    f"{len(proto._unprocessed)} bytes buffered, over one frame ({limit})"
                )
            if proto._pending_bytes > run.node.links.max_pending_bytes:
                raise FuzzFailure(f"{proto._pending_bytes} bytes queued for a peer not reading")
            run.reactor.advance(0.01)
        run.settle(proto, transport, AFTERWARDS)
        closed = transport.disconnecting
        reason = proto.closing_reason
        check_log(events)
        if not closed:
            raise FuzzFailure(f"connection still open after {AFTERWARDS:g} s without a frame")
        if not (isinstance(reason, str) and reason):
            raise FuzzFailure("connection closed without a reason")
        if not any(reason in line for line in warnings(events)):
            raise FuzzFailure(f"close reason {reason!r:.200} was not logged")
    check_store(run)
    if not any(link.times_up for link in run.node.links.links.values()) and len(run.store):
        raise FuzzFailure("messages stored from a connection that never finished a handshake")
    check_alive(run)


def check_store(run: PeerRun) -> None:
    limit = run.node.config.max_message_bytes
    for m in run.store.scan(0):
        if message_id(m.body) != m.id:
            raise FuzzFailure(f"stored a message whose id is not its hash: {m!r:.200}")
        problem = check_body(m.body, limit)
        if problem:
            raise FuzzFailure(f"stored a bad message ({problem})")


def check_alive(run: PeerRun) -> None:
    """Another neighbour still links up and has a new message stored."""
    links = run.node.links.links
    free = [p for p, link in links.items() if link.state != UP]
    if not free:
        return
    body = b"still alive after the fuzz input"
    proto, _transport = run.inbound("192.0.2.99")
    envelope = Envelope(message_id(body), body, (free[0],))
    proto.dataReceived(framed(peer_hello(free[0], 1 << 40)) + framed(GossipFrame((envelope,))))
    run.reactor.advance(0)
    if not proto.established or envelope.id not in run.store:
        raise FuzzFailure(
            f"node no longer links up or stores: {proto.closing_reason or 'nothing stored'}"
        )
