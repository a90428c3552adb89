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


@attrs.frozen(slots=True)
class GraftFrame:
    ids: tuple[bytes, ...]


@attrs.frozen(slots=True)
class PruneFrame:
    pass


PeerFrame = GossipFrame | IHaveFrame | GraftFrame | PruneFrame
