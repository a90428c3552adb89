"""``gossip-bench-hotpath``: CPU per message of the node code, with less noise.

``gossip-bench`` runs one process per node, so on a shared 2-core machine its
CPU figures move by 20-30% between runs. This command runs the same
``GossipNode`` code for a whole cluster inside one process, with one reactor:
real TCP links on loopback, real logs (or memory stores) under the chosen
fsync policy, and ``GossipNode.submit`` called directly (no AMP) with a
bounded number of submits in flight. It times the work every node does for
every message without the cost of separate processes; on our machines its
figures still move by up to 20%.

Every round also runs the ``reference`` variant (``gossip.bench.relay``: a
minimal Twisted + protobuf flooding relay, no storage) on the same topology,
alternating with the nodes (the order rotates from round to round), and the
summary quotes each variant's median figure over the relay's: delivered-to-all
throughput, CPU per message per node under that load, and p50 latency to the
last node (durable, for nodes) at one message every ``--latency-interval``.
That latency is not the one of separate processes: here the 16 nodes' fsyncs
(each in the reactor thread while the disk is fast) run one after another in
the one thread, so a message is durable on the last node only after all of
them: 16 fsyncs of 0.2-0.3 ms each on our disk, which 16 processes would run
side by side; ``--fsync never`` shows the rest. ``gossip-bench`` measures
the latency of the deployment.

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
import os
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task

from gossip.argtypes import OneLineParser, real, whole
from gossip.bench.relay import start_relays
from gossip.cluster import free_port_base
from gossip.core.message import message_id
from gossip.gc_thresholds import pace_collector
from gossip.node import STRATEGIES, GossipNode
from gossip.store.interface import MessageStore
from gossip.store.log import POLICIES, LogStore
from gossip.store.memory import MemoryStore
from gossip.tap import node_services
from gossip.topology import generate_config

BODY_BYTES = 100
# The variant that runs the reference relay (gossip.bench.relay) instead of nodes.
REFERENCE = "reference"
WORKLOADS = ("latency", "throughput")
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
        default=f"{REFERENCE},plumtree,flood",
        help=f"comma-separated variants, run in turn each round: dissemination strategies and"
        f" {REFERENCE!r}, the minimal flooding relay every figure is compared with"
        f" (default {REFERENCE},plumtree,flood)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated, run on each cluster in this order (default latency,throughput)",
    )
    p.add_argument("--latency-messages", type=whole(1, 100_000), default=200)
    p.add_argument(
        "--latency-interval", type=real(above=0), default=0.02, help="seconds between submits"
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
        if s not in STRATEGIES and s != REFERENCE:
            known = ", ".join(sorted([*STRATEGIES, REFERENCE]))
            p.error(f"unknown strategy {s!r} (known: {known})")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    return args


def bodies(n: int, seed: int, tag: bytes = b"") -> list[bytes]:
    rnd = random.Random(seed)
    return [tag + bytes(rnd.choices(ALPHABET, k=BODY_BYTES - len(tag))) for _ in range(n)]


def open_store(args: argparse.Namespace, directory: Path, reactor: Any) -> MessageStore:
    """The store ``--store`` asks for (a log in ``directory`` under ``--fsync``)."""
    if args.store == "log":
        return LogStore.open(directory, fsync=args.fsync, reactor=reactor)
    return MemoryStore()


class BenchTimeout(Exception):
    pass


class Arrivals:
    """When each message reached the last of ``target`` nodes (stamped in-process)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count: dict[bytes, int] = {}
        self.full_at: dict[bytes, float] = {}

    def arrived(self, mid: bytes) -> None:
        c = self.count.get(mid, 0) + 1
        self.count[mid] = c
        if c == self.target:
            self.full_at[mid] = time.perf_counter()


@attrs.define(eq=False)
class DurableFeed:
    """A node's deliveries as ``gossip-bench`` sees them through ``Watch``: the node
    calls ``push_delivered`` when records became durable under its fsync policy."""

    node: GossipNode
    arrivals: Arrivals
    cursor: int = 0

    def push_delivered(self) -> None:
        store = self.node.store
        durable = store.durable_count()
        if durable > self.cursor:
            arrived = self.arrivals.arrived
            for mid in store.ids_from(self.cursor, durable - self.cursor):
                arrived(mid)
            self.cursor = durable


@attrs.define
class Variant:
    """A running cluster of one variant: submit by node index, count payload sends."""

    submit: Callable[[int, bytes], defer.Deferred[Any]]
    size: int
    all_up: Callable[[], bool]
    payload: Callable[[], tuple[int, int]]  # (messages sent, frames sent), all nodes
    stop: Callable[[], defer.Deferred[Any]]
    track: Callable[[Arrivals], None]  # count deliveries there from now on


async def start_variant(
    reactor: Any, args: argparse.Namespace, variant: str, directory: Path
) -> Variant:
    config = attrs.evolve(
        generate_config(args.nodes, base_peer_port=free_port_base(2 * args.nodes + 2)),
        dissemination="flood" if variant == REFERENCE else variant,
    )
    if variant == REFERENCE:
        current = [Arrivals(args.nodes)]
        relays = await start_relays(config, reactor, lambda _n, mid: current[0].arrived(mid))

        def relay_payload() -> tuple[int, int]:
            return sum(r.messages_out for r in relays), sum(r.frames_out for r in relays)

        async def stop_relays() -> None:
            for r in relays:
                await r.stop()

        return Variant(
            lambda i, body: defer.succeed(relays[i].submit(body)),
            len(relays),
            lambda: all(r.all_up() for r in relays),
            relay_payload,
            lambda: defer.Deferred.fromCoroutine(stop_relays()),
            lambda arrivals: current.__setitem__(0, arrivals),
        )
    nodes: list[GossipNode] = []
    services = []
    for i in sorted(config.nodes):
        node = GossipNode(config, i, open_store(args, directory / f"node-{i}", reactor), reactor)
        services.append(node_services(node, reactor))
        services[-1].privilegedStartService()
        services[-1].startService()
        nodes.append(node)
    feeds = [DurableFeed(n, Arrivals(args.nodes)) for n in nodes]
    for n, f in zip(nodes, feeds, strict=True):
        n.watcher_ready(f)

    def node_payload() -> tuple[int, int]:
        gossip = [x.traffic.kinds.get("gossip") for x in nodes]
        return (
            sum(c.messages_out for c in gossip if c is not None),
            sum(c.frames_out for c in gossip if c is not None),
        )

    def track(arrivals: Arrivals) -> None:
        for f in feeds:
            f.arrivals = arrivals

    return Variant(
        lambda i, body: nodes[i].submit(body),
        len(nodes),
        lambda: all(all(s.state == "up" for s in n.links.status()) for n in nodes),
        node_payload,
        lambda: defer.gatherResults([defer.maybeDeferred(s.stopService) for s in services]),
        track,
    )


async def run_once(
    reactor: Any, args: argparse.Namespace, variant: str, directory: Path, seed: int
) -> dict[str, Any]:
    cluster = await start_variant(reactor, args, variant, directory)
    try:
        deadline = time.monotonic() + args.timeout
        await _wait(reactor, cluster.all_up, deadline, "every link to come up")
        result: dict[str, Any] = {"strategy": variant, "nodes": cluster.size}
        if "latency" in args.workloads:
            result.update(await _latency(reactor, args, cluster, seed, deadline))
        if "throughput" in args.workloads:
            result.update(await _throughput(reactor, args, cluster, seed, deadline))
        return result
    finally:
        await cluster.stop()


async def _wait(reactor: Any, until: Any, deadline: float, what: str) -> None:
    while not until():
        if time.monotonic() > deadline:
            raise BenchTimeout(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.002, lambda: None)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))]


async def _latency(
    reactor: Any, args: argparse.Namespace, cluster: Variant, seed: int, deadline: float
) -> dict[str, Any]:
    """``--latency-messages`` messages, one every ``--latency-interval`` s, each at a
    random node: time from the submit call until the last node has it durably."""
    arrivals = Arrivals(cluster.size)
    cluster.track(arrivals)
    rnd = random.Random(seed + 7)
    messages = bodies(args.latency_messages, seed + 7, tag=b"L")
    submitted: dict[bytes, float] = {}
    c0 = time.process_time()
    t0 = time.perf_counter()
    for k, body in enumerate(messages):
        delay = t0 + k * args.latency_interval - time.perf_counter()
        if delay > 0:
            await task.deferLater(reactor, delay, lambda: None)
        submitted[message_id(body)] = time.perf_counter()
        cluster.submit(rnd.randrange(cluster.size), body)
    await _wait(
        reactor, lambda: len(arrivals.full_at) >= len(messages), deadline, "latency delivery"
    )
    c1 = time.process_time()
    lat = [(arrivals.full_at[m] - t) * 1000 for m, t in submitted.items()]
    return {
        "latency_p50_ms": _percentile(lat, 50),
        "latency_p99_ms": _percentile(lat, 99),
        "latency_max_ms": max(lat),
        "latency_cpu_us_per_node_message": (c1 - c0) / len(messages) / cluster.size * 1e6,
    }


async def _throughput(
    reactor: Any, args: argparse.Namespace, cluster: Variant, seed: int, deadline: float
) -> dict[str, Any]:
    arrivals = Arrivals(cluster.size)
    cluster.track(arrivals)
    messages = bodies(args.messages, seed)
    rnd = random.Random(seed)
    window = defer.DeferredSemaphore(args.window)
    profiler = cProfile.Profile() if args.profile else None
    sent0, frames0 = cluster.payload()
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    acks = []
    for k, body in enumerate(messages, 1):
        acks.append(window.run(cluster.submit, rnd.randrange(cluster.size), body))
        if k % args.window == 0:
            # Let the reactor run: with stores that acknowledge at once (memory,
            # fsync "never") the window alone would submit everything in one turn.
            await task.deferLater(reactor, 0, lambda: None)
    await defer.gatherResults(acks)
    t_acked = time.perf_counter()
    n = len(messages)
    await _wait(reactor, lambda: len(arrivals.full_at) >= n, deadline, "delivery")
    c1 = time.process_time()
    t1 = max(arrivals.full_at.values())
    if profiler is not None:
        profiler.disable()
    sent1, frames1 = cluster.payload()
    payload, frames = sent1 - sent0, frames1 - frames0
    result: dict[str, Any] = {
        "messages": n,
        "seconds": t1 - t0,
        "acked_seconds": t_acked - t0,
        "messages_per_second": n / (t1 - t0),
        "cpu_seconds": c1 - c0,
        "cpu_seconds_per_1000_messages": (c1 - c0) / n * 1000,
        "cpu_us_per_node_message": (c1 - c0) / n / cluster.size * 1e6,
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
    for strategy in [s for s in args.strategies if s != REFERENCE]:
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


# (JSON key, column head, width, format) of the per-run table.
COLUMNS = (
    ("messages_per_second", "msg/s all", 9, ",.0f"),
    ("cpu_us_per_node_message", "us/node-msg", 11, ".1f"),
    ("payload_sends_per_broadcast", "sends/bcast", 11, ".2f"),
    ("payload_messages_per_frame", "msgs/frame", 10, ".1f"),
    ("latency_p50_ms", "p50 ms", 7, ".2f"),
    ("latency_p99_ms", "p99 ms", 7, ".2f"),
    ("latency_cpu_us_per_node_message", "lat us/n-m", 10, ".0f"),
)
# Figures quoted as a ratio to the reference relay's (median over rounds).
RATIOS = (
    ("messages_per_second", "throughput delivered to all"),
    ("cpu_us_per_node_message", "CPU per message per node, throughput load"),
    ("latency_p50_ms", "p50 latency to the last node"),
)


def format_row(r: dict[str, Any]) -> str:
    cells = [f"{r['strategy']:<10}", f"{r.get('round', ''):>5}"]
    for key, _head, width, fmt in COLUMNS:
        value = r.get(key)
        cells.append(f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}")
    return " ".join(cells) + ("  (profiled)" if r.get("profiled") else "")


def format_table(results: list[dict[str, Any]]) -> str:
    head = f"{'variant':<10} {'round':>5} " + " ".join(f"{h:>{w}}" for _k, h, w, _f in COLUMNS)
    return "\n".join([head, "-" * len(head), *(format_row(r) for r in results)])


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """variant -> figure -> its median over rounds divided by the reference's."""
    by: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for key, _what in RATIOS:
            if r.get(key) is not None:
                by.setdefault(r["strategy"], {}).setdefault(key, []).append(r[key])
    ref = by.get(REFERENCE)
    if not ref:
        return {}
    out: dict[str, dict[str, float]] = {}
    for variant, figures in by.items():
        if variant == REFERENCE:
            continue
        out[variant] = {
            key: _median(values) / _median(ref[key])
            for key, values in figures.items()
            if ref.get(key) and _median(ref[key]) > 0
        }
    return out


def format_ratios(table: dict[str, dict[str, float]]) -> str:
    rows = [f"ratio to the reference relay (median over rounds; {REFERENCE} = 1)"]
    for variant, figures in table.items():
        for key, what in RATIOS:
            if key in figures:
                rows.append(f"  {variant:<10} {what:<42} {figures[key]:6.2f}")
    return "\n".join(rows)


async def run(reactor: Any, args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    """Every variant once per round, the order rotated from round to round."""
    results = []
    print(format_table([]), flush=True)
    for r in range(args.rounds):
        k = r % len(args.strategies)
        for variant in args.strategies[k:] + args.strategies[:k]:
            directory = base / f"{variant}-r{r + 1}"
            result = await run_once(reactor, args, variant, directory, args.seed + r)
            result["round"] = r + 1
            results.append(result)
            print(format_row(result), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pace_collector()  # as a node process does (gossip.tap), for nodes and relay alike
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
        f"gossip-bench-hotpath: {args.nodes} nodes in one process over loopback TCP;"
        f" {', '.join(args.workloads)}; {BODY_BYTES}-byte bodies; latency:"
        f" {args.latency_messages} messages every {args.latency_interval * 1000:g} ms;"
        f" throughput: {args.messages:,} messages, {args.window} in flight; store {args.store}"
        + (f" (fsync {args.fsync})" if args.store == "log" else "")
        + f"; load {os.getloadavg()[0]:.1f}; rounds alternate the variants",
        flush=True,
    )
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(body()))
    reactor.run()
    if "error" in outcome:
        print(f"gossip-bench-hotpath: {outcome['error']}", file=sys.stderr)
        return 1
    results = outcome["results"]
    table = ratios(results)
    if table:
        print()
        print(format_ratios(table))
    for r in results:
        if "profile" in r:
            print(f"\nprofile of {r['strategy']} round {r['round']}:\n{r['profile']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
