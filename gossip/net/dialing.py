"""An ``IConnector`` that dials a client endpoint, so ``ReconnectingClientFactory`` can use one.

Why this exists: neighbour links keep ``ReconnectingClientFactory`` (its
jittered, capped backoff and ``resetDelay()`` after a good handshake are the
design card's), and that factory needs an ``IConnector``: it calls
``connector.connect()`` to redial and ``stopConnecting()`` to give up, and
learns of every outcome through ``startedConnecting`` /
``clientConnectionFailed`` / ``clientConnectionLost``. Only ``connectTCP`` and
friends make connectors, and they take a host and a port, not an endpoint.
Twisted's endpoint API is one-shot: ``endpoint.connect(factory)`` returns a
Deferred, and its ``_WrappingFactory`` / ``connectProtocol`` report neither a
lost connection nor anything a connector would. (``ClientService`` is
Twisted's endpoint-based reconnector, with its own retry policy and no
connector; the design card asks for the factory.) So ``EndpointConnector``
plays the connector's part over any endpoint a description names (TCP, IPv6,
host names resolved at each dial, TLS, UNIX sockets), with the same calls in the
same order as ``twisted.internet.base.BaseConnector``.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

DIAL_TIMEOUT = 5.0  # seconds a dial may take before it counts as failed and is retried


@implementer(IAddress)
@attrs.frozen
class EndpointAddress:
    """Where a connector dials: the endpoint description (the resolved peer is the
    transport's ``getPeer()`` once connected)."""

    description: str

    def __str__(self) -> str:
        return self.description


class _Reporting(Protocol):
    """Passes a connection through to the factory's protocol and tells the connector
    when it ends (the endpoint's own wrapper reports nothing after connecting)."""

    def __init__(self, connector: EndpointConnector, wrapped: IProtocol) -> None:
        self.connector = connector
        self.wrapped = wrapped

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = True
        self.wrapped.makeConnection(transport)  # the real transport: no extra layer on writes

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self.connected = False
        self.wrapped.connectionLost(reason)
        self.connector._lost(reason)


class _DialFactory(Factory):
    """What the endpoint is given: builds the real factory's protocol inside ``_Reporting``."""

    noisy = False

    def __init__(self, connector: EndpointConnector) -> None:
        self.connector = connector

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self.connector._build(addr)


@implementer(IConnector)
class EndpointConnector:
    """Dials ``endpoint`` for ``factory`` (a ``ReconnectingClientFactory``) whenever
    ``connect()`` is called; states and callbacks as Twisted's TCP connector has them:
    "disconnected" -> "connecting" -> "connected" -> "disconnected"."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        factory: ClientFactory,
        clock: IReactorTime,
        description: str,
        timeout: float = DIAL_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.clock = clock
        self.description = description
        self.timeout = timeout
        self.state = "disconnected"
        self.factory_started = False
        self._attempt: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._proto: _Reporting | None = None

    # -- IConnector ----------------------------------------------------------

    def connect(self) -> None:
        if self.state != "disconnected":
            raise RuntimeError(f"cannot connect while {self.state}")
        self.state = "connecting"
        if not self.factory_started:
            self.factory.doStart()
            self.factory_started = True
        self._timed_out = False
        self._timer = self.clock.callLater(self.timeout, self._time_out)
        self.factory.startedConnecting(self)
        attempt = maybeDeferred(self.endpoint.connect, _DialFactory(self))
        if self.state == "connecting" and self._proto is None:
            self._attempt = attempt
        attempt.addErrback(self._failed)

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise error.NotConnectingError("we're not trying to connect")
        self._abandon()

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()
        elif self.state == "connected" and self._proto is not None:
            transport = self._proto.transport
            if transport is not None:
                transport.loseConnection()

    def getDestination(self) -> EndpointAddress:
        return EndpointAddress(self.description)

    # -- from the endpoint and the connection ----------------------------------

    def _build(self, addr: IAddress | None) -> Protocol | None:
        self._cancel_timer()
        self._attempt = None
        inner = self.factory.buildProtocol(addr)
        if inner is None:
            return None
        self.state = "connected"
        self._proto = _Reporting(self, inner)
        return self._proto

    def _failed(self, reason: Failure) -> None:
        if self.state != "connecting":
            return  # connected after all (the endpoint reports later), or abandoned twice
        self._cancel_timer()
        self._attempt = None
        self.state = "disconnected"
        if self._timed_out:
            reason = Failure(error.TimeoutError(string=f"no connection within {self.timeout:g} s"))
        elif reason.check(error.ConnectingCancelledError):
            reason = Failure(error.UserError(string="dial stopped"))
        self.factory.clientConnectionFailed(self, reason)
        self._maybe_stop_factory()

    def _lost(self, reason: Failure) -> None:
        self._proto = None
        self.state = "disconnected"
        self.factory.clientConnectionLost(self, reason)
        self._maybe_stop_factory()

    # -- internals ---------------------------------------------------------------

    def _time_out(self) -> None:
        self._timer = None
        self._timed_out = True
        self._abandon()

    def _abandon(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()  # errbacks now: _failed reports it
        if self.state == "connecting":  # an endpoint whose Deferred ignored the cancel
            self._failed(Failure(error.ConnectingCancelledError(self.getDestination())))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _maybe_stop_factory(self) -> None:
        if self.state == "disconnected" and self.factory_started:
            self.factory.doStop()
            self.factory_started = False
