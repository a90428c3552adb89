"""Messages in memory only: for tests, simulation and nodes run without a data directory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sortedcontainers import SortedList
from twisted.internet.defer import Deferred, succeed

from gossip.core.message import Message
from gossip.store.interface import StoreError, ids_between


class MemoryStore:
    def __init__(self) -> None:
        self._by_id: dict[bytes, Message] = {}
        self._order: list[bytes] = []
        self._sorted: SortedList = SortedList()
        self._unsorted: list[bytes] = []  # added since the last ids_between (see there)

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._by_id

    def __len__(self) -> int:
        return len(self._order)

    def add(self, message: Message) -> bool:
        if message.id in self._by_id:
            return False
        self._by_id[message.id] = message
        self._order.append(message.id)
        self._unsorted.append(message.id)
        return True

    def add_many(self, messages: tuple[Message, ...]) -> int:
        return sum(self.add(m) for m in messages)

    def ids(self) -> Iterator[bytes]:
        return iter(self._order)

    def get(self, mid: bytes) -> Message | None:
        return self._by_id.get(mid)

    def ids_between(self, lo: bytes, hi: bytes, limit: int) -> list[bytes]:
        return ids_between(self._sorted, self._unsorted, lo, hi, limit)

    def stats(self) -> dict[str, Any]:
        return {
            "policy": "memory",
            "records": len(self._order),
            "fsyncs": 0,
            "last_fsync_seconds": 0.0,
        }

    def durable_count(self) -> int:
        return len(self._order)  # as durable as this store gets

    def ids_from(self, start: int, limit: int) -> list[bytes]:
        start = max(start, 0)
        return self._order[start : start + max(limit, 0)]

    def scan(self, start: int) -> Iterator[Message]:
        by_id, order = self._by_id, self._order
        for i in range(max(start, 0), len(order)):
            yield by_id[order[i]]

    def when_durable(self) -> Deferred[None]:
        return succeed(None)  # nothing is ever durable here; acks need not wait

    def write_buffered(self) -> None:
        pass

    def when_broken(self) -> Deferred[StoreError]:
        return Deferred()  # memory does not fail

    def close(self) -> None:
        pass
