"""Structure-aware inputs: hypothesis strategies that build valid frames, handshakes,
AMP boxes and logs, then damage them byte by byte.

Each ``*_inputs`` strategy gives the bytes one target (``gossip.fuzz.targets``)
takes. Valid structure first matters: random bytes almost never get past a
length prefix or a checksum, so most of what a node does with a frame would
go untested. ``seeds`` draws a corpus from the same strategies for the long run.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.protocols import amp

from gossip.client import commands
from gossip.core.frames import (
    Envelope,
    FpNode,
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    NodeRecord,
    NodeRecordsFrame,
    PruneFrame,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
    SyncReplyFrame,
    SyncWantFrame,
)
from gossip.core.message import ID_BYTES, Message, message_id
from gossip.core.sync import make_key
from gossip.fuzz import amp_target, frame_targets, log_target, peer_target
from gossip.fuzz.harness import KINDS, Mutation, apply_mutations
from gossip.wire import codec

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
NODE_IDS = st.one_of(st.integers(1, 9), U32)
SESSIONS = st.one_of(st.integers(0, 4), U64)
IDS = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)
ANY_IDS = st.one_of(IDS, st.binary(max_size=ID_BYTES + 4))
BODIES = st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40))
# Ids a node holds or was told about are more interesting than random ones.
KNOWN_BODIES = [b"Apple", b"Banana", "Grüße".encode(), b"still alive after the fuzz input"]


def mutations(max_size: int = 4) -> st.SearchStrategy[list[Mutation]]:
    one = st.tuples(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1))
    return st.lists(one, max_size=max_size)


def damaged(data: st.SearchStrategy[bytes], max_mutations: int = 4) -> st.SearchStrategy[bytes]:
    """``data``, sometimes intact, else with byte-level mutations applied."""
    return st.builds(apply_mutations, data, mutations(max_mutations))


@st.composite
def envelopes(draw: Any, sender: int | None = None) -> Envelope:
    """An envelope that mostly passes the checks (id of its body, a path of cluster
    members ending at the sender) and sometimes breaks one."""
    body = draw(st.one_of(st.sampled_from(KNOWN_BODIES), BODIES))
    if sender is not None and draw(st.integers(0, 3)):
        before = draw(st.lists(st.integers(2, 4), max_size=2, unique=True))
        path = (*(n for n in before if n != sender), sender)
    else:
        path = tuple(draw(st.lists(NODE_IDS, max_size=5)))
    mid = message_id(body) if draw(st.integers(0, 4)) else draw(ANY_IDS)
    return Envelope(mid, body, path)


FP_KEYS = st.one_of(
    st.builds(make_key, st.integers(0, 4), st.integers(0, 15)),
    st.builds(make_key, st.just(4), st.integers(0, 65535)),
    U32,
)
FP_NODES = st.builds(FpNode, FP_KEYS, st.one_of(st.integers(0, 3), U64), U64)


def tuples(strategy: st.SearchStrategy[Any], max_size: int = 4) -> st.SearchStrategy[Any]:
    return st.lists(strategy, max_size=max_size).map(tuple)


def peer_frames(sender: int | None = None) -> st.SearchStrategy[Any]:
    """Every kind of frame the codec knows, with values from valid to extreme."""
    envs = tuples(envelopes(sender))
    return st.one_of(
        st.builds(GossipFrame, envs),
        st.builds(IHaveFrame, tuples(ANY_IDS), tuples(NODE_IDS)),
        st.builds(GraftFrame, tuples(ANY_IDS)),
        st.builds(PruneFrame, tuples(NODE_IDS)),
        st.builds(SyncQueryFrame, SESSIONS, tuples(FP_NODES), tuples(FP_NODES)),
        st.builds(
            SyncReplyFrame,
            SESSIONS,
            tuples(FP_NODES),
            tuples(st.tuples(FP_KEYS, tuples(IDS))),
        ),
        st.builds(SyncWantFrame, SESSIONS, tuples(IDS), tuples(FP_KEYS)),
        st.builds(SyncDataFrame, SESSIONS, envs, st.booleans()),
        st.builds(SyncHintFrame, tuples(IDS)),
        st.builds(
            NodeRecordsFrame,
            tuples(
                st.builds(
                    NodeRecord,
                    NODE_IDS,
                    U64,
                    U64,
                    st.one_of(st.just("tcp:host=10.0.0.1:port=1"), st.text(max_size=40)),
                    tuples(NODE_IDS, 8),
                    st.booleans(),
                )
            ),
        ),
    )


def link_frames(sender: int = peer_target.ITS_PEER) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(
            codec.Hello,
            st.one_of(st.just(codec.PROTOCOL_VERSION), U32),
            st.one_of(st.just("fuzz"), st.text(max_size=20)),
            st.one_of(st.just(sender), NODE_IDS),
            st.one_of(st.just(peer_target.PEER_INCARNATION), U64),
        ),
        st.builds(codec.Reject, st.text(max_size=40)),
        st.just(codec.Ping()),
    )


def any_frames(sender: int | None = None) -> st.SearchStrategy[Any]:
    return st.one_of(peer_frames(sender), link_frames())


def encoded(frames: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return frames.map(codec.encode)


def codec_inputs() -> st.SearchStrategy[bytes]:
    return st.one_of(damaged(encoded(any_frames())), st.binary(max_size=64))


def _prefixed(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _pieces(sender: int) -> st.SearchStrategy[bytes]:
    """One piece of a peer's byte stream: a frame whole or damaged, or a lie about a
    frame's length."""
    gossip = st.builds(GossipFrame, st.lists(envelopes(sender), min_size=1, max_size=3).map(tuple))
    return st.one_of(
        encoded(gossip).map(_prefixed),
        encoded(peer_frames(sender)).map(_prefixed),
        st.just(peer_target.framed(peer_target.peer_hello())),
        damaged(encoded(any_frames(sender)), 2).map(_prefixed),
        damaged(encoded(any_frames(sender)).map(_prefixed), 2),
        st.builds(
            lambda n, rest: struct.pack("!I", n) + rest,
            st.one_of(st.integers(0, 64), st.integers(1 << 20, 2**32 - 1)),
            st.binary(max_size=8),
        ),
    )


def _stream(pieces: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Pieces one after the other, then maybe junk; now and then damaged as a whole
    (junk or damage early would leave the rest unread: framing does not recover)."""
    whole = st.builds(
        lambda ps, junk: b"".join(ps) + junk,
        st.lists(pieces, max_size=6),
        st.one_of(st.just(b""), st.binary(max_size=16)),
    )
    return st.one_of(whole, whole, damaged(whole, 2))


def peer_inputs() -> st.SearchStrategy[bytes]:
    return st.builds(
        peer_target.stream_input,
        st.integers(0, 3),
        st.integers(0, len(peer_target.CHUNKS) - 1),
        _stream(_pieces(peer_target.ITS_PEER)),
        st.booleans(),
        st.integers(0, 3).map(lambda n: n == 0),
    )


def core_inputs() -> st.SearchStrategy[bytes]:
    peers = st.integers(0, len(frame_targets.PEERS) - 1)
    frame_event = st.builds(
        lambda kind, peer, payload: frame_targets.core_event(kind | peer << 3, payload),
        st.integers(0, 3),
        peers,
        st.one_of(
            encoded(peer_frames(frame_targets.NEIGHBOURS[0])),
            encoded(peer_frames()),
            damaged(encoded(peer_frames()), 2),
        ),
    )
    other_event = st.builds(
        lambda kind, arg, payload: frame_targets.core_event(kind | arg << 3, payload),
        st.integers(4, 7),
        st.integers(0, 31),
        st.one_of(st.sampled_from(KNOWN_BODIES), BODIES),
    )
    script = st.lists(st.one_of(frame_event, other_event), max_size=12).map(b"".join)
    return st.builds(lambda s, rest: bytes([s]) + rest, st.integers(0, 1), script)


def _command_args() -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    ints = st.one_of(st.integers(-5, 5000), st.integers(-(2**70), 2**70))
    text = st.one_of(st.text(max_size=30), st.sampled_from(["WuESTCPrAT", "1111", ""]))
    return {
        "Submit": st.fixed_dictionaries({"body": text}),
        "SubmitMany": st.fixed_dictionaries({"bodies": st.lists(text, max_size=5)}),
        "Get": st.fixed_dictionaries({"id": text}),
        "ListIds": st.fixed_dictionaries({"start": ints, "limit": ints}),
        "ListMessages": st.fixed_dictionaries({"start": ints, "limit": ints}),
        "Watch": st.fixed_dictionaries({"start": ints}),
        "Status": st.just({}),
        "Login": st.fixed_dictionaries(
            {"token": st.one_of(st.just(amp_target.TOKEN), st.binary(max_size=12))}
        ),
        "Arrivals": st.fixed_dictionaries({"since": st.floats(allow_nan=True), "before": ints}),
        "Delivered": st.fixed_dictionaries({"start": ints, "ids": st.binary(max_size=32)}),
    }


@st.composite
def amp_boxes(draw: Any) -> bytes:
    """One AMP box: a known command with valid or damaged arguments, or anything."""
    args = _command_args()
    name = draw(st.one_of(st.sampled_from(sorted(args)), st.binary(min_size=1, max_size=12)))
    box = amp.AmpBox()
    command = getattr(commands, name.decode("latin-1") if isinstance(name, bytes) else name, None)
    if isinstance(name, str) and isinstance(command, type) and issubclass(command, amp.Command):
        box.update(command.makeArguments(draw(args[name]), None))
        name = name.encode()
    if draw(st.booleans()):
        box[amp.COMMAND] = name
        box[amp.ASK] = b"%d" % draw(st.integers(1, 99))
        return cast(bytes, box.serialize())  # a valid request
    keys = sorted(box)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)) if keys else ():
        if draw(st.booleans()):
            del box[key]
        else:
            box[key] = draw(st.binary(max_size=20))
    box[amp.COMMAND] = name
    if draw(st.integers(0, 4)):
        box[amp.ASK] = draw(st.one_of(st.integers(1, 9).map(lambda n: b"%d" % n), st.binary()))
    for key in draw(st.lists(st.sampled_from([amp.ANSWER, amp.ERROR, b"x" * 9]), max_size=1)):
        box[key] = b"1"
    if draw(st.integers(0, 9)) == 0:
        del box[amp.COMMAND]
    return cast(bytes, box.serialize())


def amp_inputs() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda chunk, data: bytes([chunk]) + data, st.integers(0, 255), _stream(amp_boxes())
    )


MESSAGES = st.builds(
    lambda body, at, path: Message(message_id(body), body, at, tuple(path)),
    st.one_of(st.sampled_from(KNOWN_BODIES), BODIES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(U32, max_size=4),
)


def log_inputs() -> st.SearchStrategy[bytes]:
    files = st.lists(MESSAGES, max_size=8).map(lambda ms: log_target.log_input(ms)[1:])
    return st.builds(
        lambda magic, data: bytes([magic]) + data,
        st.sampled_from([1, 1, 1, 0]),
        st.one_of(damaged(files, 4), st.binary(max_size=64)),
    )


STRATEGIES: dict[str, Callable[[], st.SearchStrategy[bytes]]] = {
    "codec": codec_inputs,
    "peer": peer_inputs,
    "core": core_inputs,
    "amp": amp_inputs,
    "log": log_inputs,
}


def seeds(target: str, count: int) -> list[bytes]:
    """``count`` inputs drawn from ``target``'s strategy (deterministic): a corpus."""
    out: list[bytes] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(STRATEGIES[target]())
    def collect(data: bytes) -> None:
        out.append(data)

    collect()
    return list(dict.fromkeys(out))
