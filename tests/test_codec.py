"""The hand-assembled parts of the wire codec match protobuf's own encoding."""

from __future__ import annotations

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
