"""One TCP connection to a neighbour: framing, handshake, keep-alive, send bound.

Thin by design: bytes become frames here and go to the ``LinkTable``, which
decides what a connection is for; protocol rules live in ``gossip.core``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gossip.wire import codec

# Why the link layer closed a connection (counters in the node's status, beside the
# core's gossip.core.effects.DISCONNECTS).
BAD_FRAME = "bad_frame"  # undecodable, unknown kind, or a Hello/Reject after the handshake
FRAME_TOO_LONG = "frame_too_long"
NOT_READING = "not_reading"  # over the queued-bytes bound
IDLE = "idle"
HANDSHAKE_TIMEOUT = "handshake_timeout"
HANDSHAKE_REFUSED = "handshake_refused"
LINK_DISCONNECTS = (
    BAD_FRAME,
    FRAME_TOO_LONG,
    NOT_READING,
    IDLE,
    HANDSHAKE_TIMEOUT,
    HANDSHAKE_REFUSED,
)

if TYPE_CHECKING:
    from gossip.net.links import LinkTable


class _TCP(Protocol):
    """What this protocol uses of its transport (TCP, or iosim's fake in tests)."""

    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getPeer(self) -> IAddress: ...


def set_no_delay(transport: object) -> None:
    """Frames are small and latency-bound: without TCP_NODELAY, Nagle's algorithm
    holds a frame while an earlier one is unacknowledged (tens of ms per hop)."""
    no_delay = getattr(transport, "setTcpNoDelay", None)  # in-memory test transports lack it
    if no_delay is not None:
        no_delay(True)


@implementer(IPushProducer)
class _WriteGate:
    """Tells its protocol when the transport's write buffer is full or drained.

    It only gates what we write: reading goes on, so a peer's frames (pings
    included) are handled while our writes to it wait.
    """

    def __init__(self, proto: PeerProtocol) -> None:
        self.proto = proto

    def pauseProducing(self) -> None:
        self.proto.write_paused = True
        self.proto.table.write_state(self.proto)

    def resumeProducing(self) -> None:
        self.proto.write_paused = False
        self.proto.flush_pending()
        self.proto.wake_writers()
        self.proto.table.write_state(self.proto)

    def stopProducing(self) -> None:
        self.proto.write_paused = True


class PeerProtocol(Int32StringReceiver, TimeoutMixin):
    """No attribute here reuses a name the base classes give a meaning: Twisted's
    ``IntNStringReceiver`` reads ``paused`` as "stop delivering frames", which is
    why our write backpressure flag is ``write_paused``."""

    def __init__(self, table: LinkTable, dialed: int | None, source: str | None = None) -> None:
        self.table = table
        # The neighbour this side dialed; None for an inbound connection.
        self.dialed = dialed
        # The address an inbound connection came from (per-source handshake limit).
        self.source = source
        self.MAX_LENGTH = table.max_frame
        self.peer: int | None = None
        self.incarnation = 0
        self.established = False
        self.established_at = 0.0
        self.last_heard = 0.0  # when the last complete frame arrived (or the connection)
        self.write_paused = False
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self.closing_reason: str | None = None
        self._failed = False
        self._writable: list[Deferred[None]] = []
        self._delayed: deque[tuple[float, bytes]] = deque()
        self._delay_call: IDelayedCall | None = None
        self._gate: _WriteGate | None = None
        self._close_call: IDelayedCall | None = None

    @property
    def outbound(self) -> bool:
        return self.dialed is not None

    @property
    def tcp(self) -> _TCP:
        return cast(_TCP, self.transport)

    def describe(self) -> str:
        p = self.tcp.getPeer() if self.transport else None
        addr = f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"
        who = f"node {self.peer}" if self.peer is not None else "unidentified peer"
        return f"{who} ({'outbound' if self.outbound else 'inbound'} {addr})"

    def connectionMade(self) -> None:
        self.last_heard = self.table.clock.seconds()
        self.table.connection_made(self)
        set_no_delay(self.transport)
        self._gate = _WriteGate(self)
        self.tcp.registerProducer(self._gate, True)
        # An inbound connection holds a shared handshake slot: its Hello must arrive
        # whole within hello_timeout; partial data does not extend that.
        self.setTimeout(self.table.handshake_timeout if self.outbound else self.table.hello_timeout)
        if self.outbound:
            self.send_frame(self.table.hello())

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's default schedules on the global reactor; use the table's clock.
        return self.table.clock.callLater(period, func)

    def stringReceived(self, data: bytes) -> None:
        if self._failed:
            return  # the rest of a read that ended with a fatal frame
        self.last_heard = self.table.clock.seconds()
        self.resetTimeout()
        try:
            frame = codec.decode(data)
        except codec.BadFrame as e:
            self.fail(str(e), kind=BAD_FRAME)
            return
        if not self.established:
            self.table.handshake_frame(self, frame)
            return
        if isinstance(frame, codec.Ping):
            return
        if isinstance(frame, codec.Hello | codec.Reject):
            self.fail(f"unexpected {type(frame).__name__} after the handshake", kind=BAD_FRAME)
            return
        self.table.frame_received(self, frame, len(data))

    def lengthLimitExceeded(self, length: int) -> None:
        self.fail(
            f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH}", kind=FRAME_TOO_LONG
        )

    def timeoutConnection(self) -> None:
        period = self.timeOut or 0.0
        since = self.table.pauses.running_since(self.last_heard)
        if since > self.last_heard and self.table.clock.seconds() - since < period:
            # The reactor stood still (SIGSTOP, say) since the last frame and may not
            # have read what waits in the socket yet: judge silence from when it resumed.
            self.setTimeout(period)
            return
        what = "link idle" if self.established else "handshake not finished"
        self.fail(
            f"{what} for {self.timeOut} s",
            abort=True,
            kind=IDLE if self.established else HANDSHAKE_TIMEOUT,
        )

    def fail(self, reason: str, abort: bool = False, kind: str | None = None) -> None:
        """Close this connection because of what the peer did; the node carries on.
        ``kind`` is the reason's counter in the node's status (None: not counted)."""
        self._failed = True
        if self.closing_reason is None:
            self.table.report_failure(self, reason, kind)
        self.close(reason, abort)

    def close(self, reason: str, abort: bool = False) -> None:
        """Close this connection, sending what is queued first unless ``abort``.

        The close always completes: the write gate is unregistered first (a TCP
        transport with a paused producer would wait for it forever instead of
        closing once drained), and a peer that does not read what is left gets
        ``close_grace`` seconds before the connection is aborted.
        """
        if self.closing_reason is None:
            self.closing_reason = reason
        self.setTimeout(None)
        if self._gate is not None:
            self._gate = None
            self.tcp.unregisterProducer()
        if abort:
            self.tcp.abortConnection()
        elif self._close_call is None:
            self.tcp.loseConnection()
            self._close_call = self.callLater(self.table.close_grace, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_call = None
        self.tcp.abortConnection()

    def send_frame(self, frame: codec.AnyFrame) -> None:
        self.send_bytes(codec.encode(frame))

    def send_bytes(self, data: bytes) -> None:
        if self.closing_reason is not None:
            return
        if self.table.send_delay > 0:
            self._delay(data)
            return
        self._write(data)

    def _delay(self, data: bytes) -> None:
        """Hold a frame for ``send_delay`` seconds, keeping frames in order."""
        self._delayed.append((self.table.clock.seconds() + self.table.send_delay, data))
        if self._delay_call is None:
            self._delay_call = self.callLater(self.table.send_delay, self._release)

    def _release(self) -> None:
        self._delay_call = None
        now = self.table.clock.seconds()
        while self._delayed and self._delayed[0][0] <= now:
            self._write(self._delayed.popleft()[1])
        if self._delayed and self.closing_reason is None:
            self._delay_call = self.callLater(self._delayed[0][0] - now, self._release)

    def _write(self, data: bytes) -> None:
        if self.closing_reason is not None:
            return
        if not self.write_paused:
            self.sendString(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self.table.max_pending_bytes:
            self._pending.clear()
            self._pending_bytes = 0
            self.fail(
                f"peer is not reading: over {self.table.max_pending_bytes} bytes queued",
                abort=True,
                kind=NOT_READING,
            )

    @property
    def pending_bytes(self) -> int:
        """Bytes held back while the transport is full (bounded by max_pending_bytes)."""
        return self._pending_bytes

    def when_writable(self) -> Deferred[None]:
        """Fires when the transport drains (or the connection ends)."""
        d: Deferred[None] = Deferred()
        self._writable.append(d)
        return d

    def wake_writers(self) -> None:
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)

    def flush_pending(self) -> None:
        while self._pending and not self.write_paused:
            data = self._pending.popleft()
            self._pending_bytes -= len(data)
            self.sendString(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.setTimeout(None)
        self._pending.clear()
        self._delayed.clear()
        if self._delay_call is not None and self._delay_call.active():
            self._delay_call.cancel()
        self._delay_call = None
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        self.write_paused = True
        self.table.connection_lost(self, reason)
        self.wake_writers()
