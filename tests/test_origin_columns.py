"""Tests of Plumtree's per-origin state columns (gossip.core.origin_columns): they
behave as the dicts of sets they replaced, and cost bytes per origin, not objects."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.origin_columns import BYTE_CODES, OriginColumn, OriginSet, PeerSets
from gossip.core.plumtree import Plumtree, ShortestPathTrees
from gossip.sim import Simulation
from gossip.sim.report import make_setup, measure, plumtree_factory, simulate

ORIGINS = (3, 8, 11, 20, 21, 40)  # the first graph's; the second drops 8 and 21, adds 50
SECOND = (3, 11, 20, 40, 50)
PEERS = st.integers(1, 6)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(ORIGINS + SECOND), PEERS),
        st.tuples(st.just("discard"), st.sampled_from(ORIGINS + SECOND), PEERS),
        st.tuples(st.just("set"), st.sampled_from(ORIGINS + SECOND), st.frozensets(PEERS)),
        st.tuples(st.just("pop"), st.sampled_from(ORIGINS + SECOND), PEERS),
        st.tuples(st.just("everywhere"), st.just(0), PEERS),
        st.tuples(st.just("rekey"), st.just(0), st.just(0)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


def _index(ids: tuple[int, ...]) -> dict[int, int]:
    return {o: i for i, o in enumerate(ids)}


@settings(max_examples=300, deadline=None)
@given(operations)
def test_peer_sets_behave_as_a_dict_of_sets(ops: list[tuple[str, int, object]]) -> None:
    """Any sequence of marks, unmarks, replacements, removals and re-keyings leaves a
    PeerSets equal to a dict of non-empty sets that went through the same (origins
    outside the current graph are refused, as the dict's users never add them)."""
    ids = ORIGINS
    column = PeerSets(ids, _index(ids))
    model: dict[int, set[int]] = {}
    for op, origin, arg in ops:
        member = origin in ids
        if op == "add":
            assert isinstance(arg, int)
            if member:
                column.add(origin, arg)
                model.setdefault(origin, set()).add(arg)
        elif op == "discard":
            assert isinstance(arg, int)
            column.discard(origin, arg)
            model.get(origin, set()).discard(arg)
        elif op == "set":
            assert isinstance(arg, frozenset)
            if member:
                column[origin] = arg
                model[origin] = set(arg)
        elif op == "pop":
            assert column.pop(origin, None) == (
                frozenset(model.pop(origin)) if origin in model else None
            )
        elif op == "everywhere":
            assert isinstance(arg, int)
            assert column.holding(arg) == sorted(o for o, ps in model.items() if arg in ps)
            column.discard_everywhere(arg)
            for peers in model.values():
                peers.discard(arg)
        elif op == "rekey":
            ids = SECOND if ids is ORIGINS else ORIGINS
            column.rekey(ids, _index(ids))
            model = {o: ps for o, ps in model.items() if o in ids}
        else:
            column.clear()
            model.clear()
        model = {o: ps for o, ps in model.items() if ps}
        assert column == model
        assert list(column) == sorted(model)
        assert len(column) == len(model)
        for o in ORIGINS + SECOND:
            assert (o in column) == (o in model)
            for p in range(1, 7):
                assert column.has(o, p) == (p in model.get(o, ()))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(("add", "discard", "rekey")), st.sampled_from(ORIGINS + SECOND))
    )
)
def test_origin_sets_behave_as_sets(ops: list[tuple[str, int]]) -> None:
    ids = ORIGINS
    flags = OriginSet(ids, _index(ids))
    model: set[int] = set()
    for op, origin in ops:
        if op == "add" and origin in ids:
            flags.add(origin)
            model.add(origin)
        elif op == "discard":
            flags.discard(origin)
            model.discard(origin)
        elif op == "rekey":
            ids = SECOND if ids is ORIGINS else ORIGINS
            flags.rekey(ids, _index(ids))
            model &= set(ids)
        assert flags == model
        assert list(flags) == sorted(model)
        assert {o for o in ORIGINS + SECOND if o in flags} == model


def test_a_column_of_many_distinct_values_widens_and_narrows_its_table() -> None:
    """More distinct values than a byte codes widen the column (values stay right),
    and codes no origin holds any more are reused, so the table stays as large as the
    distinct values in use."""
    ids = tuple(range(1000))
    column: OriginColumn[int] = OriginColumn(ids, _index(ids))
    for o in ids:
        column[o] = o * 7
    assert all(column[o] == o * 7 for o in ids)
    assert len(column._values) == len(ids) + 1 > BYTE_CODES
    for o in ids:
        column[o] = o % 3
    size = len(column._values)
    for o in ids[:10]:
        column[o] = 1000 + o
    assert len(column._values) == size  # new values took codes no origin holds
    assert {column[o] for o in ids} == {0, 1, 2, *range(1000, 1010)}
    for o in ids:
        del column[o]
    assert (len(column), column._codes, column.get(5)) == (0, None, None)


def test_setting_an_origin_outside_the_graph_is_refused() -> None:
    column = PeerSets((1, 2), {1: 0, 2: 1})
    flags = OriginSet((1, 2), {1: 0, 2: 1})
    for attempt in (lambda: column.add(9, 1), lambda: flags.add(9)):
        try:
            attempt()
        except KeyError:
            continue
        raise AssertionError("an origin outside the graph was kept")
    column.discard(9, 1)
    flags.discard(9)
    assert (9 not in column, 9 not in flags, column.get(9)) == (True, True, None)


def test_repair_state_after_a_crash_costs_bytes_per_origin() -> None:
    """After 20% of 300 nodes crash, most live nodes hold repair state for most origins
    (a crashed origin's cut-off news reaches all of them). It costs under 20 kB per
    live node here, mostly the shared trees and each column's few distinct values (as
    dicts of sets: 122 kB, growing with the nodes: 1.6 GB in all at 2,000 nodes)."""
    setup = make_setup(nodes=300, messages=1, seed=2)
    sim = Simulation(setup.edges, seed=2, strategy_factory=plumtree_factory(setup.graph))
    sim.run(until=1.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for v in setup.crashed:
            sim.crash(v)
        sim.run(until=5.0)
        assert sim.in_flight == 0
        per_node = (tracemalloc.get_traced_memory()[0] - before) / len(sim.live)
    finally:
        tracemalloc.stop()
    held = [s for s in (sim.cores[v].strategy for v in sim.live) if isinstance(s, Plumtree)]
    assert sum(len(s.orphaned) + len(s.cut) for s in held) > len(held) * 60  # much state
    assert per_node < 20_000, per_node


def test_shared_trees_key_every_node_by_one_index() -> None:
    """The columns of all nodes of a simulation share the trees' origin index: none
    holds a map of origins of its own."""
    setup = make_setup(nodes=40, messages=1, seed=3)
    shared = ShortestPathTrees(setup.graph, share=True)
    nodes = [Plumtree(v, shared) for v in sorted(setup.graph)]
    assert {id(column._index) for n in nodes for column in n._columns()} == {id(shared.index)}


@pytest.mark.parametrize(
    ("overlay", "events", "frames"),
    [
        ("static", 8182, (2029, 1684, 304, 3363, 360, 360)),
        ("dynamic", 10839, (1900, 2369, 560, 5090, 414, 414)),
    ],
)
def test_crash_repair_runs_as_it_did_with_dicts_of_sets(
    overlay: str, events: int, frames: tuple[int, ...]
) -> None:
    """A pin: 120 nodes, 20% crashed, static and dynamic overlay, take exactly the
    events and frames of each kind they took when this state was dicts of sets (the
    figures of commit 0ded617; every frame delivered was the same there, checked by
    hashing them all at 150 to 300 nodes). The IHave counts are one rule newer
    (e7cf58e): an id a neighbour announced is not announced back to it, which
    saves 4 and 1 IHave frames (and their delivery events) here, nothing else."""
    setup = make_setup(nodes=120, messages=20, seed=5, overlay=overlay)
    sim = simulate(setup, "plumtree", "crashed")
    figures = measure(setup, sim, "plumtree", "crashed")
    kinds = ("GossipFrame", "GraftFrame", "IHaveFrame", "PruneFrame")
    kinds += ("SyncDataFrame", "SyncWantFrame")
    assert figures["frames_by_kind"] == dict(zip(kinds, frames, strict=True))
    assert (figures["events"], figures["reliability_min"]) == (events, 1.0)
