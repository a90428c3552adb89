"""Dissemination rules: which neighbours get a message a node has just stored.

A strategy sees the node's view (its id and which neighbours are up) and
returns ``Send`` effects. It never stores anything; ``GossipCore`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, pairwise
from operator import ne
from typing import Protocol

from gossip.core.effects import Effect, Send
from gossip.core.frames import Envelope, GossipFrame, PeerFrame
from gossip.core.message import Message


class MessageReader(Protocol):
    def __contains__(self, mid: bytes) -> bool: ...

    def holds_all(self, mids: Iterable[bytes]) -> bool:
        """Whether every one of ``mids`` is held (one C-level set operation)."""
        ...

    def get(self, mid: bytes) -> Message | None: ...


def group_by_path(frame: GossipFrame) -> Mapping[tuple[int, ...], Sequence[int]]:
    """path -> the rows of ``frame`` with that path, in order (first seen first). The
    messages of one path have one origin and one sender, so they go to the same
    neighbours: a relay decides once per path, not once per message. A sender writes
    a path's messages together, so a frame is a few runs of one path: the rows are
    found a run at a time (the comparisons of neighbouring paths are made in C)."""
    paths = frame.paths
    n = len(paths)
    if not n:
        return {}
    if paths.count(paths[0]) == n:
        return {paths[0]: range(n)}
    starts = [0, *compress(range(1, n), map(ne, paths[1:], paths[:-1])), n]
    groups: dict[tuple[int, ...], list[int]] = {}
    for start, stop in pairwise(starts):
        rows = groups.get(paths[start])
        if rows is None:
            groups[paths[start]] = list(range(start, stop))
        else:
            rows += range(start, stop)
    return groups


class Dissemination(Protocol):
    name: str

    def bind(self, store: MessageReader) -> None:
        """Called once by the core: where to read held messages from."""
        ...

    def on_new(self, env: Envelope, sender: int | None, up: frozenset[int]) -> list[Effect]:
        """``env`` was just stored; ``sender`` is None for a local submit."""
        ...

    def on_new_batch(
        self, frame: GossipFrame, sender: int | None, up: frozenset[int]
    ) -> list[Effect]:
        """Every message of ``frame`` was just stored (in that order), all from ``sender``:
        what ``on_new`` gives for each, with one ``Send`` per neighbour and group of
        messages that share their targets rather than one per message."""
        ...

    def on_duplicate(self, env: Envelope, sender: int) -> list[Effect]:
        """``env`` carries the id of a held message: a copy. Only its path is checked (it
        ends with ``sender``); its body is not (the core keeps nothing of it)."""
        ...

    def on_control(self, peer: int, frame: PeerFrame) -> list[Effect]: ...

    def on_peer_up(self, peer: int) -> list[Effect]: ...

    def on_peer_down(self, peer: int) -> list[Effect]: ...

    def on_tick(self, now: float) -> list[Effect]: ...

    def on_graph(self, graph: Mapping[int, frozenset[int]]) -> list[Effect]:
        """The dynamic overlay's live graph changed (node -> its neighbours, each edge
        named by both ends' records); never called with the static overlay."""
        ...


class Flood:
    """The seed's rule: forward to every up neighbour not already on the path.

    The forwarded copy carries the path with this node's id appended, so a
    neighbour that already relayed the message is never sent it again.
    """

    name = "flood"

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id

    def bind(self, store: MessageReader) -> None:
        pass

    def on_new(self, env: Envelope, sender: int | None, up: frozenset[int]) -> list[Effect]:
        return self.on_new_batch(GossipFrame((env,)), sender, up)

    def on_new_batch(
        self, frame: GossipFrame, sender: int | None, up: frozenset[int]
    ) -> list[Effect]:
        effects: list[Effect] = []
        for path, rows in group_by_path(frame).items():
            targets = [p for p in up if p != sender and p not in path]
            if targets:
                out = frame.select(rows, (*path, self.node_id))
                effects += [Send(p, out) for p in sorted(targets)]
        return effects

    def on_duplicate(self, env: Envelope, sender: int) -> list[Effect]:
        return []

    def on_control(self, peer: int, frame: PeerFrame) -> list[Effect]:
        return []

    def on_peer_up(self, peer: int) -> list[Effect]:
        return []

    def on_peer_down(self, peer: int) -> list[Effect]:
        return []

    def on_tick(self, now: float) -> list[Effect]:
        return []

    def on_graph(self, graph: Mapping[int, frozenset[int]]) -> list[Effect]:
        return []
