"""Between protobuf ``Frame`` bytes and the core's frame types.

One place that knows both sides: the core never sees protobuf, and the link
adapter never sees protobuf field names.
"""

from __future__ import annotations

import attrs
from google.protobuf.message import DecodeError

from gossip.core.frames import Envelope, GossipFrame, GraftFrame, IHaveFrame, PeerFrame, PruneFrame
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


def encode(frame: AnyFrame) -> bytes:
    f = peer_pb2.Frame()
    if isinstance(frame, GossipFrame):
        msgs = f.gossip.messages
        for env in frame.messages:
            m = msgs.add()
            m.id = env.id
            m.body = env.body
            m.path.extend(env.path)
    elif isinstance(frame, IHaveFrame):
        f.ihave.ids.extend(frame.ids)
    elif isinstance(frame, GraftFrame):
        f.graft.ids.extend(frame.ids)
    elif isinstance(frame, PruneFrame):
        f.prune.SetInParent()
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


def decode(data: bytes) -> AnyFrame:
    f = peer_pb2.Frame()
    try:
        f.ParseFromString(data)
    except DecodeError as e:
        raise BadFrame(f"undecodable frame ({len(data)} bytes): {e}") from None
    kind = f.WhichOneof("kind")
    if kind == "gossip":
        return GossipFrame(tuple(Envelope(m.id, m.body, tuple(m.path)) for m in f.gossip.messages))
    if kind == "ihave":
        return IHaveFrame(tuple(f.ihave.ids))
    if kind == "graft":
        return GraftFrame(tuple(f.graft.ids))
    if kind == "prune":
        return PruneFrame()
    if kind == "ping":
        return Ping()
    if kind == "hello":
        h = f.hello
        return Hello(h.protocol_version, h.cluster, h.node_id, h.incarnation)
    if kind == "reject":
        return Reject(f.reject.reason)
    raise BadFrame(f"frame of unknown kind ({len(data)} bytes)")
