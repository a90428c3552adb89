"""Messages in memory only: for tests, simulation and nodes run without a data directory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet.defer import Deferred, succeed

from gossip.core.message import Message
from gossip.store.id_index import IdIndex
from gossip.store.interface import StoreError


class MemoryStore(IdIndex):
    """The ids in the shared ``IdIndex`` (its base); the messages in a list by position."""

    def __init__(self) -> None:
        super().__init__()
        self._messages: list[Message] = []

    def add(self, message: Message) -> bool:
        if self.add_id(message.id) is None:
            return False
        self._messages.append(message)
        return True

    def add_many(self, messages: Iterable[Message]) -> int:
        """``add`` for each message, in order; how many were new."""
        return sum(self.add(m) for m in messages)

    def get(self, mid: bytes) -> Message | None:
        n = self.position(mid)
        return None if n is None else self._messages[n]

    def stats(self) -> dict[str, Any]:
        return {
            "policy": "memory",
            "records": len(self._messages),
            "fsyncs": 0,
            "last_fsync_seconds": 0.0,
        }

    def durable_count(self) -> int:
        return len(self._messages)  # as durable as this store gets

    def scan(self, start: int) -> Iterator[Message]:
        messages = self._messages
        for i in range(max(start, 0), len(messages)):
            yield messages[i]

    def when_durable(self) -> Deferred[None]:
        return succeed(None)  # nothing is ever durable here; acks need not wait

    def write_buffered(self) -> None:
        pass

    def when_broken(self) -> Deferred[StoreError]:
        return Deferred()  # memory does not fail

    def close(self) -> None:
        pass
