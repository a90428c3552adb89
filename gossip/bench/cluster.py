"""``gossip-bench``: the workloads of ``bench-spec.md`` against real node processes.

Every run starts a fresh cluster on loopback (free ports, empty data
directories, one ``twistd`` process per node through ``LocalCluster``, as
users start them), waits until every link is up, runs one workload, reads the
nodes' figures and stops the cluster. Workloads:

- **latency**: 200 messages, one every 20 ms, each to a random node; time from
  the submit call until the last node lists it.
- **throughput**: ``--clients`` concurrent clients submit as fast as the API
  acknowledges for ``--throughput-seconds``; then a bounded drain (120 s).
  Each client keeps ``--window`` calls in flight, each call ``--batch``
  messages to one random node (``submit_messages``: one ``SubmitMany``; with
  ``--batch 1``, ``submit_message`` as ``gclient`` does).
- **resync**: SIGKILL one node, submit 10,000 messages to the others, wait
  until they all hold them, restart it and time its catch-up, with the payload
  bytes and frames it received over what it missed.
- **wan**: latency with ``--link-delay 100`` on every node (100 ms per hop).

Delivery is observed without polling: one client connection per node sends
``Watch``, and the node pushes the ids it holds durably (under its fsync
policy, as bench-spec.md defines delivered), in arrival order, as soon as they
become durable; each id is stamped with the time the push that completed it
reached the bench. (Polling 16 nodes every few milliseconds cost the nodes more
CPU than the messages did, and added up to a poll period to every figure.)

With several ``--strategy`` values every round runs each variant on the same
workload with the same seed, rotating their order from round to round, and the
table quotes each variant's mean over the first variant's. ``--tls on`` runs
every variant with mutual TLS on the peer links (certificates made for the run
in the work directory by ``gossip.certs``); ``--tls both`` runs each strategy
without and with TLS ("flood" and "flood+tls"), so the table's ratio is the
cost of TLS measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, task
from twisted.python.failure import Failure

from gossip.argtypes import OneLineParser, real, whole
from gossip.client.api import GossipClient, NodeUnreachable
from gossip.cluster import ClusterFailed, LocalCluster, free_port_base
from gossip.config import DISSEMINATIONS, FSYNC_POLICIES, ClusterConfig, dump_config, parse_config
from gossip.core.message import id_text, message_id
from gossip.topology import generate_config, summary
from gossip.traffic import PAYLOAD_KINDS

T = TypeVar("T")

WORKLOADS = ("latency", "throughput", "resync", "wan")
TLS_MODES = ("off", "on", "both")
TLS_SUFFIX = "+tls"  # a variant with TLS on its peer links: "flood+tls"
BODY_BYTES = 100
CALL_TIMEOUT = 30.0  # any single client call
SUBMIT_DEADLINE = 300.0  # submitting a fixed number of messages (latency, wan, resync)
STATUS_KINDS_FIELDS = (
    "frames_out",
    "bytes_out",
    "messages_out",
    "frames_in",
    "bytes_in",
    "messages_in",
)
PROGRAM = "gossip-bench"
# Messages per throughput submit call (``--batch``): enough that a call's AMP and
# answer cost is shared by many messages, few enough to stay in one SubmitMany.
DEFAULT_BATCH = 16
MAX_BATCH = 10_000


class BenchError(Exception):
    """The benchmark cannot go on; ``str()`` is one line for the operator."""


def now() -> float:
    return time.perf_counter()


# -- settings -----------------------------------------------------------------


@attrs.frozen
class Settings:
    nodes: int
    workloads: tuple[str, ...]
    strategies: tuple[str, ...]
    rounds: int
    throughput_seconds: float
    clients: int
    window: int
    batch: int
    fsync: str | None
    seed: int
    latency_messages: int
    latency_interval: float
    resync_messages: int
    wan_delay_ms: float
    drain_timeout: float
    ready_timeout: float
    max_messages: int
    log_level: str


def _names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no {what} given")
    for name in names:
        if name not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r} (allowed: {', '.join(allowed)})"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a {what} is given twice in {text!r}")
    return tuple(names)


def _workloads(text: str) -> tuple[str, ...]:
    return _names(text, WORKLOADS, "workload")


def _strategies(text: str) -> tuple[str, ...]:
    # The strategies this build's config accepts (the node refuses any other).
    return _names(text, DISSEMINATIONS, "strategy")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROGRAM,
        description="Run the benchmark workloads (bench-spec.md) against a local cluster of"
        " node processes and print one table.",
    )
    p.add_argument("--nodes", type=whole(low=1), default=16, help="cluster size (default 16)")
    p.add_argument(
        "--workloads",
        type=_workloads,
        default=WORKLOADS,
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)",
    )
    p.add_argument(
        "--strategy",
        type=_strategies,
        default=("flood",),
        help="dissemination strategies to compare, comma-separated; ratios are against"
        " the first (default flood)",
    )
    p.add_argument(
        "--rounds", type=whole(low=1), default=2, help="runs of each workload (default 2)"
    )
    p.add_argument("--throughput-seconds", type=real(above=0), default=10.0, metavar="S")
    p.add_argument(
        "--clients",
        type=whole(low=1),
        default=8,
        help="concurrent submitting clients for throughput and resync (default 8)",
    )
    p.add_argument(
        "--window",
        type=whole(low=1),
        default=16,
        help="submit calls each client keeps in flight, pipelined on its connections (default 16)",
    )
    p.add_argument(
        "--batch",
        type=whole(low=1, high=MAX_BATCH),
        default=DEFAULT_BATCH,
        help="messages per throughput submit call: one SubmitMany each"
        f" (default {DEFAULT_BATCH}; 1: one Submit per message)",
    )
    p.add_argument(
        "--tls",
        choices=TLS_MODES,
        default="off",
        help="mutual TLS on peer links: off (default), on, or both (each strategy without"
        " and with TLS, compared in the same run)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="plot latency distributions and throughput over time (matplotlib)",
    )
    p.add_argument(
        "--fsync", choices=FSYNC_POLICIES, help="fsync policy (default: the cluster default)"
    )
    p.add_argument("--dir", type=Path, help="work directory (default: a temp directory)")
    p.add_argument(
        "--keep", action="store_true", help="keep the nodes' data and logs after the run"
    )
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    k = p.add_argument_group("workload knobs (defaults follow bench-spec.md)")
    k.add_argument("--latency-messages", type=whole(low=1), default=200, metavar="N")
    k.add_argument("--latency-interval-ms", type=real(above=0), default=20.0, metavar="MS")
    k.add_argument("--resync-messages", type=whole(low=1), default=10_000, metavar="N")
    k.add_argument("--wan-delay-ms", type=real(above=0), default=100.0, metavar="MS")
    k.add_argument("--drain-timeout", type=real(above=0), default=120.0, metavar="S")
    k.add_argument("--ready-timeout", type=real(above=0), default=90.0, metavar="S")
    k.add_argument(
        "--max-messages",
        type=whole(low=1),
        default=1_000_000,
        metavar="N",
        help="cap on messages one throughput run submits",
    )
    k.add_argument("--log-level", default="warn", help="the nodes' log level (default warn)")
    return p


def variants(strategies: Sequence[str], tls: str) -> tuple[str, ...]:
    """The variants a run compares: each strategy, with ``TLS_SUFFIX`` for TLS."""
    suffixes = {"off": ("",), "on": (TLS_SUFFIX,), "both": ("", TLS_SUFFIX)}[tls]
    return tuple(s + suffix for s in strategies for suffix in suffixes)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        nodes=args.nodes,
        workloads=args.workloads,
        strategies=variants(args.strategy, args.tls),
        rounds=args.rounds,
        throughput_seconds=args.throughput_seconds,
        clients=args.clients,
        window=args.window,
        batch=args.batch,
        fsync=args.fsync,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31),
        latency_messages=args.latency_messages,
        latency_interval=args.latency_interval_ms / 1000.0,
        resync_messages=args.resync_messages,
        wan_delay_ms=args.wan_delay_ms,
        drain_timeout=args.drain_timeout,
        ready_timeout=args.ready_timeout,
        max_messages=args.max_messages,
        log_level=args.log_level,
    )


# -- the machine and the processes ---------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_peak_rss(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process in bytes, else None."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def git_commit() -> str:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, max(0.0, seconds))


async def with_timeout(reactor: Any, coro: Coroutine[Any, Any, T], seconds: float) -> T:
    d: defer.Deferred[T] = defer.Deferred.fromCoroutine(coro)
    d.addTimeout(seconds, reactor)
    return await d


async def gather(coros: Iterable[Coroutine[Any, Any, T] | defer.Deferred[T]]) -> list[T]:
    ds: list[defer.Deferred[T]] = [
        c if isinstance(c, defer.Deferred) else defer.Deferred.fromCoroutine(c) for c in coros
    ]
    try:
        return await defer.gatherResults(ds, consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
        raise  # not reached


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of unsorted values, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
    return ordered[k]


def make_body(rng: random.Random, i: int, tag: str) -> str:
    """100 printable characters, unique per (tag, i): random hex after the tag (one
    call for the filler; drawing each character cost the bench 10 us per message)."""
    head = f"{tag}:{i}:"
    fill = BODY_BYTES - len(head)
    return head + rng.randbytes((fill + 1) // 2).hex()[:fill]


def raw_id(body: str) -> bytes:
    """The id a node gives ``body`` (a hash: the bench need not decode the node's text)."""
    return message_id(body.encode("utf-8"))


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


# -- delivery detection --------------------------------------------------------


class DeliveryTracker:
    """Follows some nodes with ``Watch`` and stamps each id when the last of them has it.

    One connection per node. A node pushes the ids it holds durably, in arrival
    order, as soon as they are durable (one ``Delivered`` per batch); an id is
    stamped with the time the push that completed it reached this process. Ids are
    the raw 16 bytes (``raw_id``): turning each into text, 16 times per message,
    cost the bench more CPU than anything else at 10,000 messages a second.
    """

    def __init__(self, reactor: Any, clients: Mapping[int, GossipClient]) -> None:
        self.reactor = reactor
        self.clients = dict(clients)
        self.target = len(self.clients)
        self.count: dict[bytes, int] = {}
        self.full_at: dict[bytes, float] = {}
        self.cursor = dict.fromkeys(self.clients, 0)
        self.pushes = 0
        self.errors = 0  # pushes that did not start at the node's cursor
        self._running = False

    async def start(self) -> None:
        self._running = True
        await gather(
            c.watch(functools.partial(self._delivered, n)) for n, c in self.clients.items()
        )

    def halt(self) -> None:
        """Ignore pushes from now on."""
        self._running = False

    async def stop(self) -> None:
        self.halt()

    def _delivered(self, node: int, start: int, ids: list[bytes]) -> None:
        if not self._running:
            return
        t = now()
        self.pushes += 1
        if start != self.cursor[node]:
            self.errors += 1
        self.cursor[node] = start + len(ids)
        count, target, full_at = self.count, self.target, self.full_at
        for mid in ids:
            c = count.get(mid, 0) + 1
            count[mid] = c
            if c == target:
                full_at[mid] = t

    def missing(self, ids: Iterable[bytes]) -> int:
        """Node-id pairs not (yet) seen among ``ids``."""
        return sum(self.target - self.count.get(i, 0) for i in ids)

    async def wait_all(
        self, ids: Sequence[bytes], timeout: float, alive: Callable[[], None]
    ) -> bool:
        """Until every node lists every id (True) or ``timeout`` passes (False)."""
        deadline = now() + timeout
        done = 0  # ids[:done] are all delivered; they mostly complete in order
        while True:
            while done < len(ids) and ids[done] in self.full_at:
                done += 1
            if done == len(ids):
                return True
            alive()
            if now() > deadline:
                return False
            await sleep(self.reactor, 0.02)


# -- node accounting -----------------------------------------------------------


def traffic_table(status: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    return {
        str(row["kind"]): {f: int(row[f]) for f in STATUS_KINDS_FIELDS} for row in status["traffic"]
    }


def fsyncs_of(status: Mapping[str, Any]) -> int:
    return sum(int(row["fsyncs"]) for row in status.get("store", ()))


def _add(
    into: dict[str, dict[str, int]], table: Mapping[str, Mapping[str, int]], sign: int
) -> None:
    for kind, row in table.items():
        acc = into.setdefault(kind, dict.fromkeys(STATUS_KINDS_FIELDS, 0))
        for f in STATUS_KINDS_FIELDS:
            acc[f] += sign * row.get(f, 0)


class Usage:
    """Traffic counters and CPU of every node process between ``begin`` and ``end``.

    A node that is killed and restarted is counted in two parts: up to its
    last reading before the kill, and its new process from its start (so
    the restart's own start-up CPU is included).
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.base_traffic: dict[int, dict[str, dict[str, int]]] = {}
        self.base_cpu: dict[int, float] = {}
        self.acc_traffic: dict[str, dict[str, int]] = {}
        self.acc_cpu = 0.0
        self.base_fsyncs: dict[int, int] = {}
        self.acc_fsyncs = 0
        self.peak_rss: dict[int, int] = {}
        self.own_cpu = 0.0
        self.idle_cpu_rate: float | None = None
        self.began = 0.0

    async def status(self, node: int) -> dict[str, Any]:
        s = await self.cluster.node_status(node)
        if s is None:
            raise BenchError(f"node {node} did not answer Status")
        return s

    def pid(self, node: int) -> int:
        p = self.cluster.processes[node].pid
        if p is None:
            raise BenchError(f"node {node} has no process id")
        return p

    def cpu(self, node: int) -> float:
        return process_cpu_seconds(self.pid(node)) or 0.0

    def _note_rss(self, node: int) -> None:
        rss = process_peak_rss(self.pid(node))
        if rss is not None:
            self.peak_rss[node] = max(rss, self.peak_rss.get(node, 0))

    async def calibrate(self, reactor: Any, seconds: float = 1.0) -> None:
        """CPU per second of all nodes while idle (ticks, pings, anti-entropy; watched).

        Subtracted from the workload's CPU for the "net of idle" estimate.
        """
        await sleep(reactor, 0.2)
        nodes = sorted(self.cluster.config.nodes)
        before = sum(self.cpu(n) for n in nodes)
        t = now()
        await sleep(reactor, seconds)
        self.idle_cpu_rate = (sum(self.cpu(n) for n in nodes) - before) / (now() - t)

    async def begin(self) -> None:
        for n in sorted(self.cluster.config.nodes):
            status = await self.status(n)
            self.base_traffic[n] = traffic_table(status)
            self.base_fsyncs[n] = fsyncs_of(status)
            self.base_cpu[n] = self.cpu(n)
        self.own_cpu = own_cpu_seconds()
        self.began = now()

    async def close_epoch(self, node: int) -> dict[str, Any]:
        """Count a node up to now, before it is killed; its status then."""
        s = await self.status(node)
        _add(self.acc_traffic, traffic_table(s), 1)
        _add(self.acc_traffic, self.base_traffic[node], -1)
        self.acc_fsyncs += fsyncs_of(s) - self.base_fsyncs[node]
        self.base_fsyncs[node] = 0
        self.acc_cpu += self.cpu(node) - self.base_cpu[node]
        self._note_rss(node)
        self.base_traffic[node] = {}
        self.base_cpu[node] = 0.0
        return s

    async def end(self) -> dict[str, Any]:
        traffic: dict[str, dict[str, int]] = {}
        _add(traffic, self.acc_traffic, 1)
        cpu = self.acc_cpu
        fsyncs = self.acc_fsyncs
        for n in sorted(self.cluster.config.nodes):
            status = await self.status(n)
            _add(traffic, traffic_table(status), 1)
            _add(traffic, self.base_traffic[n], -1)
            fsyncs += fsyncs_of(status) - self.base_fsyncs[n]
            cpu += self.cpu(n) - self.base_cpu[n]
            self._note_rss(n)
        return {
            "traffic": traffic,
            "seconds": now() - self.began,
            "idle_cpu_rate": self.idle_cpu_rate,
            "cpu_seconds": cpu,
            "fsyncs": fsyncs,
            "peak_rss": dict(self.peak_rss),
            "bench_cpu_seconds": own_cpu_seconds() - self.own_cpu,
            "nodes": len(self.cluster.config.nodes),
        }


def common_figures(used: Mapping[str, Any], messages: int) -> dict[str, Any]:
    """The figures of every run, per broadcast message."""
    traffic: Mapping[str, Mapping[str, int]] = used["traffic"]
    per = max(messages, 1)

    def total(field: str, kinds: Iterable[str]) -> int:
        return sum(traffic[k][field] for k in kinds if k in traffic)

    payload = [k for k in traffic if k in PAYLOAD_KINDS]
    control = [k for k in traffic if k not in PAYLOAD_KINDS]
    rss = [v / 1e6 for v in used["peak_rss"].values()]
    rate = used["idle_cpu_rate"]
    net = None if rate is None else max(0.0, used["cpu_seconds"] - rate * used["seconds"])
    return {
        "payload_frames_per_message": total("frames_out", payload) / per,
        "payload_messages_per_message": total("messages_out", payload) / per,
        "gossip_messages_per_message": total("messages_out", ["gossip"]) / per,
        "control_frames_per_message": total("frames_out", control) / per,
        "wire_bytes_per_message": total("bytes_out", traffic) / per,
        "cpu_seconds": used["cpu_seconds"],
        "cpu_seconds_per_1000": used["cpu_seconds"] * 1000.0 / per,
        "cpu_us_per_message_per_node": used["cpu_seconds"] * 1e6 / per / used.get("nodes", 1),
        "fsyncs_per_1000": used["fsyncs"] * 1000.0 / per,
        "idle_cpu_per_second": rate,
        "cpu_seconds_per_1000_net": None if net is None else net * 1000.0 / per,
        "workload_seconds": used["seconds"],
        "rss_peak_max_mb": max(rss) if rss else None,
        "rss_peak_mean_mb": sum(rss) / len(rss) if rss else None,
        "bench_cpu_seconds": used["bench_cpu_seconds"],
        "traffic": {k: dict(v) for k, v in sorted(traffic.items())},
    }


# -- one run -------------------------------------------------------------------


@attrs.define
class Run:
    reactor: Any
    settings: Settings
    cluster: LocalCluster
    rng: random.Random
    tag: str
    allowed_down: set[int] = attrs.field(factory=set)
    connections: list[GossipClient] = attrs.field(factory=list)
    trackers: list[DeliveryTracker] = attrs.field(factory=list)

    @property
    def node_ids(self) -> list[int]:
        return sorted(self.cluster.config.nodes)

    def check_alive(self) -> None:
        """Raise if a node process that should run has exited."""
        for n, p in sorted(self.cluster.processes.items()):
            if not p.running and n not in self.allowed_down:
                raise BenchError(
                    f"node {n} exited with status {p.exit_code} during the run"
                    f" (log: {self.cluster.log_path(n)})"
                )

    async def connect(self, node: int) -> GossipClient:
        spec = self.cluster.config.node(node)
        try:
            c = await GossipClient.connect_endpoint(self.reactor, spec.client_address, 5.0)
        except NodeUnreachable as e:
            raise BenchError(f"node {node}: {e}") from None
        self.connections.append(c)
        return c

    async def connect_all(self, nodes: Iterable[int]) -> dict[int, GossipClient]:
        nodes = list(nodes)
        clients = await gather(self.connect(n) for n in nodes)
        return dict(zip(nodes, clients, strict=True))

    def tracker(self, clients: Mapping[int, GossipClient]) -> DeliveryTracker:
        t = DeliveryTracker(self.reactor, clients)
        self.trackers.append(t)
        return t

    def close(self) -> None:
        for t in self.trackers:
            t.halt()
        for c in self.connections:
            c.close()
        self.connections.clear()

    async def submit(self, client: GossipClient, body: str) -> str:
        return await with_timeout(self.reactor, client.submit_message(body), CALL_TIMEOUT)

    async def submit_batch_or_note(
        self, client: GossipClient, node: int, bodies: list[str], errors: list[str]
    ) -> bool:
        """Submit ``bodies`` in one call (``submit_message`` for one); True once all are
        stored. A failed call is noted in ``errors`` as ``submit_or_note`` does."""
        try:
            if len(bodies) == 1:
                await self.submit(client, bodies[0])
            else:
                await with_timeout(self.reactor, client.submit_messages(bodies), CALL_TIMEOUT)
        except Exception as e:
            errors.append(f"node {node}: {e!r}")
            self.check_alive()
            await sleep(self.reactor, 0.05)
            return False
        return True

    async def submit_or_note(
        self, client: GossipClient, node: int, body: str, errors: list[str]
    ) -> str | None:
        """The id; or, for a failed submit, None after noting why in ``errors``, checking
        that every node still runs and pausing briefly (a load loop's retry step)."""
        try:
            return await self.submit(client, body)
        except Exception as e:
            errors.append(f"node {node}: {e!r}")
            self.check_alive()
            await sleep(self.reactor, 0.05)
            return None


async def latency_workload(run: Run, usage: Usage) -> dict[str, Any]:
    """Messages at a fixed interval to random nodes; time until the last node lists each."""
    s = run.settings
    nodes = run.node_ids
    submitters = await run.connect_all(nodes)
    tracker = run.tracker(await run.connect_all(nodes))
    bodies = [make_body(run.rng, i, run.tag) for i in range(s.latency_messages)]
    targets = [run.rng.choice(nodes) for _ in bodies]
    submitted: dict[bytes, float] = {}
    submitted_wall: dict[bytes, float] = {}
    errors: list[str] = []
    slips: list[float] = []

    async def one(node: int, body: str) -> None:
        t, wall = now(), time.time()
        try:
            mid = await run.submit(submitters[node], body)
        except Exception as e:
            errors.append(f"node {node}: {e!r}")
            return
        raw = raw_id(body)
        if mid != id_text(raw):
            errors.append(f"node {node}: id {mid} is not the hash of its body")
            return
        submitted[raw] = t
        submitted_wall[raw] = wall

    await tracker.start()
    await usage.calibrate(run.reactor)
    await usage.begin()
    pending: list[defer.Deferred[None]] = []
    start = now() + 0.05
    for i, (node, body) in enumerate(zip(targets, bodies, strict=True)):
        due = start + i * s.latency_interval
        if due > now():
            await sleep(run.reactor, due - now())
        slips.append(now() - due)
        if now() - start > SUBMIT_DEADLINE:
            break
        pending.append(defer.Deferred.fromCoroutine(one(node, body)))
    await gather(pending)
    ids = list(submitted)
    done = await tracker.wait_all(ids, s.drain_timeout, run.check_alive)
    await tracker.stop()
    used = await usage.end()
    lat = [tracker.full_at[i] - submitted[i] for i in ids if i in tracker.full_at]
    # Cross-check without polling: every node stamps received_at with the same
    # machine clock when it stores a message (read after the figures above).
    stamps = await received_at(run, submitters, [i for i in ids if i in tracker.full_at])
    stamped = [max(stamps[i]) - submitted_wall[i] for i in stamps]
    return {
        "figures": {
            "messages": len(ids),
            "latency_p50_ms": ms(percentile(lat, 50)),
            "latency_p99_ms": ms(percentile(lat, 99)),
            "latency_max_ms": ms(max(lat) if lat else None),
            "stamped_p50_ms": ms(percentile(stamped, 50)),
            "stamped_p99_ms": ms(percentile(stamped, 99)),
            "stamped_max_ms": ms(max(stamped) if stamped else None),
            "undelivered_pairs": tracker.missing(ids),
            "submit_errors": len(errors) + len(bodies) - len(pending),
            "all_delivered": done,
            "send_slip_max_ms": ms(max(slips) if slips else None),
            "push_errors": tracker.errors,
            **common_figures(used, len(ids)),
        },
        "latencies_ms": sorted(x * 1000.0 for x in lat),
        "stamped_latencies_ms": sorted(x * 1000.0 for x in stamped),
        "errors": errors[:10],
    }


async def received_at(
    run: Run, clients: Mapping[int, GossipClient], ids: Sequence[bytes]
) -> dict[bytes, list[float]]:
    """id -> every node's received_at of it (``Get`` on each node, nodes in parallel)."""
    out: dict[bytes, list[float]] = {i: [] for i in ids}

    async def node(client: GossipClient) -> None:
        for i in ids:
            m = await with_timeout(run.reactor, client.get_message(id_text(i)), CALL_TIMEOUT)
            out[i].append(m.received_at)

    await gather(node(c) for c in clients.values())
    return out


async def throughput_workload(run: Run, usage: Usage) -> dict[str, Any]:
    """Concurrent clients submit as fast as acknowledged; then a bounded drain."""
    s = run.settings
    nodes = run.node_ids
    workers = [await run.connect_all(nodes) for _ in range(s.clients)]
    tracker = run.tracker(await run.connect_all(nodes))
    submitted: dict[bytes, float] = {}
    acked: list[float] = []
    errors: list[str] = []
    counter = [0]
    last_ack = [0.0]

    async def worker(conns: dict[int, GossipClient], end: float) -> None:
        while now() < end and counter[0] < s.max_messages:
            i = counter[0]
            n = min(s.batch, s.max_messages - i)
            counter[0] += n
            node = run.rng.choice(nodes)
            bodies = [make_body(run.rng, i + k, run.tag) for k in range(n)]
            t = now()
            if not await run.submit_batch_or_note(conns[node], node, bodies, errors):
                continue
            t_ack = now()
            for body in bodies:
                submitted[raw_id(body)] = t
            acked.extend([t_ack] * n)
            last_ack[0] = max(last_ack[0], t_ack)

    await tracker.start()
    await usage.calibrate(run.reactor)
    await usage.begin()
    first = now()
    end = first + s.throughput_seconds
    await gather(worker(w, end) for w in workers for _ in range(s.window))
    ids = list(submitted)
    done = await tracker.wait_all(ids, s.drain_timeout, run.check_alive)
    await tracker.stop()
    used = await usage.end()
    bench_cpu = used["bench_cpu_seconds"]
    fulls = [tracker.full_at[i] for i in ids if i in tracker.full_at]
    last_full = max(fulls) if fulls else None
    first_submit = min(submitted.values()) if submitted else first
    lat = [tracker.full_at[i] - submitted[i] for i in ids if i in tracker.full_at]
    return {
        "figures": {
            "messages": len(ids),
            "delivered_per_second": (
                len(fulls) / (last_full - first_submit) if last_full is not None else 0.0
            ),
            "submitted_per_second": len(ids) / max(last_ack[0] - first_submit, 1e-9),
            "drain_seconds": (last_full - last_ack[0]) if last_full is not None else None,
            "undelivered_pairs": tracker.missing(ids),
            "submit_errors": len(errors),
            "all_delivered": done,
            "latency_p50_ms": ms(percentile(lat, 50)),
            "latency_p99_ms": ms(percentile(lat, 99)),
            "push_errors": tracker.errors,
            "pushes_per_message": tracker.pushes / max(len(ids), 1),
            "bench_cpu_share": bench_cpu / max(used["seconds"], 1e-9),
            **common_figures(used, len(ids)),
        },
        "latencies_ms": quantiles_ms(lat, PLOT_POINTS),
        "timeline": timeline(first_submit, acked, fulls),
        "errors": errors[:10],
    }


PLOT_POINTS = 2000  # latency quantiles kept per throughput run (for --plot)
TIMELINE_BIN_SECONDS = 0.5


def quantiles_ms(values: Sequence[float], points: int) -> list[float]:
    """At most ``points`` evenly spaced order statistics of ``values`` (seconds), in ms,
    sorted: a run of 100,000 messages plots as well from 2,000."""
    ordered = sorted(values)
    if len(ordered) <= points:
        return [v * 1000.0 for v in ordered]
    step = (len(ordered) - 1) / (points - 1)
    return [ordered[round(i * step)] * 1000.0 for i in range(points)]


def timeline(start: float, acked: Sequence[float], delivered: Sequence[float]) -> dict[str, Any]:
    """Messages acknowledged and delivered to every node per TIMELINE_BIN_SECONDS
    since ``start``, as rates (msg/s): throughput over time."""
    end = max([*acked, *delivered], default=start)
    bins = int((end - start) // TIMELINE_BIN_SECONDS) + 1

    def rates(times: Sequence[float]) -> list[float]:
        counts = [0] * bins
        for t in times:
            counts[min(bins - 1, max(0, int((t - start) // TIMELINE_BIN_SECONDS)))] += 1
        return [c / TIMELINE_BIN_SECONDS for c in counts]

    return {
        "bin_seconds": TIMELINE_BIN_SECONDS,
        "acknowledged_per_second": rates(acked),
        "delivered_per_second": rates(delivered),
    }


async def resync_workload(run: Run, usage: Usage) -> dict[str, Any]:
    """Kill a node, submit to the others, restart it: catch-up time and bytes it received."""
    s = run.settings
    nodes = run.node_ids
    victim = run.rng.choice(nodes)
    others = [n for n in nodes if n != victim]
    workers = [await run.connect_all(others) for _ in range(s.clients)]
    tracker = run.tracker(await run.connect_all(others))
    bodies = [make_body(run.rng, i, run.tag) for i in range(s.resync_messages)]
    queue = list(reversed(bodies))
    submitted: dict[bytes, float] = {}
    submitted_bytes: dict[bytes, int] = {}
    errors: list[str] = []

    await tracker.start()
    await usage.calibrate(run.reactor)
    await usage.begin()
    await usage.close_epoch(victim)
    run.allowed_down.add(victim)
    await run.cluster.kill_node(victim)
    deadline = now() + SUBMIT_DEADLINE

    async def worker(conns: dict[int, GossipClient]) -> None:
        while queue and now() < deadline:
            body = queue.pop()
            node = run.rng.choice(others)
            mid = await run.submit_or_note(conns[node], node, body, errors)
            if mid is None:
                continue
            raw = raw_id(body)
            submitted[raw] = now()
            submitted_bytes[raw] = len(body.encode())

    await gather(worker(w) for w in workers for _ in range(s.window))
    ids = list(submitted)
    others_done = await tracker.wait_all(ids, s.drain_timeout, run.check_alive)
    await tracker.stop()
    missed_bytes = sum(submitted_bytes.values())

    restarted = now()
    run.cluster.start_node(victim)
    run.allowed_down.discard(victim)
    client = await _connect_when_up(run, victim, restarted + s.ready_timeout)
    up = now()
    victim_tracker = run.tracker({victim: client})
    await victim_tracker.start()
    done = await victim_tracker.wait_all(ids, s.drain_timeout, run.check_alive)
    caught_up = max(
        (victim_tracker.full_at[i] for i in ids if i in victim_tracker.full_at), default=None
    )
    await victim_tracker.stop()
    await sleep(run.reactor, 1.0)  # let late duplicates arrive: they are part of the cost
    status = await usage.status(victim)
    received = traffic_table(status)
    used = await usage.end()
    payload = [k for k in received if k in PAYLOAD_KINDS]
    count = max(len(ids), 1)
    return {
        "figures": {
            "messages": len(ids),
            "restarted_node": victim,
            "catchup_seconds": (caught_up - restarted) if caught_up is not None else None,
            "catchup_from_up_seconds": (caught_up - up) if caught_up is not None else None,
            "missed_messages": len(ids),
            "missed_bytes": missed_bytes,
            "payload_bytes_in": sum(received[k]["bytes_in"] for k in payload),
            "payload_frames_in": sum(received[k]["frames_in"] for k in payload),
            "payload_messages_in": sum(received[k]["messages_in"] for k in payload),
            "payload_bytes_ratio": sum(received[k]["bytes_in"] for k in payload)
            / max(missed_bytes, 1),
            "payload_frames_ratio": sum(received[k]["frames_in"] for k in payload) / count,
            "payload_messages_ratio": sum(received[k]["messages_in"] for k in payload) / count,
            "undelivered_pairs": victim_tracker.missing(ids) + tracker.missing(ids),
            "submit_errors": len(errors) + len(bodies) - len(ids),
            "all_delivered": done and others_done,
            "sync": status.get("sync", []),
            "push_errors": tracker.errors + victim_tracker.errors,
            **common_figures(used, len(ids)),
        },
        "errors": errors[:10],
    }


async def _connect_when_up(run: Run, node: int, deadline: float) -> GossipClient:
    while True:
        p = run.cluster.processes[node]
        if not p.running:
            raise BenchError(
                f"restarted node {node} exited with status {p.exit_code}"
                f" (log: {run.cluster.log_path(node)})"
            )
        try:
            return await run.connect(node)
        except BenchError:
            if now() > deadline:
                raise
        await sleep(run.reactor, 0.02)


WORKLOAD_FUNCTIONS: dict[str, Callable[[Run, Usage], Awaitable[dict[str, Any]]]] = {
    "latency": latency_workload,
    "throughput": throughput_workload,
    "resync": resync_workload,
    "wan": latency_workload,
}


def bench_certs(workdir: Path, nodes: int) -> Path:
    """A CA and a certificate per node in ``workdir/tls`` (made once per bench run)."""
    from gossip.certs import CertDir

    certs = CertDir(workdir / "tls")
    if not certs.bundle.exists():
        certs.init_ca("bench", 2)
        for n in range(1, nodes + 1):
            certs.issue_node(n, ["127.0.0.1"], 2)
    return certs.path


def cluster_config(settings: Settings, variant: str, tls_dir: Path | None = None) -> ClusterConfig:
    """The cluster file of one run: fresh ports, the variant's strategy (and TLS, with
    the certificates in ``tls_dir``), the fsync policy."""
    n = settings.nodes
    strategy = variant.removesuffix(TLS_SUFFIX)
    base = free_port_base(2 * n + 1)  # peer ports base+1..base+n, clients to base+2n
    config = generate_config(n, base_peer_port=base, base_client_port=base + n, seed=settings.seed)
    config = attrs.evolve(
        config,
        dissemination=strategy,
        fsync=settings.fsync if settings.fsync is not None else config.fsync,
    )
    if variant.endswith(TLS_SUFFIX):
        assert tls_dir is not None
        config = attrs.evolve(
            config,
            tls=True,
            tls_ca=str(tls_dir.resolve() / "ca-bundle.crt"),
            tls_cert=str(tls_dir.resolve() / "node-{id}.crt"),
            tls_key=str(tls_dir.resolve() / "node-{id}.key"),
        )
    # Through the parser, so that a bad value fails here with the config's own message.
    return parse_config(dump_config(config), "<bench>")


class Progress:
    def __init__(self) -> None:
        self.started = now()

    def say(self, text: str) -> None:
        print(f"[{now() - self.started:7.1f} s] {text}", file=sys.stderr, flush=True)


class Current:
    """The cluster that is up, so that a shutdown (Ctrl-C) can stop its nodes."""

    cluster: LocalCluster | None = None


async def run_one(
    reactor: Any,
    settings: Settings,
    workdir: Path,
    workload: str,
    strategy: str,
    round_no: int,
    current: Current,
) -> dict[str, Any]:
    name = f"{workload}-{strategy}-r{round_no}"
    directory = workdir / name
    directory.mkdir(parents=True)
    extra = ["--link-delay", f"{settings.wan_delay_ms:g}"] if workload == "wan" else []
    attempts = 3
    for attempt in range(1, attempts + 1):
        tls_dir = bench_certs(workdir, settings.nodes) if strategy.endswith(TLS_SUFFIX) else None
        config = cluster_config(settings, strategy, tls_dir)
        path = directory / "cluster.toml"
        path.write_text(dump_config(config))
        cluster = LocalCluster(
            reactor, path, directory, log_level=settings.log_level, extra_args=extra
        )
        current.cluster = cluster
        starting = now()
        cluster.start_all()
        try:
            await cluster.wait_ready(settings.ready_timeout)
            break
        except ClusterFailed as e:
            await cluster.stop_all()
            current.cluster = None
            # Another program may take a port between the search and the listen.
            if "cannot listen" in str(e) and attempt < attempts:
                for n in config.nodes:
                    shutil.rmtree(cluster.node_dir(n), ignore_errors=True)
                continue
            raise BenchError(f"{name}: {e}") from None
    startup = now() - starting
    rng = random.Random(f"{settings.seed}/{workload}/{round_no}")  # same for every variant
    run = Run(reactor, settings, cluster, rng, tag=f"{workload[0]}{round_no}")
    started = now()
    try:
        out = await WORKLOAD_FUNCTIONS[workload](run, Usage(cluster))
    finally:
        run.close()
        await cluster.stop_all()
        current.cluster = None
    out["figures"]["wall_seconds"] = now() - started
    out["figures"]["startup_seconds"] = startup
    return {
        "workload": workload,
        "strategy": strategy,
        "round": round_no,
        "directory": str(directory),
        "extra_args": extra,
        **out,
    }


def schedule(settings: Settings) -> list[tuple[int, str, str]]:
    """(round, workload, strategy) in run order: every round runs each workload once per
    variant, and the variants' order rotates from round to round (AB, BA, ...)."""
    out = []
    k = len(settings.strategies)
    for r in range(settings.rounds):
        order = settings.strategies[r % k :] + settings.strategies[: r % k]
        for w in settings.workloads:
            for strategy in order:
                out.append((r + 1, w, strategy))
    return out


async def run_all(
    reactor: Any, settings: Settings, workdir: Path, current: Current
) -> dict[str, Any]:
    from gossip.bench.report import headline

    plan = schedule(settings)
    progress = Progress()
    sample = generate_config(settings.nodes, seed=settings.seed)
    result: dict[str, Any] = {
        "machine": machine(),
        "commit": git_commit(),
        "settings": {
            **attrs.asdict(settings),
            "topology": summary(sample),
            "edges": sample.edges(),
            "fsync_policy": settings.fsync or sample.fsync,
            "body_bytes": BODY_BYTES,
        },
        "runs": [],
    }
    for k, (round_no, workload, strategy) in enumerate(plan, 1):
        progress.say(f"run {k}/{len(plan)}: {workload}, {strategy}, round {round_no}")
        run = await run_one(reactor, settings, workdir, workload, strategy, round_no, current)
        result["runs"].append(run)
        progress.say(f"  {headline(run)}")
    result["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    return result


# -- the command -------------------------------------------------------------


def _run_reactor(
    make: Callable[[Any, Current], Coroutine[Any, Any, dict[str, Any]]],
) -> tuple[dict[str, Any] | None, BaseException | Failure | None]:
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    current = Current()
    out: dict[str, Any] = {}
    errors: list[BaseException | Failure] = []
    finished = [False]

    def stop_nodes() -> defer.Deferred[None] | None:
        cluster = current.cluster
        if cluster is None:
            return None
        return defer.Deferred.fromCoroutine(cluster.stop_all())

    def start() -> None:
        d = defer.Deferred.fromCoroutine(make(reactor, current))

        def ok(result: dict[str, Any]) -> None:
            finished[0] = True
            out.update(result)

        def failed(f: Failure) -> None:
            finished[0] = True
            errors.append(f.value if isinstance(f.value, BenchError) else f)

        d.addCallbacks(ok, failed)
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    reactor.addSystemEventTrigger("before", "shutdown", stop_nodes)
    reactor.callWhenRunning(start)
    reactor.run()
    if errors:
        return None, errors[0]
    if not finished[0]:
        return None, KeyboardInterrupt()
    return out, None


def main(argv: list[str] | None = None) -> int:
    from gossip.bench import report

    args = parser().parse_args(argv)
    settings = settings_from(args)
    try:
        generate_config(settings.nodes, seed=settings.seed)
    except ValueError as e:
        print(f"{PROGRAM}: error: --nodes {settings.nodes}: {e}", file=sys.stderr)
        return 2
    if args.plot is not None and (problem := report.plot_unavailable()):
        print(f"{PROGRAM}: --plot: {problem}", file=sys.stderr)
        return 2
    try:
        if args.dir is not None:
            args.dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="gossip-bench-", dir=args.dir))
    except OSError as e:
        print(f"{PROGRAM}: cannot make a work directory: {e}", file=sys.stderr)
        return 1

    def make(reactor: Any, current: Current) -> Coroutine[Any, Any, dict[str, Any]]:
        return run_all(reactor, settings, workdir, current)

    result, error = _run_reactor(make)
    if result is None:
        if isinstance(error, KeyboardInterrupt):
            print(f"{PROGRAM}: interrupted; logs kept in {workdir}", file=sys.stderr)
            return 130
        if isinstance(error, Failure):
            error.printTraceback(file=sys.stderr)
            print(f"{PROGRAM}: failed; logs kept in {workdir}", file=sys.stderr)
        else:
            print(f"{PROGRAM}: {error}; logs kept in {workdir}", file=sys.stderr)
        return 1
    result["workdir"] = str(workdir) if args.keep else None
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    # The files first: a closed stdout (| head) must not lose them.
    status = 0
    if args.json is not None:
        try:
            report.write_json(result, args.json)
        except OSError as e:
            print(f"{PROGRAM}: cannot write {args.json}: {e}", file=sys.stderr)
            status = 1
    if args.plot is not None:
        try:
            report.write_plot(result, args.plot)
        except (OSError, ValueError) as e:
            print(f"{PROGRAM}: cannot write {args.plot}: {e}", file=sys.stderr)
            status = 1
    try:
        print(report.format_table(result), flush=True)
    except BrokenPipeError:
        # Keep the interpreter's final flush from failing again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.keep:
        print(f"{PROGRAM}: data and logs kept in {workdir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
