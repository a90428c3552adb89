"""Frames and bytes on the peer wire, per neighbour, frame kind and direction.

Plain integer counters bumped on the hot path (one dict lookup per frame);
``gclient --status`` shows them summed per kind and the Prometheus collector
(``gossip.web.metrics``) reads them per neighbour and kind at scrape time.
"""

from __future__ import annotations

import attrs

from gossip.core.frames import (
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    NodeRecordsFrame,
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
    NodeRecordsFrame: "node_records",
}
# Kinds that carry message bodies; the rest are control.
PAYLOAD_KINDS = frozenset({"gossip", "sync_data"})
# Kinds of the re-sync exchange (their bytes are the re-sync volume).
SYNC_KINDS = frozenset(k for k in KIND_NAMES.values() if k.startswith("sync_"))


@attrs.define
class KindCounts:
    frames_out: int = 0
    bytes_out: int = 0
    messages_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    messages_in: int = 0

    def add(self, other: KindCounts) -> None:
        for field in attrs.fields(KindCounts):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class Traffic:
    """Counters keyed by (neighbour, kind): bounded by neighbours x kinds."""

    def __init__(self) -> None:
        self.per_peer: dict[tuple[int, str], KindCounts] = {}

    def _counts(self, peer: int, name: str) -> KindCounts:
        c = self.per_peer.get((peer, name))
        if c is None:
            c = self.per_peer[(peer, name)] = KindCounts()
        return c

    @property
    def kinds(self) -> dict[str, KindCounts]:
        """Counts per kind, summed over neighbours (computed: for status, not the hot path)."""
        out: dict[str, KindCounts] = {}
        for (_, name), c in self.per_peer.items():
            total = out.get(name)
            if total is None:
                total = out[name] = KindCounts()
            total.add(c)
        return out

    def sent(self, peer: int, frame: PeerFrame, size: int) -> None:
        messages = len(frame) if isinstance(frame, GossipFrame | SyncDataFrame) else 0
        self.sent_kind(peer, KIND_NAMES[type(frame)], size, messages)

    def sent_kind(self, peer: int, name: str, size: int, messages: int = 0) -> None:
        c = self._counts(peer, name)
        c.frames_out += 1
        c.bytes_out += size
        c.messages_out += messages

    def received(self, peer: int, frame: PeerFrame, size: int) -> None:
        c = self._counts(peer, KIND_NAMES[type(frame)])
        c.frames_in += 1
        c.bytes_in += size
        if isinstance(frame, GossipFrame | SyncDataFrame):
            c.messages_in += len(frame)

    def rows(self) -> list[dict[str, int | str]]:
        return [{"kind": k, **attrs.asdict(c)} for k, c in sorted(self.kinds.items())]
