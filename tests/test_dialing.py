"""EndpointConnector: ReconnectingClientFactory dialing through an endpoint as through connectTCP.

The endpoint is a fake that records each dial and lets the test decide its
outcome; time is a ``task.Clock``. The factory is a real
``ReconnectingClientFactory`` that records what its connector reports, so
these tests pin the calls a TCP connector would make, in the same order.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import Protocol, ReconnectingClientFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gossip.net.dialing import DIAL_TIMEOUT, EndpointAddress, EndpointConnector

DESC = "tcp:host=node-2.example:port=17001"
ADDR = IPv4Address("TCP", "10.0.0.2", 17001)


class FakeEndpoint:
    """Each connect() is a dial whose Deferred the test fires; cancelling it fails it."""

    def __init__(self) -> None:
        self.dials: list[tuple[Any, Deferred[Any]]] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1
            d.errback(error.ConnectingCancelledError(ADDR))

        d: Deferred[Any] = Deferred(cancel)
        self.dials.append((factory, d))
        return d

    def succeed(self) -> tuple[Protocol, StringTransport]:
        """The newest dial connects: the endpoint builds, connects, then fires."""
        factory, d = self.dials[-1]
        proto = factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport

    def fail(self, exc: Exception) -> None:
        self.dials[-1][1].errback(Failure(exc))


class Recorded(Protocol):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self.events.append(("lost", reason.type))


class RecordingFactory(ReconnectingClientFactory):
    """A real ReconnectingClientFactory that logs what its connector tells it."""

    initialDelay = 1.0
    maxDelay = 1.0
    jitter = 0.0
    noisy = False

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[Any] = []
        self.protos: list[Recorded] = []

    def doStart(self) -> None:
        self.calls.append("doStart")

    def doStop(self) -> None:
        self.calls.append("doStop")

    def startedConnecting(self, connector: Any) -> None:
        self.calls.append(("startedConnecting", connector.state))
        self.connector = connector  # as PeerClientFactory does, so stopTrying reaches it

    def buildProtocol(self, addr: Any) -> Recorded:
        self.calls.append(("buildProtocol", addr))
        self.protos.append(Recorded())
        return self.protos[-1]

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.calls.append(("failed", reason.type))
        super().clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.calls.append(("lost", reason.type))
        super().clientConnectionLost(connector, reason)


def make() -> tuple[EndpointConnector, FakeEndpoint, RecordingFactory, Clock]:
    clock = Clock()
    endpoint = FakeEndpoint()
    factory = RecordingFactory(clock)
    return EndpointConnector(endpoint, factory, clock, DESC), endpoint, factory, clock


def test_is_an_iconnector_naming_its_description() -> None:
    """It provides IConnector; getDestination is the endpoint description."""
    connector, *_ = make()
    assert IConnector.providedBy(connector)
    assert connector.getDestination() == EndpointAddress(DESC)
    assert str(connector.getDestination()) == DESC


def test_connect_then_loss_reports_like_a_tcp_connector_and_redials() -> None:
    """doStart, startedConnecting, buildProtocol on connect; the protocol gets the
    real transport and the data; a loss reaches the protocol, then
    clientConnectionLost, then doStop; the factory redials after its delay."""
    connector, endpoint, factory, clock = make()
    connector.connect()
    assert connector.state == "connecting"
    proto_wrapper, transport = endpoint.succeed()
    assert connector.state == "connected"
    inner = factory.protos[0]
    assert inner.transport is transport, "no extra layer between the protocol and its transport"
    proto_wrapper.dataReceived(b"hi")
    proto_wrapper.connectionLost(Failure(error.ConnectionLost()))
    assert inner.events == ["made", b"hi", ("lost", error.ConnectionLost)]
    assert factory.calls == [
        "doStart",
        ("startedConnecting", "connecting"),
        ("buildProtocol", ADDR),
        ("lost", error.ConnectionLost),
        "doStop",
    ]
    assert connector.state == "disconnected"
    assert len(endpoint.dials) == 1
    clock.advance(1.0)
    assert len(endpoint.dials) == 2, "ReconnectingClientFactory dialled again"
    assert connector.state == "connecting"


def test_failed_dial_is_reported_and_retried() -> None:
    """A refused dial is clientConnectionFailed with the endpoint's error; the factory retries."""
    connector, endpoint, factory, clock = make()
    connector.connect()
    endpoint.fail(error.ConnectionRefusedError())
    assert ("failed", error.ConnectionRefusedError) in factory.calls
    assert connector.state == "disconnected"
    clock.advance(1.0)
    assert len(endpoint.dials) == 2


def test_dial_that_hangs_times_out_and_is_cancelled() -> None:
    """After DIAL_TIMEOUT the attempt is cancelled and reported as a TimeoutError."""
    connector, endpoint, factory, clock = make()
    connector.connect()
    clock.advance(DIAL_TIMEOUT - 0.01)
    assert connector.state == "connecting"
    clock.advance(0.01)
    assert endpoint.cancelled == 1
    assert factory.calls[-2:] == [("failed", error.TimeoutError), "doStop"]


def test_stop_trying_stops_the_dial_in_progress_for_good() -> None:
    """stopTrying() calls stopConnecting(): the attempt is cancelled, reported as a
    UserError (as BaseConnector does), and never retried."""
    connector, endpoint, factory, clock = make()
    connector.connect()
    factory.stopTrying()
    assert endpoint.cancelled == 1
    assert ("failed", error.UserError) in factory.calls
    clock.advance(60)
    assert len(endpoint.dials) == 1
    with pytest.raises(error.NotConnectingError):
        connector.stopConnecting()


def test_connect_while_connecting_is_refused() -> None:
    """A second connect() during a dial is an error, as with Twisted's connectors."""
    connector, *_ = make()
    connector.connect()
    with pytest.raises(RuntimeError, match="connecting"):
        connector.connect()


def test_disconnect_closes_an_established_connection() -> None:
    """disconnect() while connected loses the connection through its transport."""
    connector, endpoint, _, _ = make()
    connector.connect()
    _, transport = endpoint.succeed()
    connector.disconnect()
    assert transport.disconnecting


def test_refused_protocol_is_not_connected() -> None:
    """A factory that returns None from buildProtocol refuses; the endpoint then fails."""
    connector, endpoint, factory, _ = make()
    factory.buildProtocol = lambda addr: None  # type: ignore[method-assign, assignment, return-value]
    connector.connect()
    assert endpoint.dials[-1][0].buildProtocol(ADDR) is None
    endpoint.fail(error.ConnectError("refused by the factory"))
    assert ("failed", error.ConnectError) in factory.calls


def test_tcp_description_dials_connect_tcp_each_time() -> None:
    """With clientFromString's TCP endpoint every dial is a new connectTCP to the host
    name (so the name is resolved again at each dial), with the connector's timeout."""
    reactor = MemoryReactorClock()
    factory = RecordingFactory(Clock())
    endpoint = clientFromString(reactor, DESC)
    connector = EndpointConnector(endpoint, factory, reactor, DESC)
    connector.connect()
    host, port, _, _, _ = reactor.tcpClients[-1]
    assert (host, port) == ("node-2.example", 17001)
    reactor.advance(DIAL_TIMEOUT)
    assert ("failed", error.TimeoutError) in factory.calls
    connector.connect()
    assert len(reactor.tcpClients) == 2
