"""The pure core against frames a hostile or broken peer sends: each is refused before
it costs anything, the sender is disconnected with a counted reason, and honest
frames at the bounds still pass. Also the per-origin quotas (token buckets)."""

from __future__ import annotations

import pytest

from gossip.core.dissemination import Flood
from gossip.core.effects import (
    BAD_IDS,
    FORGED_ID,
    OVERSIZED_BATCH,
    UNSOLICITED_SYNC,
    DropPeer,
    Effect,
    Persist,
    Send,
)
from gossip.core.frame_rules import MAX_MESSAGES_PER_FRAME
from gossip.core.frames import (
    Envelope,
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    PeerFrame,
    PruneFrame,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
)
from gossip.core.message import ID_BYTES, message_id
from gossip.core.plumtree import IDS_PER_FRAME, Plumtree
from gossip.core.rate import TokenBucket
from gossip.core.state import (
    ORIGIN_RATE_LIMITED,
    RELAY_HEADROOM,
    GossipCore,
    OriginRateLimited,
)
from gossip.core.sync import MAX_HINT_IDS, RECENT_SESSIONS
from gossip.store.memory import MemoryStore

MEMBERS = range(1, 17)


def make_core(
    strategy: str = "flood", origin_rate: float = 1000, origin_burst: float = 1000
) -> tuple[GossipCore, MemoryStore]:
    store = MemoryStore()
    graph = {n: tuple(m for m in MEMBERS if m != n)[:3] for n in MEMBERS}
    graph[1] = (2, 3, 4)
    for n in (2, 3, 4):
        graph[n] = (1, *graph[n][1:])
    dissemination = Flood(1) if strategy == "flood" else Plumtree(1, graph)
    core = GossipCore(
        1,
        (2, 3, 4),
        store,
        dissemination,
        256,
        MEMBERS,
        origin_rate=origin_rate,
        origin_burst=origin_burst,
    )
    for p in (2, 3, 4):
        core.peer_up(p, 0.0)
    return core, store


def env(body: bytes, path: tuple[int, ...] = (2,)) -> Envelope:
    return Envelope(message_id(body), body, path)


def drops(effects: list[Effect]) -> list[DropPeer]:
    return [e for e in effects if isinstance(e, DropPeer)]


def stored(effects: list[Effect]) -> list[bytes]:
    return [e.message.body for e in effects if isinstance(e, Persist)]


# -- forged and malformed messages ----------------------------------------------


def test_forged_message_is_dropped_counted_and_its_sender_disconnected() -> None:
    """A Gossip frame with a message whose id is not the hash of its body: nothing of it
    is stored or forwarded, and the only effect for it is a DropPeer of the sender with
    kind FORGED_ID (what the node counts as a disconnection reason)."""
    core, store = make_core()
    forged = Envelope(message_id(b"the real body"), b"another body", (2,))
    effects = core.receive(2, GossipFrame((forged,)), 1.0)
    assert effects == [DropPeer(2, "message id does not match its body", FORGED_ID)]
    assert len(store) == 0


# -- batch bounds ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gossip", "sync_data"])
def test_a_frame_with_more_messages_than_honest_nodes_send_is_refused_whole(kind: str) -> None:
    """A Gossip or SyncData frame holding MAX_MESSAGES_PER_FRAME + 1 messages is refused
    before any message is looked at: one DropPeer (OVERSIZED_BATCH), nothing stored."""
    core, store = make_core()
    messages = tuple(env(b"m%d" % i) for i in range(MAX_MESSAGES_PER_FRAME + 1))
    frame: PeerFrame = (
        GossipFrame(messages) if kind == "gossip" else SyncDataFrame(1, messages, True)
    )
    effects = core.receive(2, frame, 1.0)
    assert [(d.peer, d.kind) for d in drops(effects)] == [(2, OVERSIZED_BATCH)]
    assert stored(effects) == []
    assert len(store) == 0


def test_an_honest_full_gossip_frame_passes_the_bound() -> None:
    """The largest count an honest sender puts in one Gossip frame (256 KiB of the
    smallest envelopes) is under MAX_MESSAGES_PER_FRAME, and such a frame is stored."""
    from gossip.node import GOSSIP_FRAME_BYTES
    from gossip.wire import codec

    envelopes = [env(b"%d" % i, ()) for i in range(20_000)]
    most = max(n for _, n in codec.encode_gossip(envelopes, GOSSIP_FRAME_BYTES, {}))
    assert most < MAX_MESSAGES_PER_FRAME
    core, _ = make_core(origin_rate=1e9, origin_burst=1e9)
    effects = core.receive(2, GossipFrame(tuple(env(b"%d" % i) for i in range(most))), 1.0)
    assert drops(effects) == []
    assert len(stored(effects)) == most


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (IHaveFrame((b"\x01" * ID_BYTES,) * (IDS_PER_FRAME + 1)), OVERSIZED_BATCH),
        (GraftFrame((b"\x01" * ID_BYTES,) * (IDS_PER_FRAME + 1)), OVERSIZED_BATCH),
        (IHaveFrame((b"short",)), BAD_IDS),
        (GraftFrame((b"\x01" * (ID_BYTES + 1),)), BAD_IDS),
        (IHaveFrame((b"\x01" * ID_BYTES,), (2, 3)), BAD_IDS),
        (PruneFrame(tuple(range(1, 18))), OVERSIZED_BATCH),
        (SyncHintFrame((b"\x01" * ID_BYTES,) * (MAX_HINT_IDS + 1)), OVERSIZED_BATCH),
        (SyncHintFrame((b"short",)), BAD_IDS),
    ],
    ids=[
        "ihave-count",
        "graft-count",
        "ihave-id",
        "graft-id",
        "ihave-origins",
        "prune",
        "hint-count",
        "hint-id",
    ],
)
def test_control_frames_out_of_bounds_disconnect_the_sender(frame: PeerFrame, kind: str) -> None:
    """IHave and Graft with more than IDS_PER_FRAME ids or an id not 16 bytes long, an
    IHave with more origins than ids, a Prune naming more origins than the cluster has,
    a SyncHint naming more than MAX_HINT_IDS ids or an id not 16 bytes long: one
    DropPeer of that kind, and neither the strategy nor re-sync sees the frame (no
    Graft, no session, no reply)."""
    core, _ = make_core("plumtree")
    effects = core.receive(2, frame, 1.0)
    assert [(d.peer, d.kind) for d in drops(effects)] == [(2, kind)]
    assert [e for e in effects if isinstance(e, Send)] == []


def test_control_frames_at_their_bounds_pass() -> None:
    """An IHave of exactly IDS_PER_FRAME ids with their origins is taken (no DropPeer)."""
    core, _ = make_core("plumtree")
    ids = tuple(i.to_bytes(ID_BYTES, "big") for i in range(IDS_PER_FRAME))
    effects = core.receive(2, IHaveFrame(ids, (5,) * IDS_PER_FRAME), 1.0)
    assert drops(effects) == []


# -- re-sync data only inside our own sessions -----------------------------------


def test_unsolicited_sync_data_is_dropped_and_the_peer_disconnected() -> None:
    """SyncData for a session this node never started with that peer (here: a session
    id it started with another peer, and one it never used) stores nothing and
    disconnects the sender with kind UNSOLICITED_SYNC."""
    core, store = make_core()
    assert core.sync.active is not None
    started_with = core.sync.active.peer  # the link-up session
    other = 3 if started_with != 3 else 4
    for session in (core.sync.active.id, 999):
        effects = core.receive(other, SyncDataFrame(session, (env(b"pushed", (other,)),), True), 1)
        assert [(d.peer, d.kind) for d in drops(effects)] == [(other, UNSOLICITED_SYNC)]
        assert stored(effects) == []
    assert len(store) == 0


def test_late_sync_data_of_a_session_given_up_on_is_still_taken() -> None:
    """Data for a session this node started and gave up on (timed out) is honest: it is
    stored without a DropPeer, as long as the session is among the last RECENT_SESSIONS."""
    core, _ = make_core()
    s = core.sync.active
    assert s is not None
    core.tick(core.sync.timeout + 10.0)  # gives it up
    assert core.sync.active is None or core.sync.active.id != s.id
    effects = core.receive(s.peer, SyncDataFrame(s.id, (env(b"late", (s.peer,)),), True), 50.0)
    assert drops(effects) == []
    assert stored(effects) == [b"late"]
    assert RECENT_SESSIONS >= 2


def test_sync_query_is_not_session_bound() -> None:
    """A neighbour's own session (its SyncQuery) is answered: only SyncData, which puts
    messages on this node, must belong to a session this node started."""
    core, _ = make_core()
    effects = core.receive(3, SyncQueryFrame(77, (core.tree.node(0),), ()), 1.0)
    assert drops(effects) == []


# -- per-origin quotas ----------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    """A bucket of rate 10/s and burst 5 takes 5 at once, then none, then one per 0.1 s;
    ``take(n)`` is all or nothing; time going backwards adds nothing."""
    b = TokenBucket(10, 5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.take(0.1)
    assert not b.take(0.1)
    assert not b.take(0.05)
    assert not b.take(10.0, 6)  # capped at the burst
    assert b.take(10.0, 5)


def test_origin_quota_refuses_client_submits_over_the_rate_and_counts_them() -> None:
    """With origin_rate 10 and burst 3 the node accepts 3 new messages at once, refuses the
    4th with OriginRateLimited ("rate limit", retryable), counts it, and takes one more
    0.1 s later; a resubmit of a held message costs no quota."""
    core, store = make_core(origin_rate=10, origin_burst=3)
    for i in range(3):
        for e in core.submit(b"m%d" % i, 1.0).effects:
            if isinstance(e, Persist):
                store.add(e.message)
    with pytest.raises(OriginRateLimited, match="rate limit"):
        core.submit(b"one too many", 1.0)
    assert core.submits_rate_limited == 1
    assert core.submit(b"m0", 1.0).new is False  # held already: no quota needed
    assert core.submit(b"later", 1.1).new is True


def test_a_peers_frames_over_the_per_origin_bound_are_dropped_and_counted_link_kept() -> None:
    """One frame carrying more new messages of one origin than RELAY_HEADROOM x the origin
    burst: the excess is not stored (nor forwarded), counted under origin_rate_limited,
    and no DropPeer comes (the link is kept). Another origin has its own bucket, and
    copies of held messages cost nothing."""
    core, _ = make_core(origin_rate=1, origin_burst=5)
    bound = RELAY_HEADROOM * 5
    flood = tuple(env(b"o5-%d" % i, (5, 2)) for i in range(bound + 7))
    effects = core.receive(2, GossipFrame(flood), 1.0)
    assert drops(effects) == []
    assert len(stored(effects)) == bound
    assert core.refused[ORIGIN_RATE_LIMITED] == 7
    other = core.receive(2, GossipFrame((env(b"from 6", (6, 2)),)), 1.0)
    assert stored(other) == [b"from 6"]


def test_honest_traffic_under_the_origin_quota_never_hits_the_relay_bound() -> None:
    """An origin sending at its full quota (burst, then the rate) for 60 simulated seconds,
    with its messages arriving in bursts of up to twice that: nothing is refused."""
    rate, burst = 50, 100
    core, _ = make_core(origin_rate=rate, origin_burst=burst)
    sent = 0
    now = 1.0
    # The origin's first burst arrives at once; then 2 s of its traffic every 2 s.
    batches = [burst] + [2 * rate] * 30
    for count in batches:
        frame = GossipFrame(tuple(env(b"h%d" % (sent + i), (5, 2)) for i in range(count)))
        sent += count
        assert drops(core.receive(2, frame, now)) == []
        now += 2.0
    assert core.refused[ORIGIN_RATE_LIMITED] == 0
    assert len(core.store) == 0  # the caller persists; the tree saw each once
    assert core.tree.total == sent


# -- a node, over a peer connection ---------------------------------------------------


def test_node_disconnects_a_forging_peer_and_counts_it_in_status() -> None:
    """A real GossipNode (memory reactor) takes an inbound connection from neighbour 2,
    which handshakes and then sends a forged message: the message is not stored, the
    connection is closed, and Status counts one disconnection for forged_id. An honest
    message from the next connection is stored (the node keeps serving)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from gossip.node import GossipNode
    from gossip.topology import generate_config
    from gossip.wire import codec

    config = generate_config(4, name="t")
    reactor = MemoryReactorClock()
    reactor.advance(100.0)
    store = MemoryStore()
    node = GossipNode(config, 1, store, reactor)
    peer = config.node(1).neighbours[0]

    def connect() -> tuple[object, StringTransport]:
        factory = node.links.server_factory()
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        hello = codec.Hello(codec.PROTOCOL_VERSION, "t", peer, 9)
        data = codec.encode(hello)
        proto.dataReceived(len(data).to_bytes(4, "big") + data)
        return proto, transport

    def send(proto: object, frame: codec.AnyFrame) -> None:
        data = codec.encode(frame)
        proto.dataReceived(len(data).to_bytes(4, "big") + data)  # type: ignore[attr-defined]

    proto, transport = connect()
    assert node.links.is_up(peer)
    forged = Envelope(message_id(b"real"), b"forged", (peer,))
    send(proto, GossipFrame((forged,)))
    assert transport.disconnecting
    assert len(store) == 0
    rows = {r["reason"]: r["count"] for r in node.status()["disconnects"]}
    assert rows == {FORGED_ID: 1}
    proto.connectionLost(None)  # type: ignore[attr-defined]
    proto, transport = connect()
    send(proto, GossipFrame((env(b"honest", (peer,)),)))
    node.flush()
    assert not transport.disconnecting
    assert len(store) == 1
