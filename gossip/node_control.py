"""One node of a running local cluster: ``gossip-cluster start-node|stop-node|restart-node|
node-status N`` and ``gossip-cluster add-node``.

Each node writes its pid to ``node-N/node.pid`` in the state directory (see
``gossip.pidfile``), whether the launcher started it or one of these commands
did, so the commands work while the launcher runs and after it has gone. A node
started here runs in its own session: it outlives the command, Ctrl-C in the
launcher's terminal does not reach it, and the launcher stops it with the rest
(it finds it by its pid file), as does the launcher's next start.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task

from gossip import pidfile
from gossip.cluster import LocalCluster, fail, ports_in_use, stop_pid, tail
from gossip.config import ClusterConfig, ConfigError, NodeSpec, dump_config, load_config
from gossip.locations import state_dir

COMMANDS = ("start-node", "stop-node", "restart-node", "node-status", "add-node")
_WHAT = {
    "start-node": "Start one node of the cluster in the background and wait until it answers"
    " (its pid file: node-N/node.pid in the state directory).",
    "stop-node": "Stop one running node (SIGTERM; SIGKILL after --timeout seconds).",
    "restart-node": "stop-node, then start-node.",
    "node-status": "Say whether a node runs, with its pid (exit status 3 if it does not).",
    "add-node": "Add a node to the cluster file and start it: it takes the place of one"
    " link (a-b becomes a-NEW-b, so it has 2 neighbours and the file gets"
    " allow_any_degree = true); every running node is restarted one at a time to learn"
    " the new graph. The old file is kept as cluster.toml.prev.",
}


def parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"gossip-cluster {command}", description=_WHAT[command])
    if command != "add-node":
        p.add_argument("id", type=int, help="the node's id in the cluster file")
    p.add_argument("--config", help="cluster file (default: cluster.toml in the state directory)")
    p.add_argument("--dir", help="state directory (default: $GOSSIP_HOME or ~/.local/state/gossip)")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--memory",
        action="store_true",
        help="start memory-only (a restarted node keeps the mode it ran in)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    return p


def main(argv: list[str]) -> int:
    command = argv[0]
    args = parser(command).parse_args(argv[1:])
    directory = Path(args.dir) if args.dir else state_dir()
    config_path = Path(args.config).resolve() if args.config else directory / "cluster.toml"
    try:
        config = load_config(config_path)
        if command != "add-node":
            config.node(args.id)
    except ConfigError as e:
        return fail(e, 2)
    code = [0]

    async def run(reactor: Any) -> None:
        cluster = LocalCluster(reactor, config_path, directory, log_level=args.log_level)
        if command == "add-node":
            code[0] = await add_node(cluster, args)
            return
        pid = pidfile.running_node(cluster.pid_path(args.id))
        if command == "node-status":
            print(f"node {args.id}: " + (f"running, pid {pid}" if pid else "not running"))
            code[0] = 0 if pid else 3
        elif command == "stop-node":
            code[0] = await stop(cluster, args.id, args.timeout)
        elif command == "restart-node":
            memory = args.memory or _runs_in_memory(pid)
            code[0] = await stop(cluster, args.id, args.timeout) or await start(
                cluster, args.id, args.timeout, memory
            )
        elif pid is not None:
            code[0] = fail(f"node {args.id} is already running (pid {pid})", 1)
        else:
            code[0] = await start(cluster, args.id, args.timeout, args.memory)

    def begin(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(run(reactor))

    try:
        task.react(begin)
    except SystemExit as e:
        if e.code not in (0, None):
            return code[0] or 1
    return code[0]


def _runs_in_memory(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return b"--memory" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


async def stop(cluster: LocalCluster, node_id: int, timeout: float) -> int:
    """Stop node ``node_id`` if it runs; 0, or 1 if it would not stop."""
    pid = pidfile.running_node(cluster.pid_path(node_id))
    if pid is None:
        print(f"gossip-cluster: node {node_id} is not running", file=sys.stderr)
        return 0
    if not await stop_pid(cluster.reactor, pid, timeout):
        return fail(f"node {node_id} (pid {pid}) did not stop", 1)
    pidfile.clear_stale(cluster.pid_path(node_id))
    print(f"gossip-cluster: node {node_id} (pid {pid}) stopped", file=sys.stderr)
    return 0


async def start(cluster: LocalCluster, node_id: int, timeout: float, memory: bool = False) -> int:
    """Start one node in its own session, so that it outlives this command; wait
    until that very process answers on its client port. 0, or 1 with one line."""
    reactor = cluster.reactor
    d = cluster.node_dir(node_id)
    d.mkdir(parents=True, exist_ok=True)
    pidfile.clear_stale(cluster.pid_path(node_id))
    one = attrs.evolve(cluster.config, nodes={node_id: cluster.config.node(node_id)})
    busy = await ports_in_use(reactor, one)
    if busy:
        return fail(f"node {node_id} cannot start: port {busy[0]} is in use", 1)
    command = cluster.node_command(node_id)
    if memory:
        data = command.index("--data-dir")
        command[data : data + 2] = ["--memory"]
    with open(d / "stderr.log", "ab") as out:
        proc = subprocess.Popen(
            command, cwd=d, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = reactor.seconds() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            last = tail(d / "stderr.log") or tail(cluster.log_path(node_id))
            return fail(
                f"node {node_id} exited with status {code}" + (f": {last}" if last else ""), 1
            )
        s = await cluster.node_status(node_id)
        if s is not None and s.get("pid") == proc.pid:
            print(
                f"gossip-cluster: node {node_id} started (pid {proc.pid});"
                f" log: {cluster.log_path(node_id)}",
                file=sys.stderr,
            )
            return 0
        if reactor.seconds() > deadline:
            return fail(f"node {node_id} (pid {proc.pid}) not answering after {timeout:g} s", 1)
        await task.deferLater(reactor, 0.1)


def with_new_node(config: ClusterConfig) -> tuple[ClusterConfig, NodeSpec]:
    """``config`` with one more node that splits the last link (a-b becomes a-new-b)."""
    a, b = config.edges()[-1]
    new_id = max(config.nodes) + 1
    host = config.nodes[a].host
    ports = [(s.host, s.peer_port, s.client_port) for s in config.nodes.values()]
    if host is None or any(p is None or c is None for _, p, c in ports):
        raise ValueError(
            "add-node derives the new node's addresses from host, peer_port and client_port;"
            " this file gives endpoints instead: add the node to it by hand"
        )
    used = {(h, p) for h, peer, client in ports for p in (peer, client)}
    peer = max(p for _, p, _ in ports if p is not None) + 1
    client = max(c for _, _, c in ports if c is not None) + 1
    while (host, peer) in used or peer == client:
        peer += 1
    while (host, client) in used:
        client += 1
    spec = NodeSpec(new_id, host, peer, client, (a, b))

    def relink(s: NodeSpec, old: int) -> NodeSpec:
        return attrs.evolve(s, neighbours=tuple(sorted({*s.neighbours} - {old} | {new_id})))

    nodes = dict(config.nodes)
    nodes[a] = relink(nodes[a], b)
    nodes[b] = relink(nodes[b], a)
    nodes[new_id] = spec
    return attrs.evolve(config, nodes=nodes, allow_any_degree=True), spec


async def add_node(cluster: LocalCluster, args: argparse.Namespace) -> int:
    old = cluster.config
    try:
        new, spec = with_new_node(old)
        text = dump_config(new)
        cluster.config_path.with_name(cluster.config_path.name + ".prev").write_text(
            cluster.config_path.read_text()
        )
        cluster.config_path.write_text(text)
        cluster.config = load_config(cluster.config_path)
    except (ConfigError, OSError, IndexError, ValueError) as e:
        return fail(f"cannot add a node: {e}", 1)
    a, b = spec.neighbours
    print(
        f"gossip-cluster: added node {spec.id} (peers on {spec.host}:{spec.peer_port}, clients"
        f" on {spec.client_port}) between nodes {a} and {b} in {cluster.config_path}",
        file=sys.stderr,
    )
    running = cluster.running_by_pidfile()
    for n in sorted(running):
        if n in new.nodes:
            memory = _runs_in_memory(running[n])
            code = await stop(cluster, n, args.timeout) or await start(
                cluster, n, args.timeout, memory
            )
            if code:
                return code
    code = await start(cluster, spec.id, args.timeout, args.memory)
    if code:
        return code
    if not {a, b} <= set(running):
        print(
            f"gossip-cluster: node {spec.id} started; its neighbours {a} and {b} are not"
            " both running",
            file=sys.stderr,
        )
        return 0
    probe = LocalCluster(cluster.reactor, cluster.config_path, cluster.directory)
    try:
        await probe.wait_ready(args.timeout, nodes=[spec.id, a, b])
    except Exception as e:
        return fail(e, 1)
    print(f"gossip-cluster: node {spec.id} is up, linked to nodes {a} and {b}", file=sys.stderr)
    return 0
