"""Plumtree: eager push along a spanning tree, lazy push of ids on the other links.

After "Epidemic Broadcast Trees" (Leitão, Pereira, Rodrigues, 2007). Every link
starts *eager* (so the first messages flood); a link that delivers a
duplicate is pruned to *lazy* at both ends, so the eager links shrink to a
spanning tree that all sources share. Over lazy links a node only announces
the ids it received (``IHave``, batched per tick). A node that hears of an id
but does not get the message within ``graft_timeout`` asks the announcer for
it (``Graft``), which also makes that link eager again: the tree heals where
it broke. The path a message carries still excludes nodes that relayed it.

Steady state costs n - 1 payload sends per broadcast instead of flooding's
~2|E| - (n - 1), plus ids on the lazy links.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from gossip.core.dissemination import MessageReader
from gossip.core.effects import Effect, Send
from gossip.core.frames import (
    Envelope,
    GossipFrame,
    GraftFrame,
    IHaveFrame,
    PeerFrame,
    PruneFrame,
)

# Ids per IHave or Graft frame; a full batch is sent without waiting for the tick.
IDS_PER_FRAME = 4096
# Payload bytes per Gossip frame answering a Graft.
GRAFT_REPLY_BYTES = 256 * 1024


@attrs.define
class _Missing:
    deadline: float
    announcers: list[int]


class Plumtree:
    name = "plumtree"

    def __init__(
        self,
        node_id: int,
        *,
        graft_timeout: float = 0.5,
        graft_retry: float = 0.25,
        max_missing: int = 100_000,
    ) -> None:
        self.node_id = node_id
        self.graft_timeout = graft_timeout
        self.graft_retry = graft_retry
        self.max_missing = max_missing
        self.eager: set[int] = set()
        self.lazy: set[int] = set()
        self.now = 0.0
        self._ihave: dict[int, list[bytes]] = {}
        # Ids announced to us but not received, oldest first (bounded).
        self.missing: dict[bytes, _Missing] = {}
        self._store: MessageReader | None = None

    def bind(self, store: MessageReader) -> None:
        self._store = store

    # -- links -------------------------------------------------------------

    def on_peer_up(self, peer: int) -> list[Effect]:
        self.lazy.discard(peer)
        self.eager.add(peer)
        return []

    def on_peer_down(self, peer: int) -> list[Effect]:
        self.eager.discard(peer)
        self.lazy.discard(peer)
        self._ihave.pop(peer, None)
        return []

    def _make_eager(self, peer: int) -> None:
        if peer in self.lazy:
            self.lazy.discard(peer)
            self.eager.add(peer)

    # -- messages ----------------------------------------------------------

    def on_new(self, env: Envelope, sender: int | None, up: frozenset[int]) -> list[Effect]:
        self.missing.pop(env.id, None)
        if sender is not None:
            self._make_eager(sender)
        path = env.path
        effects: list[Effect] = []
        targets = sorted(p for p in self.eager if p != sender and p not in path)
        if targets:
            frame = GossipFrame((Envelope(env.id, env.body, (*path, self.node_id)),))
            effects = [Send(p, frame) for p in targets]
        for p in self.lazy:
            if p != sender and p not in path:
                batch = self._ihave.setdefault(p, [])
                batch.append(env.id)
                if len(batch) >= IDS_PER_FRAME:
                    effects.append(Send(p, IHaveFrame(tuple(batch))))
                    batch.clear()
        return effects

    def on_duplicate(self, mid: bytes, sender: int) -> list[Effect]:
        # A second copy came over this link: the link closes a cycle of the tree.
        if sender in self.eager:
            self.eager.discard(sender)
            self.lazy.add(sender)
            return [Send(sender, PruneFrame())]
        return []

    def on_control(self, peer: int, frame: PeerFrame) -> list[Effect]:
        if isinstance(frame, IHaveFrame):
            self._announced(peer, frame.ids)
            return []
        if isinstance(frame, PruneFrame):
            if peer in self.eager:
                self.eager.discard(peer)
                self.lazy.add(peer)
            return []
        if isinstance(frame, GraftFrame):
            self._make_eager(peer)
            return [Send(peer, f) for f in self._graft_reply(frame.ids)]
        return []

    def _announced(self, peer: int, ids: tuple[bytes, ...]) -> None:
        store = self._store
        for mid in ids:
            if store is not None and mid in store:
                continue
            entry = self.missing.get(mid)
            if entry is None:
                if len(self.missing) >= self.max_missing:
                    # Forget the oldest: re-sync will still bring it.
                    del self.missing[next(iter(self.missing))]
                self.missing[mid] = _Missing(self.now + self.graft_timeout, [peer])
            elif peer not in entry.announcers:
                entry.announcers.append(peer)

    def _graft_reply(self, ids: tuple[bytes, ...]) -> Iterator[GossipFrame]:
        store = self._store
        if store is None:
            return
        batch: list[Envelope] = []
        size = 0
        for mid in ids:
            m = store.get(mid)
            if m is None:
                continue
            batch.append(Envelope(m.id, m.body, (*m.path, self.node_id)))
            size += len(m.body) + 64
            if size >= GRAFT_REPLY_BYTES:
                yield GossipFrame(tuple(batch))
                batch, size = [], 0
        if batch:
            yield GossipFrame(tuple(batch))

    # -- timers ------------------------------------------------------------

    def on_tick(self, now: float) -> list[Effect]:
        self.now = now
        effects: list[Effect] = []
        for peer, batch in self._ihave.items():
            if batch:
                effects.append(Send(peer, IHaveFrame(tuple(batch))))
        self._ihave.clear()
        grafts: dict[int, list[bytes]] = {}
        links = self.eager | self.lazy
        expired = [mid for mid, e in self.missing.items() if e.deadline <= now]
        for mid in expired:
            entry = self.missing[mid]
            while entry.announcers and entry.announcers[0] not in links:
                entry.announcers.pop(0)
            if not entry.announcers:
                del self.missing[mid]
                continue
            peer = entry.announcers.pop(0)
            entry.deadline = now + self.graft_retry
            self._make_eager(peer)
            grafts.setdefault(peer, []).append(mid)
        for peer, ids in sorted(grafts.items()):
            for i in range(0, len(ids), IDS_PER_FRAME):
                effects.append(Send(peer, GraftFrame(tuple(ids[i : i + IDS_PER_FRAME]))))
        return effects
