"""What the core asks its caller to do.

The caller carries out the effects of one event, in order, before it hands the
core the next event (as etcd raft's Ready/Advance): ``Persist`` (or
``PersistBatch``) first, so that a message is in the store before anyone can
ask for it, then ``Send``.
"""

from __future__ import annotations

from itertools import repeat

import attrs

from gossip.core.frames import PeerFrame
from gossip.core.message import Message


@attrs.frozen(slots=True)
class Persist:
    message: Message


@attrs.frozen(slots=True)
class PersistBatch:
    """Store these messages, in order: the new messages of one received frame, as its
    columns (``ids[i]``, ``bodies[i]``, ``paths[i]``: one message), all received at
    ``received_at``. No object per message: the store encodes the columns."""

    ids: tuple[bytes, ...]
    bodies: tuple[bytes, ...]
    paths: tuple[tuple[int, ...], ...]
    received_at: float

    @property
    def messages(self) -> tuple[Message, ...]:
        """The batch as ``Message`` records (for readers such as tests, not the store)."""
        return tuple(map(Message, self.ids, self.bodies, repeat(self.received_at), self.paths))


@attrs.frozen(slots=True)
class Send:
    peer: int
    frame: PeerFrame


# Why a peer was disconnected for breaking the rules (the keys of the node's
# "disconnects" counters, in the order shown; the link layer adds its own).
FORGED_ID = "forged_id"  # a message whose id is not the hash of its body
BAD_MESSAGE = "bad_message"  # an id of the wrong length, an empty or non-UTF-8 body
OVERSIZED_BATCH = "oversized_batch"  # more messages or ids in one frame than honest nodes send
BAD_IDS = "bad_ids"  # ids of the wrong length, origins not parallel to ids
UNSOLICITED_SYNC = "unsolicited_sync_data"  # SyncData for no session this node started
BAD_SYNC_REQUEST = "bad_sync_request"  # a sync query or want out of bounds
NOT_UP = "frame_before_link_up"
DISCONNECTS = (
    FORGED_ID,
    BAD_MESSAGE,
    OVERSIZED_BATCH,
    BAD_IDS,
    UNSOLICITED_SYNC,
    BAD_SYNC_REQUEST,
    NOT_UP,
)


@attrs.frozen(slots=True)
class DropPeer:
    """The peer broke the protocol: close its link, log why, count ``kind``."""

    peer: int
    reason: str
    kind: str = BAD_MESSAGE


@attrs.frozen(slots=True)
class StreamMessages:
    """Send ``peer`` the messages with these ids and every message under these
    fingerprint-tree nodes, as ``SyncData`` frames for ``session``, the last one
    marked done. Streaming is paced by the link, so it is the caller's job."""

    peer: int
    session: int
    ids: tuple[bytes, ...]
    ranges: tuple[int, ...]


@attrs.frozen(slots=True)
class Dial:
    """Keep a link to ``peer`` (dynamic overlay): dial ``address`` until it is up, and
    again whenever it goes down, until a ``Hangup``. An empty address: accept the
    peer's own dial (its link is kept while up) without dialing it."""

    peer: int
    address: str


@attrs.frozen(slots=True)
class Hangup:
    """Stop keeping a link to ``peer`` (dynamic overlay): stop dialing, close it."""

    peer: int
    reason: str


Effect = Persist | PersistBatch | Send | DropPeer | StreamMessages | Dial | Hangup
