"""The client AMP protocol against a real GossipNode, over an in-memory connection.

The node is built on a ``MemoryReactorClock`` and never started: no port is
listened on and no neighbour is dialed. The client side is ``ClientAMP``
(what ``GossipClient`` uses) joined to the node's ``ClientProtocol`` by
``iosim``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from gossip.client.api import ClientAMP, GossipClient, StoredMessage
from gossip.client.commands import (
    IDS_PER_PAGE,
    PAGE_BYTES,
    AmbiguousId,
    BadId,
    Get,
    ListIds,
    ListMessages,
    MessageRejected,
    NotFound,
    Status,
    Submit,
    SubmitMany,
)
from gossip.client.responder import ClientProtocol
from gossip.config import ClusterConfig, dump_config, parse_config
from gossip.core.frames import Envelope, GossipFrame
from gossip.core.message import ID_BYTES, ID_CHARS, Message, id_text, message_id
from gossip.core.state import REFUSED_KEYS
from gossip.node import GossipNode
from gossip.store.log import LogStore, StoreError
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config

T = TypeVar("T")

AMP_VALUE_LIMIT = 0xFFFF
NOW = 1234.5


class RecordingAMP(ClientAMP):
    """A client AMP that notes the raw size of every ListMessages page it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.page_sizes: list[int] = []

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if b"messages" in box:
            self.page_sizes.append(len(box[b"messages"]))
        super().ampBoxReceived(box)


class Harness:
    """A node on a fake clock and one client connection to it."""

    def __init__(self, config: ClusterConfig | None = None, node_id: int = 1) -> None:
        self.config = config or generate_config(4, name="test")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.store = MemoryStore()
        self.node = GossipNode(self.config, node_id, self.store, self.reactor)
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: ClientProtocol(self.node), RecordingAMP
        )
        self.api = GossipClient(self.client, "test")

    def settle(self, d: Deferred[T]) -> T:
        """Pump until ``d`` has fired; return its result or raise its error."""
        out: list[T | Failure] = []
        d.addBoth(out.append)
        for _ in range(100_000):
            if out:
                break
            if not self.pump.pump():
                break
        assert out, "no answer"
        result = out[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[return-value]

    def call(self, command: type[amp.Command], **kw: Any) -> dict[str, Any]:
        return self.settle(self.client.callRemote(command, **kw))

    def run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self.settle(Deferred.fromCoroutine(fn()))

    def store_bodies(self, bodies: list[bytes]) -> None:
        for i, body in enumerate(bodies):
            self.store.add(Message(message_id(body), body, float(i), ()))


@pytest.fixture
def h() -> Harness:
    return Harness()


def colliding_bodies(prefix_chars: int = 4) -> tuple[bytes, bytes]:
    """Two bodies whose ids' text shares the first ``prefix_chars`` characters."""
    seen: dict[str, bytes] = {}
    for i in range(1_000_000):
        body = b"ambiguous %d" % i
        key = id_text(message_id(body))[:prefix_chars]
        if key in seen:
            return seen[key], body
        seen[key] = body
    raise AssertionError("no collision found")


# -- Submit and Get ----------------------------------------------------------


def test_submit_returns_a_full_id_and_is_idempotent(h: Harness) -> None:
    """Submit answers the 22-character id; the same text again is the same id, new=False."""
    r = h.call(Submit, body="Apple")
    assert r == {"id": id_text(message_id(b"Apple")), "new": True}
    assert len(r["id"]) == ID_CHARS == 22
    again = h.call(Submit, body="Apple")
    assert again == {"id": r["id"], "new": False}
    assert len(h.store) == 1
    other = h.call(Submit, body="Banana")
    assert other["new"] and other["id"] != r["id"]
    assert len(h.store) == 2


def test_submitted_message_is_stored_with_receive_time(h: Harness) -> None:
    """A submitted message is held by the node with the clock's time and an empty path."""
    mid = h.call(Submit, body="Grüße, 世界")["id"]
    m = h.store.get(message_id("Grüße, 世界".encode()))
    assert m is not None
    assert m.text == "Grüße, 世界"
    assert m.received_at == NOW
    assert m.path == ()
    assert id_text(m.id) == mid


@pytest.mark.parametrize("length", [ID_CHARS, 10, 4], ids=["full-id", "10-chars", "4-chars"])
def test_get_by_id_or_prefix(h: Harness, length: int) -> None:
    """Get by the full id or a unique 10- or 4-character prefix returns body, path and time,
    and how the node got it (a submit here) with its redundant copies (none)."""
    mid = h.call(Submit, body="Cherry")["id"]
    h.call(Submit, body="Damson")
    r = h.call(Get, id=mid[:length])
    assert r == {
        "id": mid,
        "body": "Cherry",
        "received_at": NOW,
        "path": [],
        "via": "submit",
        "duplicates": 0,
    }


def test_get_returns_the_path_of_a_relayed_message(h: Harness) -> None:
    """A message that came through other nodes reports that path, origin first."""
    body = b"relayed"
    h.store.add(Message(message_id(body), body, 99.25, (3, 2)))
    r = h.call(Get, id=id_text(message_id(body)))
    assert r["path"] == [3, 2]
    assert r["received_at"] == 99.25


def test_get_ignores_surrounding_whitespace(h: Harness) -> None:
    """An id pasted with spaces or a newline around it is still found."""
    mid = h.call(Submit, body="Elder")["id"]
    assert h.call(Get, id=f"  {mid[:10]}\n")["body"] == "Elder"


def test_get_unknown_id_is_not_found_naming_the_node(h: Harness) -> None:
    """An id the node does not hold gives NotFound whose text names the id and the node."""
    h.call(Submit, body="Fig")
    unknown = id_text(message_id(b"never submitted"))
    with pytest.raises(NotFound, match=rf"no message {unknown} on node 1"):
        h.call(Get, id=unknown)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("abc0", "'0' cannot appear in a message id"),
        ("OOOO", "'O' cannot appear in a message id"),
        ("ab-cd", "'-' cannot appear in a message id"),
        ("abc", "a message id has 4 to 22 characters, got 3"),
        ("z" * 23, "a message id has 4 to 22 characters, got 23"),
        ("zzzzz", "not a valid message id"),
    ],
    ids=["zero", "capital-o", "dash", "too-short", "too-long", "out-of-range"],
)
def test_get_bad_id_text(h: Harness, text: str, match: str) -> None:
    """Text that cannot be an id (prefix) gives BadId saying why."""
    with pytest.raises(BadId, match=match):
        h.call(Get, id=text)


def test_ambiguous_prefix(h: Harness) -> None:
    """A prefix that two held ids share gives AmbiguousId listing both; longer prefixes work."""
    a, b = colliding_bodies()
    ida = h.call(Submit, body=a.decode())["id"]
    idb = h.call(Submit, body=b.decode())["id"]
    prefix = ida[:4]
    assert idb.startswith(prefix) and ida != idb
    with pytest.raises(AmbiguousId) as info:
        h.call(Get, id=prefix)
    text = str(info.value)
    assert prefix in text and ida in text and idb in text
    assert h.call(Get, id=ida)["body"] == a.decode()
    assert h.call(Get, id=idb)["body"] == b.decode()


def test_gossip_client_get_message(h: Harness) -> None:
    """GossipClient.get_message wraps Get into a StoredMessage."""
    mid = h.run(lambda: h.api.submit_message("Grape"))
    got = h.run(lambda: h.api.get_message(mid[:10]))
    assert got == StoredMessage(mid, "Grape", NOW, ())


# -- rejected messages -------------------------------------------------------


def test_oversize_message_is_rejected_with_size_and_limit(h: Harness) -> None:
    """One byte over max_message_bytes: MessageRejected saying the size and the limit."""
    limit = h.config.max_message_bytes
    assert limit == 32768
    with pytest.raises(
        MessageRejected, match=f"message is {limit + 1} bytes, over the limit of {limit}"
    ):
        h.call(Submit, body="x" * (limit + 1))
    assert len(h.store) == 0


def test_oversize_counts_utf8_bytes_not_characters(h: Harness) -> None:
    """The limit is on the UTF-8 encoding: 3-byte characters hit it at a third of the count."""
    limit = h.config.max_message_bytes
    n = limit // 3 + 1
    with pytest.raises(
        MessageRejected, match=f"message is {3 * n} bytes, over the limit of {limit}"
    ):
        h.call(Submit, body="€" * n)


def test_message_of_exactly_the_limit_is_accepted(h: Harness) -> None:
    """A message of exactly max_message_bytes is stored and can be read back whole."""
    body = "y" * h.config.max_message_bytes
    mid = h.call(Submit, body=body)["id"]
    assert h.call(Get, id=mid)["body"] == body


def test_empty_message_is_rejected(h: Harness) -> None:
    """An empty message is refused with MessageRejected."""
    with pytest.raises(MessageRejected, match="message is empty"):
        h.call(Submit, body="")
    assert len(h.store) == 0


def test_configured_limit_applies() -> None:
    """A cluster file's max_message_bytes is the limit the node enforces."""
    config = parse_config(
        "[cluster]\n"
        'name = "small"\n'
        "max_message_bytes = 10\n"
        "allow_any_degree = true\n"
        "[[node]]\n"
        'id = 1\nhost = "127.0.0.1"\npeer_port = 17001\nclient_port = 17101\n'
        "neighbours = []\n"
    )
    h = Harness(config)
    assert h.call(Submit, body="0123456789")["new"]
    with pytest.raises(MessageRejected, match="message is 11 bytes, over the limit of 10"):
        h.call(Submit, body="0123456789A")


# -- ListMessages paging -----------------------------------------------------


def test_list_of_100000_messages_pages_under_the_amp_limit(h: Harness) -> None:
    """100,000 messages come back once each, in arrival order, every page under 64 KiB."""
    bodies = [b"message number %d" % i for i in range(100_000)]
    h.store_bodies(bodies)
    got = h.run(h.api.get_messages)
    assert len(got) == len(bodies)
    assert got == [b.decode() for b in bodies]
    sizes = h.client.page_sizes
    assert len(sizes) > 1, "more than one page"
    assert max(sizes) < AMP_VALUE_LIMIT
    assert max(sizes) <= PAGE_BYTES


def test_pages_carry_ids_and_cursor(h: Harness) -> None:
    """Each page gives (id, body) entries, a next cursor and the total, and pages tile exactly."""
    bodies = [b"m%05d" % i for i in range(5000)]
    h.store_bodies(bodies)
    start, seen = 0, []
    while True:
        r = h.call(ListMessages, start=start, limit=700)
        assert r["total"] == 5000
        assert 0 < len(r["messages"]) <= 700
        assert r["next"] == start + len(r["messages"])
        seen.extend(r["messages"])
        if r["next"] >= r["total"]:
            break
        start = r["next"]
    assert [m["body"] for m in seen] == [b.decode() for b in bodies]
    assert [m["id"] for m in seen] == [id_text(message_id(b)) for b in bodies]


def test_list_ids_pages_the_same_order_as_list_messages(h: Harness) -> None:
    """ListIds gives the raw ids in the arrival order ListMessages uses, in pages of at
    most IDS_PER_PAGE that tile exactly; past the end it is empty."""
    bodies = [b"id %05d" % i for i in range(9000)]
    h.store_bodies(bodies)
    start, raw = 0, b""
    while True:
        r = h.call(ListIds, start=start, limit=100_000)
        assert r["total"] == 9000
        assert 0 < len(r["ids"]) <= IDS_PER_PAGE * ID_BYTES
        assert r["next"] == start + len(r["ids"]) // ID_BYTES
        raw += r["ids"]
        if r["next"] >= r["total"]:
            break
        start = r["next"]
    assert [raw[i : i + ID_BYTES] for i in range(0, len(raw), ID_BYTES)] == [
        message_id(b) for b in bodies
    ]
    assert h.call(ListIds, start=7, limit=2)["ids"] == message_id(bodies[7]) + message_id(bodies[8])
    assert h.call(ListIds, start=9000, limit=10) == {"ids": b"", "next": 9000, "total": 9000}
    assert h.call(ListIds, start=-5, limit=0)["ids"] == message_id(bodies[0])


def test_submit_many_answers_each_body_in_order(h: Harness) -> None:
    """SubmitMany stores every acceptable body and answers per body, in order: its id,
    or an empty id and the reason it was refused; a repeat gets the same id."""
    r = h.call(SubmitMany, bodies=["Apple", "", "Banana", "Apple"])
    apple, banana = id_text(message_id(b"Apple")), id_text(message_id(b"Banana"))
    assert r["ids"] == [apple, "", banana, apple]
    assert r["errors"][0] == r["errors"][2] == r["errors"][3] == ""
    assert "empty" in r["errors"][1]
    assert len(h.store) == 2


def test_submits_made_in_one_turn_go_as_one_submit_many(h: Harness) -> None:
    """A GossipClient given the reactor sends the submits of one reactor turn as one
    SubmitMany; each caller still gets its own id, or its own MessageRejected (an empty
    message is refused by the client before it is sent, so the batch has 20)."""
    api = GossipClient(h.client, "test", reactor=h.reactor)
    calls: list[int] = []
    real = h.node.submit_many
    h.node.submit_many = lambda bodies: (calls.append(len(bodies)), real(bodies))[1]  # type: ignore[method-assign]
    bodies = [f"message {i}" for i in range(20)] + [""]
    done = [Deferred.fromCoroutine(api.submit_message(b)) for b in bodies]
    outcomes: list[object] = [None] * len(done)
    for i, d in enumerate(done):
        d.addBoth(lambda r, i=i: outcomes.__setitem__(i, r))
    for _ in range(100):
        h.reactor.advance(0)
        h.pump.flush()
    assert calls == [20]
    assert outcomes[:20] == [id_text(message_id(b.encode())) for b in bodies[:20]]
    assert isinstance(outcomes[20], Failure) and outcomes[20].check(MessageRejected)
    assert len(h.store) == 20


def test_one_submit_in_a_turn_is_a_plain_submit(h: Harness) -> None:
    """A lone submit is sent as Submit (what gclient does), not as a batch of one."""
    api = GossipClient(h.client, "test", reactor=h.reactor)
    h.node.submit_many = None  # type: ignore[assignment]  # must not be used
    d = Deferred.fromCoroutine(api.submit_message("alone"))
    for _ in range(100):
        h.reactor.advance(0)
        h.pump.flush()
    assert h.settle(d) == id_text(message_id(b"alone"))


class SlowDurabilityStore(MemoryStore):
    """A store whose messages become durable only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.durable = 0
        self.waiters: list[Deferred[None]] = []

    def durable_count(self) -> int:
        return self.durable

    def when_durable(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def make_durable(self) -> None:
        self.durable = len(self)
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)


def record_batch_sizes(h: Harness, method: str) -> list[int]:
    """The size of every batch that enters the node through ``method`` (``submit_many``
    or ``submit_each``), which keeps working as before."""
    sizes: list[int] = []
    real = getattr(h.node, method)

    def recorded(bodies: list[bytes]) -> Any:
        sizes.append(len(bodies))
        return real(bodies)

    setattr(h.node, method, recorded)
    return sizes


def watch(h: Harness, start: int = 0) -> tuple[int, list[tuple[int, list[bytes]]]]:
    got: list[tuple[int, list[bytes]]] = []
    durable = h.run(lambda: h.api.watch(lambda at, ids: got.append((at, ids)), start))
    h.reactor.advance(0)
    h.pump.flush()
    return durable, got


def test_watch_pushes_held_ids_then_new_ones_with_positions(h: Harness) -> None:
    """Watch from a position: the ids held from there come at once, then each id the
    node stores is pushed with its arrival position, once."""
    bodies = [b"w%d" % i for i in range(6)]
    h.store_bodies(bodies[:4])
    durable, got = watch(h, start=1)
    assert durable == 4
    assert got == [(1, [message_id(b) for b in bodies[1:4]])]
    got.clear()
    h.store_bodies(bodies[4:])
    h.node.flush()  # what the end of every read does
    h.pump.flush()
    assert got == [(4, [message_id(b) for b in bodies[4:]])]
    h.node.flush()
    h.pump.flush()
    assert len(got) == 1, "nothing pushed twice"


def test_watch_reports_only_durable_ids() -> None:
    """A node reports an id to watchers (and in ListIds) only once its store says it is
    durable: the push waits for the store's when_durable."""
    h = Harness()
    store = h.store = h.node.store = SlowDurabilityStore()
    h.node.core.store = store
    h.store_bodies([b"a", b"b"])
    store.make_durable()
    _, got = watch(h)
    assert got == [(0, [message_id(b"a"), message_id(b"b")])]
    got.clear()
    h.store_bodies([b"c"])
    h.node.flush()
    h.pump.flush()
    assert got == [] and h.call(ListIds, start=0, limit=10)["total"] == 2
    store.make_durable()
    h.pump.flush()
    assert got == [(2, [message_id(b"c")])]
    assert h.call(ListIds, start=2, limit=10)["ids"] == message_id(b"c")


def test_watch_pauses_while_the_client_does_not_read(h: Harness) -> None:
    """Pushes stop while the transport says its buffer is full and resume from the
    cursor, so a slow watcher costs the node no memory."""
    _, got = watch(h)
    producer = h.server.transport.producer  # what the transport calls when its buffer fills
    producer.pauseProducing()
    h.store_bodies([b"x", b"y"])
    h.node.flush()
    h.pump.flush()
    assert got == []
    producer.resumeProducing()
    h.pump.flush()
    assert got == [(0, [message_id(b"x"), message_id(b"y")])]


class BrokenStore(MemoryStore):
    """A store whose disk has failed, as LogStore is after a failed write or fsync."""

    def add(self, message: Message) -> bool:
        raise StoreError("cannot append to /data/messages.log: No space left on device")

    def add_many(
        self,
        ids: Sequence[bytes],
        bodies: Sequence[bytes],
        paths: Sequence[tuple[int, ...]],
        received_at: float,
    ) -> int:
        raise StoreError("cannot append to /data/messages.log: No space left on device")

    def when_durable(self) -> Deferred[None]:
        return fail(StoreError("cannot append to /data/messages.log: No space left on device"))


def test_a_store_failure_rejects_the_submit_in_one_line_and_reports_it_once() -> None:
    """Once the log cannot take records, a submit is refused with the store's one-line
    reason (never acknowledged), so is every later one, and the node reports the failure
    once through on_fatal; it never stops the reactor itself (gossip.tap does)."""
    h = Harness()
    fatal: list[str] = []
    h.node.on_fatal = fatal.append
    h.store = h.node.store = h.node.core.store = BrokenStore()
    h.reactor.running = True
    for body in ("lost", "later"):
        with pytest.raises(MessageRejected, match=r"^not stored: cannot append .* No space left"):
            h.call(Submit, body=body)
    assert not h.reactor.hasStopped
    assert len(fatal) == 1 and "No space left" in fatal[0]


def test_list_past_the_end_is_empty(h: Harness) -> None:
    """Asking from the total onwards gives no entries and next == total."""
    h.store_bodies([b"one", b"two"])
    assert h.call(ListMessages, start=2, limit=10) == {"messages": [], "next": 2, "total": 2}
    assert h.call(ListMessages, start=50, limit=10)["messages"] == []


def test_list_of_an_empty_node(h: Harness) -> None:
    """A node without messages lists nothing."""
    assert h.run(h.api.get_messages) == []


@pytest.mark.parametrize("limit", [32768, 60000], ids=["32KiB", "config-max-60000"])
def test_max_size_messages_page_correctly(limit: int) -> None:
    """Messages of the maximum configured size (and small ones between) all come back in order."""
    text = dump_config(generate_config(4, name="test"))
    assert "max_message_bytes = 32768" in text
    h = Harness(
        parse_config(text.replace("max_message_bytes = 32768", f"max_message_bytes = {limit}"))
    )
    assert h.config.max_message_bytes == limit
    bodies: list[bytes] = []
    for i in range(24):
        head = b"big %d " % i
        if i % 3 == 2:
            bodies.append(b"small %d" % i)
        elif i % 3 == 1:
            # Multi-byte text filling the limit exactly.
            n = (limit - len(head)) // 3
            bodies.append(head + "€".encode() * n + b"." * ((limit - len(head)) % 3))
        else:
            bodies.append(head + b"z" * (limit - len(head)))
    assert {len(b) for i, b in enumerate(bodies) if i % 3 != 2} == {limit}
    h.store_bodies(bodies)
    got = h.run(h.api.get_messages)
    assert got == [b.decode() for b in bodies]
    assert max(h.client.page_sizes) < AMP_VALUE_LIMIT
    # Submitting and reading back one of the maximum size works through AMP as well.
    top = "Ω" * (limit // 2)
    mid = h.call(Submit, body=top)["id"]
    assert h.call(Get, id=mid)["body"] == top


# -- Status ------------------------------------------------------------------


def test_status_of_a_fresh_node(h: Harness) -> None:
    """Status names the node and cluster, counts messages, and lists each neighbour connecting."""
    h.call(Submit, body="Apple")
    h.call(Submit, body="Banana")
    s = h.call(Status)
    assert s["node_id"] == 1
    assert s["cluster"] == "test"
    assert s["dissemination"] == "plumtree"
    assert s["message_count"] == 2
    spec = h.config.node(1)
    assert [link["peer"] for link in s["links"]] == list(spec.neighbours) == [2, 3, 4]
    for link in s["links"]:
        peer = h.config.nodes[link["peer"]]
        assert link["state"] == "connecting"
        assert link["address"] == peer.peer_address
        assert link["times_up"] == 0
        assert link["last_error"] == ""
    assert s["store"] == [
        {"policy": "memory", "durable": 2, "fsyncs": 0, "last_fsync_seconds": 0.0}
    ]


def test_status_reports_the_logs_fsyncs(tmp_path: Path) -> None:
    """With a message log the store row names the fsync policy, the durable count and
    the fsyncs done (here "always": one per stored message)."""
    h = Harness()
    store = LogStore.open(tmp_path, fsync="always", reactor=h.reactor)
    h.store = h.node.store = h.node.core.store = store
    try:
        h.call(Submit, body="Apple")
        (row,) = h.call(Status)["store"]
        assert (row["policy"], row["durable"], row["fsyncs"]) == ("always", 1, 1)
        assert row["last_fsync_seconds"] >= 0.0
    finally:
        store.close()


def test_gossip_client_status_matches_the_node(h: Harness) -> None:
    """GossipClient.status returns the same fields the node reports."""
    s = h.run(h.api.status)
    assert s["node_id"] == 1 and len(s["links"]) == 3
    assert s["message_count"] == 0


def test_status_of_another_node_of_a_16_node_cluster() -> None:
    """Node 7 of the standard 16-node cluster reports its own three neighbours."""
    config = generate_config(16, name="sixteen")
    h = Harness(config, node_id=7)
    s = h.call(Status)
    assert s["node_id"] == 7 and s["cluster"] == "sixteen"
    assert [link["peer"] for link in s["links"]] == list(config.node(7).neighbours)
    assert len(s["links"]) == 3
    assert {link["state"] for link in s["links"]} == {"connecting"}


# -- bounds --------------------------------------------------------------------


def test_client_connections_are_limited_and_freed() -> None:
    """The client port serves at most ``connections`` connections at once: one more is
    refused (buildProtocol gives None: closed at once), and a closed one frees a place."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from gossip.client.responder import ClientFactory, ClientLimits

    h = Harness()
    assert ClientFactory(h.node).limits.connections == 1024
    factory = ClientFactory(h.node, ClientLimits(connections=2))
    first = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5555))
    second = factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 5555))
    assert first is not None and second is not None
    assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 5555)) is None
    first.makeConnection(StringTransport())
    first.connectionLost(Failure(ConnectionError()))
    assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", 5555)) is not None


def test_resync_requests_are_queued_and_only_a_far_excess_drops_the_peer() -> None:
    """A peer's re-sync requests (SyncWant answers) up to MAX_QUEUED_WANTS are queued, not
    refused, however many come at once; one more disconnects that peer; once its link is
    down the queue is gone."""
    from gossip.core.effects import StreamMessages
    from gossip.sync_streams import MAX_QUEUED_WANTS

    h = Harness()
    dropped: list[tuple[int, str]] = []
    h.node.links.drop = lambda peer, reason, kind=None: dropped.append((peer, reason))  # type: ignore[method-assign]
    h.node.links.is_up = lambda peer: True  # type: ignore[method-assign]
    orders = [StreamMessages(2, n, (), (0,)) for n in range(MAX_QUEUED_WANTS + 1)]
    h.node._apply(orders[:MAX_QUEUED_WANTS])  # type: ignore[arg-type]
    assert dropped == []
    assert h.node.sync_streams.queued(2) == MAX_QUEUED_WANTS
    h.node._apply(orders[MAX_QUEUED_WANTS:])  # type: ignore[arg-type]
    assert len(dropped) == 1
    assert dropped[0][0] == 2 and "re-sync requests" in dropped[0][1]
    h.node._peer_down(2)
    assert h.node.sync_streams.queued(2) == 0


def test_status_counts_messages_refused_for_their_path(h: Harness) -> None:
    """A message from a neighbour whose path names this node is dropped without closing
    the link and counted in Status under its reason (every reason listed, zeros too)."""
    h.node._peer_up(2)
    looped = Envelope(message_id(b"loop"), b"loop", (1, 2))
    h.node._frame(2, GossipFrame((looped,)), 100)
    assert message_id(b"loop") not in h.store
    rows = {r["reason"]: r["count"] for r in h.call(Status)["refused"]}
    assert rows == {r: int(r == "path_has_receiver") for r in REFUSED_KEYS}
