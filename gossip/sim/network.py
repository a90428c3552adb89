"""A fake network that drives many ``GossipCore`` instances in simulated time.

Everything is deterministic for a given ``seed``: one ``random.Random`` draws
losses and latencies in the order the effects are carried out, nodes are
visited in sorted order, and the event queue breaks time ties by insertion
order. Effects are carried out exactly as a real node must: in order, all of
them, before the core sees its next input (``Persist`` -> ``store.add``).

Links behave like TCP connections: frames on one directed link arrive in the
order they were sent (a frame never overtakes an earlier one on the same
link), and frames still in flight when a link goes down (``disconnect``,
``crash``, or a ``DropPeer``) are discarded. ``loss`` is a per-frame drop
probability on top of that, for measuring what a strategy does without
recovery.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import attrs

from gossip.core.dissemination import Dissemination, Flood
from gossip.core.effects import DropPeer, Effect, Persist, Send, StreamMessages
from gossip.core.frames import GossipFrame, PeerFrame, SyncDataFrame
from gossip.core.state import GossipCore
from gossip.core.sync import stream_frames
from gossip.store.memory import MemoryStore

LatencyModel = Callable[[random.Random, int, int], float]


class SimulationLimit(RuntimeError):
    """``run`` processed ``max_events`` events without reaching its stopping point."""


@attrs.frozen(slots=True)
class Delivery:
    """When and how far from its origin a node stored a message."""

    time: float
    hops: int  # len(path) as stored: 0 at the origin


@attrs.frozen(slots=True)
class DropRecord:
    time: float
    node: int
    peer: int
    reason: str


@attrs.frozen(slots=True)
class Stats:
    """Dissemination quality over all submitted messages, counted at live nodes."""

    messages: int
    live_nodes: int
    # Share of live nodes holding a message, averaged over messages.
    reliability: float
    # Relative message redundancy: payload envelopes received for a message /
    # (live nodes - 1) - 1, averaged over messages. 0 is a perfect spanning tree.
    redundancy: float
    # Largest hop count at which any live node stored any message.
    max_hops: int
    # Largest time from a message's first submit to its storing at a live node.
    max_latency: float
    # DropPeer effects seen; a correct cluster produces none.
    drops: int


# A frame in flight, as queued: (arrival, sequence number, src, dst, link epoch, frame).
# A plain tuple: the simulator makes one per frame sent, millions in a large run.
_InFlight = tuple[float, int, int, int, int, PeerFrame]


def _link(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


class Simulation:
    def __init__(
        self,
        edges: Iterable[tuple[int, int]],
        *,
        seed: int,
        strategy_factory: Callable[[int], Dissemination] = Flood,
        latency: LatencyModel | float = 0.001,
        loss: float = 0.0,
        max_body: int = 32768,
        tick_interval: float = 0.1,
        quiet_ticks: int = 0,
        nodes: Iterable[int] = (),
        frame_bytes: Callable[[PeerFrame], bytes] | None = None,
        core_options: Mapping[str, float] | None = None,
    ) -> None:
        """Build the cluster and bring every link up (``peer_up`` on both ends).

        ``nodes`` adds nodes that appear in no edge (a one-node cluster).
        ``quiet_ticks``: once no frame is in flight, ``run()`` without ``until``
        keeps ticking until this many consecutive ticks produced no effect, so
        strategies that act on timers get to finish.
        ``frame_bytes`` (e.g. ``gossip.wire.codec.encode``): when given, every
        delivered frame is encoded with it and its size counted in
        ``bytes_delivered``. ``core_options``: keyword arguments passed to every
        ``GossipCore`` (``sync_interval``, ``sync_timeout``).
        """
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        if not tick_interval > 0:
            raise ValueError(f"tick_interval must be positive, got {tick_interval}")
        if quiet_ticks < 0:
            raise ValueError(f"quiet_ticks must be >= 0, got {quiet_ticks}")
        if callable(latency):
            self._latency: LatencyModel = latency
        else:
            if latency < 0:
                raise ValueError(f"latency must be >= 0, got {latency}")
            fixed = float(latency)
            self._latency = lambda _rng, _src, _dst: fixed

        adjacency: dict[int, set[int]] = {n: set() for n in nodes}
        edge_list: list[tuple[int, int]] = []
        for a, b in edges:
            if a == b:
                raise ValueError(f"self-loop at node {a}")
            if b in adjacency.get(a, ()):
                continue
            adjacency.setdefault(a, set()).add(b)
            adjacency.setdefault(b, set()).add(a)
            edge_list.append((a, b))

        self.rng = random.Random(seed)
        self.loss = loss
        self.tick_interval = tick_interval
        self.quiet_ticks = quiet_ticks
        self.frame_bytes = frame_bytes
        self.now = 0.0
        self.nodes: tuple[int, ...] = tuple(sorted(adjacency))
        self.neighbours: dict[int, frozenset[int]] = {
            n: frozenset(adj) for n, adj in adjacency.items()
        }
        self.edges: tuple[tuple[int, int], ...] = tuple(edge_list)
        self.stores: dict[int, MemoryStore] = {}
        self.cores: dict[int, GossipCore] = {}
        # One member set for all cores (GossipCore's frozenset() of a frozenset is the
        # same object): a copy per core would cost n**2 entries, 5 GB at 10,000 nodes.
        members = frozenset(self.nodes)
        for n in self.nodes:
            store = MemoryStore()
            self.stores[n] = store
            self.cores[n] = GossipCore(
                n,
                adjacency[n],
                store,
                strategy_factory(n),
                max_body,
                members,
                **(core_options or {}),
            )
        self.crashed: set[int] = set()

        # Counters, per node unless said otherwise.
        self.received: dict[int, int] = dict.fromkeys(self.nodes, 0)  # payload envelopes
        self.duplicates: dict[int, int] = dict.fromkeys(self.nodes, 0)  # ... already held
        self.sent_to: dict[int, int] = dict.fromkeys(self.nodes, 0)  # envelopes in Sends to it
        self.received_by_message: dict[bytes, int] = {}
        self.deliveries: dict[tuple[int, bytes], Delivery] = {}
        self.origins: dict[bytes, tuple[int, float]] = {}  # first submit: node, time
        self.drops: list[DropRecord] = []
        self.frames_lost = 0  # dropped by ``loss``
        self.frames_discarded = 0  # in flight when their link went down
        self.frames_unsendable = 0  # Send on a link that was not up
        self.persist_conflicts = 0  # Persist of an id the store already held
        self.events = 0  # deliveries and tick rounds processed, over all runs
        self.sync_received: dict[int, int] = dict.fromkeys(self.nodes, 0)  # SyncData envelopes
        # Per (src, dst, frame class name): frames delivered, and with ``frame_bytes``
        # their encoded bytes.
        self.frames_delivered: Counter[tuple[int, int, str]] = Counter()
        self.bytes_delivered: Counter[tuple[int, int, str]] = Counter()

        self._queue: list[_InFlight] = []
        self._seq = itertools.count()
        self._up: set[tuple[int, int]] = set()
        self._epoch: dict[tuple[int, int], int] = {}
        self._link_clear: dict[tuple[int, int], float] = {}  # directed: last arrival time
        self._ticks = 0

        for a, b in self.edges:
            self.connect(a, b)

    # -- inputs ---------------------------------------------------------------

    def submit(self, node: int, body: bytes) -> bytes:
        """A client submits ``body`` at ``node`` now; returns the message id.

        ``SubmitRejected`` from the core propagates.
        """
        self._require_live(node)
        result = self.cores[node].submit(body, self.now)
        if result.new:
            self.origins.setdefault(result.id, (node, self.now))
        self._apply(node, result.effects)
        return result.id

    def connect(self, a: int, b: int) -> None:
        """Bring the link a-b up (both ends get ``peer_up``); no-op if up or a node is down."""
        if b not in self.neighbours.get(a, frozenset()):
            raise ValueError(f"{a}-{b} is not an edge")
        key = _link(a, b)
        if key in self._up or a in self.crashed or b in self.crashed:
            return
        self._up.add(key)
        self._apply(a, self.cores[a].peer_up(b, self.now))
        if key in self._up:  # a's effects may have dropped b already
            self._apply(b, self.cores[b].peer_up(a, self.now))

    def disconnect(self, a: int, b: int) -> None:
        """Take the link a-b down: frames in flight on it are lost, live ends get ``peer_down``."""
        key = _link(a, b)
        if key not in self._up:
            return
        self._up.discard(key)
        self._epoch[key] = self._epoch.get(key, 0) + 1
        self._link_clear.pop((a, b), None)
        self._link_clear.pop((b, a), None)
        for here, there in ((a, b), (b, a)):
            if here not in self.crashed:
                self._apply(here, self.cores[here].peer_down(there, self.now))

    def crash(self, node: int) -> None:
        """``node`` stops: it sends and receives nothing more; its neighbours get ``peer_down``.

        Its store is kept for inspection but it no longer counts in ``stats``.
        """
        self._require_live(node)
        self.crashed.add(node)
        for peer in sorted(self.neighbours[node]):
            self.disconnect(node, peer)

    def link(self, a: int, b: int) -> None:
        """Add the link a-b to the graph and bring it up, as a dynamic overlay's
        replacement link or join does (both nodes must be live)."""
        if a == b:
            raise ValueError(f"self-loop at node {a}")
        self._require_live(a)
        self._require_live(b)
        if b not in self.neighbours[a]:
            for here, there in ((a, b), (b, a)):
                self.neighbours[here] = self.neighbours[here] | {there}
                core = self.cores[here]
                core.neighbours = core.neighbours | {there}
            self.edges = (*self.edges, (a, b))
        self.connect(a, b)

    def carry_out(self, node: int, effects: list[Effect]) -> None:
        """Carry out effects ``node`` produced for an input that is not a frame or a
        tick (a new live graph, ``Plumtree.on_graph``), as for any other input."""
        self._require_live(node)
        self._apply(node, effects)

    def run(self, until: float | None = None, max_events: int = 10_000_000) -> int:
        """Process deliveries and ticks in time order; return how many were processed.

        Ticks fall at every multiple of ``tick_interval``; each calls
        ``core.tick(now)`` on every live node. Without ``until``, stop when no
        frame is in flight (and ``quiet_ticks`` quiet ticks have passed).
        With ``until``, stop before the first event after it and advance
        ``now`` to ``until`` (ticking on the way even when nothing is in
        flight). Raises ``SimulationLimit`` after ``max_events`` events.
        """
        processed = 0
        quiet = 0
        while True:
            if until is None and not self._queue and quiet >= self.quiet_ticks:
                break
            next_frame = self._queue[0][0] if self._queue else math.inf
            next_tick = (self._ticks + 1) * self.tick_interval
            when = min(next_tick, next_frame)
            if until is not None and when > until:
                break
            if processed >= max_events:
                raise SimulationLimit(f"{max_events} events processed at t={self.now}")
            processed += 1
            self.events += 1
            if next_tick <= next_frame:
                self._ticks += 1
                self.now = max(self.now, next_tick)
                if self._tick():
                    quiet = 0
                elif not self._queue:
                    quiet += 1
            else:
                _, _, src, dst, epoch, frame = heapq.heappop(self._queue)
                self.now = next_frame
                self._deliver(src, dst, epoch, frame)
                quiet = 0
        if until is not None and until > self.now:
            self.now = until
        return processed

    # -- observations ---------------------------------------------------------

    @property
    def live(self) -> list[int]:
        return [n for n in self.nodes if n not in self.crashed]

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def is_up(self, a: int, b: int) -> bool:
        return _link(a, b) in self._up

    def holders(self, mid: bytes) -> list[int]:
        """Live nodes that hold ``mid``."""
        return [n for n in self.live if mid in self.stores[n]]

    def stats(self) -> Stats:
        live = self.live
        mids = list(self.origins)
        reliability = redundancy = max_latency = 0.0
        max_hops = 0
        for mid in mids:
            start = self.origins[mid][1]
            held = 0
            for n in live:
                got = self.deliveries.get((n, mid))
                if got is None:
                    continue
                held += 1
                max_hops = max(max_hops, got.hops)
                max_latency = max(max_latency, got.time - start)
            reliability += held / len(live) if live else 0.0
            if len(live) > 1:
                redundancy += self.received_by_message.get(mid, 0) / (len(live) - 1) - 1
        if mids:
            reliability /= len(mids)
            redundancy /= len(mids)
        else:
            reliability = 1.0
        return Stats(
            messages=len(mids),
            live_nodes=len(live),
            reliability=reliability,
            redundancy=redundancy,
            max_hops=max_hops,
            max_latency=max_latency,
            drops=len(self.drops),
        )

    # -- machinery ------------------------------------------------------------

    def _require_live(self, node: int) -> None:
        if node not in self.cores:
            raise ValueError(f"no node {node}")
        if node in self.crashed:
            raise ValueError(f"node {node} has crashed")

    def _tick(self) -> bool:
        produced = False
        for n in self.live:
            effects = self.cores[n].tick(self.now)
            produced = produced or bool(effects)
            self._apply(n, effects)
        return produced

    def _deliver(self, src: int, dst: int, epoch: int, frame: PeerFrame) -> None:
        key = (src, dst) if src < dst else (dst, src)
        if key not in self._up or self._epoch.get(key, 0) != epoch:
            self.frames_discarded += 1
            return
        kind = (src, dst, type(frame).__name__)
        self.frames_delivered[kind] += 1
        if self.frame_bytes is not None:
            self.bytes_delivered[kind] += len(self.frame_bytes(frame))
        if isinstance(frame, SyncDataFrame):
            self.sync_received[dst] += len(frame.messages)
        if isinstance(frame, GossipFrame):
            store = self.stores[dst]
            seen: set[bytes] = set()
            counts = self.received_by_message
            for mid in frame.ids:  # the columns: no Envelope built per message
                self.received[dst] += 1
                counts[mid] = counts.get(mid, 0) + 1
                if mid in seen or mid in store:
                    self.duplicates[dst] += 1
                seen.add(mid)
        self._apply(dst, self.cores[dst].receive(src, frame, self.now))

    def _apply(self, node: int, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self._send(node, effect.peer, effect.frame)
            elif isinstance(effect, Persist):
                message = effect.message
                if self.stores[node].add(message):
                    self.deliveries[(node, message.id)] = Delivery(self.now, len(message.path))
                else:
                    self.persist_conflicts += 1
            elif isinstance(effect, StreamMessages):
                members = self.cores[node].members
                for frame in stream_frames(self.stores[node], node, effect, members):
                    self._send(node, effect.peer, frame)
            elif isinstance(effect, DropPeer):
                self.drops.append(DropRecord(self.now, node, effect.peer, effect.reason))
                if effect.peer in self.neighbours[node]:
                    self.disconnect(node, effect.peer)

    def _send(self, src: int, dst: int, frame: PeerFrame) -> None:
        key = (src, dst) if src < dst else (dst, src)
        if key not in self._up:
            self.frames_unsendable += 1
            return
        if isinstance(frame, GossipFrame):
            self.sent_to[dst] += len(frame)
        if self.loss and self.rng.random() < self.loss:
            self.frames_lost += 1
            return
        delay = self._latency(self.rng, src, dst)
        if not delay >= 0:
            raise ValueError(f"latency model gave {delay} for {src}->{dst}")
        arrival = self.now + delay
        # FIFO per directed link, as TCP: never overtake the previous frame.
        clear = self._link_clear
        arrival = max(arrival, clear.get((src, dst), arrival))
        clear[(src, dst)] = arrival
        heapq.heappush(
            self._queue, (arrival, next(self._seq), src, dst, self._epoch.get(key, 0), frame)
        )
