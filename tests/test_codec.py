"""The hand-assembled parts of the wire codec match protobuf's own encoding."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.frames import Envelope, GossipFrame
from gossip.wire import codec, peer_pb2

envelopes = st.builds(
    Envelope,
    st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=40)),
    st.binary(max_size=300) | st.binary(min_size=2040, max_size=2100),
    st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 300), max_size=20).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_envelope_piece_is_what_protobuf_serializes(env: Envelope) -> None:
    """``envelope_piece`` (no protobuf object per relayed message) gives byte for byte
    what protobuf gives for one entry of ``Gossip.messages``, for any id, body and path
    (long ones too: lengths past the varint table)."""
    g = peer_pb2.Gossip()
    m = g.messages.add()
    m.id = env.id
    m.body = env.body
    m.path.extend(env.path)
    assert codec.envelope_piece(env) == g.SerializeToString()


@settings(max_examples=100, deadline=None)
@given(st.lists(envelopes, min_size=1, max_size=30), st.integers(1, 2000))
def test_encode_gossip_frames_decode_back_to_the_envelopes(
    batch: list[Envelope], max_bytes: int
) -> None:
    """Frames assembled from pieces by ``encode_gossip`` decode, in order, to exactly the
    envelopes given, however they are split."""
    out: list[Envelope] = []
    for data, count in codec.encode_gossip(batch, max_bytes, {}):
        frame = codec.decode(data)
        assert isinstance(frame, GossipFrame) and len(frame.messages) == count
        out += frame.messages
    assert out == batch


def protobuf_frame(batch: list[Envelope]) -> bytes:
    f = peer_pb2.Frame()
    for env in batch:
        m = f.gossip.messages.add()
        m.id = env.id
        m.body = env.body
        m.path.extend(env.path)
    f.gossip.SetInParent()
    return f.SerializeToString()


def protobuf_envelopes(data: bytes) -> list[Envelope]:
    f = peer_pb2.Frame()
    f.ParseFromString(data)
    return [Envelope(m.id, m.body, tuple(m.path)) for m in f.gossip.messages]


@settings(max_examples=200, deadline=None)
@given(st.lists(envelopes, max_size=30), st.integers(0, 300))
def test_gossip_columns_and_relayed_pieces_match_protobuf(batch: list[Envelope], me: int) -> None:
    """A Gossip frame as protobuf serializes it decodes (into columns, no protobuf
    object) to exactly the envelopes protobuf reads; and each message sent on with
    ``me`` appended to its path, assembled from the received bytes
    (``gossip_pieces``), is byte for byte what protobuf serializes for it."""
    data = protobuf_frame(batch)
    frame = codec.decode(data)
    assert isinstance(frame, GossipFrame)
    assert list(frame.messages) == batch == protobuf_envelopes(data)
    # Read into columns unless a node id needs a multi-byte varint (protobuf reads those).
    assert (frame.heads is not None) == all(max(e.path, default=0) < 0x80 for e in batch)
    rows = list(range(len(batch)))
    for path in {env.path for env in batch}:
        group = [r for r in rows if batch[r].path == path]
        relayed = frame.select(group, (*path, me))
        expected = [Envelope(batch[r].id, batch[r].body, (*path, me)) for r in group]
        assert codec.gossip_pieces(relayed) == [codec.envelope_piece(e) for e in expected]
        (out, count), *more = codec.gossip_frames(codec.gossip_pieces(relayed), 1 << 30)
        assert not more and count == len(group) and out == protobuf_frame(expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(envelopes, min_size=1, max_size=20))
def test_pieces_of_a_frame_built_from_columns_match_protobuf(batch: list[Envelope]) -> None:
    """A frame this node builds from columns (its own submits: no received bytes to
    reuse) is sent as the bytes protobuf serializes, without an ``Envelope`` made
    per message on the way."""
    frame = GossipFrame.of_columns(
        tuple(e.id for e in batch), tuple(e.body for e in batch), tuple(e.path for e in batch)
    )
    pieces = codec.gossip_pieces(frame)
    assert frame._messages is None
    (out, count), *more = codec.gossip_frames(pieces, 1 << 30)
    assert not more and count == len(batch) and out == protobuf_frame(batch)


# Envelope encodings protobuf reads but never writes: the codec must read them the same.
ODD_ENVELOPES = {
    "fields-reversed": b"\x1a\x02\x03\x04\x12\x02hi\x0a\x02ab",
    "path-unpacked": b"\x0a\x02ab\x12\x02hi\x18\x03\x18\x04",
    "path-in-two-parts": b"\x0a\x02ab\x12\x02hi\x1a\x01\x03\x1a\x01\x04",
    "id-twice": b"\x0a\x02zz\x0a\x02ab\x12\x02hi",
    "unknown-field": b"\x0a\x02ab\x12\x02hi\x20\x05",
    "long-node-ids": b"\x0a\x02ab\x12\x02hi\x1a\x04\x80\x01\xff\x01",
    "overlong-length": b"\x0a\x82\x00ab\x12\x02hi",
    "empty": b"",
}


@pytest.mark.parametrize("raw", ODD_ENVELOPES.values(), ids=ODD_ENVELOPES.keys())
def test_envelopes_encoded_otherwise_decode_as_protobuf_reads_them(raw: bytes) -> None:
    """An envelope encoded in a way protobuf accepts but does not write (fields out of
    order or repeated, an unpacked or split path, unknown fields, multi-byte node ids,
    a length varint longer than needed) decodes to what protobuf reads, beside a plain
    one; and relaying it gives protobuf's own bytes for the relayed envelope."""
    plain = codec.envelope_piece(Envelope(b"cd", b"yo", (7,)))
    odd = b"\x0a" + bytes([len(raw)]) + raw
    payload = odd + plain
    data = b"\x1a" + bytes([len(payload)]) + payload
    frame = codec.decode(data)
    assert isinstance(frame, GossipFrame)
    assert list(frame.messages) == protobuf_envelopes(data)
    relayed = frame.select([0, 1], None)
    pieces = codec.gossip_pieces(
        GossipFrame.of_columns(
            relayed.ids, relayed.bodies, tuple((*p, 9) for p in relayed.paths), relayed.heads
        )
    )
    expected = [Envelope(e.id, e.body, (*e.path, 9)) for e in protobuf_envelopes(data)]
    assert [protobuf_envelopes(b"\x1a" + bytes([len(p)]) + p)[0] for p in pieces] == expected


@pytest.mark.parametrize(
    "data",
    [
        b"\x1a\x05\x0a\x03\x0a\x01",  # an envelope cut short
        b"\x1a\x09\x0a\x07\x0a\x10abcd",  # an id running past its envelope
        b"\x1a\x03\x0a\x05\x0a",  # an envelope running past the frame
        b"\x1a\x10\x0a\x02",  # a frame shorter than it says
    ],
)
def test_truncated_gossip_frames_are_bad_frames(data: bytes) -> None:
    """A Gossip frame whose lengths do not add up is a ``BadFrame``, as protobuf says."""
    with pytest.raises(codec.BadFrame):
        codec.decode(data)


# Messages as nodes send them: 16-byte ids, bodies around the one- and two-byte length
# boundaries, paths of one-byte node ids (empty at the origin).
usual_envelopes = st.builds(
    Envelope,
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=1, max_size=140) | st.binary(min_size=16_330, max_size=16_400),
    st.lists(st.integers(0, 127), max_size=20).map(tuple),
)


def protobuf_reads(data: bytes) -> object:
    """What protobuf reads from ``data``: the envelopes of a Gossip frame, "bad" for
    bytes it refuses, or the kind of any other frame."""
    f = peer_pb2.Frame()
    try:
        f.ParseFromString(data)
    except DecodeError:
        return "bad"
    if f.WhichOneof("kind") != "gossip":
        return f.WhichOneof("kind")
    return [Envelope(m.id, m.body, tuple(m.path)) for m in f.gossip.messages]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(usual_envelopes, min_size=1, max_size=6),
    st.integers(0, 1 << 20),
    st.sampled_from(["keep", "flip", "drop", "insert"]),
    st.integers(0, 255),
)
def test_frames_as_nodes_write_them_decode_as_protobuf_reads_them_even_when_damaged(
    batch: list[Envelope], where: int, how: str, byte: int
) -> None:
    """A Gossip frame in the layout nodes write is read by the short path (``_usual_columns``
    when every envelope is under 16 KiB) to exactly the envelopes protobuf reads; the
    same frame with one byte changed, dropped or added decodes to what protobuf reads
    from it, or is a ``BadFrame`` exactly when protobuf refuses it."""
    data = protobuf_frame(batch)
    if all(len(codec.envelope_piece(e)) < 16_384 for e in batch):
        assert codec._usual_columns(data) is not None
    at = where % len(data)
    if how == "flip":
        data = data[:at] + bytes([data[at] ^ (byte or 1)]) + data[at + 1 :]
    elif how == "drop":
        data = data[:at] + data[at + 1 :]
    elif how == "insert":
        data = data[:at] + bytes([byte]) + data[at:]
    expected = protobuf_reads(data)
    if not isinstance(expected, list) and expected != "bad":
        return  # another kind of frame: not the Gossip reader's
    try:
        frame = codec.decode(data)
    except codec.BadFrame:
        assert expected == "bad"
    else:
        assert isinstance(frame, GossipFrame) and list(frame.messages) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=40), st.integers(1, 2000))
def test_gossip_frames_end_with_the_entry_that_reaches_the_size(
    sizes: list[int], max_bytes: int
) -> None:
    """``gossip_frames`` ends a frame with the entry that brings it to ``max_bytes`` or
    more, and keeps every entry, in order."""
    pieces = [bytes([n % 256]) * n for n in sizes]
    expected: list[list[bytes]] = [[]]
    for piece in pieces:
        expected[-1].append(piece)
        if sum(map(len, expected[-1])) >= max_bytes:
            expected.append([])
    expected = [group for group in expected if group]
    frames = list(codec.gossip_frames(pieces, max_bytes))
    assert [count for _, count in frames] == [len(group) for group in expected]
    for (data, _), group in zip(frames, expected, strict=True):
        assert data == protobuf_gossip_of_pieces(group)


def protobuf_gossip_of_pieces(pieces: list[bytes]) -> bytes:
    payload = b"".join(pieces)
    return b"\x1a" + codec._varint(len(payload)) + payload
