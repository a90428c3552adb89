"""Whole GossipNodes in one process (``inprocess.Cluster``): links, dissemination,
batching, re-sync and tree repair end to end, on a fake clock, with no sockets."""

from __future__ import annotations

from pathlib import Path

from inprocess import Cluster

from gossip.core.frames import GossipFrame
from gossip.core.message import message_id
from gossip.core.plumtree import Plumtree, ShortestPathTrees
from gossip.wire import codec


def test_sixteen_nodes_deliver_a_message_to_all_with_15_payload_sends() -> None:
    """A fresh 16-node Plumtree cluster brings all 24 links up, and a message submitted
    at node 1 reaches all 16 nodes within 0.1 simulated s, for exactly 15 payload
    envelopes sent in all: one per node but the origin, down node 1's tree."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    cluster.run(1.0)  # first re-sync sessions done
    before = cluster.sent("gossip")[1]
    mid = cluster.submit(1, b"Apple")
    took = cluster.run_until_everywhere([mid])
    cluster.run(1.0)
    assert took < 0.1
    assert cluster.sent("gossip")[1] - before == 15


def test_payloads_of_one_turn_go_out_in_one_frame_per_neighbour() -> None:
    """Twenty messages submitted at node 1 in one reactor turn leave it as one Gossip
    frame per neighbour (20 envelopes each), not one frame per message."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    cluster.run(1.0)
    node = cluster.nodes[1]
    before = node.traffic.kinds["gossip"].frames_out if "gossip" in node.traffic.kinds else 0
    mids = []
    for i in range(20):
        node.submit(f"batched {i}".encode()).addCallback(lambda r: mids.append(r[0]))
    cluster.run(0)
    counts = node.traffic.kinds["gossip"]
    assert counts.frames_out - before == len(cluster.neighbours(1))
    cluster.run_until_everywhere(mids)


def test_a_restarted_node_catches_up_by_re_sync_from_its_kept_log(tmp_path: Path) -> None:
    """Node 5 (a LogStore in its own directory) is killed; 30 messages are submitted
    meanwhile; restarted on the same directory, it reopens its log (what it held is
    still there) and pulls the 30 it missed by re-sync, none twice."""
    cluster = Cluster(16, data_dir=tmp_path)
    cluster.run_until_links_up()
    first = cluster.submit(1, b"before the crash")
    cluster.run_until_everywhere([first])
    cluster.kill(5)
    missed = [cluster.submit(1 + i % 4, f"while 5 is down {i}".encode()) for i in range(30)]
    cluster.run_until_everywhere(missed)
    node = cluster.restart(5)
    assert first in node.store
    cluster.run_until_everywhere([*missed, first], deadline=5.0)
    assert len(node.store) == 31
    assert node.core.sync.counters.messages_pulled == 30


def test_a_partitioned_link_heals_without_flapping() -> None:
    """The link 1-n is cut long enough for both ends to time it out (idle timeout);
    after heal it comes back up on both ends and stays up: one more up on each side,
    no further downs in the next 60 s."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    peer = cluster.neighbours(1)[0]
    cluster.cut(1, peer)
    cluster.run(cluster.config.idle_timeout + 5.0)
    assert not cluster.nodes[1].links.is_up(peer)
    assert not cluster.nodes[peer].links.is_up(1)
    cluster.heal(1, peer)
    cluster.run(cluster.config.reconnect_max_delay + 2.0)
    assert cluster.links_up()
    times = (
        cluster.nodes[1].links.links[peer].times_up,
        cluster.nodes[peer].links.links[1].times_up,
    )
    cluster.run(60.0)
    assert cluster.links_up()
    assert (
        cluster.nodes[1].links.links[peer].times_up,
        cluster.nodes[peer].links.links[1].times_up,
    ) == times
    mid = cluster.submit(peer, b"across the healed link")
    cluster.run_until_everywhere([mid])


def test_killed_node_s_neighbours_repair_their_trees_at_once() -> None:
    """Node k, a relay in node 1's tree, is killed (its connections dropped). Its
    neighbours learn it at once and ask stand-ins; the next message from node 1 then
    reaches all 15 live nodes within 0.1 s (no IHave or graft wait), and with no more
    than 15 + 3 payload envelopes."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    cluster.run(1.0)
    trees = cluster.nodes[1].core.strategy.trees  # type: ignore[attr-defined]
    relay = next(c for c in trees.children(1) if cluster.nodes[c].core.strategy.trees.children(1))  # type: ignore[attr-defined]
    cluster.kill(relay)
    cluster.run(0.05)
    before = cluster.sent("gossip")[1]
    mid = cluster.submit(1, b"after the crash")
    took = cluster.run_until_everywhere([mid])
    cluster.run(1.0)
    assert took < 0.1
    assert cluster.sent("gossip")[1] - before <= 15 + 3
    assert message_id(b"after the crash") == mid


class RecordingWatcher:
    """What a watching client connection does for the node: on each push, take every
    durable id past its cursor (as ``gossip.client.responder`` sends them)."""

    def __init__(self, cluster: Cluster, node_id: int) -> None:
        self.store = cluster.nodes[node_id].store
        self.seen: list[bytes] = []
        self.pushes = 0

    def push_delivered(self) -> None:
        self.pushes += 1
        durable = self.store.durable_count()
        self.seen += self.store.ids_from(len(self.seen), durable - len(self.seen))


def test_watchers_are_told_of_messages_that_arrive_by_gossip() -> None:
    """A watcher on node 16 is pushed each message that reaches node 16 from its
    neighbours, in arrival order, once each, as soon as it is stored (no tick needed);
    a node that stores nothing new pushes nothing."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    cluster.run(1.0)
    watcher = RecordingWatcher(cluster, 16)
    cluster.nodes[16].watcher_ready(watcher)
    assert watcher.seen == []
    mids = [cluster.submit(1 + i, f"watched {i}".encode()) for i in range(3)]
    cluster.run_until_everywhere(mids)
    assert sorted(watcher.seen) == sorted(mids)
    pushes = watcher.pushes
    cluster.run(2.0)
    assert watcher.pushes == pushes


def _stalled_leaf(cluster: Cluster, origin: int) -> tuple[int, int]:
    """(leaf, parent): a leaf of ``origin``'s tree whose tree parent is not the origin
    and which has a neighbour whose own tree path avoids that parent (an announcer
    that gets the origin's messages while the parent is stalled)."""
    trees = ShortestPathTrees({n: cluster.neighbours(n) for n in cluster.config.nodes})
    parent = trees.parents(origin)
    children = {p for n, p in parent.items() if n != p}

    def path(n: int) -> set[int]:
        up = set()
        while n != origin:
            n = parent[n]
            up.add(n)
        return up

    for leaf in sorted(cluster.config.nodes):
        p = parent[leaf]
        if leaf in children or p == origin or leaf == origin:
            continue
        if any(q != p and p not in path(q) for q in cluster.neighbours(leaf)):
            return leaf, p
    raise AssertionError("no such leaf in the generated graph")


def test_a_late_tick_does_not_graft_a_tree_copy_waiting_unread() -> None:
    """A burst of 20 messages from node 1 while a node's tree parent is stalled: its
    other neighbour announces them (IHave) first; then the node itself stalls (its
    process does not run) while the parent's copies reach it. When it runs again, its
    overdue tick comes before it reads them. The tick must not graft them: the tree
    copies are waiting unread, and each graft would add payload copies (the reply,
    a push to every neighbour, an adoption). Settled, the burst cost exactly 15
    payload sends per broadcast and no Graft."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    cluster.run(1.0)  # first re-sync sessions done
    leaf, parent = _stalled_leaf(cluster, 1)
    before = cluster.sent("gossip")[1]
    grafts_before = cluster.sent("graft")[0]
    cluster.pause(parent)
    mids: list[bytes] = []
    for i in range(20):
        cluster.nodes[1].submit(f"burst {i}".encode()).addCallback(lambda r: mids.append(r[0]))
    cluster.run(0.1)  # one tick: the leaf's other neighbours announce the burst
    assert len(mids) == 20
    strategy = cluster.nodes[leaf].core.strategy
    assert isinstance(strategy, Plumtree)
    assert all(m in strategy.missing for m in mids)
    cluster.pause(leaf)
    cluster.resume(parent)  # its copies go out to the leaf and wait there, unread
    cluster.run(0.3)
    cluster.resume(leaf)  # overdue tick first, then the reads
    cluster.run_until_everywhere(mids)
    cluster.run(1.0)
    assert cluster.sent("graft")[0] == grafts_before
    assert cluster.sent("gossip")[1] - before == 15 * len(mids)


def test_payloads_that_several_reads_of_one_turn_bring_leave_as_one_frame() -> None:
    """Messages that reach a node from two neighbours in one reactor turn (two reads)
    go on to its third neighbour in one Gossip frame: the node sends what its reads
    produced once per turn, after all of them, not once per read."""
    cluster = Cluster(16)
    cluster.run_until_links_up()
    cluster.run(1.0)
    node = cluster.nodes[1]
    a, b, c = node.spec.neighbours
    sent: list[tuple[int, int]] = []  # (peer, messages) of each Gossip frame node 1 sends
    real_send = node.links.send

    def send(peer: int, data: bytes) -> bool:
        frame = codec.decode(data)
        if isinstance(frame, GossipFrame):
            sent.append((peer, len(frame.ids)))
        return real_send(peer, data)

    node.links.send = send  # type: ignore[method-assign]
    # Both submitted before the network moves: their frames reach node 1 in one turn.
    for origin, body in ((a, b"from a"), (b, b"from b")):
        cluster.nodes[origin].submit(body)
    cluster.run_until_everywhere([message_id(b"from a"), message_id(b"from b")])
    assert [n for peer, n in sent if peer == c] == [2]
