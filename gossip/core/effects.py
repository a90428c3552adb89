"""What the core asks its caller to do.

The caller carries out the effects of one event, in order, before it hands the
core the next event (as etcd raft's Ready/Advance): ``Persist`` first, so that
a message is in the store before anyone can ask for it, then ``Send``.
"""

from __future__ import annotations

import attrs

from gossip.core.frames import PeerFrame
from gossip.core.message import Message


@attrs.frozen(slots=True)
class Persist:
    message: Message


@attrs.frozen(slots=True)
class Send:
    peer: int
    frame: PeerFrame


@attrs.frozen(slots=True)
class DropPeer:
    """The peer broke the protocol: close its link and log why."""

    peer: int
    reason: str


@attrs.frozen(slots=True)
class StreamMessages:
    """Send ``peer`` the messages with these ids and every message under these
    fingerprint-tree nodes, as ``SyncData`` frames for ``session``, the last one
    marked done. Streaming is paced by the link, so it is the caller's job."""

    peer: int
    session: int
    ids: tuple[bytes, ...]
    ranges: tuple[int, ...]


Effect = Persist | Send | DropPeer | StreamMessages
