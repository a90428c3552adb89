"""Unit tests of GossipCore with the Flood strategy: effects out for each input."""

from __future__ import annotations

import pytest

from gossip.core import state as state_module
from gossip.core.dissemination import Flood
from gossip.core.effects import DropPeer, Effect, Persist, Send
from gossip.core.frames import Envelope, GossipFrame, IHaveFrame, PeerFrame
from gossip.core.message import ID_BYTES, Message, message_id
from gossip.core.state import REFUSED_KEYS, GossipCore, SubmitRejected
from gossip.store.memory import MemoryStore

MAX_BODY = 64
MEMBERS = range(1, 1025)  # the configured node ids the core is told
MAX_PATH = len(MEMBERS) - 1  # the longest path a receiver can accept
NOW = 7.5


def make_core(
    node: int = 1, neighbours: tuple[int, ...] = (2, 3, 4), up: tuple[int, ...] = (2, 3, 4)
) -> tuple[GossipCore, MemoryStore]:
    store = MemoryStore()
    core = GossipCore(node, neighbours, store, Flood(node), MAX_BODY, MEMBERS)
    for p in up:
        # A link coming up starts re-sync sessions (tested in test_sync.py); only
        # dissemination effects matter here.
        assert all(is_sync(e) for e in core.peer_up(p, NOW))
    return core, store


def is_sync(effect: Effect) -> bool:
    return isinstance(effect, Send) and type(effect.frame).__name__.startswith("Sync")


def apply(store: MemoryStore, effects: list[Effect]) -> None:
    """Carry out Persist effects, as the node adapter must before the next input."""
    for e in effects:
        if isinstance(e, Persist):
            assert store.add(e.message)


def env(body: bytes, path: tuple[int, ...]) -> Envelope:
    return Envelope(message_id(body), body, path)


def frame(*envs: Envelope) -> GossipFrame:
    return GossipFrame(envs)


def persists(effects: list[Effect]) -> list[Persist]:
    return [e for e in effects if isinstance(e, Persist)]


def sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


# -- submit -------------------------------------------------------------------


def test_submit_persists_first_then_sends_to_every_up_neighbour() -> None:
    """A submit yields Persist (path (), received_at=now) first, then one Send per up
    neighbour, each carrying the envelope with path (origin,); down neighbours get none."""
    core, store = make_core(node=1, neighbours=(2, 3, 4), up=(2, 4))
    body = b"hello"
    result = core.submit(body, NOW)
    mid = message_id(body)
    assert result.id == mid
    assert result.new is True
    fwd = GossipFrame((Envelope(mid, body, (1,)),))
    assert result.effects == [
        Persist(Message(mid, body, NOW, ())),
        Send(2, fwd),
        Send(4, fwd),
    ]
    # The core never writes the store itself: storing is the caller's job.
    assert mid not in store


def test_submit_with_no_neighbour_up_only_persists() -> None:
    """With no link up, a submit is stored and sent nowhere."""
    core, _ = make_core(up=())
    result = core.submit(b"alone", NOW)
    assert result.effects == [Persist(Message(result.id, b"alone", NOW, ()))]


@pytest.mark.parametrize(
    "body",
    [b"", b"x" * (MAX_BODY + 1), b"\xff\xfe", b"ok\xc3"],
    ids=["empty", "oversized", "not-utf8", "truncated-utf8"],
)
def test_submit_rejects_bad_bodies(body: bytes) -> None:
    """Empty, over-long or non-UTF-8 submits raise SubmitRejected and store nothing."""
    core, store = make_core()
    with pytest.raises(SubmitRejected):
        core.submit(body, NOW)
    assert len(store) == 0


def test_submit_accepts_body_of_exactly_max_body() -> None:
    """The size limit is inclusive: a body of max_body bytes is accepted."""
    core, _ = make_core()
    assert core.submit(b"y" * MAX_BODY, NOW).new


def test_submit_same_text_twice_is_one_message() -> None:
    """The same text submitted again gives the same id, new=False and no effects."""
    core, store = make_core()
    first = core.submit(b"again", NOW)
    apply(store, first.effects)
    second = core.submit(b"again", NOW + 1)
    assert second.id == first.id
    assert second.new is False
    assert second.effects == []
    assert len(store) == 1


def test_submit_of_already_received_message_is_not_new() -> None:
    """Submitting text the node already received from a peer is a no-op."""
    core, store = make_core()
    apply(store, core.receive(2, frame(env(b"heard", (2,))), NOW))
    result = core.submit(b"heard", NOW)
    assert result.new is False
    assert result.effects == []


# -- receive ------------------------------------------------------------------


def test_received_message_is_persisted_with_path_and_forwarded_with_node_appended() -> None:
    """A new message is persisted with its path as received, then sent to every up
    neighbour that is neither on the path nor the sender, with this node appended."""
    core, _ = make_core(node=5, neighbours=(1, 2, 3, 4, 6), up=(1, 2, 3, 4))
    body = b"news"
    mid = message_id(body)
    effects = core.receive(2, frame(env(body, (1, 2))), NOW)
    fwd = GossipFrame((Envelope(mid, body, (1, 2, 5)),))
    # 1 and 2 are on the path (2 is also the sender); 6 is down.
    assert effects == [Persist(Message(mid, body, NOW, (1, 2))), Send(3, fwd), Send(4, fwd)]


def test_duplicate_is_dropped_silently() -> None:
    """A message already held yields no Persist and no Send, from any peer."""
    core, store = make_core(node=1, neighbours=(2, 3, 4))
    apply(store, core.receive(2, frame(env(b"dup", (2,))), NOW))
    assert core.receive(3, frame(env(b"dup", (9, 3))), NOW + 1) == []
    assert core.receive(2, frame(env(b"dup", (2,))), NOW + 2) == []
    own = core.submit(b"mine", NOW)
    apply(store, own.effects)
    assert core.receive(4, frame(env(b"mine", (1, 4))), NOW + 3) == []
    assert len(store) == 2


def test_duplicate_inside_one_frame_is_stored_once() -> None:
    """The same id twice in one frame gives one Persist and one round of Sends."""
    core, store = make_core(node=1, neighbours=(2, 3, 4))
    e = env(b"twice", (2,))
    effects = core.receive(2, frame(e, e, env(b"other", (2,)), e), NOW)
    assert [p.message.body for p in persists(effects)] == [b"twice", b"other"]
    assert len(sends(effects)) == 4  # each of the two messages to 3 and 4
    apply(store, effects)
    assert len(store) == 2


def test_several_messages_in_one_frame_each_persist_before_their_sends() -> None:
    """Each new envelope of a frame gets its Persist immediately before its own Sends."""
    core, _ = make_core(node=1, neighbours=(2, 3))
    effects = core.receive(2, frame(env(b"a", (2,)), env(b"b", (2,))), NOW)
    kinds = [(type(e).__name__, getattr(e, "peer", None)) for e in effects]
    assert kinds == [("Persist", None), ("Send", 3), ("Persist", None), ("Send", 3)]


BAD_ENVELOPES = {
    "id-mismatch": Envelope(message_id(b"real"), b"fake", (2,)),
    "not-utf8": env(b"\xff\xfe\xfd", (2,)),
    "empty-body": env(b"", (2,)),
    "short-id": Envelope(message_id(b"cut")[: ID_BYTES - 1], b"cut", (2,)),
    "long-id": Envelope(message_id(b"cut") + b"\x00", b"cut", (2,)),
}


@pytest.mark.parametrize("bad", BAD_ENVELOPES.values(), ids=BAD_ENVELOPES.keys())
def test_bad_envelope_gives_exactly_drop_peer(bad: Envelope) -> None:
    """An envelope only a broken or hostile sender makes (id not the hash of the body,
    empty/non-UTF-8 body, id of wrong length) yields exactly one DropPeer for the
    sender, and nothing from the rest of the frame."""
    core, _ = make_core(node=1, neighbours=(2, 3))
    effects = core.receive(2, frame(bad, env(b"good", (2,))), NOW)
    assert len(effects) == 1
    assert isinstance(effects[0], DropPeer)
    assert effects[0].peer == 2


@pytest.mark.parametrize("bad", BAD_ENVELOPES.values(), ids=BAD_ENVELOPES.keys())
def test_bad_envelope_mid_frame_stops_the_frame(bad: Envelope) -> None:
    """Envelopes before the bad one keep their effects; DropPeer is the last effect and
    nothing after it is persisted or sent."""
    core, _ = make_core(node=1, neighbours=(2, 3))
    effects = core.receive(2, frame(env(b"first", (2,)), bad, env(b"after", (2,))), NOW)
    assert isinstance(effects[-1], DropPeer)
    assert effects[-1].peer == 2
    assert [p.message.body for p in persists(effects)] == [b"first"]
    assert [type(e) for e in effects] == [Persist, Send, DropPeer]


REFUSED_ENVELOPES = {
    "path_too_long": env(b"far", (*range(100, 100 + MAX_PATH), 2)),
    "path_not_from_sender": env(b"spoofed", (2, 3)),
    "path_has_receiver": env(b"loop", (1, 2)),
    "path_unknown_node": env(b"stranger", (5000, 2)),
    "path_repeats_node": env(b"circle", (3, 4, 3, 2)),
    "body_too_large": env(b"z" * (MAX_BODY + 1), (2,)),
}


@pytest.mark.parametrize("reason", REFUSED_ENVELOPES.keys())
def test_refused_envelope_drops_the_message_not_the_link(reason: str) -> None:
    """A message with a path the receiver must refuse (too long, not ending with the
    sender, naming the receiver, an id not configured, a node twice; also an empty
    path) or a body over this node's limit -- what a node with an older log or another
    cluster file may send -- is dropped and counted under its reason; the rest of the
    frame is handled as usual and the link is kept."""
    core, _ = make_core(node=1, neighbours=(2, 3))
    effects = core.receive(
        2, frame(env(b"first", (2,)), REFUSED_ENVELOPES[reason], env(b"after", (2,))), NOW
    )
    assert [p.message.body for p in persists(effects)] == [b"first", b"after"]
    assert [type(e) for e in effects] == [Persist, Send, Persist, Send]
    assert core.refused == {r: int(r == reason) for r in REFUSED_KEYS}
    assert core.receive(2, frame(env(b"nowhere", ())), NOW) == []
    assert core.refused["path_not_from_sender"] == 1 + (reason == "path_not_from_sender")


def test_path_naming_every_other_node_is_accepted_and_forwardable() -> None:
    """The longest acceptable path names every configured node but the receiver once:
    stored, and a path as long as the cluster (which must name the receiver or a node
    twice) is refused; neither gives a DropPeer."""
    core, _ = make_core(node=1, neighbours=(2,))
    path = (*range(3, 1025), 2)
    effects = core.receive(2, frame(env(b"edge", path)), NOW)
    assert effects == [Persist(Message(message_id(b"edge"), b"edge", NOW, path))]
    assert core.receive(2, frame(env(b"over", (*range(3, 1025), 1, 2))), NOW) == []
    assert core.receive(2, frame(env(b"rep", (*range(3, 1025), 3, 2))), NOW) == []
    assert core.refused["path_too_long"] == 2


def test_frame_from_peer_whose_link_is_not_up_gives_drop_peer() -> None:
    """Frames (gossip or control) from a neighbour not up, from a neighbour after
    peer_down, or from a stranger, give exactly DropPeer and are not processed."""
    core, _ = make_core(node=1, neighbours=(2, 3, 4), up=(2, 3))
    cases: list[tuple[int, PeerFrame]] = [
        (4, frame(env(b"m", (4,)))),
        (4, IHaveFrame((message_id(b"m"),))),
        (99, frame(env(b"m", (99,)))),
    ]
    for peer, f in cases:
        effects = core.receive(peer, f, NOW)
        assert len(effects) == 1
        assert isinstance(effects[0], DropPeer)
        assert effects[0].peer == peer
    assert all(is_sync(e) for e in core.peer_down(3, NOW))
    effects = core.receive(3, frame(env(b"m", (3,))), NOW)
    assert [type(e) for e in effects] == [DropPeer]


# -- links --------------------------------------------------------------------


def test_peer_up_of_non_neighbour_is_ignored() -> None:
    """peer_up for a node that is not a configured neighbour changes nothing: it is
    not sent to, and its frames are still refused."""
    core, _ = make_core(node=1, neighbours=(2,), up=(2,))
    assert core.peer_up(99, NOW) == []
    assert core.up == frozenset({2})
    assert [s.peer for s in sends(core.submit(b"x", NOW).effects)] == [2]
    assert [type(e) for e in core.receive(99, frame(env(b"y", (99,))), NOW)] == [DropPeer]


def test_peer_up_and_down_are_idempotent() -> None:
    """Repeated peer_up/peer_down of the same peer are no-ops; a down peer is not sent to."""
    core, _ = make_core(node=1, neighbours=(2, 3), up=(2, 3))
    assert core.peer_up(2, NOW) == []
    assert all(is_sync(e) for e in core.peer_down(3, NOW))
    assert core.peer_down(3, NOW) == []
    assert core.up == frozenset({2})
    assert [s.peer for s in sends(core.submit(b"x", NOW).effects)] == [2]


def test_copy_of_a_held_message_is_deduplicated_before_its_body_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dedup comes before validation: a copy whose id is held (stored, or earlier in the
    same frame) is not hashed and its body is not checked, so it costs a set lookup and
    a path check; a copy with a held id but another body is ignored, not a reason to
    drop the link. Its path is still checked and a bad one counted."""
    core, store = make_core(node=1, neighbours=(2, 3, 4))
    apply(store, core.receive(2, frame(env(b"dup", (2,))), NOW))
    hashed: list[bytes] = []
    real = state_module.message_id
    monkeypatch.setattr(state_module, "message_id", lambda b: hashed.append(b) or real(b))
    real_match = state_module.ids_match  # how the frame pass hashes a frame's new messages
    monkeypatch.setattr(
        state_module,
        "ids_match",
        lambda ids, bodies: hashed.extend(bodies) or real_match(ids, bodies),
    )
    mid = message_id(b"dup")
    assert core.receive(3, frame(Envelope(mid, b"dup", (9, 3))), NOW + 1) == []
    assert core.receive(4, frame(Envelope(mid, b"not the body", (4,))), NOW + 1) == []
    assert core.receive(4, frame(Envelope(mid, b"dup", (1, 4))), NOW + 1) == []
    assert core.refused["path_has_receiver"] == 1
    e = env(b"twice", (2,))
    effects = core.receive(2, frame(e, e, e), NOW + 2)
    assert [p.message.body for p in persists(effects)] == [b"twice"]
    assert hashed == [b"twice"]
    assert len(store) == 1
