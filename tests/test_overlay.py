"""The dynamic overlay's pure core (gossip.core.overlay): records, suspicion, replacement.

``Net`` wires several ``Overlay``s together with no sockets: a ``Send`` is delivered
in order, a ``Dial`` makes a link when both ends are alive and the callee accepts,
a ``Hangup`` takes the link down on both ends; time moves in ticks of 0.1 s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.core.effects import Dial, DropPeer, Effect, Hangup, Send
from gossip.core.frames import NodeRecord, NodeRecordsFrame
from gossip.core.overlay import (
    BAD_ADDRESS,
    BAD_NEIGHBOURS,
    BAD_VERSION,
    CUT_OFF_FACTOR,
    RECORD_MAX_AGE,
    RECORDS_PER_FRAME,
    TARGET_DEGREE,
    Overlay,
    components,
)
from gossip.topology import generate_config

REPLACE_AFTER = 2.0
TICK = 0.1


class Graphs:
    """A stand-in dissemination strategy: records every graph it is given."""

    def __init__(self) -> None:
        self.seen: list[Mapping[int, frozenset[int]]] = []

    def on_graph(self, graph: Mapping[int, frozenset[int]]) -> list[Effect]:
        self.seen.append(graph)
        return []


def address(n: int) -> str:
    return f"tcp:host=10.0.0.{n}:port=17000"


class Net:
    def __init__(self, preferred: Mapping[int, Iterable[int]], replace_after: float = 2.0):
        self.now = 1000.0
        self.preferred = {n: tuple(nbs) for n, nbs in preferred.items()}
        self.nodes: dict[int, Overlay] = {}
        self.listeners: dict[int, Graphs] = {}
        self.alive: set[int] = set()
        self.links: set[frozenset[int]] = set()
        self.blocked: set[frozenset[int]] = set()  # pairs cut apart: no link between them
        self.queue: deque[tuple[int, Effect]] = deque()
        self.dropped: list[DropPeer] = []
        self.replace_after = replace_after
        self._incarnation = 0
        for n in self.preferred:
            self.start(n)
        self.connect_preferred()

    def start(self, n: int, preferred: Iterable[int] | None = None) -> Overlay:
        self._incarnation += 1
        nbs = self.preferred.get(n, ()) if preferred is None else tuple(preferred)
        listener = self.listeners[n] = Graphs()
        node = Overlay(
            n,
            address(n),
            self._incarnation,
            {m: address(m) for m in nbs},
            listener,
            replace_after=self.replace_after,
        )
        self.nodes[n] = node
        self.alive.add(n)
        self.run_effects(n, node.start(self.now))
        return node

    def connect_preferred(self) -> None:
        for n in sorted(self.alive):
            for m in self.nodes[n].preferred:
                if m in self.alive:
                    self.link(n, m)
        self.settle()

    def link(self, a: int, b: int) -> None:
        pair = frozenset((a, b))
        if pair in self.links or pair in self.blocked or a not in self.alive or b not in self.alive:
            return
        self.links.add(pair)
        self.run_effects(a, self.nodes[a].link_up(b, self.now))
        self.run_effects(b, self.nodes[b].link_up(a, self.now))

    def unlink(self, a: int, b: int) -> None:
        pair = frozenset((a, b))
        if pair not in self.links:
            return
        self.links.discard(pair)
        for x, y in ((a, b), (b, a)):
            if x in self.alive:
                self.run_effects(x, self.nodes[x].link_down(y, self.now))

    def crash(self, n: int) -> None:
        self.alive.discard(n)
        for pair in [p for p in self.links if n in p]:
            (other,) = pair - {n}
            self.links.discard(pair)
            self.run_effects(other, self.nodes[other].link_down(n, self.now))
        self.settle()

    def run_effects(self, n: int, effects: list[Effect]) -> None:
        self.queue.extend((n, e) for e in effects)

    def settle(self) -> None:
        while self.queue:
            n, e = self.queue.popleft()
            if n not in self.alive:
                continue
            if isinstance(e, Send):
                if frozenset((n, e.peer)) in self.links:
                    assert isinstance(e.frame, NodeRecordsFrame)
                    self.run_effects(e.peer, self.nodes[e.peer].receive(n, e.frame, self.now))
            elif isinstance(e, Dial):
                if e.peer in self.alive and self.nodes[e.peer].accepts(n):
                    self.link(n, e.peer)
            elif isinstance(e, Hangup):
                self.unlink(n, e.peer)
            elif isinstance(e, DropPeer):
                self.dropped.append(e)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += TICK
            for n in sorted(self.alive):
                self.run_effects(n, self.nodes[n].tick(self.now))
            self.settle()
            # Preferred links come back by themselves (both ends keep dialing them).
            for n in sorted(self.alive):
                for m in self.nodes[n].preferred:
                    if m in self.alive and frozenset((n, m)) not in self.links:
                        self.link(n, m)
            self.settle()

    def degree(self, n: int) -> int:
        return sum(1 for p in self.links if n in p)

    def link_graph(self) -> dict[int, set[int]]:
        graph: dict[int, set[int]] = {n: set() for n in self.alive}
        for a, b in (tuple(p) for p in self.links):
            graph[a].add(b)
            graph[b].add(a)
        return graph


def sixteen() -> dict[int, tuple[int, ...]]:
    return {n: spec.neighbours for n, spec in generate_config(16).nodes.items()}


def test_records_flood_and_the_graph_counts_agreed_links_only() -> None:
    """Every node learns every record over the links, and its live graph holds a link
    only when both ends' records name it; the strategy is told each new graph."""
    net = Net(sixteen())
    net.run(0.5)
    truth = {n: frozenset(nbs) for n, nbs in net.link_graph().items()}
    for n in net.alive:
        assert net.nodes[n].graph == truth
        assert net.listeners[n].seen[-1] == truth
        assert net.nodes[n].known == frozenset(range(1, 17))


def test_three_neighbours_crashed_are_replaced_after_replace_after_and_back() -> None:
    """A node whose three neighbours crash keeps them as suspects (still counted) until
    replace_after passes, then links to three live nodes; the change list says why.
    When they come back, the replacements are dropped and every degree is 3 again."""
    net = Net(sixteen())
    net.run(0.5)
    x = 1
    lost = net.preferred[x]
    for n in lost:
        net.crash(n)
    net.run(REPLACE_AFTER * 0.8)
    node = net.nodes[x]
    assert set(node.suspects) == set(lost)
    assert net.degree(x) == 0
    net.run(REPLACE_AFTER)
    assert net.degree(x) == TARGET_DEGREE
    assert set(node.unreachable) == set(lost)
    changes = [what for _, what in node.changes]
    assert any(
        c.startswith("linked ") and "(replaces " in c and "unreachable" in c for c in changes
    )
    assert all(net.degree(n) >= TARGET_DEGREE for n in net.alive)
    assert len(components(net.link_graph())) == 1
    for n in lost:
        net.start(n)
    net.run(1.0)
    assert {n: net.degree(n) for n in net.alive} == dict.fromkeys(range(1, 17), 3)
    assert net.link_graph() == {n: set(nbs) for n, nbs in net.preferred.items()}
    assert any("dropped" in what and "returned" in what for _, what in node.changes)


def test_news_of_a_suspect_restarts_its_wait() -> None:
    """A suspect that another node's newer record names as linked is not replaced when
    replace_after has passed since its own link went down: the wait restarts (SWIM)."""
    net = Net({1: (2,), 2: (1, 3), 3: (2,)})
    net.run(0.5)
    net.unlink(1, 2)  # the link 1-2 only; 2 lives and stays linked to 3
    node = net.nodes[1]
    assert 2 in node.suspects
    # 3 re-floods a record naming 2 just before the wait would end.
    net.now += REPLACE_AFTER - 0.2
    rec = net.nodes[3].own_record()
    fresh = NodeRecord(3, rec.incarnation, rec.version + 5, rec.address, rec.neighbours)
    net.run_effects(1, node.receive(3, NodeRecordsFrame((fresh,)), net.now))
    net.now += 0.5
    net.run_effects(1, node.tick(net.now))
    assert 2 in node.suspects and 2 not in node.unreachable


def test_a_neighbour_alive_but_cut_off_from_this_node_is_replaced_in_the_end() -> None:
    """News that a suspect is linked elsewhere restarts its wait, but a link that stays
    down CUT_OFF_FACTOR suspicion timeouts is replaced anyway (the two nodes are cut
    apart); the preferred neighbour stays dialed and comes back when the cut heals."""
    net = Net(sixteen())
    net.run(0.5)
    node = net.nodes[1]
    cut = net.preferred[1][0]
    net.blocked.add(frozenset((1, cut)))
    net.unlink(1, cut)
    for _ in range(int(CUT_OFF_FACTOR * node.timeout() / 0.5) + 4):
        net.run(0.5)
        other = net.nodes[cut].own_record()  # the cut-off node's neighbours still hear it
        news = NodeRecord(
            cut, other.incarnation, other.version + 100, other.address, other.neighbours
        )
        net.nodes[cut].version += 100
        net.run_effects(1, node.receive(net.preferred[1][1], NodeRecordsFrame((news,)), net.now))
        net.settle()
    assert cut in node.unreachable
    assert any(f"{cut} unreachable from here" in what for _, what in node.changes)
    assert net.degree(1) == TARGET_DEGREE
    net.blocked.clear()
    net.run(1.0)
    assert cut not in node.unreachable and net.degree(1) == TARGET_DEGREE


def test_late_timers_stretch_the_suspicion_timeout() -> None:
    """Lifeguard's local health: a node whose own tick came seconds late (paused)
    waits longer before declaring a suspect unreachable, and recovers over time."""
    net = Net({1: (2,), 2: (1,)})
    node = net.nodes[1]
    before = node.timeout()
    node.tick(net.now + 5.0)  # 5 s without a tick: the process was stopped
    assert node.health == 1 and node.timeout() == 2 * before
    t = net.now + 5.0
    for _ in range(200):
        t += TICK
        node.tick(t)
    assert node.health == 0


def test_a_leaving_neighbour_is_replaced_at_once() -> None:
    """A node that leaves floods leaving=true before its links close: each neighbour
    replaces it at once (no replace_after wait) and drops it from the graph."""
    net = Net(sixteen())
    net.run(0.5)
    leaver = 5
    neighbours = net.preferred[leaver]
    net.run_effects(leaver, net.nodes[leaver].leave(net.now))
    net.settle()
    net.crash(leaver)  # its links close as it stops
    for n in neighbours:
        assert net.degree(n) >= TARGET_DEGREE, n
        assert leaver not in net.nodes[n].graph
        assert any(what == f"{leaver} left" for _, what in net.nodes[n].changes)


def test_a_joining_node_with_no_neighbours_links_to_three() -> None:
    """A node not in anyone's file that reached one running node (a seed) learns the
    records and links to two more, ending with degree 3 in one connected overlay."""
    net = Net(sixteen())
    net.run(0.5)
    new = net.start(17, preferred=())
    net.link(17, 4)  # its seed dial
    net.settle()
    net.run(0.5)
    assert net.degree(17) == TARGET_DEGREE
    assert any("joining" in what or "below" in what for _, what in new.changes)
    assert len(components(net.link_graph())) == 1
    assert all(17 in net.nodes[n].graph for n in net.alive)


def test_bad_records_are_dropped_and_counted_the_link_kept() -> None:
    """A malformed record costs nothing but itself (counted by reason); a frame with
    more records than an honest node sends costs the link."""
    net = Net({1: (2,), 2: (1,)})
    node = net.nodes[1]
    bad = (
        NodeRecord(9, 1, 0, address(9), ()),  # version 0
        NodeRecord(9, 1, 1, "", ()),  # no address
        NodeRecord(9, 1, 1, "x" * 10_000, ()),  # address too long
        NodeRecord(9, 1, 1, address(9), (9,)),  # names itself
        NodeRecord(9, 1, 1, address(9), (3, 3)),  # a neighbour twice
        NodeRecord(9, 1, 1, address(9), tuple(range(100, 200))),  # too many
    )
    assert node.receive(2, NodeRecordsFrame(bad), net.now) == []
    assert node.bad_records[BAD_VERSION] == 1
    assert node.bad_records[BAD_ADDRESS] == 2
    assert node.bad_records[BAD_NEIGHBOURS] == 3
    assert 9 not in node.records
    flood = NodeRecordsFrame((NodeRecord(9, 1, 1, address(9), ()),) * (RECORDS_PER_FRAME + 1))
    effects = node.receive(2, flood, net.now)
    assert [type(e) for e in effects] == [DropPeer]


def test_a_restarted_node_numbers_its_record_above_its_old_one() -> None:
    """A node that restarts (version from 0) hears its old, higher-numbered record
    back on its first link and floods its own above it, so others take the new one."""
    net = Net({1: (2,), 2: (1,)})
    net.run(0.5)
    old = net.nodes[2].records[1].version
    net.crash(1)
    net.start(1)
    net.connect_preferred()
    assert net.nodes[2].records[1].version > old
    assert net.nodes[2].records[1].incarnation == net.nodes[1].incarnation


def test_records_not_renewed_age_out() -> None:
    """A crashed node's record is forgotten RECORD_MAX_AGE after it was last renewed."""
    net = Net(sixteen())
    net.run(0.5)
    net.crash(16)
    net.run(RECORD_MAX_AGE + 1.0)
    assert all(16 not in net.nodes[n].records for n in net.alive)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crashed=st.sets(st.integers(1, 16), max_size=4))
def test_any_four_of_sixteen_crashed_leave_a_connected_overlay(crashed: set[int]) -> None:
    """Whichever (up to) 4 of 16 nodes crash, once the survivors have waited out their
    suspicion and linked replacements, the survivors' links form one connected graph
    and every survivor has at least min(3, survivors - 1) links."""
    net = Net(sixteen())
    net.run(0.5)
    for n in sorted(crashed):
        net.crash(n)
    net.run(4 * REPLACE_AFTER + 2.0)
    graph = net.link_graph()
    assert len(components(graph)) == 1, components(graph)
    survivors = len(net.alive)
    for n in net.alive:
        assert net.degree(n) >= min(TARGET_DEGREE, survivors - 1), (n, graph)
        assert net.degree(n) <= net.nodes[n].max_degree
        # Every survivor's view of the live graph is the truth.
        view = {m: nbs for m, nbs in net.nodes[n].graph.items() if m in net.alive}
        assert view == {m: frozenset(nbs) for m, nbs in graph.items()}


def test_inbound_links_are_accepted_up_to_the_degree_bound() -> None:
    """A node takes links others chose while its degree is below max_degree (and never
    from itself, nor once it is leaving); links it keeps itself are always taken."""
    net = Net({1: (2, 3, 4), 2: (1,), 3: (1,), 4: (1,)})
    net.run(0.5)
    node = net.nodes[1]
    assert node.accepts(9) and node.accepts(2) and not node.accepts(1)
    for peer in (5, 6):
        net.start(peer, preferred=())
        net.link(peer, 1)
    net.settle()
    assert node.degree == node.max_degree == 5
    assert not node.accepts(9) and node.accepts(2)
    node.leave(net.now)
    assert not node.accepts(2)


def test_node_records_round_trip_through_the_codec() -> None:
    """A NodeRecords frame decodes to the records encoded, field for field (field 13 of
    Frame: no existing kind is renumbered)."""
    from gossip.wire import codec

    frame = NodeRecordsFrame(
        (
            NodeRecord(7, 2**62, 41, "tcp:host=gossip-6.gossip:port=17001", (1, 4, 6)),
            NodeRecord(2**31 - 1, 1, 1, address(9), (), leaving=True),
        )
    )
    data = codec.encode(frame)
    assert data[0] == (13 << 3) | 2  # Frame.node_records: field 13, length-delimited
    assert codec.decode(data) == frame


def test_a_graph_split_by_a_crash_is_bridged() -> None:
    """Two groups joined only through node 9: when 9 crashes every survivor still has 3
    links, so none replaces anything, yet the graph is in two parts. After the
    suspicion timeout the lowest node of the smaller part (as its records show it) links
    across, once (a "bridge" change), and the survivors are one connected graph again."""
    k4 = {1: (2, 3, 4), 2: (1, 3, 4), 3: (1, 2, 4), 4: (1, 2, 3)}
    other = {a + 4: tuple(b + 4 for b in nbs) for a, nbs in k4.items()}
    preferred = {**k4, **other, 9: (1, 5)}
    preferred[1] += (9,)
    preferred[5] += (9,)
    net = Net(preferred)
    net.run(0.5)
    net.crash(9)
    net.run(0.5)
    assert len(components(net.link_graph())) == 2
    net.run(3 * REPLACE_AFTER)
    assert len(components(net.link_graph())) == 1
    bridges = [w for n in net.alive for _, w in net.nodes[n].changes if "bridge" in w]
    assert len(bridges) == 1, bridges
