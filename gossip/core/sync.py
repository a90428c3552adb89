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
naming the ids it learned, and they reconcile with it and pull only what they
lack.

Under sustained gossip (``busy``), sessions are spaced out. While messages
are in flight two nodes' fingerprints always differ, by the messages on their
way, and no comparison of sums can tell those from messages really missed (a
"settled" tree of ids held for some seconds differs just as much: by the
messages whose arrivals straddle the two nodes' cut-offs). So a session then
walks down to every range in-flight messages touch, pulls copies gossip
delivers a few ms later, and, having learned them, hints its neighbours into
sessions of their own that do the same: a cascade as long as the load. While
busy, a queued session therefore waits until gossip quiets down or
``BUSY_SPACING`` intervals have passed since this node's last session start:
a node that really lacks messages under sustained load still reconciles
within that bound (its periodic request is queued within one interval). The
first session after a link comes up, or after a neighbour's hint, is never held
back: a restarted node pulls what it missed at once, and what a healed link
brings spreads hop by hop without waiting for the load to end. And a session
run while busy asks for the ids it found missing only if they are still
missing ``HOLD_SECONDS`` later, rather than race gossip for them, with two
exceptions, ids known to be gaps that gossip will not fill:

- everything a session finds in the first session with a peer whose link just
  came up: what differs is mostly what each side gained while the link was
  down (copies in flight at that moment are few, and a link-up is rare);
- the ids neighbours named in their hints: they pulled those by re-sync, so
  gossip does not carry them (pulled copies are not forwarded).

So what a healed link brings crosses it at once and spreads about one round
trip per hop, with no hold at any hop: a session hints as soon as its wants are
answered (not after the rest of its walk and hold), the hinted session asks for
the named ids as it starts, beside its first query, and a session that only
waits for held ids gives way to it (those still missing when due are asked for
in a session of their own). Copies in flight are still left to gossip:
a hint names only what its sender pulled, never what it found in flight.

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

import math
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Set
from operator import itemgetter
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
# Gossip is sustained (the node is busy) once Gossip frames have kept arriving, no
# two more than QUIET_SECONDS apart, for FLOW_SECONDS; a burst that ends at once (a
# few messages, then a partition heals) leaves sessions as prompt as ever. The gap
# allowed is longer than the flow asked for: a node on a busy machine hears its
# frames in spurts, and the trickle at the end of a load comes with pauses.
FLOW_SECONDS = 1.0
QUIET_SECONDS = 3.0
# While busy, at most one session start per this many intervals (link-ups aside).
BUSY_SPACING = 3
# While busy, ids a session finds missing are asked for only if still missing this
# long after: most are on their way by gossip. A copy pulled first would be stored
# but not forwarded (its gossip copy, come later, is a duplicate), leaving the
# node's tree children to repair it, and would make the node hint its neighbours.
HOLD_SECONDS = 2.0
# Ids a SyncHint names: those its sender learned in the session, the first so many
# (a restarted node may pull far more; the rest is found by the walk, and held).
MAX_HINT_IDS = 4096
# Ids named in hints that a node keeps as known gaps (the oldest forgotten first).
MAX_GAPS = 4 * MAX_HINT_IDS
# Batches of held ids set aside by sessions that gave way, kept until due (the
# oldest dropped first: a later session finds those again).
MAX_SET_ASIDE = 64


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
# less memory than the dense lists.
SPARSE_MAX_LEAVES = 4096
# Each tree node's count and prefix sum share one int: count << COUNT_SHIFT | sum.
# The sum of n 64-bit prefixes is below n * 2**64 < 2**COUNT_SHIFT for any n < 2**64,
# so the fields never overlap, and the int of a node is the sum of its children's.
COUNT_SHIFT = 128
COUNT_ONE = 1 << COUNT_SHIFT
# The one inner level kept up to date per id (besides the leaves); see FingerprintTree.
KEPT_LEVEL = 2
# An id's first 8 bytes as a big-endian int: what the tree sums and indexes by.
_PREFIX = struct.Struct(f">Q{ID_BYTES - 8}x")


class FingerprintTree:
    """Per tree node: how many ids are under it and the sum of their 8-byte prefixes.

    Both live in one int per node (``count << COUNT_SHIFT | sum``, sum not yet
    reduced mod 2**64), so a node's int is the sum of its children's. ``add``
    runs for every stored message, and the tree is read only by re-sync
    sessions (rare while gossip flows: see the module docstring), so each id
    updates just two levels: the leaves and level ``KEPT_LEVEL``. A node at
    another level is summed when read: 16 leaves for level 3, 16 or 256
    level-2 nodes for level 1 or the root.

    A tree starts sparse (a dict per kept level, holding only non-empty nodes:
    a simulator runs 10,000 cores, most holding few ids) and switches for good
    to dense lists (65,792 slots) once it has more than ``sparse_max_leaves``
    non-empty leaves, where lists are the smaller and faster form.
    """

    def __init__(
        self, ids: Iterable[bytes] = (), *, sparse_max_leaves: int = SPARSE_MAX_LEAVES
    ) -> None:
        self._sparse_max_leaves = sparse_max_leaves
        self._sparse = True
        self._leaves: list[int] | dict[int, int] = {}
        self._kept: list[int] | dict[int, int] = {}
        if sparse_max_leaves <= 0:
            self._densify()
        self.add_many(ids)

    def add(self, mid: bytes) -> None:
        self.add_many((mid,))

    def add_many(self, ids: Iterable[bytes]) -> None:
        """Count each id in: a frame's worth on the hot path, or a whole store at start-up."""
        it = iter(ids)
        leaves, kept = self._leaves, self._kept
        if isinstance(leaves, dict):
            assert isinstance(kept, dict)
            limit = self._sparse_max_leaves
            for mid in it:
                x = int.from_bytes(mid[:8], "big")
                i = x >> 48  # the leaf: LEAF_LEVEL * FANOUT_BITS == 16 bits
                x += COUNT_ONE
                leaves[i] = leaves.get(i, 0) + x
                k = i >> 8  # its level-2 node
                kept[k] = kept.get(k, 0) + x
                if len(leaves) > limit:
                    self._densify()
                    leaves, kept = self._leaves, self._kept
                    break
            else:
                return
        rest = tuple(it)
        if all(map(ID_BYTES.__eq__, map(len, rest))):
            # The usual batch (ids of ID_BYTES): their prefixes read in one C-level pass.
            prefixes: Iterable[int] = map(itemgetter(0), _PREFIX.iter_unpack(b"".join(rest)))
        else:
            prefixes = (int.from_bytes(mid[:8], "big") for mid in rest)
        for x in prefixes:
            i = x >> 48
            x += COUNT_ONE
            leaves[i] += x
            kept[i >> 8] += x

    def _densify(self) -> None:
        if not self._sparse:
            return
        dense = []
        for level, size in ((self._leaves, FANOUT**LEAF_LEVEL), (self._kept, FANOUT**KEPT_LEVEL)):
            values = [0] * size
            for index, value in level.items():  # type: ignore[union-attr]
                values[index] = value
            dense.append(values)
        self._leaves, self._kept = dense
        self._sparse = False

    def _values(self, level: int, first: int, n: int) -> list[int]:
        """The ints of the ``n`` nodes from index ``first`` at ``level``."""
        kept = LEAF_LEVEL if level > KEPT_LEVEL else KEPT_LEVEL
        values = self._leaves if kept == LEAF_LEVEL else self._kept
        shift = FANOUT_BITS * (kept - level)  # one node here covers 1 << shift kept ones
        lo, hi = first << shift, (first + n) << shift
        if isinstance(values, list):
            row = values[lo:hi]
        elif hi - lo <= len(values):
            row = [values.get(i, 0) for i in range(lo, hi)]
        else:  # a wide range of a small dict: walk the dict instead
            row = [0] * (hi - lo)
            for i, v in values.items():
                if lo <= i < hi:
                    row[i - lo] = v
        if not shift:
            return row
        if n == 1:
            return [sum(row)]
        width = 1 << shift
        return [sum(row[j : j + width]) for j in range(0, len(row), width)]

    @property
    def sparse(self) -> bool:
        """Whether the tree still keeps only its non-empty nodes."""
        return self._sparse

    @property
    def counts(self) -> list[list[int]]:
        """Every node's count, level by level (a dense copy, for inspection)."""
        return [
            [v >> COUNT_SHIFT for v in self._values(lv, 0, FANOUT**lv)]
            for lv in range(LEAF_LEVEL + 1)
        ]

    @property
    def sums(self) -> list[list[int]]:
        """Every node's prefix sum mod 2**64, level by level (a dense copy)."""
        return [
            [v & MASK64 for v in self._values(lv, 0, FANOUT**lv)] for lv in range(LEAF_LEVEL + 1)
        ]

    def node(self, key: int) -> FpNode:
        level, index = divmod(key, KEY_STRIDE)
        (v,) = self._values(level, index, 1)
        return FpNode(key, v >> COUNT_SHIFT, v & MASK64)

    def children(self, key: int) -> list[FpNode]:
        """The non-empty children of a node (empty ones mean: nothing held there)."""
        level, index = divmod(key, KEY_STRIDE)
        child_level = level + 1
        base = child_level * KEY_STRIDE
        first = index * FANOUT
        return [
            FpNode(base + i, v >> COUNT_SHIFT, v & MASK64)
            for i, v in enumerate(self._values(child_level, first, FANOUT), first)
            if v
        ]

    @property
    def total(self) -> int:
        (v,) = self._values(ROOT, 0, 1)
        return v >> COUNT_SHIFT


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
    # The first session since the peer's link came up: nothing found is held back.
    link_up: bool = False
    queries: int = 0
    wants: int = 0  # in flight: at most WANT_WINDOW
    learned: int = 0
    # Learned but not yet named in a hint; a session names MAX_HINT_IDS in all.
    unhinted: list[bytes] = attrs.field(factory=list)
    named: int = 0
    wanted: set[bytes] = attrs.field(factory=set)
    # Found missing while busy, with when to ask for those still missing (HOLD_SECONDS).
    held: deque[tuple[float, list[bytes]]] = attrs.field(factory=deque)
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


def _only_holding(s: Session) -> bool:
    """Whether ``s`` waits for nothing but its held ids to come due."""
    return bool(s.held) and not (s.queries or s.wants or s.backlog_ids or s.backlog_ranges)


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
        # The current run of gossip: its first and its last frame (see ``busy``).
        self._flow_first = -math.inf
        self._flow_last = -math.inf
        self._last_start = -math.inf
        # Peers whose link came up since this node last started a session, or that
        # hinted it since: the next session is with one of them, busy or not (see
        # ``_maybe_start``).
        self._linked: set[int] = set()
        # Peers whose link came up and with which no session has started since.
        self._came_up: set[int] = set()
        # Ids neighbours named in hints (oldest first), each with the neighbour that
        # named it last: gaps gossip will not fill.
        self._gaps: dict[bytes, int] = {}
        # Held ids of sessions that gave way (see ``_maybe_start``): when to look at
        # them again, the peer that has them, the ids.
        self._set_aside: deque[tuple[float, int, list[bytes]]] = deque(maxlen=MAX_SET_ASIDE)

    # -- load --------------------------------------------------------------

    def heard(self, now: float) -> None:
        """A Gossip frame arrived (the core calls this for every one)."""
        if now - self._flow_last > QUIET_SECONDS:
            self._flow_first = now
        self._flow_last = now

    def busy(self, now: float) -> bool:
        """Whether gossip is sustained: frames at most QUIET_SECONDS apart, for at
        least FLOW_SECONDS."""
        return (
            now - self._flow_last <= QUIET_SECONDS
            and self._flow_last - self._flow_first >= FLOW_SECONDS
        )

    def _due(self, now: float) -> bool:
        """Whether the next queued session may start now: at once unless gossip is
        sustained, else once BUSY_SPACING intervals have passed since the last start."""
        return now - self._last_start >= BUSY_SPACING * self.interval or not self.busy(now)

    # -- scheduling --------------------------------------------------------

    def request(self, peer: int, up: frozenset[int], now: float) -> list[Effect]:
        """Queue a session with ``peer`` (once) and start one if idle."""
        active = self.active
        if active is not None and active.peer == peer:
            active.again = True
        elif peer not in self.queue:
            self.queue.append(peer)
        return self._maybe_start(up, now)

    def link_up(self, peer: int, up: frozenset[int], now: float) -> list[Effect]:
        """The link to ``peer`` came up: queue a session with it, to be the next one,
        busy or not, and asks at once for all it finds (what either side missed while
        the link was down, not copies in flight)."""
        self._linked.add(peer)
        self._came_up.add(peer)
        return self.request(peer, up, now)

    def hinted(
        self, peer: int, ids: Iterable[bytes], up: frozenset[int], now: float
    ) -> list[Effect]:
        """``peer`` hints that it just pulled messages by re-sync (``ids``, or some of
        them): gaps, not copies in flight (a busy session holds those back,
        ``HOLD_SECONDS``), which this node may have too. Its session is the next one,
        busy or not, as a link's that comes up: spaced, a split healed under load
        would reach each hop behind the first only after ``BUSY_SPACING`` intervals;
        and the ids it names that this node lacks are asked for at once, not held:
        gossip will not bring them. That session asks ``peer`` for them as it starts,
        beside its first query: a hop costs a round trip, not a walk of the tree."""
        self._note_gaps(ids, peer)
        self._linked.add(peer)
        return self.request(peer, up, now)

    def _note_gaps(self, ids: Iterable[bytes], peer: int) -> bool:
        """Keep the ids this node lacks as gaps ``peer`` can fill; whether there were any."""
        gaps, store = self._gaps, self.store
        found = False
        for mid in ids:
            if mid not in store:
                gaps.pop(mid, None)  # to the end: the newest
                gaps[mid] = peer
                found = True
        while len(gaps) > MAX_GAPS:
            del gaps[next(iter(gaps))]
        return found

    def peer_down(self, peer: int, up: frozenset[int], now: float) -> list[Effect]:
        self._linked.discard(peer)
        self._came_up.discard(peer)
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
        elif active is not None and active.held and active.held[0][0] <= now:
            effects += self._release(active, up, now)
        if self._set_aside and self._set_aside[0][0] <= now:
            effects += self._release_set_aside(up, now)
        if self._next_periodic is None:
            self._next_periodic = now + self.interval
        elif now >= self._next_periodic:
            self._next_periodic = now + self.interval
            peers = sorted(up)
            if peers:
                self._turn = (self._turn + 1) % len(peers)
                return effects + self.request(peers[self._turn], up, now)
        effects += self._maybe_start(up, now)
        return effects

    def _maybe_start(self, up: frozenset[int], now: float) -> list[Effect]:
        """Start the next queued session if one is due (peers no longer up leave the
        queue): the first with a newly linked or hinting peer, else the oldest request.

        A session that only waits for its held ids gives way to such a peer's: the
        hold would be paid again at every hop behind a healed link. Its held ids are
        set aside, to be looked at when due (``_release_set_aside``)."""
        for peer in [p for p in self.queue if p not in up]:
            self.queue.remove(peer)
        first = self._linked | self._came_up
        linked = [p for p in self.queue if p in first]
        active = self.active
        if active is not None:
            if _only_holding(active) and (linked or (active.again and active.peer in first)):
                self._set_aside.extend((due, active.peer, ids) for due, ids in active.held)
                active.held.clear()
                return self._maybe_finish(active, up, now)
            return []
        if linked:
            self.queue.remove(linked[0])
            return self._start(linked[0], now)
        if not self.queue or not self._due(now):
            return []
        return self._start(self.queue.popleft(), now)

    def _start(self, peer: int, now: float) -> list[Effect]:
        s = Session(peer, self._next_session, now, now, link_up=peer in self._came_up)
        self._next_session += 1
        self.active = s
        self._recent.append((peer, s.id))
        self._last_start = now
        self._linked.clear()
        self._came_up.discard(peer)
        self.counters.sessions_started += 1
        root = self.tree.node(ROOT)
        if root.count == 0:
            s.wants = 1
            return [Send(peer, SyncWantFrame(s.id, (), (ROOT,)))]
        s.queries = 1
        gaps = self._gaps
        for mid in [mid for mid in gaps if mid in self.store]:  # filled since
            del gaps[mid]
        named = [mid for mid, by in gaps.items() if by == peer]
        s.wanted.update(named)  # the walk will not ask for them again
        s.backlog_ids.extend(named)
        return [Send(peer, SyncQueryFrame(s.id, (root,), ())), *self._send_wants(s)]

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
        tree = self.tree
        for theirs in q.children:
            parts = split_key(theirs.key)
            if parts is None or parts[0] >= LEAF_LEVEL:
                return f"sync query for children of bad node {theirs.key}"
            if tree.node(theirs.key) != theirs:
                nodes.extend(tree.children(theirs.key))
        for theirs in q.ids:
            if split_key(theirs.key) is None:
                return f"sync query for ids of bad node {theirs.key}"
            mine = tree.node(theirs.key)
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
        tree = self.tree
        hold = self.busy(now) and not s.link_up
        # While ids are held, a small range held here by nothing is listed too (not
        # pulled whole), so that its ids are held like the others (HOLD_SECONDS).
        whole = IDS_THRESHOLD if hold else 0
        for theirs in r.nodes:
            parts = split_key(theirs.key)
            if parts is None or theirs.count == 0:
                continue
            mine = tree.node(theirs.key)
            if mine == theirs:
                continue
            if mine.count == 0 and theirs.count > whole:
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
        if missing and hold:
            gaps = self._gaps  # named in hints: gossip will not bring them
            s.backlog_ids.extend(mid for mid in missing if mid in gaps)
            later = [mid for mid in missing if mid not in gaps]
            if later:
                s.held.append((now + HOLD_SECONDS, later))  # see HOLD_SECONDS
        else:
            s.backlog_ids.extend(missing)
        s.backlog_ranges.extend(ranges)
        return effects + self._send_wants(s) + self._maybe_finish(s, up, now)

    def _release_set_aside(self, up: frozenset[int], now: float) -> list[Effect]:
        """The held ids of sessions that gave way, once due: those still missing are
        gaps (gossip did not bring them in the hold), asked for in a session with the
        peer that has them, next in line, as a hint's are."""
        aside = self._set_aside
        peers: set[int] = set()
        while aside and aside[0][0] <= now:
            _, peer, ids = aside.popleft()
            if self._note_gaps(ids, peer):
                peers.add(peer)
        effects: list[Effect] = []
        for peer in sorted(peers & up):
            self._linked.add(peer)
            effects += self.request(peer, up, now)
        return effects

    def _release(self, s: Session, up: frozenset[int], now: float) -> list[Effect]:
        """Ask for the held ids whose time has come and that are still missing."""
        store = self.store
        while s.held and s.held[0][0] <= now:
            s.backlog_ids.extend(mid for mid in s.held.popleft()[1] if mid not in store)
        s.last_progress = now
        return self._send_wants(s) + self._maybe_finish(s, up, now)

    def on_data(
        self,
        peer: int,
        d: SyncDataFrame,
        learned: Sequence[bytes],
        up: frozenset[int],
        now: float,
    ) -> list[Effect]:
        """Account for one SyncData frame whose messages the core has already stored
        (``learned``: the ids of those that were new)."""
        self.counters.messages_pulled += len(learned)
        s = self.active
        if s is None or s.peer != peer or s.id != d.session:
            # Late data of a session given up on: still new to us, so tell the others.
            return self._hints(learned[:MAX_HINT_IDS], up, peer) if learned else []
        s.learned += len(learned)
        room = MAX_HINT_IDS - s.named - len(s.unhinted)
        if room > 0:
            s.unhinted += learned[:room]
        s.last_progress = now
        if not d.done:
            return []
        s.wants = max(s.wants - 1, 0)  # a peer's extra done frame cannot open the window
        effects = self._send_wants(s)
        if not s.wants and s.unhinted:
            # Every want answered: name what came to the others now, not after the
            # rest of the walk and its hold (the next hop would wait for those).
            effects += self._hint_unhinted(s, up)
        return effects + self._maybe_finish(s, up, now)

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
        if s.queries > 0 or s.wants > 0 or s.held or s.backlog_ids or s.backlog_ranges:
            return []
        self.active = None
        self.counters.sessions_completed += 1
        if s.again and s.peer not in self.queue:
            self.queue.append(s.peer)
        # A last hint for what is left to name, or for more than could be named.
        last = self._hint_unhinted(s, up) if s.unhinted or s.learned > s.named else []
        return last + self._maybe_start(up, now)

    def _hint_unhinted(self, s: Session, up: frozenset[int]) -> list[Effect]:
        effects = self._hints(s.unhinted, up, s.peer)
        s.named += len(s.unhinted)
        s.unhinted = []
        return effects

    @staticmethod
    def _hints(learned: Sequence[bytes], up: frozenset[int], source: int) -> list[Effect]:
        """Hint every up neighbour but ``source``, naming the ids ``learned`` from it."""
        hint = SyncHintFrame(tuple(learned))
        return [Send(p, hint) for p in sorted(up) if p != source]
