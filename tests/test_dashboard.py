"""The dashboard's server side: the cluster view's polling and the web resource.

Deterministic: the serving node is a real ``GossipNode`` on a
``MemoryReactorClock`` (never started), the other nodes are fakes that answer
``Status`` and ``Get`` the way ``GossipClient`` does, and HTTP requests go
through a real ``twisted.web`` ``Site`` over a ``StringTransport``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import resource, server

from gossip.client.api import NodeUnreachable, StoredMessage
from gossip.client.commands import NotFound
from gossip.config import ClusterConfig
from gossip.core.message import id_text, message_id
from gossip.node import GossipNode
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config
from gossip.web.cluster_view import (
    IDLE_STOP_SECONDS,
    MAX_CONCURRENT_QUERIES,
    MAX_TRACES,
    QUERY_TIMEOUT,
    ClusterView,
    LocalClient,
)
from gossip.web.dashboard import MAX_VIEWERS, STALLED_VIEWER_SECONDS, STATIC_DIR, Dashboard

NOW = 1000.0


class FakeNode:
    """A remote node as the view sees it: Status from its fields, Get from ``held``."""

    def __init__(self, node_id: int, config: ClusterConfig) -> None:
        self.node_id = node_id
        self.count = 0
        self.links = {p: "up" for p in config.node(node_id).neighbours}
        self.held: dict[str, StoredMessage] = {}
        self.gets: list[str] = []
        self.hang = False  # never answer
        self.closed = 0

    def status(self) -> Deferred[dict[str, Any]]:
        if self.hang:
            return Deferred()
        links = [{"peer": p, "state": s} for p, s in self.links.items()]
        return succeed({"message_count": self.count, "links": links})

    async def get_message(self, msg_id: str) -> StoredMessage:
        self.gets.append(msg_id)
        for mid, m in self.held.items():
            if mid.startswith(msg_id):
                return m
        raise NotFound(f"no message {msg_id} on node {self.node_id}")

    async def submit_message(self, message: str) -> str:
        return id_text(message_id(message.encode()))

    def close(self) -> None:
        self.closed += 1


class Harness:
    """Node 1 serves; nodes 2..N are fakes; ``down`` nodes refuse connections."""

    def __init__(self, n: int = 4) -> None:
        self.config = generate_config(n, name="test")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.node = GossipNode(self.config, 1, MemoryStore(), self.reactor)
        self.fakes = {i: FakeNode(i, self.config) for i in self.config.nodes if i != 1}
        self.down: set[int] = set()
        self.connects: list[int] = []
        self.view = ClusterView(self.config, 1, LocalClient(self.node), self.reactor, self.connect)
        self.root = Dashboard(self.view, self.reactor)
        top = resource.Resource()  # as the node's web site mounts it
        top.putChild(b"dashboard", self.root)
        self.site = server.Site(top, reactor=self.reactor)

    async def connect(self, n: int) -> FakeNode:
        self.connects.append(n)
        if n in self.down:
            raise NodeUnreachable(f"node {n} at tcp:... is not reachable: Connection refused")
        return self.fakes[n]

    def poll(self) -> None:
        self.view.poll()

    def view_of(self, n: int) -> dict[str, Any]:
        return next(v for v in self.view.snapshot()["nodes"] if v["id"] == n)

    def link(self, a: int, b: int) -> str:
        a, b = min(a, b), max(a, b)
        return next(x["state"] for x in self.view.snapshot()["links"] if (x["a"], x["b"]) == (a, b))

    def http(self, request: bytes) -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(request)
        channel = proto._channel
        while channel._requestProducer is not None and not channel._requestProducerStreaming:
            # A file's pull producer, which Twisted pumps with the global cooperator.
            channel._requestProducer._producer.resumeProducing()
        return proto, transport

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        _, t = self.http(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:17201\r\n\r\n".encode())
        return parse_response(t.value())

    def post(
        self, path: str, body: bytes, kind: str = "application/json", origin: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:17201\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n"
        )
        if origin is not None:
            head += f"Origin: {origin}\r\n"
        _, t = self.http(head.encode() + b"\r\n" + body)
        return parse_response(t.value())


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split()[1]), headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        if not size_line:
            break
        size = int(size_line, 16)
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def events(raw: bytes) -> list[tuple[str, Any]]:
    """The (event, data) pairs of a server-sent event stream."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- the cluster view ----------------------------------------------------------


def test_poll_shows_every_node_its_count_and_every_link_up(h: Harness) -> None:
    """One poll asks every node: the local one directly, the others over their clients."""
    h.node.submit(b"local message")
    h.fakes[2].count = 7
    for fake in h.fakes.values():
        fake.links = {p: "up" for p in fake.links}
    real = h.node.links.status()
    h.node.links.status = lambda: [  # type: ignore[method-assign]
        attrs.evolve(link, state="up") for link in real
    ]
    h.poll()
    assert h.view_of(1) == {
        "id": 1,
        "state": "up",
        "error": "",
        "message_count": 1,
        "rate": None,
    }
    assert h.view_of(2)["message_count"] == 7
    assert sorted(h.connects) == sorted(h.fakes)
    assert {x["state"] for x in h.view.snapshot()["links"]} == {"up"}


def test_unreachable_node_is_down_with_reason_and_its_links_are_down(h: Harness) -> None:
    """A node that refuses the connection is down (with the reason); so is every link of it,
    even while its neighbours still report the link up."""
    h.down.add(3)
    h.poll()
    assert h.view_of(3)["state"] == "down"
    assert "Connection refused" in h.view_of(3)["error"]
    for peer in h.config.node(3).neighbours:
        assert h.link(3, peer) == "down"
    h.down.clear()
    h.poll()
    assert h.view_of(3)["state"] == "up"


def test_link_state_combines_both_ends(h: Harness) -> None:
    """Unknown before any answer; down if either end says down; connecting if one end
    is still connecting; up only when every end that answered says up."""
    a = 2
    b = next(p for p in h.config.node(a).neighbours if p != 1)
    assert h.link(a, b) == "unknown"
    h.fakes[a].links[b] = "connecting"
    h.poll()
    assert h.link(a, b) == "connecting"
    h.fakes[b].links[a] = "down"
    h.poll()
    assert h.link(a, b) == "down"
    h.fakes[a].links[b] = h.fakes[b].links[a] = "up"
    h.poll()
    assert h.link(a, b) == "up"


def test_rate_is_messages_per_second_over_recent_polls(h: Harness) -> None:
    """A node's rate is the growth of its count over the last polls, per second."""
    for i in range(4):
        h.fakes[2].count = 10 * i
        h.poll()
        h.reactor.advance(1.0)
    assert h.view_of(2)["rate"] == pytest.approx(10.0)


def test_a_node_that_does_not_answer_is_skipped_then_shown_down(h: Harness) -> None:
    """A poll still waiting is not repeated (one call per node at a time); after
    QUERY_TIMEOUT the node is down with "no answer"."""
    h.fakes[2].hang = True
    h.poll()
    h.poll()
    assert h.connects.count(2) == 1
    h.reactor.advance(QUERY_TIMEOUT + 0.1)
    assert h.view_of(2)["state"] == "down"
    assert "no answer" in h.view_of(2)["error"]
    assert h.fakes[2].closed == 1  # the connection is dropped and made anew next time


def test_concurrent_calls_are_bounded() -> None:
    """With every node hanging, at most MAX_CONCURRENT_QUERIES calls are in flight."""
    h = Harness(n=MAX_CONCURRENT_QUERIES + 8)
    started = []
    for fake in h.fakes.values():
        fake.hang = True
        original = fake.status

        def counting(original: Any = original) -> Deferred[dict[str, Any]]:
            started.append(1)
            return original()

        fake.status = counting  # type: ignore[method-assign]
    h.poll()
    assert len(started) == MAX_CONCURRENT_QUERIES
    h.reactor.advance(QUERY_TIMEOUT + 0.1)  # those time out: the rest get their turn
    assert len(started) == min(2 * MAX_CONCURRENT_QUERIES, len(h.fakes))


def test_trace_gathers_arrival_and_path_and_stops_asking_holders(h: Harness) -> None:
    """A followed message's record is fetched from every node once it holds it; a node
    that has it is not asked again; a node without it is asked each poll; a down node
    without a record is listed as not known."""
    body = "traced"
    mid = id_text(message_id(body.encode()))
    h.node.submit(body.encode())
    h.fakes[2].held[mid] = StoredMessage(mid, body, NOW + 0.010, (1,))
    h.down.add(4)
    h.view.follow(mid[:8])  # starts polling: one round now
    h.poll()
    trace = h.view.trace_json(mid[:8])
    assert trace is not None
    assert trace["id"] == mid and trace["body"] == body
    assert trace["reached"] == 2 and trace["total"] == 4 and trace["unknown"] == [4]
    assert trace["nodes"]["1"] == {"received_at": NOW, "path": []}
    assert trace["nodes"]["2"] == {"received_at": NOW + 0.010, "path": [1]}
    assert trace["first_at"] == NOW
    assert h.fakes[2].gets == [mid]  # asked once (by full id, once a node had it)
    assert h.fakes[3].gets == [mid, mid]  # asked every poll


def test_traces_are_bounded(h: Harness) -> None:
    """At most MAX_TRACES messages are followed; the least recently asked goes first."""
    queries = [id_text(message_id(b"%d" % i))[:6] for i in range(MAX_TRACES + 3)]
    for q in queries:
        h.view.follow(q)
    h.view.follow(queries[3])
    assert len(h.view.traces) == MAX_TRACES
    assert queries[0] not in h.view.traces and queries[3] in h.view.traces


def test_polling_stops_when_nobody_watches(h: Harness) -> None:
    """Polling starts on the first viewer and stops IDLE_STOP_SECONDS after the last."""
    h.view.want()
    assert h.view.rounds == 1
    h.reactor.pump([1.0] * 5)
    assert h.view.rounds == 6
    h.reactor.pump([1.0] * int(IDLE_STOP_SECONDS + 5))
    rounds = h.view.rounds
    h.reactor.pump([1.0] * 10)
    assert h.view.rounds == rounds
    assert not h.view._loop.running


# -- the web resource ------------------------------------------------------------


def test_page_and_its_files_are_served_from_the_package(h: Harness) -> None:
    """/dashboard redirects to /dashboard/; the page, its CSS and JS come from the package
    and name nothing outside it (no CDN)."""
    code, headers, _ = h.get("/dashboard")
    assert code in (301, 302) and headers["location"] == "dashboard/"
    code, headers, page = h.get("/dashboard/")
    assert code == 200 and b"static/dashboard.js" in page
    assert "default-src 'self'" in headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css"):
        code, _, data = h.get(f"/dashboard/static/{name}")
        assert code == 200 and data == (STATIC_DIR / name).read_bytes()
    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        assert "//cdn" not in text and "https://" not in text, f.name
    assert h.get("/dashboard/static/")[0] == 403


def test_cluster_json(h: Harness) -> None:
    """api/cluster answers the view's picture and starts polling."""
    h.down.add(4)
    code, headers, body = h.get("/dashboard/api/cluster")
    assert code == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["served_by"] == 1 and len(doc["nodes"]) == 4
    assert h.view._loop.running
    h.reactor.advance(1.0)
    assert h.view_of(4)["state"] == "down"


def test_trace_json_checks_the_id(h: Harness) -> None:
    """api/trace follows a message; text that cannot be an id is a 400 with one line."""
    code, _, body = h.get("/dashboard/api/trace?id=0OIl")
    assert code == 400 and "error" in json.loads(body)
    mid = id_text(message_id(b"x"))
    code, _, body = h.get(f"/dashboard/api/trace?id={mid}")
    assert code == 200 and json.loads(body)["query"] == mid


def test_submit_stores_on_the_chosen_node(h: Harness) -> None:
    """A JSON submit from the page's origin stores the message on the serving node
    (default) and answers its id."""
    code, _, body = h.post(
        "/dashboard/api/submit", b'{"body": "Apple"}', origin="http://127.0.0.1:17201"
    )
    assert code == 200
    mid = json.loads(body)["id"]
    assert mid == id_text(message_id(b"Apple"))
    assert h.node.message_count() == 1
    code, _, body = h.post("/dashboard/api/submit", b'{"body": "Pear", "node": 3}')
    assert code == 200 and json.loads(body)["node"] == 3


@pytest.mark.parametrize(
    ("body", "kind", "origin", "code"),
    [
        (b"body=Apple", "application/x-www-form-urlencoded", None, 415),
        (b'{"body": "Apple"}', "text/plain", None, 415),
        (b'{"body": "Apple"}', "application/json", "http://evil.example", 403),
        (b'{"text": "Apple"}', "application/json", None, 400),
        (b'{"body": "Apple", "node": 99}', "application/json", None, 400),
        (b'{"body": ""}', "application/json", None, 400),
        (b"[not json", "application/json", None, 400),
    ],
)
def test_submit_refuses_bad_or_cross_site_requests(
    h: Harness, body: bytes, kind: str, origin: str | None, code: int
) -> None:
    """Forms, other origins and malformed JSON are refused with one line; nothing stored."""
    got, _, answer = h.post("/dashboard/api/submit", body, kind, origin)
    assert got == code
    assert json.loads(answer)["error"]
    assert h.node.message_count() == 0


def test_submit_refused_by_the_node_is_a_422(h: Harness) -> None:
    """A message the node refuses (too long) comes back as the node's one-line reason."""
    big = json.dumps({"body": "x" * (h.config.max_message_bytes + 1)}).encode()
    code, _, answer = h.post("/dashboard/api/submit", big)
    assert code == 422 and "bytes" in json.loads(answer)["error"]


def test_event_stream_sends_the_picture_after_every_poll(h: Harness) -> None:
    """events: the picture at once, then after every poll; with ?trace= also the trace."""
    h.node.submit(b"Apple")
    mid = id_text(message_id(b"Apple"))
    _, t = h.http(
        f"GET /dashboard/events?trace={mid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    code, headers, _ = parse_response(t.value())
    assert code == 200 and headers["content-type"] == "text/event-stream"
    h.reactor.advance(1.0)
    got = events(dechunk(t.value().partition(b"\r\n\r\n")[2]))
    kinds = [k for k, _ in got]
    assert kinds.count("cluster") >= 2
    traces = [d for k, d in got if k == "trace"]
    assert traces[-1]["reached"] == 1 and traces[-1]["nodes"]["1"]["path"] == []


def test_event_streams_are_bounded(h: Harness) -> None:
    """The viewer past MAX_VIEWERS gets a 503; a viewer that leaves frees its place."""
    protos = [h.http(b"GET /dashboard/events HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(16)]
    assert len(h.root.events.viewers) == MAX_VIEWERS
    code, _, body = h.get("/dashboard/events")
    assert code == 503 and b"too many dashboard viewers" in body
    proto, _ = protos[0]
    proto.connectionLost(Exception("gone"))
    assert len(h.root.events.viewers) == MAX_VIEWERS - 1


def test_a_viewer_that_stops_reading_is_skipped_then_dropped(h: Harness) -> None:
    """While its connection is paused a viewer gets no events (nothing queues up); after
    STALLED_VIEWER_SECONDS paused it is disconnected."""
    _, t = h.http(b"GET /dashboard/events HTTP/1.1\r\nHost: x\r\n\r\n")
    h.reactor.advance(1.0)
    t.producer.pauseProducing()  # what the transport does when its buffer is full
    before = len(t.value())
    h.reactor.pump([1.0] * 10)
    assert len(t.value()) == before
    viewer = h.root.events.viewers[0]
    assert viewer.skipped >= 9
    h.reactor.pump([1.0] * int(STALLED_VIEWER_SECONDS))
    assert h.root.events.viewers == []
    assert t.disconnecting or getattr(t, "aborted", False) or t.disconnected
