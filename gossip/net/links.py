"""The link table: one logical link per neighbour, whatever the TCP connections do.

Both ends of a link dial each other with a ``ReconnectingClientFactory`` (through
an ``EndpointConnector``: a neighbour's address is an endpoint description) and
accept the other's dial, so a restarted node is reconnected as soon as either
side notices. The handshake (``Hello``) tells who is on a connection; rules
that keep exactly one connection per neighbour pair:

- a Hello with a new *incarnation* (a number each process picks at start)
  means the peer restarted: the old connection is stale and is replaced;
- a new connection of the same incarnation replaces a current one that has
  heard nothing for ``silent_after`` seconds: the neighbour dialed or answered
  again because it already dropped that connection (it timed the link out
  first, say across a healed partition), so the old one is dead;
- otherwise two live connections of the same incarnation mean both sides
  dialed at once: both ends keep the one dialed by the lower node id, and the
  lower id's end closes the other (the higher id's end stops using it and
  closes it only if it is still open ``handshake_timeout`` later): a close
  from the higher id could arrive before the lower id has switched, and take
  its link down and up again.

While a link is up through the connection the neighbour dialed, our own
dialing pauses; when the link goes down it resumes. The dialing backoff is
reset only by a link that stayed up ``stable_after`` seconds, so handshakes
that are closed at once (duplicates, a peer that refuses us) back off instead
of redialing several times a second.

Inbound connections that have not said who they are hold handshake slots:
at most ``max_unidentified`` in all and ``max_handshakes_per_source`` per
source address, each for at most ``hello_timeout`` seconds. Nothing a peer
sent is echoed in a ``Reject`` (it gets a generic reason, our log the detail),
and log lines about failed handshakes are capped in length and rate.

With ``tls`` (a ``PeerTLS``, see ``gossip.net.tls``) every connection is mutual
TLS: dials are wrapped with ``wrapClientTLS`` and the listening factory with
``TLSMemoryBIOFactory``; a failed TLS handshake is one log line saying why, and
a ``Hello`` is refused unless the node id it claims is the one the peer's
certificate names (so also the one we dialed).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ReconnectingClientFactory, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gossip import logs, settings
from gossip.core.frames import PeerFrame
from gossip.log_guard import LogRateLimit, shorten
from gossip.net.dialing import EndpointConnector
from gossip.net.peer_protocol import BAD_FRAME, HANDSHAKE_REFUSED, PeerProtocol
from gossip.net.tls import PeerTLS, handshake_problem, peer_identity
from gossip.pause_watch import PauseWatch
from gossip.wire import codec

CONNECTING, UP, DOWN = "connecting", "up", "down"

# Defaults of the LinkTable settings that bound what strangers can hold.
# Inbound connections still in their handshake, in all and per source address.
MAX_HANDSHAKES = 64
MAX_HANDSHAKES_PER_SOURCE = 8
# Seconds an inbound connection has to deliver its whole Hello (it is sent at once).
HELLO_TIMEOUT = 3.0
# Seconds a dialed connection waits for the neighbour's Hello in answer.
HANDSHAKE_TIMEOUT = 10.0
# Seconds a closed connection may take to send what it has queued before it is aborted.
CLOSE_GRACE = 2.0
# A current connection silent this many ping intervals loses to a new one (see above).
SILENT_PINGS = 2
# Seconds a link must stay up before its loss resets the dialing backoff.
STABLE_AFTER = 2.0
# Warning lines about failed handshakes and refused connections: a burst, then per second.
HANDSHAKE_LOG_BURST = 20
HANDSHAKE_LOG_PER_SECOND = 1.0
# What a refused peer is told: nothing about this cluster or its neighbours.
# Down times remembered per link (for flaps over a window: gclient --cluster-stats).
RECENT_DOWNS = 64
REFUSED = "handshake refused (the reason is in the refusing node's log)"
# The address shown for a link another node chose (this side accepts it, never dials).
ACCEPTED_ONLY = "(accepted: not dialed)"
# What a seed's dial is marked with while the node id at that address is not known.
SEED = -1


@attrs.frozen
class LinkEvents:
    """Where the table reports what the core must hear about."""

    up: Callable[[int], None]
    down: Callable[[int], None]
    frame: Callable[[int, PeerFrame, int], None]  # peer, frame, its size in bytes
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
    times_down: int = 0  # an up link went down (a flap, when it comes back)
    # When it last went down (for flaps over a window), newest last; bounded.
    recent_downs: deque[float] = attrs.field(factory=lambda: deque(maxlen=RECENT_DOWNS))


@attrs.frozen
class LinkStatus:
    peer: int
    address: str
    state: str
    since: float
    times_up: int
    last_error: str
    times_down: int = 0
    recent_downs: tuple[float, ...] = ()


class PeerClientFactory(ReconnectingClientFactory):
    """Dials one neighbour forever, with bounded, jittered exponential backoff."""

    initialDelay = 0.2
    factor = 2.0
    jitter = 0.2
    noisy = False

    def __init__(self, table: LinkTable, peer: int, max_delay: float) -> None:
        self.table = table
        self.peer = peer  # SEED while dialing a seed whose id is not known yet
        self.seed_address = ""
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

    def resume(self, reset_backoff: bool) -> None:
        """Dial again, after a pause while the neighbour's own dial carried the link:
        soon if that link was stable, else after the next (longer) backoff delay."""
        if self.continueTrying:
            return
        if reset_backoff:
            self.resetDelay()
        else:
            self.continueTrying = True
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
        source = str(getattr(addr, "host", "?"))
        problem = self.table.handshake_slot_problem(source)
        if problem is not None:
            self.table.refused(source, problem)
            return None  # refuses the connection
        return PeerProtocol(self.table, None, source)


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
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        hello_timeout: float = HELLO_TIMEOUT,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_unidentified: int = MAX_HANDSHAKES,
        max_handshakes_per_source: int = MAX_HANDSHAKES_PER_SOURCE,
        close_grace: float = CLOSE_GRACE,
        silent_after: float | None = None,
        stable_after: float = STABLE_AFTER,
        incarnation: int | None = None,
        send_delay: float = 0.0,
        tls: PeerTLS | None = None,
        accept_peer: Callable[[int], bool] | None = None,
        seeds: Sequence[str] = (),
    ) -> None:
        """With ``accept_peer`` (the dynamic overlay) the set of peers changes: an
        inbound Hello from a node not in the table is taken when ``accept_peer`` says
        so, ``add_peer`` / ``remove_peer`` start and stop links, and ``seeds`` (peer
        addresses of running nodes, ids unknown) are dialed at start until a link is
        up: a seed that answers joins the table as a peer."""
        self.node_id = node_id
        self.accept_peer = accept_peer
        self.seed_addresses = tuple(seeds)
        self.seed_factories: list[PeerClientFactory] = []
        self.reconnect_max_delay = reconnect_max_delay
        self.tls = tls
        self.cluster = cluster
        self.reactor = reactor
        self.clock = clock
        self.events = events
        self.max_frame = max_frame
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.hello_timeout = hello_timeout
        self.max_pending_bytes = max_pending_bytes
        self.max_unidentified = max_unidentified
        self.max_handshakes_per_source = max_handshakes_per_source
        self.close_grace = close_grace
        # A healthy neighbour sends at least a Ping every ping_interval.
        self.silent_after = (
            silent_after if silent_after is not None else SILENT_PINGS * ping_interval
        )
        self.stable_after = stable_after
        self._handshake_log = LogRateLimit(
            clock.seconds, HANDSHAKE_LOG_PER_SECOND, HANDSHAKE_LOG_BURST
        )
        # Added to every frame sent (benchmarks of wide-area latency; 0 in production).
        self.send_delay = send_delay
        self.incarnation = incarnation if incarnation is not None else random.getrandbits(63) + 1
        self.links = {
            peer: Link(peer, address, PeerClientFactory(self, peer, reconnect_max_delay))
            for peer, address in sorted(neighbours.items())
        }
        self.connections: set[PeerProtocol] = set()
        # Connections closed for what the peer did, by reason (see report_failure).
        self.disconnects: dict[str, int] = {}
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock
        # Idle and handshake timeouts judge silence from when the reactor last ran again.
        self.pauses = PauseWatch(clock)
        self._stopping = False
        self._closed_waiters: list[Deferred[None]] = []

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        now = self.clock.seconds()
        for link in self.links.values():
            link.since = now
            self._dial(link.address, link.factory)
        for address in self.seed_addresses:
            factory = PeerClientFactory(self, SEED, self.reconnect_max_delay)
            factory.seed_address = address
            self.seed_factories.append(factory)
            self._dial(address, factory)
        self._pinger.start(self.ping_interval, now=False)
        self.pauses.start()

    def _dial(self, address: str, factory: PeerClientFactory) -> None:
        endpoint = clientFromString(self.reactor, address)
        if self.tls is not None:
            endpoint = self.tls.client_endpoint(endpoint)
        EndpointConnector(endpoint, factory, self.clock, address).connect()

    def add_peer(self, peer: int, address: str) -> None:
        """Keep a link to ``peer``: dial ``address`` (a client endpoint description) now
        and whenever the link is down. A bad address is one log line, nothing more."""
        link = self.links.get(peer)
        if link is not None:
            if link.address or not address:
                return
            link.address = address  # an accepted link this node now wants too
        else:
            factory = PeerClientFactory(self, peer, self.reconnect_max_delay)
            link = self.links[peer] = Link(peer, address, factory, since=self.clock.seconds())
        try:
            self._dial(address, link.factory)
        except Exception as e:  # clientFromString: an unusable description from a record
            link.last_error = f"cannot dial {shorten(address)!r}: {e}"
            self.log.warn("{error}", node=self.node_id, peer=peer, error=link.last_error)

    def remove_peer(self, peer: int, reason: str) -> None:
        """Stop keeping a link to ``peer``: stop dialing, close its connections; the node
        hears ``down`` at once if the link was up."""
        link = self.links.pop(peer, None)
        if link is None:
            return
        self._stop_factory(link.factory)
        was_up = link.proto is not None
        for proto in list(self.connections):
            if peer in (proto.peer, proto.dialed):
                proto.close(reason)
        if was_up:
            self.log.info(
                "link to node {peer} closed: {why}", node=self.node_id, peer=peer, why=reason
            )
            self.events.down(peer)

    @staticmethod
    def _stop_factory(factory: PeerClientFactory) -> None:
        factory.stopTrying()
        connector = factory.connector
        if connector is not None and connector.state == "connecting":
            connector.stopConnecting()

    def stop(self) -> None:
        self._stopping = True
        if self._pinger.running:
            self._pinger.stop()
        self.pauses.stop()
        for factory in self.seed_factories:
            factory.stopTrying()
        for link in self.links.values():
            link.factory.stopTrying()
        for proto in list(self.connections):
            proto.close("node stopping")

    @property
    def running(self) -> bool:
        """Started and not stopped."""
        return bool(self._pinger.running)

    def when_all_closed(self, timeout: float) -> Deferred[None]:
        """Fires once every connection has ended (a closed one sends what it has queued
        first), or after ``timeout`` seconds: what a stopping node waits for."""
        d: Deferred[None] = Deferred()
        if not self.connections:
            d.callback(None)
            return d
        self._closed_waiters.append(d)
        call = self.clock.callLater(timeout, self._release_waiters)

        def done(result: None) -> None:
            if call.active():
                call.cancel()

        d.addCallback(done)
        return d

    def _release_waiters(self) -> None:
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def server_factory(self) -> IProtocolFactory:
        """What the peer port listens with: TLS around ``PeerServerFactory`` when on."""
        factory = PeerServerFactory(self)
        return self.tls.server_factory(factory) if self.tls is not None else factory

    @property
    def unidentified_inbound(self) -> int:
        return sum(1 for p in self.connections if not p.established and not p.outbound)

    def handshake_slot_problem(self, source: str) -> str | None:
        """Why a new inbound connection from ``source`` cannot have a handshake slot."""
        if self.unidentified_inbound >= self.max_unidentified:
            return f"{self.max_unidentified} handshakes in progress"
        mine = sum(
            1
            for p in self.connections
            if not p.established and not p.outbound and p.source == source
        )
        if mine >= self.max_handshakes_per_source:
            return f"{mine} handshakes in progress from that address"
        return None

    def refused(self, source: str, problem: str) -> None:
        self._warn_handshake(
            "refusing a peer connection from {source}: {problem}", source=source, problem=problem
        )

    def _warn_handshake(self, fmt: str, **fields: object) -> None:
        """A warning about a stranger's connection, within the handshake log rate."""
        dropped = self._handshake_log.allow()
        if dropped is None:
            return
        if dropped:
            fmt += " ({dropped} similar lines left out)"
        self.log.warn(fmt, node=self.node_id, dropped=dropped, **fields)

    def hello(self) -> codec.Hello:
        return codec.Hello(codec.PROTOCOL_VERSION, self.cluster, self.node_id, self.incarnation)

    # -- from PeerProtocol -------------------------------------------------

    def connection_made(self, proto: PeerProtocol) -> None:
        self.connections.add(proto)

    def report_failure(self, proto: PeerProtocol, reason: str, kind: str | None = None) -> None:
        """Log why ``proto`` is being closed (strangers' failures within a rate) and
        count ``kind``."""
        if kind is not None:
            self.disconnects[kind] = self.disconnects.get(kind, 0) + 1
        if proto.established:
            self.log.warn(
                "closing link to {who}: {reason}",
                node=self.node_id,
                peer=proto.peer,
                who=proto.describe(),
                reason=reason,
            )
        else:
            self._warn_handshake(
                "closing link to {who}: {reason}",
                peer=proto.peer,
                who=proto.describe(),
                reason=reason,
            )

    def handshake_frame(self, proto: PeerProtocol, frame: codec.AnyFrame) -> None:
        if isinstance(frame, codec.Reject) and proto.outbound:
            reason = f"node {proto.dialed} rejected our handshake: {shorten(frame.reason)}"
            dialed = self.links.get(proto.dialed) if proto.dialed is not None else None
            if dialed is not None:
                dialed.last_error = reason
            proto.fail(reason)
            return
        if not isinstance(frame, codec.Hello):
            proto.fail(f"expected Hello, got {type(frame).__name__}", kind=BAD_FRAME)
            return
        problem = self._check_hello(proto, frame)
        if problem:
            if not proto.outbound:
                proto.send_frame(codec.Reject(self._reject_reason(frame)))
            proto.fail(f"handshake refused: {problem}", kind=HANDSHAKE_REFUSED)
            return
        if not proto.outbound:
            proto.send_frame(self.hello())
        self._establish(proto, frame)

    def frame_received(self, proto: PeerProtocol, frame: PeerFrame, size: int) -> None:
        peer = proto.peer
        link = self.links.get(peer) if peer is not None else None
        if link is not None and link.state == UP and not self._stopping:
            self.events.frame(link.peer, frame, size)

    def write_state(self, proto: PeerProtocol) -> None:
        peer = proto.peer
        link = self.links.get(peer) if peer is not None else None
        if link is not None and link.proto is proto:
            self.events.congested(link.peer, proto.write_paused)

    def connection_lost(self, proto: PeerProtocol, reason: Failure) -> None:
        self.connections.discard(proto)
        if not self.connections and self._closed_waiters:
            self._release_waiters()
        peer = proto.peer
        if peer is None:
            self._handshake_lost(proto, reason)
            return
        link = self.links.get(peer)
        if link is None or link.proto is not proto:
            return  # a link removed meanwhile (remove_peer told the node already)
        link.proto = None
        link.state = DOWN
        now = self.clock.seconds()
        link.since = now
        link.last_error = proto.closing_reason or reason.getErrorMessage()
        link.times_down += 1
        link.recent_downs.append(now)
        self.log.info(
            "link to node {peer} down: {why}", node=self.node_id, peer=peer, why=link.last_error
        )
        self.events.down(peer)
        if self._stopping:
            return
        stable = now - proto.established_at >= self.stable_after
        if not link.address:
            return  # a link another node chose: this side never dials it
        if not proto.outbound:
            link.factory.resume(reset_backoff=stable)
        elif stable:
            link.factory.resetDelay()  # before the factory's retry, which comes next

    def _handshake_lost(self, proto: PeerProtocol, reason: Failure) -> None:
        """A connection that never said who it is ended: if its TLS handshake failed,
        one line (within the handshake log rate) says why."""
        if self.tls is None or proto.closing_reason is not None:
            return  # plain TCP, or closed by us for a reason already logged
        problem = handshake_problem(proto.transport, reason)
        if problem is None:
            return
        dialed = self.links.get(proto.dialed) if proto.dialed is not None else None
        if dialed is not None:
            dialed.last_error = f"TLS handshake failed: {problem}"
        self._warn_handshake(
            "TLS handshake with {who} failed: {problem}", who=proto.describe(), problem=problem
        )

    def dial_failed(self, peer: int, reason: Failure) -> None:
        if peer == SEED and not self._stopping:
            self._warn_handshake(
                "cannot reach a seed to join through: {error}", error=reason.getErrorMessage()
            )
            return
        link = self.links.get(peer)
        if link is None or link.state == UP or self._stopping:
            return  # we stopped this dial ourselves: the link is up through the neighbour's
        link.last_error = f"dial {link.address} failed: {reason.getErrorMessage()}"
        self.log.debug("{error}", node=self.node_id, peer=peer, error=link.last_error)

    # -- used by the node --------------------------------------------------

    def send(self, peer: int, data: bytes) -> bool:
        if not self.is_up(peer):
            return False
        proto = self.links[peer].proto
        assert proto is not None
        proto.send_bytes(data)
        return True

    def is_up(self, peer: int) -> bool:
        """Whether the link to ``peer`` takes frames: up, and not being closed."""
        link = self.links.get(peer)
        return link is not None and link.proto is not None and link.proto.closing_reason is None

    def when_writable(self, peer: int) -> Deferred[None] | None:
        """None if the link to ``peer`` can take more now; else a Deferred for when it can."""
        link = self.links.get(peer)
        if link is None or link.proto is None or not link.proto.write_paused:
            return None
        return link.proto.when_writable()

    def drop(self, peer: int, reason: str, kind: str | None = None) -> None:
        link = self.links.get(peer)
        if link is not None and link.proto is not None and link.proto.closing_reason is None:
            link.proto.fail(reason, kind=kind)

    def status(self) -> list[LinkStatus]:
        return [
            LinkStatus(
                link.peer,
                link.address or ACCEPTED_ONLY,
                link.state,
                link.since,
                link.times_up,
                link.last_error,
                link.times_down,
                tuple(link.recent_downs),
            )
            for link in self.links.values()
        ]

    # -- internals ---------------------------------------------------------

    def _reject_reason(self, hello: codec.Hello) -> str:
        """What a refused peer is told: the version we speak (nothing about this
        cluster), or nothing at all."""
        if hello.protocol_version != codec.PROTOCOL_VERSION:
            return (
                f"protocol version {hello.protocol_version} is not supported"
                f" (this node speaks {codec.PROTOCOL_VERSION})"
            )
        return REFUSED

    def _check_hello(self, proto: PeerProtocol, hello: codec.Hello) -> str | None:
        """What is wrong with ``hello``, for our log (the peer sees ``_reject_reason``)."""
        if hello.protocol_version != codec.PROTOCOL_VERSION:
            return (
                f"protocol version {hello.protocol_version} is not supported"
                f" (node {self.node_id} speaks {codec.PROTOCOL_VERSION})"
            )
        if self.tls is not None:
            certified, why = peer_identity(proto.transport)
            if certified is None:
                return f"no node identity: {why}"
            if certified != hello.node_id:
                return (
                    f"its certificate is node {certified}'s but its Hello claims"
                    f" node {hello.node_id}"
                )
        if hello.cluster != self.cluster:
            return f"cluster {shorten(hello.cluster)!r} is not this node's cluster {self.cluster!r}"
        if hello.node_id == self.node_id:
            return f"node {self.node_id} reached itself"
        if proto.outbound and proto.dialed != SEED and hello.node_id != proto.dialed:
            return f"dialed node {proto.dialed} but node {hello.node_id} answered"
        if hello.node_id not in self.links and not (
            proto.dialed == SEED
            or (self.accept_peer is not None and self.accept_peer(hello.node_id))
        ):
            return f"node {hello.node_id} is not a neighbour of node {self.node_id}"
        if hello.incarnation == 0:
            return "incarnation 0 is not allowed"
        return None

    def _establish(self, proto: PeerProtocol, hello: codec.Hello) -> None:
        peer = hello.node_id
        if proto.dialed == SEED:
            self._seed_answered(proto, peer)
        link = self.links.get(peer)
        if link is None:
            # A node the overlay accepts (it chose this node, or is joining): kept
            # while up, never dialed by this side.
            factory = PeerClientFactory(self, peer, self.reconnect_max_delay)
            factory.stopTrying()
            link = self.links[peer] = Link(peer, "", factory)
        proto.peer = peer
        proto.incarnation = hello.incarnation
        proto.established = True
        now = self.clock.seconds()
        proto.established_at = now
        proto.setTimeout(self.idle_timeout)
        current = link.proto
        if current is None:
            self._make_current(link, proto)
            self.events.up(peer)
            return
        silent = now - current.last_heard
        if current.incarnation != hello.incarnation or silent > self.silent_after:
            # The peer restarted, or it dropped the old connection already (it
            # would not have dialed or answered again otherwise, and a live link
            # hears a Ping every ping_interval); this side has not noticed yet.
            link.proto = None
            current.close(
                "replaced: the peer restarted"
                if current.incarnation != hello.incarnation
                else f"replaced: nothing heard on it for {silent:.1f} s",
                abort=True,
            )
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
        if self.node_id < peer:
            loser.close("duplicate connection")
        else:
            # The lower id may still be using it while its own dial's handshake is on
            # the way: our close could reach it first and take its link down and up.
            # It closes the duplicate when it switches; if it never does, we do.
            self.clock.callLater(self.handshake_timeout, self._close_duplicate, loser)

    def _close_duplicate(self, proto: PeerProtocol) -> None:
        link = self.links.get(proto.peer) if proto.peer is not None else None
        if proto in self.connections and (link is None or link.proto is not proto):
            proto.close("duplicate connection")

    def _seed_answered(self, proto: PeerProtocol, peer: int) -> None:
        """A seed answered as node ``peer``: the other seeds are not needed any more;
        this seed's dialer becomes the link's (unless the table has one already)."""
        factory = proto.factory
        assert isinstance(factory, PeerClientFactory)
        for other in self.seed_factories:
            if other is not factory:
                self._stop_factory(other)
        self.seed_factories = []
        proto.dialed = peer
        if peer in self.links:
            factory.stopTrying()
            return
        factory.peer = peer
        self.links[peer] = Link(peer, factory.seed_address, factory, since=self.clock.seconds())

    def _make_current(self, link: Link, proto: PeerProtocol) -> None:
        if self.seed_factories:
            # The node is in the cluster: the records it gets name every other node.
            for factory in self.seed_factories:
                self._stop_factory(factory)
            self.seed_factories = []
        link.proto = proto
        link.state = UP
        link.since = self.clock.seconds()
        link.incarnation = proto.incarnation
        link.times_up += 1
        link.last_error = ""
        self._set_dialing(link, proto)
        self.log.info(
            "link to node {peer} up ({direction})",
            node=self.node_id,
            peer=link.peer,
            direction="outbound" if proto.outbound else "inbound",
        )

    def _set_dialing(self, link: Link, proto: PeerProtocol) -> None:
        # An outbound link keeps its factory's backoff until it proves stable
        # (connection_lost resets it then): a link closed at once must not make
        # the next dial come sooner.
        if proto.outbound:
            link.factory.continueTrying = True  # it may have been paused meanwhile
        else:
            link.factory.pause()

    def _ping(self) -> None:
        for link in self.links.values():
            if link.proto is not None:
                link.proto.send_frame(codec.Ping())
