"""Re-sync and anti-entropy: range-based set reconciliation over a fingerprint tree.

Why this design: message ids are uniform hashes, so a fixed 16-ary tree over id
prefixes splits any id set evenly. Every node keeps, for each tree node, the
count of its ids under it and the sum of their first 8 bytes mod 2**64 (an
order-free fingerprint that is updated in O(depth) per stored message). Two
nodes whose fingerprints agree hold the same ids there with overwhelming
probability, so a session only walks down where they differ and ends by
pulling exactly the missing messages. Bytes moved grow with the difference,
not with the total stored; two nodes already in sync spend one small round
trip.

A session is one-sided: the *initiator* learns what it lacks from the
*responder* and pulls it (``SyncWant`` -> ``SyncData``). Each node runs at
most one session at a time, so the messages a restarted node missed are
pulled from one neighbour, not from all three. Sessions start when a link
comes up, every ``interval`` seconds with the next neighbour in turn, and when
a neighbour hints that it just learned messages by re-sync. Messages learned
by re-sync are stored but not forwarded: the node hints its other neighbours,
which reconcile with it and pull only what they lack.

Flow control: a node that lost much of its log learns of tens of thousands of
missing ids at once, and every reply of the walk adds wants. The initiator
keeps what it wants in a per-session backlog and has at most ``WANT_WINDOW``
wants in flight; the answer to a want ends with a ``SyncData`` frame marked
``done``, and each one lets the next want go out (filled up to
``MAX_IDS_PER_WANT`` ids from the backlog). The responder answers a peer's
wants one at a time, in order, and queues the rest (``gossip.sync_streams``),
so an honest initiator never has its link dropped for asking. Everything
pulled is stored frame by frame, so a session cut short by a link drop keeps
what it got: the next one walks the tree again and asks only for the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Set
from typing import Protocol

import attrs

from gossip.core.effects import Effect, Send, StreamMessages
from gossip.core.frames import (
    Envelope,
    FpNode,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
    SyncReplyFrame,
    SyncWantFrame,
)
from gossip.core.message import ID_BYTES, Message
from gossip.core.paths import relay_path

FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS
LEAF_LEVEL = 4  # leaves split ids by their first 16 bits (FingerprintTree.add assumes 4)
KEY_STRIDE = 1 << 16
ROOT = 0
MASK64 = (1 << 64) - 1

# Ask for a node's ids instead of its children once the responder holds this few.
IDS_THRESHOLD = 32
# Bounds on one query frame: nodes asked about, and ids the replies may list.
MAX_NODES_PER_QUERY = 256
MAX_IDS_PER_QUERY = 16_384
MAX_IDS_PER_WANT = 16_384
# Wants of one session in flight (sent, their done SyncData not yet received). More
# than one keeps the responder's link busy while the next want travels; the
# responder queues up to gossip.sync_streams.MAX_QUEUED_WANTS per peer, well above.
WANT_WINDOW = 4
# Sessions this node started that still take SyncData (the active one and those
# given up on lately: their data may still be on the way, and is honest).
RECENT_SESSIONS = 8


def make_key(level: int, index: int) -> int:
    return level * KEY_STRIDE + index


def split_key(key: int) -> tuple[int, int] | None:
    """(level, index) of a valid key, else None."""
    level, index = divmod(key, KEY_STRIDE)
    if not 0 <= level <= LEAF_LEVEL or index >= FANOUT**level:
        return None
    return level, index


def key_range(key: int) -> tuple[bytes, bytes]:
    """The half-open id range [lo, hi) under a tree node (hi may be 17 bytes at the top)."""
    parts = split_key(key)
    if parts is None:
        raise ValueError(f"bad fingerprint key {key}")
    level, index = parts
    shift = 8 * ID_BYTES - FANOUT_BITS * level
    lo, hi = index << shift, (index + 1) << shift
    top = 1 << (8 * ID_BYTES)
    hi_bytes = hi.to_bytes(ID_BYTES, "big") if hi < top else b"\xff" * ID_BYTES + b"\x00"
    return lo.to_bytes(ID_BYTES, "big"), hi_bytes


# Non-empty leaves a tree holds in its sparse form: up to this many, its dicts take
# less memory than the dense lists (at the limit 0.78 MB against 0.90 MB, tracemalloc).
SPARSE_MAX_LEAVES = 4096
# Each tree node's count and prefix sum share one int: count << COUNT_SHIFT | sum.
# The sum of n 64-bit prefixes is below n * 2**64 < 2**COUNT_SHIFT for any n < 2**64,
# so the fields never overlap. One int per node halves the containers ``add`` updates.
COUNT_SHIFT = 128
COUNT_ONE = 1 << COUNT_SHIFT


class _Level(Protocol):
    """One level of the tree, indexed by node index: a dense list or a sparse dict."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


class _SparseLevel(dict[int, int]):
    """A level holding only its non-empty nodes; an absent one reads as 0 (not added)."""

    __slots__ = ()

    def __missing__(self, index: int) -> int:
        return 0


class FingerprintTree:
    """Per tree node: how many ids are under it and the sum of their 8-byte prefixes.

    Both live in one int per node (``count << COUNT_SHIFT | sum``, sum not yet
    reduced mod 2**64). A tree starts sparse (a dict per level, holding only
    non-empty nodes: a simulator runs 10,000 cores, most holding few ids) and
    switches for good to dense lists (69,905 slots) once it has more than
    ``sparse_max_leaves`` non-empty leaves, where lists are the smaller and
    faster form. ``add`` runs for every stored message: it is unrolled over
    the levels and the same code serves both forms.
    """

    def __init__(
        self, ids: Iterable[bytes] = (), *, sparse_max_leaves: int = SPARSE_MAX_LEAVES
    ) -> None:
        self._sparse_max_leaves = sparse_max_leaves
        # The levels while the tree is sparse; None once it is dense.
        self._sparse: list[_SparseLevel] | None = [_SparseLevel() for _ in range(LEAF_LEVEL + 1)]
        self._levels: list[_Level] = list(self._sparse)
        if sparse_max_leaves <= 0:
            self._densify()
        self.add_many(ids)

    def add(self, mid: bytes) -> None:
        x = int.from_bytes(mid[:8], "big")
        i = x >> 48  # the leaf: LEAF_LEVEL * FANOUT_BITS == 16 bits
        x += COUNT_ONE
        v0, v1, v2, v3, v4 = self._levels
        v4[i] += x
        v3[i >> 4] += x
        v2[i >> 8] += x
        v1[i >> 12] += x
        v0[0] += x
        if self._sparse is not None and len(self._sparse[LEAF_LEVEL]) > self._sparse_max_leaves:
            self._densify()

    def add_many(self, ids: Iterable[bytes]) -> None:
        """``add`` each id: a frame's worth on the hot path, or a whole store at start-up.
        Once dense, one loop with the levels held locally and one update of the root."""
        it = iter(ids)
        if self._sparse is not None:
            add = self.add
            for mid in it:
                add(mid)
                if self._sparse is None:
                    break
            else:
                return
        # Dense from here: the root's update is gathered and made once.
        v0, v1, v2, v3, v4 = self._levels
        total = 0
        for mid in it:
            x = int.from_bytes(mid[:8], "big")
            i = x >> 48
            x += COUNT_ONE
            v4[i] += x
            v3[i >> 4] += x
            v2[i >> 8] += x
            v1[i >> 12] += x
            total += x
        v0[0] += total

    def _densify(self) -> None:
        if self._sparse is None:
            return
        dense: list[_Level] = []
        for lv, level in enumerate(self._sparse):
            values = [0] * FANOUT**lv
            for index, value in level.items():
                values[index] = value
            dense.append(values)
        self._levels = dense
        self._sparse = None

    @property
    def sparse(self) -> bool:
        """Whether the tree still keeps only its non-empty nodes."""
        return self._sparse is not None

    @property
    def counts(self) -> list[list[int]]:
        """Every node's count, level by level (a dense copy, for inspection)."""
        return [
            [self._levels[lv][i] >> COUNT_SHIFT for i in range(FANOUT**lv)]
            for lv in range(LEAF_LEVEL + 1)
        ]

    @property
    def sums(self) -> list[list[int]]:
        """Every node's prefix sum mod 2**64, level by level (a dense copy)."""
        return [
            [self._levels[lv][i] & MASK64 for i in range(FANOUT**lv)]
            for lv in range(LEAF_LEVEL + 1)
        ]

    def node(self, key: int) -> FpNode:
        level, index = divmod(key, KEY_STRIDE)
        v = self._levels[level][index]
        return FpNode(key, v >> COUNT_SHIFT, v & MASK64)

    def children(self, key: int) -> list[FpNode]:
        """The non-empty children of a node (empty ones mean: nothing held there)."""
        level, index = divmod(key, KEY_STRIDE)
        child_level = level + 1
        values = self._levels[child_level]
        base = child_level * KEY_STRIDE
        first = index * FANOUT
        return [
            FpNode(base + i, v >> COUNT_SHIFT, v & MASK64)
            for i in range(first, first + FANOUT)
            if (v := values[i])
        ]

    @property
    def total(self) -> int:
        return self._levels[0][0] >> COUNT_SHIFT


class SyncStore(Protocol):
    """What re-sync reads from the store."""

    def __contains__(self, mid: bytes) -> bool: ...

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]: ...


class MessageSource(SyncStore, Protocol):
    def __len__(self) -> int: ...

    def get(self, mid: bytes) -> Message | None: ...


# Payload bytes per SyncData frame before starting a new one.
SYNC_FRAME_BYTES = 64 * 1024


def stream_frames(
    store: MessageSource, node_id: int, order: StreamMessages, members: Set[int]
) -> Iterator[SyncDataFrame]:
    """The SyncData frames answering one SyncWant, lazily: the caller paces them.

    Envelopes carry no id (the receiver hashes the body anyway) and the stored
    path with this node appended, as a gossip forward would, less what the
    receiver would refuse (``relay_path``: a record from an old log).
    """
    batch: list[Envelope] = []
    size = 0

    def wanted() -> Iterator[bytes]:
        yield from order.ids
        for key in order.ranges:
            lo, hi = key_range(key)
            yield from store.ids_between(lo, hi, len(store) + 1)

    for mid in wanted():
        m = store.get(mid)
        if m is None:
            continue
        batch.append(Envelope(b"", m.body, relay_path(m.path, node_id, order.peer, members)))
        size += len(m.body) + 4 * len(m.path) + 16
        if size >= SYNC_FRAME_BYTES:
            yield SyncDataFrame(order.session, tuple(batch), False)
            batch, size = [], 0
    yield SyncDataFrame(order.session, tuple(batch), True)


@attrs.define
class Session:
    peer: int
    id: int
    started: float
    last_progress: float
    queries: int = 0
    wants: int = 0  # in flight: at most WANT_WINDOW
    learned: int = 0
    wanted: set[bytes] = attrs.field(factory=set)
    # Found missing but not yet asked for (the window was full), oldest first.
    backlog_ids: deque[bytes] = attrs.field(factory=deque)
    backlog_ranges: deque[int] = attrs.field(factory=deque)
    # Asked for again while running (a hint that came after our queries went
    # out): run another session with the same peer when this one ends.
    again: bool = False


@attrs.define
class SyncCounters:
    sessions_started: int = 0
    sessions_completed: int = 0
    sessions_aborted: int = 0
    messages_pulled: int = 0


class SyncEngine:
    def __init__(
        self,
        node_id: int,
        tree: FingerprintTree,
        store: SyncStore,
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self.node_id = node_id
        self.tree = tree
        self.store = store
        self.interval = interval
        self.timeout = timeout
        self.queue: deque[int] = deque()
        self.active: Session | None = None
        self.counters = SyncCounters()
        self._next_session = 1
        self._recent: deque[tuple[int, int]] = deque(maxlen=RECENT_SESSIONS)
        self._next_periodic: float | None = None
        self._turn = 0

    # -- scheduling --------------------------------------------------------

    def request(self, peer: int, up: frozenset[int], now: float) -> list[Effect]:
        """Queue a session with ``peer`` (once) and start one if idle."""
        active = self.active
        if active is not None and active.peer == peer:
            active.again = True
        elif peer not in self.queue:
            self.queue.append(peer)
        return self._maybe_start(up, now)

    def peer_down(self, peer: int, up: frozenset[int], now: float) -> list[Effect]:
        if peer in self.queue:
            self.queue.remove(peer)
        if self.active is not None and self.active.peer == peer:
            self.active = None
            self.counters.sessions_aborted += 1
        return self._maybe_start(up, now)

    def tick(self, up: frozenset[int], now: float) -> list[Effect]:
        effects: list[Effect] = []
        active = self.active
        if active is not None and now - active.last_progress > self.timeout:
            self.active = None
            self.counters.sessions_aborted += 1
        if self._next_periodic is None:
            self._next_periodic = now + self.interval
        elif now >= self._next_periodic:
            self._next_periodic = now + self.interval
            peers = sorted(up)
            if peers:
                self._turn = (self._turn + 1) % len(peers)
                return self.request(peers[self._turn], up, now)
        effects += self._maybe_start(up, now)
        return effects

    def _maybe_start(self, up: frozenset[int], now: float) -> list[Effect]:
        while self.active is None and self.queue:
            peer = self.queue.popleft()
            if peer not in up:
                continue
            s = Session(peer, self._next_session, now, now)
            self._next_session += 1
            self.active = s
            self._recent.append((peer, s.id))
            self.counters.sessions_started += 1
            root = self.tree.node(ROOT)
            if root.count == 0:
                s.wants = 1
                return [Send(peer, SyncWantFrame(s.id, (), (ROOT,)))]
            s.queries = 1
            return [Send(peer, SyncQueryFrame(s.id, (root,), ()))]
        return []

    def solicited(self, peer: int, session: int) -> bool:
        """Whether SyncData for ``session`` from ``peer`` answers a session this node
        started with that peer (the active one or one of the last few)."""
        return (peer, session) in self._recent

    # -- as responder ------------------------------------------------------

    def on_query(self, peer: int, q: SyncQueryFrame) -> list[Effect] | str:
        """Describe where our fingerprints differ from the initiator's (or why the query is bad)."""
        if len(q.children) + len(q.ids) > MAX_NODES_PER_QUERY:
            return f"sync query of {len(q.children) + len(q.ids)} nodes"
        nodes: list[FpNode] = []
        listed: list[tuple[int, tuple[bytes, ...]]] = []
        # The initiator sized the query by our counts; the slack covers messages
        # stored since, and the cap keeps the reply well inside one frame.
        budget = MAX_IDS_PER_QUERY * 2
        for theirs in q.children:
            parts = split_key(theirs.key)
            if parts is None or parts[0] >= LEAF_LEVEL:
                return f"sync query for children of bad node {theirs.key}"
            if self.tree.node(theirs.key) != theirs:
                nodes.extend(self.tree.children(theirs.key))
        for theirs in q.ids:
            if split_key(theirs.key) is None:
                return f"sync query for ids of bad node {theirs.key}"
            mine = self.tree.node(theirs.key)
            if mine != theirs and mine.count:
                lo, hi = key_range(theirs.key)
                ids = self.store.ids_between(lo, hi, budget)
                budget -= len(ids)
                listed.append((theirs.key, tuple(ids)))
        return [Send(peer, SyncReplyFrame(q.session, tuple(nodes), tuple(listed)))]

    def on_want(self, peer: int, w: SyncWantFrame) -> list[Effect] | str:
        if len(w.ids) > MAX_IDS_PER_WANT or len(w.ranges) > MAX_NODES_PER_QUERY:
            return "sync want too large"
        for key in w.ranges:
            if split_key(key) is None:
                return f"sync want for bad node {key}"
        return [StreamMessages(peer, w.session, w.ids, w.ranges)]

    # -- as initiator ------------------------------------------------------

    def on_reply(
        self, peer: int, r: SyncReplyFrame, up: frozenset[int], now: float
    ) -> list[Effect]:
        s = self.active
        if s is None or s.peer != peer or s.id != r.session:
            return []  # a reply for a session we gave up on
        s.queries -= 1
        s.last_progress = now
        children: list[FpNode] = []
        ask_ids: list[tuple[FpNode, int]] = []
        ranges: list[int] = []
        for theirs in r.nodes:
            parts = split_key(theirs.key)
            if parts is None:
                continue
            mine = self.tree.node(theirs.key)
            if mine == theirs or theirs.count == 0:
                continue
            if mine.count == 0:
                ranges.append(theirs.key)
            elif theirs.count <= IDS_THRESHOLD or parts[0] == LEAF_LEVEL:
                ask_ids.append((mine, theirs.count))
            else:
                children.append(mine)
        missing: list[bytes] = []
        for _key, ids in r.ids:
            for mid in ids:
                if len(mid) == ID_BYTES and mid not in self.store and mid not in s.wanted:
                    s.wanted.add(mid)
                    missing.append(mid)
        effects: list[Effect] = []
        for i in range(0, len(children), MAX_NODES_PER_QUERY):
            effects.append(
                Send(peer, SyncQueryFrame(s.id, tuple(children[i : i + MAX_NODES_PER_QUERY]), ()))
            )
        batch: list[FpNode] = []
        expected = 0
        for mine, their_count in ask_ids:
            if batch and (
                len(batch) >= MAX_NODES_PER_QUERY or expected + their_count > MAX_IDS_PER_QUERY
            ):
                effects.append(Send(peer, SyncQueryFrame(s.id, (), tuple(batch))))
                batch, expected = [], 0
            batch.append(mine)
            expected += their_count
        if batch:
            effects.append(Send(peer, SyncQueryFrame(s.id, (), tuple(batch))))
        s.queries += len(effects)
        s.backlog_ids.extend(missing)
        s.backlog_ranges.extend(ranges)
        return effects + self._send_wants(s) + self._maybe_finish(s, up, now)

    def on_data(
        self, peer: int, d: SyncDataFrame, learned: int, up: frozenset[int], now: float
    ) -> list[Effect]:
        """Account for one SyncData frame whose messages the core has already stored."""
        self.counters.messages_pulled += learned
        s = self.active
        if s is None or s.peer != peer or s.id != d.session:
            # Late data of a session given up on: still new to us, so tell the others.
            return [Send(p, SyncHintFrame()) for p in sorted(up) if p != peer] if learned else []
        s.learned += learned
        s.last_progress = now
        if not d.done:
            return []
        s.wants = max(s.wants - 1, 0)  # a peer's extra done frame cannot open the window
        return self._send_wants(s) + self._maybe_finish(s, up, now)

    def _send_wants(self, s: Session) -> list[Effect]:
        """Fill the window from the backlog: ids first (up to MAX_IDS_PER_WANT per want),
        then whole ranges (up to MAX_NODES_PER_QUERY per want)."""
        effects: list[Effect] = []
        ids, ranges = s.backlog_ids, s.backlog_ranges
        while s.wants < WANT_WINDOW and (ids or ranges):
            if ids:
                n = min(len(ids), MAX_IDS_PER_WANT)
                frame = SyncWantFrame(s.id, tuple(ids.popleft() for _ in range(n)), ())
            else:
                n = min(len(ranges), MAX_NODES_PER_QUERY)
                frame = SyncWantFrame(s.id, (), tuple(ranges.popleft() for _ in range(n)))
            effects.append(Send(s.peer, frame))
            s.wants += 1
        return effects

    def _maybe_finish(self, s: Session, up: frozenset[int], now: float) -> list[Effect]:
        if s.queries > 0 or s.wants > 0 or s.backlog_ids or s.backlog_ranges:
            return []
        self.active = None
        self.counters.sessions_completed += 1
        if s.again and s.peer not in self.queue:
            self.queue.append(s.peer)
        effects: list[Effect] = []
        if s.learned:
            effects += [Send(p, SyncHintFrame()) for p in sorted(up) if p != s.peer]
        return effects + self._maybe_start(up, now)
