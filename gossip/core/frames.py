"""Peer frames as the core sees them, independent of the wire encoding.

``gossip.wire.codec`` maps these to and from protobuf; link-level frames
(Hello, Reject, Ping) never reach the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import NamedTuple

import attrs


@attrs.frozen(slots=True)
class Envelope:
    """A message in flight: what one node hands to a neighbour."""

    id: bytes
    body: bytes
    path: tuple[int, ...]


class GossipFrame:
    """A batch of messages pushed to a neighbour, held as columns.

    The hot path reads the columns (``ids``, ``bodies``, ``paths``) and never
    builds an ``Envelope`` per message; ``messages`` builds them on first use
    (tests, the simulator, re-sync). ``heads`` is what the wire codec kept of
    each received envelope: its encoded id and body fields, so that a relayed
    message is sent on as those bytes plus its new path (see
    ``gossip.wire.codec.gossip_pieces``); None when the frame was built from
    objects. Two frames are equal when their messages are.
    """

    __slots__ = ("_messages", "bodies", "heads", "ids", "paths")

    ids: tuple[bytes, ...]
    bodies: tuple[bytes, ...]
    paths: tuple[tuple[int, ...], ...]
    heads: tuple[bytes, ...] | None
    _messages: tuple[Envelope, ...] | None

    def __init__(self, messages: tuple[Envelope, ...]) -> None:
        self.ids = tuple(m.id for m in messages)
        self.bodies = tuple(m.body for m in messages)
        self.paths = tuple(m.path for m in messages)
        self.heads = None
        self._messages = messages

    @classmethod
    def of_columns(
        cls,
        ids: tuple[bytes, ...],
        bodies: tuple[bytes, ...],
        paths: tuple[tuple[int, ...], ...],
        heads: tuple[bytes, ...] | None = None,
    ) -> GossipFrame:
        """A frame from parallel columns (``heads``: see the class)."""
        frame = cls.__new__(cls)
        frame.ids, frame.bodies, frame.paths, frame.heads = ids, bodies, paths, heads
        frame._messages = None
        return frame

    def select(self, rows: Sequence[int], path: tuple[int, ...] | None = None) -> GossipFrame:
        """The messages at ``rows`` (ascending, no repeats); all with ``path`` when given."""
        ids, bodies, heads = self.ids, self.bodies, self.heads
        if len(rows) == len(ids):  # every row, in order (rows are ascending)
            paths = self.paths if path is None else (path,) * len(rows)
            return GossipFrame.of_columns(ids, bodies, paths, heads)
        paths = (path,) * len(rows) if path is not None else tuple(self.paths[i] for i in rows)
        if len(rows) == 1:
            row = rows[0]
            heads_of = None if heads is None else (heads[row],)
            return GossipFrame.of_columns((ids[row],), (bodies[row],), paths, heads_of)
        pick = itemgetter(*rows)  # a tuple of the items, for two rows or more
        heads_of = None if heads is None else pick(heads)
        return GossipFrame.of_columns(pick(ids), pick(bodies), paths, heads_of)

    @property
    def messages(self) -> tuple[Envelope, ...]:
        if self._messages is None:
            self._messages = tuple(map(Envelope, self.ids, self.bodies, self.paths))
        return self._messages

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GossipFrame):
            return NotImplemented
        return (self.ids, self.bodies, self.paths) == (other.ids, other.bodies, other.paths)

    def __hash__(self) -> int:
        return hash((self.ids, self.bodies, self.paths))

    def __repr__(self) -> str:
        return f"GossipFrame(messages={self.messages!r})"


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


class FpNode(NamedTuple):
    """A fingerprint-tree node: its key and the (count, sum) of the ids under it.

    A named tuple rather than an attrs class: a re-sync walk builds thousands
    (tree reads, decoded queries and replies), and a tuple is built in half the
    time of a frozen attrs instance."""

    key: int
    # The field shadows tuple.count (a method) on purpose: the wire names it so.
    count: int  # type: ignore[assignment]
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

    def __len__(self) -> int:
        return len(self.messages)


@attrs.frozen(slots=True)
class SyncHintFrame:
    """The sender learned messages by re-sync; ``ids`` names them (up to
    ``sync.MAX_HINT_IDS``; none from a node of an older version)."""

    ids: tuple[bytes, ...] = ()


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
