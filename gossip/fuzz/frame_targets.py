"""Fuzz targets for what a peer's frame becomes: the codec, then the protocol core.

``decode_frame``: bytes -> a frame, or ``codec.BadFrame``, nothing else; what
decodes re-encodes to bytes that decode to the same frame.

``core_events``: a script of events for one node's ``GossipCore`` (frames from
neighbours and from strangers, links up and down, ticks, submits), each frame
decoded from bytes as a link would. The core answers every one with effects or
a refusal, never an exception, and what it asks for must be sound: a stored
message is what it claims, a frame it sends decodes at the neighbour to the same
frame within the neighbour's frame limit, its state stays within its bounds.
"""

from __future__ import annotations

import struct

from gossip.core.effects import DropPeer, Effect, Persist, Send, StreamMessages
from gossip.core.frames import PeerFrame
from gossip.core.message import message_id
from gossip.core.plumtree import Plumtree
from gossip.core.state import GossipCore, SubmitRejected, check_body
from gossip.core.sync import stream_frames
from gossip.fuzz.harness import FuzzFailure
from gossip.node import STRATEGIES, frame_limit
from gossip.store.memory import MemoryStore
from gossip.topology import generate_config
from gossip.wire import codec


def decode_frame(data: bytes) -> None:
    try:
        frame = codec.decode(data)
    except codec.BadFrame as e:
        if not str(e):
            raise FuzzFailure("BadFrame without a reason") from None
        return
    except Exception as e:
        raise FuzzFailure(f"decode raised {type(e).__name__}, not BadFrame: {e}") from e
    check_round_trip(frame)


def check_round_trip(frame: codec.AnyFrame, limit: int | None = None) -> bytes:
    """``frame`` encoded; it must decode to itself (and fit ``limit`` bytes)."""
    try:
        data = codec.encode(frame)
    except Exception as e:
        raise FuzzFailure(f"cannot encode {type(frame).__name__}: {e!r}") from e
    if limit is not None and len(data) > limit:
        raise FuzzFailure(
            f"{type(frame).__name__} of {len(data)} bytes is over the frame limit {limit}"
        )
    try:
        again = codec.decode(data)
    except codec.BadFrame as e:
        raise FuzzFailure(f"{frame!r:.200} encodes to bytes that do not decode: {e}") from e
    if again != frame:
        raise FuzzFailure(f"{frame!r:.200} decodes back as {again!r:.200}")
    return data


# -- the core ----------------------------------------------------------------------

NODE = 1
# A small body limit, so that size refusals are within a fuzzer's reach.
MAX_BODY = 256
FRAME_LIMIT = frame_limit(MAX_BODY)
_CONFIG = generate_config(8, name="fuzz")
NEIGHBOURS = tuple(_CONFIG.nodes[NODE].neighbours)
MEMBERS = frozenset(_CONFIG.nodes)
GRAPH = {n: spec.neighbours for n, spec in _CONFIG.nodes.items()}
STRANGER = max(MEMBERS) + 1  # not a neighbour: its frames must be refused
PEERS = (*NEIGHBOURS, STRANGER)
# Frames a StreamMessages may produce per stored message, at most (plus the last).
_OP = struct.Struct("!BH")


class CoreRun:
    """One core, its store, and the checks on everything it returns."""

    def __init__(self, strategy: str) -> None:
        self.store = MemoryStore()
        self.core = GossipCore(
            NODE, NEIGHBOURS, self.store, STRATEGIES[strategy](NODE, GRAPH), MAX_BODY, MEMBERS
        )
        self.now = 1000.0

    def apply(self, effects: list[Effect], event: str) -> None:
        if not isinstance(effects, list):
            raise FuzzFailure(f"{event} returned {type(effects).__name__}, not a list")
        dropped = []
        for e in effects:
            if isinstance(e, Persist):
                m = e.message
                if message_id(m.body) != m.id:
                    raise FuzzFailure(f"{event}: Persist of a message whose id is not its hash")
                problem = check_body(m.body, MAX_BODY)
                if problem:
                    raise FuzzFailure(f"{event}: Persist of a bad body ({problem})")
                if not self.store.add(m):
                    raise FuzzFailure(f"{event}: Persist of a message already held")
            elif isinstance(e, Send):
                if e.peer not in NEIGHBOURS:
                    raise FuzzFailure(f"{event}: Send to node {e.peer}, not a neighbour")
                check_round_trip(e.frame, FRAME_LIMIT)
            elif isinstance(e, StreamMessages):
                if e.peer not in NEIGHBOURS:
                    raise FuzzFailure(f"{event}: StreamMessages to node {e.peer}")
                frames = stream_frames(self.store, NODE, e, MEMBERS)
                for count, f in enumerate(frames, 1):
                    check_round_trip(f, FRAME_LIMIT)
                    if count > len(self.store) + len(e.ids) + 1:
                        raise FuzzFailure(f"{event}: StreamMessages does not end")
            elif isinstance(e, DropPeer):
                if not (isinstance(e.reason, str) and e.reason):
                    raise FuzzFailure(f"{event}: DropPeer without a reason")
                dropped.append(e.peer)
            else:
                raise FuzzFailure(f"{event}: unknown effect {e!r:.200}")
        for peer in dropped:  # the link closes: the core hears it went down
            self.apply(self.core.peer_down(peer, self.now), f"peer_down({peer}) after DropPeer")
        self.check_bounds(event)

    def check_bounds(self, event: str) -> None:
        strategy = self.core.strategy
        if isinstance(strategy, Plumtree) and len(strategy.missing) > strategy.max_missing:
            raise FuzzFailure(f"{event}: Plumtree holds {len(strategy.missing)} missing ids")
        if not self.core.up <= set(NEIGHBOURS):
            raise FuzzFailure(f"{event}: links up to non-neighbours {set(self.core.up)}")
        if len(self.core.sync.queue) > len(NEIGHBOURS):
            raise FuzzFailure(f"{event}: {len(self.core.sync.queue)} re-sync sessions queued")

    def frame(self, peer: int, payload: bytes) -> None:
        try:
            frame = codec.decode(payload)
        except codec.BadFrame:
            return  # the link drops the peer; the core never sees it
        if isinstance(frame, codec.Hello | codec.Reject | codec.Ping):
            return  # link frames: the link handles them
        pf: PeerFrame = frame
        self.apply(self.core.receive(peer, pf, self.now), f"receive({type(frame).__name__})")


def core_events(data: bytes) -> None:
    """``data``: a strategy byte, then events ``op (u8) | length (u16) | payload``.

    ``op & 7``: 0-3 a frame (the payload) from ``PEERS[op >> 3 & 3]`` (the last is a
    stranger), 4 that peer's link goes down, 5 up, 6 a tick ``(op >> 3) + 1`` half
    seconds later, 7 a client's submit of the payload.
    """
    if not data:
        return
    run = CoreRun("plumtree" if data[0] & 1 else "flood")
    for peer in NEIGHBOURS:
        run.apply(run.core.peer_up(peer, run.now), f"peer_up({peer})")
    pos = 1
    while pos + _OP.size <= len(data):
        op, length = _OP.unpack_from(data, pos)
        pos += _OP.size
        payload = data[pos : pos + length]
        pos += length
        kind, peer = op & 7, PEERS[op >> 3 & 3]
        if kind <= 3:
            run.frame(peer, payload)
        elif kind == 4:
            run.apply(run.core.peer_down(peer, run.now), f"peer_down({peer})")
        elif kind == 5:
            run.apply(run.core.peer_up(peer, run.now), f"peer_up({peer})")
        elif kind == 6:
            run.now += ((op >> 3) + 1) * 0.5
            run.apply(run.core.tick(run.now), "tick")
        else:
            try:
                result = run.core.submit(payload, run.now)
            except SubmitRejected:
                continue
            run.apply(result.effects, "submit")


def core_event(op: int, payload: bytes = b"") -> bytes:
    """One event of a ``core_events`` script."""
    return _OP.pack(op, len(payload)) + payload
