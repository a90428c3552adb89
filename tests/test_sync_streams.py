"""Answering re-sync wants (gossip.sync_streams): one stream per peer at a time, the
others queued in order, a bound on the queue, and nothing left over after a link drop.

The link table is a fake that records what is sent and can be made "full"; the
cooperator runs on a ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, Cooperator

from gossip.core.effects import StreamMessages
from gossip.core.frames import SyncDataFrame
from gossip.core.message import Message, message_id
from gossip.core.sync import ROOT, stream_frames
from gossip.store.memory import MemoryStore
from gossip.sync_streams import MAX_QUEUED_WANTS, SyncStreams
from gossip.traffic import Traffic
from gossip.wire import codec

PEER = 2


class FakeLinks:
    """What SyncStreams uses of a LinkTable: sends are recorded, ``full`` holds writers."""

    def __init__(self) -> None:
        self.up = {PEER}
        self.sent: list[tuple[int, SyncDataFrame]] = []
        self.drops: list[tuple[int, str]] = []
        self.full = False
        self.waiting: list[Deferred[None]] = []

    def is_up(self, peer: int) -> bool:
        return peer in self.up

    def send(self, peer: int, data: bytes) -> bool:
        frame = codec.decode(data)
        assert isinstance(frame, SyncDataFrame)
        self.sent.append((peer, frame))
        return True

    def when_writable(self, peer: int) -> Deferred[None] | None:
        if not self.full:
            return None
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d

    def drain(self) -> None:
        self.full = False
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def drop(self, peer: int, reason: str, kind: str | None = None) -> None:
        self.drops.append((peer, reason))


def setup(messages: int = 3000) -> tuple[SyncStreams, FakeLinks, Clock, list[bytes]]:
    store = MemoryStore()
    mids = []
    for i in range(messages):
        body = f"message {i:06d} ".encode() * 8
        mid = message_id(body)
        store.add(Message(mid, body, 0.0, ()))
        mids.append(mid)
    clock = Clock()
    links = FakeLinks()
    streams = SyncStreams(
        lambda order: stream_frames(store, 1, order, frozenset({1, PEER})),
        links,  # type: ignore[arg-type]
        Traffic(),
        Cooperator(scheduler=lambda f: clock.callLater(0, f)),
    )
    return streams, links, clock, mids


def run(clock: Clock, turns: int = 2000) -> None:
    for _ in range(turns):
        if not clock.getDelayedCalls():
            return
        clock.advance(0)


def test_wants_of_one_peer_are_answered_one_at_a_time_in_order() -> None:
    """Three wants ordered at once are streamed one after the other, in the order they
    came: no frame of a later want comes before the done frame of the one before it, and
    every want's messages are sent exactly once."""
    streams, links, clock, mids = setup()
    chunks = [tuple(mids[i : i + 1000]) for i in range(0, 3000, 1000)]
    for session, ids in enumerate(chunks, start=1):
        streams.order(StreamMessages(PEER, session, ids, ()))
    assert streams.queued(PEER) == 3
    run(clock)
    sessions = [f.session for _, f in links.sent]
    assert sessions == sorted(sessions)
    assert [f.session for _, f in links.sent if f.done] == [1, 2, 3]
    for session, ids in enumerate(chunks, start=1):
        frames = [f for _, f in links.sent if f.session == session]
        got = [message_id(e.body) for f in frames for e in f.messages]
        assert got == list(ids)
    assert links.drops == []
    assert streams.queued(PEER) == 0


def test_an_honest_burst_is_queued_and_a_far_excess_drops_the_peer_once() -> None:
    """MAX_QUEUED_WANTS wants ordered at once are all kept (none refused, the link kept);
    the next one drops the peer once, and later ones are ignored rather than queued."""
    streams, links, clock, _ = setup(10)
    for n in range(MAX_QUEUED_WANTS):
        streams.order(StreamMessages(PEER, n, (), (ROOT,)))
    assert links.drops == []
    assert streams.queued(PEER) == MAX_QUEUED_WANTS
    for n in range(3):
        streams.order(StreamMessages(PEER, 100 + n, (), (ROOT,)))
    assert len(links.drops) == 1
    assert links.drops[0][0] == PEER
    assert "re-sync requests" in links.drops[0][1]
    run(clock)
    assert not any(f.session >= 100 for _, f in links.sent)


def test_link_drop_stops_the_stream_and_forgets_the_queue() -> None:
    """While a stream waits on a full link, the link drops: the stream sends nothing more
    once the link drains, the queued wants are never answered, and a want on the next
    link is answered from scratch."""
    streams, links, clock, mids = setup()
    links.full = True
    streams.order(StreamMessages(PEER, 1, tuple(mids), ()))
    streams.order(StreamMessages(PEER, 2, tuple(mids), ()))
    run(clock)
    assert len(links.sent) == 1  # the first frame, then it waits for the link
    links.up.discard(PEER)
    streams.peer_down(PEER)
    assert streams.queued(PEER) == 0
    links.drain()
    run(clock)
    assert len(links.sent) == 1
    links.up.add(PEER)
    streams.order(StreamMessages(PEER, 3, tuple(mids[:5]), ()))
    run(clock)
    assert [(f.session, len(f.messages), f.done) for _, f in links.sent[1:]] == [(3, 5, True)]


def test_a_failing_stream_is_logged_and_the_next_want_still_answered(
    monkeypatch: Any,
) -> None:
    """A want whose stream raises (a store read error) does not stall the peer's queue:
    the next want is answered."""
    streams, links, clock, mids = setup(10)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("read error")
        yield  # pragma: no cover

    real = streams._stream
    calls = []

    def first_breaks(queue: Any, order: StreamMessages) -> Any:
        calls.append(order.session)
        return broken() if order.session == 1 else real(queue, order)

    monkeypatch.setattr(streams, "_stream", first_breaks)
    streams.order(StreamMessages(PEER, 1, tuple(mids), ()))
    streams.order(StreamMessages(PEER, 2, tuple(mids), ()))
    run(clock)
    assert calls == [1, 2]
    assert [(f.session, f.done) for _, f in links.sent] == [(2, True)]
    assert streams.queued(PEER) == 0
