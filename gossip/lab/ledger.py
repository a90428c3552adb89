"""What the lab's checker knows about every node's listing, kept up to date as it goes.

A soak runs for hours: re-reading every node's whole listing at every heal costs
what was ever sent (tens of thousands of messages a node after half an hour), and
on a loaded machine that outgrew any deadline. A node lists only what it holds
durably, and that prefix of its arrival order never changes (a restart recovers
it as it was), so each node is read once, from where the last read stopped.

Per message the ledger keeps one bit per node that listed it; per node, the
acknowledged ids it has not listed yet (small: only what is still in flight). A
listed row is checked on its own: its id must be the hash of its body (so a wrong
body is caught without keeping the bodies), and a node that lists an id twice has
a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable

from gossip.core.message import id_text, message_id


class Ledger:
    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = tuple(nodes)
        self.acked: set[bytes] = set()
        # raw id -> bit (1 << node) for each node that listed it
        self.seen: dict[bytes, int] = {}
        # node -> acknowledged ids it has not listed yet
        self.lacking: dict[int, set[bytes]] = {n: set() for n in self.nodes}
        # node -> how many of its rows have been read (its next listing position)
        self.position: dict[int, int] = dict.fromkeys(self.nodes, 0)
        self.duplicates: dict[int, int] = dict.fromkeys(self.nodes, 0)
        self.wrong_rows = 0  # listed rows whose id is not the hash of their body

    def ack(self, mid: bytes) -> None:
        """A node acknowledged the message with raw id ``mid``."""
        if mid in self.acked:
            return
        self.acked.add(mid)
        mask = self.seen.get(mid, 0)
        for n in self.nodes:
            if not mask & (1 << n):
                self.lacking[n].add(mid)

    def listed(self, node: int, start: int, rows: Iterable[tuple[str, str]], end: int) -> None:
        """``rows`` (id text, body) are ``node``'s listing from position ``start``; the
        next read starts at ``end``."""
        if start < self.position[node]:
            raise ValueError(f"node {node} read again from {start}, not {self.position[node]}")
        bit = 1 << node
        lacking = self.lacking[node]
        for text, body in rows:
            mid = message_id(body.encode())
            if id_text(mid) != text:
                self.wrong_rows += 1
                continue
            mask = self.seen.get(mid, 0)
            if mask & bit:
                self.duplicates[node] += 1
                continue
            self.seen[mid] = mask | bit
            lacking.discard(mid)
        self.position[node] = end

    def forget(self, node: int) -> None:
        """``node`` lists fewer rows than were read from it (its log was cut): read it
        again from the start."""
        bit = 1 << node
        for mid, mask in self.seen.items():
            if mask & bit:
                self.seen[mid] = mask & ~bit
        self.lacking[node] = {mid for mid in self.acked if not self.seen.get(mid, 0) & bit}
        self.position[node] = 0
        self.duplicates[node] = 0
