"""``gossip-bench-hotpath``: CPU per message of the node code, with less noise.

``gossip-bench`` runs one process per node, so on a shared 2-core machine its
CPU figures move by 20-30% between runs. This command runs the same
``GossipNode`` code for a whole cluster inside one process, with one reactor:
real TCP links on loopback, real logs (or memory stores) under the chosen
fsync policy, and ``GossipNode.submit`` called directly (no AMP) with a
bounded number of submits in flight. It times the work every node does for
every message without the cost of separate processes; on our machines its
figures still move by up to 20%.

``--relay`` measures less but steadily (within a few percent): one node, with
its neighbours' links joined to in-memory transports (``StringTransport``), is
fed ``--messages`` messages in Gossip frames of ``--batch`` from one neighbour
and stores and forwards them; no sockets, no reactor turns, no other node. It
prints the CPU per message, the least and the median of ``--rounds`` runs:
the cost of frame parse, checks, dedup, store and forward alone. A change to
that path is judged by this figure before and after, then confirmed end to
end with ``gossip-bench``.

``--profile N`` prints the N functions with the most own time (cProfile, which
slows the run; the CPU figures of a profiled run are not comparable).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task

from gossip.argtypes import OneLineParser, real, whole
from gossip.cluster import free_port_base
from gossip.node import STRATEGIES, GossipNode
from gossip.store.interface import MessageStore
from gossip.store.log import POLICIES, LogStore
from gossip.store.memory import MemoryStore
from gossip.tap import node_services
from gossip.topology import generate_config

BODY_BYTES = 100
ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="gossip-bench-hotpath",
        description="CPU per message of a whole cluster's node code in one process.",
    )
    p.add_argument("--nodes", type=whole(2, 256), default=16, help="cluster size (default 16)")
    p.add_argument("--messages", type=whole(1, 10_000_000), default=20_000)
    p.add_argument(
        "--strategy",
        default="plumtree,flood",
        help="comma-separated dissemination strategies, run in turn (default plumtree,flood)",
    )
    p.add_argument("--rounds", type=whole(1, 100), default=2, help="runs of each strategy")
    p.add_argument("--window", type=whole(1, 100_000), default=256, help="submits in flight")
    p.add_argument("--store", choices=("log", "memory"), default="log")
    p.add_argument("--fsync", choices=POLICIES, default="batch")
    p.add_argument("--timeout", type=real(above=0), default=300.0, help="seconds per run")
    p.add_argument("--profile", type=whole(1, 1000), default=None, metavar="N")
    p.add_argument(
        "--relay",
        action="store_true",
        help="measure one relay node fed in memory (least and median of --rounds runs)",
    )
    p.add_argument("--batch", type=whole(1, 10_000), default=8, help="messages per frame (--relay)")
    p.add_argument("--seed", type=whole(), default=1)
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    p.add_argument("--dir", type=Path, default=None, help="where the logs go (default: temp)")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    for s in args.strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r} (known: {', '.join(sorted(STRATEGIES))})")
    return args


def bodies(n: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [bytes(rnd.choices(ALPHABET, k=BODY_BYTES)) for _ in range(n)]


def open_store(args: argparse.Namespace, directory: Path, reactor: Any) -> MessageStore:
    """The store ``--store`` asks for (a log in ``directory`` under ``--fsync``)."""
    if args.store == "log":
        return LogStore.open(directory, fsync=args.fsync, reactor=reactor)
    return MemoryStore()


class BenchTimeout(Exception):
    pass


async def run_once(
    reactor: Any, args: argparse.Namespace, strategy: str, directory: Path, seed: int
) -> dict[str, Any]:
    config = attrs.evolve(
        generate_config(args.nodes, base_peer_port=free_port_base(2 * args.nodes + 2)),
        dissemination=strategy,
    )
    nodes: list[GossipNode] = []
    services = []
    for i in sorted(config.nodes):
        node = GossipNode(config, i, open_store(args, directory / f"node-{i}", reactor), reactor)
        services.append(node_services(node, reactor))
        services[-1].privilegedStartService()
        services[-1].startService()
        nodes.append(node)
    try:
        return await _measure(reactor, args, nodes, seed, strategy)
    finally:
        await defer.gatherResults([defer.maybeDeferred(s.stopService) for s in services])


async def _wait(reactor: Any, until: Any, deadline: float, what: str) -> None:
    while not until():
        if time.monotonic() > deadline:
            raise BenchTimeout(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.002, lambda: None)


async def _measure(
    reactor: Any, args: argparse.Namespace, nodes: list[GossipNode], seed: int, strategy: str
) -> dict[str, Any]:
    deadline = time.monotonic() + args.timeout
    await _wait(
        reactor,
        lambda: all(all(s.state == "up" for s in n.links.status()) for n in nodes),
        deadline,
        "every link to come up",
    )
    messages = bodies(args.messages, seed)
    rnd = random.Random(seed)
    window = defer.DeferredSemaphore(args.window)
    profiler = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    acks = []
    for k, body in enumerate(messages, 1):
        acks.append(window.run(nodes[rnd.randrange(len(nodes))].submit, body))
        if k % args.window == 0:
            # Let the reactor run: with stores that acknowledge at once (memory,
            # fsync "never") the window alone would submit everything in one turn.
            await task.deferLater(reactor, 0, lambda: None)
    await defer.gatherResults(acks)
    t_acked = time.perf_counter()
    n = len(messages)
    await _wait(reactor, lambda: all(len(x.store) >= n for x in nodes), deadline, "delivery")
    t1, c1 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.disable()
    gossip = [x.traffic.kinds.get("gossip") for x in nodes]
    payload = sum(c.messages_out for c in gossip if c is not None)
    frames = sum(c.frames_out for c in gossip if c is not None)
    result: dict[str, Any] = {
        "strategy": strategy,
        "nodes": len(nodes),
        "messages": n,
        "seconds": t1 - t0,
        "acked_seconds": t_acked - t0,
        "messages_per_second": n / (t1 - t0),
        "cpu_seconds": c1 - c0,
        "cpu_seconds_per_1000_messages": (c1 - c0) / n * 1000,
        "cpu_us_per_node_message": (c1 - c0) / n / len(nodes) * 1e6,
        "payload_sends_per_broadcast": payload / n,
        "payload_messages_per_frame": payload / frames if frames else 0.0,
        "profiled": profiler is not None,
    }
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        result["profile"] = out.getvalue()
    return result


def relay_once(args: argparse.Namespace, strategy: str, directory: Path, seed: int) -> float:
    """CPU seconds per message for one relay node fed ``args.messages`` in memory."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from gossip.core.frames import Envelope, GossipFrame
    from gossip.core.message import message_id
    from gossip.wire import codec

    config = attrs.evolve(generate_config(args.nodes), dissemination=strategy)
    reactor = MemoryReactorClock()
    store = open_store(args, directory, reactor)
    me = min(config.nodes)
    node = GossipNode(config, me, store, reactor)
    feeds = {}
    for peer in config.node(me).neighbours:
        proto = node.links.server_factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert proto is not None
        proto.makeConnection(StringTransport())
        hello = codec.encode(codec.Hello(1, config.name, peer, 7))
        proto.dataReceived(len(hello).to_bytes(4, "big") + hello)
        feeds[peer] = proto
    sender, feed = next(iter(feeds.items()))
    # Messages of another origin, sent on by ``sender``: a relay's everyday work.
    origin = next(n for n in sorted(config.nodes) if n not in (me, sender))
    frames = []
    envelopes = [Envelope(message_id(b), b, (origin, sender)) for b in bodies(args.messages, seed)]
    for i in range(0, len(envelopes), args.batch):
        f = codec.encode(GossipFrame(tuple(envelopes[i : i + args.batch])))
        frames.append(len(f).to_bytes(4, "big") + f)
    data = b"".join(frames)
    started = time.process_time()
    for i in range(0, len(data), 64 * 1024):
        feed.dataReceived(data[i : i + 64 * 1024])
        reactor.advance(0)
    spent: float = time.process_time() - started
    held = len(store)
    store.close()
    if held != args.messages:
        raise BenchTimeout(f"the relay stored {held} of {args.messages} messages")
    return spent / int(args.messages)


def run_relay(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    results = []
    for strategy in args.strategies:
        runs = sorted(
            relay_once(args, strategy, base / f"relay-{strategy}-{r}", args.seed + r)
            for r in range(args.rounds)
        )
        results.append(
            {
                "strategy": strategy,
                "messages": args.messages,
                "batch": args.batch,
                "rounds": args.rounds,
                "cpu_us_per_message_min": runs[0] * 1e6,
                "cpu_us_per_message_median": runs[len(runs) // 2] * 1e6,
                "cpu_seconds_per_1000_messages_min": runs[0] * 1000,
            }
        )
        r = results[-1]
        print(
            f"{strategy:<10} relay, frames of {args.batch}: CPU per message"
            f" {r['cpu_us_per_message_min']:.2f} us least, {r['cpu_us_per_message_median']:.2f} us"
            f" median of {args.rounds} runs",
            flush=True,
        )
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'strategy':<10} {'msgs':>8} {'msg/s':>8} {'CPU s/1000':>11}"
        f" {'us/node-msg':>12} {'sends/bcast':>12} {'msgs/frame':>11}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r['strategy']:<10} {r['messages']:>8,} {r['messages_per_second']:>8,.0f}"
            f" {r['cpu_seconds_per_1000_messages']:>11.3f} {r['cpu_us_per_node_message']:>12.1f}"
            f" {r['payload_sends_per_broadcast']:>12.2f} {r['payload_messages_per_frame']:>11.1f}"
            + ("  (profiled)" if r["profiled"] else "")
        )
    return "\n".join(rows)


async def run(reactor: Any, args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    results = []
    for r in range(args.rounds):
        for strategy in args.strategies:
            directory = base / f"{strategy}-r{r + 1}"
            result = await run_once(reactor, args, strategy, directory, args.seed + r)
            result["round"] = r + 1
            results.append(result)
            print(format_table([result]).splitlines()[-1], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.relay:
        try:
            with tempfile.TemporaryDirectory(prefix="gossip-bench-relay-", dir=args.dir) as d:
                results = run_relay(args, Path(d))
        except (BenchTimeout, OSError) as e:
            print(f"gossip-bench-hotpath: {e}", file=sys.stderr)
            return 1
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    from twisted.internet import reactor

    outcome: dict[str, Any] = {}

    async def body() -> None:
        try:
            if args.dir is not None:
                args.dir.mkdir(parents=True, exist_ok=True)
                base = Path(tempfile.mkdtemp(prefix="bench-hotpath-", dir=args.dir))
                outcome["results"] = await run(reactor, args, base)
            else:
                with tempfile.TemporaryDirectory(prefix="gossip-bench-hotpath-") as d:
                    outcome["results"] = await run(reactor, args, Path(d))
        except Exception as e:  # reported as one line below
            outcome["error"] = f"{type(e).__name__}: {e}"
        finally:
            reactor.stop()

    print(
        f"gossip-bench-hotpath: {args.nodes} nodes in one process, {args.messages:,} messages"
        f" of {BODY_BYTES} bytes, {args.window} in flight, store {args.store}"
        + (f" (fsync {args.fsync})" if args.store == "log" else ""),
        flush=True,
    )
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(body()))
    reactor.run()
    if "error" in outcome:
        print(f"gossip-bench-hotpath: {outcome['error']}", file=sys.stderr)
        return 1
    results = outcome["results"]
    print()
    print(format_table(results))
    for r in results:
        if "profile" in r:
            print(f"\nprofile of {r['strategy']} round {r['round']}:\n{r['profile']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
