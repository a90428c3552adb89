"""The link table: one logical link per neighbour, whatever the TCP connections do.

Both ends of a link dial each other with a ``ReconnectingClientFactory`` (through
an ``EndpointConnector``: a neighbour's address is an endpoint description) and
accept the other's dial, so a restarted node is reconnected as soon as either
side notices. The handshake (``Hello``) tells who is on a connection; rules
that keep exactly one connection per neighbour pair:

- a Hello with a new *incarnation* (a number each process picks at start)
  means the peer restarted: the old connection is stale and is replaced;
- two live connections of the same incarnation (both sides dialed at once):
  both ends keep the one dialed by the lower node id and close the other.

While a link is up through the connection the neighbour dialed, our own
dialing pauses; when the link goes down it resumes with a short delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IConnector, IReactorTCP, IReactorTime
from twisted.internet.protocol import ReconnectingClientFactory, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gossip import logs, settings
from gossip.core.frames import PeerFrame
from gossip.net.dialing import EndpointConnector
from gossip.net.peer_protocol import PeerProtocol
from gossip.wire import codec

CONNECTING, UP, DOWN = "connecting", "up", "down"


@attrs.frozen
class LinkEvents:
    """Where the table reports what the core must hear about."""

    up: Callable[[int], None]
    down: Callable[[int], None]
    frame: Callable[[int, PeerFrame, int], None]  # peer, frame, its size in bytes
    # After all frames of one read were handled: send what they produced now,
    # as one batch, instead of on the next reactor turn.
    read_done: Callable[[], None] = lambda: None
    # The link's transport filled up (True) or drained (False): backpressure.
    congested: Callable[[int, bool], None] = lambda peer, full: None


@attrs.define
class Link:
    peer: int
    address: str  # the neighbour's peer_address: a client endpoint description
    factory: PeerClientFactory
    state: str = CONNECTING
    since: float = 0.0
    proto: PeerProtocol | None = None
    incarnation: int = 0
    times_up: int = 0
    last_error: str = ""


@attrs.frozen
class LinkStatus:
    peer: int
    address: str
    state: str
    since: float
    times_up: int
    last_error: str


class PeerClientFactory(ReconnectingClientFactory):
    """Dials one neighbour forever, with bounded, jittered exponential backoff."""

    initialDelay = 0.2
    factor = 2.0
    jitter = 0.2
    noisy = False

    def __init__(self, table: LinkTable, peer: int, max_delay: float) -> None:
        self.table = table
        self.peer = peer
        self.maxDelay = max_delay  # type: ignore[assignment]  # float is fine; stubs say int
        self.clock = cast(Any, table.clock)
        self.resetDelay()

    def buildProtocol(self, addr: IAddress | None) -> PeerProtocol:
        p = PeerProtocol(self.table, self.peer)
        p.factory = self
        return p

    def startedConnecting(self, connector: IConnector) -> None:
        # ReconnectingClientFactory only learns its connector on a failure or a
        # loss; resume() needs it even when the first dial is still going.
        self.connector = connector

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.table.dial_failed(self.peer, reason)
        super().clientConnectionFailed(connector, reason)

    def retry(self, connector: IConnector | None = None) -> None:
        super().retry(connector)
        # ReconnectingClientFactory applies its jitter after clamping the delay to
        # maxDelay, so the wait it scheduled can be longer: clamp that too.
        call = self._callID
        wait = call.getTime() - self.table.clock.seconds() if call is not None else 0.0
        if call is not None and call.active() and wait > self.maxDelay:
            call.reset(self.maxDelay)

    def resume(self) -> None:
        """Dial again soon, after a pause while the neighbour's own dial carried the link."""
        if self.continueTrying:
            return
        self.resetDelay()
        if self.connector is not None and self.connector.state == "disconnected":
            self.retry()
        # else: the dial in progress ends in clientConnectionLost/Failed, which retries.

    def pause(self) -> None:
        self.stopTrying()


class PeerServerFactory(ServerFactory):
    noisy = False

    def __init__(self, table: LinkTable) -> None:
        self.table = table

    def buildProtocol(self, addr: IAddress | None) -> PeerProtocol | None:
        if self.table.unidentified_inbound >= self.table.max_unidentified:
            return None  # refuses the connection: too many handshakes in progress
        return PeerProtocol(self.table, None)


class LinkTable:
    log = logs.logger()

    def __init__(
        self,
        *,
        node_id: int,
        cluster: str,
        neighbours: dict[int, str],
        reactor: IReactorTCP,
        clock: IReactorTime,
        events: LinkEvents,
        max_frame: int,
        reconnect_max_delay: float = settings.RECONNECT_MAX_DELAY.default,
        ping_interval: float = settings.PING_INTERVAL.default,
        idle_timeout: float = settings.IDLE_TIMEOUT.default,
        handshake_timeout: float = 10.0,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_unidentified: int = 64,
        incarnation: int | None = None,
        send_delay: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.reactor = reactor
        self.clock = clock
        self.events = events
        self.max_frame = max_frame
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_pending_bytes = max_pending_bytes
        self.max_unidentified = max_unidentified
        # Added to every frame sent (benchmarks of wide-area latency; 0 in production).
        self.send_delay = send_delay
        self.incarnation = incarnation if incarnation is not None else random.getrandbits(63) + 1
        self.links = {
            peer: Link(peer, address, PeerClientFactory(self, peer, reconnect_max_delay))
            for peer, address in sorted(neighbours.items())
        }
        self.connections: set[PeerProtocol] = set()
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        now = self.clock.seconds()
        for link in self.links.values():
            link.since = now
            endpoint = clientFromString(self.reactor, link.address)
            EndpointConnector(endpoint, link.factory, self.clock, link.address).connect()
        self._pinger.start(self.ping_interval, now=False)

    def stop(self) -> None:
        self._stopping = True
        if self._pinger.running:
            self._pinger.stop()
        for link in self.links.values():
            link.factory.stopTrying()
        for proto in list(self.connections):
            proto.closing_reason = "node stopping"
            proto.tcp.loseConnection()

    def server_factory(self) -> PeerServerFactory:
        return PeerServerFactory(self)

    @property
    def unidentified_inbound(self) -> int:
        return sum(1 for p in self.connections if not p.established and not p.outbound)

    def hello(self) -> codec.Hello:
        return codec.Hello(codec.PROTOCOL_VERSION, self.cluster, self.node_id, self.incarnation)

    # -- from PeerProtocol -------------------------------------------------

    def connection_made(self, proto: PeerProtocol) -> None:
        self.connections.add(proto)

    def handshake_frame(self, proto: PeerProtocol, frame: codec.AnyFrame) -> None:
        if isinstance(frame, codec.Reject) and proto.outbound:
            reason = f"node {proto.dialed} rejected our handshake: {frame.reason}"
            if proto.dialed is not None:
                self.links[proto.dialed].last_error = reason
            proto.fail(reason)
            return
        if not isinstance(frame, codec.Hello):
            proto.fail(f"expected Hello, got {type(frame).__name__}")
            return
        problem = self._check_hello(proto, frame)
        if problem:
            if not proto.outbound:
                proto.send_frame(codec.Reject(problem))
            proto.fail(f"handshake refused: {problem}")
            return
        if not proto.outbound:
            proto.send_frame(self.hello())
        self._establish(proto, frame)

    def frame_received(self, proto: PeerProtocol, frame: PeerFrame, size: int) -> None:
        peer = proto.peer
        if peer is not None and self.links[peer].state == UP:
            self.events.frame(peer, frame, size)

    def write_state(self, proto: PeerProtocol) -> None:
        peer = proto.peer
        if peer is not None and self.links[peer].proto is proto:
            self.events.congested(peer, proto.paused)

    def connection_lost(self, proto: PeerProtocol, reason: Failure) -> None:
        self.connections.discard(proto)
        peer = proto.peer
        if peer is None:
            return
        link = self.links[peer]
        if link.proto is not proto:
            return
        link.proto = None
        link.state = DOWN
        link.since = self.clock.seconds()
        link.last_error = proto.closing_reason or reason.getErrorMessage()
        self.log.info("link to node {peer} down: {why}", peer=peer, why=link.last_error)
        self.events.down(peer)
        if not self._stopping and not proto.outbound:
            link.factory.resume()

    def dial_failed(self, peer: int, reason: Failure) -> None:
        link = self.links[peer]
        if link.state == UP or self._stopping:
            return  # we stopped this dial ourselves: the link is up through the neighbour's
        link.last_error = f"dial {link.address} failed: {reason.getErrorMessage()}"
        self.log.debug("{error}", error=link.last_error)

    # -- used by the node --------------------------------------------------

    def send(self, peer: int, data: bytes) -> bool:
        link = self.links.get(peer)
        if link is None or link.proto is None:
            return False
        link.proto.send_bytes(data)
        return True

    def is_up(self, peer: int) -> bool:
        link = self.links.get(peer)
        return link is not None and link.proto is not None

    def when_writable(self, peer: int) -> Deferred[None] | None:
        """None if the link to ``peer`` can take more now; else a Deferred for when it can."""
        link = self.links.get(peer)
        if link is None or link.proto is None or not link.proto.paused:
            return None
        return link.proto.when_writable()

    def drop(self, peer: int, reason: str) -> None:
        link = self.links.get(peer)
        if link is not None and link.proto is not None:
            link.proto.fail(reason)

    def status(self) -> list[LinkStatus]:
        return [
            LinkStatus(
                link.peer,
                link.address,
                link.state,
                link.since,
                link.times_up,
                link.last_error,
            )
            for link in self.links.values()
        ]

    # -- internals ---------------------------------------------------------

    def _check_hello(self, proto: PeerProtocol, hello: codec.Hello) -> str | None:
        if hello.protocol_version != codec.PROTOCOL_VERSION:
            return (
                f"protocol version {hello.protocol_version} is not supported"
                f" (node {self.node_id} speaks {codec.PROTOCOL_VERSION})"
            )
        if hello.cluster != self.cluster:
            return f"cluster {hello.cluster!r} is not this node's cluster {self.cluster!r}"
        if proto.outbound and hello.node_id != proto.dialed:
            return f"dialed node {proto.dialed} but node {hello.node_id} answered"
        if hello.node_id not in self.links:
            return f"node {hello.node_id} is not a neighbour of node {self.node_id}"
        if hello.incarnation == 0:
            return "incarnation 0 is not allowed"
        return None

    def _establish(self, proto: PeerProtocol, hello: codec.Hello) -> None:
        peer = hello.node_id
        link = self.links[peer]
        proto.peer = peer
        proto.incarnation = hello.incarnation
        proto.established = True
        proto.setTimeout(self.idle_timeout)
        current = link.proto
        if current is None:
            self._make_current(link, proto)
            self.events.up(peer)
            return
        if current.incarnation != hello.incarnation:
            # The peer restarted; the old connection has not noticed yet.
            link.proto = None
            current.closing_reason = "replaced: the peer restarted"
            current.tcp.abortConnection()
            self.events.down(peer)
            self._make_current(link, proto)
            self.events.up(peer)
            return
        # Both sides dialed at once: keep the connection the lower id dialed.
        new_dialer = self.node_id if proto.outbound else peer
        if new_dialer == min(self.node_id, peer):
            link.proto = proto
            self._set_dialing(link, proto)
            loser = current
        else:
            loser = proto
        loser.closing_reason = "duplicate connection"
        loser.tcp.loseConnection()

    def _make_current(self, link: Link, proto: PeerProtocol) -> None:
        link.proto = proto
        link.state = UP
        link.since = self.clock.seconds()
        link.incarnation = proto.incarnation
        link.times_up += 1
        link.last_error = ""
        self._set_dialing(link, proto)
        self.log.info(
            "link to node {peer} up ({direction})",
            peer=link.peer,
            direction="outbound" if proto.outbound else "inbound",
        )

    def _set_dialing(self, link: Link, proto: PeerProtocol) -> None:
        if proto.outbound:
            link.factory.resetDelay()
        else:
            link.factory.pause()

    def _ping(self) -> None:
        for link in self.links.values():
            if link.proto is not None:
                link.proto.send_frame(codec.Ping())
