"""A gossip cluster in network namespaces, with faults: the lab the fault tests and the
soak command drive.

Each node is ``ip netns exec <its namespace> gossip-node ...`` (``ip`` execs the
node, so the PID we hold is the node's and we reap it ourselves); every client
call goes through the driver process in the client namespace
(``gossip.lab.driver``). The cluster file names the nodes' lab addresses with
short timers (``LAB_TIMERS``) so that links notice a partition and re-sync
quickly after a heal.

``Lab.stop()`` always tears everything down; an ``atexit`` hook does the same
synchronously if the process exits without it, and the next lab sweeps the
namespaces of runs that were killed outright.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from gossip import cluster
from gossip.cluster import installed_command
from gossip.config import ClusterConfig, address_description, dump_config, listen_description
from gossip.lab.driver import CONVERGE_EXTRA, network_namespace
from gossip.lab.netns import Netns, sweep_leftovers
from gossip.topology import generate_config

PEER_PORT = 7001
CLIENT_PORT = 7101
# Short timers: a silent link is dropped within seconds, a healed one re-syncs soon.
LAB_TIMERS: dict[str, float] = {
    "ping_interval": 1.0,
    "idle_timeout": 5.0,
    "reconnect_max_delay": 2.0,
    "sync_interval": 2.0,
    "sync_timeout": 10.0,
}
# Bound on one driver request that is not itself a wait with a deadline.
T = TypeVar("T")

REQUEST_TIMEOUT = 30.0
# Bound on a node's exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 5.0
# A driver reply line can list statuses of every node: generous, but bounded.
MAX_REPLY_BYTES = 16 << 20


def lab_config(netns: Netns, name: str = "lab", **settings: Any) -> ClusterConfig:
    """A degree-3 cluster whose node i is at its lab address, same ports everywhere;
    ``settings`` override cluster settings (e.g. ``overlay="dynamic"``)."""
    base = generate_config(netns.size, name=name)
    nodes = {
        n: attrs.evolve(
            spec,
            host=netns.address(n),
            peer_port=PEER_PORT,
            client_port=CLIENT_PORT,
            peer_listen=listen_description(netns.address(n), PEER_PORT),
            peer_address=address_description(netns.address(n), PEER_PORT),
            client_listen=listen_description(netns.address(n), CLIENT_PORT),
            client_address=address_description(netns.address(n), CLIENT_PORT),
            web_listen=None,
        )
        for n, spec in base.nodes.items()
    }
    return attrs.evolve(base, nodes=nodes, **{**LAB_TIMERS, **settings})


def node_command() -> list[str]:
    """``gossip-node`` of this interpreter's environment."""
    return installed_command(
        "gossip-node", "import sys; from gossip.tap import run_node; sys.exit(run_node())"
    )


class NodeProcess(cluster.NodeProcess):
    """One lab node process (``gossip.cluster``'s), and whether the lab ended it."""

    def __init__(self, node_id: int) -> None:
        super().__init__(node_id)
        self.expected_exit = False  # we killed or stopped it on purpose


class DriverProcess(ProcessProtocol):
    """The client driver: JSON requests on its stdin, answers on its stdout."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: dict[int, defer.Deferred[Any]] = {}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exited = False
        self.seq = 0

    def request(self, op: str, **args: Any) -> defer.Deferred[Any]:
        if self.exited or self.transport is None:
            return defer.fail(LabFailed("the lab's client driver is not running"))
        self.seq += 1
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting[self.seq] = d
        self.transport.write(json.dumps({"seq": self.seq, "op": op, **args}).encode() + b"\n")
        return d

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_REPLY_BYTES:
            self.buffer = b""
            self._fail_all("the lab's client driver sent an oversized reply")
            return
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            reply = json.loads(line)
            d = self.waiting.pop(reply.get("seq"), None)
            if d is None:
                continue
            if reply.get("ok"):
                d.callback(reply["result"])
            else:
                d.errback(LabFailed(f"driver: {reply.get('error')}"))

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self._fail_all(f"the lab's client driver exited: {reason.getErrorMessage()}")
        self.ended.callback(None)

    def _fail_all(self, why: str) -> None:
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(LabFailed(why))


class LabFailed(Exception):
    pass


@attrs.frozen
class LinkCount:
    """One side of a link as ``Status`` shows it, and which process of the node said so."""

    generation: int  # the node's process: 1 for the first, +1 per restart
    times_up: int
    up: bool


def _observe(d: defer.Deferred[T]) -> defer.Deferred[T]:
    """A new Deferred with ``d``'s result, leaving ``d``'s own chain untouched (so a
    timeout on it cannot cancel ``d``, and ``d`` can be waited on again)."""
    out: defer.Deferred[T] = defer.Deferred()

    def relay(result: Any) -> Any:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        return result

    d.addBoth(relay)
    return out


_live_labs: list[Lab] = []


@atexit.register
def _teardown_at_exit() -> None:
    for lab in list(_live_labs):
        lab.teardown_now()


_previous_handlers: dict[int, Any] = {}


def _teardown_on_signal(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM: tear every lab down at once, then do what the signal did before
    (pytest-twisted's reactor swallows the KeyboardInterrupt of a Ctrl-C, so a lab
    cannot count on its own teardown running)."""
    _teardown_at_exit()
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_signal_teardown() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current in (_teardown_on_signal, signal.SIG_IGN):
            continue
        _previous_handlers[sig] = current
        signal.signal(sig, _teardown_on_signal)


class Lab:
    """``size`` gossip nodes in network namespaces under ``directory`` (data dirs, logs)."""

    def __init__(
        self, reactor: Any, directory: Path, size: int = 16, settings: dict[str, Any] | None = None
    ) -> None:
        """``settings`` override the cluster file's settings (e.g. the overlay)."""
        self.reactor = reactor
        self.directory = Path(directory)
        self.netns = Netns(size)
        self.config = lab_config(self.netns, name=f"lab-{self.netns.tag}", **(settings or {}))
        self.config_path = self.directory / "cluster.toml"
        self.nodes: dict[int, NodeProcess] = {}
        self.paused: set[int] = set()
        self.driver: DriverProcess | None = None
        # Exits we did not cause, kept across restarts: (node, exit code).
        self.deaths: list[tuple[int, int]] = []
        self.starts: dict[int, int] = {}  # node -> how many processes it has had
        self.torn_down = False

    @property
    def ids(self) -> list[int]:
        return self.netns.nodes

    def node_dir(self, node: int) -> Path:
        return self.directory / f"node-{node}"

    def log_path(self, node: int) -> Path:
        return self.node_dir(node) / "node.log"

    # -- life cycle ----------------------------------------------------------------

    async def start(self, ready_timeout: float = 90.0) -> None:
        """Build the namespaces, start every node and the driver, wait for every link."""
        sweep_leftovers()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_config(self.config))
        _live_labs.append(self)
        _install_signal_teardown()
        self.netns.create()
        for n in self.ids:
            self.start_node(n)
        self.start_driver()
        r = await self.request(
            "wait_links", nodes=self.ids, up=True, timeout=ready_timeout, peers=None
        )
        self.check_no_deaths()
        if not r["done"]:
            raise LabFailed(f"lab not ready after {ready_timeout:g} s: {r['pending']}")

    def start_node(self, node: int) -> NodeProcess:
        self.starts[node] = self.starts.get(node, 0) + 1
        d = self.node_dir(node)
        d.mkdir(parents=True, exist_ok=True)
        args = [
            *self.netns.exec_prefix(self.netns.node_ns(node)),
            *node_command(),
            "--id",
            str(node),
            "--config",
            str(self.config_path),
            "--data-dir",
            str(d),
        ]
        proto = NodeProcess(node)
        proto.ended.addCallback(self._node_ended, proto)
        proto.spawn(self.reactor, args, d, self.log_path(node))
        self.nodes[node] = proto
        return proto

    def _node_ended(self, code: int, proto: NodeProcess) -> int:
        if not proto.expected_exit:
            self.deaths.append((proto.node_id, code))
        return code

    def start_driver(self) -> None:
        args = [
            *self.netns.exec_prefix(self.netns.client_ns),
            sys.executable,
            "-m",
            "gossip.lab.driver",
            "--config",
            str(self.config_path),
            "--tag",
            self.netns.tag,
            "--outside",
            str(network_namespace()),
        ]
        self.driver = DriverProcess()
        with open(self.directory / "driver.log", "ab") as log:
            self.reactor.spawnProcess(
                self.driver,
                args[0],
                args,
                env=os.environ.copy(),
                childFDs={0: "w", 1: "r", 2: log.fileno()},
            )

    async def request(self, op: str, **args: Any) -> Any:
        """One driver request; bounded by its own wait (``timeout``/``deadline``) plus
        ``REQUEST_TIMEOUT``."""
        if self.driver is None:
            raise LabFailed("the lab's client driver is not running")
        d = self.driver.request(op, **args)
        wait = REQUEST_TIMEOUT + float(args.get("timeout", 0)) + float(args.get("deadline", 0))
        if op == "converge":
            wait += CONVERGE_EXTRA  # then it lists every node (see ``Driver.converge``)
        try:
            return await d.addTimeout(wait, self.reactor)
        except defer.TimeoutError:
            raise LabFailed(
                f"the client driver did not answer {op!r} within {wait:.0f} s"
            ) from None

    async def stop(self) -> None:
        """Stop the driver and every node (SIGTERM, then SIGKILL), remove the namespaces."""
        try:
            if self.driver is not None and not self.driver.exited:
                assert self.driver.transport is not None
                self.driver.transport.closeStdin()
                with contextlib.suppress(defer.TimeoutError):
                    await _observe(self.driver.ended).addTimeout(STOP_TIMEOUT, self.reactor)
                if not self.driver.exited:
                    self.driver.transport.signalProcess("KILL")
                    await _observe(self.driver.ended)
            await defer.gatherResults(
                [defer.Deferred.fromCoroutine(self.stop_node(n)) for n in list(self.nodes)]
            )
        finally:
            self.teardown_now()

    async def stop_node(self, node: int) -> None:
        p = self.nodes.get(node)
        if p is None or not p.running:
            return
        p.expected_exit = True
        self._signal(node, signal.SIGCONT)
        self._signal(node, signal.SIGTERM)
        try:
            await _observe(p.ended).addTimeout(STOP_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            self._signal(node, signal.SIGKILL)
            await _observe(p.ended)

    def teardown_now(self) -> None:
        """Synchronous last resort: SIGKILL what still runs, delete the namespaces."""
        self.torn_down = True
        for p in self.nodes.values():
            if p.running and p.pid is not None:
                p.expected_exit = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        if self.driver is not None and not self.driver.exited and self.driver.transport:
            with contextlib.suppress(Exception):
                self.driver.transport.signalProcess("KILL")
        self.netns.destroy()
        if self in _live_labs:
            _live_labs.remove(self)

    # -- faults ------------------------------------------------------------------------

    def _signal(self, node: int, sig: int) -> None:
        p = self.nodes.get(node)
        if p is not None and p.running and p.pid is not None:
            os.kill(p.pid, sig)

    async def kill(self, nodes: Iterable[int]) -> None:
        """kill -9, and wait until each is reaped."""
        procs = [self.nodes[n] for n in nodes if self.nodes[n].running]
        for p in procs:
            p.expected_exit = True
            self._signal(p.node_id, signal.SIGKILL)
        await defer.gatherResults([_observe(p.ended) for p in procs])

    def restart(self, nodes: Iterable[int]) -> None:
        for n in nodes:
            if not self.nodes[n].running:
                self.start_node(n)

    def pause(self, nodes: Iterable[int]) -> None:
        for n in nodes:
            self._signal(n, signal.SIGSTOP)
            self.paused.add(n)

    def resume(self, nodes: Iterable[int]) -> None:
        for n in nodes:
            self._signal(n, signal.SIGCONT)
            self.paused.discard(n)

    def cut(self, node: int) -> None:
        self.netns.cut(node)

    def split(self, side_a: list[int], side_b: list[int]) -> None:
        self.netns.split(side_a, side_b)

    def drop_link(self, a: int, b: int) -> None:
        self.netns.drop_link(a, b)

    def heal(self) -> float:
        """Undo every fault: drop every rule, resume paused nodes, restart killed ones.
        Returns the time of the heal (``time.monotonic()``)."""
        healed_at = time.monotonic()
        self.netns.heal()
        self.resume(list(self.paused))
        self.restart([n for n, p in self.nodes.items() if not p.running])
        return healed_at

    # -- observations --------------------------------------------------------------

    def check_no_deaths(self) -> None:
        if self.deaths:
            raise LabFailed(f"node processes died unbidden: {self.describe_deaths()}")

    def describe_deaths(self) -> str:
        return "; ".join(f"node {n} exited with status {c}" for n, c in self.deaths)

    def tracebacks(self) -> list[int]:
        """Nodes whose log holds a traceback."""
        out = []
        for n in self.ids:
            try:
                text = self.log_path(n).read_text(errors="replace")
            except OSError:
                continue
            if "Traceback" in text:
                out.append(n)
        return out

    async def links(self) -> dict[tuple[int, int], LinkCount]:
        """Each (node, peer) link's state and count of times it came up, for the nodes
        that answer (a paused node is not asked: it would only cost a timeout)."""
        live = [n for n, p in self.nodes.items() if p.running and n not in self.paused]
        generations = {n: self.starts[n] for n in live}
        statuses = await self.request("status", nodes=live)
        out = {}
        for n, s in statuses.items():
            if s is None:
                continue
            for lk in s["links"]:
                out[(int(n), int(lk["peer"]))] = LinkCount(
                    generations[int(n)], int(lk["times_up"]), lk["state"] == "up"
                )
        return out

    async def wait_links(
        self, nodes: list[int], up: bool, timeout: float, peers: list[int] | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "wait_links", nodes=nodes, up=up, timeout=timeout, peers=peers
        )
        return result

    async def load(self, per_node_rate: float, nodes: list[int] | None = None) -> None:
        targets = self.ids if nodes is None else nodes
        await self.request("load", nodes=targets, per_node_rate=per_node_rate)

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.reactor, seconds)
