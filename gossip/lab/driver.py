"""The lab's client: one process inside the lab's client namespace that talks to every
node over AMP (``GossipClient``) and answers the lab over stdin/stdout.

Run as ``ip netns exec <client ns> python -m gossip.lab.driver --config FILE``.
It refuses to run in the namespace of the process that started it (``--outside``)
or in any namespace with a default route, so no lab traffic can leave the lab.

Requests and answers are JSON lines: ``{"seq": 1, "op": "load", ...}`` ->
``{"seq": 1, "ok": true, "result": ...}`` (or ``"ok": false, "error": "..."``).
Operations (arguments in brackets):

- ``load`` [nodes, per_node_rate]: submit continuously to each of ``nodes``,
  ``per_node_rate`` messages a second each (0 or no nodes stops). Only the
  submits a node acknowledges count as acknowledged.
- ``counts``: acknowledged, attempted and failed submits so far.
- ``status`` [nodes]: each node's links (peer, state, times_up) and message
  count; a node that does not answer is null.
- ``wait_links`` [nodes, up, timeout, peers]: wait until every listed link of
  each node is up (``up`` true) or not up (false).
- ``converge`` [nodes, deadline]: wait until each node holds every message
  acknowledged so far; then read each node's listing to its end and report ids
  listed twice, rows whose id is not their body's hash and acknowledged ids
  missing. Each node's listing is read once, from where the last read stopped
  (see ``gossip.lab.ledger``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, stdio, task
from twisted.protocols.basic import LineReceiver

from gossip.client.api import PAGE_LIMIT, GossipClient, NodeUnreachable
from gossip.client.commands import ListMessages
from gossip.config import ClusterConfig, ConfigError, load_config
from gossip.core.message import id_text, message_id
from gossip.lab.ledger import Ledger

# A submit batch, status call or listing page not answered within this is given up
# (the node may be stopped with SIGSTOP); the connection is dropped and redialed.
CALL_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# Submits go out every LOAD_TICK seconds per node, as one SubmitMany.
LOAD_TICK = 0.1
# Body length of the lab's messages (unique, printable).
BODY_CHARS = 100
# Longest request line the driver reads (requests are small).
MAX_REQUEST_BYTES = 1 << 20
POLL_INTERVAL = 0.25
# How long the checker's listing of every node may take after the converge wait, and
# the most a ``converge`` request can take beyond its deadline.
LIST_DEADLINE = 30.0
CONVERGE_EXTRA = LIST_DEADLINE + CALL_TIMEOUT


def network_namespace() -> int:
    """The inode of this process's network namespace (0 if it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def has_route_out(route_table: str | None = None) -> bool:
    """Whether this namespace has a default IPv4 route (a way out of the lab), from
    ``/proc/net/route`` (or ``route_table``, text in its format)."""
    if route_table is None:
        try:
            with open("/proc/net/route") as f:
                route_table = f.read()
        except OSError:
            return True  # cannot tell: assume the worst
    rows = [line.split() for line in route_table.splitlines()[1:]]
    return any(len(row) > 2 and row[1] == "00000000" for row in rows)


def unsafe_namespace(outside: int) -> str | None:
    """Why this process must not talk to lab addresses from here, or None."""
    if network_namespace() in (0, outside):
        return "refusing to run outside the lab's client namespace"
    if has_route_out():
        return "refusing to run in a namespace with a default route"
    return None


class Driver:
    def __init__(self, reactor: Any, config: ClusterConfig, tag: str) -> None:
        self.reactor = reactor
        self.config = config
        self.tag = tag
        self.clients: dict[int, GossipClient] = {}
        self.ledger = Ledger(config.nodes)
        self.wrong_ids = 0  # acknowledged with an id that is not the body's hash
        self.attempted = 0
        self.failed = 0
        self.rate = 0.0
        self.targets: set[int] = set()
        self.loops: dict[int, defer.Deferred[None]] = {}
        self.counter = 0

    # -- connections -----------------------------------------------------------

    async def client(self, node: int) -> GossipClient:
        c = self.clients.get(node)
        if c is not None and c.proto.transport is not None:  # AMP clears it on loss
            return c
        spec = self.config.node(node)
        c = await GossipClient.connect_endpoint(self.reactor, spec.client_address, CONNECT_TIMEOUT)
        self.clients[node] = c
        return c

    def drop(self, node: int) -> None:
        c = self.clients.pop(node, None)
        if c is not None:
            c.close()

    async def call(self, node: int, fn: Callable[[GossipClient], Awaitable[Any]]) -> Any:
        """``fn(client)`` with a deadline; the connection is dropped on any failure."""
        try:
            c = await self.client(node)
            d = defer.Deferred.fromCoroutine(_await(fn(c)))
            return await d.addTimeout(CALL_TIMEOUT, self.reactor)
        except Exception:
            self.drop(node)
            raise

    async def try_call(self, node: int, fn: Callable[[GossipClient], Awaitable[Any]]) -> Any:
        try:
            return await self.call(node, fn)
        except (NodeUnreachable, defer.TimeoutError, ConnectionError, defer.CancelledError):
            return None
        except Exception:
            return None

    # -- load ------------------------------------------------------------------

    def body(self, node: int) -> str:
        self.counter += 1
        head = f"{self.tag}:{node}:{self.counter}:"
        return head + "x" * max(0, BODY_CHARS - len(head))

    def set_load(self, nodes: list[int], per_node_rate: float) -> None:
        self.rate = per_node_rate
        self.targets = set(nodes) if per_node_rate > 0 else set()
        for n in self.targets:
            if n not in self.loops:
                self.loops[n] = defer.Deferred.fromCoroutine(self.load_loop(n))

    async def load_loop(self, node: int) -> None:
        carry = 0.0
        while node in self.targets:
            carry += self.rate * LOAD_TICK
            count, carry = int(carry), carry - int(carry)
            if count:
                await self.submit(node, [self.body(node) for _ in range(count)])
            await task.deferLater(self.reactor, LOAD_TICK)
        del self.loops[node]

    async def submit(self, node: int, bodies: list[str]) -> None:
        self.attempted += len(bodies)

        async def send(c: GossipClient) -> list[Any]:
            ds = [defer.Deferred.fromCoroutine(c.submit_message(b)) for b in bodies]
            results: list[Any] = await defer.DeferredList(ds, consumeErrors=True)
            return results

        try:
            results = await self.call(node, send)
        except Exception:
            self.failed += len(bodies)
            await task.deferLater(self.reactor, 0.5)  # the node is down: do not spin
            return
        for body, (ok, value) in zip(bodies, results, strict=True):
            if ok:
                mid = message_id(body.encode())
                self.ledger.ack(mid)
                self.wrong_ids += str(value) != id_text(mid)
            else:
                self.failed += 1

    # -- reading nodes -----------------------------------------------------------

    async def status(self, nodes: list[int]) -> dict[str, Any]:
        async def one(n: int) -> Any:
            s = await self.try_call(n, lambda c: c.status())
            if s is None:
                return None
            links = [
                {"peer": lk["peer"], "state": lk["state"], "times_up": lk["times_up"]}
                for lk in s["links"]
            ]
            return {"message_count": s["message_count"], "links": links}

        results = await defer.gatherResults([defer.Deferred.fromCoroutine(one(n)) for n in nodes])
        return {str(n): r for n, r in zip(nodes, results, strict=True)}

    async def wait_links(
        self, nodes: list[int], up: bool, timeout: float, peers: list[int] | None
    ) -> dict[str, Any]:
        start = time.monotonic()
        while True:
            statuses = await self.status(nodes)
            pending = []
            for n, s in statuses.items():
                if s is None:
                    pending.append(f"node {n} not answering")
                    continue
                for lk in s["links"]:
                    if peers is not None and lk["peer"] not in peers:
                        continue
                    if (lk["state"] == "up") != up:
                        pending.append(f"{n}-{lk['peer']} {lk['state']}")
            waited = time.monotonic() - start
            if not pending or waited > timeout:
                return {"done": not pending, "seconds": waited, "pending": pending[:10]}
            await task.deferLater(self.reactor, POLL_INTERVAL)

    async def read_new(self, node: int, until: float | None) -> bool:
        """Read ``node``'s listing from where the last read stopped to its end now, a
        page per call (see ``Ledger``). A failed page is asked again until ``until``
        (the reactor's seconds; None: not again): a node slow to answer on a loaded
        machine is not a node that lost its messages. Whether it read to the end."""
        ledger = self.ledger
        while True:
            start = ledger.position[node]

            async def page(c: GossipClient, start: int = start) -> Any:
                return await c.proto.callRemote(ListMessages, start=start, limit=PAGE_LIMIT)

            r = await self.try_call(node, page)
            if r is None:
                if until is None or self.reactor.seconds() > until:
                    return False
                await task.deferLater(self.reactor, POLL_INTERVAL)
                continue
            if r["total"] < start:
                ledger.forget(node)
                continue
            rows = [(m["id"], m["body"]) for m in r["messages"]]
            ledger.listed(node, start, rows, r["next"])
            if not rows or r["next"] >= r["total"]:
                return True

    async def converge(self, nodes: list[int], deadline: float) -> dict[str, Any]:
        """Wait until every node holds every message acknowledged up to now; then read
        every node to the end of its listing (duplicates, wrong rows)."""
        start = time.monotonic()
        give_up = self.reactor.seconds() + deadline
        ledger = self.ledger
        acknowledged = len(ledger.acked)
        want = {n: set(ledger.lacking[n]) for n in nodes}

        def pending(n: int) -> int:
            want[n] &= ledger.lacking[n]
            return len(want[n])

        while True:
            for n in nodes:
                if pending(n):
                    await self.read_new(n, None)
            done = time.monotonic()
            if all(pending(n) == 0 for n in nodes) or self.reactor.seconds() > give_up:
                break
            await task.deferLater(self.reactor, POLL_INTERVAL)
        unlisted: list[int] = []
        list_until = self.reactor.seconds() + LIST_DEADLINE
        for n in nodes:
            if not await self.read_new(n, list_until):
                unlisted.append(n)  # a check failure of its own, not a count of losses
        missing = {n: pending(n) for n in nodes}
        lost: set[bytes] = set()
        for n in nodes:
            if n not in unlisted:  # what an unread node holds is unknown, not lost
                lost |= want[n]
        return {
            "acknowledged": acknowledged,
            "lost": len(lost),
            "missing_by_node": {str(n): v for n, v in missing.items() if v},
            "converged": not any(missing.values()),
            "seconds": done - start,
            "converged_at": done,
            "duplicates": {str(n): v for n in nodes if (v := ledger.duplicates[n])},
            "wrong_bodies": ledger.wrong_rows,
            "wrong_ids": self.wrong_ids,
            "unlisted": unlisted,
        }

    # -- requests ----------------------------------------------------------------

    async def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if op == "load":
            self.set_load([int(n) for n in req.get("nodes", [])], float(req["per_node_rate"]))
            return {}
        if op == "counts":
            return {"acknowledged": len(self.ledger.acked), "attempted": self.attempted}
        if op == "status":
            return await self.status([int(n) for n in req["nodes"]])
        if op == "wait_links":
            peers = req.get("peers")
            return await self.wait_links(
                [int(n) for n in req["nodes"]],
                bool(req["up"]),
                float(req["timeout"]),
                None if peers is None else [int(p) for p in peers],
            )
        if op == "converge":
            return await self.converge([int(n) for n in req["nodes"]], float(req["deadline"]))
        raise ValueError(f"unknown op {op!r}")


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


class Requests(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST_BYTES

    def __init__(self, driver: Driver, done: defer.Deferred[None]) -> None:
        self.driver = driver
        self.done = done

    def lineReceived(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            seq = req["seq"]
        except (ValueError, KeyError, TypeError):
            self.answer({"seq": None, "ok": False, "error": f"bad request {line[:80]!r}"})
            return
        d = defer.Deferred.fromCoroutine(self.driver.handle(req))
        d.addCallbacks(
            lambda r: self.answer({"seq": seq, "ok": True, "result": r}),
            lambda f: self.answer({"seq": seq, "ok": False, "error": f.getErrorMessage()}),
        )

    def answer(self, reply: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(reply).encode() + b"\n")

    def connectionLost(self, reason: Any = None) -> None:
        # The lab closed our stdin (or died): stop.
        if not self.done.called:
            self.done.callback(None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gossip.lab.driver", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--tag", default="lab", help="prefix of the bodies this driver submits")
    p.add_argument(
        "--outside",
        type=int,
        required=True,
        help="network namespace inode of the lab's owner (the driver refuses to run in it)",
    )
    args = p.parse_args(argv)
    why = unsafe_namespace(args.outside)
    if why:
        print(f"gossip.lab.driver: {why}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"gossip.lab.driver: {e}", file=sys.stderr)
        return 2

    async def run(reactor: Any) -> None:
        done: defer.Deferred[None] = defer.Deferred()
        stdio.StandardIO(Requests(Driver(reactor, config, args.tag), done), reactor=reactor)
        await done

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
