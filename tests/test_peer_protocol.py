"""Peer links over in-memory transports: framing, handshake, keep-alive, send bound, dialing.

No sockets: connections are ``StringTransport`` (one side scripted by the test)
or ``iosim`` pairs (two ``LinkTable`` ends talking), time is a
``MemoryReactorClock``, and dialing goes through a fake connector with the same
state machine as Twisted's ``BaseConnector``.

Nodes 1-4 form a complete graph (every node has the other three as
neighbours); node 9 is in nobody's neighbour list.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from itertools import pairwise, permutations
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.base import BaseConnector
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.test import iosim

from gossip import logs
from gossip.core.frames import Envelope, GossipFrame, IHaveFrame, PeerFrame
from gossip.core.message import message_id
from gossip.log_guard import PEER_TEXT_LIMIT, LogRateLimit, shorten
from gossip.net.links import (
    CLOSE_GRACE,
    CONNECTING,
    DOWN,
    HANDSHAKE_LOG_BURST,
    HELLO_TIMEOUT,
    MAX_HANDSHAKES,
    MAX_HANDSHAKES_PER_SOURCE,
    REFUSED,
    UP,
    LinkEvents,
    LinkTable,
)
from gossip.net.peer_protocol import PeerProtocol
from gossip.node import frame_limit
from gossip.wire import codec

CLUSTER = "test"
NODES = (1, 2, 3, 4)
OUTSIDER = 9
BASE_PORT = 17000
MAX_FRAME = frame_limit(32768)
PING = 5.0
IDLE = 15.0
HANDSHAKE = 10.0
MAX_DELAY = 2.0

GOSSIP = GossipFrame(
    (
        Envelope(message_id(b"Apple"), b"Apple", (3,)),
        Envelope(message_id("Grüße".encode()), "Grüße".encode(), (3, 4)),
    )
)


# -- harness -----------------------------------------------------------------


class Recorder:
    """The LinkEvents a table reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def link_events(self) -> LinkEvents:
        return LinkEvents(
            up=lambda peer: self.events.append(("up", peer)),
            down=lambda peer: self.events.append(("down", peer)),
            frame=lambda peer, frame, size: self.events.append(("frame", peer, frame)),
        )


class FakeClientTransport:
    """The part of a TCP client transport a connector talks to before connecting."""

    def __init__(self, connector: FakeConnector) -> None:
        self.connector = connector
        self.done = False

    def failIfNotConnected(self, err: Exception) -> None:
        if self.done:
            return
        self.done = True
        self.connector.connectionFailed(Failure(err))


class FakeConnector(BaseConnector):
    """Twisted's real connector state machine; every connect() is logged as a dial."""

    def __init__(self, reactor: DialingReactor, host: str, port: int, factory: Any, timeout: float):
        super().__init__(factory, timeout, reactor)  # type: ignore[arg-type]
        self.host = host
        self.port = port

    def _makeTransport(self) -> Any:
        assert isinstance(self.reactor, DialingReactor)
        self.reactor.tcpClients.append((self.host, self.port, self.factory, self.timeout, None))
        return FakeClientTransport(self)

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)


class DialingReactor(MemoryReactorClock):
    """MemoryReactorClock whose connectors reconnect: each dial attempt grows tcpClients."""

    def connectTCP(  # type: ignore[override]
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> FakeConnector:
        connector = FakeConnector(self, host, port, factory, timeout)
        self.connectors.append(connector)
        connector.connect()
        return connector


class Node:
    """A LinkTable for one node id, with its events recorded."""

    def __init__(self, node_id: int, incarnation: int | None = None, **options: Any) -> None:
        self.id = node_id
        self.reactor = DialingReactor()
        self.rec = Recorder()
        neighbours = {n: f"tcp:host=127.0.0.1:port={BASE_PORT + n}" for n in NODES if n != node_id}
        settings: dict[str, Any] = {
            "reconnect_max_delay": MAX_DELAY,
            "ping_interval": PING,
            "idle_timeout": IDLE,
            "handshake_timeout": HANDSHAKE,
        }
        settings.update(options)
        self.table = LinkTable(
            node_id=node_id,
            cluster=CLUSTER,
            neighbours=neighbours,
            reactor=self.reactor,
            clock=self.reactor,
            events=self.rec.link_events(),
            max_frame=MAX_FRAME,
            incarnation=incarnation if incarnation is not None else 1000 + node_id,
            **settings,
        )

    def dials_to(self, peer: int) -> int:
        return sum(1 for c in self.reactor.tcpClients if c[1] == BASE_PORT + peer)

    def inbound(self, host: str = "127.0.0.1") -> tuple[PeerProtocol, StringTransport]:
        """An accepted connection from ``host`` whose other end the test scripts."""
        addr = IPv4Address("TCP", host, 40000)
        proto = self.table.server_factory().buildProtocol(addr)
        assert proto is not None
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def outbound(self, peer: int) -> tuple[PeerProtocol, StringTransport]:
        """A connection this node dialed to ``peer``, without a connector."""
        addr = IPv4Address("TCP", "127.0.0.1", BASE_PORT + peer)
        proto = self.table.links[peer].factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport


def run_for(reactor: MemoryReactorClock, seconds: float, step: float = 0.05) -> None:
    """Advance in small steps, so that calls scheduled by calls run at their own time."""
    end = reactor.seconds() + seconds
    while reactor.seconds() + step < end:
        reactor.advance(step)
    reactor.advance(end - reactor.seconds())


def hello(node_id: int, incarnation: int = 7, version: int = codec.PROTOCOL_VERSION) -> codec.Hello:
    return codec.Hello(version, CLUSTER, node_id, incarnation)


def framed(frame: codec.AnyFrame) -> bytes:
    return raw_frame(codec.encode(frame))


def raw_frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def frames_in(data: bytes) -> list[codec.AnyFrame]:
    """Decode everything a StringTransport received, checking the framing."""
    out = []
    while data:
        (n,) = struct.unpack("!I", data[:4])
        assert len(data) >= 4 + n, "truncated frame"
        out.append(codec.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def handshake_inbound(node: Node, peer: int) -> tuple[PeerProtocol, StringTransport]:
    proto, transport = node.inbound()
    proto.dataReceived(framed(hello(peer)))
    assert proto.established
    transport.clear()
    return proto, transport


def lose(proto: PeerProtocol, reason: Exception | None = None) -> None:
    """What the transport does once a close it was asked for has happened."""
    proto.connectionLost(Failure(reason or error.ConnectionDone()))


def pair(dialer: Node, listener: Node) -> tuple[PeerProtocol, PeerProtocol, iosim.IOPump]:
    """``dialer`` connected to ``listener`` in memory; nothing moved yet."""
    client = dialer.table.links[listener.id].factory.buildProtocol(
        IPv4Address("TCP", "127.0.0.1", BASE_PORT + listener.id)
    )
    server = listener.table.server_factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert server is not None
    pump = iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False
    )
    return client, server, pump


@pytest.fixture
def log_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every log event published while the test runs (gossip's filter at info)."""
    monkeypatch.setattr(logs.level_filter, "defaultLogLevel", LogLevel.info)
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def warnings(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


@pytest.fixture
def seeded_random() -> Iterator[None]:
    """ReconnectingClientFactory's jitter uses the random module: fix it, then restore it."""
    state = random.getstate()
    random.seed(20240501)
    try:
        yield
    finally:
        random.setstate(state)


# -- framing -----------------------------------------------------------------


def test_frames_fed_byte_by_byte_arrive_as_sent() -> None:
    """A Hello then a Gossip frame, one byte per read, give up then exactly that frame."""
    node = Node(2)
    proto, transport = node.inbound()
    for b in framed(hello(1)) + framed(GOSSIP):
        proto.dataReceived(bytes([b]))
    assert node.rec.events == [("up", 1), ("frame", 1, GOSSIP)]
    assert frames_in(transport.value()) == [node.table.hello()]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_frames_split_anywhere_arrive_as_sent(data: st.DataObject) -> None:
    """Reads cut at arbitrary points still deliver the Hello and then the Gossip frame intact."""
    node = Node(2)
    proto, _ = node.inbound()
    stream = framed(hello(1)) + framed(GOSSIP) + framed(IHaveFrame((b"x" * 16,)))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    for a, b in pairwise(bounds):
        proto.dataReceived(stream[a:b])
    assert node.rec.events == [
        ("up", 1),
        ("frame", 1, GOSSIP),
        ("frame", 1, IHaveFrame((b"x" * 16,))),
    ]
    assert not proto.transport.disconnecting


def test_many_frames_in_one_read_arrive_in_order() -> None:
    """Several frames in a single read are all delivered, in order."""
    node = Node(2)
    proto, _ = node.inbound()
    frames: list[PeerFrame] = [GOSSIP, IHaveFrame((b"a" * 16, b"b" * 16)), GOSSIP]
    proto.dataReceived(framed(hello(1)) + b"".join(framed(f) for f in frames))
    assert node.rec.events == [("up", 1)] + [("frame", 1, f) for f in frames]


# -- handshake ---------------------------------------------------------------


def test_outbound_sends_hello_first() -> None:
    """The dialer writes its Hello on connectionMade; the listener writes nothing yet."""
    node = Node(1, incarnation=555)
    _, out_transport = node.outbound(2)
    assert frames_in(out_transport.value()) == [
        codec.Hello(codec.PROTOCOL_VERSION, CLUSTER, 1, 555)
    ]
    _, in_transport = node.inbound()
    assert in_transport.value() == b""


def test_handshake_brings_the_link_up_on_both_sides() -> None:
    """Hello, Hello back: each side reports up once and shows the link as up."""
    n1, n2 = Node(1), Node(2)
    client, server, pump = pair(n1, n2)
    pump.flush()
    assert n1.rec.events == [("up", 2)]
    assert n2.rec.events == [("up", 1)]
    assert n1.table.links[2].proto is client and client.established and client.peer == 2
    assert n2.table.links[1].proto is server and server.established and server.peer == 1
    for node, peer in ((n1, 2), (n2, 1)):
        status = {s.peer: s for s in node.table.status()}
        assert status[peer].state == UP
        assert status[peer].times_up == 1
        assert status[peer].last_error == ""
        assert {s.state for p, s in status.items() if p != peer} == {CONNECTING}


def test_frames_flow_both_ways_after_the_handshake() -> None:
    """LinkTable.send on an up link reaches the other table's frame event."""
    n1, n2 = Node(1), Node(2)
    _, _, pump = pair(n1, n2)
    pump.flush()
    assert n1.table.send(2, codec.encode(GOSSIP))
    assert n2.table.send(1, codec.encode(IHaveFrame((b"i" * 16,))))
    assert not n1.table.send(3, codec.encode(GOSSIP)), "no link to node 3"
    pump.flush()
    assert n2.rec.events == [("up", 1), ("frame", 1, GOSSIP)]
    assert n1.rec.events == [("up", 2), ("frame", 2, IHaveFrame((b"i" * 16,)))]


# (Hello, the reason in the listener's log, the reason the peer is told): a
# refused peer learns nothing about the cluster (its name, who is a neighbour).
REFUSED_HELLOS = [
    pytest.param(
        hello(1, version=2),
        "protocol version 2 is not supported (node 2 speaks 1)",
        "protocol version 2 is not supported (this node speaks 1)",
        id="protocol-version",
    ),
    pytest.param(
        codec.Hello(codec.PROTOCOL_VERSION, "other", 1, 7),
        "cluster 'other' is not this node's cluster 'test'",
        REFUSED,
        id="cluster-name",
    ),
    pytest.param(
        hello(OUTSIDER),
        f"node {OUTSIDER} is not a neighbour of node 2",
        REFUSED,
        id="not-a-neighbour",
    ),
    pytest.param(
        hello(1, incarnation=0), "incarnation 0 is not allowed", REFUSED, id="incarnation-0"
    ),
]


@pytest.mark.parametrize(("bad_hello", "reason", "told"), REFUSED_HELLOS)
def test_listener_rejects_a_bad_hello(
    bad_hello: codec.Hello, reason: str, told: str, log_events: list[dict[str, Any]]
) -> None:
    """A refused Hello gets a Reject with a reason that discloses nothing about the
    cluster, the detailed reason goes to the log, the connection closes, up never fires."""
    node = Node(2)
    proto, transport = node.inbound()
    proto.dataReceived(framed(bad_hello))
    assert frames_in(transport.value()) == [codec.Reject(told)]
    assert CLUSTER not in told
    assert transport.disconnecting
    assert not proto.established
    assert any(f"handshake refused: {reason}" in w for w in warnings(log_events))
    lose(proto)
    assert node.rec.events == []
    assert node.table.connections == set()
    assert all(s.state == CONNECTING for s in node.table.status())


@pytest.mark.parametrize(("bad_hello", "reason", "told"), REFUSED_HELLOS)
def test_dialer_records_the_reject_it_gets(bad_hello: codec.Hello, reason: str, told: str) -> None:
    """End to end: the listener's Reject closes the dial and shows in the dialer's status."""
    n1, n2 = Node(1), Node(2)
    client, _, pump = pair(n1, n2)
    # Make the dialer send the bad Hello instead of its own.
    client.transport.stream.clear()
    client.transport.write(framed(bad_hello))
    pump.flush()
    assert n1.rec.events == [] and n2.rec.events == []
    assert client.transport.disconnected
    status = {s.peer: s for s in n1.table.status()}
    assert status[2].state == CONNECTING
    assert status[2].last_error == f"node 2 rejected our handshake: {told}"


def test_reject_received_by_dialer_is_recorded(log_events: list[dict[str, Any]]) -> None:
    """A Reject on a dialed connection closes it, sets last_error, and never brings the link up."""
    node = Node(1)
    proto, transport = node.outbound(2)
    proto.dataReceived(framed(codec.Reject("go away")))
    assert transport.disconnecting
    lose(proto)
    assert node.rec.events == []
    status = {s.peer: s for s in node.table.status()}
    assert status[2].last_error == "node 2 rejected our handshake: go away"
    assert status[2].state == CONNECTING
    assert any("node 2 rejected our handshake: go away" in w for w in warnings(log_events))


def test_reject_received_by_listener_closes_without_recording(
    log_events: list[dict[str, Any]],
) -> None:
    """Only a dialer may be rejected: a Reject on an accepted connection is a bad first frame."""
    node = Node(2)
    proto, transport = node.inbound()
    proto.dataReceived(framed(codec.Reject("nope")))
    assert transport.disconnecting
    assert transport.value() == b""
    assert any("expected Hello, got Reject" in w for w in warnings(log_events))
    lose(proto)
    assert node.rec.events == []
    assert all(s.last_error == "" for s in node.table.status())


def test_dialer_closes_when_another_node_answers(log_events: list[dict[str, Any]]) -> None:
    """Dialing node 3 but getting node 4's Hello closes the connection; up never fires."""
    node = Node(2)
    proto, transport = node.outbound(3)
    proto.dataReceived(framed(hello(4)))
    assert transport.disconnecting
    assert not proto.established
    assert any("dialed node 3 but node 4 answered" in w for w in warnings(log_events))
    lose(proto)
    assert node.rec.events == []
    assert node.table.links[3].proto is None and node.table.links[4].proto is None
    assert all(s.state == CONNECTING for s in node.table.status())


# -- bad frames --------------------------------------------------------------


BAD_INPUTS = [
    pytest.param(False, raw_frame(b"\x0a\xff"), "undecodable frame", id="undecodable"),
    pytest.param(False, raw_frame(b""), "frame of unknown kind (0 bytes)", id="unknown-kind"),
    pytest.param(False, framed(codec.Ping()), "expected Hello, got Ping", id="ping-before-hello"),
    pytest.param(
        False, framed(GOSSIP), "expected Hello, got GossipFrame", id="gossip-before-hello"
    ),
    pytest.param(
        True, framed(hello(1)), "unexpected Hello after the handshake", id="hello-after-hello"
    ),
    pytest.param(
        True,
        framed(codec.Reject("late")),
        "unexpected Reject after the handshake",
        id="reject-after-hello",
    ),
    pytest.param(True, raw_frame(b"\xff\xff"), "undecodable frame", id="undecodable-after-hello"),
    pytest.param(
        False,
        struct.pack("!I", MAX_FRAME + 1),
        f"frame of {MAX_FRAME + 1} bytes exceeds the limit of {MAX_FRAME}",
        id="oversized-length",
    ),
    pytest.param(
        True,
        struct.pack("!I", 0xFFFFFFFF) + b"abc",
        f"frame of {0xFFFFFFFF} bytes exceeds the limit of {MAX_FRAME}",
        id="oversized-length-after-hello",
    ),
]


@pytest.mark.parametrize(("after_handshake", "data", "reason"), BAD_INPUTS)
def test_bad_input_closes_that_connection_only(
    after_handshake: bool, data: bytes, reason: str, log_events: list[dict[str, Any]]
) -> None:
    """A bad frame closes its connection with a warning; a good peer can still connect after."""
    node = Node(2)
    # A healthy link to node 4 that must not be disturbed.
    healthy, healthy_transport = handshake_inbound(node, 4)
    if after_handshake:
        proto, transport = handshake_inbound(node, 1)
    else:
        proto, transport = node.inbound()
    before = list(node.rec.events)
    proto.dataReceived(data)
    assert transport.disconnecting
    assert transport.value() == b"", "nothing is answered to a bad frame"
    matching = [w for w in warnings(log_events) if reason in w]
    assert len(matching) == 1, warnings(log_events)
    assert "closing link to" in matching[0]
    assert node.rec.events == before
    lose(proto)
    if after_handshake:
        assert node.rec.events == [*before, ("down", 1)]
        assert reason in node.table.links[1].last_error
    else:
        assert node.rec.events == before
    # The table is still usable: a good peer connects and talks.
    mark = len(node.rec.events)
    good, good_transport = node.inbound()
    good.dataReceived(framed(hello(3)) + framed(GOSSIP))
    assert node.rec.events[mark:] == [("up", 3), ("frame", 3, GOSSIP)]
    assert frames_in(good_transport.value()) == [node.table.hello()]
    assert not healthy_transport.disconnecting and node.table.links[4].proto is healthy


@pytest.mark.parametrize(
    ("after_handshake", "data"),
    [
        pytest.param(False, framed(codec.Ping()) + framed(hello(1)), id="hello-after-garbage"),
        pytest.param(True, framed(hello(1)) + framed(GOSSIP), id="gossip-after-bad-hello"),
    ],
)
def test_frames_after_a_fatal_frame_in_the_same_read_are_ignored(
    after_handshake: bool, data: bytes
) -> None:
    """Once a connection is being closed, the rest of that read is dropped, not acted on."""
    node = Node(2)
    if after_handshake:
        proto, transport = handshake_inbound(node, 1)
    else:
        proto, transport = node.inbound()
    before = list(node.rec.events)
    proto.dataReceived(data)
    assert transport.disconnecting
    assert node.rec.events == before, "no up and no frame from a closing connection"


# -- keep-alive --------------------------------------------------------------


def test_idle_link_is_aborted_after_idle_timeout(log_events: list[dict[str, Any]]) -> None:
    """An established link that receives nothing for idle_timeout seconds is aborted."""
    node = Node(2)
    proto, transport = handshake_inbound(node, 1)
    node.reactor.advance(IDLE - 0.01)
    assert not transport.disconnecting
    node.reactor.advance(0.02)
    assert transport.disconnected, "aborted, not closed politely"
    assert any(f"link idle for {IDLE} s" in w for w in warnings(log_events))
    lose(proto, error.ConnectionAborted())
    assert node.rec.events == [("up", 1), ("down", 1)]
    status = {s.peer: s for s in node.table.status()}
    assert status[1].state == DOWN
    assert status[1].last_error == f"link idle for {IDLE} s"


def test_pings_keep_the_link_up() -> None:
    """A Ping every ping_interval resets the idle timer: the link survives many idle_timeouts."""
    node = Node(2)
    proto, transport = handshake_inbound(node, 1)
    for _ in range(20):
        node.reactor.advance(PING)
        proto.dataReceived(framed(codec.Ping()))
    assert node.reactor.seconds() == 20 * PING > 6 * IDLE
    assert not transport.disconnecting
    assert node.rec.events == [("up", 1)], "pings are not passed on"


def test_any_frame_resets_the_idle_timer() -> None:
    """Gossip traffic counts as liveness as well as Pings do."""
    node = Node(2)
    proto, transport = handshake_inbound(node, 1)
    for _ in range(5):
        node.reactor.advance(IDLE - 1)
        proto.dataReceived(framed(GOSSIP))
    assert not transport.disconnecting


def test_table_pings_every_up_link() -> None:
    """After start(), the table sends a Ping on every up link every ping_interval."""
    node = Node(2)
    node.table.start()
    _, t1 = handshake_inbound(node, 1)
    _, t3 = handshake_inbound(node, 3)
    node.reactor.advance(PING - 1)
    assert t1.value() == b"" and t3.value() == b""
    node.reactor.advance(1)
    assert frames_in(t1.value()) == [codec.Ping()]
    assert frames_in(t3.value()) == [codec.Ping()]
    node.reactor.advance(PING)
    assert frames_in(t1.value()) == [codec.Ping(), codec.Ping()]
    node.table.stop()


def test_two_tables_keep_an_idle_link_up_with_their_pings() -> None:
    """Two started tables exchanging only their own Pings never time the link out."""
    n1, n2 = Node(1), Node(2)
    n1.table.start()
    n2.table.start()
    client, server, pump = pair(n1, n2)
    pump.flush()
    for _ in range(int(4 * IDLE / PING)):
        n1.reactor.advance(PING / 2)
        n2.reactor.advance(PING / 2)
        pump.flush()
        n1.reactor.advance(PING / 2)
        n2.reactor.advance(PING / 2)
        pump.flush()
    assert not client.transport.disconnecting and not server.transport.disconnecting
    assert n1.rec.events == [("up", 2)] and n2.rec.events == [("up", 1)]
    n1.table.stop()
    n2.table.stop()


def test_unfinished_handshake_is_aborted(log_events: list[dict[str, Any]]) -> None:
    """An inbound connection that sends no Hello within hello_timeout is aborted."""
    node = Node(2)
    proto, transport = node.inbound()
    node.reactor.advance(HELLO_TIMEOUT - 0.01)
    assert not transport.disconnecting
    node.reactor.advance(0.02)
    assert transport.disconnected
    assert any(f"handshake not finished for {HELLO_TIMEOUT} s" in w for w in warnings(log_events))
    lose(proto, error.ConnectionAborted())
    assert node.rec.events == []
    assert node.table.connections == set()


def test_dialer_aborts_when_no_hello_comes_back() -> None:
    """The dialer's Hello unanswered for handshake_timeout: the dialed connection is aborted."""
    node = Node(1)
    proto, transport = node.outbound(2)
    node.reactor.advance(HANDSHAKE + 0.01)
    assert transport.disconnected
    lose(proto, error.ConnectionAborted())
    assert node.rec.events == []


def test_timeouts_run_on_the_table_clock() -> None:
    """Handshake and idle timeouts are scheduled on the clock the LinkTable was given."""
    node = Node(2)
    _proto, transport = node.inbound()
    node.reactor.advance(HANDSHAKE + 1)
    assert transport.disconnected


# -- duplicate connections and restarts --------------------------------------

# Half-steps of the two handshakes: "a1" moves node 1's Hello on the connection
# node 1 dialed (A) and node 2's answer back into A's buffer; "a2" delivers the
# answer; "a3" delivers what A carries next (a close, if an end closed it).
# "b1"/"b2"/"b3" are the same for the connection node 2 dialed (B).
STEPS = ("a1", "a2", "a3", "b1", "b2", "b3")
ORDERS = [
    order
    for order in permutations(STEPS)
    if order.index("a1") < order.index("a2") < order.index("a3")
    and order.index("b1") < order.index("b2") < order.index("b3")
]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_simultaneous_dials_keep_the_lower_ids_connection(order: tuple[str, ...]) -> None:
    """Both nodes dial at once: both keep the connection node 1 dialed; up once, down
    never, in every order the two connections deliver in. (Before: in a1-b1-b2-b3-a2,
    node 2's close of B reached node 1 before node 2's answer on A, and node 1's link
    went up on B, down, and up again on A: the flap the lab saw after heals.)"""
    n1, n2 = Node(1), Node(2)
    a_client, a_server, a_pump = pair(n1, n2)  # dialed by node 1
    b_client, b_server, b_pump = pair(n2, n1)  # dialed by node 2
    pumps = {"a": a_pump, "b": b_pump}
    for step in order:
        moved = pumps[step[0]].pump()
        assert moved or step[1] == "3", f"step {step} moved nothing"
    a_pump.flush()
    b_pump.flush()
    assert n1.rec.events == [("up", 2)]
    assert n2.rec.events == [("up", 1)]
    assert n1.table.links[2].proto is a_client
    assert n2.table.links[1].proto is a_server
    assert not a_client.transport.disconnecting and not a_server.transport.disconnecting
    assert b_client.transport.disconnected and b_server.transport.disconnected
    assert n1.table.connections == {a_client}
    assert n2.table.connections == {a_server}
    for node, peer in ((n1, 2), (n2, 1)):
        status = {s.peer: s for s in node.table.status()}[peer]
        assert (status.state, status.times_up) == (UP, 1)
    # The surviving connection carries traffic both ways.
    n1.table.send(2, codec.encode(GOSSIP))
    n2.table.send(1, codec.encode(GOSSIP))
    a_pump.flush()
    assert n1.rec.events[-1] == ("frame", 2, GOSSIP)
    assert n2.rec.events[-1] == ("frame", 1, GOSSIP)


def test_higher_id_closes_a_duplicate_left_open_only_after_handshake_timeout() -> None:
    """The higher id's end of a duplicate stops using it at once but leaves the close to
    the lower id (who closes it when it switches); one still open handshake_timeout
    later is closed by the higher id too."""
    node = Node(2)
    current, current_t = node.inbound()  # dialed by node 1: the one both keep
    current.dataReceived(framed(hello(1)))
    duplicate, duplicate_t = node.outbound(1)
    duplicate.dataReceived(framed(hello(1)))
    assert node.table.links[1].proto is current
    node.reactor.advance(HANDSHAKE - 0.01)
    assert not duplicate_t.disconnecting
    node.reactor.advance(0.02)
    assert duplicate_t.disconnecting and not current_t.disconnecting
    assert node.rec.events == [("up", 1)]


@pytest.mark.parametrize("restarted_dials", [True, False], ids=["peer-dials", "we-dial"])
def test_new_incarnation_replaces_the_old_connection(restarted_dials: bool) -> None:
    """A Hello with a new incarnation: the old connection is aborted, down then up."""
    n1, n2 = Node(1), Node(2, incarnation=111)
    old_client, _, old_pump = pair(n1, n2)
    old_pump.flush()
    assert n1.rec.events == [("up", 2)]
    # Node 2 restarts; its old connection has not been noticed as dead yet.
    n2_new = Node(2, incarnation=222)
    if restarted_dials:
        _, new_proto, new_pump = pair(n2_new, n1)
    else:
        new_proto, _, new_pump = pair(n1, n2_new)
    new_pump.flush()
    assert n1.rec.events == [("up", 2), ("down", 2), ("up", 2)]
    assert n1.table.links[2].proto is new_proto
    assert n1.table.links[2].incarnation == 222
    assert old_client.transport.disconnecting
    old_pump.flush()  # the old connection's close arrives now: no second down
    assert n1.rec.events == [("up", 2), ("down", 2), ("up", 2)]
    status = {s.peer: s for s in n1.table.status()}[2]
    assert (status.state, status.times_up) == (UP, 2)
    assert n1.table.connections == {new_proto}
    assert n2_new.rec.events == [("up", 1)]


def test_same_incarnation_reconnect_after_loss_is_up_again() -> None:
    """After a link drops, a new connection from the same process brings it up again."""
    n1, n2 = Node(1), Node(2)
    client, _, pump = pair(n1, n2)
    pump.flush()
    client.transport.loseConnection()
    pump.flush()
    assert n1.rec.events == [("up", 2), ("down", 2)]
    assert n2.rec.events == [("up", 1), ("down", 1)]
    _, _, pump2 = pair(n2, n1)
    pump2.flush()
    assert n1.rec.events[-1] == ("up", 2) and n2.rec.events[-1] == ("up", 1)
    assert n1.table.links[2].times_up == 2


# -- send bound --------------------------------------------------------------


def test_frames_queue_while_paused_and_flush_in_order() -> None:
    """While the transport pauses us, frames queue; on resume they are written in order."""
    node = Node(2)
    _, transport = handshake_inbound(node, 1)
    assert transport.producer is not None and transport.streaming
    transport.producer.pauseProducing()
    frames = [GossipFrame((Envelope(message_id(b"m%d" % i), b"m%d" % i, (2,)),)) for i in range(50)]
    for f in frames:
        assert node.table.send(1, codec.encode(f))
    assert transport.value() == b""
    transport.producer.resumeProducing()
    assert frames_in(transport.value()) == frames
    assert not transport.disconnecting
    # Not paused any more: writes go straight through.
    transport.clear()
    node.table.send(1, codec.encode(GOSSIP))
    assert frames_in(transport.value()) == [GOSSIP]


def test_pause_again_during_flush_keeps_the_rest_queued() -> None:
    """If the transport pauses again while the queue drains, the remainder waits, in order."""
    node = Node(2)
    _, transport = handshake_inbound(node, 1)
    gate = transport.producer
    gate.pauseProducing()
    frames = [IHaveFrame((bytes([i]) * 16,)) for i in range(6)]
    for f in frames:
        node.table.send(1, codec.encode(f))
    written: list[bytes] = []
    real_write = transport.write

    def write(data: bytes) -> None:
        real_write(data)
        written.append(data)
        if len(written) == 3:
            gate.pauseProducing()

    transport.write = write  # type: ignore[method-assign]
    gate.resumeProducing()
    assert len(frames_in(transport.value())) == 3
    transport.write = real_write  # type: ignore[method-assign]
    gate.resumeProducing()
    assert frames_in(transport.value()) == frames


def test_send_bound_aborts_a_peer_that_does_not_read(log_events: list[dict[str, Any]]) -> None:
    """Over max_pending_bytes queued, the connection is aborted with a log line."""
    node = Node(2, max_pending_bytes=1000)
    proto, transport = handshake_inbound(node, 1)
    gate = transport.producer
    gate.pauseProducing()
    body = b"x" * 380
    data = codec.encode(GossipFrame((Envelope(message_id(body), body, ()),)))
    assert 1000 / 3 < len(data) <= 500
    node.table.send(1, data)
    node.table.send(1, data)
    assert not transport.disconnecting, "still within the bound"
    node.table.send(1, data)
    assert transport.disconnected, "aborted"
    assert any("peer is not reading: over 1000 bytes queued" in w for w in warnings(log_events))
    node.table.send(1, data)  # dropped: the connection is closing
    assert transport.producer is None, "the write gate is unregistered on close"
    gate.resumeProducing()  # a late resume from the transport writes nothing
    assert transport.value() == b"", "the queue was dropped, not written"
    lose(proto, error.ConnectionAborted())
    assert node.rec.events == [("up", 1), ("down", 1)]
    assert "peer is not reading" in node.table.links[1].last_error


# -- dialing and reconnection ------------------------------------------------


def test_start_dials_every_neighbour() -> None:
    """LinkTable.start() calls connectTCP once per neighbour, to its peer address."""
    node = Node(1)
    node.table.start()
    assert sorted((h, p) for h, p, *_ in node.reactor.tcpClients) == [
        ("127.0.0.1", BASE_PORT + n) for n in (2, 3, 4)
    ]
    assert all(s.state == CONNECTING for s in node.table.status())
    node.table.stop()


def newest_dial(node: Node, peer: int) -> FakeConnector:
    """The TCP connector of the latest dial to ``peer`` (each dial of an endpoint makes one)."""
    return [c for c in node.reactor.connectors if c.port == BASE_PORT + peer][-1]


def test_failed_dial_is_retried(seeded_random: None) -> None:
    """A refused dial records last_error and the factory dials again within reconnect_max_delay."""
    node = Node(1)
    node.table.start()
    connector = newest_dial(node, 2)
    assert connector.getDestination().port == BASE_PORT + 2
    connector.transport.failIfNotConnected(error.ConnectionRefusedError())
    assert node.dials_to(2) == 1
    assert "dial tcp:host=127.0.0.1:port=17002 failed" in node.table.links[2].last_error
    assert "refused" in node.table.links[2].last_error
    node.reactor.advance(0)
    assert node.dials_to(2) == 1, "not at once"
    node.reactor.advance(MAX_DELAY)
    assert node.dials_to(2) == 2
    assert newest_dial(node, 2).state == "connecting"
    node.table.stop()


def test_dial_timeout_is_retried(seeded_random: None) -> None:
    """A dial that never connects times out after 5 s and is retried."""
    node = Node(1)
    node.table.start()
    node.reactor.advance(5)
    assert "dial tcp:host=127.0.0.1:port=17002 failed" in node.table.links[2].last_error
    assert "no connection within 5 s" in node.table.links[2].last_error
    node.reactor.advance(MAX_DELAY)
    assert node.dials_to(2) == 2
    node.table.stop()


def test_backoff_grows_but_dialing_never_stops(seeded_random: None) -> None:
    """Repeated failures keep being retried, with growing delays."""
    node = Node(1)
    node.table.start()
    times = []
    for attempt in range(1, 12):
        newest_dial(node, 2).transport.failIfNotConnected(error.ConnectionRefusedError())
        start = node.reactor.seconds()
        while node.dials_to(2) == attempt:
            node.reactor.advance(0.01)
            assert node.reactor.seconds() - start < 2 * MAX_DELAY, "no retry"
        times.append(node.reactor.seconds() - start)
    assert times[0] < 0.5
    assert max(times) > 1.0
    node.table.stop()


def test_retry_delay_never_exceeds_reconnect_max_delay(seeded_random: None) -> None:
    """Every retry after a failure comes within reconnect_max_delay seconds."""
    node = Node(1)
    node.table.start()
    for attempt in range(1, 41):
        newest_dial(node, 2).transport.failIfNotConnected(error.ConnectionRefusedError())
        node.reactor.advance(MAX_DELAY)
        assert node.dials_to(2) == attempt + 1, f"retry {attempt} later than {MAX_DELAY} s"


def complete_dial(node: Node, peer: int) -> tuple[PeerProtocol, StringTransport, FakeConnector]:
    """The newest dial to ``peer`` connects; the test scripts the other end."""
    connector = [c for c in node.reactor.connectors if c.port == BASE_PORT + peer][-1]
    assert connector.state == "connecting"
    proto = connector.buildProtocol(connector.getDestination())
    transport = StringTransport(peerAddress=connector.getDestination())
    proto.makeConnection(transport)
    connector.transport.done = True
    return proto, transport, connector


def test_outbound_link_lost_is_redialed(seeded_random: None) -> None:
    """An outbound link that drops comes back through a new dial."""
    node = Node(1)
    node.table.start()
    proto, transport, connector = complete_dial(node, 2)
    assert frames_in(transport.value()) == [node.table.hello()]
    proto.dataReceived(framed(hello(2)))
    assert node.rec.events == [("up", 2)]
    run_for(node.reactor, IDLE - 1)
    assert node.dials_to(2) == 1, "no dialing while the link is up"
    reason = Failure(error.ConnectionLost())
    proto.connectionLost(reason)
    connector.connectionLost(reason)
    assert node.rec.events == [("up", 2), ("down", 2)]
    node.reactor.advance(MAX_DELAY)
    assert node.dials_to(2) == 2
    node.table.stop()


def test_inbound_link_pauses_dialing_and_its_loss_resumes_it(seeded_random: None) -> None:
    """Up through the neighbour's dial: our dial stops; when that link drops we dial again."""
    node = Node(2)
    node.table.start()
    connector = next(c for c in node.reactor.connectors if c.port == BASE_PORT + 1)
    assert connector.state == "connecting"
    proto, _ = handshake_inbound(node, 1)
    assert node.rec.events == [("up", 1)]
    assert connector.state == "disconnected", "the dial in progress was stopped"
    run_for(node.reactor, IDLE - 1)
    assert node.dials_to(1) == 1, "no new dial while the inbound link is up"
    assert node.dials_to(3) > 1, "other neighbours are still dialed"
    lose(proto, error.ConnectionLost())
    assert node.rec.events == [("up", 1), ("down", 1)]
    node.reactor.advance(MAX_DELAY)
    assert node.dials_to(1) == 2
    node.table.stop()


def test_up_link_has_no_last_error_after_inbound_handshake() -> None:
    """An up link shows no error, even though our own dial was stopped to use the inbound one."""
    node = Node(2)
    node.table.start()
    handshake_inbound(node, 1)
    status = {s.peer: s for s in node.table.status()}[1]
    assert status.state == UP
    assert status.last_error == ""


def test_stop_closes_connections_and_dials_no_more(seeded_random: None) -> None:
    """stop() closes every connection and no dial follows."""
    node = Node(1)
    node.table.start()
    proto, transport = handshake_inbound(node, 2)
    node.table.stop()
    assert transport.disconnecting
    lose(proto)
    dials = len(node.reactor.tcpClients)
    run_for(node.reactor, 30 * MAX_DELAY)
    assert len(node.reactor.tcpClients) == dials
    assert node.rec.events == [("up", 2), ("down", 2)]


def test_too_many_unidentified_inbound_connections_are_refused() -> None:
    """The server factory refuses connections while max_unidentified handshakes are pending."""
    node = Node(2, max_unidentified=2)
    first, _ = node.inbound()
    node.inbound()
    assert node.table.server_factory().buildProtocol(None) is None
    first.dataReceived(framed(hello(1)))
    assert node.table.server_factory().buildProtocol(None) is not None


# -- injected send delay (benchmarks of wide-area latency) -------------------


def test_send_delay_holds_each_frame_and_keeps_order() -> None:
    """With send_delay, each frame leaves send_delay seconds after it was sent, in order,
    even when frames are sent at different moments; without it they leave at once."""
    node = Node(2, send_delay=0.1)
    _, transport = handshake_inbound(node, 1)
    node.reactor.advance(0.1)  # our Hello reply is delayed too
    transport.clear()
    frames = [GossipFrame((Envelope(message_id(b"d%d" % i), b"d%d" % i, (2,)),)) for i in range(4)]
    node.table.send(1, codec.encode(frames[0]))
    node.reactor.advance(0.04)
    node.table.send(1, codec.encode(frames[1]))
    node.table.send(1, codec.encode(frames[2]))
    node.reactor.advance(0.05)
    assert transport.value() == b""
    node.reactor.advance(0.011)
    assert frames_in(transport.value()) == frames[:1]
    node.reactor.advance(0.04)
    assert frames_in(transport.value()) == frames[:3]
    node.table.send(1, codec.encode(frames[3]))
    node.reactor.advance(0.1)
    assert frames_in(transport.value()) == frames


def test_send_delay_drops_held_frames_when_the_connection_ends() -> None:
    """Frames still held when the connection is lost are dropped with it, and no timer
    is left behind."""
    node = Node(2, send_delay=0.1)
    proto, transport = handshake_inbound(node, 1)
    node.table.send(1, codec.encode(GOSSIP))
    lose(proto)
    assert node.reactor.getDelayedCalls() == [] or all(
        not c.active() or c.func != proto._release for c in node.reactor.getDelayedCalls()
    )
    node.reactor.advance(0.2)
    assert transport.value() == b""


def test_full_transport_reports_congestion_for_the_current_link() -> None:
    """When the transport pauses us the table reports the link congested, and clear
    again on resume; a connection that is not the current link reports nothing."""
    import attrs

    node = Node(2)
    seen: list[tuple[int, bool]] = []
    node.table.events = attrs.evolve(
        node.table.events, congested=lambda peer, full: seen.append((peer, full))
    )
    _, transport = handshake_inbound(node, 1)
    assert transport.producer is not None
    transport.producer.pauseProducing()
    transport.producer.resumeProducing()
    assert seen == [(1, True), (1, False)]
    _stranger, st = node.inbound()
    assert st.producer is not None
    st.producer.pauseProducing()
    assert seen == [(1, True), (1, False)]


# -- reading goes on while our writes wait (issue 12, defect 1) ----------------


def test_frames_are_handled_while_our_writes_are_paused() -> None:
    """While the transport has paused our writes, the peer's frames are still parsed
    and delivered, and its Pings keep the link from timing out as idle."""
    node = Node(2)
    proto, transport = handshake_inbound(node, 1)
    transport.producer.pauseProducing()
    assert node.table.when_writable(1) is not None, "the link reports it is full"
    proto.dataReceived(framed(codec.Ping()) + framed(GOSSIP))
    assert node.rec.events == [("up", 1), ("frame", 1, GOSSIP)]
    for _ in range(4):
        node.reactor.advance(PING)
        proto.dataReceived(framed(codec.Ping()))
    assert node.reactor.seconds() > IDLE
    assert not transport.disconnecting, "pings were handled: the link is not idle"
    proto.dataReceived(framed(IHaveFrame((b"h" * 16,))))
    assert node.rec.events[-1] == ("frame", 1, IHaveFrame((b"h" * 16,)))


def test_oversized_frame_is_refused_while_our_writes_are_paused() -> None:
    """MAX_LENGTH still applies while our writes wait: an oversized length prefix
    closes the connection at once instead of piling up unparsed bytes."""
    node = Node(2)
    proto, transport = handshake_inbound(node, 1)
    transport.producer.pauseProducing()
    proto.dataReceived(struct.pack("!I", MAX_FRAME + 1) + b"x" * 1000)
    assert transport.disconnecting


def test_protocol_reuses_no_base_class_attribute() -> None:
    """PeerProtocol sets no attribute that its Twisted base classes already give a
    meaning (as ``paused`` once did), except MAX_LENGTH, which is meant to be set."""
    proto = PeerProtocol(Node(2).table, None)
    inherited = set(dir(Int32StringReceiver)) | set(dir(TimeoutMixin))
    assert set(vars(proto)) & inherited == {"MAX_LENGTH"}


# -- closes that complete, handshake slots (issue 12, defect 7) ----------------


class StalledTCP(FileDescriptor):
    """Twisted's own write buffering and producer handling (``FileDescriptor``)
    towards a peer that reads only once the test says so. ``drain`` does what the
    reactor does when the socket becomes writable."""

    bufferSize = 16

    def __init__(self, protocol: PeerProtocol) -> None:
        super().__init__(MemoryReactor())  # type: ignore[arg-type]
        self.protocol = protocol
        self.connected = 1
        self.peer_reads = False

    def writeSomeData(self, data: bytes) -> int:
        return len(data) if self.peer_reads else 0

    def drain(self) -> None:
        result = self.doWrite()
        if result is not None:
            self.connectionLost(Failure(result))

    def abortConnection(self) -> None:
        """As ``tcp.Connection`` does: drop what is buffered, the connection is lost."""
        if not self.disconnected:
            self.connectionLost(Failure(error.ConnectionAborted()))

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.protocol.connectionLost(reason)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40001)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", BASE_PORT + 2)


def stalled_inbound(node: Node) -> tuple[PeerProtocol, StalledTCP]:
    proto = node.table.server_factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    assert proto is not None
    tcp = StalledTCP(proto)
    proto.makeConnection(tcp)
    return proto, tcp


def test_closing_a_backed_up_link_completes_once_the_peer_reads() -> None:
    """A link closed while the transport has paused our writes is really closed when
    the buffer drains (Twisted would resume a registered producer instead)."""
    node = Node(2)
    proto, tcp = stalled_inbound(node)
    proto.dataReceived(framed(hello(1)))
    assert tcp.producerPaused, "our Hello alone filled the small buffer"
    proto.dataReceived(raw_frame(b"\xff\xff"))  # a bad frame: the link is closed
    assert not node.table.is_up(1) and not node.table.send(1, codec.encode(GOSSIP))
    tcp.peer_reads = True
    tcp.drain()
    assert node.rec.events == [("up", 1), ("down", 1)]
    assert node.table.connections == set()


def test_closing_a_link_whose_peer_never_reads_aborts_it_after_close_grace() -> None:
    """A refused handshake whose peer never reads our Reject is aborted close_grace
    seconds later, and its handshake slot is free again."""
    node = Node(2, max_unidentified=1)
    proto, tcp = stalled_inbound(node)
    assert node.table.server_factory().buildProtocol(None) is None, "the only slot is taken"
    proto.dataReceived(framed(codec.Hello(codec.PROTOCOL_VERSION, "other", 1, 7)))
    assert tcp.producerPaused and tcp.disconnecting
    node.reactor.advance(CLOSE_GRACE - 0.01)
    assert not tcp.disconnected
    node.reactor.advance(0.02)
    assert tcp.disconnected
    assert node.table.connections == set()
    assert node.table.server_factory().buildProtocol(None) is not None


def test_one_source_cannot_take_every_handshake_slot(log_events: list[dict[str, Any]]) -> None:
    """With the default limits, one address holds at most MAX_HANDSHAKES_PER_SOURCE
    handshakes in progress; the rest are refused with a log line and other addresses
    still get in; a finished handshake frees its slot."""
    assert MAX_HANDSHAKES_PER_SOURCE < MAX_HANDSHAKES
    node = Node(2)
    factory = node.table.server_factory()
    hostile = IPv4Address("TCP", "10.0.0.66", 40000)
    held = []
    for _ in range(MAX_HANDSHAKES):
        proto = factory.buildProtocol(hostile)
        if proto is not None:
            proto.makeConnection(StringTransport(peerAddress=hostile))
            held.append(proto)
    assert len(held) == MAX_HANDSHAKES_PER_SOURCE
    assert any("refusing a peer connection from 10.0.0.66" in w for w in warnings(log_events))
    honest, _ = node.inbound("10.0.0.1")
    honest.dataReceived(framed(hello(1)))
    assert node.rec.events == [("up", 1)]
    lose(held[0])
    assert factory.buildProtocol(hostile) is not None


def test_a_slow_hello_is_cut_at_hello_timeout() -> None:
    """An inbound Hello trickled a byte at a time is not finished within hello_timeout:
    the connection is aborted then, though bytes kept arriving."""
    node = Node(2)
    proto, transport = node.inbound()
    data = framed(hello(1))
    step = 2 * HELLO_TIMEOUT / len(data)
    for i in range(len(data) // 2 + 2):
        proto.dataReceived(data[i : i + 1])
        node.reactor.advance(step)
    assert node.reactor.seconds() > HELLO_TIMEOUT
    assert transport.disconnected
    assert not proto.established


# -- what strangers send, in our logs and replies (issues 12 and 13) -----------


def test_long_peer_strings_are_capped_in_replies_logs_and_status(
    log_events: list[dict[str, Any]],
) -> None:
    """A megabyte cluster name is not echoed in the Reject and is cut in the log; a
    megabyte Reject reason is cut in the dialer's log and status; newlines in either
    cannot start a forged log line."""
    node = Node(2)
    proto, transport = node.inbound()
    name = "A" * 1_000_000 + "\nFORGED"
    proto.dataReceived(framed(codec.Hello(codec.PROTOCOL_VERSION, name, 1, 7)))
    assert frames_in(transport.value()) == [codec.Reject(REFUSED)]
    (line,) = [w for w in warnings(log_events) if "handshake refused" in w]
    assert len(line) < 3 * PEER_TEXT_LIMIT and "more characters" in line and "\n" not in line
    dialer = Node(1)
    out, _ = dialer.outbound(2)
    out.dataReceived(framed(codec.Reject("B" * 1_000_000 + "\nFORGED")))
    error_text = dialer.table.links[2].last_error
    assert len(error_text) < 3 * PEER_TEXT_LIMIT and "\n" not in error_text
    assert all(len(w) < 3 * PEER_TEXT_LIMIT for w in warnings(log_events))


def test_shorten_escapes_and_marks_what_it_cuts() -> None:
    """Short printable text is kept as it is; control characters are escaped; a long
    text keeps its first PEER_TEXT_LIMIT characters and says how many were left out."""
    assert shorten("node 3") == "node 3"
    assert shorten("a\nb\x1b") == "a\\nb\\x1b"
    assert shorten("x" * 150) == "x" * PEER_TEXT_LIMIT + "...[50 more characters]"


def test_refused_handshake_warnings_are_rate_limited(log_events: list[dict[str, Any]]) -> None:
    """A loop of refused handshakes writes at most a burst of warnings; once the rate
    allows again, the next line says how many were left out."""
    node = Node(2)
    for i in range(200):
        proto, _ = node.inbound(f"10.0.{i // 250}.{i % 250}")
        proto.dataReceived(framed(hello(OUTSIDER)))
        lose(proto)
    refused = [w for w in warnings(log_events) if "handshake refused" in w]
    assert len(refused) == HANDSHAKE_LOG_BURST
    node.reactor.advance(5)
    proto, _ = node.inbound()
    proto.dataReceived(framed(hello(OUTSIDER)))
    last = warnings(log_events)[-1]
    assert "handshake refused" in last
    assert f"({200 - HANDSHAKE_LOG_BURST} similar lines left out)" in last


def test_log_rate_limit_refills_at_its_rate() -> None:
    """The bucket gives ``burst`` lines at once, then one per 1/per_second seconds."""
    now = [0.0]
    limit = LogRateLimit(lambda: now[0], per_second=2.0, burst=3)
    assert [limit.allow() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 0.5
    assert limit.allow() == 2
    assert limit.allow() is None


# -- healing after one side timed the link out (issue 9) -----------------------


@pytest.mark.parametrize("silent", [True, False], ids=["silent", "alive"])
def test_a_silent_connection_loses_to_a_new_one_from_the_same_process(silent: bool) -> None:
    """A new connection of the same incarnation replaces a current one that has heard
    nothing for silent_after (2 ping intervals), whoever dialed it: the peer already
    dropped that one. A current connection that is alive keeps the lower-id rule."""
    node = Node(1)
    old, old_transport = node.outbound(2)  # dialed by node 1, the lower id
    old.dataReceived(framed(hello(2)))
    node.reactor.advance(2 * PING - 1)
    if not silent:
        old.dataReceived(framed(codec.Ping()))
    node.reactor.advance(1.5)
    new, new_transport = node.inbound()
    new.dataReceived(framed(hello(2)))
    if silent:
        assert node.table.links[2].proto is new
        assert old_transport.disconnected, "aborted"
        assert node.rec.events == [("up", 2), ("down", 2), ("up", 2)]
        assert "nothing heard on it for 10.5 s" in (old.closing_reason or "")
    else:
        assert node.table.links[2].proto is old
        assert new_transport.disconnecting
        assert node.rec.events == [("up", 2)]


def dial_times(node: Node, peer: int, links: list[float]) -> list[float]:
    """Let ``node`` dial ``peer`` once per entry of ``links``: each dial connects, the
    handshake succeeds, and the connection is closed that many seconds later.
    Returns the waits between one close and the next dial."""
    waits = []
    for lasts in links:
        dials = node.dials_to(peer)
        start = node.reactor.seconds()
        while node.dials_to(peer) == dials:
            node.reactor.advance(0.01)
            assert node.reactor.seconds() - start < 2 * MAX_DELAY, "no redial"
        waits.append(node.reactor.seconds() - start)
        proto, _, connector = complete_dial(node, peer)
        proto.dataReceived(framed(hello(peer)))
        assert node.table.is_up(peer)
        node.reactor.advance(lasts)
        reason = Failure(error.ConnectionDone())
        proto.connectionLost(reason)
        connector.connectionLost(reason)
    return waits


def test_handshakes_closed_at_once_back_off(seeded_random: None) -> None:
    """A dialed link closed right after its handshake (as a duplicate, say) does not
    reset the backoff: redials come later and later, not several times a second. A
    link that stayed up stable_after seconds does reset it."""
    node = Node(2)
    node.table.start()
    connector = next(c for c in node.reactor.connectors if c.port == BASE_PORT + 1)
    connector.transport.failIfNotConnected(error.ConnectionRefusedError())
    waits = dial_times(node, 1, [0.05] * 6 + [3.0, 0.05])
    assert waits[0] < 0.3
    assert waits[5] > 1.0, waits
    assert sum(waits[1:7]) > 5.0, waits
    assert waits[7] < 0.3, "the link that lasted 3 s reset the backoff"
    node.table.stop()


class DialedTransport(iosim.FakeTransport):
    """The dialing end of an in-memory connection: tells its connector when it ends,
    as a TCP client transport does."""

    def __init__(self, protocol: PeerProtocol, connector: FakeConnector) -> None:
        super().__init__(protocol, isServer=False, peerAddress=connector.getDestination())
        self.connector = connector

    def reportDisconnect(self) -> None:
        super().reportDisconnect()
        self.connector.connectionLost(Failure(self.disconnectReason))


def _unwrapped(proto: Any) -> Any:
    """The PeerProtocol inside an endpoint's wrapping protocol (dials go through endpoints)."""
    while True:
        inner = getattr(proto, "_wrappedProtocol", None) or getattr(proto, "wrapped", None)
        if inner is None:
            return proto
        proto = inner


class Network:
    """Nodes whose dials reach each other over iosim, their clocks moved together.

    A node not started yet refuses dials. ``cut`` is a partition: connections
    between the two nodes never deliver another byte (each end learns only of its
    own closes) and new dials hang until they time out; ``heal`` lets new
    connections through again. Dials to nodes outside the network hang.
    """

    def __init__(self, *nodes: Node) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.listening: set[int] = set()
        self.cut_pairs: set[frozenset[int]] = set()
        self.live: list[tuple[frozenset[int], iosim.IOPump]] = []
        self.dead: list[iosim.IOPump] = []
        self.now = 0.0

    def start(self, node_id: int) -> None:
        self.listening.add(node_id)
        self.nodes[node_id].table.start()

    def cut(self, a: int, b: int) -> None:
        pair_ = frozenset((a, b))
        self.cut_pairs.add(pair_)
        self.dead += [pump for p, pump in self.live if p == pair_]
        self.live = [(p, pump) for p, pump in self.live if p != pair_]

    def heal(self, a: int, b: int) -> None:
        self.cut_pairs.discard(frozenset((a, b)))

    def run_until(self, t: float, step: float = 0.01) -> None:
        while self.now < t - 1e-9:
            dt = min(step, t - self.now)
            self.now += dt
            for n in self.nodes.values():
                n.reactor.advance(dt)
            self._settle()

    def same_connection(self, a: int, b: int) -> bool:
        """Whether ``a`` and ``b`` both use the two ends of one live connection."""
        pa, pb = self.nodes[a].table.links[b].proto, self.nodes[b].table.links[a].proto
        return any({_unwrapped(pump.client), pump.server} == {pa, pb} for _, pump in self.live)

    def _settle(self) -> None:
        for _ in range(100):
            moved = self._connect_dials()
            for _, pump in self.live:
                moved = pump.flush() or moved
            for pump in self.dead:
                for io in (pump.clientIO, pump.serverIO):
                    if io.disconnecting and not io.disconnected:
                        io.disconnected = True
                        io.reportDisconnect()
                        moved = True
            if not moved:
                return
        raise AssertionError("the network did not settle")

    def _connect_dials(self) -> bool:
        moved = False
        for node in self.nodes.values():
            for c in node.reactor.connectors:
                peer = c.port - BASE_PORT
                if c.state != "connecting" or c.transport.done or peer not in self.nodes:
                    continue
                if frozenset((node.id, peer)) in self.cut_pairs:
                    continue  # the SYN is lost: the dial times out
                moved = True
                if peer not in self.listening:
                    c.transport.failIfNotConnected(error.ConnectionRefusedError())
                    continue
                c.transport.done = True
                client = c.buildProtocol(c.getDestination())
                source = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.live) + len(self.dead))
                server = self.nodes[peer].table.server_factory().buildProtocol(source)
                assert server is not None
                pump = iosim.connect(
                    server,
                    iosim.FakeTransport(server, isServer=True, peerAddress=source),
                    client,
                    DialedTransport(client, c),
                    greet=False,
                )
                self.live.append((frozenset((node.id, peer)), pump))
        return moved


def test_link_heals_at_once_after_one_side_timed_it_out(seeded_random: None) -> None:
    """Issue 9's reconnect storm: node 2 times an idle link out (at 25 s) while node 1
    still holds the dead connection (it would time out only at 29 s). After the
    partition heals, node 2's first redial brings the link up on both sides for good:
    one redial, one down and one up on each side, no flapping."""
    n1, n2 = Node(1), Node(2)
    net = Network(n1, n2)
    net.start(1)  # pings at 5, 10, 15...; its dials to node 2 are refused until 4 s
    net.run_until(4)
    net.start(2)  # dials node 1 at once; pings at 9, 14, 19...
    net.run_until(4.1)
    assert n1.rec.events == [("up", 2)] and n2.rec.events == [("up", 1)]
    net.run_until(14.5)  # node 2 last heard node 1 at 10 s, node 1 heard node 2 at 14 s
    net.cut(1, 2)
    net.run_until(24.5)
    net.heal(1, 2)
    dials = n2.dials_to(1)
    net.run_until(25.0 + 1.0)  # node 2's idle timeout, then its redial (0.2 s backoff)
    assert net.same_connection(1, 2), "up again on both sides, over the new connection"
    assert n2.dials_to(1) == dials + 1
    net.run_until(60)
    assert net.same_connection(1, 2)
    assert n1.rec.events == [("up", 2), ("down", 2), ("up", 2)]
    assert n2.rec.events == [("up", 1), ("down", 1), ("up", 1)]
    assert n2.dials_to(1) == dials + 1 and n1.dials_to(2) < 10, "no more dials once up"
