"""A client's batch of submits (``GossipCore.submit_many``) applies the rules of one
``submit`` per body, and is stored and handed on as a received frame's messages are."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_batch import BODIES, MAX_BODY, NOW, carry_out, make
from test_plumtree import GRAPH, ME

from gossip.core.effects import Effect, PersistBatch, Send
from gossip.core.frames import Envelope, GossipFrame, IHaveFrame
from gossip.core.message import Message, message_id
from gossip.core.state import SubmitRejected

submit_body = st.sampled_from([*BODIES[:6], b"", b"\xff", b"x" * (MAX_BODY + 1)])


def run_submits(
    strategy: str, per_frame: bool, batches: list[list[bytes]], one_by_one: bool
) -> dict[str, object]:
    """Submit ``batches`` (one tick after each) as ``submit_many`` calls or as single
    ``submit`` calls, and record every outcome and what went out."""
    core, store = make(strategy, per_frame)
    now = NOW
    results: list[object] = []
    pushed: Counter[tuple[int, Envelope]] = Counter()
    announced: Counter[tuple[int, bytes]] = Counter()

    def note(effects: list[Effect]) -> None:
        for e in carry_out(store, effects):
            if isinstance(e, Send) and isinstance(e.frame, GossipFrame):
                pushed.update((e.peer, env) for env in e.frame.messages)
            elif isinstance(e, Send) and isinstance(e.frame, IHaveFrame):
                announced.update((e.peer, mid) for mid in e.frame.ids)

    for bodies in batches:
        if one_by_one:
            for body in bodies:
                try:
                    result = core.submit(body, now)
                except SubmitRejected as e:
                    results.append((type(e), str(e)))
                    continue
                results.append((result.id, result.new))
                note(result.effects)
        else:
            batch = core.submit_many(bodies, now)
            results += [r if isinstance(r, tuple) else (type(r), str(r)) for r in batch.results]
            note(batch.effects)
        now += 0.1
        note(core.tick(now))
    return {
        "results": results,
        "stored": list(store.scan(0)),
        "pushed": pushed,
        "announced": announced,
        "arrivals": (core.arrivals.stored, core.arrivals.duplicates),
        "rate_limited": core.submits_rate_limited,
    }


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["plumtree", "flood"]),
    st.booleans(),
    st.lists(st.lists(submit_body, max_size=8), max_size=5),
)
def test_submit_many_applies_the_rules_of_one_submit_per_body(
    strategy: str, per_frame: bool, batches: list[list[bytes]]
) -> None:
    """A batch of submits (held and repeated bodies, bodies the node refuses, more new
    ones than the origin quota of 3 allows) gives, body by body, the result or refusal
    one ``submit`` each gives, and stores, pushes, announces and counts the same."""
    assert run_submits(strategy, per_frame, batches, False) == run_submits(
        strategy, per_frame, batches, True
    )


def test_a_batch_of_submits_yields_one_persist_batch_then_one_send_per_neighbour() -> None:
    """Frame at a time, a client's batch is stored with one PersistBatch (path (), in
    order, the refused and repeated bodies left out) and each neighbour gets one
    Gossip frame of them all, as a received frame's new messages do."""
    core, _ = make("flood", True)
    batch = core.submit_many([b"a", b"", b"b", b"a"], NOW)
    a, b = message_id(b"a"), message_id(b"b")
    assert batch.results[0] == (a, True) and batch.results[2] == (b, True)
    assert isinstance(batch.results[1], SubmitRejected) and batch.results[3] == (a, False)
    first = batch.effects[0]
    assert isinstance(first, PersistBatch)
    assert first.messages == (Message(a, b"a", NOW, ()), Message(b, b"b", NOW, ()))
    out = GossipFrame((Envelope(a, b"a", (ME,)), Envelope(b, b"b", (ME,))))
    assert batch.effects[1:] == [Send(p, out) for p in GRAPH[ME]]
