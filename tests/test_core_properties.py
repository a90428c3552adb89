"""Property tests: Flood over GossipCore delivers every message everywhere, in any order.

The network here is deliberately hostile to ordering: pending frames sit in a
list and hypothesis picks which one arrives next, so frames overtake each
other freely (stronger than the TCP FIFO the real links give).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.dissemination import Flood
from gossip.core.effects import DropPeer, Effect, Persist, Send, StreamMessages
from gossip.core.frames import Envelope, GossipFrame, PeerFrame
from gossip.core.message import Message, message_id
from gossip.core.paths import path_problem
from gossip.core.state import GossipCore
from gossip.core.sync import stream_frames
from gossip.store.memory import MemoryStore

Graph = tuple[list[int], list[tuple[int, int]]]


@st.composite
def connected_graphs(draw: st.DrawFn) -> Graph:
    """1..32 nodes with arbitrary distinct ids: a random spanning tree plus extra edges."""
    n = draw(st.integers(1, 32))
    ids = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    edges: set[tuple[int, int]] = set()
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        edges.add((ids[parent], ids[i]))
    if n > 1:
        index = st.integers(0, n - 1)
        for a, b in draw(st.lists(st.tuples(index, index), max_size=2 * n)):
            if a != b and (ids[b], ids[a]) not in edges:
                edges.add((ids[a], ids[b]))
    return ids, sorted(edges)


BODIES = st.one_of(
    st.sampled_from(["a", "b", "hello"]),  # the same text at two nodes is one message
    st.text(min_size=1, max_size=24),
).map(lambda s: s.encode("utf-8"))


class ShuffledNetwork:
    """GossipCores joined by links that deliver pending frames in any order."""

    def __init__(
        self,
        ids: list[int],
        edges: list[tuple[int, int]],
        held: dict[int, list[Message]] | None = None,
    ) -> None:
        self.adjacency: dict[int, set[int]] = {n: set() for n in ids}
        for a, b in edges:
            self.adjacency[a].add(b)
            self.adjacency[b].add(a)
        self.stores = {n: MemoryStore() for n in ids}
        for n, messages in (held or {}).items():  # records in a node's log at start
            for m in messages:
                self.stores[n].add(m)
        self.cores = {
            n: GossipCore(n, self.adjacency[n], self.stores[n], Flood(n), 4096, ids) for n in ids
        }
        self.pending: list[tuple[int, int, PeerFrame]] = []
        self.persisted: Counter[tuple[int, bytes]] = Counter()
        self.drops: list[tuple[int, DropPeer]] = []
        self.origins: dict[bytes, set[int]] = {}
        self.clock = 0.0
        for a, b in edges:
            # Links coming up start re-sync sessions: their frames are delivered in
            # arbitrary order along with the gossip.
            self.apply(a, self.cores[a].peer_up(b, self.clock))
            self.apply(b, self.cores[b].peer_up(a, self.clock))

    def apply(self, node: int, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Persist):
                self.persisted[(node, e.message.id)] += 1
                self.stores[node].add(e.message)
            elif isinstance(e, Send):
                assert e.peer in self.adjacency[node]
                self.pending.append((node, e.peer, e.frame))
            elif isinstance(e, StreamMessages):
                for f in stream_frames(self.stores[node], node, e, self.cores[node].members):
                    self.pending.append((node, e.peer, f))
            else:
                self.drops.append((node, e))

    def submit(self, node: int, body: bytes) -> None:
        self.clock += 1
        result = self.cores[node].submit(body, self.clock)
        if result.new:
            self.origins.setdefault(result.id, set()).add(node)
        self.apply(node, result.effects)

    def deliver(self, index: int) -> None:
        self.clock += 1
        src, dst, frame = self.pending.pop(index)
        self.apply(dst, self.cores[dst].receive(src, frame, self.clock))


def pick(rng: random.Random, order: str, pending: int) -> int:
    """Index of the next frame to deliver: mostly newest/oldest, or uniformly random."""
    if order == "newest" and rng.random() < 0.9:
        return pending - 1
    if order == "oldest" and rng.random() < 0.9:
        return 0
    return rng.randrange(pending)


@settings(max_examples=200, deadline=None)
@given(
    graph=connected_graphs(),
    data=st.data(),
    order=st.sampled_from(["random", "newest", "oldest"]),
    rng=st.randoms(use_true_random=True),
)
def test_flood_delivers_every_message_exactly_once_along_real_walks(
    graph: Graph, data: st.DataObject, order: str, rng: random.Random
) -> None:
    """For any connected graph, any 1..5 messages submitted at any nodes at any moments
    and any delivery order: once nothing is pending, every node holds every message
    exactly once (each Persist at most once per node and id), no DropPeer happened, and
    every stored path is a real walk: origin first, no repeats, consecutive entries
    adjacent, the last entry a neighbour of the holder, and equal to the path its last
    entry stored plus that entry."""
    ids, edges = graph
    node = st.sampled_from(ids)
    submissions = data.draw(
        st.lists(st.tuples(st.integers(0, 300), node, BODIES), min_size=1, max_size=5),
        label="submissions (moment, node, body)",
    )
    submissions.sort(key=lambda s: s[0])
    net = ShuffledNetwork(ids, edges)

    delivered = 0
    queue = list(submissions)
    while queue or net.pending:
        if queue and (not net.pending or queue[0][0] <= delivered):
            _, at, body = queue.pop(0)
            net.submit(at, body)
        else:
            net.deliver(pick(rng, order, len(net.pending)))
            delivered += 1

    assert net.drops == []
    all_ids = set(net.origins)
    assert all(count == 1 for count in net.persisted.values())
    for holder in ids:
        store = net.stores[holder]
        assert len(store) == len(all_ids)
        assert {m.id for m in store.scan(0)} == all_ids
        for m in store.scan(0):
            path = m.path
            if not path:
                assert holder in net.origins[m.id]
                continue
            assert path[0] in net.origins[m.id]
            assert len(set(path)) == len(path)
            assert holder not in path
            for a, b in itertools.pairwise(path):
                assert b in net.adjacency[a]
            assert path[-1] in net.adjacency[holder]
            sender = net.stores[path[-1]].get(m.id)
            assert sender is not None
            assert (*sender.path, path[-1]) == path


def run_out(net: ShuffledNetwork, rng: random.Random) -> None:
    while net.pending:
        net.deliver(rng.randrange(len(net.pending)))


PATH_IDS = st.one_of(st.integers(0, 10_000), st.sampled_from([-1, 2**31]))


@settings(max_examples=150, deadline=None)
@given(graph=connected_graphs(), data=st.data(), rng=st.randoms(use_true_random=True))
def test_a_path_is_accepted_or_refused_once_and_never_costs_a_link(
    graph: Graph, data: st.DataObject, rng: random.Random
) -> None:
    """A message with any path (configured ids or not, repeats, the receiver, as long
    as the cluster or longer) sent by a neighbour: the receiver either stores it or
    refuses it (counted); what it stores it forwards, and no other node refuses a
    forward; no DropPeer anywhere."""
    ids, edges = graph
    if len(ids) < 2:
        return
    a, b = edges[data.draw(st.integers(0, len(edges) - 1), label="link")]
    members = st.sampled_from(ids)
    path = data.draw(st.lists(st.one_of(members, PATH_IDS), max_size=len(ids) + 1), label="path")
    path = (*path, a)
    net = ShuffledNetwork(ids, edges)
    run_out(net, rng)
    body = b"far travelled"
    net.pending.append((a, b, GossipFrame((Envelope(message_id(body), body, path),))))
    run_out(net, rng)
    assert net.drops == []
    stored = message_id(body) in net.stores[b]
    refused = sum(net.cores[b].refused.values())
    assert refused == (0 if stored else 1)
    assert stored == (path_problem(path, a, b, frozenset(ids)) is None)
    assert all(sum(net.cores[n].refused.values()) == 0 for n in ids if n != b)
    assert all(c == 1 for c in net.persisted.values())


@settings(max_examples=100, deadline=None)
@given(graph=connected_graphs(), data=st.data(), rng=st.randoms(use_true_random=True))
def test_old_records_with_any_path_reach_every_node_by_resync(
    graph: Graph, data: st.DataObject, rng: random.Random
) -> None:
    """Records already in a node's log with any stored path (from an old version or
    another cluster file: too long, naming strangers, repeats, the holder or its
    neighbours) reach every node by re-sync, with no refusal and no DropPeer."""
    ids, edges = graph
    holder = data.draw(st.sampled_from(ids), label="holder")
    paths = data.draw(
        st.lists(
            st.lists(st.one_of(st.sampled_from(ids), PATH_IDS), max_size=len(ids) + 2),
            min_size=1,
            max_size=3,
        ),
        label="stored paths",
    )
    old = [
        Message(message_id(f"old {k}".encode()), f"old {k}".encode(), 0.0, tuple(p))
        for k, p in enumerate(paths)
    ]
    net = ShuffledNetwork(ids, edges, {holder: old})
    run_out(net, rng)
    assert net.drops == []
    for n in ids:
        assert all(m.id in net.stores[n] for m in old), n
        assert sum(net.cores[n].refused.values()) == 0
