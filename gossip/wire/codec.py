"""Between protobuf ``Frame`` bytes and the core's frame types.

One place that knows both sides: the core never sees protobuf, and the link
adapter never sees protobuf field names.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import attrs
from google.protobuf.message import DecodeError

from gossip.core.frames import (
    Envelope,
    FpNode,
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    NodeRecord,
    NodeRecordsFrame,
    PeerFrame,
    PruneFrame,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
    SyncReplyFrame,
    SyncWantFrame,
)
from gossip.core.message import ID_BYTES
from gossip.wire import peer_pb2

PROTOCOL_VERSION = 1


class BadFrame(ValueError):
    """Bytes from a peer that are not a frame of this protocol."""


@attrs.frozen(slots=True)
class Hello:
    protocol_version: int
    cluster: str
    node_id: int
    incarnation: int


@attrs.frozen(slots=True)
class Reject:
    reason: str


@attrs.frozen(slots=True)
class Ping:
    pass


LinkFrame = Hello | Reject | Ping
AnyFrame = LinkFrame | PeerFrame


def _put_envelopes(out: Any, envelopes: tuple[Envelope, ...]) -> None:
    for env in envelopes:
        m = out.add()
        if env.id:
            m.id = env.id
        m.body = env.body
        m.path.extend(env.path)


def _put_nodes(out: Any, nodes: tuple[FpNode, ...]) -> None:
    for n in nodes:
        pb = out.add()
        pb.key = n.key
        pb.count = n.count
        pb.sum = n.sum


def _nodes(pbs: Any) -> tuple[FpNode, ...]:
    return tuple(FpNode(n.key, n.count, n.sum) for n in pbs)


def _split_ids(blob: bytes) -> tuple[bytes, ...]:
    if len(blob) % ID_BYTES:
        raise BadFrame(f"id list of {len(blob)} bytes is not a whole number of ids")
    return tuple(blob[i : i + ID_BYTES] for i in range(0, len(blob), ID_BYTES))


def encode(frame: AnyFrame) -> bytes:
    f = peer_pb2.Frame()
    if isinstance(frame, GossipFrame):
        _put_envelopes(f.gossip.messages, frame.messages)
        f.gossip.SetInParent()  # an empty batch is still a Gossip frame
    elif isinstance(frame, SyncDataFrame):
        f.sync_data.session = frame.session
        _put_envelopes(f.sync_data.messages, frame.messages)
        f.sync_data.done = frame.done
        f.sync_data.SetInParent()
    elif isinstance(frame, SyncQueryFrame):
        f.sync_query.session = frame.session
        _put_nodes(f.sync_query.children, frame.children)
        _put_nodes(f.sync_query.ids, frame.ids)
        f.sync_query.SetInParent()
    elif isinstance(frame, SyncReplyFrame):
        f.sync_reply.session = frame.session
        _put_nodes(f.sync_reply.nodes, frame.nodes)
        for key, ids in frame.ids:
            entry = f.sync_reply.ids.add()
            entry.key = key
            entry.ids = b"".join(ids)
        f.sync_reply.SetInParent()
    elif isinstance(frame, SyncWantFrame):
        f.sync_want.session = frame.session
        f.sync_want.ids = b"".join(frame.ids)
        f.sync_want.ranges.extend(frame.ranges)
        f.sync_want.SetInParent()
    elif isinstance(frame, SyncHintFrame):
        f.sync_hint.ids = b"".join(frame.ids)
        f.sync_hint.SetInParent()
    elif isinstance(frame, IHaveFrame):
        f.ihave.ids.extend(frame.ids)
        f.ihave.origins.extend(frame.origins)
        f.ihave.SetInParent()
    elif isinstance(frame, GraftFrame):
        f.graft.ids.extend(frame.ids)
        f.graft.origins.extend(frame.origins)
        f.graft.SetInParent()
    elif isinstance(frame, PruneFrame):
        f.prune.origins.extend(frame.origins)
        f.prune.cut.extend(frame.cut)
        f.prune.SetInParent()
    elif isinstance(frame, NodeRecordsFrame):
        for r in frame.records:
            pb = f.node_records.records.add()
            pb.node_id = r.node
            pb.incarnation = r.incarnation
            pb.version = r.version
            pb.address = r.address
            pb.neighbours.extend(r.neighbours)
            pb.leaving = r.leaving
        f.node_records.SetInParent()
    elif isinstance(frame, Ping):
        f.ping.SetInParent()
    elif isinstance(frame, Hello):
        f.hello.protocol_version = frame.protocol_version
        f.hello.cluster = frame.cluster
        f.hello.node_id = frame.node_id
        f.hello.incarnation = frame.incarnation
    elif isinstance(frame, Reject):
        f.reject.reason = frame.reason
    else:  # pragma: no cover - exhaustive over AnyFrame
        raise TypeError(f"cannot encode {frame!r}")
    return f.SerializeToString()


def _varint_of(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Varints of the lengths every relayed message needs (a table lookup costs a tenth of
# building one; 2,048 entries take about 80 KB).
_SMALL_VARINTS = tuple(_varint_of(n) for n in range(2048))


def _varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 2048 else _varint_of(n)


_ENVELOPE_TAG = b"\x0a"  # Gossip.messages: field 1, length-delimited
_GOSSIP_TAG = b"\x1a"  # Frame.gossip: field 3, length-delimited
# The tag and length of a Gossip.messages entry of each size a relayed message has.
_ENTRY_PREFIXES = tuple(_ENVELOPE_TAG + v for v in _SMALL_VARINTS)


def envelope_piece(env: Envelope) -> bytes:
    """One entry of ``Gossip.messages`` (tag, length, serialized ``Envelope``),
    assembled by protobuf's wire rules: byte for byte what protobuf gives (fields in
    number order, empty ones left out) without building a protobuf object. Every
    relayed message is encoded once per hop; this only copies the id and body."""
    return _piece(env.id, env.body, env.path)


def _piece(mid: bytes, body: bytes, path: tuple[int, ...]) -> bytes:
    """``envelope_piece`` of a message given by its fields (a frame's columns)."""
    parts = [b"\x0a", _varint(len(mid)), mid] if mid else []
    if body:
        parts += (b"\x12", _varint(len(body)), body)
    if path:
        parts.append(_path_field(path))
    raw = b"".join(parts)
    return _ENVELOPE_TAG + _varint(len(raw)) + raw


def _path_field(path: tuple[int, ...]) -> bytes:
    """``Envelope.path`` as protobuf writes it (empty path: no field)."""
    if not path:
        return b""
    # Node ids under 128 are one-byte varints: the packed field is the ids' bytes.
    packed = bytes(path) if max(path) < 0x80 else b"".join(map(_varint, path))
    return b"\x1a" + _varint(len(packed)) + packed


def gossip_pieces(frame: GossipFrame) -> list[bytes]:
    """The entries of ``Gossip.messages`` for ``frame``'s messages, in order, each as
    ``envelope_piece`` gives it. A frame read from the wire keeps each envelope's
    encoded id and body (``heads``), so a relayed message costs two concatenations:
    its entry's tag and length, those bytes, then its new path, encoded once for
    all messages sharing it. A frame sent on holds one path (the received one with
    this node appended): then the tag and length come from a table."""
    heads, paths = frame.heads, frame.paths
    if heads is None:  # built here (a submit): no Envelope objects needed
        return list(map(_piece, frame.ids, frame.bodies, paths))
    if paths and paths.count(paths[0]) == len(paths):
        tail = _path_field(paths[0])
        extra = len(tail)
        if max(map(len, heads)) + extra < len(_ENTRY_PREFIXES):
            prefix = _ENTRY_PREFIXES
            return [prefix[len(head) + extra] + head + tail for head in heads]
    pieces = []
    tails: dict[tuple[int, ...], bytes] = {}
    for head, path in zip(heads, paths, strict=True):
        field = tails.get(path)
        if field is None:
            field = tails[path] = _path_field(path)
        pieces.append(_ENVELOPE_TAG + _varint(len(head) + len(field)) + head + field)
    return pieces


def encode_gossip(
    envelopes: list[Envelope], max_bytes: int, cache: dict[int, bytes]
) -> Iterator[tuple[bytes, int]]:
    """``Frame{gossip}`` bytes holding ``envelopes``, split at about ``max_bytes``.

    Yields (frame bytes, envelope count). Each envelope is serialized once per
    ``cache`` (keyed by object identity, by ``envelope_piece``), so a message sent
    to several peers is not encoded again for each (see ``gossip_frames``).
    """
    pieces = []
    for env in envelopes:
        piece = cache.get(id(env))
        if piece is None:
            piece = cache[id(env)] = envelope_piece(env)
        pieces.append(piece)
    return gossip_frames(pieces, max_bytes)


def gossip_frames(pieces: list[bytes], max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """``Frame{gossip}`` bytes holding the ``Gossip.messages`` entries ``pieces``, split
    at about ``max_bytes`` (a frame ends with the entry that brings it to ``max_bytes``
    or more); yields (frame bytes, entry count). A frame is assembled by protobuf's
    own wire rules: a repeated message field is the concatenation of its tagged,
    length-prefixed entries. The split points are found in the running sizes."""
    ends = list(accumulate(map(len, pieces)))
    start, base = 0, 0
    while start < len(pieces):
        stop = min(bisect_left(ends, base + max_bytes, start) + 1, len(pieces))
        payload = b"".join(pieces[start:stop])
        yield _GOSSIP_TAG + _varint(len(payload)) + payload, stop - start
        start, base = stop, ends[stop - 1]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos`` (IndexError past the end)."""
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    n, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = data[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos + 1
        shift += 7
        if shift > 28:
            raise IndexError("varint too long for a length")


def _gossip_span(data: bytes) -> tuple[int, int] | None:
    """Where the messages of a ``Frame{gossip}`` lie in ``data`` (start, end): None
    unless ``data`` is that one field, its length spanning the rest exactly."""
    if len(data) < 2 or data[0] != 0x1A:
        return None
    try:
        size, pos = _read_varint(data, 1)
    except IndexError:
        return None
    return (pos, len(data)) if pos + size == len(data) else None


def _gossip_columns(data: bytes) -> GossipFrame | None:
    """A ``Frame{gossip}`` read straight into columns (see ``_any_columns``), in the
    layout every node writes if it is that (``_usual_columns``)."""
    frame = _usual_columns(data)
    return _any_columns(data) if frame is None else frame


def _usual_columns(data: bytes) -> GossipFrame | None:
    """``_any_columns`` for the layout every node of this version writes, read with
    fewer steps per envelope: an id of ``ID_BYTES``, a body, a path of one-byte ids,
    in that order, and lengths of one or two bytes (up to 16 KiB). None for anything
    else, which ``_any_columns`` then reads. Equal paths share one tuple."""
    span = _gossip_span(data)
    if span is None:
        return None
    pos, end = span
    try:
        ids: list[bytes] = []
        bodies: list[bytes] = []
        paths: list[tuple[int, ...]] = []
        heads: list[bytes] = []
        path_of: dict[bytes, tuple[int, ...]] = {b"": ()}  # packed path -> its tuple
        last: bytes | None = None  # the packed path of the envelope before
        path: tuple[int, ...] = ()
        while pos < end:
            if data[pos] != 0x0A:  # Gossip.messages
                return None
            size = data[pos + 1]
            if size < 0x80:
                start = pos + 2
            elif data[pos + 2] < 0x80:
                size = (size & 0x7F) | data[pos + 2] << 7
                start = pos + 3
            else:
                return None
            pos = start + size  # the end of this envelope
            if data[start] != 0x0A or data[start + 1] != ID_BYTES or data[start + 18] != 0x12:
                return None  # the id field, then the body's tag
            size = data[start + 19]
            if size < 0x80:
                body_at = start + 20
            elif data[start + 20] < 0x80:
                size = (size & 0x7F) | data[start + 20] << 7
                body_at = start + 21
            else:
                return None
            head_end = body_at + size
            if head_end == pos:
                packed = b""
            elif head_end < pos and data[head_end] == 0x1A:
                # One length byte, the rest of the envelope: else protobuf reads it.
                size = data[head_end + 1]
                if head_end + 2 + size != pos or not 0 < size < 0x80:
                    return None
                packed = data[head_end + 2 : pos]
            else:
                return None
            if packed != last:  # a frame holds runs of one path
                last = packed
                known = path_of.get(packed)
                if known is None:
                    if max(packed) >= 0x80:
                        return None  # multi-byte ids
                    known = path_of[packed] = tuple(packed)
                path = known
            ids.append(data[start + 2 : start + 2 + ID_BYTES])
            bodies.append(data[body_at:head_end])
            paths.append(path)
            heads.append(data[start:head_end])
    except IndexError:
        return None
    return GossipFrame.of_columns(tuple(ids), tuple(bodies), tuple(paths), tuple(heads))


def _any_columns(data: bytes) -> GossipFrame | None:
    """A ``Frame{gossip}`` read straight into columns, with each envelope's encoded id
    and body fields kept (``GossipFrame.heads``): no protobuf object and no
    ``Envelope`` per message. Only the layout protobuf itself writes is read here
    (fields in number order, each at most once, the path packed in one-byte ids);
    None for anything else, which ``decode`` then hands to protobuf: every frame
    decodes to the same messages either way."""
    span = _gossip_span(data)
    if span is None:
        return None
    pos, end = span
    try:
        ids: list[bytes] = []
        bodies: list[bytes] = []
        paths: list[tuple[int, ...]] = []
        heads: list[bytes] = []
        while pos < end:
            # Lengths under 128 are one byte: read inline, the rest by _read_varint.
            if data[pos] != 0x0A:
                return None
            size = data[pos + 1]
            start = pos + 2
            if size >= 0x80:
                size, start = _read_varint(data, pos + 1)
            stop = start + size
            if stop > end:
                return None
            pos = start
            mid = body = b""
            if pos < stop and data[pos] == 0x0A:
                size = data[pos + 1]
                pos += 2
                if size >= 0x80:
                    size, pos = _read_varint(data, pos - 1)
                mid = data[pos : pos + size]
                pos += size
            if pos < stop and data[pos] == 0x12:
                size = data[pos + 1]
                pos += 2
                if size >= 0x80:
                    size, pos = _read_varint(data, pos - 1)
                body = data[pos : pos + size]
                pos += size
            head_end = pos
            path: tuple[int, ...] = ()
            if pos < stop and data[pos] == 0x1A:
                size = data[pos + 1]
                pos += 2
                if size >= 0x80:
                    size, pos = _read_varint(data, pos - 1)
                packed = data[pos : pos + size]
                pos += size
                if packed and max(packed) >= 0x80:
                    return None  # multi-byte ids: protobuf reads those
                path = tuple(packed)
            if pos != stop:
                return None  # a field out of order, repeated, unknown, or a short read
            ids.append(mid)
            bodies.append(body)
            paths.append(path)
            heads.append(data[start:head_end])
    except IndexError:
        return None
    return GossipFrame.of_columns(tuple(ids), tuple(bodies), tuple(paths), tuple(heads))


def decode(data: bytes) -> AnyFrame:
    if data[:1] == b"\x1a":
        frame = _gossip_columns(data)
        if frame is not None:
            return frame
    f = peer_pb2.Frame()
    try:
        f.ParseFromString(data)
    except DecodeError as e:
        raise BadFrame(f"undecodable frame ({len(data)} bytes): {e}") from None
    kind = f.WhichOneof("kind")
    if kind == "gossip":
        return GossipFrame(tuple(Envelope(m.id, m.body, tuple(m.path)) for m in f.gossip.messages))
    if kind == "sync_data":
        d = f.sync_data
        return SyncDataFrame(
            d.session, tuple(Envelope(m.id, m.body, tuple(m.path)) for m in d.messages), d.done
        )
    if kind == "sync_query":
        q = f.sync_query
        return SyncQueryFrame(q.session, _nodes(q.children), _nodes(q.ids))
    if kind == "sync_reply":
        r = f.sync_reply
        return SyncReplyFrame(
            r.session, _nodes(r.nodes), tuple((e.key, _split_ids(e.ids)) for e in r.ids)
        )
    if kind == "sync_want":
        w = f.sync_want
        return SyncWantFrame(w.session, _split_ids(w.ids), tuple(w.ranges))
    if kind == "sync_hint":
        return SyncHintFrame(_split_ids(f.sync_hint.ids))
    if kind == "ihave":
        return IHaveFrame(tuple(f.ihave.ids), tuple(f.ihave.origins))
    if kind == "graft":
        return GraftFrame(tuple(f.graft.ids), tuple(f.graft.origins))
    if kind == "prune":
        return PruneFrame(tuple(f.prune.origins), tuple(f.prune.cut))
    if kind == "node_records":
        return NodeRecordsFrame(
            tuple(
                NodeRecord(
                    r.node_id, r.incarnation, r.version, r.address, tuple(r.neighbours), r.leaving
                )
                for r in f.node_records.records
            )
        )
    if kind == "ping":
        return Ping()
    if kind == "hello":
        h = f.hello
        return Hello(h.protocol_version, h.cluster, h.node_id, h.incarnation)
    if kind == "reject":
        return Reject(f.reject.reason)
    raise BadFrame(f"frame of unknown kind ({len(data)} bytes)")
