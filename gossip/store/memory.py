"""Messages in memory only: for tests, simulation and nodes run without a data directory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

from twisted.internet.defer import Deferred, succeed

from gossip.core.message import Message
from gossip.store.id_index import IdIndex
from gossip.store.interface import StoreError


class MemoryStore(IdIndex):
    """The ids in the shared ``IdIndex`` (its base); beside them, by position, the
    bodies, paths and arrival times as columns, as ``add_many`` takes them (a ``Message``
    is made only for a reader: ``get``, ``scan``)."""

    def __init__(self) -> None:
        super().__init__()
        self._bodies: list[bytes] = []
        self._paths: list[tuple[int, ...]] = []
        self._times: list[float] = []

    def add(self, message: Message) -> bool:
        if self.add_id(message.id) is None:
            return False
        self._bodies.append(message.body)
        self._paths.append(message.path)
        self._times.append(message.received_at)
        return True

    def add_many(
        self,
        ids: Sequence[bytes],
        bodies: Sequence[bytes],
        paths: Sequence[tuple[int, ...]],
        received_at: float,
    ) -> int:
        """``add`` for each message of a batch received together, in order; how many
        were new. All or nothing: an id of the wrong length (``ValueError``) adds none."""
        first = len(self)
        try:
            rows = self.add_ids(ids)
        except BaseException:
            self.truncate_ids(first)
            raise
        taken = len(self) - first
        if rows is not None and taken < len(ids):  # some held already, or repeated
            bodies = [bodies[row] for row in rows]
            paths = [paths[row] for row in rows]
        self._bodies += bodies
        self._paths += paths
        self._times += repeat(received_at, taken)
        return taken

    def get(self, mid: bytes) -> Message | None:
        n = self.position(mid)
        if n is None:
            return None
        return Message(mid, self._bodies[n], self._times[n], self._paths[n])

    def stats(self) -> dict[str, Any]:
        return {
            "policy": "memory",
            "records": len(self),
            "fsyncs": 0,
            "last_fsync_seconds": 0.0,
        }

    def durable_count(self) -> int:
        return len(self)  # as durable as this store gets

    def scan(self, start: int) -> Iterator[Message]:
        bodies, times, paths = self._bodies, self._times, self._paths
        for n in range(max(start, 0), len(self)):
            yield Message(self.id_at(n), bodies[n], times[n], paths[n])

    def when_durable(self) -> Deferred[None]:
        return succeed(None)  # nothing is ever durable here; acks need not wait

    def write_buffered(self) -> None:
        pass

    def when_broken(self) -> Deferred[StoreError]:
        return Deferred()  # memory does not fail

    def close(self) -> None:
        pass
