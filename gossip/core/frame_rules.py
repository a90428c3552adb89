"""Bounds every peer frame must keep before the core spends anything on it.

A frame is already bounded in bytes by the link (``gossip.node.frame_limit``);
these rules bound what the bytes may hold: how many messages, how many ids and
origins, and the shape of each id. Each bound sits above anything an honest
node of this version sends (the constants say why), so only a broken or
hostile peer breaks one, and it is disconnected and counted.
"""

from __future__ import annotations

from gossip.core.effects import BAD_IDS, OVERSIZED_BATCH
from gossip.core.frames import (
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    PeerFrame,
    PruneFrame,
    SyncDataFrame,
    SyncHintFrame,
)
from gossip.core.message import ID_BYTES
from gossip.core.plumtree import IDS_PER_FRAME
from gossip.core.sync import MAX_HINT_IDS

# Messages in one Gossip or SyncData frame. Honest senders split a batch at
# 256 KiB of encoded envelopes (gossip.node.GOSSIP_FRAME_BYTES), and an envelope
# is at least 22 bytes (16-byte id, 1-byte body, field tags): at most 11,916 per
# frame; graft replies and SyncData frames hold far fewer (4,097 and 3,856).
MAX_MESSAGES_PER_FRAME = 16_384


def frame_problem(frame: PeerFrame, members: int) -> tuple[str, str] | None:
    """(kind, reason) when ``frame`` breaks a bound, else None. ``members`` is the
    number of configured nodes (a Prune names at most every origin once)."""
    if isinstance(frame, GossipFrame | SyncDataFrame):
        if len(frame) > MAX_MESSAGES_PER_FRAME:
            return OVERSIZED_BATCH, (
                f"{len(frame)} messages in one frame (at most {MAX_MESSAGES_PER_FRAME})"
            )
        return None
    if isinstance(frame, IHaveFrame | GraftFrame):
        name = "IHave" if isinstance(frame, IHaveFrame) else "Graft"
        if len(frame.ids) > IDS_PER_FRAME:
            return OVERSIZED_BATCH, f"{len(frame.ids)} ids in one {name} (at most {IDS_PER_FRAME})"
        if not set(map(len, frame.ids)) <= {ID_BYTES}:
            return BAD_IDS, f"an id in a {name} is not {ID_BYTES} bytes"
        if isinstance(frame, IHaveFrame) and len(frame.origins) > len(frame.ids):
            return BAD_IDS, f"{len(frame.origins)} origins for {len(frame.ids)} ids in an IHave"
        return None
    if isinstance(frame, SyncHintFrame):
        if len(frame.ids) > MAX_HINT_IDS:
            return OVERSIZED_BATCH, f"{len(frame.ids)} ids in one SyncHint (at most {MAX_HINT_IDS})"
        if not set(map(len, frame.ids)) <= {ID_BYTES}:
            return BAD_IDS, f"an id in a SyncHint is not {ID_BYTES} bytes"
        return None
    if isinstance(frame, PruneFrame) and len(frame.origins) > members:
        return OVERSIZED_BATCH, f"{len(frame.origins)} origins in one Prune ({members} nodes)"
    return None
