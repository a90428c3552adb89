"""Peer frames as the core sees them, independent of the wire encoding.

``gossip.wire.codec`` maps these to and from protobuf; link-level frames
(Hello, Reject, Ping) never reach the core.
"""

from __future__ import annotations

import attrs


@attrs.frozen(slots=True)
class Envelope:
    """A message in flight: what one node hands to a neighbour."""

    id: bytes
    body: bytes
    path: tuple[int, ...]


@attrs.frozen(slots=True)
class GossipFrame:
    messages: tuple[Envelope, ...]


@attrs.frozen(slots=True)
class IHaveFrame:
    ids: tuple[bytes, ...]
    origins: tuple[int, ...] = ()  # parallel to ids


@attrs.frozen(slots=True)
class GraftFrame:
    ids: tuple[bytes, ...]
    # Push these origins' messages to me from now on (no message asked for).
    origins: tuple[int, ...] = ()


@attrs.frozen(slots=True)
class PruneFrame:
    origins: tuple[int, ...] = ()
    # These origins' messages no longer reach me: look for another feed.
    cut: tuple[int, ...] = ()


# ---- re-sync frames (see gossip/core/sync.py) ----


@attrs.frozen(slots=True)
class FpNode:
    """A fingerprint-tree node: its key and the (count, sum) of the ids under it."""

    key: int
    count: int
    sum: int


@attrs.frozen(slots=True)
class SyncQueryFrame:
    session: int
    children: tuple[FpNode, ...]
    ids: tuple[FpNode, ...]


@attrs.frozen(slots=True)
class SyncReplyFrame:
    session: int
    nodes: tuple[FpNode, ...]
    ids: tuple[tuple[int, tuple[bytes, ...]], ...]


@attrs.frozen(slots=True)
class SyncWantFrame:
    session: int
    ids: tuple[bytes, ...]
    ranges: tuple[int, ...]


@attrs.frozen(slots=True)
class SyncDataFrame:
    session: int
    messages: tuple[Envelope, ...]
    done: bool


@attrs.frozen(slots=True)
class SyncHintFrame:
    pass


# ---- dynamic overlay (see gossip/core/overlay.py) ----


@attrs.frozen(slots=True)
class NodeRecord:
    """One node's link state, flooded to every node: who it is, how to dial it, which
    links it has up. A newer ``version`` of the same node replaces an older one."""

    node: int
    incarnation: int
    version: int
    address: str  # its peer_address: a client endpoint description
    neighbours: tuple[int, ...]  # the nodes its links are up to, sorted
    leaving: bool = False


@attrs.frozen(slots=True)
class NodeRecordsFrame:
    records: tuple[NodeRecord, ...]


SyncFrame = SyncQueryFrame | SyncReplyFrame | SyncWantFrame | SyncDataFrame | SyncHintFrame

PeerFrame = GossipFrame | IHaveFrame | GraftFrame | PruneFrame | SyncFrame | NodeRecordsFrame
