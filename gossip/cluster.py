"""Run a whole cluster of node processes on this machine: ``gossip-cluster``.

Each node is its own OS process started the way a user starts one
(``twistd -n gossip --id N --config FILE``), logging to
``<state dir>/node-N/node.log``. ``LocalCluster`` is also what the
integration tests and the benchmark use, so they exercise the same path.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.python.failure import Failure

from gossip import pidfile
from gossip.client.api import GossipClient, NodeUnreachable
from gossip.config import ClusterConfig, ConfigError, dump_config, load_config, web_url
from gossip.core.message import message_id, short_id
from gossip.locations import state_dir
from gossip.topology import generate_config


def installed_command(script: str, fallback_code: str) -> list[str]:
    """The console script ``script`` of this interpreter's environment (a venv's bin/
    first, then PATH), else this interpreter running ``fallback_code``."""
    beside = Path(sys.executable).parent / script
    if beside.exists():
        return [str(beside)]
    found = shutil.which(script)
    if found:
        return [found]
    return [sys.executable, "-c", fallback_code]


def twistd_command() -> list[str]:
    """The twistd of this interpreter's environment."""
    return installed_command("twistd", "from twisted.scripts.twistd import run; run()")


class NodeProcess(ProcessProtocol):
    """One node process; ``ended`` fires with its exit code (negative: killed by signal)."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.exit_code: int | None = None
        self.pid: int | None = None
        self._waiters: list[defer.Deferred[int]] = []

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.exit_code = code if code is not None else -(sig or 0)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:  # a waiter that timed out was cancelled
                d.callback(self.exit_code)
        self.ended.callback(self.exit_code)

    def when_ended(self) -> defer.Deferred[int]:
        """A new Deferred firing with the exit code: callers may time it out or
        cancel it without touching ``ended`` or each other."""
        d: defer.Deferred[int] = defer.Deferred()
        if self.exit_code is not None:
            d.callback(self.exit_code)
        else:
            self._waiters.append(d)
        return d

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def spawn(self, reactor: Any, args: list[str], cwd: Path, output: Path) -> None:
        """Start ``args`` in ``cwd`` with this environment, stdout and stderr appended
        to ``output``."""
        with output.open("ab") as out:
            reactor.spawnProcess(
                self,
                args[0],
                args,
                env=os.environ.copy(),
                path=str(cwd),
                childFDs={0: "w", 1: out.fileno(), 2: out.fileno()},
            )


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

    def pid_path(self, node_id: int) -> Path:
        return pidfile.pidfile_path(self.node_dir(node_id))

    def node_command(self, node_id: int) -> list[str]:
        """The command line that runs node ``node_id``, as a user would run it."""
        return [
            *twistd_command(),
            "-n",
            f"--pidfile={self.pid_path(node_id)}",
            f"--logfile={self.log_path(node_id)}",
            "gossip",
            "--id",
            str(node_id),
            "--config",
            str(self.config_path),
            *([] if "--memory" in self.extra_args else ["--data-dir", str(self.node_dir(node_id))]),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def start_node(self, node_id: int) -> NodeProcess:
        d = self.node_dir(node_id)
        d.mkdir(parents=True, exist_ok=True)
        pidfile.clear_stale(self.pid_path(node_id))
        proto = NodeProcess(node_id)
        proto.spawn(self.reactor, self.node_command(node_id), d, d / "stderr.log")
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
            await p.when_ended().addTimeout(timeout, self.reactor)
        except defer.TimeoutError:
            self.signal_node(node_id, signal.SIGKILL)
            await p.when_ended()

    async def kill_node(self, node_id: int) -> None:
        p = self.processes.get(node_id)
        if p is None or not p.running:
            return
        self.signal_node(node_id, signal.SIGKILL)
        await p.when_ended()

    async def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every node: those this object started, then any node of this
        cluster's directory started by hand (``gossip-cluster start-node``), found
        by its pid file."""
        ds = [
            defer.Deferred.fromCoroutine(self.stop_node(n, timeout)) for n in list(self.processes)
        ]
        await defer.gatherResults(ds)
        ours = {p.pid for p in self.processes.values()}
        others = [pid for pid in self.running_by_pidfile().values() if pid not in ours]
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(stop_pid(self.reactor, pid, timeout)) for pid in others]
        )

    def running_by_pidfile(self) -> dict[int, int]:
        """node id -> pid of every live node whose pid file is in this directory (the
        cluster file's nodes and any added since this object read it)."""
        found = {}
        for path in sorted(self.directory.glob("node-*/" + pidfile.PIDFILE_NAME)):
            node = path.parent.name.removeprefix("node-")
            pid = pidfile.running_node(path)
            if node.isdigit() and pid is not None:
                found[int(node)] = pid
        return found

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

        A node this object started counts only when the process answering on its
        client port is that very process (the pid in its status), so another
        cluster on the same ports is never taken for this one. Raises
        ``ClusterFailed`` naming what is missing once ``timeout`` passes or when a
        node process exits.
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
                started = self.processes.get(n)
                if s is None:
                    missing.append(f"node {n} not answering")
                elif started is not None and s.get("pid") != started.pid:
                    spec = self.config.node(n)
                    missing.append(
                        f"node {n}'s client port {spec.host}:{spec.client_port} is answered by"
                        f" another process (pid {s.get('pid', '?')}), not ours"
                        f" (pid {started.pid})"
                    )
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
        for n in dead[:3]:
            code = self.processes[n].exit_code
            last = tail(self.node_dir(n) / "stderr.log") or tail(self.log_path(n))
            lines.append(f"node {n} exited with status {code}" + (f": {last}" if last else ""))
        if len(dead) > 3:
            lines.append(f"and {len(dead) - 3} more nodes exited")
        return "; ".join(lines)


async def stop_pid(reactor: Any, pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM the process ``pid``, SIGKILL it after ``timeout``; True once it has
    exited (a zombie counts: its parent is gone or not ours to wait for)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = reactor.seconds() + wait
        while pidfile.is_running(pid):
            if reactor.seconds() > deadline:
                break
            await task.deferLater(reactor, 0.05)
        else:
            return True
    return not pidfile.is_running(pid)


async def ports_in_use(reactor: Any, config: ClusterConfig) -> list[str]:
    """The cluster's listening addresses that something already holds, each as
    ``"127.0.0.1:17001 (node 1's peer port)"``. Each ``*_listen`` endpoint is tried
    the way the node will listen (so ports in TIME_WAIT do not count) and released
    at once; an endpoint that fails for another reason is left for the node to report."""
    busy = []
    for spec in config.nodes.values():
        for what, description in (("peer", spec.peer_listen), ("client", spec.client_listen)):
            try:
                port = await serverFromString(reactor, description).listen(Factory())
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EADDRINUSE:
                    busy.append(f"{e.interface or '*'}:{e.port} (node {spec.id}'s {what} port)")
                continue
            except Exception:
                continue
            await port.stopListening()
    return busy


# Seconds the launcher waits, after one of its nodes ended, before saying so: long
# enough for restart-node to have started it again (then it says that instead).
RESTART_GRACE = 3.0


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
        if ports_free(base, count):
            return base
    raise RuntimeError("no free block of loopback ports")


def ports_free(base: int, count: int) -> bool:
    """Whether loopback ports base .. base+count-1 can all be bound now."""
    socks = []
    try:
        for port in range(base, base + count):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gossip-cluster",
        description="Start a local gossip cluster: one process per node, on loopback."
        " One node of a running cluster: gossip-cluster {start-node,stop-node,restart-node,"
        "node-status} N, gossip-cluster add-node (each with --help).",
    )
    p.add_argument(
        "--nodes",
        type=int,
        help="number of nodes (default 16); writes a new cluster file even if one exists",
    )
    p.add_argument("--config", help="use this cluster file instead of the state directory's")
    p.add_argument("--dir", help="state directory (default: $GOSSIP_HOME or ~/.local/state/gossip)")
    p.add_argument(
        "--base-port",
        type=int,
        help="first peer port (default 17000); writes a new cluster file even if one exists",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the nodes' stored messages and write a new cluster file before starting",
    )
    p.add_argument(
        "--memory", action="store_true", help="keep messages in memory only (no message logs)"
    )
    p.add_argument("--ready-timeout", type=float, default=60.0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from gossip import node_control

    if argv and argv[0] in node_control.COMMANDS:
        return node_control.main(argv)
    args = parser().parse_args(argv)
    directory = Path(args.dir) if args.dir else state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        config_path, config = _cluster_file(args, directory)
    except (ConfigError, ValueError, OSError) as e:
        return fail(e, 2)
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
        await _stop_leftovers(reactor, cluster)
        if args.fresh:
            for n in config.nodes:
                shutil.rmtree(cluster.node_dir(n), ignore_errors=True)
        busy = await ports_in_use(reactor, config)
        if busy:
            more = f" (and {len(busy) - 1} more of its ports)" if len(busy) > 1 else ""
            result[0] = fail(
                f"port {busy[0]} is in use{more}: another cluster or program is listening"
                " there; stop it, or choose other ports with --base-port",
                1,
            )
            return

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
        print(ready_banner(config, config_path, directory), flush=True)
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


def fail(problem: object, code: int) -> int:
    """Print one line for the user; return the exit status."""
    print(f"gossip-cluster: {problem}", file=sys.stderr)
    return code


def _cluster_file(args: argparse.Namespace, directory: Path) -> tuple[Path, ClusterConfig]:
    """The cluster file to run: --config's, else the state directory's ``cluster.toml``.

    The launcher writes ``cluster.toml`` only when it is absent or when --nodes,
    --base-port or --fresh ask for a new one (and says so, keeping the old file as
    ``cluster.toml.prev``), so that a file the user edited is used as it is.
    """
    if args.config:
        if args.nodes is not None or args.base_port is not None:
            raise ValueError("--nodes and --base-port make a new cluster file: not with --config")
        path = Path(args.config).resolve()
        return path, load_config(path)
    path = directory / "cluster.toml"
    asked = args.nodes is not None or args.base_port is not None or args.fresh
    if path.exists() and not asked:
        return path, load_config(path)
    config = generate_config(
        args.nodes if args.nodes is not None else 16,
        base_peer_port=args.base_port if args.base_port is not None else 17000,
        web=True,
    )
    text = dump_config(config)
    if path.exists():
        old = path.read_text(errors="replace")
        if old != text:
            path.with_name("cluster.toml.prev").write_text(old)
            print(
                f"gossip-cluster: wrote a new {path} ({len(config.nodes)} nodes) as"
                f" {'--fresh' if args.fresh else '--nodes/--base-port'} asked;"
                f" the old one is {path.name}.prev",
                file=sys.stderr,
            )
    path.write_text(text)
    return path, load_config(path)


async def _stop_leftovers(reactor: Any, cluster: LocalCluster) -> None:
    """Stop nodes of this directory still running from an earlier start (a node
    started by hand with start-node, whose launcher has gone), saying so."""
    for n, pid in cluster.running_by_pidfile().items():
        print(
            f"gossip-cluster: stopping node {n} (pid {pid}), left running by an earlier start",
            file=sys.stderr,
        )
        await stop_pid(reactor, pid)


def _report_exit(code: int, node_id: int, cluster: LocalCluster, stopping: list[bool]) -> int:
    """Say that a node ended, unless every node is being stopped; a node that
    restart-node or add-node started again within ``RESTART_GRACE`` seconds is
    reported as restarted instead."""
    if stopping:
        return code

    def report() -> None:
        if stopping:
            return
        pid = pidfile.running_node(cluster.pid_path(node_id))
        if pid is not None:
            print(f"gossip-cluster: node {node_id} was restarted (pid {pid})", file=sys.stderr)
            return
        how = f"was stopped by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        print(
            f"gossip-cluster: node {node_id} {how}"
            f" (log: {cluster.log_path(node_id)}); gossip-cluster start-node {node_id}"
            f"{ctl_flags(cluster.directory, cluster.config_path)} starts it again",
            file=sys.stderr,
        )

    cluster.reactor.callLater(RESTART_GRACE, report)
    return code


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def ctl_flags(directory: Path, config_path: Path) -> str:
    """The flags a per-node command needs to find this cluster's directory and file."""
    flags = "" if directory == state_dir() else f" --dir {shlex.quote(str(directory))}"
    if config_path != directory / "cluster.toml":
        flags += f" --config {shlex.quote(str(config_path))}"
    return flags


def _command_name(name: str) -> str:
    """``name`` if the shell finds this environment's command by that name, else its path."""
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == beside.resolve():
        return name
    return shlex.quote(str(beside))


def ready_banner(config: ClusterConfig, config_path: Path, directory: Path) -> str:
    """What the launcher prints once every node is up: commands that work as printed,
    in order (the id shown is the one the first command prints)."""
    ids = sorted(config.nodes)
    first = ids[0]
    default = state_dir() / "cluster.toml"
    env = "" if config_path == default else f"GOSSIP_CONFIG={shlex.quote(str(config_path))} "
    gclient = env + _command_name("gclient")
    ctl = _command_name("gossip-cluster")
    apple = short_id(message_id(b"Apple"))
    third = ids[min(2, len(ids) - 1)]
    web = web_url(config.nodes[first].web_listen)
    metrics = (
        f"  dashboard: {web}dashboard/ (any node's web_listen shows the whole cluster)\n"
        f"  metrics: {web}metrics (each node on its web_listen)\n"
        if web
        else ""
    )
    return (
        f"{len(ids)} nodes of cluster '{config.name}' are up, every link connected.\n"
        f"  config: {config_path}\n"
        f"  logs:   {directory}/node-N/node.log\n"
        f"{metrics}"
        f"In another terminal:\n"
        f'  {gclient} --id {first} --message "Apple"\n'
        f"  {gclient} --id {ids[min(4, len(ids) - 1)]} --msgID {apple}\n"
        f"  {gclient} --id {ids[min(3, len(ids) - 1)]} --list\n"
        f"  {gclient} --id {first} --status\n"
        f"  {ctl} restart-node {third}{ctl_flags(directory, config_path)}\n"
        f"Ctrl-C stops every node."
    )
