"""``gossip-sim``: flood against Plumtree in the simulator, as one table.

For a seed, the run is fully determined: the graph (``generate_graph(n, 3,
seed)``), the crashed nodes (a random 20% whose removal leaves the rest
connected), the workload (``--messages`` bodies submitted at random live
origins, a few milliseconds apart) and every link latency (uniform 1-10 ms).
Each strategy runs that same workload on a stable network and with the nodes
crashed before the first submit. Periodic re-sync is off unless
``--sync-interval`` is given, so the figures are the dissemination
strategy's alone.

``--run`` picks runs (``plumtree-crashed`` alone, say); each run's figures do
not depend on which others ran.

A run stops when the network has been quiet (no frame sent or in flight) for
a whole ``QUIET_SECONDS``, or at ``--time-limit`` simulated seconds after the
first submit, or with an error after ``--max-events`` events.

The simulator would have every Plumtree node run its own breadth-first search
for every origin it hears of (n searches of n nodes per origin); the nodes
here share one search per origin instead (``ShortestPathTrees(share=True)``),
which gives the same trees at 1/n of the work.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from gossip.argtypes import OneLineParser, real, whole
from gossip.core.dissemination import Dissemination, Flood
from gossip.core.plumtree import Plumtree, ShortestPathTrees
from gossip.sim.network import Simulation
from gossip.topology import generate_graph

Graph = Mapping[int, Sequence[int]]
Edge = tuple[int, int]

STRATEGIES = ("flood", "plumtree")
SCENARIOS = ("stable", "crashed")
# Every run, as --run names it: "flood-stable", ... (all by default, in this order).
RUNS = tuple(f"{strategy}-{scenario}" for strategy in STRATEGIES for scenario in SCENARIOS)
OVERLAYS = ("static", "dynamic")
CONTROL_FRAMES = ("IHaveFrame", "GraftFrame", "PruneFrame")
SYNC_FRAMES = (
    "SyncQueryFrame",
    "SyncReplyFrame",
    "SyncWantFrame",
    "SyncDataFrame",
    "SyncHintFrame",
)
DEGREE = 3
LATENCY_MIN = 0.001
LATENCY_MAX = 0.010
# Links come up at t = 0 and run their first re-sync; the workload starts after.
WARMUP_SECONDS = 1.0
# A run has settled after this long with nothing sent and nothing in flight
# (longer than Plumtree's graft timeout, so no graft is still pending).
QUIET_SECONDS = 1.0
# Effectively never: periodic re-sync off.
NO_SYNC = 1e9
# Dynamic overlay: the live nodes learn the repaired graph at moments spread uniformly
# over this long after the failure is detected (a flood of link state across the
# graph's diameter, a few milliseconds per hop).
GRAPH_SPREAD = 0.05


# -- shared origin trees -----------------------------------------------------


def plumtree_factory(graph: Graph) -> Callable[[int], Dissemination]:
    """``strategy_factory`` for ``Simulation``: Plumtree nodes sharing one set of trees."""
    shared = ShortestPathTrees(graph, share=True)
    return lambda node_id: Plumtree(node_id, shared)


def adjacency(edges: Sequence[Edge]) -> dict[int, list[int]]:
    graph: dict[int, list[int]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, []).append(a)
    return graph


def eccentricities(
    graph: Mapping[int, Iterable[int]], sources: Sequence[int], within: set[int]
) -> dict[int, int]:
    """Hop distance to the farthest node of ``within``, from each source, in the
    subgraph induced by ``within``."""
    out: dict[int, int] = {}
    for s in sources:
        dist = {s: 0}
        queue = deque([s])
        far = 0
        while queue:
            v = queue.popleft()
            for w in graph.get(v, ()):
                if w in within and w not in dist:
                    dist[w] = far = dist[v] + 1
                    queue.append(w)
        out[s] = far
    return out


def connected(graph: Graph, nodes: set[int]) -> bool:
    if not nodes:
        return True
    return len(_reach(graph, next(iter(nodes)), nodes)) == len(nodes)


def _reach(graph: Graph, start: int, within: set[int]) -> set[int]:
    seen = {start}
    todo = [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w in within and w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def repaired(graph: Graph, crashed: Sequence[int], rng: random.Random) -> dict[int, frozenset[int]]:
    """The live graph a dynamic overlay makes of ``graph`` once ``crashed`` are found
    dead: their links go, and each survivor left with fewer than ``DEGREE`` links
    links to random survivors that lack links too (any survivor when none does), as
    HyParView's active views refill from the passive ones."""
    dead = set(crashed)
    adj = {v: {w for w in nbs if w not in dead} for v, nbs in graph.items() if v not in dead}
    needy = [v for v in sorted(adj) if len(adj[v]) < DEGREE]
    rng.shuffle(needy)
    for v in needy:
        while len(adj[v]) < DEGREE:
            pool = [w for w in needy if w != v and w not in adj[v] and len(adj[w]) < DEGREE]
            if not pool:
                pool = [w for w in sorted(adj) if w != v and w not in adj[v]]
            if not pool:
                break
            w = rng.choice(pool)
            adj[v].add(w)
            adj[w].add(v)
    return {v: frozenset(nbs) for v, nbs in adj.items()}


def _connected_without(graph: Graph, live: set[int], v: int) -> bool:
    return connected(graph, live - {v})


def _stays_connected(graph: Graph, live: set[int], v: int) -> bool:
    """Whether ``live`` without ``v`` is connected, given that ``live`` is.

    One breadth-first search grows from each of v's live neighbours at once,
    and searches that meet merge: on a random graph they meet after about
    sqrt(n) nodes, where one search to find the others would cover most of it.
    """
    starts = [w for w in graph.get(v, ()) if w in live and w != v]
    if len(starts) <= 1:
        return True
    root = list(range(len(starts)))  # union-find over the searches

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    label = {v: -1}  # v is never entered
    for i, w in enumerate(starts):
        label[w] = i
    searches = len(starts)
    todo = deque(starts)
    while todo:
        u = todo.popleft()
        mine = label[u]
        for w in graph.get(u, ()):
            theirs = label.get(w)
            if theirs is None:
                if w in live:
                    label[w] = mine
                    todo.append(w)
            elif theirs >= 0:
                a, b = find(mine), find(theirs)
                if a != b:
                    root[a] = b
                    searches -= 1
                    if searches == 1:
                        return True
    return False


def pick_crashed(graph: Graph, count: int, rng: random.Random) -> list[int]:
    """``count`` random nodes whose removal leaves the others connected, in crash order."""
    nodes = sorted(graph)
    live = set(nodes)
    crashed: list[int] = []
    # While the live nodes are connected, removing v keeps them so exactly when v's live
    # neighbours still reach each other: a search that stops once it has found them all,
    # rather than one over the whole graph per candidate (minutes at 10,000 nodes).
    stays_connected = _stays_connected if connected(graph, live) else _connected_without
    for v in rng.sample(nodes, len(nodes)):
        if len(crashed) == count:
            break
        if stays_connected(graph, live, v):
            live.discard(v)
            crashed.append(v)
    if len(crashed) < count:
        raise ValueError(f"cannot crash {count} nodes and keep the rest connected")
    return crashed


# -- one run -----------------------------------------------------------------


@attrs.frozen
class Submit:
    gap: float  # simulated seconds to run after this submit
    origin: int
    body: bytes


@attrs.frozen
class Setup:
    """Everything the four runs share: graph, crashed nodes, workload."""

    seed: int
    edges: tuple[Edge, ...]
    graph: dict[int, list[int]]
    crashed: tuple[int, ...]
    workload: tuple[Submit, ...]
    sync_interval: float
    time_limit: float
    max_events: int
    # "dynamic": after ``detect`` seconds the survivors learn a repaired graph.
    overlay: str = "static"
    detect: float = 1.0
    live_graph: dict[int, frozenset[int]] = attrs.field(factory=dict)


def make_setup(
    *,
    nodes: int,
    messages: int,
    seed: int,
    crash_fraction: float = 0.2,
    gap: float = 0.005,
    origins: int = 0,
    sync_interval: float = 0.0,
    time_limit: float = 60.0,
    max_events: int = 50_000_000,
    overlay: str = "static",
    detect: float = 1.0,
) -> Setup:
    """The graph, crashed nodes and workload for ``seed``.

    Origins are drawn from the nodes that stay up in the crashed scenario (so
    both scenarios run the same workload), from ``origins`` of them if > 0.
    """
    rng = random.Random(seed)
    edges = tuple(generate_graph(nodes, DEGREE, seed))
    graph = adjacency(edges)
    crashed = pick_crashed(graph, round(nodes * crash_fraction), rng)
    live = sorted(set(graph) - set(crashed))
    pool = rng.sample(live, origins) if 0 < origins < len(live) else live
    workload = tuple(
        Submit(rng.uniform(0.0, gap), rng.choice(pool), f"sim {seed} message {i}".encode())
        for i in range(messages)
    )
    live_graph = repaired(graph, crashed, random.Random(seed)) if overlay == "dynamic" else {}
    return Setup(
        seed,
        edges,
        graph,
        tuple(crashed),
        workload,
        sync_interval,
        time_limit,
        max_events,
        overlay,
        detect,
        live_graph,
    )


def _latency(rng: random.Random, _src: int, _dst: int) -> float:
    return rng.uniform(LATENCY_MIN, LATENCY_MAX)


def _activity(sim: Simulation) -> int:
    """Frames sent so far, wherever they ended up (delivered, lost, discarded, queued)."""
    return (
        sum(sim.frames_delivered.values())
        + sim.frames_lost
        + sim.frames_discarded
        + sim.frames_unsendable
        + sim.in_flight
    )


def simulate(setup: Setup, strategy: str, scenario: str) -> Simulation:
    """Run the workload to quiet (or the time limit); returns the finished simulation."""
    factory: Callable[[int], Dissemination] = (
        plumtree_factory(setup.graph) if strategy == "plumtree" else Flood
    )
    sim = Simulation(
        setup.edges,
        seed=setup.seed,
        strategy_factory=factory,
        latency=_latency,
        core_options={"sync_interval": setup.sync_interval or NO_SYNC},
    )
    budget = setup.max_events
    budget -= sim.run(until=WARMUP_SECONDS, max_events=budget)
    if scenario == "crashed":
        for v in setup.crashed:
            sim.crash(v)
        if setup.overlay == "dynamic":
            budget -= sim.run(until=sim.now + setup.detect, max_events=budget)
            budget -= announce(sim, setup, budget)
    start = sim.now
    for item in setup.workload:
        sim.submit(item.origin, item.body)
        budget -= sim.run(until=sim.now + item.gap, max_events=budget)
    deadline = start + setup.time_limit
    while sim.now < deadline:
        before = _activity(sim)
        budget -= sim.run(until=min(sim.now + QUIET_SECONDS, deadline), max_events=budget)
        if sim.in_flight == 0 and _activity(sim) == before:
            break
    return sim


def announce(sim: Simulation, setup: Setup, budget: int) -> int:
    """The dynamic overlay's repair, once the crashed nodes are found dead: the
    replacement links come up, then each live node learns the repaired graph at its
    own moment within ``GRAPH_SPREAD`` (nodes disagree meanwhile). Plumtree nodes
    share one set of trees of it, as of the old graph. Returns the events run."""
    graph = setup.live_graph
    for a, b in sorted({(min(a, b), max(a, b)) for a, nbs in graph.items() for b in nbs}):
        if not sim.is_up(a, b):
            sim.link(a, b)
    shared: ShortestPathTrees | None = None
    rng = random.Random(setup.seed)
    start = sim.now
    used = 0
    for at, node in sorted((rng.uniform(0, GRAPH_SPREAD), n) for n in sim.live):
        used += sim.run(until=start + at, max_events=budget - used)
        strategy = sim.cores[node].strategy
        if isinstance(strategy, Plumtree):
            if shared is None:
                shared = strategy.trees.trees.successor(graph)
            sim.carry_out(node, strategy.on_trees(shared))
    return used


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure(setup: Setup, sim: Simulation, strategy: str, scenario: str) -> dict[str, Any]:
    """The table's figures (and a few more) for one finished run."""
    live = sim.live
    live_set = set(live)
    shares: list[float] = []
    rmr: list[float] = []
    payload: list[int] = []
    last_hops: list[int] = []
    last_latency: list[float] = []
    complete = 0
    for mid, (_origin, submitted) in sim.origins.items():
        got = [sim.deliveries[(n, mid)] for n in live if (n, mid) in sim.deliveries]
        shares.append(len(got) / len(live))
        complete += len(got) == len(live)
        received = sim.received_by_message.get(mid, 0)
        payload.append(received)
        rmr.append(received / (len(live) - 1) - 1)
        last_hops.append(max(d.hops for d in got))
        last_latency.append(max(d.time for d in got) - submitted)
    count = len(shares)
    kinds: dict[str, int] = {}
    for (_src, _dst, kind), frames in sim.frames_delivered.items():
        kinds[kind] = kinds.get(kind, 0) + frames
    control = sum(kinds.get(k, 0) for k in CONTROL_FRAMES)
    origins = sorted({o for o, _ in sim.origins.values()})
    dynamic = scenario == "crashed" and setup.overlay == "dynamic"
    ecc = eccentricities(setup.live_graph if dynamic else setup.graph, origins, live_set)
    return {
        "strategy": strategy,
        "scenario": scenario,
        "live_nodes": len(live),
        "messages": count,
        "reliability_mean": sum(shares) / count,
        "reliability_min": min(shares),
        "complete_messages": complete,
        "rmr_mean": sum(rmr) / count,
        "payload_per_broadcast": sum(payload) / count,
        "last_hop_max": max(last_hops),
        "last_hop_mean": sum(last_hops) / count,
        "origin_eccentricity_mean": sum(ecc[o] for o, _ in sim.origins.values()) / count,
        "latency_p50_ms": 1000 * quantile(last_latency, 0.5),
        "latency_max_ms": 1000 * max(last_latency),
        "control_frames_per_broadcast": control / count,
        "frames_by_kind": dict(sorted(kinds.items())),
        "sync_frames": sum(kinds.get(k, 0) for k in SYNC_FRAMES),
        "sync_messages_pulled": sum(sim.sync_received.values()),
        "drops": len(sim.drops),
        "events": sim.events,
        "simulated_seconds": sim.now,
    }


def run_all(
    setup: Setup,
    progress: Callable[[str], None] | None = None,
    only: Iterable[str] = RUNS,
) -> list[dict[str, Any]]:
    """The runs named in ``only`` (``RUNS``), in ``RUNS`` order."""
    chosen = set(only)
    runs = []
    for name in RUNS:
        if name not in chosen:
            continue
        strategy, scenario = name.split("-")
        t0, cpu0 = time.perf_counter(), time.process_time()
        sim = simulate(setup, strategy, scenario)
        figures = measure(setup, sim, strategy, scenario)
        del sim  # before the next run is built: one simulation in memory at a time
        figures["wall_seconds"] = time.perf_counter() - t0
        figures["cpu_seconds"] = time.process_time() - cpu0
        runs.append(figures)
        if progress is not None:
            progress(
                f"{strategy} {scenario}: {figures['events']:,} events, "
                f"{figures['simulated_seconds']:.2f} s simulated, "
                f"{figures['wall_seconds']:.1f} s wall, {figures['cpu_seconds']:.1f} s CPU, "
                f"reliability {figures['reliability_mean']:.4f}/{figures['reliability_min']:.4f}"
            )
    return runs


# -- output ------------------------------------------------------------------

COLUMNS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("strategy", "<", lambda r: str(r["strategy"])),
    ("scenario", "<", lambda r: str(r["scenario"])),
    ("live", ">", lambda r: str(r["live_nodes"])),
    (
        "reliability mean/min",
        ">",
        lambda r: f"{r['reliability_mean']:.4f}/{r['reliability_min']:.4f}",
    ),
    ("RMR", ">", lambda r: f"{r['rmr_mean']:.3f}"),
    ("payload/bcast", ">", lambda r: f"{r['payload_per_broadcast']:.1f}"),
    ("last hop max/mean", ">", lambda r: f"{r['last_hop_max']}/{r['last_hop_mean']:.2f}"),
    (
        "latency p50/max ms",
        ">",
        lambda r: f"{r['latency_p50_ms']:.0f}/{r['latency_max_ms']:.0f}",
    ),
    ("control/bcast", ">", lambda r: f"{r['control_frames_per_broadcast']:.1f}"),
)


def table(runs: Sequence[Mapping[str, Any]]) -> str:
    cells = [[fmt(r) for _, _, fmt in COLUMNS] for r in runs]
    widths = [
        max(len(name), *(len(row[i]) for row in cells)) for i, (name, _, _) in enumerate(COLUMNS)
    ]
    lines = []
    header = [f"{name:{align}{w}}" for (name, align, _), w in zip(COLUMNS, widths, strict=True)]
    lines.append("  ".join(header).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        line = [f"{c:{align}{w}}" for c, (_, align, _), w in zip(row, COLUMNS, widths, strict=True)]
        lines.append("  ".join(line).rstrip())
    return "\n".join(lines)


def describe(setup: Setup) -> str:
    n = len(setup.graph)
    gaps = sum(s.gap for s in setup.workload)
    sync = f"every {setup.sync_interval:g} s" if setup.sync_interval else "off"
    origins = len({s.origin for s in setup.workload})
    return (
        f"{n} nodes, {DEGREE}-regular graph ({len(setup.edges)} links), seed {setup.seed}; "
        f"link latency uniform {LATENCY_MIN * 1000:g}-{LATENCY_MAX * 1000:g} ms\n"
        f"{len(setup.workload)} messages from {origins} origins over {gaps:.2f} s; "
        f"crashed scenario: {len(setup.crashed)} nodes down before the first submit, "
        f"the rest connected; periodic re-sync {sync}"
        + (
            f"\ndynamic overlay: {setup.detect * 1000:g} ms after the crash the survivors "
            f"learn a repaired graph ({_links(setup.live_graph)} links) within "
            f"{GRAPH_SPREAD * 1000:g} ms; the crashed scenario's workload starts then"
            if setup.overlay == "dynamic"
            else ""
        )
    )


def _links(graph: Mapping[int, frozenset[int]]) -> int:
    return sum(len(nbs) for nbs in graph.values()) // 2


# -- command -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="gossip-sim",
        description=(
            "Simulate flood and Plumtree on a 3-regular graph, stable and with crashed "
            "nodes, and print reliability, redundancy, hops, latency and control traffic."
        ),
    )
    p.add_argument("--nodes", type=whole(low=1), default=1000, help="default 1000")
    p.add_argument("--messages", type=whole(low=1), default=200, help="default 200")
    p.add_argument("--seed", type=int, default=1, help="default 1")
    p.add_argument(
        "--crash",
        type=real(low=0, below=1),
        default=0.2,
        metavar="F",
        help="share crashed (default 0.2)",
    )
    p.add_argument(
        "--gap-ms",
        type=real(low=0),
        default=5.0,
        metavar="MS",
        help="time between submits, uniform in [0, MS] (default 5)",
    )
    p.add_argument(
        "--origins",
        type=whole(low=0),
        default=0,
        metavar="K",
        help="draw origins from K random live nodes (default 0: from all of them)",
    )
    p.add_argument(
        "--sync-interval",
        type=real(low=0),
        default=0.0,
        metavar="S",
        help="periodic re-sync every S simulated seconds (default 0: off)",
    )
    p.add_argument(
        "--time-limit",
        type=real(low=0),
        default=60.0,
        metavar="S",
        help="stop a run S simulated seconds after its first submit (default 60)",
    )
    p.add_argument(
        "--max-events",
        type=whole(low=1),
        default=50_000_000,
        metavar="N",
        help="fail a run after N events (default 50,000,000)",
    )
    p.add_argument(
        "--overlay",
        choices=OVERLAYS,
        default="static",
        help=(
            "static: the graph stays as configured; dynamic: after --detect-ms the live "
            "nodes learn a repaired graph (the crashed nodes' neighbours link to "
            "replacements) before the workload starts (default static)"
        ),
    )
    p.add_argument(
        "--detect-ms",
        type=real(low=0),
        default=1000.0,
        metavar="MS",
        help="dynamic overlay: time from the crash to the repaired graph (default 1000)",
    )
    p.add_argument(
        "--run",
        choices=RUNS,
        action="append",
        metavar="RUN",
        help=f"run only this one (repeatable; default all: {', '.join(RUNS)})",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures here as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        setup = make_setup(
            nodes=args.nodes,
            messages=args.messages,
            seed=args.seed,
            crash_fraction=args.crash,
            gap=args.gap_ms / 1000,
            origins=args.origins,
            sync_interval=args.sync_interval,
            time_limit=args.time_limit,
            max_events=args.max_events,
            overlay=args.overlay,
            detect=args.detect_ms / 1000,
        )
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(describe(setup))
    try:
        runs = run_all(
            setup,
            lambda line: print(f"  {line}", file=sys.stderr, flush=True),
            args.run or RUNS,
        )
    except RuntimeError as e:  # SimulationLimit
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 1
    print()
    print(table(runs))
    if args.json:
        document = {
            "settings": {
                "nodes": args.nodes,
                "messages": args.messages,
                "seed": args.seed,
                "crash": args.crash,
                "gap_ms": args.gap_ms,
                "origins": args.origins,
                "sync_interval": args.sync_interval,
                "time_limit": args.time_limit,
                "max_events": args.max_events,
                "overlay": args.overlay,
                "detect_ms": args.detect_ms,
                "runs": [r for r in RUNS if r in (args.run or RUNS)],
                "degree": DEGREE,
                "latency_ms": [LATENCY_MIN * 1000, LATENCY_MAX * 1000],
            },
            "graph": {"links": len(setup.edges), "crashed": list(setup.crashed)},
            "runs": runs,
        }
        try:
            Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"{args.json}: cannot write: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
