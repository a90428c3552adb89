"""Plumtree on the dynamic overlay's live graph, with whole GossipNodes in one process
(tests/inprocess.py): the overlay floods node records, each node hands the live graph
to ``Plumtree.on_graph``, and the trees follow it."""

from __future__ import annotations

from inprocess import Cluster

from gossip.core.plumtree import Plumtree

REPLACE_AFTER = 3.0


def payload_sends(c: Cluster) -> int:
    return c.sent("gossip")[1]


def broadcast_costs(c: Cluster, origins: list[int], tag: str) -> list[int]:
    """One message from each origin in turn, each delivered everywhere and settled:
    the Gossip envelopes each cost."""
    costs = []
    for origin in origins:
        before = payload_sends(c)
        mid = c.submit(origin, f"{tag} from {origin}".encode())
        c.run_until_everywhere([mid], deadline=3.0)
        c.run(1.0)  # no graft pending
        costs.append(payload_sends(c) - before)
    return costs


def test_16_dynamic_nodes_cost_15_sends_then_14_after_a_crash_is_repaired() -> None:
    """A healthy 16-node cluster in dynamic mode costs exactly 15 payload sends per
    broadcast (the live graph's origin trees, computed alike everywhere). Node 5 is
    killed; once its neighbours have replaced it and the survivors' records agree,
    every broadcast costs exactly 14 again, on the new graph's trees: no node is left
    fed by a stand-in, and every tree parent is a live link."""
    c = Cluster(16, overlay="dynamic", replace_after=REPLACE_AFTER, dissemination="plumtree")
    c.run_until_links_up()
    c.run(2.0)
    assert broadcast_costs(c, [1, 6, 11, 16], "healthy") == [15] * 4
    c.kill(5)
    c.run(REPLACE_AFTER * 3)
    survivors = sorted(c.alive)
    assert broadcast_costs(c, survivors, "repaired") == [14] * 15
    for n in survivors:
        strategy = c.nodes[n].core.strategy
        assert isinstance(strategy, Plumtree)
        # The trees are the live graph's: every tree parent is up, no stand-in is left.
        assert (strategy.orphaned, strategy.standins) == (set(), {}), n
        for origin in survivors:
            assert strategy.trees.parent(origin) in {*strategy.up, None}, (n, origin)
