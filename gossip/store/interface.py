"""The one small interface between the node and its message storage.

The core only reads (``__contains__``); the node adapter writes what the core's
``Persist`` effects say and serves client queries. Every implementation keeps
messages in arrival order, numbered from 0, so that a listing can be paged
with a plain integer cursor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from gossip.core.message import Message


class StoreError(Exception):
    """The store cannot be used; the text is one line for the operator."""


class MessageStore(Protocol):
    def __contains__(self, mid: bytes) -> bool: ...

    def holds_any(self, mids: Iterable[bytes]) -> bool:
        """Whether any of ``mids`` is held (a frame's ids at once: see ``IdIndex``)."""
        ...

    def holds_all(self, mids: Iterable[bytes]) -> bool:
        """Whether every one of ``mids`` is held."""
        ...

    def __len__(self) -> int: ...

    def add(self, message: Message) -> bool:
        """Store ``message`` unless its id is already held; say whether it was new."""
        ...

    def add_many(
        self,
        ids: Sequence[bytes],
        bodies: Sequence[bytes],
        paths: Sequence[tuple[int, ...]],
        received_at: float,
    ) -> int:
        """``add`` for each message of a batch in order: the new messages of one received
        frame, as parallel columns, all received at ``received_at`` (what ``PersistBatch``
        carries), at the cost of one append; returns how many were new."""
        ...

    def get(self, mid: bytes) -> Message | None: ...

    def ids(self) -> Iterator[bytes]:
        """Every held id, in any order (to rebuild in-memory summaries at start)."""
        ...

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` held ids in [lo, hi), in id order (for prefix lookups)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for status: at least "policy", "fsyncs", "last_fsync_seconds"."""
        ...

    def durable_count(self) -> int:
        """How many messages, in arrival order, are durable under the fsync policy:
        a node reports a message as delivered (``ListIds``, ``Watch``) only then."""
        ...

    def ids_from(self, start: int, limit: int) -> list[bytes]:
        """Up to ``limit`` ids in arrival order from position ``start``."""
        ...

    def scan(self, start: int) -> Iterator[Message]:
        """Messages in arrival order from position ``start``."""
        ...

    def when_durable(self) -> Deferred[None]:
        """Fires once every message added so far survives a crash (per fsync policy)."""
        ...

    def write_buffered(self) -> None:
        """Hand every message added so far to the OS now (the node calls this before it
        sends them on: persist before send). ``StoreError`` once the store has failed."""
        ...

    def when_broken(self) -> Deferred[StoreError]:
        """Fires, with the error, when the store fails for good (a write or an fsync):
        it then refuses appends, and what a failed write lost is no longer held."""
        ...

    def close(self) -> None: ...
