"""Tests of re-sync (gossip.core.sync): the fingerprint tree, stream_frames, and
SyncEngine sessions as GossipCore runs them, on hand-wired cores and in the simulator.

Byte figures are measured with the real wire encoding (``gossip.wire.codec.encode``)
through the simulator's ``frame_bytes`` hook; run with ``-s`` to see them printed.
"""

from __future__ import annotations

import bisect
import functools
import random
import string
import tracemalloc
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.core import sync
from gossip.core.dissemination import Flood
from gossip.core.effects import DropPeer, Effect, Persist, Send, StreamMessages
from gossip.core.frames import (
    Envelope,
    FpNode,
    PeerFrame,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
    SyncReplyFrame,
    SyncWantFrame,
)
from gossip.core.message import ID_BYTES, Message, message_id
from gossip.core.state import GossipCore
from gossip.core.sync import (
    FANOUT,
    FANOUT_BITS,
    KEY_STRIDE,
    LEAF_LEVEL,
    MASK64,
    MAX_IDS_PER_WANT,
    MAX_NODES_PER_QUERY,
    ROOT,
    SPARSE_MAX_LEAVES,
    SYNC_FRAME_BYTES,
    WANT_WINDOW,
    FingerprintTree,
    key_range,
    make_key,
    split_key,
    stream_frames,
)
from gossip.sim import Simulation
from gossip.store.memory import MemoryStore
from gossip.wire.codec import encode

TOP = b"\xff" * ID_BYTES + b"\x00"  # key_range's hi at the top of the id space
CONTROL = ("SyncQueryFrame", "SyncReplyFrame", "SyncWantFrame")
BODY_BYTES = 100
MEMBERS = frozenset(range(64))  # the configured node ids the cores are told
_ALPHABET = (string.ascii_letters + string.digits).encode()


# -- helpers ------------------------------------------------------------------


def random_body(rng: random.Random, size: int = BODY_BYTES) -> bytes:
    """``size`` bytes of random ASCII: valid UTF-8, and a unique id with overwhelming odds."""
    return bytes(rng.choices(_ALPHABET, k=size))


@functools.cache
def common_bodies(n: int) -> tuple[bytes, ...]:
    """``n`` random 100-byte bodies (cached: several tests share the big common sets)."""
    rng = random.Random(f"common-{n}")
    return tuple(random_body(rng) for _ in range(n))


def holdings(sim: Simulation, node: int, bodies: Iterable[bytes]) -> list[bytes]:
    """Put ``bodies`` straight into ``node``'s store and its core's tree, as if it had
    stored them long ago (much faster than gossiping tens of thousands of messages)."""
    store, tree = sim.stores[node], sim.cores[node].tree
    mids = []
    for body in bodies:
        mid = message_id(body)
        if store.add(Message(mid, body, sim.now, ())):
            tree.add(mid)
        mids.append(mid)
    return mids


def by_kind(
    sim: Simulation, since: Counter[tuple[int, int, str]], *, dst: int | None = None
) -> Counter[str]:
    """Bytes delivered since the snapshot ``since``, per frame kind (to ``dst`` if given)."""
    out: Counter[str] = Counter()
    for (src, to, kind), n in sim.bytes_delivered.items():
        if dst is None or to == dst:
            out[kind] += n - since.get((src, to, kind), 0)
    return out


def frames_since(
    sim: Simulation, since: Counter[tuple[int, int, str]]
) -> dict[tuple[int, int, str], int]:
    """Frames delivered since the snapshot ``since``, per (src, dst, kind), zeros left out."""
    out = {k: n - since.get(k, 0) for k, n in sim.frames_delivered.items()}
    return {k: n for k, n in out.items() if n}


def regular_graph(n: int, degree: int, seed: int) -> list[tuple[int, int]]:
    """A connected simple random ``degree``-regular graph on 0..n-1 (pairing model)."""
    rng = random.Random(seed)
    while True:
        stubs = [v for v in range(n) for _ in range(degree)]
        rng.shuffle(stubs)
        edges: set[tuple[int, int]] = set()
        for a, b in zip(stubs[::2], stubs[1::2], strict=True):
            if a == b or (min(a, b), max(a, b)) in edges:
                break
            edges.add((min(a, b), max(a, b)))
        else:
            if connected(set(range(n)), edges):
                return sorted(edges)


def connected(nodes: set[int], edges: Iterable[tuple[int, int]]) -> bool:
    adj: dict[int, set[int]] = {v: set() for v in nodes}
    for a, b in edges:
        if a in nodes and b in nodes:
            adj[a].add(b)
            adj[b].add(a)
    if not nodes:
        return True
    start = min(nodes)
    seen = {start}
    todo = deque([start])
    while todo:
        for w in adj[todo.popleft()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen == nodes


def two_nodes(
    common: Sequence[bytes], only_a: Sequence[bytes], only_b: Sequence[bytes], seed: int = 1
) -> tuple[Simulation, Counter[tuple[int, int, str]], Counter[tuple[int, int, str]]]:
    """Nodes 0 (A) and 1 (B), one link. While the link is down A and B get the common
    bodies, A ``only_a`` and B ``only_b`` (submitted: stored, sent nowhere). Returns the
    simulation with the link back up and a byte and a frame snapshot taken just before,
    not yet run."""
    sim = Simulation([(0, 1)], seed=seed, frame_bytes=encode)
    sim.run()  # the (empty) sessions of the first link-up
    sim.disconnect(0, 1)
    holdings(sim, 0, common)
    holdings(sim, 1, common)
    for body in only_a:
        sim.submit(0, body)
    for body in only_b:
        sim.submit(1, body)
    byte_snap = Counter(sim.bytes_delivered)
    frame_snap = Counter(sim.frames_delivered)
    sim.connect(0, 1)
    return sim, byte_snap, frame_snap


def make_core(
    node: int, neighbours: Iterable[int], bodies: Iterable[bytes] = (), **options: float
) -> tuple[GossipCore, MemoryStore]:
    """A core over a MemoryStore already holding ``bodies`` (its tree is built from it)."""
    store = MemoryStore()
    for body in bodies:
        store.add(Message(message_id(body), body, 0.0, ()))
    core = GossipCore(node, neighbours, store, Flood(node), 32768, MEMBERS, **options)
    return core, store


class Wire:
    """Hand-wired cores: frames are delivered one at a time, FIFO over all links, and
    each input's effects are carried out at once and in order (Persist into the store,
    Send and StreamMessages queued for delivery), as a node adapter must."""

    def __init__(self, *cores: tuple[GossipCore, MemoryStore]) -> None:
        self.nodes = {core.node_id: (core, store) for core, store in cores}
        self.queue: deque[tuple[int, int, PeerFrame]] = deque()
        self.log: list[tuple[int, int, PeerFrame]] = []
        self.persisted: Counter[bytes] = Counter()

    def apply(self, node: int, effects: list[Effect]) -> None:
        _, store = self.nodes[node]
        for e in effects:
            if isinstance(e, Persist):
                self.persisted[e.message.id] += 1
                assert store.add(e.message), "persisted a message the store already held"
            elif isinstance(e, Send):
                self.queue.append((node, e.peer, e.frame))
            elif isinstance(e, StreamMessages):
                for frame in stream_frames(store, node, e, MEMBERS):
                    self.queue.append((node, e.peer, frame))
            else:
                raise AssertionError(f"unexpected {e}")

    def step(self, now: float) -> tuple[int, int, PeerFrame]:
        src, dst, frame = self.queue.popleft()
        self.log.append((src, dst, frame))
        self.apply(dst, self.nodes[dst][0].receive(src, frame, now))
        return src, dst, frame

    def run(self, now: float) -> None:
        while self.queue:
            self.step(now)


# -- FingerprintTree ----------------------------------------------------------

# Ids at the edges of tree ranges: the very first and last ids, and the first and last
# id of a few nodes at every level.
EDGE_IDS = [
    b"\x00" * ID_BYTES,
    b"\xff" * ID_BYTES,
    b"\x00" * (ID_BYTES - 1) + b"\x01",
    b"\xff" * (ID_BYTES - 1) + b"\xfe",
    *(
        n.to_bytes(ID_BYTES, "big")
        for level in range(1, LEAF_LEVEL + 1)
        for index in (1, 7, FANOUT**level - 1)
        for edge in (index << (8 * ID_BYTES - FANOUT_BITS * level),)
        for n in (edge - 1, edge)
    ),
]


def id_sets() -> list[list[bytes]]:
    rng = random.Random(5)
    return [
        [],
        [rng.randbytes(ID_BYTES)],
        EDGE_IDS,
        [rng.randbytes(ID_BYTES) for _ in range(300)] + EDGE_IDS,
        [rng.randbytes(ID_BYTES) for _ in range(20_000)],
    ]


def brute_force(ids: Iterable[bytes]) -> tuple[list[Counter[int]], list[Counter[int]]]:
    """Per level, the count and the sum (mod 2**64) of first-8-byte prefixes of the ids
    under each node index, straight from the definition."""
    counts: list[Counter[int]] = [Counter() for _ in range(LEAF_LEVEL + 1)]
    sums: list[Counter[int]] = [Counter() for _ in range(LEAF_LEVEL + 1)]
    for mid in ids:
        n = int.from_bytes(mid, "big")
        for level in range(LEAF_LEVEL + 1):
            index = n >> (8 * ID_BYTES - FANOUT_BITS * level)
            counts[level][index] += 1
            sums[level][index] = (sums[level][index] + int.from_bytes(mid[:8], "big")) & MASK64
    return counts, sums


@pytest.mark.parametrize("ids", id_sets(), ids=["empty", "one", "edges", "300+edges", "20000"])
def test_tree_counts_and_sums_equal_brute_force(ids: list[bytes]) -> None:
    """Every node at every level, empty or not, has exactly the count and prefix sum that
    a recomputation from the definition gives; the root's count is ``total``."""
    tree = FingerprintTree(ids)
    counts, sums = brute_force(ids)
    for level in range(LEAF_LEVEL + 1):
        for index in range(FANOUT**level):
            node = tree.node(make_key(level, index))
            assert node == FpNode(make_key(level, index), counts[level][index], sums[level][index])
    assert tree.total == len(ids)


class MainTree:
    """The fingerprint tree as main kept it before it went sparse (dense lists of counts
    and sums, 1.12 MB per tree): the reference for what a node running main's code
    answers on the wire."""

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self.counts = [[0] * FANOUT**lv for lv in range(LEAF_LEVEL + 1)]
        self._sums = [[0] * FANOUT**lv for lv in range(LEAF_LEVEL + 1)]
        for mid in ids:
            self.add(mid)

    def add(self, mid: bytes) -> None:
        n = int.from_bytes(mid, "big")
        x = int.from_bytes(mid[:8], "big")
        for level in range(LEAF_LEVEL + 1):
            index = n >> (8 * ID_BYTES - FANOUT_BITS * level)
            self.counts[level][index] += 1
            self._sums[level][index] += x

    def node(self, key: int) -> FpNode:
        level, index = divmod(key, KEY_STRIDE)
        return FpNode(key, self.counts[level][index], self._sums[level][index] & MASK64)

    def children(self, key: int) -> list[FpNode]:
        level, index = divmod(key, KEY_STRIDE)
        return [
            self.node(make_key(level + 1, i))
            for i in range(index * FANOUT, (index + 1) * FANOUT)
            if self.counts[level + 1][i]
        ]

    @property
    def total(self) -> int:
        return self.counts[0][0]


def assert_same_fingerprints(tree: FingerprintTree, ref: MainTree) -> None:
    """Every node of every level has the same count and sum in both trees: each inner
    node and its list of non-empty children (which also pins the empty ones)."""
    for level in range(LEAF_LEVEL):
        for index in range(FANOUT**level):
            key = make_key(level, index)
            assert tree.node(key) == ref.node(key), key
            assert tree.children(key) == ref.children(key), key


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    ids=st.lists(st.binary(min_size=ID_BYTES, max_size=ID_BYTES), max_size=300),
    edges=st.lists(st.sampled_from(EDGE_IDS), max_size=8),
    sparse_max_leaves=st.sampled_from([0, 1, 5, 40, SPARSE_MAX_LEAVES]),
    split=st.integers(0, 400),
)
def test_sparse_and_dense_fingerprints_agree_for_random_id_sets(
    ids: list[bytes], edges: list[bytes], sparse_max_leaves: int, split: int
) -> None:
    """For any id set (duplicates and range-edge ids included), a tree that starts sparse
    and turns dense at any point (here after 0, 1, 5, 40 or SPARSE_MAX_LEAVES leaves),
    built by add_many and add in any split, gives at every node the count and sum of
    main's dense tree: the keys and fingerprints a node sends in SyncQuery/SyncReply."""
    all_ids = ids + edges
    tree = FingerprintTree(all_ids[:split], sparse_max_leaves=sparse_max_leaves)
    for mid in all_ids[split : split + 50]:
        tree.add(mid)
    tree.add_many(all_ids[split + 50 :])
    ref = MainTree(all_ids)
    assert_same_fingerprints(tree, ref)
    assert tree.total == ref.total == len(all_ids)
    leaves = len({mid[:2] for mid in all_ids})
    # sparse_max_leaves=0 asks for a dense tree from the start.
    assert tree.sparse == (sparse_max_leaves > 0 and leaves <= sparse_max_leaves)


def test_tree_turns_dense_past_the_leaf_limit_and_keeps_its_fingerprints() -> None:
    """A tree stays sparse up to SPARSE_MAX_LEAVES non-empty leaves and turns dense with
    the next new leaf, whether the ids come by add or add_many; before and after, every
    fingerprint equals main's dense tree's."""
    rng = random.Random(12)
    ids: list[bytes] = []
    leaves: set[bytes] = set()
    while len(leaves) < SPARSE_MAX_LEAVES:
        mid = rng.randbytes(ID_BYTES)
        ids.append(mid)
        leaves.add(mid[:2])
    one_by_one, batched = FingerprintTree(), FingerprintTree()
    for mid in ids:
        one_by_one.add(mid)
    batched.add_many(ids)
    for tree in (one_by_one, batched):
        assert tree.sparse
        assert_same_fingerprints(tree, MainTree(ids))
    extra = next(m for m in iter(lambda: rng.randbytes(ID_BYTES), None) if m[:2] not in leaves)
    one_by_one.add(extra)
    batched.add_many([extra, *ids[:10]])
    assert not one_by_one.sparse and not batched.sparse
    assert_same_fingerprints(one_by_one, MainTree([*ids, extra]))
    assert_same_fingerprints(batched, MainTree([*ids, extra, *ids[:10]]))


def traced_bytes(make: Callable[[], object]) -> int:
    """Bytes allocated (and still held) while ``make`` builds its object."""
    tracemalloc.start()
    try:
        kept = make()
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return size


def test_a_tree_with_few_ids_costs_little_and_never_more_than_the_dense_form() -> None:
    """An empty tree costs about a kilobyte and one of 1,000 ids about 250 B per id
    (main's dense tree: 1.12 MB at any size, which made 10,000 simulated nodes need
    26 GB); at the leaf limit, the last size before it turns dense, the sparse form is
    still smaller than the dense one holding the same ids."""
    rng = random.Random(13)
    ids = [rng.randbytes(ID_BYTES) for _ in range(1_000)]
    assert traced_bytes(FingerprintTree) < 4_000
    assert traced_bytes(lambda: FingerprintTree(ids)) < 400_000
    at_limit: list[bytes] = []
    leaves: set[bytes] = set()
    while len(leaves) < SPARSE_MAX_LEAVES:
        at_limit.append(rng.randbytes(ID_BYTES))
        leaves.add(at_limit[-1][:2])
    sparse = traced_bytes(lambda: FingerprintTree(at_limit))
    dense = traced_bytes(lambda: FingerprintTree(at_limit, sparse_max_leaves=0))
    assert sparse < dense


@pytest.mark.parametrize("common", [100, 6_000], ids=["sparse", "dense"])
@pytest.mark.parametrize("main_side", [0, 1], ids=["main-initiates-first", "main-answers-first"])
def test_a_node_with_the_new_tree_reconciles_with_a_node_running_mains_tree(
    common: int, main_side: int
) -> None:
    """One node of two keeps main's dense tree (what a node running main's code sends),
    the other the new one (sparse with 100 common messages, dense with 6,000): after the
    link comes back each holds the union and pulled exactly what it lacked."""
    rng = random.Random(14)
    only_a = [random_body(rng) for _ in range(150)]
    only_b = [random_body(rng) for _ in range(250)]
    sim = Simulation([(0, 1)], seed=14)
    sim.run()
    sim.disconnect(0, 1)
    ref = MainTree()
    sim.cores[main_side].tree = sim.cores[main_side].sync.tree = ref  # type: ignore[assignment]
    holdings(sim, 0, common_bodies(common))
    holdings(sim, 1, common_bodies(common))
    for body in only_a:
        sim.submit(0, body)
    for body in only_b:
        sim.submit(1, body)
    new_tree = sim.cores[1 - main_side].tree
    assert new_tree.sparse == (common == 100)
    sim.connect(0, 1)
    sim.run()
    union = {message_id(b) for b in (*common_bodies(common), *only_a, *only_b)}
    for n in (0, 1):
        assert set(sim.stores[n].ids()) == union
    assert new_tree.total == ref.total == len(union)
    assert sim.sync_received == {0: 250, 1: 150}
    assert sim.drops == []


def test_tree_built_incrementally_equals_tree_built_at_once() -> None:
    """add() one id at a time gives the same tree as the constructor over the same ids."""
    rng = random.Random(6)
    ids = [rng.randbytes(ID_BYTES) for _ in range(1000)] + EDGE_IDS
    at_once = FingerprintTree(ids)
    incremental = FingerprintTree()
    for mid in reversed(ids):
        incremental.add(mid)
    assert incremental.counts == at_once.counts
    assert incremental.sums == at_once.sums


@pytest.mark.parametrize("ids", id_sets(), ids=["empty", "one", "edges", "300+edges", "20000"])
def test_children_lists_exactly_the_nonempty_children(ids: list[bytes]) -> None:
    """children(key) of every inner node is its non-empty children, in index order, with
    their fingerprints; a node's children's counts and sums add up to its own."""
    tree = FingerprintTree(ids)
    for level in range(LEAF_LEVEL):
        for index in range(FANOUT**level):
            key = make_key(level, index)
            expected = [
                tree.node(make_key(level + 1, index * FANOUT + i))
                for i in range(FANOUT)
                if tree.node(make_key(level + 1, index * FANOUT + i)).count
            ]
            kids = tree.children(key)
            assert kids == expected
            parent = tree.node(key)
            assert sum(k.count for k in kids) == parent.count
            assert sum(k.sum for k in kids) & MASK64 == parent.sum


@pytest.mark.parametrize("ids", id_sets(), ids=["empty", "one", "edges", "300+edges", "20000"])
def test_key_range_holds_exactly_the_ids_counted_under_a_node(ids: list[bytes]) -> None:
    """For every node at every level, the ids inside key_range(key) = [lo, hi) are exactly
    as many as the tree counts there, with the same prefix sum (edge ids included: 0x00..,
    0xff.., and the first and last id of nodes)."""
    tree = FingerprintTree(ids)
    ordered = sorted(ids)
    prefix_sums = [0]
    for mid in ordered:
        prefix_sums.append(prefix_sums[-1] + int.from_bytes(mid[:8], "big"))
    for level in range(LEAF_LEVEL + 1):
        for index in range(FANOUT**level):
            key = make_key(level, index)
            lo, hi = key_range(key)
            i, j = bisect.bisect_left(ordered, lo), bisect.bisect_left(ordered, hi)
            node = tree.node(key)
            assert node.count == j - i, (level, index)
            assert node.sum == (prefix_sums[j] - prefix_sums[i]) & MASK64


def test_key_ranges_tile_the_id_space_at_every_level() -> None:
    """At each level the ranges are contiguous and cover all ids: the first starts at
    0x00.., each starts where the previous ended, the last ends past 0xff.. (17 bytes);
    every range is 16 bytes at lo, and a node's children split its range exactly."""
    for level in range(LEAF_LEVEL + 1):
        start = b"\x00" * ID_BYTES
        for index in range(FANOUT**level):
            lo, hi = key_range(make_key(level, index))
            assert lo == start
            assert len(lo) == ID_BYTES
            assert lo < hi
            start = hi
        assert start == TOP
        assert b"\xff" * ID_BYTES < TOP
    for key in (ROOT, make_key(1, 0), make_key(2, 255), make_key(3, 2047)):
        level, index = divmod(key, KEY_STRIDE)
        first = key_range(make_key(level + 1, index * FANOUT))
        last = key_range(make_key(level + 1, index * FANOUT + FANOUT - 1))
        assert (first[0], last[1]) == key_range(key)


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        (ROOT, (0, 0)),
        (make_key(1, 15), (1, 15)),
        (make_key(2, 255), (2, 255)),
        (make_key(3, 4095), (3, 4095)),
        (make_key(4, 0), (4, 0)),
        (make_key(4, 65535), (4, 65535)),
    ],
)
def test_split_key_accepts_valid_keys(key: int, parts: tuple[int, int]) -> None:
    """Valid keys (level 0..4, index < 16**level) split into (level, index)."""
    assert split_key(key) == parts
    assert make_key(*parts) == key


@pytest.mark.parametrize(
    "key",
    [
        make_key(0, 1),
        make_key(1, 16),
        make_key(2, 256),
        make_key(3, 4096),
        make_key(3, KEY_STRIDE - 1),
        make_key(5, 0),
        make_key(LEAF_LEVEL + 1, 3),
        2**32 - 1,
        -1,
        -KEY_STRIDE + 1,
    ],
)
def test_split_key_rejects_bad_keys(key: int) -> None:
    """Keys past a level's last index, below the root or deeper than the leaves are not
    keys: split_key gives None and key_range raises ValueError."""
    assert split_key(key) is None
    with pytest.raises(ValueError):
        key_range(key)


@pytest.mark.parametrize("key", [-KEY_STRIDE, -2 * KEY_STRIDE])
def test_split_key_rejects_negative_keys(key: int) -> None:
    """A negative key is not a key. (divmod gives level -1, index 0, and 0 < 16**-1, so
    split_key returns (-1, 0) and tree.node() would read the leaf array by Python's
    negative indexing. The wire's uint32 cannot carry it; a core-level caller can.)"""
    assert split_key(key) is None


# -- stream_frames ------------------------------------------------------------


def test_stream_frames_splits_by_size_and_marks_only_the_last_done() -> None:
    """Streaming a whole-tree range sends every held message once, in frames of about
    SYNC_FRAME_BYTES, with id left empty and the responder appended to the stored path;
    only the last frame is done. An empty order gives one empty done frame."""
    rng = random.Random(8)
    store = MemoryStore()
    for i in range(2000):
        body = random_body(rng)
        store.add(Message(message_id(body), body, 0.0, (i % 3,)))  # never the receiver, 3
    frames = list(stream_frames(store, 9, StreamMessages(3, 42, (), (ROOT,)), MEMBERS))
    assert len(frames) > 2
    assert [f.done for f in frames] == [False] * (len(frames) - 1) + [True]
    assert {f.session for f in frames} == {42}
    sent = [env for f in frames for env in f.messages]
    assert sorted(message_id(e.body) for e in sent) == sorted(store.ids())
    for env in sent:
        stored = store.get(message_id(env.body))
        assert stored is not None
        assert env.id == b""
        assert env.path == (*stored.path, 9)
    for f in frames:
        assert len(encode(f)) < SYNC_FRAME_BYTES + 2 * (BODY_BYTES + 20)
    assert list(stream_frames(store, 9, StreamMessages(3, 1, (), ()), MEMBERS)) == [
        SyncDataFrame(1, (), True)
    ]


def test_stream_frames_sends_listed_ids_then_ranges() -> None:
    """Ids come first, in the order asked, then each range's messages; unknown ids are
    skipped."""
    bodies = [f"m{i}".encode() for i in range(50)]
    store = MemoryStore()
    for body in bodies:
        store.add(Message(message_id(body), body, 0.0, ()))
    mids = [message_id(b) for b in bodies]
    leaf = make_key(LEAF_LEVEL, int.from_bytes(mids[0][:2], "big"))
    asked = (mids[3], b"\x01" * ID_BYTES, mids[1])
    (frame,) = stream_frames(store, 0, StreamMessages(1, 7, asked, (leaf,)), MEMBERS)
    got = [message_id(e.body) for e in frame.messages]
    lo, hi = key_range(leaf)
    assert got == [mids[3], mids[1], *sorted(m for m in mids if lo <= m < hi)]


# -- sessions between two nodes -----------------------------------------------


def test_nodes_in_sync_spend_one_query_and_one_empty_reply_per_session() -> None:
    """Two nodes holding the same 5,000 messages: a session is one query and one empty
    reply, nothing else, both at link-up (one session each way) and for every periodic
    session after; the frames are a few bytes each."""
    sim, byte_snap, frame_snap = two_nodes(common_bodies(5_000), (), ())
    sim.run()
    started = [sim.cores[n].sync.counters.sessions_started for n in (0, 1)]
    assert started == [2, 2]  # the first link-up's and this one's
    assert frames_since(sim, frame_snap) == {
        (0, 1, "SyncQueryFrame"): 1,
        (1, 0, "SyncReplyFrame"): 1,
        (1, 0, "SyncQueryFrame"): 1,
        (0, 1, "SyncReplyFrame"): 1,
    }
    sizes = by_kind(sim, byte_snap)
    print(f"\nin sync, 5000 messages: link-up bytes {dict(sizes)}")
    assert sizes["SyncQueryFrame"] <= 2 * 32
    assert sizes["SyncReplyFrame"] <= 2 * 8

    frame_snap = Counter(sim.frames_delivered)
    sim.run(until=sim.now + 65.0)  # the default interval is 10 s: ~6 periodic sessions each
    periodic = [sim.cores[n].sync.counters.sessions_started - started[n] for n in (0, 1)]
    assert min(periodic) >= 5
    assert frames_since(sim, frame_snap) == {
        (0, 1, "SyncQueryFrame"): periodic[0],
        (1, 0, "SyncReplyFrame"): periodic[0],
        (1, 0, "SyncQueryFrame"): periodic[1],
        (0, 1, "SyncReplyFrame"): periodic[1],
    }
    for n in (0, 1):
        counters = sim.cores[n].sync.counters
        assert counters.sessions_completed == counters.sessions_started
        assert counters.sessions_aborted == 0
    assert len(sim.stores[0]) == len(sim.stores[1]) == 5_000


@pytest.mark.parametrize("missing", [10, 1_000, 10_000])
def test_pulled_payload_is_close_to_the_missed_body_bytes(missing: int) -> None:
    """A and B share 20,000 messages; B also holds ``missing`` 100-byte messages A lacks.
    After the link comes back A holds every one, each persisted once, pulled as
    exactly ``missing`` SyncData envelopes; the SyncData bytes A receives are at most
    1.2 x the missed body bytes plus a fixed overhead, and B receives no SyncData."""
    rng = random.Random(missing)
    extra = [random_body(rng) for _ in range(missing)]
    sim, byte_snap, _ = two_nodes(common_bodies(20_000), (), extra)
    received = dict(sim.sync_received)
    sim.run()
    assert all(message_id(b) in sim.stores[0] for b in extra)
    assert len(sim.stores[0]) == len(sim.stores[1]) == 20_000 + missing
    assert sim.persist_conflicts == 0
    assert sim.sync_received[0] - received[0] == missing
    assert sim.sync_received[1] - received[1] == 0
    assert sim.drops == []
    to_a, to_b = by_kind(sim, byte_snap, dst=0), by_kind(sim, byte_snap, dst=1)
    body_bytes = missing * BODY_BYTES
    control = sum(to_a[k] + to_b[k] for k in CONTROL)
    print(
        f"\ncommon=20000 missing={missing}: SyncData {to_a['SyncDataFrame']} B "
        f"= {to_a['SyncDataFrame'] / body_bytes:.3f} x bodies; control {control} B"
    )
    assert to_a["SyncDataFrame"] <= 1.2 * body_bytes + 256
    assert to_b["SyncDataFrame"] == 0


def test_control_bytes_grow_with_the_difference_not_with_the_common_set() -> None:
    """Queries, replies and wants (both sessions, both directions) for 10 missing messages
    cost about the same over 2,000 common messages as over 40,000 (< 3x), and far less
    than listing the common ids would (16 bytes each)."""
    control = {}
    for common in (2_000, 40_000):
        rng = random.Random(common)
        extra = [random_body(rng) for _ in range(10)]
        sim, byte_snap, _ = two_nodes(common_bodies(common), (), extra)
        sim.run()
        assert all(message_id(b) in sim.stores[0] for b in extra)
        sizes = by_kind(sim, byte_snap)
        control[common] = sum(sizes[k] for k in CONTROL)
        print(f"\ncommon={common} missing=10: control bytes {control[common]} {dict(sizes)}")
    assert control[40_000] < 3 * control[2_000]
    assert control[40_000] < 16 * 40_000 / 20


def test_symmetric_differences_end_with_the_union_on_both_sides() -> None:
    """A and B each hold messages the other lacks (and 3,000 in common): after the link
    comes back both hold the union; each pulled exactly what it lacked, once."""
    rng = random.Random(11)
    only_a = [random_body(rng) for _ in range(300)]
    only_b = [random_body(rng) for _ in range(700)]
    sim, _, _ = two_nodes(common_bodies(3_000), only_a, only_b)
    sim.run()
    union = {message_id(b) for b in (*common_bodies(3_000), *only_a, *only_b)}
    for n in (0, 1):
        assert set(sim.stores[n].ids()) == union
        assert sim.cores[n].tree.total == len(union)
    assert sim.sync_received == {0: 700, 1: 300}
    assert sim.persist_conflicts == 0
    assert sim.drops == []


def test_empty_node_pulls_everything_with_one_range_want() -> None:
    """An initiator holding nothing skips the walk: one SyncWant for the root range,
    answered with every message."""
    sim, _, frame_snap = two_nodes((), (), common_bodies(2_000))
    sim.run()
    assert len(sim.stores[0]) == 2_000
    frames = frames_since(sim, frame_snap)
    assert frames[(0, 1, "SyncWantFrame")] == 1
    assert (0, 1, "SyncQueryFrame") not in frames


# -- sessions in a cluster ----------------------------------------------------


def test_restarted_node_pulls_what_it_missed_once_not_from_every_neighbour() -> None:
    """A node of a 16-node 3-regular graph is cut off (all links down) while 1,000
    messages are submitted elsewhere, then reconnected to all three neighbours at once.
    It runs one session at a time, so it pulls the 1,000 messages from one neighbour
    only: it receives 1,000 SyncData envelopes in all, and nobody else receives any."""
    edges = regular_graph(16, 3, seed=3)
    sim = Simulation(edges, seed=3, latency=0.005)
    rng = random.Random(3)
    node = next(v for v in range(16) if connected(set(range(16)) - {v}, edges))
    for i in range(100):
        sim.submit(rng.randrange(16), f"before {i}".encode())
    sim.run()
    assert all(len(sim.stores[n]) == 100 for n in sim.nodes)
    neighbours = sorted(sim.neighbours[node])
    for peer in neighbours:
        sim.disconnect(node, peer)
    others = [v for v in range(16) if v != node]
    missed = [sim.submit(rng.choice(others), f"missed {i}".encode()) for i in range(1_000)]
    sim.run()
    assert all(len(sim.stores[n]) == 1_100 for n in others)
    assert len(sim.stores[node]) == 100
    received = dict(sim.sync_received)
    started = sim.cores[node].sync.counters.sessions_started
    for peer in neighbours:
        sim.connect(node, peer)
    sim.run()
    assert all(mid in sim.stores[node] for mid in missed)
    assert sim.sync_received[node] - received[node] == 1_000
    assert all(sim.sync_received[n] == received[n] for n in others)
    # A session with each neighbour ran (one at a time); only the first pulled anything.
    assert sim.cores[node].sync.counters.sessions_started - started >= 3
    assert sim.persist_conflicts == 0
    assert sim.drops == []


def test_partition_heal_reaches_every_node_with_one_pull_per_missing_pair() -> None:
    """A 16-node 3-regular graph is cut in two connected halves; messages submitted on
    both sides spread within each side. After the cut heals every node holds every
    message; messages learned by re-sync are not forwarded (no gossip after the heal),
    hints spread them, and each (node, missing message) pair costs one SyncData
    envelope (at most 5% more)."""
    for seed in range(100):
        edges = regular_graph(16, 3, seed)
        adj: dict[int, set[int]] = {v: set() for v in range(16)}
        for a, b in edges:
            adj[a].add(b)
            adj[b].add(a)
        order, todo = [0], deque([0])
        while todo:
            for w in sorted(adj[todo.popleft()]):
                if w not in order:
                    order.append(w)
                    todo.append(w)
        left = set(order[:8])
        right = set(range(16)) - left
        if connected(left, edges) and connected(right, edges):
            break
    else:
        raise AssertionError("no graph with two connected halves")
    cut = [(a, b) for a, b in edges if (a in left) != (b in left)]
    assert cut
    sim = Simulation(edges, seed=seed, latency=0.005)
    sim.run()
    for a, b in cut:
        sim.disconnect(a, b)
    rng = random.Random(seed)
    mids: dict[str, list[bytes]] = {"left": [], "right": []}
    for i in range(300):
        side, nodes = ("left", left) if i % 3 else ("right", right)
        mids[side].append(sim.submit(rng.choice(sorted(nodes)), f"{side} {i}".encode()))
    sim.run()
    pairs = len(left) * len(mids["right"]) + len(right) * len(mids["left"])
    received = sum(sim.sync_received.values())
    gossip = sum(sim.received.values())
    hints = sum(n for (_, _, kind), n in sim.frames_delivered.items() if kind == "SyncHintFrame")
    for a, b in cut:
        sim.connect(a, b)
    sim.run()
    every = {*mids["left"], *mids["right"]}
    for n in sim.nodes:
        assert set(sim.stores[n].ids()) == every
    pulled = sum(sim.sync_received.values()) - received
    new_hints = (
        sum(n for (_, _, kind), n in sim.frames_delivered.items() if kind == "SyncHintFrame")
        - hints
    )
    print(
        f"\npartition heal: {pairs} missing pairs, {pulled} SyncData envelopes, {new_hints} hints"
    )
    assert sum(sim.received.values()) == gossip
    assert new_hints > 0
    assert pairs <= pulled <= 1.05 * pairs + 5
    assert sim.persist_conflicts == 0
    assert sim.drops == []


def test_periodic_anti_entropy_repairs_what_a_lossy_flood_missed() -> None:
    """With 20% of all frames lost, Flood leaves some (node, message) pairs missing;
    with ticks running, periodic sessions (interval 2 s, timeout 3 s, passed through
    core_options) that lose frames time out and the next ones repair the rest: every
    node ends with every message."""
    edges = regular_graph(16, 3, seed=4)
    sim = Simulation(
        edges,
        seed=4,
        loss=0.2,
        latency=0.005,
        core_options={"sync_interval": 2.0, "sync_timeout": 3.0},
    )
    assert sim.cores[0].sync.interval == 2.0
    assert sim.cores[0].sync.timeout == 3.0
    sim.run(until=1.0)
    rng = random.Random(4)
    mids = [sim.submit(rng.randrange(16), f"lossy {i}".encode()) for i in range(60)]
    sim.run(until=1.5)  # flood is done; no periodic session has come due yet
    missing = sum(1 for n in sim.nodes for mid in mids if mid not in sim.stores[n])
    assert missing > 0
    sim.run(until=120.0)
    for n in sim.nodes:
        assert all(mid in sim.stores[n] for mid in mids), n
    aborted = sum(sim.cores[n].sync.counters.sessions_aborted for n in sim.nodes)
    print(
        f"\nloss 0.2: {missing} (node, message) pairs missed by flood, "
        f"{sim.frames_lost} frames lost, {aborted} sessions timed out"
    )
    assert aborted > 0
    assert sim.persist_conflicts == 0
    assert sim.drops == []


# -- flow control -------------------------------------------------------------


def half_missing(total: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """``total`` random bodies and the half of them (every other one) a node kept."""
    rng = random.Random(seed)
    bodies = [random_body(rng) for _ in range(total)]
    return bodies, bodies[::2]


def wants_in_flight(log: list[tuple[int, int, PeerFrame]], initiator: int) -> list[int]:
    """After each frame of ``log``: SyncWants the initiator sent minus the done SyncData
    frames it received."""
    out, n = [], 0
    for src, dst, frame in log:
        if src == initiator and isinstance(frame, SyncWantFrame):
            n += 1
        elif dst == initiator and isinstance(frame, SyncDataFrame) and frame.done:
            n -= 1
        out.append(n)
    return out


def test_initiator_never_has_more_than_the_window_of_wants_in_flight() -> None:
    """A node that lost half of 40,000 messages learns of ~20,000 missing ids across many
    replies (one want each, before: far more at once than the responder allows). It
    sends its wants so that at no point are more than WANT_WINDOW unanswered, sends more
    than WANT_WINDOW in all (the window refills as answers end), and ends holding
    every message, each persisted once."""
    bodies, kept = half_missing(40_000, seed=21)
    a, a_store = make_core(1, (2,), kept)
    b, b_store = make_core(2, (1,), bodies)
    wire = Wire((a, a_store), (b, b_store))
    wire.apply(1, a.peer_up(2, 0.0))
    b.peer_up(1, 0.0)  # only A's session matters here
    wire.run(1.0)
    in_flight = wants_in_flight(wire.log, 1)
    wants = [f for src, _, f in wire.log if src == 1 and isinstance(f, SyncWantFrame)]
    assert max(in_flight) == WANT_WINDOW
    assert len(wants) > WANT_WINDOW
    assert all(len(w.ids) <= MAX_IDS_PER_WANT for w in wants)
    assert len(a_store) == 40_000
    assert set(wire.persisted.values()) == {1}
    assert a.sync.active is None
    assert a.sync.counters.sessions_completed == 1


def test_what_was_pulled_before_a_link_drop_is_kept_and_not_asked_for_again() -> None:
    """The link drops in the middle of a large pull (after the initiator stored some of
    what it lacked): the session is aborted, the pulled messages stay stored and in the
    tree, and the session on the next link-up asks only for the ids still missing (none
    of the ones already held) and completes the pull."""
    bodies, kept = half_missing(20_000, seed=22)
    a, a_store = make_core(1, (2,), kept)
    b, b_store = make_core(2, (1,), bodies)
    wire = Wire((a, a_store), (b, b_store))
    wire.apply(1, a.peer_up(2, 0.0))
    b.peer_up(1, 0.0)
    while len(a_store) < 14_000:
        wire.step(1.0)
    wire.queue.clear()  # the link drops: what was in flight is lost
    a.peer_down(2, 2.0)
    b.peer_down(1, 2.0)
    assert a.sync.counters.sessions_aborted == 1
    held = set(a_store.ids())
    assert a.tree.total == len(held) < 20_000
    cut = len(wire.log)
    wire.apply(1, a.peer_up(2, 3.0))
    b.peer_up(1, 3.0)
    wire.run(4.0)
    asked = [
        mid
        for src, _, f in wire.log[cut:]
        if src == 1 and isinstance(f, SyncWantFrame)
        for mid in f.ids
    ]
    assert not held & set(asked)
    assert len(asked) == 20_000 - len(held)
    assert len(a_store) == 20_000
    assert set(wire.persisted.values()) == {1}
    assert a.sync.counters.sessions_completed == 1


# -- aborts -------------------------------------------------------------------


def test_session_whose_peer_goes_down_is_aborted_and_the_next_peer_tried() -> None:
    """Node 0's session with 1 (queued: 2) is aborted when the link to 1 goes down; the
    session with 2 starts at once and completes."""
    sim = Simulation([(0, 1), (0, 2)], seed=0, latency=1.0)
    engine = sim.cores[0].sync
    assert engine.active is not None
    assert engine.active.peer == 1
    assert list(engine.queue) == [2]
    sim.disconnect(0, 1)
    assert engine.counters.sessions_aborted == 1
    assert engine.active is not None
    assert engine.active.peer == 2
    assert engine.counters.sessions_started == 2
    sim.run()
    assert engine.active is None
    assert engine.counters.sessions_completed == 1


def test_session_without_progress_for_the_timeout_is_aborted_on_tick() -> None:
    """A session is aborted on the first tick more than sync_timeout after its last
    progress (a reply counts as progress), and the queued peer's session starts; a late
    reply for the aborted session is ignored."""
    rng = random.Random(12)
    a, _ = make_core(1, (2, 3), [random_body(rng) for _ in range(200)], sync_timeout=30.0)
    b, _ = make_core(2, (1,), [random_body(rng) for _ in range(200)])
    (query,) = a.peer_up(2, 0.0)
    assert isinstance(query, Send)
    assert isinstance(query.frame, SyncQueryFrame)
    assert a.peer_up(3, 0.0) == []  # queued behind the session with 2
    b.peer_up(1, 0.0)
    (reply,) = b.receive(1, query.frame, 0.0)
    assert isinstance(reply, Send)
    assert isinstance(reply.frame, SyncReplyFrame)
    more = a.receive(2, reply.frame, 20.0)  # progress at t=20: asks for ids next
    assert more
    assert all(isinstance(e, Send) and e.peer == 2 for e in more)
    session = a.sync.active
    assert session is not None
    assert a.tick(45.0) == []  # 45 s since start, 25 s since progress
    assert a.tick(50.0) == []  # exactly the timeout: not yet
    assert a.sync.active is session
    assert a.sync.counters.sessions_aborted == 0
    started = a.tick(50.5)
    assert a.sync.counters.sessions_aborted == 1
    assert [(e.peer, type(e.frame)) for e in started if isinstance(e, Send)] == [
        (3, SyncQueryFrame)
    ]
    assert a.sync.active is not None
    assert a.sync.active.peer == 3
    assert a.receive(2, reply.frame, 51.0) == []  # for the session given up on


# -- responder validation -----------------------------------------------------


def _good_node(key: int = ROOT) -> FpNode:
    return FpNode(key, 1, 1)


BAD_FRAMES: list[tuple[str, PeerFrame]] = [
    (
        "query-too-many-nodes",
        SyncQueryFrame(
            1,
            tuple(_good_node(make_key(3, i)) for i in range(MAX_NODES_PER_QUERY)),
            (_good_node(),),
        ),
    ),
    ("query-children-of-leaf", SyncQueryFrame(1, (_good_node(make_key(LEAF_LEVEL, 9)),), ())),
    ("query-children-bad-key", SyncQueryFrame(1, (_good_node(make_key(2, 256)),), ())),
    ("query-children-too-deep", SyncQueryFrame(1, (_good_node(make_key(5, 0)),), ())),
    ("query-ids-bad-key", SyncQueryFrame(1, (), (_good_node(make_key(1, 16)),))),
    ("want-bad-range", SyncWantFrame(1, (), (ROOT, make_key(LEAF_LEVEL + 1, 0)))),
    ("want-too-many-ids", SyncWantFrame(1, (b"\x00" * ID_BYTES,) * (MAX_IDS_PER_WANT + 1), ())),
    (
        "want-too-many-ranges",
        SyncWantFrame(1, (), tuple(make_key(4, i) for i in range(MAX_NODES_PER_QUERY + 1))),
    ),
    (
        "data-id-not-body",
        SyncDataFrame(1, (Envelope(message_id(b"right"), b"wrong", (2,)),), True),
    ),
    ("data-not-utf8", SyncDataFrame(1, (Envelope(b"", b"\xff\xfe", (2,)),), True)),
]


@pytest.mark.parametrize("frame", [f for _, f in BAD_FRAMES], ids=[n for n, _ in BAD_FRAMES])
def test_bad_sync_frames_drop_the_peer(frame: PeerFrame) -> None:
    """A query over MAX_NODES_PER_QUERY nodes, for children of a leaf or of a bad key, for
    ids of a bad key; a want with a bad range key or too many ids or ranges; SyncData
    whose envelope id does not match its body (or is otherwise bad): GossipCore.receive
    answers with exactly one DropPeer for the sender, and stores nothing."""
    core, store = make_core(1, (2, 3), [b"held"])
    core.peer_up(2, 0.0)
    core.peer_up(3, 0.0)
    effects = core.receive(2, frame, 1.0)
    assert len(effects) == 1
    assert isinstance(effects[0], DropPeer)
    assert effects[0].peer == 2
    assert len(store) == 1


def test_sync_data_with_a_refused_path_drops_the_message_not_the_link() -> None:
    """SyncData whose envelope has a path the receiver refuses (not ending with the
    sender, naming the receiver, as long as the cluster) loses that message only: it is
    counted, not stored, the others are, and no DropPeer comes."""
    core, _ = make_core(1, (2, 3), [b"held"])
    core.peer_up(2, 0.0)
    messages = (
        Envelope(b"", b"not from 2", (3,)),
        Envelope(b"", b"fine", (4, 2)),
        Envelope(b"", b"loop", (1, 2)),
        Envelope(b"", b"long", (*range(5, 5 + len(MEMBERS) - 1), 2)),
    )
    effects = core.receive(2, SyncDataFrame(1, messages, True), 1.0)
    assert not any(isinstance(e, DropPeer) for e in effects)
    assert [e.message.body for e in effects if isinstance(e, Persist)] == [b"fine"]
    assert core.refused["path_not_from_sender"] == 1
    assert core.refused["path_has_receiver"] == 1
    assert core.refused["path_too_long"] == 1


def test_resync_of_an_old_record_with_a_path_the_receiver_refuses_keeps_the_link() -> None:
    """A record from an old log whose stored path is as long as the cluster, names the
    receiver, repeats a node and names an id no longer configured is still pulled by
    re-sync: the responder sends it with a path the receiver accepts (its own entries,
    less those), the receiver stores it, nothing is refused and no link is dropped."""
    a, a_store = make_core(1, (2,))
    b, b_store = make_core(2, (1,))
    old_path = (7, 1, 9999, *range(3, 3 + len(MEMBERS) - 4), 7)
    assert len(old_path) == len(MEMBERS)
    b_store.add(Message(message_id(b"old"), b"old", 0.0, old_path))
    b_store.add(Message(message_id(b"new"), b"new", 0.0, (5, 6)))
    wire = Wire((a, a_store), (b, b_store))  # a DropPeer fails the test in Wire.apply
    wire.apply(1, a.peer_up(2, 0.0))
    b.peer_up(1, 0.0)
    wire.run(1.0)
    got = a_store.get(message_id(b"old"))
    assert got is not None
    assert got.path == (7, *(n for n in range(3, 3 + len(MEMBERS) - 4) if n != 7), 2)
    new = a_store.get(message_id(b"new"))
    assert new is not None and new.path == (5, 6, 2)
    assert sum(a.refused.values()) == 0


def test_query_at_the_limits_is_answered() -> None:
    """A query of exactly MAX_NODES_PER_QUERY nodes (the deepest inner level for children,
    leaves for ids) is valid: the responder replies instead of dropping the peer."""
    core, _ = make_core(1, (2,), [b"held"])
    core.peer_up(2, 0.0)
    half = MAX_NODES_PER_QUERY // 2
    q = SyncQueryFrame(
        5,
        tuple(_good_node(make_key(LEAF_LEVEL - 1, i)) for i in range(half)),
        tuple(_good_node(make_key(LEAF_LEVEL, i)) for i in range(half)),
    )
    (effect,) = core.receive(2, q, 1.0)
    assert isinstance(effect, Send)
    assert isinstance(effect.frame, SyncReplyFrame)
    assert effect.frame.session == 5


def test_duplicate_envelope_in_one_sync_data_frame_is_stored_once() -> None:
    """A SyncData frame carrying the same message twice stores it once and counts it once
    in the fingerprint tree (as a Gossip frame does): otherwise the tree disagrees with
    the store for good and every later session with every peer walks down to it."""
    core, _ = make_core(1, (2,))
    core.peer_up(2, 0.0)
    env = Envelope(b"", b"twice", (2,))
    effects = core.receive(2, SyncDataFrame(1, (env, env), True), 1.0)  # the link-up session
    assert len([e for e in effects if isinstance(e, Persist)]) == 1
    assert core.tree.total == 1


# -- hints --------------------------------------------------------------------


@pytest.mark.parametrize("hinted", [False, True])
def test_hint_from_the_running_sessions_peer_runs_another_session_after(hinted: bool) -> None:
    """A SyncHint from the peer of the running session sets its ``again`` flag: when the
    session ends another one with the same peer starts (without the hint, none does).
    A hint from an idle peer starts a session with it at once."""
    bodies = [f"shared {i}".encode() for i in range(100)]
    a, a_store = make_core(1, (2,), bodies)
    b, b_store = make_core(2, (1,), bodies)
    wire = Wire((a, a_store), (b, b_store))
    wire.apply(1, a.peer_up(2, 0.0))
    b.peer_up(1, 0.0)  # B's own session with A is not delivered: only A's matters here
    if hinted:
        assert a.receive(2, SyncHintFrame(), 0.0) == []
        assert a.sync.active is not None
        assert a.sync.active.again
    wire.run(1.0)
    counters = a.sync.counters
    assert counters.sessions_started == (2 if hinted else 1)
    assert counters.sessions_completed == (2 if hinted else 1)
    queries = [f for src, _, f in wire.log if src == 1 and isinstance(f, SyncQueryFrame)]
    assert [q.session for q in queries] == ([1, 2] if hinted else [1])
    # Idle now: a hint from B starts a session with B straight away.
    assert a.sync.active is None
    effects = a.receive(2, SyncHintFrame(), 2.0)
    assert [type(e.frame) for e in effects if isinstance(e, Send)] == [SyncQueryFrame]
    assert a.sync.active is not None


def test_learning_by_resync_hints_the_other_neighbours_only() -> None:
    """A node that pulled messages in a session hints every other up neighbour, not the
    one it pulled from, and then runs its next queued session."""
    a, a_store = make_core(1, (2, 3, 4))
    b, b_store = make_core(2, (1,), [b"news"])
    wire = Wire((a, a_store), (b, b_store))
    wire.apply(1, a.peer_up(2, 0.0))
    assert a.peer_up(3, 0.0) == a.peer_up(4, 0.0) == []  # queued behind the session with 2
    wire.apply(2, b.peer_up(1, 0.0))
    elsewhere: list[tuple[int, PeerFrame]] = []
    while wire.queue:
        _, dst, frame = wire.queue[0]
        if dst in (3, 4):  # not wired: just record what A sends there
            wire.queue.popleft()
            elsewhere.append((dst, frame))
            continue
        wire.step(1.0)
    assert wire.persisted == Counter({message_id(b"news"): 1})
    assert a.sync.counters.messages_pulled == 1
    assert [(dst, type(f)) for dst, f in elsewhere] == [
        (3, SyncHintFrame),
        (4, SyncHintFrame),
        (3, SyncQueryFrame),
    ]
    # The hints name what A pulled: gaps gossip will not fill (see sync.hinted).
    assert [f.ids for _, f in elsewhere[:2]] == [(message_id(b"news"),)] * 2  # type: ignore[union-attr]
    # B pulled nothing from A and so hinted nobody.
    assert b.sync.counters.messages_pulled == 0
    assert not any(isinstance(f, SyncHintFrame) for _, _, f in wire.log)


# -- property -----------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    placement=st.dictionaries(st.integers(0, 5_000), st.sampled_from("AB2"), max_size=200),
    bulk=st.sampled_from([0, 40, 600, 3_000]),
)
def test_one_session_each_way_gives_both_the_union(placement: dict[int, str], bulk: int) -> None:
    """For any split of messages into only-A, only-B and both (plus ``bulk`` common ones,
    so that sessions walk several levels down), one session each way leaves both nodes
    holding the union, and no message is persisted twice."""
    only_a = [str(i).encode() for i, side in placement.items() if side == "A"]
    only_b = [str(i).encode() for i, side in placement.items() if side == "B"]
    both = [str(i).encode() for i, side in placement.items() if side == "2"]
    common = both + [f"bulk {j}".encode() for j in range(bulk)]
    sim, _, _ = two_nodes(common, only_a, only_b)
    sim.run()
    union = {message_id(b) for b in (*common, *only_a, *only_b)}
    for n in (0, 1):
        assert set(sim.stores[n].ids()) == union
        # One session at the first link-up (empty stores), one after the reconnect.
        counters = sim.cores[n].sync.counters
        assert counters.sessions_started == counters.sessions_completed == 2
    assert sim.sync_received == {0: len(only_b), 1: len(only_a)}
    assert sim.persist_conflicts == 0
    assert sim.drops == []


def test_a_hint_names_at_most_max_hint_ids_of_what_the_session_pulled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session that pulls more than MAX_HINT_IDS messages (a restarted node) hints
    naming only the first MAX_HINT_IDS of them, and then once more naming none: a hint
    stays one bounded frame, and its receivers find the rest by walking the tree."""
    monkeypatch.setattr(sync, "MAX_HINT_IDS", 5)
    news = [f"news {i}".encode() for i in range(12)]
    a, a_store = make_core(1, (2, 3), [b"old"])
    b, b_store = make_core(2, (1,), [b"old", *news])
    wire = Wire((a, a_store), (b, b_store))
    wire.apply(1, a.peer_up(2, 0.0))
    assert a.peer_up(3, 0.0) == []  # queued behind the session with 2
    wire.apply(2, b.peer_up(1, 0.0))
    to_3: list[PeerFrame] = []
    while wire.queue:
        if wire.queue[0][1] == 3:  # not wired: just record what A sends there
            to_3.append(wire.queue.popleft()[2])
        else:
            wire.step(0.0)
    assert a.sync.counters.messages_pulled == 12
    hints = [f for f in to_3 if isinstance(f, SyncHintFrame)]
    # Five named as they came, then a last one for the rest (named: none).
    assert [len(h.ids) for h in hints] == [5, 0]
    assert set(hints[0].ids) <= {message_id(body) for body in news}
