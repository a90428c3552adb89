"""The dynamic overlay with whole GossipNodes in one process (tests/inprocess.py).

Real link tables, codec and cores over iosim on one fake clock: a node whose three
neighbours die links to three others after ``replace_after`` and keeps receiving;
their return restores the file's graph; a node named in no one's file joins
through a seed; a node that stops gracefully is replaced at once.
"""

from __future__ import annotations

import attrs
import pytest
from inprocess import Cluster

from gossip.client.commands import Status
from gossip.config import ClusterConfig
from gossip.topology import generate_config

REPLACE_AFTER = 3.0


def dynamic(dissemination: str = "plumtree", n: int = 16) -> Cluster:
    c = Cluster(n, overlay="dynamic", replace_after=REPLACE_AFTER, dissemination=dissemination)
    c.run_until_links_up()
    c.run(0.5)
    return c


def linked(c: Cluster, n: int) -> set[int]:
    """The neighbours ``n`` has links up to, by its link table."""
    return {p for p in c.nodes[n].links.links if c.nodes[n].links.is_up(p)}


@pytest.mark.parametrize("dissemination", ["plumtree", "flood"])
def test_node_whose_three_neighbours_die_links_to_three_others_and_keeps_receiving(
    dissemination: str,
) -> None:
    """Dynamic mode: all three neighbours of node 1 are killed. Before replace_after they
    are suspects; after it node 1 has three new links up and receives new messages
    submitted anywhere; when the three come back, the replacements are dropped and
    every node has its file's three neighbours again."""
    c = dynamic(dissemination)
    x = 1
    lost = c.neighbours(x)
    for n in lost:
        c.kill(n)
    c.run(REPLACE_AFTER / 2)
    assert set(c.nodes[x].core.overlay.suspects) == set(lost)
    assert linked(c, x) == set()
    c.run(REPLACE_AFTER)
    new = linked(c, x)
    assert len(new) == 3 and not new & set(lost), new
    mids = [c.submit(n, f"after the loss, from {n}".encode()) for n in (2, 9, 16)]
    c.run_until_everywhere(mids, deadline=3.0)
    status = c.nodes[x].status()["overlay"][0]
    assert sorted(status["neighbours"]) == sorted(new)
    assert any(w.startswith("linked ") and "replaces" in w for w in status["changes"])
    for n in lost:
        c.restart(n)
    c.run(3.0)
    for n in c.alive:
        assert linked(c, n) == set(c.neighbours(n)), n
    assert any("returned)" in w for w in c.nodes[x].core.overlay.status(0)["changes"])
    mid = c.submit(7, b"after the return")
    c.run_until_everywhere([mid], deadline=3.0)


@pytest.mark.parametrize("dissemination", ["plumtree", "flood"])
def test_a_node_in_no_ones_file_joins_through_a_seed_and_gets_every_message(
    dissemination: str,
) -> None:
    """A node whose cluster file names only itself, given one running node's peer
    address as a seed (``--join``), links to three nodes, re-syncs what was sent
    before it came, receives what is sent after, and every node counts it as a member."""
    c = dynamic(dissemination)
    before = [c.submit(n, f"before the join {n}".encode()) for n in (1, 8)]
    c.run(0.5)
    spec = generate_config(18).nodes[17]
    own: ClusterConfig = attrs.evolve(
        c.config,
        nodes={17: attrs.evolve(spec, neighbours=())},
        join=(c.config.nodes[4].peer_address,),
    )
    node = c.add(17, own)
    c.run(2.0)
    assert len(linked(c, 17)) == 3
    after = c.submit(12, b"after the join")
    c.run_until_everywhere([*before, after], deadline=15.0)
    assert all(17 in c.nodes[n].core.overlay.graph for n in c.alive)
    assert any("joining" in w for w in node.core.overlay.status(0)["changes"])


@pytest.mark.parametrize("dissemination", ["plumtree", "flood"])
def test_a_node_that_stops_gracefully_is_replaced_at_once(dissemination: str) -> None:
    """stopService floods leaving=true before the links close (and its Deferred fires
    once the connections have sent it): the leaver's neighbours replace it at once
    (well before replace_after) and keep receiving."""
    c = dynamic(dissemination)
    leaver = 5
    neighbours = c.neighbours(leaver)
    stopped = c.stop(leaver)
    fired: list[object] = []
    stopped.addCallback(fired.append)
    assert fired, "the stop waits only until its connections have closed"
    c.run(0.5)  # far less than replace_after
    for n in neighbours:
        assert len(linked(c, n)) >= 3, n
        assert leaver not in c.nodes[n].core.overlay.graph
        changes = c.nodes[n].core.overlay.status(0)["changes"]
        assert f"{leaver} left" in changes
    mid = c.submit(1, b"after the leave")
    c.run_until_everywhere([mid], deadline=3.0)


def test_static_mode_sends_no_records_and_has_no_overlay_status() -> None:
    """The default (static) overlay is today's: no NodeRecords frame on any link and
    no overlay in the status."""
    c = Cluster(16)
    c.run_until_links_up()
    c.run(15.0)
    assert c.sent("node_records") == (0, 0)
    assert "overlay" not in c.nodes[1].status()


def test_status_command_carries_the_overlay() -> None:
    """The Status AMP command's response takes the overlay's fields as the node gives
    them (so gclient --status can print neighbours, suspects and changes)."""
    c = dynamic("flood")
    status = c.nodes[1].status()
    wire = Status.makeResponse(status, None)  # type: ignore[no-untyped-call]
    back = Status.parseResponse(wire, None)  # type: ignore[no-untyped-call]
    assert back["overlay"][0]["neighbours"] == sorted(c.neighbours(1))


def test_metrics_show_the_overlay_in_dynamic_mode_only() -> None:
    """/metrics has the overlay's gauges (neighbours, suspects, live nodes) and its
    change counter in dynamic mode; the static mode's metrics have none of them."""
    from gossip.web.metrics import node_registry

    c = dynamic("flood")
    c.kill(c.neighbours(1)[0])
    c.run(0.2)
    registry = node_registry(c.nodes[1])
    assert registry.get_sample_value("gossip_overlay_neighbours") == 3
    assert registry.get_sample_value("gossip_overlay_suspects") == 1
    assert registry.get_sample_value("gossip_overlay_live_nodes") == 16
    c.run(2 * REPLACE_AFTER)
    assert registry.get_sample_value("gossip_overlay_changes_total") >= 2
    static = Cluster(4, allow_any_degree=True)
    assert node_registry(static.nodes[1]).get_sample_value("gossip_overlay_neighbours") is None


def test_every_node_learns_every_record_at_start() -> None:
    """Right after a dynamic cluster's links come up, every node holds every node's
    record and the same live graph: the file's (records sent on a connection that
    lost a simultaneous-dial race still count while the link is up)."""
    c = dynamic("flood")
    want = {n: frozenset(c.neighbours(n)) for n in c.alive}
    for n in c.alive:
        assert c.nodes[n].core.overlay.graph == want, n


def test_a_seed_list_shared_by_every_node_is_harmless() -> None:
    """Every node's file names node 4 as a seed, node 4 included: node 4 does not dial
    itself, every other node's seed answered, their seed links are extra links node 4 accepts
    within its degree bound, and messages still reach everyone."""
    config = generate_config(16, name="inprocess")
    seed = config.nodes[4].peer_address
    c = Cluster(16, overlay="dynamic", replace_after=REPLACE_AFTER, join=(seed,))
    c.run(3.0)
    assert c.nodes[4].links.seed_addresses == ()
    assert all(c.nodes[n].links.seed_factories == [] for n in c.alive)  # all answered
    for n in c.alive:
        assert 3 <= len(linked(c, n)) <= c.config.overlay_max_degree, n
    mid = c.submit(9, b"with seeds")
    c.run_until_everywhere([mid], deadline=3.0)
