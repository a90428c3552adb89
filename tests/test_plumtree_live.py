"""Plumtree on a live graph (``Plumtree.on_graph``): trees recomputed when the dynamic
overlay changes the graph, feeds moved to them, nothing lost meanwhile.

Whole clusters run in the deterministic simulator (``gossip.sim``), every node with
its own, unshared trees, as real nodes have. A graph change is carried out as the
overlay carries it out: links go down (a crash, a dropped link) or come up (a
replacement link, a join) first, then each node learns the new graph at its own
moment, so for a while nodes disagree about it.

Run with ``-s`` to see the measured figures printed.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core import plumtree as plumtree_module
from gossip.core.frames import GraftFrame, PruneFrame
from gossip.core.plumtree import OriginTrees, Plumtree, ShortestPathTrees
from gossip.core.sync import QUIET_SECONDS
from gossip.sim import Simulation
from gossip.sim.report import repaired
from gossip.topology import generate_graph

Graph = dict[int, frozenset[int]]

# Simulated seconds with nothing to do after which a change has settled: longer than
# the graft timeout and retries, and than the quiet after which a node that heard
# sustained gossip runs the re-sync sessions it deferred (gossip.core.sync: a hint
# from a neighbour that pulled what this node also lacks waits for that quiet).
SETTLE = 3.0 + QUIET_SECONDS


def jitter(rng: random.Random, src: int, dst: int) -> float:
    return rng.uniform(0.001, 0.010)


def graph_of(edges: Iterable[tuple[int, int]], nodes: Iterable[int] = ()) -> Graph:
    adj: dict[int, set[int]] = {n: set() for n in nodes}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    return {n: frozenset(nbs) for n, nbs in adj.items()}


def connected(graph: Mapping[int, Iterable[int]]) -> bool:
    if not graph:
        return True
    start = next(iter(graph))
    seen = {start}
    todo = deque([start])
    while todo:
        for w in graph[todo.popleft()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return len(seen) == len(graph)


def random_connected(rng: random.Random, nodes: list[int]) -> Graph:
    """A random spanning tree of ``nodes`` plus up to n random extra links."""
    order = nodes[:]
    rng.shuffle(order)
    edges = {tuple(sorted((v, rng.choice(order[:i])))) for i, v in enumerate(order) if i}
    for _ in range(rng.randint(0, len(nodes))):
        a, b = rng.sample(nodes, 2)
        edges.add((min(a, b), max(a, b)))
    return graph_of(edges, nodes)  # type: ignore[arg-type]


def without(graph: Graph, node: int) -> Graph:
    return {n: nbs - {node} for n, nbs in graph.items() if n != node}


def edges(graph: Graph) -> set[tuple[int, int]]:
    return {(a, b) for a, nbs in graph.items() for b in nbs if a < b}


def changed(rng: random.Random, graph: Graph, spare: list[int]) -> tuple[Graph, list[int]]:
    """A random connected successor of ``graph``: links dropped, links added, nodes
    crashed (their links dropped), spare nodes joined. Returns it and the crashed."""
    new = dict(graph)
    crashed: list[int] = []
    for _ in range(rng.randint(0, 2)):
        v = rng.choice(sorted(new))
        if len(new) > 2 and connected(without(new, v)):
            new = without(new, v)
            crashed.append(v)
    for _ in range(rng.randint(0, 3)):
        a, b = rng.choice(sorted(edges(new)))
        trial = {**new, a: new[a] - {b}, b: new[b] - {a}}
        if connected(trial):
            new = trial
    for _ in range(rng.randint(0, 3)):
        a, b = rng.sample(sorted(new), 2)
        new = {**new, a: new[a] | {b}, b: new[b] | {a}}
    for v in spare[: rng.randint(0, len(spare))]:
        peers = rng.sample(sorted(new), min(len(new), rng.randint(1, 3)))
        new = {**new, v: frozenset(peers), **{p: new[p] | {v} for p in peers}}
    assert connected(new)
    return new, crashed


class LiveCluster:
    """A simulated cluster whose graph changes: every node runs Plumtree with its own
    trees; ``spare`` nodes exist from the start with no links (they join later)."""

    def __init__(self, graph: Graph, spare: Iterable[int] = (), seed: int = 1) -> None:
        self.graph = graph
        self.rng = random.Random(seed)
        self.sim = Simulation(
            edges(graph),
            seed=seed,
            strategy_factory=lambda n: Plumtree(n, graph),
            latency=jitter,
            nodes=[*graph, *spare],
            core_options={"sync_interval": 1e9},
        )
        self.sim.run(until=1.0)
        self.mids: list[bytes] = []
        self.count = 0

    def plumtree(self, node: int) -> Plumtree:
        strategy = self.sim.cores[node].strategy
        assert isinstance(strategy, Plumtree)
        return strategy

    def submit(self, node: int) -> bytes:
        self.count += 1
        mid = self.sim.submit(node, f"message {self.count} from {node}".encode())
        self.mids.append(mid)
        return mid

    def change(
        self, new: Graph, crashed: Iterable[int], spread: float, traffic: bool = False
    ) -> None:
        """Crash nodes and change links now; then every live node learns ``new`` at
        its own moment within ``spread`` seconds (one message submitted at a random
        member before each if ``traffic``)."""
        sim = self.sim
        for v in crashed:
            sim.crash(v)
        old = edges(self.graph)
        for a, b in sorted(old - edges(new)):
            sim.disconnect(a, b)
        for a, b in sorted(edges(new) - old):
            sim.link(a, b)
        self.graph = new
        start = sim.now
        moments = sorted((self.rng.uniform(0, spread), n) for n in new)
        for at, node in moments:
            sim.run(until=start + at)
            if traffic:
                self.submit(self.rng.choice(sorted(new)))
            sim.carry_out(node, self.plumtree(node).on_graph(new))

    def settle(self) -> None:
        self.sim.run(until=self.sim.now + SETTLE)
        assert self.sim.in_flight == 0

    def undelivered(self) -> list[tuple[int, bytes]]:
        """(node, id) of every message a member of the graph lacks."""
        return [
            (n, m) for m in self.mids for n in sorted(self.graph) if m not in self.sim.stores[n]
        ]

    def broadcast_costs(self) -> list[int]:
        """One message from every member in turn, each settled: the payload envelopes
        each took (a perfect tree: members - 1)."""
        costs = []
        for origin in sorted(self.graph):
            mid = self.submit(origin)
            self.settle()
            costs.append(self.sim.received_by_message.get(mid, 0))
        return costs


def agree_with_fresh_trees(cluster: LiveCluster) -> None:
    """Each member answers parent, children and path exactly as a node that built its
    trees from the current graph alone."""
    for v in cluster.graph:
        live, fresh = cluster.plumtree(v).trees, OriginTrees(v, ShortestPathTrees(cluster.graph))
        for origin in cluster.graph:
            assert live.parent(origin) == fresh.parent(origin)
            assert live.children(origin) == fresh.children(origin)
            assert live.path(origin) == fresh.path(origin)


# -- ShortestPathTrees.may_change -------------------------------------------------


@given(st.randoms(use_true_random=False), st.booleans())
@settings(max_examples=300, deadline=None)
def test_trees_kept_after_a_change_are_exactly_the_fresh_trees(
    rng: random.Random, per_origin: bool
) -> None:
    """For random connected graphs and random changes (links dropped and added, nodes
    removed and added), a node that asked about every origin before the change and then
    re-searched only the origins ``may_change`` names answers every origin exactly as a
    node that searched the new graph from scratch, whether added links are judged from
    distance maps of their ends or by one search per origin (``per_origin``), and the
    same origins are reported moved as with trees shared by all nodes (which search
    again every origin asked about). This is what makes ``retree`` cheap and exact."""
    maps = plumtree_module.MAX_DISTANCE_MAPS
    plumtree_module.MAX_DISTANCE_MAPS = 0 if per_origin else maps
    try:
        check_retree(rng)
    finally:
        plumtree_module.MAX_DISTANCE_MAPS = maps


def check_retree(rng: random.Random) -> None:
    nodes = list(range(1, rng.randint(2, 14) + 1))
    spare = [100, 101]
    before = random_connected(rng, nodes)
    after, _ = changed(rng, before, spare)
    old = ShortestPathTrees(before)
    shared = ShortestPathTrees(before, share=True)  # as gossip-sim's nodes share them
    shared_next = shared.successor(after)
    for v in before:
        view, shared_view = OriginTrees(v, old), OriginTrees(v, shared)
        for origin in before:
            view.children(origin)
            shared_view.children(origin)
        moved = view.retree(old.successor(after))
        assert shared_view.retree(shared_next) == moved
        fresh = OriginTrees(v, ShortestPathTrees(after))
        for origin in after:
            for live in (view, shared_view):
                assert live.parent(origin) == fresh.parent(origin), (v, origin)
                assert live.children(origin) == fresh.children(origin), (v, origin)
                assert live.path(origin) == fresh.path(origin), (v, origin)
        for origin in before:
            old_view = OriginTrees(v, old)
            was = (old_view.parent(origin), old_view.children(origin), old_view.path(origin))
            now = (fresh.parent(origin), fresh.children(origin), fresh.path(origin))
            if origin not in after:
                assert origin in moved
            elif was != now:
                assert moved[origin] == (was[0], now[0])


def test_a_change_far_away_searches_nothing_again() -> None:
    """On a 200-node 3-regular graph, dropping one link re-searches only the origins
    whose tree paths near the node cross it: far fewer than all of them."""
    graph = graph_of(generate_graph(200, 3, 1))
    old = ShortestPathTrees(graph)
    view = OriginTrees(1, old)
    for origin in graph:
        view.children(origin)
    a = max(graph)
    b = max(graph[a])
    new = old.successor({**graph, a: graph[a] - {b}, b: graph[b] - {a}})
    again = [o for o in graph if new.may_change(o, view._cone[o])]
    print(f"link {a}-{b} dropped: node 1 searches {len(again)} of {len(graph)} origins again")
    assert len(again) < len(graph) // 4


# -- whole clusters ---------------------------------------------------------------


@given(st.randoms(use_true_random=False), st.booleans())
@settings(max_examples=60, deadline=None)
def test_after_any_change_every_broadcast_costs_members_minus_one(
    rng: random.Random, traffic: bool
) -> None:
    """A random connected cluster changes at random (links dropped and added, nodes
    crashed, spare nodes joining) and its nodes learn the new graph at different
    moments over 50 ms, with messages submitted meanwhile or not. Nothing is lost: once
    settled, every member holds every message submitted by a live node. All members
    then answer as fresh trees of the new graph, and every later broadcast reaches
    every member with exactly members - 1 payload sends (with traffic during the
    change, after one broadcast per origin, which prunes feeds adopted by grafts that
    crossed the change; without traffic, from the first)."""
    nodes = list(range(1, rng.randint(2, 12) + 1))
    spare = [100, 101]
    cluster = LiveCluster(random_connected(rng, nodes), spare, seed=rng.randint(0, 2**31))
    assert cluster.broadcast_costs() == [len(nodes) - 1] * len(nodes)
    new, crashed = changed(rng, cluster.graph, spare)
    cluster.change(new, crashed, spread=0.05, traffic=traffic)
    cluster.settle()
    assert cluster.undelivered() == []
    agree_with_fresh_trees(cluster)
    if traffic:
        cluster.broadcast_costs()
    assert cluster.broadcast_costs() == [len(new) - 1] * len(new)
    assert cluster.undelivered() == []
    assert not cluster.sim.drops
    for v in new:
        plumtree = cluster.plumtree(v)
        assert set(plumtree.adopted) <= set(new)
        assert plumtree.orphaned == set()
        assert plumtree.standins == {}


def test_origins_that_left_the_graph_are_forgotten() -> None:
    """A node that adopted a neighbour for an origin, stood in for one, and was told
    another cut off keeps none of it once those origins leave the graph."""
    graph = graph_of([(1, 2), (2, 3), (3, 4), (4, 1), (2, 5)])
    cluster = LiveCluster(graph)
    cluster.sim.run(until=2.0)
    node = cluster.plumtree(1)
    node.adopted[5] = {2}
    node.standins[5] = 4
    node.orphaned.add(5)
    node.cut_off[5] = {2}
    cluster.sim.crash(5)
    effects = node.on_graph(without(graph, 5))
    assert (node.adopted, node.standins, node.orphaned, node.cut_off) == ({}, {}, set(), {})
    assert not any(
        isinstance(e.frame, GraftFrame | PruneFrame) and 5 in e.frame.origins  # type: ignore[attr-defined]
        for e in effects
    )


def test_a_new_tree_parent_is_asked_and_the_old_one_told() -> None:
    """A link 1-4 added to the path 1-5-3-4 makes 4 node 1's parent in origin 3's tree
    (4 is searched before 5). Node 1, learning the graph last, sends 4 a Graft naming
    origin 3 and 5 a Prune naming it; 4, which has the new graph, adopts nobody (1 is
    its tree child there), and origin 3's next broadcast costs 3 payload sends."""
    graph = graph_of([(1, 5), (5, 3), (3, 4)])
    cluster = LiveCluster(graph)
    cluster.submit(3)
    cluster.settle()
    assert cluster.plumtree(1).trees.parent(3) == 5
    new = graph_of([*edges(graph), (1, 4)])
    cluster.sim.link(1, 4)
    for v in (3, 4, 5):
        cluster.sim.carry_out(v, cluster.plumtree(v).on_graph(new))
    effects = cluster.plumtree(1).on_graph(new)
    assert GraftFrame((), (3,)) in [e.frame for e in effects if e.peer == 4]  # type: ignore[attr-defined]
    assert PruneFrame((3,)) in [e.frame for e in effects if e.peer == 5]  # type: ignore[attr-defined]
    cluster.sim.carry_out(1, effects)
    cluster.settle()
    assert cluster.plumtree(4).adopted == {}
    mid = cluster.submit(3)
    cluster.settle()
    assert cluster.sim.received_by_message[mid] == 3
    assert cluster.undelivered() == []


# -- 16 nodes: a crash, its detection, and the graph that repairs it ---------------

DETECT = 1.0  # seconds from the crash to the survivors' repaired graph
SUBMIT_EVERY = 0.02


def test_16_nodes_resume_within_a_second_of_the_repaired_graph() -> None:
    """16 nodes, 3 links each, one message every 20 ms from a random live node. Stable:
    every broadcast costs exactly 15 payload sends. One node crashes; 1 s later its
    neighbours link to replacements and the survivors learn that graph over 50 ms.
    Every message submitted after the crash reaches all 15 survivors (none lost while
    the graph is old, nor while nodes disagree); each one submitted from the update
    on is complete within a second (the figure is printed); and once settled, every
    broadcast costs exactly 14 payload sends again."""
    graph = graph_of(generate_graph(16, 3, 1))
    cluster = LiveCluster(graph, seed=16)
    assert cluster.broadcast_costs() == [15] * 16
    sim, rng = cluster.sim, random.Random(16)
    victim = next(v for v in sorted(graph) if connected(without(graph, v)))
    new = repaired(graph, [victim], random.Random(16))
    crash_at = sim.now
    sim.crash(victim)
    submitted: list[tuple[float, bytes]] = []
    update_at = crash_at + DETECT
    moments = sorted((update_at + rng.uniform(0, 0.05), v) for v in new)
    linked = False
    t = crash_at
    while t < update_at + 2.0:
        t += SUBMIT_EVERY
        if not linked and t >= update_at:
            sim.run(until=update_at)  # the replacement links come up, then the graph
            for a, b in sorted(edges(new) - edges(graph)):
                sim.link(a, b)
            linked = True
        while moments and moments[0][0] <= t:
            at, v = moments.pop(0)
            sim.run(until=at)
            sim.carry_out(v, cluster.plumtree(v).on_graph(new))
        sim.run(until=t)
        submitted.append((t, cluster.submit(rng.choice(sorted(new)))))
    cluster.graph = new
    cluster.settle()
    assert cluster.undelivered() == []
    complete = {mid: max(sim.deliveries[(v, mid)].time for v in new) - at for at, mid in submitted}
    after = [complete[mid] for at, mid in submitted if at >= update_at]
    before = [complete[mid] for at, mid in submitted if at < update_at]
    print(
        f"16 nodes, node {victim} crashed, graph update {DETECT:g} s later: "
        f"{len(before)} messages before the update, slowest complete after "
        f"{max(before):.3f} s; {len(after)} from the update on, slowest {max(after):.3f} s, "
        f"median {sorted(after)[len(after) // 2]:.3f} s"
    )
    assert max(after) < 1.0
    assert cluster.broadcast_costs() == [14] * 15
