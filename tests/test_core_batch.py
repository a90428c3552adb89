"""The core's frame-at-a-time effects (``effects_per_frame``, what the node uses) apply
the same rules as its per-message effects: same messages stored, sent, announced,
refused and dropped; only how effects are grouped differs."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from test_plumtree import GRAPH, ME  # node 5's neighbourhood

from gossip.core.dissemination import Flood
from gossip.core.effects import DropPeer, Effect, Persist, PersistBatch, Send
from gossip.core.frames import Envelope, GossipFrame, IHaveFrame, PruneFrame
from gossip.core.message import Message, message_id
from gossip.core.plumtree import Plumtree
from gossip.core.state import GossipCore
from gossip.store.memory import MemoryStore

NOW = 100.0
MAX_BODY = 64


def make(strategy: str, per_frame: bool) -> tuple[GossipCore, MemoryStore]:
    store = MemoryStore()
    rules = Plumtree(ME, GRAPH) if strategy == "plumtree" else Flood(ME)
    core = GossipCore(
        ME, GRAPH[ME], store, rules, MAX_BODY, GRAPH, origin_rate=2.0, origin_burst=3.0
    )
    core.effects_per_frame = per_frame
    for p in GRAPH[ME]:
        core.peer_up(p, NOW)
    return core, store


def carry_out(store: MemoryStore, effects: list[Effect]) -> list[Effect]:
    """Persist what the effects say (each id once) and return the rest."""
    rest = []
    for e in effects:
        if isinstance(e, Persist):
            assert store.add(e.message)
        elif isinstance(e, PersistBatch):
            assert store.add_many(e.ids, e.bodies, e.paths, e.received_at) == len(e.ids)
        else:
            rest.append(e)
    return rest


BODIES = [b"m%d" % i for i in range(12)]
# Paths node 5 may get from its neighbours, and some it must refuse.
PATHS = [(2,), (1, 2), (3,), (1, 3), (7,), (3, 7), (8,), (1, 2, 8), (5, 2), (2, 3), (9, 7)]


def make_envelope(body: bytes, path: tuple[int, ...], how: str) -> Envelope:
    """A message as an honest node sends it ("ok"), or broken in one way."""
    mid = message_id(body)
    if how == "short-id":
        mid = mid[:15]
    elif how == "not-utf8":
        body = b"\xff"
    elif how == "forged":
        body += b"!"
    elif how == "big":
        body += b"x" * MAX_BODY
    return Envelope(mid, body, path)


envelope = st.builds(
    make_envelope,
    st.sampled_from(BODIES),
    st.sampled_from(PATHS),
    st.sampled_from(["ok"] * 12 + ["short-id", "not-utf8", "forged", "big"]),
)
frames = st.lists(
    st.tuples(st.sampled_from(GRAPH[ME]), st.lists(envelope, max_size=8), st.integers(0, 3)),
    max_size=8,
)


def run(
    strategy: str, per_frame: bool, script: list[tuple[int, list[Envelope], int]]
) -> dict[str, object]:
    """Feed ``script`` (sender, envelopes, ticks to wait after) and record what came out."""
    core, store = make(strategy, per_frame)
    now = NOW
    pushed: Counter[tuple[int, Envelope]] = Counter()
    announced: Counter[tuple[int, bytes]] = Counter()
    other: list[tuple[int, object]] = []
    drops: list[DropPeer] = []

    def note(effects: list[Effect]) -> None:
        for e in carry_out(store, effects):
            if isinstance(e, Send) and isinstance(e.frame, GossipFrame):
                pushed.update((e.peer, env) for env in e.frame.messages)
            elif isinstance(e, Send) and isinstance(e.frame, IHaveFrame):
                announced.update((e.peer, mid) for mid in e.frame.ids)
            elif isinstance(e, Send) and isinstance(e.frame, PruneFrame):
                other.append((e.peer, e.frame))
            elif isinstance(e, DropPeer):
                drops.append(e)

    for sender, envs, ticks in script:
        if sender in core.up:
            note(core.receive(sender, GossipFrame(tuple(envs)), now))
        for _ in range(ticks):
            now += 0.1
            note(core.tick(now))  # IHaves and grafts go out (re-sync is not looked at)
    now += 0.1
    note(core.tick(now))
    return {
        "stored": list(store.scan(0)),
        "pushed": pushed,
        "announced": announced,
        "prunes": sorted(other, key=repr),
        "drops": drops,
        "refused": core.refused,
        "arrivals": (core.arrivals.stored, core.arrivals.duplicates),
    }


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["plumtree", "flood"]), frames)
def test_frame_effects_apply_the_same_rules_as_message_effects(
    strategy: str, script: list[tuple[int, list[Envelope], int]]
) -> None:
    """For any frames (copies, paths the node must refuse, forged or malformed messages
    that cost the link, more than an origin's quota), frame-at-a-time effects store,
    push, announce, prune, refuse and drop exactly what per-message effects do."""
    assert run(strategy, True, script) == run(strategy, False, script)


def test_a_frame_yields_one_persist_batch_then_one_send_per_neighbour_and_path() -> None:
    """Frame at a time: the new messages of a frame are persisted with one PersistBatch,
    in frame order, before any Send; each eager neighbour gets one Gossip frame per
    path of the received messages, carrying them with this node appended."""
    core, _ = make("flood", True)
    a, b, c = (
        Envelope(message_id(x), x, p) for x, p in ((b"a", (2,)), (b"b", (1, 2)), (b"c", (2,)))
    )
    effects = core.receive(2, GossipFrame((a, b, c)), NOW)
    assert effects[0] == PersistBatch(
        (a.id, b.id, c.id), (b"a", b"b", b"c"), ((2,), (1, 2), (2,)), NOW
    )
    assert effects[0].messages == tuple(Message(e.id, e.body, NOW, e.path) for e in (a, b, c))
    own = GossipFrame(tuple(Envelope(e.id, e.body, (2, ME)) for e in (a, c)))
    via_1 = GossipFrame((Envelope(b.id, b.body, (1, 2, ME)),))
    assert effects[1:] == [
        Send(3, own),
        Send(7, own),
        Send(8, own),
        Send(3, via_1),
        Send(7, via_1),
        Send(8, via_1),
    ]


def test_a_copy_of_a_held_message_costs_no_check_of_its_body() -> None:
    """Frame at a time, dedup comes before validation: a copy whose body does not match
    its (held) id is dropped as a copy, not taken for a forgery; a new one is checked."""
    core, store = make("flood", True)
    carry_out(store, core.receive(2, GossipFrame((Envelope(message_id(b"a"), b"a", (2,)),)), NOW))
    forged_copy = Envelope(message_id(b"a"), b"not a", (3,))
    assert carry_out(store, core.receive(3, GossipFrame((forged_copy,)), NOW)) == []
    forged_new = Envelope(message_id(b"b"), b"not b", (3,))
    effects = core.receive(3, GossipFrame((forged_new,)), NOW)
    assert [type(e) for e in effects] == [DropPeer] and len(store) == 1


def trace(
    strategy: str,
    per_frame: bool,
    one_at_a_time: bool,
    script: list[tuple[int, list[Envelope], int]],
) -> tuple[list[list[Effect]], dict[str, int], object]:
    """Every effect list ``script`` yields, in order, and the counters after it; with
    ``one_at_a_time`` every Gossip frame is read by ``_receive_rows`` (the rule as written)."""
    core, store = make(strategy, per_frame)
    if one_at_a_time:
        core._receive_gossip = core._receive_rows
    now = NOW
    out: list[list[Effect]] = []
    for sender, envs, ticks in script:
        if sender in core.up:
            out.append(core.receive(sender, GossipFrame(tuple(envs)), now))
            carry_out(store, out[-1])
        for _ in range(ticks):
            now += 0.1
            out.append(core.tick(now))
            carry_out(store, out[-1])
    return out, core.refused, (core.arrivals.stored, core.arrivals.duplicates)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["plumtree", "flood"]), st.booleans(), frames)
def test_the_frame_pass_yields_what_reading_one_message_at_a_time_does(
    strategy: str, per_frame: bool, script: list[tuple[int, list[Envelope], int]]
) -> None:
    """``_receive_gossip`` reads a frame's columns a path at a time and hands any frame it
    cannot vouch for to ``_receive_rows``: for any frames (copies, ids repeated within a
    frame, paths interleaved or refused, malformed or forged messages, origins over
    quota) it yields the very effects, in the same order, and the same counters."""
    assert trace(strategy, per_frame, False, script) == trace(strategy, per_frame, True, script)


def test_copies_and_refused_paths_are_read_a_frame_at_a_time() -> None:
    """Copies (even with a body that does not match), refused paths and new messages of
    several interleaved paths in one frame take the frame pass, not ``_receive_rows``:
    the copies reach the strategy, the refusals are counted, the rest is stored."""
    core, store = make("flood", True)
    carry_out(store, core.receive(2, GossipFrame((make_envelope(b"m0", (2,), "ok"),)), NOW))

    def one_at_a_time(peer: int, frame: GossipFrame, now: float) -> list[Effect]:
        raise AssertionError("a clean frame was read one message at a time")

    core._receive_rows = one_at_a_time
    frame = GossipFrame(
        (
            Envelope(message_id(b"m0"), b"not m0", (3,)),  # a copy: its body is not looked at
            make_envelope(b"m1", (1, 3), "ok"),
            make_envelope(b"m2", (3,), "ok"),
            make_envelope(b"m3", (2,), "ok"),  # path not from the sender: refused
            make_envelope(b"m4", (1, 3), "ok"),
        )
    )
    effects = carry_out(store, core.receive(3, frame, NOW))
    assert [m.body for m in store.scan(0)] == [b"m0", b"m1", b"m2", b"m4"]
    assert core.refused["path_not_from_sender"] == 1
    assert core.arrivals.duplicates["gossip"] == 1
    assert {e.peer for e in effects if isinstance(e, Send)} == {2, 7, 8}
