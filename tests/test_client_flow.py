"""The client port under abuse: idle and excess connections, clients that never read,
pipelined floods, malformed requests, and a neighbour's link that is full.

Like ``test_client_protocol``, a real ``GossipNode`` on a ``MemoryReactorClock`` that
is never started. Most connections here are a ``ClientProtocol`` on a transport that
behaves as TCP's does for flow control (it pauses its producer when its send buffer
holds more than ``bufferSize``), fed raw AMP boxes, so that pipelining and not
reading are exact.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_client_protocol import Harness, SlowDurabilityStore, record_batch_sizes
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from gossip.client.commands import PAGE_BYTES, Get, ListMessages, Status
from gossip.client.responder import ClientLimits, ClientProtocol
from gossip.core.message import id_text, message_id

GCLIENT = "import sys; from gossip.client.cli import main; sys.exit(main())"
TCP_BUFFER = 65536  # Twisted's FileDescriptor.bufferSize
# The documented defaults (each test also checks the code has them).
IDLE_TIMEOUT = 120.0
PER_SOURCE = 64
OUTSTANDING = 64
LOG_INTERVAL = 10.0
STALL_SECONDS = 30.0


class TcpLikeTransport(StringTransport):
    """A StringTransport whose registered streaming producer is paused, as TCP's is,
    on every write while more than ``bufferSize`` bytes are unsent; ``drain()`` takes
    the bytes (the client read them) and resumes the producer, as TCP does once its
    buffer is empty."""

    bufferSize = TCP_BUFFER

    def __init__(self, host: str = "192.0.2.7") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000), lenient=True)
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.bufferSize:
            self.producer_paused = True
            self.producer.pauseProducing()

    def fill(self) -> None:
        """As if the client stopped reading and the buffer filled up."""
        self.producer_paused = True
        self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class Conn:
    """One raw client connection to the harness's node."""

    def __init__(
        self, h: Harness, host: str = "192.0.2.7", limits: ClientLimits | None = None
    ) -> None:
        self.h = h
        self.transport = TcpLikeTransport(host)
        self.proto = ClientProtocol(h.node) if limits is None else ClientProtocol(h.node, limits)
        self.proto.makeConnection(self.transport)

    def send(self, *boxes: amp.AmpBox) -> None:
        self.proto.dataReceived(b"".join(b.serialize() for b in boxes))

    def take(self) -> list[amp.AmpBox]:
        """The boxes the node wrote since the last take (the client reads them)."""
        return list(amp.parseString(self.transport.drain()))

    @property
    def reading(self) -> bool:
        return self.transport.producerState == "producing"

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def request(command: bytes, tag: int, **arguments: bytes) -> amp.AmpBox:
    box = amp.AmpBox(_command=command, _ask=b"%d" % tag)
    for k, v in arguments.items():
        box[k.encode()] = v
    return box


def answered_tags(boxes: list[amp.AmpBox]) -> list[int]:
    return [int(b[b"_answer"]) for b in boxes if b"_answer" in b]


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def slow_store(h: Harness) -> SlowDurabilityStore:
    store = SlowDurabilityStore()
    h.store = h.node.store = h.node.core.store = store
    return store


# -- 4: idle connections, the connection table, a one-line client error ---------------


def test_an_idle_client_connection_is_closed_but_not_a_watching_one(h: Harness) -> None:
    """A connection with nothing in progress is closed after the idle timeout (each
    request restarts the countdown); a connection with a Watch is never idle."""
    timeout = IDLE_TIMEOUT
    idle, watching = Conn(h), Conn(h)
    watching.send(request(b"Watch", 1, start=b"0"))
    h.reactor.advance(timeout - 1)
    idle.send(request(b"Status", 1))
    assert answered_tags(idle.take()) == [1]
    h.reactor.advance(timeout - 0.5)
    assert not idle.closed
    h.reactor.advance(0.5)
    assert idle.closed
    h.reactor.advance(10 * timeout)
    assert not watching.closed
    assert idle.proto.limits.idle_timeout == IDLE_TIMEOUT


def test_a_request_in_progress_keeps_a_connection_open(h: Harness) -> None:
    """A submit waiting for its record to be durable is not idleness: the countdown
    starts only once the answer went out."""
    store = slow_store(h)
    timeout = IDLE_TIMEOUT
    c = Conn(h)
    c.send(request(b"Submit", 1, body=b"slow"))
    h.reactor.advance(3 * timeout)
    assert not c.closed
    store.make_durable()
    assert answered_tags(c.take()) == [1]
    h.reactor.advance(timeout)
    assert c.closed


def test_connections_per_source_are_capped_and_refusals_logged_at_a_bounded_rate(
    h: Harness, log_events: list[dict[str, Any]]
) -> None:
    """One source address gets at most ``per_source`` (64) connections, fewer than the
    total, so others still get in; refusals are logged at most once per ``log_interval``
    (10 s), the next line counting those not logged; a closed connection frees a place."""
    from gossip.client.responder import ClientFactory

    factory = ClientFactory(h.node)
    per_source = PER_SOURCE
    a = IPv4Address("TCP", "198.51.100.1", 1000)
    held = [factory.buildProtocol(a) for _ in range(per_source)]
    assert all(p is not None for p in held)
    for _ in range(5):
        assert factory.buildProtocol(a) is None
    assert factory.buildProtocol(IPv4Address("TCP", "198.51.100.2", 1000)) is not None
    lines = [e for e in log_events if "refusing a client connection" in e.get("log_format", "")]
    assert len(lines) == 1
    assert lines[0]["source"] == "198.51.100.1" and "per-source limit" in lines[0]["why"]
    h.reactor.advance(LOG_INTERVAL)
    assert factory.buildProtocol(a) is None
    lines = [e for e in log_events if "refusing a client connection" in e.get("log_format", "")]
    assert len(lines) == 2 and "4 more refused" in lines[1]["more"]
    first = held[0]
    assert first is not None
    first.makeConnection(StringTransport())
    first.connectionLost(Failure(ConnectionError()))
    assert factory.buildProtocol(a) is not None
    assert factory.limits.per_source == PER_SOURCE < factory.limits.connections == 1024
    assert factory.limits.log_interval == LOG_INTERVAL


def test_the_api_raises_node_closed_connection_naming_the_node(h: Harness) -> None:
    """A connection the node closes before answering (as it does over its connection
    limits) is NodeClosedConnection, a ConnectionError whose text names the node."""
    from gossip.client.api import GossipClient

    api = GossipClient(h.client, "127.0.0.1:17101")
    api.name = "node 1 at 127.0.0.1:17101"  # as connect_node and gclient name it
    pending = Deferred.fromCoroutine(api.status())
    h.server.transport.loseConnection()  # before the request is even read
    with pytest.raises(ConnectionError) as info:
        h.settle(pending)
    assert type(info.value).__name__ == "NodeClosedConnection"
    assert str(info.value).startswith("node 1 at 127.0.0.1:17101 closed the connection")


def test_gclient_reports_a_closed_connection_in_one_line(tmp_path: Path) -> None:
    """gclient against a node that closes every connection at once (its table is
    full): one line on stderr naming the node and address, exit status 1."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def close_each() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    config = tmp_path / "cluster.toml"
    config.write_text(
        '[cluster]\nname = "t"\nallow_any_degree = true\n[[node]]\nid = 1\n'
        f'host = "127.0.0.1"\npeer_port = {port + 1}\nclient_port = {port}\nneighbours = []\n'
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", GCLIENT, "--id", "1", "--config", str(config), "--status"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        f"gclient: node 1 at tcp:host=127.0.0.1:port={port} closed the connection"
    )


# -- 5: answers are never buffered without bound -------------------------------------


def test_a_client_that_does_not_read_its_answers_is_not_read(h: Harness) -> None:
    """Pipelined ListMessages requests from a client that does not read: the node
    stops parsing and reading once the socket's send buffer is full, so at most that
    buffer and one page are queued; as the client reads, every request is answered,
    once, in order, each step bounded the same way."""
    h.store_bodies([b"%02d " % i + b"x" * 30_000 for i in range(40)])
    c = Conn(h)
    count = 300
    c.send(*(request(b"ListMessages", i, start=b"0", limit=b"2") for i in range(count)))
    bound = TCP_BUFFER + PAGE_BYTES + 1024
    assert len(c.transport.value()) <= bound
    assert not c.reading
    tags: list[int] = []
    for _ in range(count):
        queued = len(c.transport.value())
        assert queued <= bound
        tags += answered_tags(c.take())
        h.reactor.advance(0)  # reading resumes on the next turn
        if len(tags) == count:
            break
    assert tags == list(range(count))
    assert c.reading


def test_requests_in_progress_per_connection_are_capped(h: Harness) -> None:
    """With ``outstanding`` (64) requests of one connection unanswered, the node reads no
    more from it; as answers go out it reads on, so every request is handled once."""
    store = slow_store(h)
    cap = OUTSTANDING
    c = Conn(h)
    count = 3 * cap + 5
    c.send(*(request(b"Submit", i, body=b"pipelined %d" % i) for i in range(count)))
    assert len(store) == cap
    assert not c.reading
    tags: list[int] = []
    for _ in range(count):
        store.make_durable()
        tags += answered_tags(c.take())
        h.reactor.advance(0)
        assert len(store) - len(tags) <= cap
        if len(tags) == count:
            break
    assert sorted(tags) == list(range(count))
    assert len(store) == count
    assert c.proto.limits.outstanding == OUTSTANDING


# -- 6: a full neighbour's link holds new submits only ---------------------------------


def test_a_congested_node_serves_reads_and_holds_submits_until_the_link_drains(
    h: Harness,
) -> None:
    """While a neighbour's link is full, client connections (old and new) are still
    read: Status, Get and ListMessages are answered at once; a Submit waits, unstored,
    and is stored and answered once every link drained."""
    old = Conn(h)
    h.node._congestion(2, True)
    new = Conn(h)
    h.store_bodies([b"held"])
    new.send(
        request(b"Status", 1),
        request(b"Get", 2, id=id_text(message_id(b"held")).encode()),
        request(b"ListMessages", 3, start=b"0", limit=b"10"),
        request(b"Submit", 4, body=b"waits"),
    )
    old.send(request(b"Status", 1))
    assert old.reading and new.reading
    assert answered_tags(new.take()) == [1, 2, 3]
    assert answered_tags(old.take()) == [1]
    h.reactor.advance(0)
    assert new.take() == [] and len(h.store) == 1
    h.node._congestion(2, False)
    h.reactor.advance(0)
    (answer,) = new.take()
    assert answer[b"_answer"] == b"4" and answer[b"id"] == id_text(message_id(b"waits")).encode()
    assert len(h.store) == 2


def test_waiting_submits_are_bounded_then_refused_as_busy(h: Harness) -> None:
    """Submits wait for a full link up to MAX_WAITING_SUBMIT_BYTES of bodies; the next
    one is refused at once with NodeBusy ("node 1 is busy ... retry later") and is not
    stored; the waiting ones are all stored and answered once the link drains."""
    c = Conn(h)
    h.node._congestion(3, True)
    h.node.submits.max_waiting_bytes = 3 * 1000 + 3 * 256
    bodies = [b"%d" % i + b"b" * 999 for i in range(4)]
    c.send(*(request(b"Submit", i, body=b) for i, b in enumerate(bodies)))
    (busy,) = c.take()
    assert busy[b"_error"] == b"3" and busy[b"_error_code"] == b"BUSY"
    text = busy[b"_error_description"].decode()
    assert text.startswith("node 1 is busy: ") and text.endswith("retry later")
    assert len(h.store) == 0
    h.node._peer_down(3)
    h.reactor.advance(0)
    assert sorted(answered_tags(c.take())) == [0, 1, 2]
    assert len(h.store) == 3
    from gossip.node import MAX_WAITING_SUBMIT_BYTES

    assert MAX_WAITING_SUBMIT_BYTES == 4 * 1024 * 1024


def test_a_link_full_without_draining_for_the_stall_bound_is_dropped(h: Harness) -> None:
    """A link that stays full LINK_STALL_SECONDS (30 s) without draining once is dropped
    (its neighbour re-syncs later) and submits flow again; a link that drained and
    filled again in between made progress and is kept."""
    dropped: list[tuple[int, str]] = []
    h.node.links.drop = lambda peer, reason, kind=None: dropped.append((peer, reason))  # type: ignore[method-assign]
    h.node._congestion(2, True)
    h.node._congestion(3, True)
    h.reactor.advance(20)
    h.node._congestion(3, True)  # drained and filled again: progress
    h.reactor.advance(STALL_SECONDS - 20 - 0.1)
    h.node.tick()
    assert dropped == []
    h.reactor.advance(0.1)
    h.node.tick()
    assert [p for p, _ in dropped] == [2]
    assert "30 s without draining" in dropped[0][1]
    assert h.node.congested  # link 3 is still full, and within its bound
    h.reactor.advance(20)
    h.node.tick()
    assert [p for p, _ in dropped] == [2, 3]
    assert not h.node.congested and h.node.submits.is_open
    from gossip.node import LINK_STALL_SECONDS

    assert LINK_STALL_SECONDS == STALL_SECONDS


# -- also: malformed requests, many paused watchers -------------------------------------


class MistypedListMessages(amp.Command):
    commandName = b"ListMessages"
    arguments = [(b"start", amp.Unicode()), (b"limit", amp.Integer())]
    response = ListMessages.response
    errors = ListMessages.errors


class GetWithoutId(amp.Command):
    commandName = b"Get"
    arguments: list[tuple[bytes, amp.Argument]] = []
    response = Get.response
    errors = Get.errors


def test_malformed_arguments_are_a_bad_request_without_a_traceback(
    h: Harness, log_events: list[dict[str, Any]]
) -> None:
    """A wrongly typed or missing argument is answered with the declared BadRequest
    error (the client raises BadRequest), logged in one line with no traceback, and
    the connection stays usable."""
    with pytest.raises(Exception, match=r"bad ListMessages request: malformed argument") as e:
        h.call(MistypedListMessages, start="zero", limit=5)
    assert type(e.value).__name__ == "BadRequest"
    with pytest.raises(Exception, match=r"bad Get request: missing argument 'id'") as e:
        h.call(GetWithoutId)
    assert type(e.value).__name__ == "BadRequest"
    assert h.call(Status)["node_id"] == 1
    bad = [e for e in log_events if "bad client request" in e.get("log_format", "")]
    assert len(bad) == 1, "the second within log_interval is counted, not logged"
    c = Conn(h)  # the same sent without asking for an answer: nothing to say, no traceback
    c.send(amp.AmpBox(_command=b"Submit"), amp.AmpBox(_command=b"Submit", body=b""))
    c.send(request(b"Status", 1))
    assert answered_tags(c.take()) == [1] and not c.closed
    assert not [e for e in log_events if "log_failure" in e]


def test_flush_calls_only_watchers_that_can_take_more_and_are_behind(h: Harness) -> None:
    """A watcher whose socket is full is not called on a flush (it catches up once it
    drains), and a flush that made nothing new durable calls no watcher at all."""
    reading, stuck = Conn(h), Conn(h)
    for c in (reading, stuck):
        c.send(request(b"Watch", 1, start=b"0"))
        h.reactor.advance(0)
        c.take()
    calls: list[str] = []
    for name, c in (("reading", reading), ("stuck", stuck)):
        real = c.proto.push_delivered
        c.proto.push_delivered = lambda name=name, real=real: (calls.append(name), real())[1]  # type: ignore[method-assign]
    stuck.transport.fill()
    h.store_bodies([b"new"])
    h.node.flush()
    assert calls == ["reading"]
    calls.clear()
    h.node.flush()
    assert calls == []
    stuck.transport.drain()  # it reads: pushed from its cursor at once
    pushed = [b for b in stuck.take() if b.get(b"_command") == b"Delivered"]
    assert [b[b"ids"] for b in pushed] == [message_id(b"new")]


def test_pipelined_submits_of_one_read_enter_the_node_as_one_batch(h: Harness) -> None:
    """Submits a client pipelines, read at once, enter the node as one batch; each is
    still answered on its own and in order: its id, or its own refusal (an empty
    body is REJECTED naming why), and a repeat gets the same id, not new."""
    sizes = record_batch_sizes(h, "submit_each")
    c = Conn(h)
    bodies = [b"p0", b"p1", b"", b"p0", b"p2"]
    c.send(*(request(b"Submit", i, body=b) for i, b in enumerate(bodies)))
    h.reactor.advance(0)
    boxes = c.take()
    assert sizes == [5]
    assert [b.get(b"_answer", b.get(b"_error")) for b in boxes] == [b"0", b"1", b"2", b"3", b"4"]
    assert [b.get(b"id") for b in boxes] == [
        id_text(message_id(b)).encode() if b else None for b in bodies
    ]
    assert [b.get(b"new") for b in boxes] == [b"True", b"True", None, b"False", b"True"]
    assert boxes[2][b"_error_code"] == b"REJECTED"
    assert b"empty" in boxes[2][b"_error_description"]
    assert len(h.store) == 3


def test_a_request_after_pipelined_submits_sees_them_stored(h: Harness) -> None:
    """Requests take effect in the order they were sent: a Get pipelined after Submits
    in the same read finds the message the Submit before it stored."""
    c = Conn(h)
    c.send(
        request(b"Submit", 0, body=b"first"),
        request(b"Get", 1, id=id_text(message_id(b"first")).encode()),
        request(b"Submit", 2, body=b"second"),
    )
    h.reactor.advance(0)
    got = {int(b[b"_answer"]): b for b in c.take()}
    assert got[1][b"body"] == b"first"
    assert sorted(got) == [0, 1, 2] and len(h.store) == 2


def test_pipelined_submits_over_the_submit_rate_are_refused_one_by_one(h: Harness) -> None:
    """The per-connection submit rate applies to each pipelined Submit as it is read:
    those within the burst are stored, the rest answered RATE_LIMIT."""
    c = Conn(h, limits=ClientLimits(submit_rate=1.0, submit_burst=2.0))
    c.send(*(request(b"Submit", i, body=b"r%d" % i) for i in range(4)))
    h.reactor.advance(0)
    boxes = c.take()
    assert answered_tags(boxes) == [0, 1]
    assert [b[b"_error_code"] for b in boxes if b"_error" in b] == [b"RATE_LIMIT"] * 2
    assert len(h.store) == 2
