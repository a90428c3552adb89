"""Frames and bytes on the peer wire, per frame kind and direction, for status and benchmarks."""

from __future__ import annotations

import attrs

from gossip.core.frames import (
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    PeerFrame,
    PruneFrame,
    SyncDataFrame,
    SyncHintFrame,
    SyncQueryFrame,
    SyncReplyFrame,
    SyncWantFrame,
)

KIND_NAMES: dict[type, str] = {
    GossipFrame: "gossip",
    IHaveFrame: "ihave",
    GraftFrame: "graft",
    PruneFrame: "prune",
    SyncQueryFrame: "sync_query",
    SyncReplyFrame: "sync_reply",
    SyncWantFrame: "sync_want",
    SyncDataFrame: "sync_data",
    SyncHintFrame: "sync_hint",
}
# Kinds that carry message bodies; the rest are control.
PAYLOAD_KINDS = frozenset({"gossip", "sync_data"})


@attrs.define
class KindCounts:
    frames_out: int = 0
    bytes_out: int = 0
    messages_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    messages_in: int = 0


class Traffic:
    def __init__(self) -> None:
        self.kinds: dict[str, KindCounts] = {}

    def _counts(self, name: str) -> KindCounts:
        c = self.kinds.get(name)
        if c is None:
            c = self.kinds[name] = KindCounts()
        return c

    def sent(self, frame: PeerFrame, size: int) -> None:
        messages = len(frame.messages) if isinstance(frame, GossipFrame | SyncDataFrame) else 0
        self.sent_kind(KIND_NAMES[type(frame)], size, messages)

    def sent_kind(self, name: str, size: int, messages: int = 0) -> None:
        c = self._counts(name)
        c.frames_out += 1
        c.bytes_out += size
        c.messages_out += messages

    def received(self, frame: PeerFrame, size: int) -> None:
        c = self._counts(KIND_NAMES[type(frame)])
        c.frames_in += 1
        c.bytes_in += size
        if isinstance(frame, GossipFrame | SyncDataFrame):
            c.messages_in += len(frame.messages)

    def rows(self) -> list[dict[str, int | str]]:
        return [{"kind": k, **attrs.asdict(c)} for k, c in sorted(self.kinds.items())]
