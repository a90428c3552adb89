"""Plumtree-style broadcast: eager push along a tree, lazy push of ids, graft, prune.

After "Epidemic Broadcast Trees" (Leitão, Pereira, Rodrigues, 2007), with one
change in where the tree comes from. Payloads are pushed eagerly only along
the *origin's* shortest-path tree of the configured graph (every node computes
the same trees: the first found by a breadth-first search that visits
neighbours in ascending id order); on
the other links a node only announces the ids it received (``IHave``, batched
per tick). A node that hears of an id but does not get the message asks an
announcer for it (``Graft``); the announcer sends it and keeps pushing that
origin's messages to the grafting node (it *adopts* it) until told to stop
(``Prune``), so a broken tree heals around a failed link or node; a node that
gets a message from anyone but its tree parent also passes it up the tree,
which repairs a cut-off region in a few hops. A node whose tree parent goes down
does not wait for any of this: it asks a neighbour to stand in for the parent at
once (see ``Plumtree._refeed``). When the tree link comes back,
the adopted copies arrive as duplicates and are pruned.

How long to wait for the tree before grafting adapts (``graft_wait``): a node
measures, in ticks, how late tree copies come after an IHave for them (or after
it grafted too early), smooths that as TCP smooths round trips, and waits that
plus four deviations above a floor of 0.15 s (past the tick after next), at most
``graft_timeout``. On a healthy tree an IHave, sent on the tick, comes after the
tree copy, so the wait stays at the floor; under load it grows. Nothing is grafted
at the first tick after its IHave, however late that tick comes: a late tick (a
long turn, a process that did not run) comes before the reads it delayed, and
the tree copy may be among them (16 processes on a loaded 2-core machine grafted
about half as many ids with this rule; see docs/benchmarks.md). A message a node
had to graft is pushed to all its neighbours, not announced: the tree is broken
around it for that origin, so they are likely cut off too.

Why not let the tree emerge from pruning duplicates, as the paper does: with
many messages in flight from many origins, prunes for different messages cut
a cycle in more than one place and the eager links collapse into a forest;
measured on 16 nodes at 1,000 messages/s, 0 to 9 eager links remained of the
15 a tree needs, most messages came by graft and the slowest took over 1 s.
Origin trees of a static graph are never pruned, so this cannot happen, and
every path is a shortest one: a broadcast costs n - 1 payload sends and
reaches every node within the graph's diameter in hops.

In the dynamic overlay the graph is the live one (``Plumtree.on_graph``): every
node gets the same graph (flooded link state), so every node again computes the
same trees. A change re-searches only the origins whose trees may have moved near
the node (``ShortestPathTrees.may_change``), and the node moves its feeds: a
Graft naming origins to each new tree parent, a Prune to each old one and to
whoever else it had asked, cut-off news made on the old trees forgotten. While
nodes disagree, nothing is lost (IHave and Graft still cover every message);
once all have the graph, adoptions of tree children and of tree parents are gone
and a broadcast costs n - 1 payload sends again.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, compress, repeat
from operator import not_
from typing import NamedTuple

import attrs

from gossip.core.dissemination import MessageReader, group_by_path
from gossip.core.effects import Effect, Send
from gossip.core.frames import (
    Envelope,
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    PeerFrame,
    PruneFrame,
)
from gossip.core.origin_columns import OriginColumn, OriginSet, PeerSets
from gossip.core.paths import relay_path

# Ids per IHave or Graft frame; a full batch is sent without waiting for the tick.
IDS_PER_FRAME = 4096
# Payload bytes per Gossip frame answering a Graft.
GRAFT_REPLY_BYTES = 256 * 1024
# The shortest graft wait: past the tick after next, so a tree copy has at least one
# whole tick after its IHave came (the node ticks every 0.1 s).
MIN_GRAFT_TIMEOUT = 0.15
# Grafted ids remembered to notice their tree copy coming after all.
MAX_GRAFTED = 4096
# A neighbour not up this long after the node started is treated as down, as one
# whose link dropped is at once (see ``Plumtree._orphan``).
ABSENT_GRACE = 3.0
# A graph change that adds links between more nodes than this decides which trees
# moved by one search per origin instead of one per end (a map of n distances each).
MAX_DISTANCE_MAPS = 32
# Which stand-in to prefer, by (before us in the tree order, tree path clear of
# neighbours known down): lower first.
RANKS = {(True, True): 0, (False, True): 1, (True, False): 2, (False, False): 3}


@attrs.define
class _Missing:
    announced: float  # the node's clock (last tick) when the first IHave came
    deadline: float
    announcers: list[int]
    grafted: bool = False
    origin: int | None = None  # as the IHave named it
    tick: int = 0  # the node's tick count when it came (or was last grafted)


# (eager, lazy, sender feeds us from outside the tree): see Plumtree._plan.
_Plan = tuple[tuple[int, ...], tuple[int, ...], bool]


def origin_of(path: tuple[int, ...], here: int) -> int:
    return path[0] if path else here


Edge = tuple[int, int]


def edges_of(graph: Mapping[int, Iterable[int]]) -> set[Edge]:
    """The graph's links as (low, high) pairs: a link counts only when both ends list
    each other (as link-state routing's two-way check), never a self-loop."""
    out: set[Edge] = set()
    for v, nbs in graph.items():
        for w in nbs:
            if v < w and v in graph.get(w, ()):
                out.add((v, w))
    return out


def _distances(graph: Mapping[int, Iterable[int]], source: int) -> dict[int, int]:
    dist = {source: 0}
    queue = deque([source])
    while queue:
        v = queue.popleft()
        d = dist[v] + 1
        for w in graph.get(v, ()):
            if w not in dist:
                dist[w] = d
                queue.append(w)
    return dist


_NO_NODES: frozenset[int] = frozenset()


class Tree(NamedTuple):
    """One origin's shortest-path tree, over ``ShortestPathTrees.ids`` indices."""

    root: int  # the origin's index
    parent: array[int]  # index -> its parent's (the root's own; -1: not reached)
    depth: Sequence[int]  # index -> hops from the root (0 where not reached)


class ShortestPathTrees:
    """Every origin's shortest-path tree of one graph: a breadth-first search that
    visits neighbours in ascending id order, so every node computes the same trees.

    A tree is two arrays over the nodes' indices (``ids``, ascending): each node's
    parent and its depth, both from one search. ``share=True`` keeps every origin's
    tree for every node that asks (5 bytes a node per origin), as a simulation of
    many nodes in one process wants; a real node keeps only its own parent and
    children per origin (see ``OriginTrees``).

    A graph that replaces another (``successor``) also answers which origins' trees
    may have changed near a node (``may_change``), so a node recomputes only those.
    """

    def __init__(
        self,
        graph: Mapping[int, Iterable[int]],
        *,
        share: bool = False,
        previous: ShortestPathTrees | None = None,
    ) -> None:
        links = edges_of(graph)
        adjacency: dict[int, list[int]] = {n: [] for n in graph}
        for a, b in links:
            adjacency[a].append(b)
            adjacency[b].append(a)
        self.graph = {n: tuple(sorted(nbs)) for n, nbs in adjacency.items()}
        self.members = frozenset(self.graph)
        self.links = frozenset(links)
        self.share = share
        # Node indices in ascending id order, so a search that visits neighbours in
        # ascending index order visits them in ascending id order.
        self.ids: tuple[int, ...] = tuple(sorted(self.graph))
        self.index: dict[int, int] = {v: i for i, v in enumerate(self.ids)}
        self.adjacency: tuple[tuple[int, ...], ...] = tuple(
            tuple(self.index[w] for w in self.graph[v]) for v in self.ids
        )
        # origin -> its kept tree (shared only). Hot callers read it before calling
        # ``tree``: most asks find a kept tree, and a call costs more than the read.
        self._trees: dict[int, Tree] = {}
        # What changed since ``previous`` (see ``may_change``).
        self._diffed = previous is not None
        self._removed: frozenset[int] = frozenset()  # ends of links removed
        self._added: tuple[Edge, ...] = ()
        self._kept: dict[int, tuple[int, ...]] = {}  # previous graph less removed links
        self._from_added: dict[int, dict[int, int]] | None = None
        self._moved: dict[int, bool] = {}
        if previous is not None:
            removed = previous.links - self.links
            self._removed = frozenset(v for e in removed for v in e)
            self._added = tuple(sorted(self.links - previous.links))
            if self._added:
                kept = previous.links - removed
                self._kept = {n: () for n in previous.graph}
                for a, b in kept:
                    self._kept[a] += (b,)
                    self._kept[b] += (a,)

    def successor(self, graph: Mapping[int, Iterable[int]]) -> ShortestPathTrees:
        """The trees of ``graph``, which replaces this one (same sharing)."""
        return ShortestPathTrees(graph, share=self.share, previous=self)

    def tree(self, origin: int) -> Tree | None:
        """``origin``'s tree (None for an origin not in the graph): kept when shared,
        else searched again on every call."""
        tree = self._trees.get(origin)
        if tree is None:
            root = self.index.get(origin)
            if root is None:
                return None
            tree = self._search(root)
            if self.share:
                self._trees[origin] = tree
        return tree

    def _search(self, root: int) -> Tree:
        adjacency = self.adjacency
        parent = [-1] * len(adjacency)
        depth = [0] * len(adjacency)
        parent[root] = root
        order = [root]
        for v in order:  # grows as it goes: first in, first searched
            d = depth[v] + 1
            for w in adjacency[v]:
                if parent[w] < 0:
                    parent[w] = v
                    depth[w] = d
                    order.append(w)
        deepest = depth[order[-1]]
        return Tree(root, array("i", parent), bytes(depth) if deepest < 256 else array("i", depth))

    def parents(self, origin: int) -> dict[int, int]:
        """node -> its parent in ``origin``'s tree (the origin maps to itself), as a map
        of ids (for tests and tools: the rules read ``tree``)."""
        tree = self.tree(origin)
        if tree is None:
            return {origin: origin}
        ids = self.ids
        return {ids[v]: ids[p] for v, p in enumerate(tree.parent) if p >= 0}

    def may_change(self, origin: int, cone: frozenset[int]) -> bool:
        """Whether ``origin``'s tree may differ from the previous graph's on the tree
        paths from the nodes of ``cone`` up to the origin (``cone`` holds those paths).

        Two facts make this cheap and exact enough. Removing a link changes only the
        subtree below it, and only if it was a tree link; so a cone clear of the
        removed links' ends keeps its paths. Adding a link between two nodes at the
        same distance from the origin changes nothing (each was found before the
        other was searched); so with the removals made, links added only between
        such pairs keep the tree. Conservative: True may be a tree that did not move.
        """
        if not self._diffed:
            return True
        if not cone.isdisjoint(self._removed):
            return True
        if not self._added:
            return False
        moved = self._moved.get(origin)
        if moved is None:
            moved = self._moved[origin] = self._moved_by_additions(origin)
        return moved

    def _moved_by_additions(self, origin: int) -> bool:
        if origin not in self._kept:
            return True
        ends = sorted({v for e in self._added for v in e})
        if len(ends) > MAX_DISTANCE_MAPS:
            # Many links added (a join of many, a first live graph): search from the
            # origin instead of keeping a distance map per added link's end.
            dist = _distances(self._kept, origin)
            return any(dist.get(a) != dist.get(b) for a, b in self._added)
        if self._from_added is None:
            # Distances are symmetric: one search per end serves every origin.
            self._from_added = {v: _distances(self._kept, v) for v in ends}
        d = self._from_added
        return any(d[a].get(origin) != d[b].get(origin) for a, b in self._added)


class OriginTrees:
    """This node's parent and children in every origin's shortest-path tree.

    With trees of its own (a real node) every tree costs a search, so the answers are
    kept per origin. With shared trees (a simulation) every answer is a few reads of
    the kept arrays, and keeping answers would cost n entries per node (n**2 in all):
    only which origins were asked about is kept, a byte per origin (see ``retree``).
    """

    def __init__(self, node_id: int, trees: ShortestPathTrees) -> None:
        self.node_id = node_id
        self.trees = trees
        self.members = trees.members
        self._me, self._mine = self._place(trees)
        self._children: dict[int, tuple[int, ...]] = {}
        self._parent: dict[int, int | None] = {}
        self._path: dict[int, tuple[int, ...]] = {}
        self._alternatives: dict[int, tuple[tuple[int, bool, frozenset[int]], ...]] = {}
        # origin -> the nodes on the tree paths from us and our neighbours up to it:
        # what our parent, children and path depend on (see ``retree``).
        self._cone: dict[int, frozenset[int]] = {}
        # Shared trees: by origin index, 1 for the origins asked about (see ``retree``).
        self._asked = bytearray(len(trees.ids) if trees.share else 0)

    def _place(self, trees: ShortestPathTrees) -> tuple[int | None, tuple[int, ...]]:
        """Our index in ``trees`` (None if not in its graph) and our neighbours'."""
        me = trees.index.get(self.node_id)
        return me, (() if me is None else trees.adjacency[me])

    def _answers(self, tree: Tree) -> tuple[int | None, tuple[int, ...], tuple[int, ...]]:
        """Our (parent, children, path) in ``tree``, a tree of ``self.trees``."""
        root, parent, _ = tree
        me = self._me
        if me is None or parent[me] < 0:
            return None, (), ()  # not in the graph, or not reached from the origin
        ids = self.trees.ids
        kids = tuple([ids[w] for w in self._mine if parent[w] == me])
        if me == root:
            return None, kids, ()
        up = []
        v = me
        while v != root:
            v = parent[v]
            up.append(ids[v])
        up.reverse()
        return up[-1], kids, tuple(up)

    def _compute(self, origin: int) -> None:
        """Keep our answers for ``origin`` (in the graph), and their cone (own trees)."""
        tree = self.trees.tree(origin)
        assert tree is not None
        parent_id, kids, path = self._answers(tree)
        self._parent[origin] = parent_id
        self._children[origin] = kids
        self._path[origin] = path
        ids, parent = self.trees.ids, tree.parent
        cone = {self.node_id, *path}
        for w in self._mine:
            # Paths up a tree merge for good: stop where this one meets the cone.
            while ids[w] not in cone:
                cone.add(ids[w])
                if parent[w] >= 0:
                    w = parent[w]
        self._cone[origin] = frozenset(cone)

    def retree(self, trees: ShortestPathTrees) -> dict[int, tuple[int | None, int | None]]:
        """Answer from ``trees`` from now on (a graph that replaces ours). Returns, for
        each origin whose parent, children or path here changed among those asked
        about so far, its (old, new) parent; forgets origins no longer in the graph.

        Only origins whose tree may have moved near us are searched again (see
        ``ShortestPathTrees.may_change``); all of them if our own links changed, or
        if the trees are shared (a search is free then)."""
        old = self.trees
        mine_moved = old.graph.get(self.node_id) != trees.graph.get(self.node_id)
        asked: list[tuple[int, tuple[int | None, tuple[int, ...], tuple[int, ...]]]]
        if old.share:
            asked = []
            for origin in compress(old.ids, self._asked):
                tree = old.tree(origin)
                assert tree is not None
                asked.append((origin, self._answers(tree)))
        else:
            asked = [(o, (p, self._children[o], self._path[o])) for o, p in self._parent.items()]
        self.trees = trees
        self.members = trees.members
        self._me, self._mine = self._place(trees)
        self._alternatives.clear()
        self._asked = bytearray(len(trees.ids) if trees.share else 0)
        changed: dict[int, tuple[int | None, int | None]] = {}
        for origin, before in asked:
            if origin not in trees.members:
                self._parent.pop(origin, None)
                self._children.pop(origin, None)
                self._path.pop(origin, None)
                self._cone.pop(origin, None)
                changed[origin] = (before[0], None)
                continue
            if trees.share:
                self._asked[trees.index[origin]] = 1
                tree = trees.tree(origin)
                assert tree is not None
                after = self._answers(tree)
            elif mine_moved or old.share or trees.may_change(origin, self._cone[origin]):
                self._compute(origin)
                after = (self._parent[origin], self._children[origin], self._path[origin])
            else:
                continue
            if after != before:
                changed[origin] = (before[0], after[0])
        return changed

    def _asked_tree(self, origin: int) -> Tree | None:
        """``origin``'s kept tree (shared mode), noted as asked about: ``retree``
        reports changes for the origins asked about so far."""
        trees = self.trees
        tree = trees._trees.get(origin) or trees.tree(origin)
        if tree is not None:
            self._asked[tree.root] = 1
        return tree

    def children(self, origin: int) -> tuple[int, ...]:
        trees = self.trees
        if trees.share:
            tree = self._asked_tree(origin)
            if tree is None:
                return ()
            me = self._me
            if me is None:
                return ()
            parent, ids = tree.parent, trees.ids
            return tuple([ids[w] for w in self._mine if parent[w] == me])
        kids = self._children.get(origin)
        if kids is None:
            if origin not in trees.graph:
                return ()
            self._compute(origin)
            kids = self._children[origin]
        return kids

    def parent(self, origin: int) -> int | None:
        trees = self.trees
        if trees.share:
            # Not an ask (``retree`` reports no change of it): only children and
            # path are (see ``origins_under``).
            tree = trees._trees.get(origin) or trees.tree(origin)
            me = self._me
            if tree is None or me is None or me == tree.root:
                return None
            p = tree.parent[me]
            return trees.ids[p] if p >= 0 else None
        if origin not in self._parent:
            if origin not in trees.graph:
                return None
            self._compute(origin)
        return self._parent[origin]

    def origins_under(self, peer: int) -> list[int]:
        """The origins whose tree reaches us through ``peer`` (our parent in them)."""
        trees = self.trees
        if not trees.share:
            return [o for o in trees.ids if o != self.node_id and self.parent(o) == peer]
        me, p = self._me, trees.index.get(peer)
        if me is None or p is None or p == me:
            return []
        out = []
        for origin in trees.ids:
            tree = trees._trees.get(origin) or trees.tree(origin)
            assert tree is not None
            if tree.parent[me] == p and tree.root != me:
                out.append(origin)
        return out

    def alternatives(self, origin: int) -> tuple[tuple[int, bool, frozenset[int]], ...]:
        """The neighbours that could feed us ``origin``'s messages instead of our tree
        parent: all but our children in its tree, nearest to the origin first (fewer
        hops, then lower id). Each comes with whether it is *before* us in that order,
        and the neighbours of ours on its tree path up to the origin.

        If every node whose parent is down asked only a neighbour before it, the
        stand-ins of all nodes could never form a cycle (following them would always
        end at the origin); see ``Plumtree._find_standins`` for when others are asked."""
        cached = self._alternatives.get(origin)
        if cached is not None:
            return cached
        trees = self.trees
        tree = trees._trees.get(origin) or trees.tree(origin)
        me = self._me
        if tree is None or me is None:
            return ()
        root, parent, depth = tree
        if me == root or parent[me] < 0:
            return ()
        ids, mine = trees.ids, self._mine
        here = depth[me]
        # Our neighbours are at most one hop nearer the origin than we are, so a walk up
        # from one meets no neighbour of ours above that depth: at most two steps.
        nearest = here - 1
        ranked = []
        for w in mine:
            if parent[w] != me:
                via = []
                v = w
                while depth[v] > nearest:
                    v = parent[v]
                    if v in mine:
                        via.append(ids[v])
                ranked.append((depth[w], ids[w], frozenset(via) if via else _NO_NODES))
        ranked.sort()  # by (depth, id): ids differ, so ``via`` is never compared
        mine_key = (here, self.node_id)
        out = tuple([(w, (hops, w) < mine_key, via) for hops, w, via in ranked])
        if not trees.share:
            self._alternatives[origin] = out  # a search saved; shared, a few reads
        return out

    def path(self, origin: int) -> tuple[int, ...]:
        """The path a message of ``origin`` carries when it comes down the tree to us
        (origin first, our parent last; empty at the origin or off the graph)."""
        trees = self.trees
        if trees.share:
            tree = self._asked_tree(origin)
            return () if tree is None else self._answers(tree)[2]
        if origin not in self._path:
            if origin not in trees.graph:
                return ()
            self._compute(origin)
        return self._path[origin]


class Plumtree:
    name = "plumtree"

    def __init__(
        self,
        node_id: int,
        graph: Mapping[int, Iterable[int]] | ShortestPathTrees,
        *,
        graft_timeout: float = 0.5,
        min_graft_timeout: float = MIN_GRAFT_TIMEOUT,
        graft_retry: float = 0.25,
        max_missing: int = 100_000,
    ) -> None:
        self.node_id = node_id
        trees = graph if isinstance(graph, ShortestPathTrees) else ShortestPathTrees(graph)
        self.trees = OriginTrees(node_id, trees)
        self.graft_timeout = graft_timeout
        self.min_graft_timeout = min(min_graft_timeout, graft_timeout)
        # How late tree copies come after an IHave for them: smoothed value and mean
        # deviation, as TCP's round-trip estimate (RFC 6298); see ``graft_wait``.
        self.lateness = 0.0
        self.lateness_dev = 0.0
        self.graft_retry = graft_retry
        self.max_missing = max_missing
        self.up: set[int] = set()
        # The per-origin state below is kept for origins of the graph only, as columns
        # over them (see ``gossip.core.origin_columns``): after a crash a node holds
        # some of it for most origins.
        ids, index = trees.ids, trees.index
        # origin -> neighbours we push that origin's messages to besides the tree (they
        # grafted one); an origin whose last adopted neighbour pruned it or went down
        # is removed.
        self.adopted = PeerSets(ids, index)
        self.now = 0.0
        # peer -> ids to announce to it at the next tick, and their origins (columns).
        self._ihave: dict[int, tuple[list[bytes], list[int]]] = {}
        # Ids announced to us but not received, oldest first (bounded).
        self.missing: dict[bytes, _Missing] = {}
        # origin -> neighbours we pruned for it (their copies are duplicates).
        self._pruned = PeerSets(ids, index)
        # origin -> peers we asked to push us that origin's messages (a graft), so an
        # adoption made for us on old trees can be ended on new ones (``on_trees``).
        # Peers up only.
        self._asked = PeerSets(ids, index)
        # origin -> the last neighbour other than the tree parent that sent us one of
        # its messages first.
        self._feeders: OriginColumn[int] = OriginColumn(ids, index)
        # Ids we grafted whose tree copy has not come: id -> when first announced.
        self._grafted: dict[bytes, float] = {}
        self._store: MessageReader | None = None
        # (origin, sender) -> (eager, lazy) neighbours; cleared when links or adoptions change.
        self._plans: dict[tuple[int, int | None], _Plan] = {}
        # Origins whose tree parent is down, and for some of them the neighbour we asked
        # to feed us their messages meanwhile (a stand-in parent, always up; see
        # ``_refeed``).
        self.orphaned = OriginSet(ids, index)
        self.standins: OriginColumn[int] = OriginColumn(ids, index)
        # origin -> neighbours that told us they are cut off from it; and the origins we
        # told our dependants we are cut off from (see ``_refeed``).
        self.cut_off = PeerSets(ids, index)
        self.cut = OriginSet(ids, index)
        # Origins to look at again once the current input is handled (see ``_adopt``).
        self._refeeds: list[int] = []
        # Neighbours seen up, or given up on (see ``on_tick``), and when we started.
        self._known: set[int] = set()
        self._started: float | None = None
        # Ticks so far: an id is grafted no sooner than the second tick after its IHave
        # (see ``on_tick``).
        self.ticks = 0

    def bind(self, store: MessageReader) -> None:
        self._store = store

    @property
    def graft_wait(self) -> float:
        """How long an announced id may take to come down the tree before it is
        grafted: the floor plus the smoothed lateness and four deviations, at most
        ``graft_timeout``."""
        wait = self.min_graft_timeout + self.lateness + 4 * self.lateness_dev
        return min(self.graft_timeout, wait)

    def _late(self, sample: float) -> None:
        """A tree copy came ``sample`` seconds (in ticks) after its first IHave."""
        self.lateness_dev += (abs(sample - self.lateness) - self.lateness_dev) / 4
        self.lateness += (sample - self.lateness) / 8

    # -- links -------------------------------------------------------------

    def on_peer_up(self, peer: int) -> list[Effect]:
        self.up.add(peer)
        self._known.add(peer)
        self._plans.clear()
        self.cut_off.discard_everywhere(peer)  # a new link: what it said on the old one is stale
        if not self.orphaned:
            return []
        # Our tree parent may be back, and orphans that found no stand-in may find one.
        return self._refeed(
            o
            for o in sorted(self.orphaned)
            if o not in self.standins or self.trees.parent(o) == peer
        )

    def on_peer_down(self, peer: int) -> list[Effect]:
        self.up.discard(peer)
        self._plans.clear()
        self._ihave.pop(peer, None)
        for origin in self.adopted.holding(peer):
            self._unadopt(origin, peer)
        self._pruned.discard_everywhere(peer)
        self._asked.discard_everywhere(peer)
        return self._orphan(peer)

    def _columns(self) -> tuple[OriginColumn[int] | PeerSets | OriginSet, ...]:
        """The per-origin state, as columns over the graph's origins."""
        return (
            self.adopted,
            self._pruned,
            self._asked,
            self._feeders,
            self.orphaned,
            self.standins,
            self.cut_off,
            self.cut,
        )

    def _orphan(self, peer: int) -> list[Effect]:
        """``peer`` is down: find stand-ins for the origins it fed us, and new ones for
        the origins it stood in for."""
        under = self.trees.origins_under(peer)
        lost = {o for o, s in self.standins.items() if s == peer}
        return self._refeed(sorted(lost.union(under)))

    def _usable(self, peer: int | None, origin: int) -> bool:
        """Whether ``peer`` can feed us ``origin``'s messages: it is up, has not told us
        it is cut off from them, and does not depend on us for them (it is not one of
        our adoptees: taking it would make a cycle that nothing feeds)."""
        return (
            peer in self.up
            and not self.cut_off.has(origin, peer)
            and not self.adopted.has(origin, peer)
        )

    def _refeed(self, origins: Iterable[int]) -> list[Effect]:
        """Make sure someone feeds us each of ``origins``' messages at once: the tree
        parent while it is up and not cut off itself, else a stand-in we ask (a Graft
        naming origins), else tell the nodes we feed that we are cut off.

        The messages come with no IHave or graft wait, so a region cut off by a
        failure is served again as soon as its edge nodes learn of it. The stand-in
        is the neighbour nearest to the origin (``OriginTrees.alternatives``),
        preferring one before us in the tree order (stand-ins chosen so can never form
        a cycle) and one whose tree path avoids the neighbours we know are down. A node
        that finds none is cut off: it says so to its children and adoptees (a Prune
        with ``cut``), which then look for another feed in turn, so the news spreads
        down a cut-off region until it reaches nodes with another way in. A cut-off
        node still grafts at once on an IHave; the peer it grafts from stands in."""
        up, trees, usable = self.up, self.trees, self._usable
        standins, orphaned = self.standins, self.orphaned
        down = {n for n in trees.trees.graph.get(self.node_id, ()) if n not in up}
        asks: dict[int, list[int]] = {}
        prunes: dict[int, list[int]] = {}
        cuts: dict[int, list[int]] = {}
        for origin in origins:
            parent = trees.parent(origin)
            if parent is None:
                continue
            if usable(parent, origin):
                orphaned.discard(origin)
                self._uncut(origin, parent, prunes)
                self._end_asked(origin, parent, prunes)
                old = standins.pop(origin, None)
                if old is not None and old in up and origin not in prunes.get(old, ()):
                    prunes.setdefault(old, []).append(origin)
                    self._pruned.add(origin, old)
                continue
            orphaned.add(origin)
            old = standins.get(origin)
            if old is not None:
                if usable(old, origin):
                    continue
                del standins[origin]  # not pruned: it pushes again once fed
            best: tuple[int, int] | None = None
            for w, before, via in trees.alternatives(origin):
                if usable(w, origin):
                    rank = RANKS[before, via.isdisjoint(down)]
                    if best is None or rank < best[0]:
                        best = (rank, w)
            if best is not None:
                standins[origin] = best[1]
                self._asking(best[1], origin)
                self._uncut(origin, best[1], prunes)
                asks.setdefault(best[1], []).append(origin)
            elif origin not in self.cut:
                self.cut.add(origin)
                for d in self._dependants(origin):
                    cuts.setdefault(d, []).append(origin)
        self._plans.clear()
        effects: list[Effect] = []
        for peer, os in sorted(prunes.items()):
            effects.append(Send(peer, PruneFrame(tuple(os))))
        for peer, os in sorted(asks.items()):
            for i in range(0, len(os), IDS_PER_FRAME):
                effects.append(Send(peer, GraftFrame((), tuple(os[i : i + IDS_PER_FRAME]))))
        for peer, os in sorted(cuts.items()):
            effects.append(Send(peer, PruneFrame((), tuple(os))))
        return effects

    def _uncut(self, origin: int, feed: int, prunes: dict[int, list[int]]) -> None:
        """We are fed ``origin``'s messages again (by ``feed``) after telling the nodes
        we feed that we were cut off: tell them it ended (a Prune naming the origin),
        so they take us back at once instead of at our next message."""
        if origin in self.cut:
            self.cut.discard(origin)
            for d in self._dependants(origin):
                if d != feed and origin not in prunes.get(d, ()):
                    prunes.setdefault(d, []).append(origin)

    def _end_asked(self, origin: int, feed: int | None, prunes: dict[int, list[int]]) -> None:
        """``feed`` (our tree parent; on new trees, whoever feeds us) feeds us
        ``origin``'s messages now: prune the others we asked for them (a stand-in
        dropped when it said it was cut off, a graft's announcer), so their adoptions
        of us end now, not at their first duplicate (which may never come: see
        ``_on_prune``)."""
        peers = self._asked.get(origin)
        if peers is None or feed is None:
            return  # with no feed, any adoption of us may help
        for p in sorted(peers):
            if p != feed and p in self.up and origin not in prunes.get(p, ()):
                prunes.setdefault(p, []).append(origin)
                self._pruned.add(origin, p)
        self._asked[origin] = peers & {feed}  # none: the origin goes

    def _asking(self, peer: int, origin: int) -> None:
        """We graft from ``peer`` for ``origin``: it adopts us (if not its tree child)."""
        # Its copies must be able to prune it again: a mark from an earlier prune would
        # stop that for good.
        self._pruned.discard(origin, peer)
        if origin in self.trees.members:
            self._asked.add(origin, peer)

    def _fed_by(self, origin: int, peer: int) -> bool:
        """Whether ``peer`` is, or was to be, our feed for ``origin``."""
        return self.trees.parent(origin) == peer or self.standins.get(origin) == peer

    def _dependants(self, origin: int) -> list[int]:
        """The neighbours we feed ``origin``'s messages to: tree children and adoptees."""
        kids = [c for c in self.trees.children(origin) if c in self.up]
        return kids + sorted(self.adopted.get(origin, _NO_NODES).difference(kids))

    def _upstream_of(self, origin: int) -> int | None:
        """Who is to feed us ``origin``'s messages: the tree parent while it is up and
        not cut off, else the stand-in asked for it (None when nobody is, or at the
        origin)."""
        parent = self.trees.parent(origin)
        if parent is None or self._usable(parent, origin):
            return parent
        return self.standins.get(origin)

    def _heard_from(self, peer: int, origin: int) -> list[Effect]:
        """``peer`` sent us one of ``origin``'s messages: it is not cut off any more, and
        if it is our tree parent, it does not depend on us for them (an adoption of it
        made on other trees, which would keep us from taking it back as our feed)."""
        heard = self.cut_off.has(origin, peer)
        if heard:
            self.cut_off.discard(origin, peer)
        if self.adopted.has(origin, peer) and peer == self.trees.parent(origin):
            self._unadopt(origin, peer)
            heard = True
        return self._refeed((origin,)) if heard else []

    # -- the live graph ----------------------------------------------------

    def on_graph(self, graph: Mapping[int, frozenset[int]]) -> list[Effect]:
        """The live graph changed (the dynamic overlay): take the trees of ``graph``
        from now on, and move this node's feeds to them.

        Every node computes the same trees once it has the same graph; until then a
        node may be fed by its old parent and not yet by its new one. Nothing is lost
        meanwhile: a node asks each new tree parent at once to push it that origin's
        messages (a Graft naming origins, answered as an adoption only by a parent
        still on the old graph: a node never adopts its own tree child), tells each
        old one to stop (Prune), and lazy IHave + Graft cover any message in flight
        across the change. Once all nodes have the graph, adoptions of tree children
        are dropped, stand-ins are pruned as the new parents are up, and a broadcast
        costs n - 1 payload sends again."""
        return self.on_trees(self.trees.trees.successor(graph))

    def on_trees(self, trees: ShortestPathTrees) -> list[Effect]:
        """``on_graph`` with the graph's trees already made (``successor`` of ours):
        a simulation gives all its nodes one shared set."""
        moved = self.trees.retree(trees)
        self._plans.clear()
        # Origins that left the graph are forgotten; what is kept stays bounded by it.
        for column in self._columns():
            column.rekey(trees.ids, trees.index)
        # Cut-off news is about the old trees: a neighbour cut off from an origin was
        # cut off along the old paths, and no news comes when that ends. Forget it both
        # ways; a node still cut off on the new trees says so again below (``_refeed``).
        was_cut = set(self.cut)
        self.cut_off.clear()
        self.cut.clear()
        for origin in list(self.adopted):
            # A tree child is fed by the tree: its adoption would double its copies.
            # The tree parent is to feed us: its adoption, made on the old trees,
            # would make it unusable to us (a cycle) until it pruned us.
            self.adopted[origin] = self.adopted[origin].difference(
                self.trees.children(origin), (self.trees.parent(origin),)
            )
        # New neighbours not up are handled here (stand-ins), not at the next tick.
        self._known.update(trees.graph.get(self.node_id, ()))
        reparented = sorted(o for o, (old, new) in moved.items() if new not in (old, None))
        gone: dict[int, list[int]] = {}
        for origin in sorted(self.orphaned):
            if self.trees.parent(origin) is None:
                # Out of our reach in the graph (a dead node's record, links gone): no
                # message of it will come, no feed is needed.
                self.orphaned.discard(origin)
                standin = self.standins.pop(origin, None)
                if standin in self.up:
                    gone.setdefault(standin, []).append(origin)
        effects = self._refeed(sorted({*reparented, *self.orphaned}))
        grafts: dict[int, list[int]] = {}
        prunes: dict[int, list[int]] = gone
        for origin in reparented:
            old, new = moved[origin]
            upstream = self._upstream_of(origin)
            if new is not None and upstream == new:
                grafts.setdefault(new, []).append(origin)
                self._asking(new, origin)
            if old is not None and old in self.up and old != upstream:
                prunes.setdefault(old, []).append(origin)
                self._pruned.add(origin, old)
        # Feeds asked for on the old trees that the new ones do not need: end them.
        for origin in list(self._asked):
            self._end_asked(origin, self._upstream_of(origin), prunes)
        for origin in sorted(was_cut.difference(self.cut)):
            # Fed again: the neighbours we told we were cut off must hear that it ended
            # (a Prune naming the origin), or they would keep looking elsewhere.
            upstream = self._upstream_of(origin)
            for peer in sorted(self.up):
                if peer != upstream and origin not in prunes.get(peer, ()):
                    prunes.setdefault(peer, []).append(origin)
        for peer, os in sorted(prunes.items()):
            effects.append(Send(peer, PruneFrame(tuple(os))))
        for peer, os in sorted(grafts.items()):
            for i in range(0, len(os), IDS_PER_FRAME):
                effects.append(Send(peer, GraftFrame((), tuple(os[i : i + IDS_PER_FRAME]))))
        return effects

    # -- messages ----------------------------------------------------------

    def on_new(self, env: Envelope, sender: int | None, up: frozenset[int]) -> list[Effect]:
        return self.on_new_batch(GossipFrame((env,)), sender, up)

    def on_new_batch(
        self, frame: GossipFrame, sender: int | None, up: frozenset[int]
    ) -> list[Effect]:
        # The hot path: one call per received frame. Messages of one path share origin
        # and sender, so who gets them is looked up once per path.
        effects: list[Effect] = []
        for path, rows in group_by_path(frame).items():
            effects += self._forward(frame, rows, path, sender)
        return effects

    def _forward(
        self, frame: GossipFrame, rows: Sequence[int], path: tuple[int, ...], sender: int | None
    ) -> list[Effect]:
        """Push the messages at ``rows`` of ``frame`` (all with ``path``) to the eager
        neighbours and announce them to the lazy ones."""
        origin = path[0] if path else self.node_id
        plan = self._plans.get((origin, sender))
        if plan is None:
            plan = self._plan(origin, sender)
        eager, lazy, feeds = plan
        effects: list[Effect] = []
        if feeds and sender is not None:
            self._feeders[origin] = sender  # see on_duplicate
            if self.cut_off or self.adopted:
                effects = self._heard_from(sender, origin)
                if effects:
                    eager, lazy, _ = self._plan(origin, sender)
        out = frame.select(rows, (*path, self.node_id))  # as sent on: with this node
        parts = [(out, eager, lazy)]
        if self.missing and not self.missing.keys().isdisjoint(out.ids):
            grafted = [self._arrived(mid, path, origin) for mid in out.ids]
            if True in grafted:
                # Those we had to graft go to every neighbour (see ``_arrived``).
                everywhere = eager + lazy, ()
                kept = list(compress(range(len(grafted)), map(not_, grafted)))
                to_all = list(compress(range(len(grafted)), grafted))
                parts = [(out.select(kept), eager, lazy)] if kept else []
                parts.append((out.select(to_all), *everywhere))
        for part, to_eager, to_lazy in parts:
            effects += [Send(p, part) for p in to_eager if p not in path]
            for p in to_lazy:
                if p not in path:
                    # Off the tree, announce at once: the tree around us is broken for
                    # this origin, and a neighbour cut off with us should hear of it now.
                    effects += self._announce(p, part.ids, origin, at_once=feeds)
        return effects

    def _announce(
        self, peer: int, ids: tuple[bytes, ...], origin: int, *, at_once: bool
    ) -> list[Effect]:
        """Queue ``ids`` (all of ``origin``) for an IHave to ``peer`` at the next tick;
        send the queue now when ``at_once`` or when it fills a frame."""
        queue = self._ihave.get(peer)
        if queue is None:
            queue = self._ihave[peer] = ([], [])
        queued, origins = queue
        queued += ids
        origins += repeat(origin, len(ids))
        if not at_once and len(queued) < IDS_PER_FRAME:
            return []
        del self._ihave[peer]
        return [
            self._ihave_frame(peer, queued[i : i + IDS_PER_FRAME], origins[i : i + IDS_PER_FRAME])
            for i in range(0, len(queued), IDS_PER_FRAME)
        ]

    def _held_by(self, peer: int, ids: tuple[bytes, ...]) -> None:
        """``peer`` announced ``ids``, so it holds them: they need no IHave to it.

        On a link off the tree both ends get a message and each queues it for the
        other until its tick; the end that ticks second now sends nothing for it (at
        50 messages a second on 16 nodes, most IHave frames named one id, and each
        woke its receiver)."""
        queue = self._ihave.get(peer)
        if queue is None:
            return
        queued, origins = queue
        held = set(ids)
        if held.isdisjoint(queued):
            return
        keep = [i for i, mid in enumerate(queued) if mid not in held]
        if keep:
            self._ihave[peer] = ([queued[i] for i in keep], [origins[i] for i in keep])
        else:
            del self._ihave[peer]

    def _arrived(self, mid: bytes, path: tuple[int, ...], origin: int) -> bool:
        """``mid`` came, announced before: learn how late the tree was, and say whether
        it must be pushed to all neighbours (we had to graft it: the tree around us is
        broken for this origin, and neighbours that lack it would wait for it too)."""
        entry = self.missing.pop(mid, None)
        if entry is None:
            return False
        if path == self.trees.path(origin):
            self._late(self.now - entry.announced)
            return False
        if not entry.grafted:
            return False
        # If the tree copy still comes, how late it was counts (on_duplicate).
        grafted = self._grafted
        grafted[mid] = entry.announced
        if len(grafted) > MAX_GRAFTED:
            del grafted[next(iter(grafted))]
        return True

    def _plan(self, origin: int, sender: int | None) -> _Plan:
        """(eager, lazy) neighbours for ``origin``'s messages from ``sender``, and whether
        ``sender`` feeds us that origin from outside the tree; cached until a link or
        an adoption changes (only for origins in the graph: a peer may name any origin)."""
        links = self.up
        eager = [p for p in self.trees.children(origin) if p in links]
        extra = self.adopted.get(origin)
        if extra:
            eager += [p for p in sorted(extra) if p not in eager]
        parent = self._upstream_of(origin)
        # It did not come down the tree (or from the stand-in): the tree above us is
        # broken (or slow), so pass it up as well as down; this repairs a cut-off
        # region in a few hops instead of one graft timeout per level.
        if sender not in (None, parent) and parent in links and parent not in eager:
            eager.append(parent)
        in_graph = origin in self.trees.trees.graph
        plan = (
            tuple(p for p in eager if p != sender),
            tuple(p for p in sorted(links) if p != sender and p not in eager),
            in_graph and sender not in (None, parent),
        )
        if in_graph:
            self._plans[(origin, sender)] = plan
        return plan

    def on_duplicate(self, env: Envelope, sender: int) -> list[Effect]:
        """A copy from outside our tree parent (or its stand-in) means an adoption is
        no longer needed."""
        mid = env.id
        origin = origin_of(env.path, self.node_id)  # a received copy's path is never empty
        if self.cut_off or self.adopted:
            refed = self._heard_from(sender, origin)
            if refed:
                return refed
        parent = self._upstream_of(origin)
        if sender == parent:
            announced = self._grafted.pop(mid, None)
            if announced is not None and origin not in self.orphaned:  # grafted too early
                self._late(self.now - announced)
            # The tree delivers again, after someone else fed us this origin (an
            # adopter faster than the tree, which no copy from outside the tree
            # would ever prune): end that feed.
            feeder = self._feeders.pop(origin, None)
            if feeder is not None and feeder != sender and feeder in self.up:
                return [Send(feeder, PruneFrame((origin,)))]
            return []
        if origin not in self.trees.members or self._pruned.has(origin, sender):
            return []  # an origin nobody adopts (see _graft_reply), or pruned already
        if parent is None:
            return []  # our tree parent is away and no stand-in: the adoptive one is needed
        self._pruned.add(origin, sender)
        return [Send(sender, PruneFrame((origin,)))]

    def on_control(self, peer: int, frame: PeerFrame) -> list[Effect]:
        if isinstance(frame, IHaveFrame):
            self._held_by(peer, frame.ids)
            now = self._announced(peer, frame.ids, frame.origins)
            return [Send(peer, GraftFrame(tuple(now)))] if now else []
        if isinstance(frame, PruneFrame):
            return self._on_prune(peer, frame)
        if isinstance(frame, GraftFrame):
            effects: list[Effect] = []
            origins = []
            for origin in frame.origins:
                if self.standins.get(origin) == peer and any(
                    w == peer and before for w, before, _ in self.trees.alternatives(origin)
                ):
                    # We asked it first, and it is before us in the tree order: it must
                    # look elsewhere (no 2-cycle); the one that asked a peer after it yields.
                    effects.append(Send(peer, PruneFrame((), (origin,))))
                else:
                    origins.append(origin)
            self._adopt(peer, origins)
            effects += [Send(peer, f) for f in self._graft_reply(peer, frame.ids)]
            lost = tuple(o for o in origins if o in self.cut)
            if lost:  # we cannot feed it these: it should look elsewhere
                effects.append(Send(peer, PruneFrame((), lost)))
            if self._refeeds:
                refeeds, self._refeeds = self._refeeds, []
                effects += self._refeed(refeeds)
            return effects
        return []

    def _on_prune(self, peer: int, frame: PruneFrame) -> list[Effect]:
        unadopted = []
        by_parent = []
        for origin in frame.origins:
            if self.adopted.has(origin, peer):
                self._unadopt(origin, peer)
                unadopted.append(origin)
            # A node that prunes a feed has another one: it is not cut off from that
            # origin (any more; see ``on_trees``).
            if self.cut_off.has(origin, peer):
                self.cut_off.discard(origin, peer)
                unadopted.append(origin)
            if peer == self.trees.parent(origin):
                by_parent.append(origin)
        cut = [o for o in frame.cut if o in self.trees.members]
        for origin in cut:
            self.cut_off.add(origin, peer)
        # It may feed us again (no longer our adoptee or cut off), or may not.
        effects = self._refeed(o for o in [*unadopted, *cut] if self._fed_by(o, peer))
        # Our tree parent pruned us: it had the message we passed up, or got its own
        # copy after ours, so it is fed. Whoever else feeds us that origin (a graft's
        # announcer, a faster adopter) is redundant, and as its copies reach the
        # parent through us, no tree copy would ever come to us after one to prune it.
        prunes: dict[int, list[int]] = {}
        for origin in by_parent:
            if self._upstream_of(origin) != peer:
                continue
            self._end_asked(origin, peer, prunes)
            feeder = self._feeders.pop(origin, None)
            if feeder in self.up and feeder != peer and origin not in prunes.get(feeder, ()):
                prunes.setdefault(feeder, []).append(origin)
                self._pruned.add(origin, feeder)
        effects += [Send(p, PruneFrame(tuple(os))) for p, os in sorted(prunes.items())]
        return effects

    def _adopt(self, peer: int, origins: Iterable[int]) -> None:
        """Push these origins' messages to ``peer`` from now on (origins of the graph
        only: no tree to stand in for otherwise, and no unbounded map)."""
        for origin in origins:
            if (
                origin in self.trees.members
                and origin != peer
                and peer not in self.trees.children(origin)  # the tree feeds it already
            ):
                if not self.adopted.has(origin, peer):
                    self.adopted.add(origin, peer)
                    self._plans.clear()
                    if self._fed_by(origin, peer):
                        self._refeeds.append(origin)  # it depends on us now
                self._pruned.discard(origin, peer)

    def _unadopt(self, origin: int, peer: int) -> None:
        """Stop pushing ``origin``'s messages to ``peer`` (it pruned us or went down)."""
        self.adopted.discard(origin, peer)
        self._plans.clear()

    def _ihave_frame(self, peer: int, ids: list[bytes], origins: list[int]) -> Send:
        return Send(peer, IHaveFrame(tuple(ids), tuple(origins)))

    def _announced(
        self, peer: int, ids: tuple[bytes, ...], origins: tuple[int, ...]
    ) -> list[bytes]:
        """Note what ``peer`` announced; return the ids to graft from it at once."""
        store = self._store
        now: list[bytes] = []
        if store is not None and store.holds_all(ids):
            return now  # nothing new announced: the usual IHave (see below)
        # Each id with its origin (None past the origins given), held ones left out:
        # an IHave mostly names messages that came down the tree before it.
        origins_or_none = chain(origins, repeat(None))
        announced: Iterable[tuple[bytes, int | None]] = zip(ids, origins_or_none, strict=False)
        if store is not None:
            announced = compress(announced, map(not_, map(store.__contains__, ids)))
        for mid, origin in announced:
            entry = self.missing.get(mid)
            if entry is not None:
                if peer not in entry.announcers:
                    entry.announcers.append(peer)
                continue
            if len(self.missing) >= self.max_missing:
                del self.missing[next(iter(self.missing))]  # re-sync will still bring it
            if origin is not None and origin in self.orphaned and origin not in self.standins:
                # Our tree parent is away and no stand-in: nothing will come, ask now
                # (and ask the next announcer if this one does not answer). The graft
                # adopts us there, so the announcer stands in from now on.
                self.missing[mid] = _Missing(
                    self.now, self.now + self.graft_retry, [], True, origin, self.ticks
                )
                now.append(mid)
                self._asking(peer, origin)
                # Even a tree child: it has the message, so it is fed from elsewhere,
                # and our graft makes us its adoptee, which it then never takes back
                # as its feed (``_usable``) until we prune it.
                self.standins[origin] = peer
                self.cut.discard(origin)
                self._plans.clear()
                if len(now) >= IDS_PER_FRAME:
                    break
            else:
                self.missing[mid] = _Missing(
                    self.now, self.now + self.graft_wait, [peer], origin=origin, tick=self.ticks
                )
        return now

    def _graft_reply(self, peer: int, ids: tuple[bytes, ...]) -> Iterator[GossipFrame]:
        store = self._store
        if store is None:
            return
        batch: list[Envelope] = []
        size = 0
        for mid in ids:
            m = store.get(mid)
            if m is None:
                continue
            # A stored path may name an origin outside the graph (an old log): answer
            # the graft, adopt nobody.
            self._adopt(peer, (origin_of(m.path, self.node_id),))
            path = relay_path(m.path, self.node_id, peer, self.trees.members)
            batch.append(Envelope(m.id, m.body, path))
            size += len(m.body) + 64
            if size >= GRAFT_REPLY_BYTES:
                yield GossipFrame(tuple(batch))
                batch, size = [], 0
        if batch:
            yield GossipFrame(tuple(batch))

    # -- timers ------------------------------------------------------------

    def on_tick(self, now: float) -> list[Effect]:
        """Flush the batched IHaves; graft what is overdue.

        An id is grafted at a tick past its deadline, and never at the first tick
        after its IHave (or after its last graft): the node must have read its links
        once since a tick. A tick comes late when the node's turn ran long or its
        process did not run (a loaded machine); it comes before the node reads what
        arrived meanwhile (timers run before I/O), so the tree copy of an id
        announced just before may be waiting unread, and grafting it would only add
        a payload copy (and an adoption) per id."""
        self.now = now
        self.ticks += 1
        settled = self.ticks - 2  # ids noted by this tick count have had a read since a tick
        effects: list[Effect] = []
        if self._started is None:
            self._started = now
        elif now - self._started >= ABSENT_GRACE:
            # A neighbour down since we started never had a peer_down: treat it as one.
            for peer in self.trees.trees.graph.get(self.node_id, ()):
                if peer not in self._known:
                    self._known.add(peer)
                    effects += self._orphan(peer)
        for peer, (ids, origins) in self._ihave.items():
            if ids:
                effects.append(self._ihave_frame(peer, ids, origins))
        self._ihave.clear()
        grafts: dict[int, list[bytes]] = {}
        expired = [
            mid for mid, e in self.missing.items() if e.deadline <= now and e.tick <= settled
        ]
        for mid in expired:
            entry = self.missing[mid]
            while entry.announcers and entry.announcers[0] not in self.up:
                entry.announcers.pop(0)
            if not entry.announcers:
                del self.missing[mid]
                continue
            peer = entry.announcers.pop(0)
            entry.deadline = now + self.graft_retry
            entry.tick = self.ticks
            entry.grafted = True
            grafts.setdefault(peer, []).append(mid)
            if entry.origin is not None:
                self._asking(peer, entry.origin)
        for peer, ids in sorted(grafts.items()):
            for i in range(0, len(ids), IDS_PER_FRAME):
                effects.append(Send(peer, GraftFrame(tuple(ids[i : i + IDS_PER_FRAME]))))
        return effects
