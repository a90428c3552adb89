"""Run a whole cluster of node processes on this machine: ``gossip-cluster``.

Each node is its own OS process started the way a user starts one
(``twistd -n gossip --id N --config FILE``), logging to
``<state dir>/node-N/node.log``. ``LocalCluster`` is also what the
integration tests and the benchmark use, so they exercise the same path.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from gossip.client.api import GossipClient, NodeUnreachable
from gossip.config import ClusterConfig, ConfigError, dump_config, load_config, web_url
from gossip.locations import state_dir
from gossip.topology import generate_config


def twistd_command() -> list[str]:
    """The twistd of this interpreter's environment (a venv's bin/ first)."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class NodeProcess(ProcessProtocol):
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.exit_code: int | None = None
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.exit_code = code if code is not None else -(sig or 0)
        self.ended.callback(self.exit_code)

    @property
    def running(self) -> bool:
        return self.exit_code is None


class LocalCluster:
    """Node processes for one cluster file, each with its own directory and log."""

    def __init__(
        self,
        reactor: Any,
        config_path: Path,
        directory: Path,
        *,
        log_level: str = "info",
        extra_args: Iterable[str] = (),
    ) -> None:
        self.reactor = reactor
        self.config_path = Path(config_path)
        self.config = load_config(self.config_path)
        self.directory = Path(directory)
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.processes: dict[int, NodeProcess] = {}

    def node_dir(self, node_id: int) -> Path:
        return self.directory / f"node-{node_id}"

    def log_path(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "node.log"

    def start_node(self, node_id: int) -> NodeProcess:
        d = self.node_dir(node_id)
        d.mkdir(parents=True, exist_ok=True)
        args = [
            *twistd_command(),
            "-n",
            "--pidfile=",
            f"--logfile={self.log_path(node_id)}",
            "gossip",
            "--id",
            str(node_id),
            "--config",
            str(self.config_path),
            *([] if "--memory" in self.extra_args else ["--data-dir", str(d)]),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]
        out = open(self.node_dir(node_id) / "stderr.log", "ab")  # noqa: SIM115
        proto = NodeProcess(node_id)
        try:
            self.reactor.spawnProcess(
                proto,
                args[0],
                args,
                env=os.environ.copy(),
                path=str(d),
                childFDs={0: "w", 1: out.fileno(), 2: out.fileno()},
            )
        finally:
            out.close()
        self.processes[node_id] = proto
        return proto

    def start_all(self) -> None:
        for node_id in sorted(self.config.nodes):
            self.start_node(node_id)

    def signal_node(self, node_id: int, sig: int) -> None:
        p = self.processes.get(node_id)
        if p is not None and p.running and p.pid is not None:
            os.kill(p.pid, sig)

    async def stop_node(self, node_id: int, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if the node has not exited within ``timeout``."""
        p = self.processes.get(node_id)
        if p is None or not p.running:
            return
        self.signal_node(node_id, signal.SIGTERM)
        try:
            await p.ended.addTimeout(timeout, self.reactor)
        except defer.TimeoutError:
            self.signal_node(node_id, signal.SIGKILL)
            await p.ended

    async def kill_node(self, node_id: int) -> None:
        p = self.processes.get(node_id)
        if p is None or not p.running:
            return
        self.signal_node(node_id, signal.SIGKILL)
        await p.ended

    async def stop_all(self, timeout: float = 10.0) -> None:
        ds = [
            defer.Deferred.fromCoroutine(self.stop_node(n, timeout)) for n in list(self.processes)
        ]
        await defer.gatherResults(ds)

    async def node_status(self, node_id: int) -> dict[str, Any] | None:
        try:
            client = await GossipClient.connect_node(self.reactor, node_id, self.config, 2.0)
        except NodeUnreachable:
            return None
        try:
            return await client.status()
        except Exception:
            return None
        finally:
            client.close()

    async def wait_ready(self, timeout: float = 60.0, nodes: Iterable[int] | None = None) -> None:
        """Wait until every node answers and has all its links up.

        Raises ``ClusterFailed`` naming what is missing once ``timeout`` passes or
        when a node process exits.
        """
        want = sorted(nodes if nodes is not None else self.config.nodes)
        deadline = self.reactor.seconds() + timeout
        while True:
            dead = [n for n in want if n in self.processes and not self.processes[n].running]
            if dead:
                raise ClusterFailed(self._exit_report(dead))
            missing = []
            for n in want:
                s = await self.node_status(n)
                if s is None:
                    missing.append(f"node {n} not answering")
                else:
                    down = [str(link["peer"]) for link in s["links"] if link["state"] != "up"]
                    if down:
                        missing.append(f"node {n} links to {','.join(down)} not up")
            if not missing:
                return
            if self.reactor.seconds() > deadline:
                raise ClusterFailed(
                    f"cluster not ready after {timeout:g} s: {'; '.join(missing[:5])}"
                )
            await task.deferLater(self.reactor, 0.2)

    def _exit_report(self, dead: list[int]) -> str:
        lines = []
        for n in dead:
            code = self.processes[n].exit_code
            tail = _tail(self.node_dir(n) / "stderr.log") or _tail(self.log_path(n))
            lines.append(f"node {n} exited with status {code}" + (f": {tail}" if tail else ""))
        return "; ".join(lines)


class ClusterFailed(Exception):
    pass


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_base(count: int, attempts: int = 50) -> int:
    """A base port such that base .. base+count-1 are all free on 127.0.0.1 now.

    The block lies below the kernel's ephemeral range, so that outgoing
    connections cannot take a node's port while the node is restarting.
    """
    rng = random.Random()
    top = min(_ephemeral_low(), 65536) - count
    for _ in range(attempts):
        base = rng.randrange(10000, max(top, 10001))
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of loopback ports")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gossip-cluster",
        description="Start a local gossip cluster: one process per node, on loopback.",
    )
    p.add_argument("--nodes", type=int, default=16, help="number of nodes (default 16)")
    p.add_argument("--config", help="use this cluster file instead of generating one")
    p.add_argument("--dir", help="state directory (default: $GOSSIP_HOME or ~/.local/state/gossip)")
    p.add_argument("--base-port", type=int, default=17000, help="first peer port (default 17000)")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--fresh", action="store_true", help="delete the nodes' stored messages before starting"
    )
    p.add_argument(
        "--memory", action="store_true", help="keep messages in memory only (no message logs)"
    )
    p.add_argument("--ready-timeout", type=float, default=60.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    directory = Path(args.dir) if args.dir else state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if args.config:
            config_path = Path(args.config).resolve()
            config = load_config(config_path)
        else:
            config = generate_config(args.nodes, base_peer_port=args.base_port, web=True)
            config_path = directory / "cluster.toml"
            config_path.write_text(dump_config(config))
    except (ConfigError, ValueError, OSError) as e:
        print(f"gossip-cluster: {e}", file=sys.stderr)
        return 2
    result = [0]
    stopping: list[bool] = []

    async def run(reactor: Any) -> None:
        cluster = LocalCluster(
            reactor,
            config_path,
            directory,
            log_level=args.log_level,
            extra_args=["--memory"] if args.memory else [],
        )
        if args.fresh:
            for n in config.nodes:
                shutil.rmtree(cluster.node_dir(n), ignore_errors=True)

        def shutdown() -> defer.Deferred[None]:
            stopping.append(True)
            return defer.Deferred.fromCoroutine(cluster.stop_all())

        reactor.addSystemEventTrigger("before", "shutdown", shutdown)
        cluster.start_all()
        try:
            await cluster.wait_ready(args.ready_timeout)
        except ClusterFailed as e:
            print(f"gossip-cluster: {e}", file=sys.stderr)
            result[0] = 1
            return
        _print_ready(config, config_path, directory)
        for proto in cluster.processes.values():
            proto.ended.addCallback(_report_exit, proto.node_id, cluster, stopping)
        await defer.Deferred()  # until Ctrl-C / SIGTERM stops the reactor

    def start(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(run(reactor))

    try:
        task.react(start)
    except SystemExit as e:
        if e.code not in (0, None):
            result[0] = result[0] or 1
    if result[0] == 0:
        print("gossip-cluster: all nodes stopped", file=sys.stderr)
    return result[0]


def _report_exit(code: int, node_id: int, cluster: LocalCluster, stopping: list[bool]) -> int:
    if stopping:
        return code  # we are stopping every node: nothing to report
    print(
        f"gossip-cluster: node {node_id} exited with status {code}"
        f" (log: {cluster.log_path(node_id)})",
        file=sys.stderr,
    )
    return code


def _print_ready(config: ClusterConfig, config_path: Path, directory: Path) -> None:
    ids = sorted(config.nodes)
    first = ids[0]
    default = state_dir() / "cluster.toml"
    env = "" if config_path == default else f"GOSSIP_CONFIG={config_path} "
    web = web_url(config.nodes[first].web_listen)
    metrics = f"  metrics: {web}metrics (each node on its web_listen)\n" if web else ""
    print(
        f"{len(ids)} nodes of cluster '{config.name}' are up, every link connected.\n"
        f"  config: {config_path}\n"
        f"  logs:   {directory}/node-N/node.log\n"
        f"{metrics}"
        f"In another terminal:\n"
        f'  {env}gclient --id {first} --message "Apple"\n'
        f"  {env}gclient --id {ids[min(4, len(ids) - 1)]} --msgID <id>\n"
        f"  {env}gclient --id {ids[min(3, len(ids) - 1)]} --list\n"
        f"  {env}gclient --id {first} --status\n"
        f"Ctrl-C stops every node.",
        flush=True,
    )
