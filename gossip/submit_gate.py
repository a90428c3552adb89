"""Backpressure on new submits only: while a neighbour's link is full, submits wait.

Reads (``Get``, ``ListMessages``, ``Status``, ``Watch``) and relayed messages
are never held back: only what would add to a full link waits. The wait is
bounded: beyond ``max_waiting_bytes`` of waiting bodies a submit is refused at
once with ``SubmitBusy`` (retryable: nothing was stored). Waiting submits are
taken in arrival order as soon as every link drained, before any new one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

# What a waiting submit costs beside its body (the entry, its Deferred, the AMP box).
ENTRY_COST = 256


class SubmitBusy(Exception):
    """The node takes no new submit for now; the text says why, for the client."""


class SubmitGate:
    def __init__(
        self, max_waiting_bytes: int, schedule: Callable[[Callable[[], None]], object]
    ) -> None:
        self.max_waiting_bytes = max_waiting_bytes
        self._schedule = schedule  # runs a function on a later reactor turn
        self.is_open = True
        self._waiting: deque[tuple[int, Callable[[], Deferred[Any]], Deferred[Any]]] = deque()
        self._waiting_bytes = 0
        self._drain_scheduled = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, body_bytes: int, accept: Callable[[], Deferred[T]]) -> Deferred[T]:
        """``accept()`` now if the gate is open (its exceptions propagate), else once it
        opens (they fail the returned Deferred); raises SubmitBusy when too much waits."""
        if self.is_open and not self._waiting:
            return accept()
        cost = body_bytes + ENTRY_COST
        if self._waiting_bytes + cost > self.max_waiting_bytes:
            raise SubmitBusy(
                f"busy: a neighbour's link is full and {len(self._waiting)} submits"
                f" ({self._waiting_bytes} bytes) already wait for it; retry later"
            )
        d: Deferred[T] = Deferred()
        self._waiting.append((cost, accept, d))
        self._waiting_bytes += cost
        return d

    def close(self) -> None:
        self.is_open = False

    def open(self) -> None:
        self.is_open = True
        if self._waiting and not self._drain_scheduled:
            # Not from inside the link's resumeProducing that reported the drain.
            self._drain_scheduled = True
            self._schedule(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        while self._waiting and self.is_open:
            cost, accept, d = self._waiting.popleft()
            self._waiting_bytes -= cost
            try:
                result = accept()
            except Exception:
                d.errback(Failure())
                continue
            result.chainDeferred(d)
