"""Answering re-sync wants: one stream per peer at a time, the rest queued in order.

A ``SyncWant`` is answered by a stream of ``SyncData`` frames (``StreamMessages``
from the core, ``stream_frames`` for the frames), paced by the link: a frame is
sent only once the link can take it. The initiator of a session keeps at most
``gossip.core.sync.WANT_WINDOW`` wants in flight, so an honest peer has at most
that many queued here, plus the wants of sessions it gave up on (a timeout with
the link up) whose answers are still waiting. The queue holds up to
``MAX_QUEUED_WANTS`` orders per peer; only a peer past that (broken or hostile)
is disconnected. A link drop ends the peer's stream and empties its queue: the
peer's next session asks again for whatever it still lacks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure

from gossip import logs
from gossip.core.effects import BAD_SYNC_REQUEST, StreamMessages
from gossip.core.frames import SyncDataFrame
from gossip.net.links import LinkTable
from gossip.traffic import Traffic
from gossip.wire import codec

# Wants queued for one peer (the one being answered included). An honest initiator
# has at most WANT_WINDOW (4) in flight per session; each queued want holds at most
# MAX_IDS_PER_WANT ids (256 KiB), so a full queue is at most 8 MiB.
MAX_QUEUED_WANTS = 32


@attrs.define(eq=False)
class _PeerQueue:
    """One peer's wants: ``orders`` wait behind the one being streamed (if ``busy``)."""

    orders: deque[StreamMessages] = attrs.field(factory=deque)
    busy: bool = False
    refused: bool = False  # over the bound: the link is being dropped, ignore the rest


class SyncStreams:
    log = logs.logger()

    def __init__(
        self,
        frames: Callable[[StreamMessages], Iterator[SyncDataFrame]],
        links: LinkTable,
        traffic: Traffic,
        cooperator: Cooperator,
    ) -> None:
        """``frames`` gives the SyncData frames answering one want, lazily
        (``gossip.core.sync.stream_frames`` over the node's store)."""
        self.frames = frames
        self.links = links
        self.traffic = traffic
        self.cooperator = cooperator
        self._queues: dict[int, _PeerQueue] = {}

    def order(self, order: StreamMessages) -> None:
        """Answer one want: now if nothing is being sent to the peer, else after the others."""
        peer = order.peer
        queue = self._queues.get(peer)
        if queue is None:
            queue = self._queues[peer] = _PeerQueue()
        if queue.refused:
            return
        if len(queue.orders) + queue.busy >= MAX_QUEUED_WANTS:
            queue.refused = True
            queue.orders.clear()
            self.links.drop(
                peer, f"over {MAX_QUEUED_WANTS} re-sync requests queued", BAD_SYNC_REQUEST
            )
            return
        queue.orders.append(order)
        if not queue.busy:
            self._next(peer, queue)

    def peer_down(self, peer: int) -> None:
        """The link is gone: forget its queue (the stream in progress stops at its next frame)."""
        self._queues.pop(peer, None)

    def queued(self, peer: int) -> int:
        """Wants of ``peer`` not yet fully answered (the one being answered included)."""
        queue = self._queues.get(peer)
        return 0 if queue is None else len(queue.orders) + queue.busy

    def _next(self, peer: int, queue: _PeerQueue) -> None:
        if self._queues.get(peer) is not queue or not queue.orders:
            queue.busy = False
            if self._queues.get(peer) is queue:
                del self._queues[peer]
            return
        queue.busy = True
        order = queue.orders.popleft()
        done = self.cooperator.cooperate(self._stream(queue, order)).whenDone()
        done.addBoth(self._ended, peer, queue)

    def _ended(self, result: object, peer: int, queue: _PeerQueue) -> None:
        if isinstance(result, Failure):
            self.log.failure("re-sync answer to node {peer} failed", result, peer=peer)
        self._next(peer, queue)

    def _stream(self, queue: _PeerQueue, order: StreamMessages) -> Iterator[Deferred[None] | None]:
        """Send one want's messages frame by frame, waiting whenever the link is full."""
        peer = order.peer
        for frame in self.frames(order):
            if self._queues.get(peer) is not queue or not self.links.is_up(peer):
                return
            data = codec.encode(frame)
            self.links.send(peer, data)
            self.traffic.sent(peer, frame, len(data))
            yield self.links.when_writable(peer)
